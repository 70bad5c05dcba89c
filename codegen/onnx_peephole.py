"""Peephole rewrites of an exported ONNX graph: fewer nodes per decode step on ONNX Runtime.

A decode step of a small model is hundreds of tiny nodes around its matrix products; on CPU each
node costs a kernel launch (and a thread-pool round trip with several threads) whatever its size.
``simplify`` rewrites two shapes the exporter writes into ones ONNX Runtime runs as single nodes.

Rewrites:
    Mul(x, Reciprocal(Sqrt(a)))  ->  Div(x, Sqrt(a))
        (any opset; ``torch.rsqrt`` exports as Sqrt + Reciprocal, and ONNX Runtime fuses RMSNorm
        into SimplifiedLayerNormalization only from the Div form)
    present_k = Concat(past_k, k, axis=2), present_v = Concat(past_v, v, axis=2),
    y = condfx::Attention<scale, window=0>(q, present_k, present_v)
        ->  y, present_k, present_v = Attention<is_causal=1, scale>(q, k, v, "", past_k, past_v)
        (opset >= 23, float32; the standard op appends the past itself and aligns the causal mask
        to the end of the keys when a past is given, as ``condfx::Attention`` does)

    RotaryEmbedding(x (B, H, T, D), cos (1, T, R), sin (1, T, R))
        ->  RotaryEmbedding(x, Expand(cos, [B, 1, 1]), Expand(sin, [B, 1, 1]))
        (opset >= 23; torch.onnx.export fuses rotate-half RoPE into the standard op with the
        model's batch-1 cos / sin tables, which ONNX Runtime refuses for batch > 1 because the op
        does not broadcast them; one [B, 1, 1] per batch dim name, read from the first x)

Requires: a model from ``torch.onnx.export`` with value_info (the element type of q is read from
it); ``condfx::Attention`` nodes as ``condfx.codegen.onnx.attention`` emits them.

Does not handle: sliding windows (window > 0), ``condfx::AttentionScored`` (softcap, ALiBi, sinks),
float16 / bfloat16 attention (kept as the local function), attention without a cache Concat
(a prefill graph keeps its local function: its causal mask is square).
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx
from onnx import helper

from condfx.codegen.onnx._functions import DOMAIN

ATTENTION_OPSET = 23  # the first opset with the standard Attention op
_CACHE_AXES = (2, -2)  # the length axis of a (B, Hkv, S, D) cache


@dataclass(frozen=True)
class PeepholeReport:
    """How many nodes each rewrite replaced.

    Attributes:
        rsqrt_to_div: Reciprocal(Sqrt) products turned into a Div.
        attention: ``condfx::Attention`` nodes (with their two cache Concats) turned into ``Attention``.
        rotary_batch: ``RotaryEmbedding`` nodes whose cos / sin tables now have x's batch.
    """

    rsqrt_to_div: int = 0
    attention: int = 0
    rotary_batch: int = 0


def _opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def _producers(graph: onnx.GraphProto) -> dict[str, onnx.NodeProto]:
    return {out: node for node in graph.node for out in node.output if out}


def _uses(graph: onnx.GraphProto, outputs: bool = True) -> dict[str, int]:
    """How many node inputs (and, with ``outputs``, graph outputs) read each value."""
    counts: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            counts[name] = counts.get(name, 0) + 1
    for out in graph.output if outputs else ():
        counts[out.name] = counts.get(out.name, 0) + 1
    return counts


def _drop(graph: onnx.GraphProto, dropped: list[onnx.NodeProto]) -> None:
    ids = {id(node) for node in dropped}
    kept = [node for node in graph.node if id(node) not in ids]
    del graph.node[:]
    graph.node.extend(kept)


def rsqrt_to_div(graph: onnx.GraphProto) -> int:
    """``Mul(x, Reciprocal(Sqrt(a)))`` -> ``Div(x, Sqrt(a))`` where the Reciprocal has no other use."""
    producers, uses = _producers(graph), _uses(graph)
    dropped = []
    for node in graph.node:
        if node.op_type != "Mul" or node.domain not in ("", "ai.onnx") or len(node.input) != 2:
            continue
        for i, name in enumerate(node.input):
            recip = producers.get(name)
            if recip is None or recip.op_type != "Reciprocal" or uses.get(name) != 1:
                continue
            sqrt = producers.get(recip.input[0])
            if sqrt is None or sqrt.op_type != "Sqrt":
                continue
            other = node.input[1 - i]
            node.op_type = "Div"
            del node.input[:]
            node.input.extend([other, recip.input[0]])
            dropped.append(recip)
            break
    _drop(graph, dropped)
    return len(dropped)


def _elem_types(graph: onnx.GraphProto) -> dict[str, int]:
    infos = [*graph.value_info, *graph.input, *graph.output]
    return {v.name: v.type.tensor_type.elem_type for v in infos if v.type.HasField("tensor_type")}


def _cache_concat(node: onnx.NodeProto | None) -> bool:
    """A two-input Concat along the cache length axis."""
    if node is None or node.op_type != "Concat" or len(node.input) != 2:
        return False
    axis = next((helper.get_attribute_value(a) for a in node.attribute if a.name == "axis"), None)
    return axis in _CACHE_AXES


def attention_with_past(model: onnx.ModelProto) -> int:
    """Cache Concats + ``condfx::Attention`` (window 0, float32) -> the standard ``Attention`` (opset 23)."""
    if _opset(model) < ATTENTION_OPSET:
        return 0
    graph = model.graph
    producers, uses, types = _producers(graph), _uses(graph), _elem_types(graph)
    readers = _uses(graph, outputs=False)
    dropped: list[onnx.NodeProto] = []
    for node in graph.node:
        if node.domain != DOMAIN or node.op_type != "Attention" or len(node.input) != 3:
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if attrs.get("window", 0) != 0 or types.get(node.input[0]) != onnx.TensorProto.FLOAT:
            continue
        cat_k, cat_v = producers.get(node.input[1]), producers.get(node.input[2])
        if not (_cache_concat(cat_k) and _cache_concat(cat_v)) or cat_k is cat_v:
            continue
        if any(uses.get(cat.input[1]) != 1 or readers.get(cat.output[0]) != 1 for cat in (cat_k, cat_v)):
            continue  # new k / v or a present read by another node too: the graph stays as it is
        q = node.input[0]
        ins = [q, cat_k.input[1], cat_v.input[1], "", cat_k.input[0], cat_v.input[0]]
        outs = [node.output[0], cat_k.output[0], cat_v.output[0]]
        fused = helper.make_node("Attention", ins, outs, name=f"{node.name}_with_past", is_causal=1,
                                 scale=float(attrs["scale"]))
        node.CopyFrom(fused)
        dropped += [cat_k, cat_v]
    _drop(graph, dropped)
    return len(dropped) // 2


_SAME_SHAPE = ("Cos", "Sin", "Cast", "Identity", "Neg")  # unary: output shape = input shape


def _dims(infos: dict[str, onnx.ValueInfoProto], name: str,
          producers: dict[str, onnx.NodeProto] | None = None) -> list[int | str | None] | None:
    """The dims of ``name`` (ints, dim names or None) from value_info, or through unary producers."""
    info = infos.get(name)
    while (info is None or not info.type.tensor_type.HasField("shape")) and producers and name in producers:
        node = producers[name]
        if node.op_type not in _SAME_SHAPE or not node.input:
            return None
        name = node.input[0]
        info = infos.get(name)
    if info is None or not info.type.tensor_type.HasField("shape"):
        return None
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in info.type.tensor_type.shape.dim]


def _batch_one_table(node: onnx.NodeProto, infos: dict[str, onnx.ValueInfoProto],
                     producers: dict[str, onnx.NodeProto]) -> bool:
    """A RotaryEmbedding without position ids whose cos / sin tables have batch 1 and x another batch."""
    if node.op_type != "RotaryEmbedding" or node.domain not in ("", "ai.onnx") or len(node.input) != 3:
        return False
    x, tables = _dims(infos, node.input[0], producers), [_dims(infos, n, producers) for n in node.input[1:]]
    return bool(x) and x[0] != 1 and all(t and len(t) == 3 and t[0] == 1 for t in tables)


def rotary_tables_to_batch(model: onnx.ModelProto) -> int:
    """Expands the batch-1 cos / sin tables of ``RotaryEmbedding`` nodes to x's batch (opset >= 23)."""
    if _opset(model) < ATTENTION_OPSET:
        return 0
    graph = model.graph
    infos = {v.name: v for v in [*graph.value_info, *graph.input, *graph.output]}
    producers = _producers(graph)
    nodes: list[onnx.NodeProto] = []
    shapes: dict[object, str] = {}  # x's batch dim name (or the node, when unnamed) -> the [B, 1, 1] tensor
    count = 0
    for node in graph.node:
        if _batch_one_table(node, infos, producers):
            key = _dims(infos, node.input[0], producers)[0] or id(node)
            if key not in shapes:
                base = f"{node.name or node.output[0]}_table"
                nodes += [helper.make_node("Shape", [node.input[0]], [f"{base}_batch"], start=0, end=1),
                          helper.make_node("Constant", [], [f"{base}_ones"], value_ints=[1, 1]),
                          helper.make_node("Concat", [f"{base}_batch", f"{base}_ones"], [f"{base}_shape"], axis=0)]
                shapes[key] = f"{base}_shape"
            for i in (1, 2):
                expanded = f"{node.input[i]}_to_batch_{count}"
                nodes.append(helper.make_node("Expand", [node.input[i], shapes[key]], [expanded]))
                node.input[i] = expanded
            count += 1
        nodes.append(node)
    del graph.node[:]
    graph.node.extend(nodes)
    return count


def simplify(model: onnx.ModelProto) -> PeepholeReport:
    """Applies every rewrite of the module docstring to ``model`` in place; returns the counts."""
    return PeepholeReport(rsqrt_to_div=rsqrt_to_div(model.graph), attention=attention_with_past(model),
                          rotary_batch=rotary_tables_to_batch(model))
