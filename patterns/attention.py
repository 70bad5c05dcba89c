"""Attention regions: anchored on the core, walked outwards to projections, QK-norm and RoPE.

Core forms:
    aten.scaled_dot_product_attention(q, k, v, attn_mask?, is_causal?, scale?, enable_gqa?)
    condfx.attention(q, k, v, scale, window)       ("fused", from fuse-attention: causal, end-aligned,
        k/v already (B, Hkv, S, D); window 0 means none)
    softmax(scale * (q @ k^T) [+ mask | masked_fill | where]) @ v       ("eager"; the scale may be
        applied to the scores, to q or to k, by mul or div; casts and p=0 / eval dropout allowed)
K/V head repetition is walked back (HF repeat_kv: unsqueeze + expand + reshape; repeat_interleave),
so ``k`` and ``v`` are (B, Hkv, S, D). Outwards: RoPE (``rope.py``: half-split or interleaved, full or
partial), QK-norm on (B, T, H, D) or (B, H, T, D), q/k/v projections (fused ones through split or
slice; a constant factor after the projection, as OPT scales q), x_in, o_proj.
Score options (the fused op's ``softcap``, ``alibi_slopes``, ``sinks``): logit softcapping
``c * tanh(s / c)`` before the mask (Gemma2); additive position biases, evaluated with the masks
(``attention_bias.py``) into per-head ALiBi slopes (Bloom's ``baddbmm``, MPT's bias table, Falcon's bias
in the mask); learned sink logits concatenated to the scores and sliced off the probabilities (GPT-OSS).
Eager scores whose form is known but not expressible fail with a reason that names it: a softcap with
a factor or bias outside/inside it, sinks outside the shape above, a bias not linear in the key
position, a multiplied mask.
"""

from __future__ import annotations

import torch
from torch import fx

import condfx.ops  # noqa: F401  (registers torch.ops.condfx.*)
from condfx.patterns import _graph as g
from condfx.patterns.attention_bias import ALIBI, BiasTerm, score_bias  # noqa: F401  (ALIBI: a reason of this finder)
from condfx.patterns.attention_scores import (  # noqa: F401  (FILL_VALUE, MUL_MASK: reasons of this finder)
    FILL_VALUE,
    MATMUL,
    MUL_MASK,
    SINKS,
    SOFTCAP,
    Core,
    peel_scores,
    scalar_factor,
)
from condfx.patterns.mask import NOT_PURE, MaskAnalyzer, MaskInfo, MaskKind
from condfx.patterns.norm import norm_producing
from condfx.patterns.regions import AttentionRegion, LinearRef, MatchFailure, RoPERef
from condfx.patterns.rope import unrotated

aten = torch.ops.aten

NOT_4D = "q/k/v are not 4-D"
HEADS_NOT_STATIC = "head counts are not static"
HEADS_NOT_DIVISIBLE = "query heads are not a multiple of key/value heads"
KV_HEADS_DIFFER = "k and v head counts differ"
DROPOUT = "dropout_p is not zero"
SCALE_NOT_CONSTANT = "scale is not a constant"
NO_MASK = "mask is not causal"
SOFTMAX_DIM = "softmax is not over the key dim"
NOT_QK_T = "scores are not q @ k^T"
NO_PV = "softmax output does not feed a matmul with v"

_SOFTMAX = (aten.softmax, aten._softmax, aten._safe_softmax)
_FUSED = torch.ops.condfx.attention.default


def _fail(reason: str, node: fx.Node, detail: str = "") -> MatchFailure:
    return MatchFailure(reason, node, detail, "attention")


# --- K/V head repetition -------------------------------------------------------------------------

