"""RoPE around the attention core: ``x * cos + rotate(x) * sin``, full or partial.

Recognised forms: half-split rotation ``cat(-x2, x1)`` and interleaved ``stack(-x[1::2], x[::2])``,
any operand order; partial RoPE ``cat([rope(x[..., :r]), x[..., r:]], -1)`` (Phi-3, Persimmon,
Nemotron, StableLM), reported with the rotary width r; q/k as (B, H, T, D) or (B, T, H, D).
"""

from __future__ import annotations

import torch
from torch import fx

from condfx.patterns import _graph as g
from condfx.patterns.regions import RoPEStyle

aten = torch.ops.aten



def _last_dim(node: fx.Node, dim) -> bool:
    rank = g.ndim(node)
    return rank is not None and isinstance(dim, int) and dim % rank == rank - 1


def _slice_of(node: object, base: fx.Node) -> tuple[int, object, int] | None:
    """(start, end, step) when ``node`` slices the last dim of ``base`` (through casts)."""
    if not g.is_op(node, aten.slice) or g.skip_identity(node.args[0]) is not base:
        return None
    if not _last_dim(node.args[0], g.arg(node, 1, "dim", 0)):
        return None
    return g.arg(node, 2, "start", 0) or 0, g.arg(node, 3, "end", None), g.arg(node, 4, "step", 1)


def _rotation_style(rot: fx.Node, x: fx.Node) -> RoPEStyle | None:
    """HALF for cat(-x2, x1); INTERLEAVED for flatten(stack(-x[..., 1::2], x[..., ::2]))."""
    rot, x = g.skip_identity(rot), g.skip_identity(x)
    if g.is_op(rot, aten.cat) and _last_dim(rot, g.arg(rot, 1, "dim", 0)) and len(rot.args[0]) == 2:
        first, second = rot.args[0]
        if g.is_op(first, aten.neg):
            hi, lo = _slice_of(first.args[0], x), _slice_of(second, x)
            if hi and lo and lo[0] == 0 and hi[0] == lo[1] and hi[2] == lo[2] == 1:
                return RoPEStyle.HALF
    flat = rot
    while g.is_op(flat, aten.view, aten.reshape, aten.flatten, aten._unsafe_view):
        flat = flat.args[0]
    if g.is_op(flat, aten.stack) and len(flat.args[0]) == 2:
        first, second = flat.args[0]
        if g.is_op(first, aten.neg):
            odd, even = _slice_of(first.args[0], x), _slice_of(second, x)
            if odd and even and odd[0] == 1 and even[0] == 0 and odd[2] == even[2] == 2:
                return RoPEStyle.INTERLEAVED
    return None


def _mul_operands(node: fx.Node) -> list[tuple[fx.Node, fx.Node]]:
    if not g.is_op(node, aten.mul) or not all(isinstance(a, fx.Node) for a in node.args[:2]):
        return []
    a, b = node.args[:2]
    return [(a, b), (b, a)]


def match_rope(node: fx.Node) -> tuple[fx.Node, fx.Node, fx.Node, RoPEStyle] | None:
    """(x before rotation, cos, sin, style) for ``x * cos + rotate(x) * sin`` (any operand order)."""
    node = g.skip_identity(node)
    if not g.is_op(node, aten.add) or not all(isinstance(a, fx.Node) for a in node.args[:2]):
        return None
    a, b = (g.skip_identity(n) for n in node.args[:2])
    for m1, m2 in ((a, b), (b, a)):
        for x, cos in _mul_operands(m1):
            for rot, sin in _mul_operands(m2):
                style = _rotation_style(rot, x)
                if style is not None:
                    return g.skip_identity(x), cos, sin, style
    return None



def _last_dim_slice(node: fx.Node) -> tuple[fx.Node, int, object] | None:
    """(base, start, end) for ``base[..., start:end]`` (through casts and aliases), else None."""
    node = g.skip_identity(node)
    if g.is_op(node, aten.alias):
        return g.skip_identity(node.args[0]), 0, None
    rank = g.ndim(node)
    if not g.is_op(node, aten.slice) or rank is None or node.args[1] % rank != rank - 1:
        return None
    return g.skip_identity(node.args[0]), g.arg(node, 2, "start", 0) or 0, g.arg(node, 3, "end", None)


def _partial_rope(node: fx.Node):
    """(x, rope match with x as the pre-rotation input, rotary dim) for ``cat([rope(x[..., :r]),
    x[..., r:]], -1)`` (partial RoPE: Phi-3, Persimmon, Nemotron, StableLM), else None."""
    node = g.skip_identity(node)
    if not g.is_op(node, aten.cat) or len(node.args[0]) != 2 or g.arg(node, 1, "dim", 0) % (g.ndim(node) or 1) != (
            (g.ndim(node) or 1) - 1):
        return None
    rot, rest = node.args[0]
    found, tail = match_rope(rot), _last_dim_slice(rest)
    if found is None or tail is None:
        return None
    head = _last_dim_slice(found[0])
    if found[0] is not tail[0] and (head is None or head[0] is not tail[0] or head[1] != 0):
        return None
    width = g.static_int(g.shape(rot)[-1])
    if width is None or tail[1] != width:
        return None
    return tail[0], (tail[0], *found[1:]), width


def unrotated(node: fx.Node):
    """(node before RoPE, rope match or None, rotary dim or None), trying (B, H, T, D) and then
    (B, T, H, D), full and partial RoPE."""
    found = match_rope(node)
    if found is not None:
        return found[0], found, None
    partial = _partial_rope(node)
    if partial is not None:
        return partial
    inner = g.skip_identity(node)
    if g.is_op(inner, aten.transpose, aten.permute):
        found = match_rope(inner.args[0])
        if found is not None:
            return found[0], found, None
        partial = _partial_rope(inner.args[0])  # GPT-J, CodeGen: partial RoPE on (B, T, H, D), then permute
        if partial is not None:
            return partial
    return node, None, None
