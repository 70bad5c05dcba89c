"""XQuant's calibrated latent (``latent=klt``; needs ``condfx.kv_calibrate.record_kv_stats`` first).

    per stream a basis A from calibration second moments, the keys' weighted by the query energy on
    each channel, the values' by W_oᵀW_o (``klt_math.klt_basis``); its coefficients, by descending
    variance, get 0/2/3/4 bits per block of G (``allocate_bits``, within k_budget / v_budget bits per
    channel, scales included); each run of equal bits is a stream fq(x_in U_t + c_t),
    k̂ = cat(runs) A⁻¹ (+ the k path); a 0-bit run is dropped from the quantized tokens only (the
    full-precision tail keeps it)                                         [several streams per K / V]
  latent=klt is transform coding (Karhunen-Loève transform + bit allocation by variance) applied to
  XQuant's latent; the query weighting of the keys follows the idea that a key error costs q·Δk.
"""

from __future__ import annotations

import itertools
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
    rotation,
    weight,
)
from condfx.passes.kv_quant.config import PASSTHROUGH_BITS
from condfx.passes.kv_quant.klt_math import (
    DROP_PENALTY,
    META_KEY,
    allocate_bits,
    check_stats_weights,
    klt_basis,
    output_weights,
    query_weights,
)
from condfx.passes.kv_quant.xquant import projections_unsupported, svd_stream
from condfx.patterns.regions import AttentionRegion


def klt_stream(g: GraphBuilder, region, proj, which: str, budget: float, group: int, dim: int, sink: int,
                rotate: bool) -> tuple[fx.Node, list[tuple[int, int]]]:
    """k̂ or v̂ from the calibrated latent: y = k A (A the query-weighted KLT for K, the output-weighted
    one for V, ``klt_math.py``); blocks of ``group`` coefficients get 0, 2, 3 or 4 bits
    within ``budget`` bits per channel; each run of equal bits is one stream fq(x_in U_t + c_t)
    (rotated within the run when ``rotate``), read back through A⁻¹. A run at 0 bits is dropped from
    the quantized tokens only (fq with bits 0 reads 0): the full-precision tail (sink, residual window)
    keeps every coefficient, so those tokens read the exact K / V. Returns (hat, [(width, bits)])."""
    stats = g.gm.meta.get(META_KEY, {}).get(region.layer)
    if stats is None:
        msg = (f"quantize-kv latent=klt needs calibration statistics for layer {region.layer}: run "
               "condfx.kv_calibrate.record_kv_stats(gm, batches) on calibration text first.")
        raise ValueError(msg)
    check_stats_weights(g.gm, region, stats)
    w = weight(g.gm, proj.weight).double()  # (d_kv, d)
    c = int(w.shape[0])
    check_group(group, c, f"{which} width", region.layer)
    if which == "k":
        a, a_inv, lam = klt_basis(stats.k, query_weights(region, stats))
    else:
        a, a_inv, lam = klt_basis(stats.v, output_weights(region, weight(g.gm, region.o_proj.weight)))
    bits = allocate_bits(lam, group, budget * c, DROP_PENALTY[which])
    bias = weight(g.gm, proj.bias).double() if proj.bias is not None else None
    dtype = region.x_in.meta["val"].dtype
    pieces, ups, streams, start = [], [], [], 0
    for tb, run in itertools.groupby(bits):
        width = group * len(list(run))
        cols = slice(start, start + width)
        start += width
        streams.append((width, tb))
        u, up = w.T @ a[:, cols], a_inv[cols]
        off = None if bias is None else bias @ a[:, cols]
        if rotate and tb:
            r = rotation(width)
            u, up, off = u @ r, r.T @ up, None if off is None else off @ r
        name = f"xquant_klt_{which}{len(pieces)}"
        lat = g.call(aten.matmul.default, region.x_in, g.constant(region.module_path, f"{name}_u",
                                                                    u.to(dtype).contiguous()))
        if off is not None:
            lat = g.call(aten.add.Tensor, lat, g.constant(region.module_path, f"{name}_c", off.to(dtype)))
        pieces.append(fake_quantize(g, lat, tb, group, dim, sink))
        ups.append(up)
    if all(tb == 0 for _, tb in streams):
        msg = (f"quantize-kv latent=klt: a {which} budget of {budget:g} bits per channel buys nothing in "
               f"layer {region.layer}; one block of {group} coefficients at 2 bits needs "
               f"{(2 * group + 32) / c:.3g}.")
        raise ValueError(msg)
    latent = pieces[0] if len(pieces) == 1 else g.call(aten.cat.default, pieces, -1)
    up_node = g.constant(region.module_path, f"xquant_klt_{which}_up", torch.cat(ups).to(dtype).contiguous())
    y = g.call(aten.matmul.default, latent, up_node)  # (B, T, d_kv), the bias included
    dst = region.k if which == "k" else region.v
    return g.copy_path(proj.node, dst, y), streams


@dataclass(frozen=True)
class XQuantKLTStrategy:
    """``method=xquant,latent=klt``: one stream per run of equal bits of the calibrated latent."""

    def unsupported(self, region: AttentionRegion, cfg) -> str | None:
        """XQuant's needs plus an out_in output projection (it weighs the values)."""
        reason = projections_unsupported(region, cfg)
        if reason is None and (region.o_proj is None or region.o_proj.weight_layout != "out_in"):
            return "no out_in output projection (latent=klt weighs the values by it)"
        return reason

    def hats(self, g: GraphBuilder, region: AttentionRegion, cfg, bits: LayerBits, acc: fx.Node | None) -> Hats:
        """k̂ and v̂ through the calibrated latents; a side at 16 or 32 bits without a budget is the
        SVD latent's."""
        hats, streams = [], []
        sides = (("k", bits.k, bits.k_budget, -2, cfg.group), ("v", bits.v, bits.v_budget, -1, 1))
        for which, b, budget, dim, chunk in sides:
            proj = region.k_proj if which == "k" else region.v_proj
            if not budget and b in PASSTHROUGH_BITS:
                hats.append(svd_stream(g, region, proj, which, b, cfg.group, dim, cfg.sink, False))
                streams.append((proj.out_features, chunk, b))
                continue
            hat, runs = klt_stream(g, region, proj, which, budget or b + 32 / cfg.group, cfg.group, dim,
                                   cfg.sink, cfg.rotate)
            hats.append(hat)
            streams += [(w, chunk, tb) for w, tb in runs]
        return Hats(hats[0], hats[1], cfg.group, 1, acc, tuple(streams))