def strip_head_repeat(node: fx.Node) -> tuple[fx.Node, list[fx.Node]]:
    """(k before head repetition, nodes of the repetition) for HF repeat_kv and repeat_interleave."""
    nodes = []
    n = node
    while g.is_identity(n):
        nodes.append(n)
        n = n.args[0]
    if g.is_op(n, aten.repeat_interleave) and g.arg(n, 2, "dim", None) == 1:
        return n.args[0], [*nodes, n]
    if not g.is_op(n, aten.reshape, aten.view, aten._unsafe_view) or g.ndim(n) != 4:
        return node, []
    e = n.args[0]
    nodes.append(n)
    while g.is_identity(e):
        nodes.append(e)
        e = e.args[0]
    if not g.is_op(e, aten.expand) or g.ndim(e) != 5:
        return node, []
    u = e.args[0]
    nodes.append(e)
    while g.is_identity(u):
        nodes.append(u)
        u = u.args[0]
    if not g.is_op(u, aten.unsqueeze) or u.args[1] % 5 != 2:
        return node, []
    nodes.append(u)
    base = u.args[0]
    while g.is_identity(base):
        nodes.append(base)
        base = base.args[0]
    return base, nodes


# --- SDPA core -----------------------------------------------------------------------------------

def _parse_sdpa(node: fx.Node) -> Core | MatchFailure:
    q, k, v = node.args[:3]
    if g.scalar(g.arg(node, 4, "dropout_p", 0.0)) != 0.0:
        return _fail(DROPOUT, node)
    scale = node.kwargs.get("scale", node.args[6] if len(node.args) > 6 else None)
    if scale is not None and g.scalar(scale) is None:
        return _fail(SCALE_NOT_CONSTANT, node)
    k0, k_nodes = strip_head_repeat(k)
    v0, v_nodes = strip_head_repeat(v)
    core = Core(node, q, k0, v0, g.scalar(scale) if scale is not None else None, "sdpa",
                 [node, *k_nodes, *v_nodes])
    core.is_causal = bool(g.arg(node, 5, "is_causal", False))
    mask = g.arg(node, 3, "attn_mask", None)
    if isinstance(mask, fx.Node):
        v_mask = g.val(mask)
        kind = MaskKind.KEEP if getattr(v_mask, "dtype", None) == torch.bool else MaskKind.ADDITIVE
        core.masks.append((mask, kind))
        if kind is MaskKind.ADDITIVE:  # a float mask may carry ALiBi (Falcon)
            core.terms[mask] = BiasTerm(mask, 1.0, 4)
    return core


# --- fused core ----------------------------------------------------------------------------------

def is_fused_core(node: object) -> bool:
    """True for a ``condfx.attention`` call (the core left by the ``fuse-attention`` pass)."""
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target is _FUSED


def _parse_fused(node: fx.Node) -> Core | MatchFailure:
    q, k, v = node.args[:3]
    scale = g.arg(node, 3, "scale", None)
    window = g.arg(node, 4, "window", 0)
    if g.scalar(scale) is None or not isinstance(window, int) or isinstance(window, bool):
        return _fail(SCALE_NOT_CONSTANT, node, "condfx.attention scale or window is not a constant")
    core = Core(node, q, k, v, g.scalar(scale), "fused", [node], is_causal=True)
    core.window = window or None
    core.softcap = float(g.arg(node, 5, "softcap", 0.0) or 0.0)
    slopes = g.arg(node, 6, "alibi_slopes", None)
    core.alibi_slopes = tuple(float(m) for m in slopes) if slopes is not None else None
    core.sinks = g.arg(node, 7, "sinks", None)
    return core


# --- eager core ----------------------------------------------------------------------------------

def _to_4d(node: fx.Node) -> fx.Node:
    """A 4-D (B, H, T, D) tensor behind a (B*H, T, D) view used by bmm."""
    n = node
    while g.is_identity(n) or (g.is_op(n, aten.view, aten.reshape, aten._unsafe_view) and g.ndim(n) != 4):
        n = n.args[0]
    return n if g.ndim(n) == 4 else node


def _peel_operand(node: fx.Node, core: Core) -> fx.Node:
    """Strip casts and constant scale factors from a q or k operand (the scale goes into core)."""
    while True:
        if g.is_identity(node):
            core.nodes.append(node)
            node = node.args[0]
        elif (found := scalar_factor(node)) is not None:
            core.nodes.append(node)
            node, core.scale = found[0], core.scale * found[1]
        else:
            return node


