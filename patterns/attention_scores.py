"""The eager attention scores, walked from the softmax input back to ``q @ k^T``: scale factors, masks,
additive terms (``attention_bias.py`` evaluates them), softcap and sink logits, recorded on a ``Core``.

Forms: ``softmax(c * (q @ k^T) [+ mask | masked_fill | where])``, the scale by mul or div (in place
too, Falcon); ``c * tanh(s / c)`` before the mask (the op's ``softcap``); ``cat([s, sinks], -1)`` minus its
row max (GPT-OSS, the op's ``sinks``); ``baddbmm(bias, q, k^T, beta, alpha)`` (Bloom); (B*H, T, S) views
and a clamp at the mask value (XGLM). Forms the fused op cannot express fail with a reason naming them.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch
from torch import fx

from condfx.patterns import _graph as g
from condfx.patterns.attention_bias import BiasTerm
from condfx.patterns.mask import MaskKind
from condfx.patterns.regions import MatchFailure

aten = torch.ops.aten

FILL_VALUE = "masked fill value is not very negative"
SOFTCAP = "scores are softcapped (c * tanh(s / c))"
SINKS = "softmax includes attention sinks (learned logits concatenated to the scores)"
MUL_MASK = "scores are multiplied by a mask (s * m + (1 - m) * c)"

MATMUL = (aten.matmul, aten.bmm)
_MUL = (aten.mul, aten.mul_)  # Falcon scales its scores in place
_DIV = (aten.div, aten.div_)


def _fail(reason: str, node: fx.Node, detail: str = "") -> MatchFailure:
    return MatchFailure(reason, node, detail, "attention")


@dataclass
class Core:
    """What a core parser found: q, k, v, the scale, masks and score options (mutable while walking)."""

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


def _reaches_matmul(node: object, steps: int = 8) -> bool:
    """True when ``node`` is (a scaled / masked / cast version of) a matmul output."""
    for _ in range(steps):
        if not isinstance(node, fx.Node):
            return False
        if g.is_op(node, *MATMUL, aten.baddbmm):
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


def scalar_factor(node: fx.Node) -> tuple[fx.Node, float] | None:
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
    found = scalar_factor(node)
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


def _score_option(node: fx.Node, core: Core) -> fx.Node | MatchFailure | None:
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


def _add_term(core: Core, term: fx.Node, at: fx.Node, factor: float) -> MatchFailure | None:
    """Records an additive score term (a mask or a bias) at scores ``at``."""
    if core.softcap:
        return _fail(SOFTCAP, at, "a mask or bias added inside the softcap")
    core.terms[term] = BiasTerm(term, factor, g.ndim(at) or 4)
    core.masks.append((term, MaskKind.ADDITIVE))
    return None


def _peel_step(node: fx.Node, core: Core) -> fx.Node | MatchFailure | None:
    """One step from the scores towards the q @ k^T matmul (None: not a score op)."""
    if g.is_op(node, aten.sub) and g.is_op(node.args[1], operator.getitem) and g.is_op(
            node.args[1].args[0], aten.max, aten.amax):
        return node.args[0]  # s - max(s): the stable-softmax shift (GPT-OSS)
    if g.is_op(node, aten.view, aten.reshape, aten._unsafe_view) or g.is_identity(node) or (
            g.is_op(node, aten.maximum, aten.max, aten.clamp_min) and len(node.args) == 2
            and _very_negative(node.args[1])):
        return node.args[0]  # a view of the scores, or a clamp at the mask value (XGLM)
    if (found := scalar_factor(node)) is not None:
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


def peel_scores(node: fx.Node, core: Core) -> fx.Node | MatchFailure | None:
    """Walks from the softmax input back to the q @ k^T matmul (or Bloom's ``baddbmm(bias, q, k^T)``),
    collecting scale, masks, additive terms and score options."""
    for _ in range(32):
        if g.is_op(node, *MATMUL):
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
