"""Decode rule of ``condfx.quantized_cache_attention`` (``quantize-kv``): each layer's graph reads
and updates its own packed cache (``condfx/ops/quant_stream.py``), so PyTorch and ONNX Runtime carry
the same integer tensors and any split into steps equals the teacher-forced forward.

The rule reads the layer's ``QuantizedKVPlan`` (``passes/kv_quant/plan.py``, ``node.meta
["condfx_kv_plan"]``), never the shape of the graph:
    DecodeForm.KIVI:    quantized_cache_attention(q, k, v, k̂, v̂, ...)
                        → kivi_cache_attention(q, k, v, <K stream>, <V stream>, ...)[0]
                        A windowed layer without sink is a ring (``StreamsLayout.ring``): the
                        runtime drops whole packed groups the window no longer sees, the op reads
                        no position, so any split into steps still equals the teacher-forced form.
    DecodeForm.STREAMS: each planned fq(X) → condfx.quantized_stream(<stream>, X); the path from fq to
                        k̂ / v̂ is copied twice over the N cached tokens, fed the stream's ``full`` and
                        ``hat`` outputs (RoPE positions re-derived as arange(N)), and attention reads
                        (k, v, k̂, v̂) = (path(full), path(hat)). XQuant-CL: the stream holds the
                        deltas; a_i over all N tokens (a_{i-1} + hat) is built layer by layer.
                        A 16-bit stream keeps its quantized tokens as float16 values.
    DecodeForm.FLOAT16: a float16 K/V cache: k, v and k̂, v̂ read cat([past, new], 2), the new
                        tokens' fq(x, 16) written as casts to float16 and back.
    DecodeForm.NONE:    refused with the plan's reason.
"""

from __future__ import annotations

import operator
from typing import ClassVar

import torch
from torch import fx

from condfx.layouts import CacheLayout, Float16KVLayout, StreamsLayout
from condfx.ops.kv_quant import FLOAT16_MAX
from condfx.passes.base import PassError
from condfx.passes.decode.base import (
    DecodeContext,
    DecodeRule,
    cat_past,
    kv_shape,
    op_arg,
    set_op_args,
)
from condfx.passes.kv_quant.plan import PLAN_KEY, DecodeForm, QuantizedKVPlan

aten = torch.ops.aten
_LOWERING = "add-kv-cache"  # the pass that runs the decode rules, for errors


def _planned(ctx: DecodeContext, plan: QuantizedKVPlan, name: str, node: fx.Node) -> fx.Node:
    """The node ``name`` of the plan; PassError naming quantize-kv when a later pass removed it."""
    found = ctx.nodes.get(name)
    if found is None:
        reason = (f"quantize-kv's plan for layer {plan.layer} names node '{name}', which is no longer in "
                  "the graph: a pass after quantize-kv rewrote that layer, and its decode form cannot be "
                  "built; run quantize-kv after the passes that rewrite attention")
        raise PassError(_LOWERING, reason, node=node)
    return found


def plan_of(node: fx.Node) -> QuantizedKVPlan:
    """The plan quantize-kv attached to ``node``; PassError when it has none."""
    plan = node.meta.get(PLAN_KEY)
    if not isinstance(plan, QuantizedKVPlan):
        reason = ("a condfx.quantized_cache_attention node carries no quantize-kv plan "
                  f"(node.meta['{PLAN_KEY}']); write it with the quantize-kv pass")
        raise PassError(_LOWERING, reason, node=node)
    return plan