def _is_last_two_transpose(node: fx.Node) -> bool:
    rank = g.ndim(node)
    if g.is_op(node, aten.transpose) and rank:
        return {node.args[1] % rank, node.args[2] % rank} == {rank - 2, rank - 1}
    if g.is_op(node, aten.permute) and rank:
        perm = [p % rank for p in node.args[1]]
        return perm == [*range(rank - 2), rank - 1, rank - 2]
    return g.is_op(node, aten.t)


def _drop_sink_column(probs: fx.Node) -> fx.Node | None:
    """The ``probs[..., :-1]`` slice after a softmax that had a sink column, or None."""
    user = g.single_user(probs)
    rank = g.ndim(probs)
    if not g.is_op(user, aten.slice) or rank is None or g.arg(user, 1, "dim", 0) % rank != rank - 1:
        return None
    start, end = g.arg(user, 2, "start", None), g.arg(user, 3, "end", None)
    last = g.static_int(g.shape(probs)[-1])
    return user if start in (None, 0) and (end == -1 or (last is not None and end == last - 1)) else None


def _parse_eager(softmax: fx.Node) -> Core | MatchFailure | None:
    core = Core(softmax, softmax, softmax, softmax, 1.0, "eager", [softmax])
    qk = peel_scores(softmax.args[0], core)
    if not isinstance(qk, fx.Node):
        return qk
    rank, dim = g.ndim(softmax), g.arg(softmax, 1, "dim", -1)
    if rank is None or dim % rank != rank - 1:
        return _fail(SOFTMAX_DIM, softmax)
    first = 1 if g.is_op(qk, aten.baddbmm) else 0  # baddbmm(bias, q, k^T)
    q = _to_4d(_peel_operand(qk.args[first], core))
    kt = _peel_operand(qk.args[first + 1], core)
    if not _is_last_two_transpose(kt):
        return _fail(NOT_QK_T, qk)
    k = _to_4d(_peel_operand(kt.args[0], core))
    core.nodes += [qk, kt]
    probs, between = g.forward_identity(softmax), []
    if core.sinks is not None:
        dropped = _drop_sink_column(probs)
        if dropped is None:
            return _fail(SINKS, softmax, "the sink column is not sliced off the probabilities")
        between.append(probs)
        probs = g.forward_identity(dropped)
    while g.is_op(g.single_user(probs), aten.view, aten.reshape, aten._unsafe_view) or g.is_identity(
            g.single_user(probs)):  # XGLM: (B*H, T, S) views around the softmax
        between.append(probs)
        probs = g.forward_identity(g.single_user(probs))
    pv = g.single_user(probs)
    if not g.is_op(pv, *MATMUL) or pv.args[0] is not probs:
        return _fail(NO_PV, softmax)
    core.nodes += between
    out = pv
    if g.ndim(pv) != 4 and g.is_op(g.single_user(pv), aten.view, aten.reshape, aten._unsafe_view):
        out = g.single_user(pv)
    core.nodes += [n for n in probs.all_input_nodes if n is not softmax] + [probs, pv, out]
    k0, k_nodes = strip_head_repeat(k)
    v0, v_nodes = strip_head_repeat(_to_4d(pv.args[1]))
    core.core, core.q, core.k, core.v = out, q, k0, v0
    core.nodes += k_nodes + v_nodes
    return core


# --- causality and heads -------------------------------------------------------------------------

def _causality(core: Core, masks: MaskAnalyzer, heads: int) -> MaskInfo | MatchFailure:
    """What the core's masks allow; sets ``core.alibi_slopes`` when its additive terms carry ALiBi."""
    if not core.masks:
        return MaskInfo(True, core.window) if core.is_causal else _fail(NO_MASK, core.core, "no mask and not is_causal")
    window, pure, biases = None, False, []
    for mask, kind in core.masks:
        info = masks.analyze(mask, kind)
        if isinstance(info, MatchFailure) and info.reason == NOT_PURE and mask in core.terms:
            biases.append(core.terms[mask])
            continue
        if isinstance(info, MatchFailure):
            return MatchFailure(info.reason, core.core, f"mask {mask.name}: {info.detail}", "attention")
        pure = True
        if info.window is not None:
            window = info.window if window is None else min(window, info.window)
    if not biases:
        return MaskInfo(True, window)
    found = score_bias(biases, masks, heads, MaskInfo(True, window) if pure else None)
    if isinstance(found, MatchFailure):
        return MatchFailure(found.reason, core.core, f"{found.node.name}: {found.detail}", "attention")
    core.alibi_slopes = found[1]
    return found[0]


