"""Residual adds, layer indices and decoder-block assembly.

A residual add is ``add(stream, branch)`` (either order) where ``branch`` is an attention or FFN
region's output, seen through casts and eval-mode dropout. Layer indices come from the block number
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
    ResidualAdd,
)

aten = torch.ops.aten

LAYER_PATH_MISMATCH = "layer numbers in module paths are not consistent"


def residual_after(out: fx.Node | None) -> ResidualAdd | None:
    """The residual add that takes ``out`` (through casts / eval dropout), or None."""
    if out is None:
        return None
    branch = g.forward_identity(out)
    user = g.single_user(branch)
    if not g.is_op(user, aten.add) or len(user.args) < 2:
        return None
    a, b = user.args[:2]
    if not (isinstance(a, fx.Node) and isinstance(b, fx.Node)):
        return None
    stream = b if a is branch else a
    if g.shape(stream) != g.shape(user):
        return None
    return ResidualAdd(user, stream, branch)


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


def assemble_blocks(attention: list[AttentionRegion], ffn: list[FFNRegion]) -> list[DecoderBlock]:
    """One DecoderBlock per layer index, pairing the attention and FFN regions of that layer."""
    by_attn = {r.layer: r for r in attention}
    by_ffn = {r.layer: r for r in ffn}
    layers = sorted(set(by_attn) | set(by_ffn))
    return [DecoderBlock(i, by_attn.get(i), by_ffn.get(i)) for i in layers]


def attach_residuals(
    attention: list[AttentionRegion], ffn: list[FFNRegion]
) -> tuple[list[AttentionRegion], list[FFNRegion], list[ResidualAdd]]:
    """Fills ``residual`` of every region whose output feeds a residual add; returns the adds."""
    residuals: list[ResidualAdd] = []
    new_attention = []
    for r in attention:
        res = residual_after(r.out)
        if res is not None:
            residuals.append(res)
        new_attention.append(replace(r, residual=res.node if res else None))
    new_ffn = []
    for r in ffn:
        res = residual_after(r.out)
        if res is not None:
            residuals.append(res)
        new_ffn.append(replace(r, residual=res.node if res else None))
    return new_attention, new_ffn, residuals