class QuantizedDecodeRule(DecodeRule):
    """``condfx.quantized_cache_attention`` → its packed (or float16) decode form, by its plan."""

    pass_name: ClassVar[str] = "quantize-kv"

    def layout(self, node: fx.Node, layer: int) -> CacheLayout:
        plan = plan_of(node)
        heads, dim, dtype = kv_shape(node)
        if plan.form is DecodeForm.NONE:
            reason = (f"quantize-kv's layer {plan.layer} (method {plan.method}, k_bits {plan.k_bits}, "
                      f"v_bits {plan.v_bits}, rotate {plan.rotate}) has no decode form: {plan.reason}")
            raise PassError(_LOWERING, reason, node=node)
        if plan.form is DecodeForm.FLOAT16:
            return Float16KVLayout(layer, heads, dim, dtype)
        specs = tuple(s.spec for s in plan.streams)
        window = int(op_arg(node, "window") or 0)
        ring = plan.form is DecodeForm.KIVI and window > 0 and plan.sink == 0  # positions never read
        return StreamsLayout(layer, heads, dim, dtype, specs, window, ring)

    def rewire(self, node: fx.Node, layout: CacheLayout, past: list[fx.Node],
               ctx: DecodeContext) -> list[fx.Node]:
        plan = plan_of(node)
        if plan.form is DecodeForm.FLOAT16:  # the cache already holds the past as read
            presents = cat_past(ctx.graph, node, past)
            cat_past(ctx.graph, node, past, ("k_hat", "v_hat"))
            for sp in plan.streams:  # the new tokens' float16 rounding as two casts (ONNX has them)
                _round_to_float16(ctx.graph, _planned(ctx, plan, sp.fq, node))
            return presents
        if plan.form is DecodeForm.KIVI:
            return _rewire_kivi(ctx.graph, node, plan, past)
        return _rewire_streams(node, plan, past, ctx)


def _round_to_float16(graph: fx.Graph, fq: fx.Node) -> None:
    """fake_group_quantize(x, 16, ...) → x saturated to float16's range, cast to float16 and back
    (what 16 bits means)."""
    x = op_arg(fq, "x")
    with graph.inserting_before(fq):
        held = graph.call_function(aten.clamp.default, (x, -FLOAT16_MAX, FLOAT16_MAX))
        half = graph.call_function(aten._to_copy.default, (held,), {"dtype": torch.float16})
        back = graph.call_function(aten._to_copy.default, (half,), {"dtype": x.meta["val"].dtype})
    fq.replace_all_uses_with(back)


def _rewire_kivi(graph: fx.Graph, node: fx.Node, plan: QuantizedKVPlan, past: list[fx.Node]) -> list[fx.Node]:
    """Replaces the op by ``kivi_cache_attention``; returns its 8 presents."""
    st = plan.streams[0].spec
    a = {n: op_arg(node, n) for n in ("q", "k", "v", "scale", "window")}
    args = (a["q"], a["k"], a["v"], *past, a["scale"], a["window"], st.bits, st.group, st.residual, st.sink)
    with graph.inserting_before(node):
        step = graph.call_function(torch.ops.condfx.kivi_cache_attention.default, args)
        outs = [graph.call_function(operator.getitem, (step, i)) for i in range(9)]
    node.replace_all_uses_with(outs[0])
    graph.erase_node(node)
    return outs[1:]


def _clone_for_all_tokens(graph, root: fx.Node, env: dict, length: fx.Node, ids: fx.Node) -> fx.Node:
    """A copy of ``root`` computed over every cached token: the nodes between the keys in ``env``
    (fake-quantize nodes → stream outputs) and ``root`` are copied with those replaced, and the
    sequence length T with ``length`` (N); the rest (weights, inv_freq, ...) is shared. Copying
    the T-sized nodes re-derives RoPE's positions as arange(N): the stream's tokens start at 0."""
    seq = str(ids.meta["val"].shape[1])
    memo = dict(env)

    def depends(n) -> bool:
        if n in memo:
            return memo[n] is not n
        val = n.meta.get("val")
        if isinstance(val, torch.SymInt) and str(val) == seq:
            memo[n] = length
            return True
        hit = any(depends(a) for a in n.all_input_nodes)
        memo[n] = None if hit else n  # None: to copy
        return hit

    def copy(n):
        if not isinstance(n, fx.Node) or not depends(n):
            return n
        if memo.get(n) is None:
            memo[n] = graph.node_copy(n, copy)
        return memo[n]

    return copy(root)