def _heads(core: Core) -> tuple[int, int, int] | MatchFailure:
    qs, ks, vs = g.shape(core.q), g.shape(core.k), g.shape(core.v)
    if any(s is None or len(s) != 4 for s in (qs, ks, vs)):
        return _fail(NOT_4D, core.core)
    h, hkv, hv, d = (g.static_int(x) for x in (qs[1], ks[1], vs[1], qs[3]))
    if None in (h, hkv, hv, d):
        return _fail(HEADS_NOT_STATIC, core.core)
    if hkv != hv:
        return _fail(KV_HEADS_DIFFER, core.core)
    if h % hkv:
        return _fail(HEADS_NOT_DIVISIBLE, core.core)
    return h, hkv, d


# --- outwards ------------------------------------------------------------------------------------

def _projection(node: fx.Node, norms):
    """(LinearRef or None, QK-norm or None) behind a (B, H, T, D) q or k."""
    qk_norm = norm_producing(norms, node)
    n = qk_norm.x_in if qk_norm else g.skip_identity(node)
    if g.is_op(n, aten.transpose, aten.permute):
        n = g.skip_identity(n.args[0])
    if qk_norm is None and (qk_norm := norm_producing(norms, n)) is not None:
        n = qk_norm.x_in
    ref = g.trace_linear(n)
    if ref is None and (found := scalar_factor(g.skip_views(n))) is not None:
        ref = g.trace_linear(found[0])  # q_proj(x) * scaling (OPT, BioGPT): the factor stays on the path
    return ref, qk_norm


def fused_projection_behind(node: fx.Node, width: int, steps: int = 16):
    """The projection (a LinearRef, or the matmul node) wider than ``width`` that ``node`` (a (B, Hkv, S, D) k or v) is some heads of, found by
    walking back through views, head selections (select, index, slice, split / chunk) and RoPE, or None.

    Names the fused qkv layouts split per head after a view (Falcon: index on (B, T, heads, D); Bloom:
    select on (B, T, H, 3, D); GPT-NeoX: chunk of (B, H, T, 3D)), which the q/k/v tracing does not read.
    """
    for _ in range(steps):
        ref = g.linear_at(node) if isinstance(node, fx.Node) else None
        if ref is not None:
            return ref if (ref.out_features or 0) > width else None
        if not isinstance(node, fx.Node) or node.op != "call_function" or not node.args:
            return None
        w = node.args[1] if g.is_op(node, *MATMUL) else None
        w = w.args[0] if g.is_op(w, aten.numpy_T, aten.t, aten.transpose, aten.permute) else w
        if g.as_get_attr(w) is not None:
            out = g.static_int((g.shape(node) or (0,))[-1])  # x @ W.T spelled with numpy_T (Falcon)
            return node if out is not None and out > width else None
        first = node.args[0]
        if isinstance(first, (list, tuple)):  # cat([k_rot, k_pass]) of partial RoPE
            first = first[0] if first else None
        node = first
    return None


def _fused_input(q: fx.Node, k: fx.Node) -> fx.Node | None:
    """The input of the one fused qkv projection that q and k are heads of (GPT-NeoX, Falcon), or None.

    The q/k/v projections stay None (they are not slices of it); ``x_in`` and the input norm are set.
    """
    width = 0  # any projection wider than q's own heads
    shape = g.shape(q)
    if shape is not None and len(shape) == 4:
        width = (g.static_int(shape[1]) or 0) * (g.static_int(shape[3]) or 0)
    q_ref, k_ref = fused_projection_behind(q, width), fused_projection_behind(k, width)
    if not isinstance(q_ref, LinearRef) or not isinstance(k_ref, LinearRef) or q_ref.op_node is not k_ref.op_node:
        return None
    return q_ref.x_in


