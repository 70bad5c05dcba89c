"""XQuant-CL: cache the cross-layer deltas of the pre-norm residual stream.

    r_i = layer i's pre-norm residual stream; a_0 = fq(r_0), a_i = a_{i-1} + fq(r_i - a_{i-1})
    (deltas against the reconstructed accumulator, so errors do not drift); k̂, v̂ = copies of the
    r_i → k / v paths fed a_i (the layer's own norm re-applied), ck = cv = 1          [stream x]
  bits=32: a lossless delta gives back r_i itself, so the accumulator is r_i, exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

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
from condfx.passes.kv_quant.xquant import projections_unsupported
from condfx.patterns.regions import AttentionRegion


@dataclass(frozen=True)
class XQuantCLStrategy:
    """``method=xquant-cl``; the accumulator is threaded from layer to layer by the pass."""

    def unsupported(self, region: AttentionRegion, cfg) -> str | None:
        """See ``xquant.projections_unsupported`` (it also needs the layer's input norm)."""
        return projections_unsupported(region, cfg)

    def hats(self, g: GraphBuilder, region: AttentionRegion, cfg, bits: LayerBits, acc: fx.Node | None) -> Hats:
        """k̂ and v̂ from a_i; returns a_i as ``Hats.acc`` (see the module docstring)."""
        d = int(region.x_in.meta["val"].shape[-1])
        check_group(cfg.group, d, "model dimension", region.layer)
        rot = rotation(d) if cfg.rotate else None
        r = region.input_norm.x_in
        if bits.k == 32:  # a lossless delta gives back r_i itself: the accumulator is r_i, exactly
            acc = r
        else:
            delta = r if acc is None else g.call(aten.sub.Tensor, r, acc)
            q = rotated_fake_quantize(g, region, delta, bits.k, cfg.group, -1, cfg.sink, rot, "delta")
            acc = q if acc is None else g.call(aten.add.Tensor, acc, q)
        k_hat, v_hat = g.copy_path(r, region.k, acc), g.copy_path(r, region.v, acc)
        return Hats(k_hat, v_hat, 1, 1, acc, ((d, 1, bits.k),))
