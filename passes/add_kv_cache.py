"""Turn a fused graph into its KV-cache decode form: past K/V in, present K/V out, positions offset.

Rewrites (for the i-th cached attention op, in graph order; generic over the decode rules table
``passes/decode_rules.DECODE_RULES``, one rule per op in ``passes/decode/<op>.py``):
    forward(input_ids) -> logits
        → forward(input_ids, past_<names of layout 0>, ...) -> (logits, present_<names>, ...)
    op_i(...) → rule.rewire(op_i, layout_i, past_i): the op reading its past (for condfx.attention:
        cat([past_k_i, k], 2), cat([past_v_i, v], 2)); layout_i = rule.layout(op_i, i)
        (``condfx.layouts``: full, window, interleaved, float16 or packed streams)
    position sources (``passes/decode/positions.py``): arange(T) feeding RoPE cos/sin, a position
        embedding or a weight table → arange(P, P + T); cumsum of a ``ones`` fill along T → + P;
        constant fills and aranges enumerating the call's rows (MoE dispatch) are left alone.
        P = the cache length of the first layer whose rule says it gives the position (its
        layout's length inputs over its rows per token); when no layer does (every layer windowed
        or otherwise bounded) a ``PositionLayout`` is added after the layers: past_position
        (B, 0, P, 0) → present_position (B, 0, P + T, 0), 0 bytes, its dim 2 the position. Rules
        read P too
  Exact: the decode form with P = 0 is the original function, and prefill(ids[:n]) followed by
  decode steps over ids[n:] reproduces the full forward (the op aligns queries to the end of the keys).
  The rewritten graph is re-exported (``torch.export``; dims batch, seq and the layouts'
  ``length_dims``: one past length per layer shared by its k and v, one per stream tensor; example P = 3), so every node gets fresh FakeTensor
  metadata. ``gm.meta["condfx_kv"]`` lists the layers' cache layouts for the runtime and the exporter.
  Position sources are checked: every tensor whose shape depends on T but not on the tokens must be
  one of the forms above, else the pass fails naming the node (e.g. a RoPE table sliced to T).

Requires: every attention core is an op with a decode rule (must run after ``fuse-attention``); the
  graph's only input is ``input_ids`` (B, T) (or embeddings (B, T, C)) with symbolic B and T; its
  first output is the logits. Must run last: passes after it would see two extra inputs per layer
  and a tuple output.

Does not handle: position ids passed as graph inputs (they are not offset), padded batches (the op
  has no padding mask).
"""

from __future__ import annotations

import dataclasses
import operator
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import fx

import condfx.ops  # noqa: F401  (registers torch.ops.condfx.*)
from condfx.layouts import META_KEY, CacheLayout, PositionLayout, is_decode_form
from condfx.passes._insert import remove_dead_calls
from condfx.passes.base import GraphSnapshot, Pass, PassError, PassReport, PassResult
from condfx.passes.decode.base import DecodeContext
from condfx.passes.decode.positions import (
    PositionPlan,
    find_position_aranges,
    offset_positions,
    plan_positions,
    position_roots,
)
from condfx.passes.decode.positions import reaches_position_use as _reaches_position_use  # noqa: F401  (skip-ffn)
from condfx.passes.decode_rules import DECODE_RULES
from condfx.passes.fuse_attention import is_fused_attention
from condfx.passes.graph_builder import PROVENANCE_KEYS
from condfx.patterns import find_regions

__all__ = ["AddKVCache", "AddKVCacheConfig", "KVCacheReport", "find_position_aranges", "is_cached_attention",
           "is_decode_form", "position_roots"]

_EXAMPLE_B, _EXAMPLE_T, _EXAMPLE_P = 2, 5, 3


@dataclass(frozen=True)
class AddKVCacheConfig:
    """Options of ``add-kv-cache`` (none yet; the cache policy lives in the layouts and the runtime)."""


@dataclass(frozen=True)
class KVCacheReport(PassReport):
    """The PassReport of ``add-kv-cache`` plus the position nodes it offset.

    Attributes:
        positions: names of the ``arange(T)`` nodes (before the pass) now starting at P.
    """

    positions: tuple[str, ...] = ()

    def to_markdown(self) -> str:
        """The base report plus one line naming the offset position nodes."""
        offset = ", ".join(self.positions) or "none"
        return f"{super().to_markdown()}\n- positions offset by the cache length: {offset}"


def is_cached_attention(node: fx.Node) -> bool:
    """Is ``node`` an op with a decode rule (``passes/decode_rules.DECODE_RULES``)?"""
    return node.op == "call_function" and node.target in DECODE_RULES


