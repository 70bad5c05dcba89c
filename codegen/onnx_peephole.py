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
    """

    rsqrt_to_div: int = 0
    attention: int = 0


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


def simplify(model: onnx.ModelProto) -> PeepholeReport:
    """Applies every rewrite of the module docstring to ``model`` in place; returns the counts."""
    return PeepholeReport(rsqrt_to_div=rsqrt_to_div(model.graph), attention=attention_with_past(model))