def find_o_proj(core: fx.Node):
    """The output projection reading ``core`` through transposes and reshapes, or None."""
    node = core
    for _ in range(10):
        user = g.single_user(node)
        if user is None:
            return None
        if g.is_identity(user) or g.is_view(user):
            node = user
            continue
        ref = g.linear_at(user)
        return ref if ref is not None and g.skip_views(ref.x_in) is g.skip_views(core) else None
    return None


def _outer(core: Core, norms) -> dict:
    q_pre, q_rope, rotary_dim = unrotated(core.q)
    k_pre, k_rope, _ = unrotated(core.k)
    q_proj, q_norm = _projection(q_pre, norms)
    k_proj, k_norm = _projection(k_pre, norms)
    v_proj, _ = _projection(core.v, {})
    rope = None
    if q_rope is not None:
        style = q_rope[3]
        rope = RoPERef(style, q_rope[1], q_rope[2], q_pre, k_pre if k_rope else None, rotary_dim)
    x_in = q_proj.x_in if q_proj is not None else _fused_input(q_pre, k_pre)
    o_proj = find_o_proj(core.core)
    return dict(q_proj=q_proj, k_proj=k_proj, v_proj=v_proj, q_norm=q_norm, k_norm=k_norm, rope=rope,
                x_in=x_in, input_norm=norm_producing(norms, x_in), o_proj=o_proj,
                out=o_proj.node if o_proj is not None else None)


def match_attention(anchor: fx.Node, masks: MaskAnalyzer, norms) -> AttentionRegion | MatchFailure | None:
    """Matches an attention region anchored on an SDPA, softmax or ``condfx.attention`` node.

    Returns:
        The region (``layer`` = -1 until blocks are assembled), a MatchFailure for a rejected
        attention-looking candidate, or None when ``anchor`` does not look like attention at all.
    """
    if is_fused_core(anchor):
        core = _parse_fused(anchor)
    elif g.is_op(anchor, aten.scaled_dot_product_attention):
        core = _parse_sdpa(anchor)
    else:
        core = _parse_eager(anchor)
    if not isinstance(core, Core):
        return core
    heads = _heads(core)
    if isinstance(heads, MatchFailure):
        return heads
    h, hkv, d = heads
    info = _causality(core, masks, h)
    if isinstance(info, MatchFailure):
        return info
    scale = core.scale if core.scale is not None else d**-0.5
    seen, nodes = set(), []
    for n in core.nodes:
        if n not in seen and n not in (core.q, core.k, core.v):
            seen.add(n)
            nodes.append(n)
    return AttentionRegion(
        layer=-1, module_path=g.module_path(core.core), core=core.core, core_nodes=tuple(nodes),
        q=core.q, k=core.k, v=core.v, num_heads=h, num_kv_heads=hkv, head_dim=d, scale=float(scale),
        causal=info.causal, window=info.window, core_form=core.form,
        mask=core.masks[0][0] if core.masks else None, softcap=core.softcap, alibi_slopes=core.alibi_slopes,
        sinks=core.sinks, **_outer(core, norms),
    )


def is_attention_anchor(node: fx.Node) -> bool:
    """True for SDPA calls, softmax nodes and fused ``condfx.attention`` calls (the core anchors)."""
    return g.is_op(node, aten.scaled_dot_product_attention, *_SOFTMAX) or is_fused_core(node)


def find_attention(gm: fx.GraphModule, norms, masks: MaskAnalyzer | None = None):
    """(regions, failures) for every attention anchor of ``gm``, in graph order."""
    masks = masks if masks is not None else MaskAnalyzer(gm)
    regions, failures = [], []
    for node in gm.graph.nodes:
        if not is_attention_anchor(node):
            continue
        found = match_attention(node, masks, norms)
        if isinstance(found, AttentionRegion):
            regions.append(found)
        elif isinstance(found, MatchFailure):
            failures.append(found)
    return regions, failures

