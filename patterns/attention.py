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

import operator
from dataclasses import dataclass, field

import torch
from torch import fx

import condfx.ops  # noqa: F401  (registers torch.ops.condfx.*)
from condfx.patterns import _graph as g
from condfx.patterns.attention_bias import ALIBI, BiasTerm, score_bias  # noqa: F401  (ALIBI: a reason of this finder)
from condfx.patterns.mask import NOT_PURE, MaskAnalyzer, MaskInfo, MaskKind
from condfx.patterns.norm import norm_producing
from condfx.patterns.regions import AttentionRegion, MatchFailure, RoPERef
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
FILL_VALUE = "masked fill value is not very negative"
SOFTCAP = "scores are softcapped (c * tanh(s / c))"
SINKS = "softmax includes attention sinks (learned logits concatenated to the scores)"
MUL_MASK = "scores are multiplied by a mask (s * m + (1 - m) * c)"

_SOFTMAX = (aten.softmax, aten._softmax, aten._safe_softmax)
_MATMUL = (aten.matmul, aten.bmm)
_FUSED = torch.ops.condfx.attention.default
_MUL = (aten.mul, aten.mul_)  # Falcon scales its scores in place
_DIV = (aten.div, aten.div_)


def _fail(reason: str, node: fx.Node, detail: str = "") -> MatchFailure:
    return MatchFailure(reason, node, detail, "attention")


@dataclass
class _Core:
    core: fx.Node
    q: fx.Node
    k: fx.Node
    v: fx.Node
    scale: float | None
    form: str
    nodes: list[fx.Node] = field(default_factory=list)
    masks: list[tuple[fx.Node, MaskKind]] = field(default_factory=list)
    is_causal: bool = False
    window: int | None = None
    softcap: float = 0.0
    sinks: fx.Node | None = None
    alibi_slopes: tuple[float, ...] | None = None
    terms: dict[fx.Node, BiasTerm] = field(default_factory=dict)  # additive score terms (eager)


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