def _stream_step(graph, fq: fx.Node, spec, past: list[fx.Node], align):
    """condfx.quantized_stream over fq's input, right after fq; returns (full, hat, rows, items)."""
    x = op_arg(fq, "x")
    flat = x.meta["val"].dim() == 3  # (B, T, C) streams get a head axis of 1; (B, H, T, C) keep theirs
    with graph.inserting_before(fq.next):  # right after fq, in order: later layers read it
        new = graph.call_function(aten.unsqueeze.default, (x, 1)) if flat else x
        args = (*past, new, spec.bits, spec.group, spec.dim, spec.residual, spec.sink, align)
        step = graph.call_function(torch.ops.condfx.quantized_stream.default, args)
        items = [graph.call_function(operator.getitem, (step, i)) for i in range(6)]
        full, hat = items[:2]
        if flat:
            full, hat = (graph.call_function(aten.squeeze.dim, (y, 1)) for y in (full, hat))
        axis = 1 if flat else 2
        n = graph.call_function(aten.sym_size.int, (hat, axis))
        t = graph.call_function(aten.sym_size.int, (x, axis))
        start = graph.call_function(operator.sub, (n, t))
        rows = graph.call_function(aten.slice.Tensor, (hat, axis, start, n))
    return full, hat, rows, items


def _rewire_streams(node: fx.Node, plan: QuantizedKVPlan, past: list[fx.Node], ctx: DecodeContext):
    """Feeds the layer's attention from its packed streams; returns the streams' presents.

    The step's own tokens read fq(X) from ``hat`` too (its last T rows: the sink is counted from the
    first cached token, not the step's); those reads switch once every layer is rewired
    (``ctx.deferred``). XQuant-CL: ``ctx.state["cl"]`` maps each accumulation a_i of the
    teacher-forced graph to a_i over all N tokens, which the next layer's copies read.
    """
    graph, acc_all = ctx.graph, ctx.state.setdefault("cl", {})
    order = {n: i for i, n in enumerate(graph.nodes)}
    fqs = [_planned(ctx, plan, sp.fq, node) for sp in plan.streams]
    # streams are stepped in graph order (each right after its fq), all aligned to the first one
    stepped, align = {}, None
    for i in sorted(range(len(fqs)), key=lambda i: order[fqs[i]]):
        past_i = past[4 * i : 4 * i + 4]
        stepped[i] = _stream_step(graph, fqs[i], plan.streams[i].spec, past_i, align)
        align = stepped[i][3][0] if align is None else align
    outs = {fqs[i]: stepped[i][:3] for i in range(len(fqs))}
    presents = [p for i in range(len(fqs)) for p in stepped[i][3][2:]]
    prev = _planned(ctx, plan, plan.previous, node) if plan.previous else None
    earlier = {prev: acc_all[prev]} if prev is not None else {}  # CL: a_{i-1} over all tokens
    full_env = {fq: full for fq, (full, _, _) in outs.items()} | earlier
    hat_env = {fq: hat for fq, (_, hat, _) in outs.items()} | earlier
    hats = (op_arg(node, "k_hat"), op_arg(node, "v_hat"))
    with graph.inserting_before(node):
        n_all = graph.call_function(aten.sym_size.int, (align, 2))
        k, v, k_hat, v_hat = (_clone_for_all_tokens(graph, h, env, n_all, ctx.ids)
                              for env in (full_env, hat_env) for h in hats)
        if plan.method == "xquant-cl":  # the accumulation over all tokens, for the next CL layer
            fq = next(iter(outs))
            acc_all[fq] = hat_env[fq]
            if plan.accumulation is not None:
                acc = _planned(ctx, plan, plan.accumulation, node)
                acc_all[acc] = _clone_for_all_tokens(graph, acc, hat_env, n_all, ctx.ids)
    set_op_args(node, k=k, v=v, k_hat=k_hat, v_hat=v_hat)
    for fq, (_, _, rows) in outs.items():  # the new-token reads of fq switch once all are rewired
        ctx.deferred.append(lambda fq=fq, rows=rows: fq.replace_all_uses_with(rows))
    return presents
