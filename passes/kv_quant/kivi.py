"""KIVI: keys quantized per channel (groups of G tokens, after RoPE), values per token (groups of G
of the token's Hkv·D values); ``rotate`` quantizes both in a per-head Hadamard basis.

    k̂ = fq(k, per channel), ck = G;  v̂ = fq(v rows, per token), cv = 1   [streams k, v]
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx

from condfx.passes.graph_builder import GraphBuilder
from condfx.passes.kv_quant.common import (
    Hats,
    LayerBits,
    aten,
    check_group,
    rotated_fake_quantize,
    rotation,
)
from condfx.patterns.regions import AttentionRegion


@dataclass(frozen=True)
class KIVIStrategy:
    """``method=kivi``."""

    def unsupported(self, region: AttentionRegion, cfg) -> str | None:
        """KIVI reads the attention's own k and v: every region works."""
        return None

    def hats(self, g: GraphBuilder, region: AttentionRegion, cfg, bits: LayerBits, acc: fx.Node | None) -> Hats:
        """k̂ and v̂ of one region (see the module docstring)."""
        group, hkv, hd = cfg.group, region.num_kv_heads, region.head_dim
        c = hkv * hd
        check_group(group, c, "K/V width (heads x head dim)", region.layer)
        rot = rotation(hd) if cfg.rotate else None  # per head
        # values per token: groups of G among the token's Hkv * D values (B, S, Hkv * D)
        rows = g.call(aten.flatten.using_ints, g.call(aten.permute.default, region.v, [0, 2, 1, 3]), 2)
        v_rot = None if rot is None else torch.block_diag(*[rot] * hkv)
        v_rows = rotated_fake_quantize(g, region, rows, bits.v, group, -1, cfg.sink, v_rot, "v")
        heads = g.call(aten.unflatten.int, v_rows, 2, [hkv, hd])
        v_hat = g.call(aten.permute.default, heads, [0, 2, 1, 3])
        k_hat = rotated_fake_quantize(g, region, region.k, bits.k, group, -2, cfg.sink, rot, "k")
        return Hats(k_hat, v_hat, group, 1, acc, ((c, group, bits.k), (c, 1, bits.v)))
