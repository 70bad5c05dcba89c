"""``quantize-kv``'s options: the method and latent enums, ``QuantizeKVConfig`` and its checks."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from types import MappingProxyType

from condfx.options import BIG_INT, Bool, Int, OneOf, check_options

ALLOWED_BITS = (2, 3, 4, 16, 32)
PASSTHROUGH_BITS = (16, 32)


class KVQuantMethod(Enum):
    """How the cache is quantized: XQuant (X or a latent of it), XQuant-CL (cross-layer deltas), KIVI."""

    XQUANT = "xquant"
    XQUANT_CL = "xquant-cl"
    KIVI = "kivi"


class LatentKind(Enum):
    """What ``xquant`` caches: X itself, the SVD latents, or X when d <= 2 d_kv (``auto``)."""

    AUTO = "auto"
    X = "x"
    SVD = "svd"
    KLT = "klt"


_BOUNDS = MappingProxyType({
    "method": OneOf(KVQuantMethod), "latent": OneOf(LatentKind), "rotate": Bool(),
    "group": Int(1, BIG_INT), "residual": Int(0, BIG_INT), "first_layers": Int(0, BIG_INT),
    "context": Int(1, BIG_INT), "sink": Int(0, BIG_INT), "ring_float16": Bool(),
})
"""The plain bounds; bits, budgets and the combinations are checked in ``__post_init__``."""

_CHECKED_RULES = MappingProxyType({
    "bits": f"one of {ALLOWED_BITS}", "first_bits": f"one of {ALLOWED_BITS}",
    "k_bits": f"0 or one of {ALLOWED_BITS}", "v_bits": f"0 or one of {ALLOWED_BITS}",
    "k_budget": "[0, 32], latent=klt only", "v_budget": "[0, 32], latent=klt only",
})
"""What ``__post_init__`` checks beyond ``_BOUNDS``, in words (``condfx passes`` shows it)."""


@dataclass(frozen=True)
class QuantizeKVConfig:
    """Options of ``quantize-kv``.

    Attributes:
        method: xquant, xquant-cl or kivi.
        bits: 2, 3 or 4; 16 (float16 cache) or 32 (quantization off).
        group: values sharing one scale and zero point (channels, or tokens for per-channel keys).
        residual: most recent tokens kept in full precision, 0 <= residual <= context.
        first_layers: the first layers get ``first_bits`` instead of ``bits``.
        first_bits: bits of those layers.
        latent: for xquant, cache X, the SVD latents, or choose (auto).
        context: tokens at which the report gives KV bytes per token.
        sink: the first tokens (the attention sink) kept in full precision, >= 0.
        k_bits: bits of the K stream (kivi, xquant SVD latents); 0 takes ``bits``.
        v_bits: bits of the V stream, likewise; layers in ``first_layers`` keep ``first_bits``.
        rotate: quantize each stream in a fixed normalised Hadamard basis (blocks of the largest
            power of two dividing the width, per head for kivi): x̂ = fq(x R) Rᵀ.
        k_budget: latent=klt: bits per K channel per token, codes plus scales and zero points
            (0: k_bits + 32 / group, the bytes of a plain stream at those bits).
        v_budget: likewise for V.
        ring_float16: also keep the bounded sink + window rings of route-attention{form=select} in
            float16 (their k/v are rounded through float16 in the graph, so decode reads what the forward
            read); off by default: the rounding can flip a later layer's 2-bit code, which moves ONNX
            Runtime's logits from PyTorch's by up to ~1e-2.
    """

    method: KVQuantMethod = KVQuantMethod.XQUANT
    bits: int = 4
    group: int = 32
    residual: int = 32
    first_layers: int = 0
    first_bits: int = 4
    latent: LatentKind = LatentKind.AUTO
    context: int = 4096
    sink: int = 0
    k_bits: int = 0
    v_bits: int = 0
    rotate: bool = False
    k_budget: float = 0.0
    v_budget: float = 0.0
    ring_float16: bool = False

    def __post_init__(self):
        check_options(self, _BOUNDS)
        for name in ("bits", "first_bits"):
            v = getattr(self, name)
            if isinstance(v, bool) or v not in ALLOWED_BITS:
                msg = f"QuantizeKVConfig.{name} must be one of {ALLOWED_BITS}; got {v!r}."
                raise ValueError(msg)
        for name in ("k_bits", "v_bits"):
            v = getattr(self, name)
            if isinstance(v, bool) or v not in (0, *ALLOWED_BITS):
                msg = f"QuantizeKVConfig.{name} must be 0 (use bits) or one of {ALLOWED_BITS}; got {v!r}."
                raise ValueError(msg)
        if self.latent is LatentKind.KLT and self.method is not KVQuantMethod.XQUANT:
            msg = f"QuantizeKVConfig.latent=klt is a latent of method=xquant; got method={self.method.value}."
            raise ValueError(msg)
        for name in ("k_budget", "v_budget"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v <= 32:
                msg = f"QuantizeKVConfig.{name} must be a number of bits per channel in [0, 32]; got {v!r}."
                raise ValueError(msg)
            if v and self.latent is not LatentKind.KLT:
                msg = f"QuantizeKVConfig.{name} applies to latent=klt only; got latent={self.latent.value}."
                raise ValueError(msg)
        one_stream = self.method is KVQuantMethod.XQUANT_CL or (
            self.method is KVQuantMethod.XQUANT and self.latent is LatentKind.X)
        if (self.k_bits or self.v_bits) and one_stream:
            what = "xquant-cl" if self.method is KVQuantMethod.XQUANT_CL else "xquant with latent=x"
            msg = f"QuantizeKVConfig.k_bits and v_bits need separate K and V streams; {what} caches one."
            raise ValueError(msg)
        if self.residual > self.context:
            msg = (
                f"QuantizeKVConfig.residual {self.residual} is longer than the context "
                f"{self.context}; the residual window must fit in the context."
            )
            raise ValueError(msg)