def _parse_sdpa(node: fx.Node) -> _Core | MatchFailure:
    q, k, v = node.args[:3]
    if g.scalar(g.arg(node, 4, "dropout_p", 0.0)) != 0.0:
        return _fail(DROPOUT, node)
    scale = node.kwargs.get("scale", node.args[6] if len(node.args) > 6 else None)
    if scale is not None and g.scalar(scale) is None:
        return _fail(SCALE_NOT_CONSTANT, node)
    k0, k_nodes = strip_head_repeat(k)
    v0, v_nodes = strip_head_repeat(v)
    core = _Core(node, q, k0, v0, g.scalar(scale) if scale is not None else None, "sdpa",
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


def _parse_fused(node: fx.Node) -> _Core | MatchFailure:
    q, k, v = node.args[:3]
    scale = g.arg(node, 3, "scale", None)
    window = g.arg(node, 4, "window", 0)
    if g.scalar(scale) is None or not isinstance(window, int) or isinstance(window, bool):
        return _fail(SCALE_NOT_CONSTANT, node, "condfx.attention scale or window is not a constant")
    core = _Core(node, q, k, v, g.scalar(scale), "fused", [node], is_causal=True)
    core.window = window or None
    core.softcap = float(g.arg(node, 5, "softcap", 0.0) or 0.0)
    slopes = g.arg(node, 6, "alibi_slopes", None)
    core.alibi_slopes = tuple(float(m) for m in slopes) if slopes is not None else None
    core.sinks = g.arg(node, 7, "sinks", None)
    return core


# --- eager core ----------------------------------------------------------------------------------

def _reaches_matmul(node: object, steps: int = 8) -> bool:
    """True when ``node`` is (a scaled / masked / cast version of) a matmul output."""
    for _ in range(steps):
        if not isinstance(node, fx.Node):
            return False
        if g.is_op(node, *_MATMUL, aten.baddbmm):
            return True
        if g.is_op(node, aten.view, aten.reshape, aten._unsafe_view):
            node = node.args[0]
        elif g.is_identity(node) or g.is_op(node, *_MUL, *_DIV, aten.add, aten.masked_fill, aten.tanh):
            node = node.args[0] if g.is_op(node, *_MUL, *_DIV, aten.masked_fill, aten.tanh) or g.is_identity(
                node) else next((a for a in node.args[:2] if _reaches_matmul(a, 3)), None)
        elif g.is_op(node, aten.where):
            node = next((a for a in node.args[1:3] if _reaches_matmul(a, 3)), None)
        else:
            return False
    return False


def _very_negative(x) -> bool:
    if isinstance(x, fx.Node) and g.is_op(x, aten.full, aten.scalar_tensor):
        x = x.args[1] if g.is_op(x, aten.full) else x.args[0]
    s = g.scalar(x)
    return s is not None and s <= -1e4


def _scalar_factor(node: fx.Node) -> tuple[fx.Node, float] | None:
    """(tensor operand, factor) for ``x * c``, ``c * x`` or ``x / c`` with a constant c."""
    if g.is_op(node, *_MUL) and len(node.args) == 2:
        a, b = node.args
        if g.scalar(b) is not None and isinstance(a, fx.Node):
            return a, g.scalar(b)
        if g.scalar(a) is not None and isinstance(b, fx.Node):
            return b, g.scalar(a)
    if g.is_op(node, *_DIV) and len(node.args) == 2 and g.scalar(node.args[1]) is not None:
        return node.args[0], 1.0 / g.scalar(node.args[1])
    return None


def _softcap_of(node: object) -> tuple[fx.Node, float] | None:
    """(y, c) when ``node`` is ``c * tanh(y)`` or ``tanh(y)`` (c = 1): logit softcapping."""
    if not isinstance(node, fx.Node):
        return None
    found = _scalar_factor(node)
    th, c = found if found is not None else (node, 1.0)
    th = g.skip_identity(th)
    return (th.args[0], c) if g.is_op(th, aten.tanh) and c > 0 else None


def _sink_logits(node: object) -> fx.Node | None:
    """The (H,) sink-logit node behind ``node`` = its views / expand to (B, H, T, 1), or None."""
    for _ in range(8):
        if not isinstance(node, fx.Node):
            return None
        if g.ndim(node) == 1:
            return node
        if not (g.is_identity(node) or g.is_op(node, aten.view, aten.reshape, aten.expand, aten.unsqueeze)):
            return None
        node = node.args[0]
    return None


def _sink_cat(node: fx.Node) -> tuple[fx.Node, fx.Node] | None:
    """(scores, sink logits) for ``cat([scores, expand(sinks)], -1)`` (GPT-OSS), else None."""
    if not g.is_op(node, aten.cat) or len(node.args[0]) != 2:
        return None
    rank = g.ndim(node)
    if rank is None or g.arg(node, 1, "dim", 0) % rank != rank - 1:
        return None
    scores, other = node.args[0]
    sinks = _sink_logits(other)
    return (scores, sinks) if sinks is not None and _reaches_matmul(scores) else None


def _named_near_miss(node: fx.Node) -> MatchFailure | None:
    """A failure naming a known attention variant the finder does not handle, seen at ``node``."""
    if _softcap_of(node) is not None:
        return _fail(SOFTCAP, node, "a factor or a bias outside the softcap, or a second softcap")
    if g.is_op(node, aten.cat) and any(g.as_get_attr(a) is not None or (
            isinstance(a, fx.Node) and g.is_op(a, aten.expand) and g.as_get_attr(
                g.skip_views(a.args[0])) is not None) for a in node.args[0]):
        return _fail(SINKS, node, "not cat([scores, sinks], -1) before any scale or mask")
    if g.is_op(node, *_MUL) and len(node.args) == 2 and all(isinstance(a, fx.Node) for a in node.args):
        return _fail(MUL_MASK, node) if any(_reaches_matmul(a) for a in node.args) else None
    return None


def _score_option(node: fx.Node, core: _Core) -> fx.Node | MatchFailure | None:
    """The scores inside a softcap or a sink concatenation at ``node`` (recorded on ``core``), else None."""
    if core.softcap == 0 and (cap := _softcap_of(node)) is not None and g.close(core.scale, 1.0):
        if core.sinks is not None:
            return _fail(SINKS, node, "sinks concatenated after the softcap")
        core.softcap, core.scale = cap[1], cap[1]  # the factors inside multiply c: scale = c * (1 / c) * s
        return cap[0]
    if core.sinks is None and (found := _sink_cat(node)) is not None:
        if not g.close(core.scale, 1.0) or core.terms:
            return _fail(SINKS, node, "a scale or mask applied after the sink column")
        core.sinks = found[1]
        return found[0]
    return None


def _add_term(core: _Core, term: fx.Node, at: fx.Node, factor: float) -> MatchFailure | None:
    """Records an additive score term (a mask or a bias) at scores ``at``."""
    if core.softcap:
        return _fail(SOFTCAP, at, "a mask or bias added inside the softcap")
    core.terms[term] = BiasTerm(term, factor, g.ndim(at) or 4)
    core.masks.append((term, MaskKind.ADDITIVE))
    return None


def _peel_step(node: fx.Node, core: _Core) -> fx.Node | MatchFailure | None:
    """One step from the scores towards the q @ k^T matmul (None: not a score op)."""
    if g.is_op(node, aten.sub) and g.is_op(node.args[1], operator.getitem) and g.is_op(
            node.args[1].args[0], aten.max, aten.amax):
        return node.args[0]  # s - max(s): the stable-softmax shift (GPT-OSS)
    if g.is_op(node, aten.view, aten.reshape, aten._unsafe_view) or g.is_identity(node) or (
            g.is_op(node, aten.maximum, aten.max, aten.clamp_min) and len(node.args) == 2
            and _very_negative(node.args[1])):
        return node.args[0]  # a view of the scores, or a clamp at the mask value (XGLM)
    if (found := _scalar_factor(node)) is not None:
        core.scale = core.scale * found[1]
        return found[0]
    if g.is_op(node, aten.add) and all(isinstance(a, fx.Node) for a in node.args[:2]):
        a, b = node.args[:2]
        score, term = (a, b) if _reaches_matmul(a) else (b, a)
        return _add_term(core, term, node, core.scale) or score
    if g.is_op(node, aten.masked_fill):
        if not _very_negative(node.args[2]):
            return _fail(FILL_VALUE, node)
        core.masks.append((node.args[1], MaskKind.DROP))
        return node.args[0]
    if g.is_op(node, aten.where):
        cond, a, b = node.args[:3]
        keep = _reaches_matmul(a)
        score, fill = (a, b) if keep else (b, a)
        if not _very_negative(fill):
            return _fail(FILL_VALUE, node)
        core.masks.append((cond, MaskKind.KEEP if keep else MaskKind.DROP))
        return score
    return None


def _peel_scores(node: fx.Node, core: _Core) -> fx.Node | MatchFailure | None:
    """Walks from the softmax input back to the q @ k^T matmul (or Bloom's ``baddbmm(bias, q, k^T)``),
    collecting scale, masks, additive terms and score options."""
    for _ in range(32):
        if g.is_op(node, *_MATMUL):
            return node
        core.nodes.append(node)
        if g.is_op(node, aten.baddbmm):  # beta * bias + alpha * (q @ k^T)
            failure = _add_term(core, node.args[0], node, core.scale * g.arg(node, 3, "beta", 1.0))
            core.scale *= g.arg(node, 4, "alpha", 1.0)
            return failure or node
        nxt = _score_option(node, core)
        if nxt is None and (named := _named_near_miss(node)) is not None:
            return named
        if nxt is None:
            nxt = _peel_step(node, core)
        if not isinstance(nxt, fx.Node):
            return nxt
        node = nxt
    return None


def _to_4d(node: fx.Node) -> fx.Node:
    """A 4-D (B, H, T, D) tensor behind a (B*H, T, D) view used by bmm."""
    n = node
    while g.is_identity(n) or (g.is_op(n, aten.view, aten.reshape, aten._unsafe_view) and g.ndim(n) != 4):
        n = n.args[0]
    return n if g.ndim(n) == 4 else node


def _peel_operand(node: fx.Node, core: _Core) -> fx.Node:
    """Strip casts and constant scale factors from a q or k operand (the scale goes into core)."""
    while True:
        if g.is_identity(node):
            core.nodes.append(node)
            node = node.args[0]
        elif (found := _scalar_factor(node)) is not None:
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


def _parse_eager(softmax: fx.Node) -> _Core | MatchFailure | None:
    core = _Core(softmax, softmax, softmax, softmax, 1.0, "eager", [softmax])
    qk = _peel_scores(softmax.args[0], core)
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
    if not g.is_op(pv, *_MATMUL) or pv.args[0] is not probs:
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

def _causality(core: _Core, masks: MaskAnalyzer, heads: int) -> MaskInfo | MatchFailure:
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


def _heads(core: _Core) -> tuple[int, int, int] | MatchFailure:
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
    if ref is None and (found := _scalar_factor(g.skip_views(n))) is not None:
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
        w = node.args[1] if g.is_op(node, *_MATMUL) else None
        w = w.args[0] if g.is_op(w, aten.numpy_T, aten.t, aten.transpose, aten.permute) else w
        if g.as_get_attr(w) is not None:
            out = g.static_int((g.shape(node) or (0,))[-1])  # x @ W.T spelled with numpy_T (Falcon)
            return node if out is not None and out > width else None
        first = node.args[0]
        if isinstance(first, (list, tuple)):  # cat([k_rot, k_pass]) of partial RoPE
            first = first[0] if first else None
        node = first
    return None


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


def _outer(core: _Core, norms) -> dict:
    q_pre, q_rope, rotary_dim = unrotated(core.q)
    k_pre, k_rope, _ = unrotated(core.k)
    q_proj, q_norm = _projection(q_pre, norms)
    k_proj, k_norm = _projection(k_pre, norms)
    v_proj, _ = _projection(core.v, {})
    rope = None
    if q_rope is not None:
        style = q_rope[3]
        rope = RoPERef(style, q_rope[1], q_rope[2], q_pre, k_pre if k_rope else None, rotary_dim)
    x_in = q_proj.x_in if q_proj is not None else None
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
    if not isinstance(core, _Core):
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

