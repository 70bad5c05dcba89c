"""The strategies table of ``quantize-kv``: one small object per variant, chosen by the config and
the region (``latent=auto`` picks X or SVD by the model's widths).

Every strategy has ``unsupported(region, cfg) -> str | None`` (a skip reason) and
``hats(g, region, cfg, bits, acc) -> Hats`` (the region's k̂ / v̂ and streams). A new variant is a
new strategy module plus one line in ``STRATEGIES``.
"""

from __future__ import annotations

import enum
from types import MappingProxyType

from condfx.passes.kv_quant.config import KVQuantMethod, LatentKind, QuantizeKVConfig
from condfx.passes.kv_quant.kivi import KIVIStrategy
from condfx.passes.kv_quant.klt import XQuantKLTStrategy
from condfx.passes.kv_quant.xquant import XQuantSVDStrategy, XQuantXStrategy, uses_svd
from condfx.passes.kv_quant.xquant_cl import XQuantCLStrategy
from condfx.patterns.regions import AttentionRegion


class Variant(enum.Enum):
    """What one region's cache holds."""

    KIVI = "kivi"
    X = "x"
    SVD = "svd"
    CL = "xquant-cl"
    KLT = "klt"


STRATEGIES = MappingProxyType({
    Variant.KIVI: KIVIStrategy(),
    Variant.X: XQuantXStrategy(),
    Variant.SVD: XQuantSVDStrategy(),
    Variant.CL: XQuantCLStrategy(),
    Variant.KLT: XQuantKLTStrategy(),
})

_BY_METHOD = MappingProxyType({KVQuantMethod.KIVI: Variant.KIVI, KVQuantMethod.XQUANT_CL: Variant.CL})


def variant_of(cfg: QuantizeKVConfig, region: AttentionRegion) -> Variant:
    """The variant of ``region``: the method's, or for xquant its latent (auto: SVD when d > 2 d_kv).

    Call it after the XQuant strategies' ``unsupported`` said None (auto reads the projections).
    """
    if cfg.method in _BY_METHOD:
        return _BY_METHOD[cfg.method]
    if cfg.latent is LatentKind.KLT:
        return Variant.KLT
    return Variant.SVD if uses_svd(region, cfg) else Variant.X


def unsupported(cfg: QuantizeKVConfig, region: AttentionRegion) -> str | None:
    """Why ``region`` cannot be quantized with ``cfg`` (a skip reason), or None."""
    if region.score_options is not None:
        return f"{region.score_options} (condfx.quantized_cache_attention has no score options)"
    probe = STRATEGIES[Variant.KLT if cfg.latent is LatentKind.KLT else _BY_METHOD.get(cfg.method, Variant.X)]
    return probe.unsupported(region, cfg)
