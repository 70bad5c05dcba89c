"""Building blocks every ``quantize-kv`` strategy uses: fake-quantize nodes (optionally in a Hadamard
basis), weights as tensors, group checks, and ``Hats``, what a strategy returns for one layer."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import fx

from condfx.passes.graph_builder import GraphBuilder

aten = torch.ops.aten
QCA = torch.ops.condfx.quantized_cache_attention.default
FQ = torch.ops.condfx.fake_group_quantize.default
ATTENTION = torch.ops.condfx.attention.default


@dataclass(frozen=True)
class LayerBits:
    """Bits of one layer's K and V streams, and latent=klt's budgets (0: unset)."""

    k: int
    v: int
    k_budget: float = 0.0
    v_budget: float = 0.0


@dataclass(frozen=True)
class Hats:
    """What a strategy built for one attention region.

    Attributes:
        k_hat, v_hat: what the quantized cache hands back for the region's keys and values.
        k_chunk, v_chunk: tokens that leave the full-precision window together (group for
            per-channel streams, 1 per token).
        acc: XQuant-CL's accumulator after this layer (passed to the next), else the one passed in.
        streams: ``(channels, chunk, bits)`` of each stream, for the bytes report.
    """

    k_hat: fx.Node
    v_hat: fx.Node
    k_chunk: int
    v_chunk: int
    acc: fx.Node | None
    streams: tuple[tuple[int, int, int], ...]


def weight(gm: fx.GraphModule, node: fx.Node) -> torch.Tensor:
    """The tensor a get_attr node reads."""
    return functools.reduce(getattr, node.target.split("."), gm).detach()


def fake_quantize(g: GraphBuilder, x: fx.Node, bits: int, group: int, dim: int, sink: int = 0) -> fx.Node:
    """fake_group_quantize over the tokens after the first ``sink`` (those stay as they are)."""
    return g.call(FQ, x, bits, group, dim, sink) if sink else g.call(FQ, x, bits, group, dim)


def check_group(group: int, channels: int, what: str, layer: int) -> None:
    """ValueError when ``group`` does not divide ``channels``."""
    if channels % group:
        msg = f"quantize-kv group {group} must divide the {what} {channels} of layer {layer}."
        raise ValueError(msg)


def hadamard(n: int) -> torch.Tensor:
    """The normalised Sylvester Hadamard matrix of size ``n`` (a power of two): orthogonal, symmetric."""
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / n**0.5


def rotation(width: int) -> torch.Tensor:
    """Block-diagonal normalised Hadamard (float64) over ``width``: blocks of the largest power of two
    dividing it (``width`` itself when it is one)."""
    block = width & -width
    return torch.block_diag(*[hadamard(block)] * (width // block))


def rotated_fake_quantize(g: GraphBuilder, region, x: fx.Node, bits: int, group: int, dim: int, sink: int,
                          rot: torch.Tensor | None, which: str) -> fx.Node:
    """fq(x R) Rᵀ over x's last dimension for a rotation ``rot`` (float64), else fq(x)."""
    if rot is None or bits == 32:
        return fake_quantize(g, x, bits, group, dim, sink)
    r = g.constant(region.module_path, f"kvq_rotation_{which}", rot.to(x.meta["val"].dtype).contiguous())
    y = fake_quantize(g, g.call(aten.matmul.default, x, r), bits, group, dim, sink)
    return g.call(aten.matmul.default, y, g.call(aten.t.default, r))