def _as_kv_report(base: PassReport, positions: tuple[str, ...] = ()) -> KVCacheReport:
    fields = {f.name: getattr(base, f.name) for f in dataclasses.fields(base)}
    return KVCacheReport(**fields, positions=positions)


def _graph_input(gm: fx.GraphModule, name: str) -> fx.Node:
    """The graph's one input, (B, T) ids or (B, T, C) embeddings with a symbolic T."""
    inputs = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(inputs) != 1:
        reason = f"add-kv-cache needs one graph input (input_ids); got {len(inputs)}"
        raise PassError(name, reason)
    val = inputs[0].meta["val"]
    if val.dim() < 2 or not isinstance(val.shape[1], torch.SymInt):
        reason = "input_ids needs a symbolic sequence dimension 1; capture with dynamic=True"
        raise PassError(name, reason, node=inputs[0])
    return inputs[0]


def _check_fused(gm: fx.GraphModule, name: str) -> list[fx.Node]:
    """The cached attention nodes in graph order; PassError when any core is not fused."""
    unfused = [r for r in find_regions(gm).attention if not is_fused_attention(r.core)]
    unfused = [r for r in unfused if not is_cached_attention(r.core)]
    if unfused:
        reason = (
            f"add-kv-cache needs every attention core fused into condfx.attention; layer "
            f"{unfused[0].layer} is not: run fuse-attention first (e.g. 'fuse-attention, add-kv-cache')"
        )
        raise PassError(name, reason, node=unfused[0].core)
    attn = [n for n in gm.graph.nodes if is_cached_attention(n)]
    if not attn:
        reason = "add-kv-cache found no condfx.attention node: run fuse-attention first"
        raise PassError(name, reason)
    return attn


def _add_past_inputs(graph: fx.Graph, ids: fx.Node, layouts: list[CacheLayout]) -> list[list[fx.Node]]:
    pasts, last = [], ids
    for layout in layouts:
        layer = []
        for name in layout.io_names():
            with graph.inserting_after(last):
                last = graph.placeholder(f"past_{name}")
            layer.append(last)
        pasts.append(layer)
    return pasts


def _gives_position(node: fx.Node | None, layout: CacheLayout) -> bool:
    if isinstance(layout, PositionLayout):
        return True
    return node is not None and DECODE_RULES[node.target].gives_position(layout)


def _position(graph: fx.Graph, attn, layouts, pasts) -> fx.Node | None:
    """P, the absolute position of the first new token, from the first layer whose rule says its
    cache length gives it (the sum of its length inputs' dim 2, over its rows per token), or the
    ``PositionLayout`` added when none does; inserted right after the past inputs. None when no
    layout gives it."""
    first = pasts[-1][-1].next  # right after the past inputs
    ops = [*attn, *[None] * (len(layouts) - len(attn))]  # a PositionLayout has no op
    for node, layout, past in zip(ops, layouts, pasts, strict=True):
        if not _gives_position(node, layout):
            continue
        with graph.inserting_before(first):
            sizes = [graph.call_function(torch.ops.aten.sym_size.int, (past[i], 2))
                     for i in layout.length_inputs()]
            p = sizes[0]
            for size in sizes[1:]:
                p = graph.call_function(operator.add, (p, size))
            if layout.rows_per_token > 1:  # an IHA layer's cache holds ``pseudo`` rows per token
                p = graph.call_function(operator.floordiv, (p, layout.rows_per_token))
        return p
    return None


def _with_position_layout(attn: list[fx.Node], layouts: list[CacheLayout], plan: PositionPlan) -> list[CacheLayout]:
    """``layouts`` plus a ``PositionLayout`` when something needs P and no layer's cache gives it."""
    rules = [DECODE_RULES[node.target] for node in attn]
    needed = any(r.needs_position for r in rules) or bool(plan.aranges or plan.cumsums)
    if needed and not any(_gives_position(n, s) for n, s in zip(attn, layouts, strict=True)):
        return [*layouts, PositionLayout(len(layouts))]
    return layouts


def _position_present(graph: fx.Graph, ids: fx.Node, past: fx.Node) -> fx.Node:
    """present_position = cat([past_position, zeros(B, 0, T, 0)], 2), right before the output."""
    output = next(n for n in graph.nodes if n.op == "output")
    with graph.inserting_before(output):
        b = graph.call_function(torch.ops.aten.sym_size.int, (ids, 0))
        t = graph.call_function(torch.ops.aten.sym_size.int, (ids, 1))
        new = graph.call_function(torch.ops.aten.new_zeros.default, (past, [b, 0, t, 0]))
        return graph.call_function(torch.ops.aten.cat.default, ([past, new], 2))


