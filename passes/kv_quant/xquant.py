"""XQuant: cache X (the attention input) or its SVD latents, and re-run the k/v paths on them.

    X:   x̂ = fq(x_in, per token); k̂, v̂ = copies of the x_in → k / v paths fed x̂, ck = cv = 1  [stream x]
    SVD: W_kᵀ = U_k Σ_k B_kᵀ; k̂ = copy of the k_proj → k path fed fq(x_in U_k, per channel) Σ_k B_kᵀ
         (+ bias), ck = G; v̂ likewise with fq(x_in U_v, per token), cv = 1          [streams k, v]
  ``latent=auto`` picks SVD when d > 2 d_kv (``uses_svd``). bits=32 keeps the latent exactly (the
  folded U Σ Bᵀ = W_kᵀ); ``rotate`` folds the Hadamard rotation into U and Σ Bᵀ.
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
    fake_quantize,
    rotated_fake_quantize,
    rotation,
    weight,
)
from condfx.passes.kv_quant.config import KVQuantMethod, LatentKind
from condfx.patterns.attention import fused_projection_behind
from condfx.patterns.regions import AttentionRegion


def projections_unsupported(region: AttentionRegion, cfg) -> str | None:
    """Why XQuant (any latent, CL) cannot rewrite ``region``, or None."""
    projs = (region.k_proj, region.v_proj)
    width = region.num_kv_heads * region.head_dim
    if any(p is None for p in projs) and fused_projection_behind(region.k, width) is not None:
        return "fused qkv projection split per head after a view (k/v are heads of one wider projection)"
    if region.x_in is None or any(p is None for p in projs):
        return "k/v projections not found"
    if any(p.out_slice is not None for p in projs):
        return "fused qkv projection"
    if cfg.method is KVQuantMethod.XQUANT_CL and region.input_norm is None:
        return "no input norm before the projections"
    if any(p.node.meta["val"].dim() != 3 or p.weight_layout != "out_in" for p in projs):
        return "projection is not a 3-D out_in linear"
    return None


def uses_svd(region: AttentionRegion, cfg) -> bool:
    """Does ``region`` cache the SVD latents (``latent=svd``, or ``auto`` with d > 2 d_kv)?"""
    if cfg.latent is LatentKind.AUTO:
        return region.x_in.meta["val"].shape[-1] > 2 * region.k_proj.out_features
    return cfg.latent is LatentKind.SVD


def svd_stream(g: GraphBuilder, region, proj, which: str, bits: int, group: int, dim: int, sink: int,
               rotate: bool) -> fx.Node:
    """fq(x_in U R) Rᵀ Σ Bᵀ (+ bias) fed through the proj → k/v path; returns k̂ or v̂ (R = I
    unless ``rotate``; it is folded into the two constants)."""
    w = weight(g.gm, proj.weight)  # (d_kv, d)
    u, s, vh = torch.linalg.svd(w.T.double(), full_matrices=False)
    check_group(group, int(s.numel()), f"{which} latent width", region.layer)
    if bits == 32:  # the latent is kept exactly: read through U Σ Bᵀ = W_kᵀ folded, no split rounding
        fold = ((u * s) @ vh).to(w.dtype).contiguous()
        y = g.call(aten.matmul.default, region.x_in, g.constant(region.module_path, f"xquant_w_{which}", fold))
    else:
        up = s[:, None] * vh
        if rotate:
            r = rotation(int(s.numel()))
            u, up = u @ r, r.T @ up
        u_node = g.constant(region.module_path, f"xquant_u_{which}", u.to(w.dtype).contiguous())
        up_node = g.constant(region.module_path, f"xquant_up_{which}", up.to(w.dtype).contiguous())
        latent = fake_quantize(g, g.call(aten.matmul.default, region.x_in, u_node), bits, group, dim, sink)
        y = g.call(aten.matmul.default, latent, up_node)  # (B, T, d_kv)
    if proj.bias is not None:
        y = g.call(aten.add.Tensor, y, proj.bias)
    dst = region.k if which == "k" else region.v
    return g.copy_path(proj.node, dst, y)


@dataclass(frozen=True)
class XQuantXStrategy:
    """``method=xquant`` caching X itself (one stream)."""

    def unsupported(self, region: AttentionRegion, cfg) -> str | None:
        """See ``projections_unsupported``."""
        return projections_unsupported(region, cfg)

    def hats(self, g: GraphBuilder, region: AttentionRegion, cfg, bits: LayerBits, acc: fx.Node | None) -> Hats:
        """k̂ and v̂ from fq(x_in) (see the module docstring)."""
        if bits.k != bits.v:
            msg = (f"quantize-kv k_bits {bits.k} and v_bits {bits.v} differ, but layer {region.layer} "
                   "caches X (one stream); use latent=svd.")
            raise ValueError(msg)
        d = int(region.x_in.meta["val"].shape[-1])
        check_group(cfg.group, d, "model dimension", region.layer)
        rot = rotation(d) if cfg.rotate else None
        x_hat = rotated_fake_quantize(g, region, region.x_in, bits.k, cfg.group, -1, cfg.sink, rot, "x")
        k_hat, v_hat = g.copy_path(region.x_in, region.k, x_hat), g.copy_path(region.x_in, region.v, x_hat)
        return Hats(k_hat, v_hat, 1, 1, acc, ((d, 1, bits.k),))


@dataclass(frozen=True)
class XQuantSVDStrategy:
    """``method=xquant`` caching the SVD latents of W_k and W_v (two streams)."""

    def unsupported(self, region: AttentionRegion, cfg) -> str | None:
        """See ``projections_unsupported``."""
        return projections_unsupported(region, cfg)

    def hats(self, g: GraphBuilder, region: AttentionRegion, cfg, bits: LayerBits, acc: fx.Node | None) -> Hats:
        """k̂ and v̂ through the quantized latents (see the module docstring)."""
        k_hat = svd_stream(g, region, region.k_proj, "k", bits.k, cfg.group, -2, cfg.sink, cfg.rotate)
        v_hat = svd_stream(g, region, region.v_proj, "v", bits.v, cfg.group, -1, cfg.sink, cfg.rotate)
        c = region.k_proj.out_features
        return Hats(k_hat, v_hat, cfg.group, 1, acc, ((c, cfg.group, bits.k), (c, 1, bits.v)))
