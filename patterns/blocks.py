"""Residual adds, layer indices and decoder-block assembly.

A residual add is ``add(stream, branch)`` (either order) where ``branch`` is an attention or FFN
region's output, seen through casts and eval-mode dropout, then optionally through a norm that takes
it (post / sandwich norm: Gemma2/3, Olmo2, Exaone4) and a scalar multiplier (Granite's
``residual_multiplier``); the region records them as ``post_norm`` and ``residual_scale``. Layer indices come from the block number
in the module path (``.layers.<i>.``, ``.h.<i>.``, ``.blocks.<i>.``) when every region has one and
they are consistent; otherwise from the order of appearance (FFN i follows attention i).
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import fx

from condfx.patterns import _graph as g
from condfx.patterns.regions import (
    AttentionRegion,
    DecoderBlock,
    FFNRegion,
    MatchFailure,
    MoERegion,
    NormRegion,
    ResidualAdd,
)

aten = torch.ops.aten

LAYER_PATH_MISMATCH = "layer numbers in module paths are not consistent"


def _scalar_factor(node: fx.Node) -> float | None:
    """c for ``mul(x, c)`` / ``mul(c, x)`` / ``div(x, c)`` with a Python scalar c, else None."""
    if g.is_op(node, aten.mul) and len(node.args) == 2:
        c = next((g.scalar(a) for a in node.args if g.scalar(a) is not None), None)
        return None if c is None or all(g.scalar(a) is not None for a in node.args) else c
    if g.is_op(node, aten.div) and len(node.args) == 2 and g.scalar(node.args[1]):
        return 1.0 / g.scalar(node.args[1])
    return None


def _only_feeds(node: fx.Node, nodes: set[fx.Node], depth: int = 0) -> bool:
    """Whether every use of ``node`` (through casts) is one of ``nodes`` or only reads its dtype."""
    return bool(node.users) and depth < 4 and all(
        u in nodes or _dtype_only(u, node) or (g.is_identity(u) and _only_feeds(u, nodes, depth + 1))
        for u in node.users
    )


def _dtype_only(user: fx.Node, node: fx.Node) -> bool:
    """Whether ``user`` is ``type_as(other, node)``: it reads ``node``'s dtype, not its value."""
    return g.is_op(user, aten.type_as) and user.args[1] is node and user.args[0] is not node


def branch_after(out: fx.Node, norms_by_input: dict[fx.Node, NormRegion]):
    """(branch, post-norm, scale): ``out`` followed through casts, an optional norm taking it (post /
    sandwich norm) and an optional scalar multiplier (Granite's residual_multiplier), in that order."""
    branch, post, scale = g.forward_identity(out), None, None
    norm = norms_by_input.get(branch) or norms_by_input.get(out)
    if norm is not None and _only_feeds(branch, set(norm.nodes)):
        post, branch = norm, g.forward_identity(norm.out)
    user = g.single_user(branch)
    if user is not None and _scalar_factor(user) is not None:
        scale, branch = _scalar_factor(user), g.forward_identity(user)
    return branch, post, scale


def residual_after(
    out: fx.Node | None, norms_by_input: dict[fx.Node, NormRegion] | None = None
) -> ResidualAdd | None:
    """The residual add that takes ``out`` (through casts / eval dropout, a post-norm and a scalar
    multiplier), or None."""
    if out is None:
        return None
    branch, post, scale = branch_after(out, norms_by_input or {})
    user = g.single_user(branch)
    if not g.is_op(user, aten.add) or len(user.args) < 2:
        return None
    a, b = user.args[:2]
    if not (isinstance(a, fx.Node) and isinstance(b, fx.Node)):
        return None
    stream = b if a is branch else a
    if g.shape(stream) != g.shape(user):
        return None
    return ResidualAdd(user, stream, branch, post, scale)


def _path_layers(paths: list[str]) -> list[int] | None:
    """Block numbers from module paths, when all present and strictly increasing."""
    numbers = [g.layer_from_path(p) for p in paths]
    if not numbers or None in numbers:
        return None
    if any(b <= a for a, b in zip(numbers, numbers[1:], strict=False)):
        return None
    return numbers


def assign_layers(
    attention: list[AttentionRegion], ffn: list[FFNRegion], order: dict[fx.Node, int],
    failures: list[MatchFailure],
) -> tuple[list[AttentionRegion], list[FFNRegion]]:
    """Returns copies of the regions with ``layer`` set (see the module docstring)."""
    a_layers = _path_layers([r.module_path for r in attention])
    f_layers = _path_layers([r.module_path for r in ffn])
    if attention and a_layers is None and any(g.layer_from_path(r.module_path) is not None for r in attention):
        failures.append(MatchFailure(LAYER_PATH_MISMATCH, attention[0].core, "", "block"))
    if a_layers is None:
        a_layers = list(range(len(attention)))
    if f_layers is None:
        starts = [order[r.core] for r in attention]
        f_layers = []
        for i, r in enumerate(ffn):
            before = [j for j, s in enumerate(starts) if s < order[r.down.op_node]]
            f_layers.append(a_layers[before[-1]] if before else i)
    attention = [replace(r, layer=i) for r, i in zip(attention, a_layers, strict=True)]
    ffn = [replace(r, layer=i) for r, i in zip(ffn, f_layers, strict=True)]
    return attention, ffn


def assign_moe_layers(
    attention: list[AttentionRegion], moe: list[MoERegion], order: dict[fx.Node, int]
) -> list[MoERegion]:
    """Copies of the MoE regions with ``layer``: the block number in the module path, else the layer
    of the last attention region before the router."""
    out = []
    for i, r in enumerate(moe):
        layer = g.layer_from_path(r.module_path)
        if layer is None:
            before = [a.layer for a in attention if order[a.core] < order[r.router.op_node]]
            layer = before[-1] if before else i
        out.append(replace(r, layer=layer))
    return out


def assemble_blocks(
    attention: list[AttentionRegion], ffn: list[FFNRegion], moe: list[MoERegion] = ()
) -> list[DecoderBlock]:
    """One DecoderBlock per layer index, pairing the attention and FFN regions of that layer.

    A graph without any attention region has no decoder blocks (its FFNs stay in ``Regions.ffn``).
    """
    if not attention:
        return []
    by_attn = {r.layer: r for r in attention}
    by_ffn = {r.layer: r for r in ffn}
    by_moe = {r.layer: r for r in moe}
    layers = sorted(set(by_attn) | set(by_ffn) | set(by_moe))
    return [DecoderBlock(i, by_attn.get(i), by_ffn.get(i), by_moe.get(i)) for i in layers]


def attach_residuals(
    attention: list[AttentionRegion], ffn: list[FFNRegion], norms: list[NormRegion] = ()
) -> tuple[list[AttentionRegion], list[FFNRegion], list[ResidualAdd]]:
    """Fills ``residual``, ``post_norm`` and ``residual_scale`` of every region whose output feeds a
    residual add (directly, through a post-norm and/or a scalar multiplier); returns the adds."""
    by_input = {n.x_in: n for n in norms}
    residuals: list[ResidualAdd] = []
    found = []
    for r in [*attention, *ffn]:
        res = residual_after(r.out, by_input)
        if res is None:
            found.append(r)
            continue
        residuals.append(res)
        found.append(replace(r, residual=res.node, post_norm=res.post_norm, residual_scale=res.scale))
    return found[: len(attention)], found[len(attention):], residuals