def _reexport(
    gm: fx.GraphModule, ids_val: torch.Tensor, layouts: list[CacheLayout], old_meta: dict
) -> fx.GraphModule:
    """Runs torch.export on the rewritten module to give every node fresh FakeTensor metadata.

    Dims: batch and seq of the input, and each cache tensor's dim 2 named by its layout
    (``length_dims``: one length per layer for K/V, one per stream tensor for packed streams).
    """
    dim = torch.export.Dim
    batch, seq = dim("batch", min=1), dim("seq", min=1)
    shape = (_EXAMPLE_B, _EXAMPLE_T, *(int(d) for d in ids_val.shape[2:]))
    device = ids_val.device  # the model's device: examples must live beside its weights
    ids = torch.zeros(shape, dtype=ids_val.dtype, device=device)  # (B, T) ids or (B, T, C)
    past, dyn, lengths = [], [{0: batch, 1: seq}], {}
    for layout in layouts:
        past += layout.empty_past(_EXAMPLE_B, device, _EXAMPLE_P)
        for name in layout.length_dims():
            length = lengths.setdefault(name, dim(name, min=0))
            dyn.append({0: batch, 2: length})
    with torch.no_grad():
        ep = torch.export.export(gm, (ids, *past), dynamic_shapes=tuple(dyn), strict=False)
    out = ep.module()
    for node in out.graph.nodes:
        for key, value in old_meta.get(node.name, {}).items():
            node.meta.setdefault(key, value)
    out.meta.update(gm.meta)
    return out


def _rewrite(gm, ids, attn, plan: PositionPlan, layouts) -> None:
    """The fx surgery: past inputs, each op's decode rule, offset positions, (logits, presents...)."""
    graph = gm.graph
    for node in [n for n in graph.nodes if n.op == "call_module" and n.target == "_guards_fn"]:
        graph.erase_node(node)  # export's shape guards for the old signature; re-export adds new
    nodes = {n.name: n for n in graph.nodes}
    pasts = _add_past_inputs(graph, ids, layouts)
    p = _position(graph, attn, layouts, pasts)
    ctx = DecodeContext(gm, ids, p, nodes)
    presents = []
    for node, layout, past in zip(attn, layouts, pasts, strict=False):
        presents += DECODE_RULES[node.target].rewire(node, layout, past, ctx)
    for finish in ctx.deferred:
        finish()
    if len(layouts) > len(attn):  # the PositionLayout
        presents.append(_position_present(graph, ids, pasts[-1][0]))
    offset_positions(graph, plan, ids, p)
    output = next(n for n in graph.nodes if n.op == "output")
    logits = output.args[0]
    logits = logits[0] if isinstance(logits, (tuple, list)) else logits
    output.args = ((logits, *presents),)
    remove_dead_calls(graph)  # e.g. KIVI layers leave their fake-quantize nodes unused
    graph._codegen = fx.graph.CodeGen()  # plain positional inputs and a tuple output
    graph.lint()
    gm.recompile()


class AddKVCache(Pass):
    """``add-kv-cache``: the fused graph → its decode form with past/present caches.

    The input module's graph is rewritten in place and then re-exported; the returned module is
    the re-exported one (the pipeline hands the pass a private copy, so a failure leaves the
    caller's module untouched).
    """

    name: ClassVar[str] = "add-kv-cache"
    config_class: ClassVar[type] = AddKVCacheConfig
    matches: ClassVar[str] = "condfx.attention node"

    def __call__(self, gm: fx.GraphModule) -> PassResult:
        snapshot = GraphSnapshot.take(gm)
        if is_decode_form(gm):
            n = sum(not isinstance(s, PositionLayout) for s in gm.meta[META_KEY])
            skipped = (("already in decode form", "graph has past_k_0"),)
            base = snapshot.report(gm, self.name, matched=n, skipped=skipped)
            return PassResult(gm, False, _as_kv_report(base))
        attn = _check_fused(gm, self.name)
        ids = _graph_input(gm, self.name)
        plan = plan_positions(gm, ids, self.name)
        layouts = [DECODE_RULES[node.target].layout(node, i) for i, node in enumerate(attn)]
        layouts = _with_position_layout(attn, layouts, plan)
        old_meta = {
            n.name: {k: n.meta[k] for k in PROVENANCE_KEYS if k in n.meta} for n in gm.graph.nodes
        }
        positions = plan.offset
        _rewrite(gm, ids, attn, plan, layouts)
        new = _reexport(gm, ids.meta["val"], layouts, old_meta)
        new.meta[META_KEY] = tuple(layouts)
        base = snapshot.report(new, self.name, matched=len(attn), rewritten=len(attn))
        return PassResult(new, True, _as_kv_report(base, positions))
