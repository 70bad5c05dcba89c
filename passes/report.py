"""Per-token cost estimates of a captured model, computed from its regions.

Formulas (per generated token at context length L, summed over layers; d = model dim):
    attention FLOPs = 2 d (H + 2 Hkv) D  (q/k/v projections)  + 2 H D d  (o_proj)
                      + 4 H D L_eff      (scores and values; L_eff = min(L, window) for windowed layers)
    FFN FLOPs       = 2 d F x 3 (SwiGLU: gate, up, down) or x 2 (GELU MLP: up, down)
    KV-cache bytes  = 2 Hkv D bytes(dtype) x L_eff / L  (a window bounds the cache, amortised per token)
Projections are counted from the region's LinearRefs when the finder bound them, otherwise from the
standard formula with d taken from the region's input.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch

DEFAULT_CONTEXT_LEN = 2048
DEFAULT_KV_DTYPE = torch.float16


@dataclass(frozen=True)
class CostEstimate:
    """Estimated cost per token of one graph at ``context_len`` with a ``kv_dtype`` cache."""

    attention_flops_per_token: int
    ffn_flops_per_token: int
    kv_cache_bytes_per_token: float
    context_len: int
    kv_dtype: str
    attention_layers: int = 0
    ffn_layers: int = 0

    def to_dict(self) -> dict:
        """A JSON-serialisable dict."""
        return asdict(self)

    def markdown_table(self, after: CostEstimate) -> list[str]:
        """Markdown table lines comparing this estimate (before) with ``after``."""
        rows = [
            ("attention FLOPs/token", self.attention_flops_per_token, after.attention_flops_per_token),
            ("FFN FLOPs/token", self.ffn_flops_per_token, after.ffn_flops_per_token),
            (
                f"KV-cache bytes/token (L={self.context_len}, {self.kv_dtype})",
                self.kv_cache_bytes_per_token,
                after.kv_cache_bytes_per_token,
            ),
        ]
        lines = ["| estimate | before | after | change |", "|---|---:|---:|---:|"]
        for label, b, a in rows:
            change = f"{(a - b) / b:+.1%}" if b else "n/a"
            lines.append(f"| {label} | {b:,.0f} | {a:,.0f} | {change} |")
        return lines


def _out_features(ref) -> int:
    if ref.out_slice is not None:
        return ref.out_slice[1] - ref.out_slice[0]
    return ref.out_features


def _model_dim(region) -> int:
    if region.q_proj is not None:
        return region.q_proj.in_features
    val = region.x_in.meta.get("val") if region.x_in is not None else None
    if val is not None and isinstance(val.shape[-1], int):
        return val.shape[-1]
    return region.num_heads * region.head_dim


def _effective_len(window: int | None, context_len: int) -> int:
    return min(context_len, window) if window else context_len


def attention_flops_per_token(region, context_len: int) -> int:
    """FLOPs of one attention region for one token at context ``context_len``."""
    h, hkv, dh = region.num_heads, region.num_kv_heads, region.head_dim
    d = _model_dim(region)
    std = {"q": (d, h * dh), "k": (d, hkv * dh), "v": (d, hkv * dh), "o": (h * dh, d)}
    flops = 0
    for key, (fan_in, fan_out) in std.items():
        ref = getattr(region, f"{key}_proj")
        if ref is not None:
            fan_in, fan_out = ref.in_features, _out_features(ref)
        flops += 2 * fan_in * fan_out
    return flops + 4 * h * dh * _effective_len(region.window, context_len)


def ffn_flops_per_token(region) -> int:
    """FLOPs of one FFN region for one token: 2 d F per matmul, 3 matmuls with a gate, else 2."""
    matmuls = 3 if region.gate is not None else 2
    return 2 * region.dim * region.hidden_dim * matmuls


def kv_bytes_per_token(region, context_len: int, kv_dtype: torch.dtype) -> float:
    """Cache bytes one attention region adds per token (amortised when a window bounds the cache)."""
    per_token = 2 * region.num_kv_heads * region.head_dim * kv_dtype.itemsize
    return per_token * _effective_len(region.window, context_len) / context_len


def estimate_cost(
    attention: Sequence,
    ffn: Sequence = (),
    *,
    context_len: int = DEFAULT_CONTEXT_LEN,
    kv_dtype: torch.dtype = DEFAULT_KV_DTYPE,
) -> CostEstimate:
    """Sums the per-token estimates over the given regions.

    Args:
        attention: AttentionRegion objects (from ``condfx.patterns``).
        ffn: FFNRegion objects.
        context_len: context length L for the attention and cache terms.
        kv_dtype: dtype of the KV cache.

    Returns:
        The CostEstimate.

    Raises:
        ValueError: ``context_len`` is not a positive int.
    """
    if not isinstance(context_len, int) or context_len <= 0:
        msg = f"estimate_cost context_len must be a positive int; got {context_len!r}."
        raise ValueError(msg)
    return CostEstimate(
        attention_flops_per_token=sum(attention_flops_per_token(r, context_len) for r in attention),
        ffn_flops_per_token=sum(ffn_flops_per_token(r) for r in ffn),
        kv_cache_bytes_per_token=sum(kv_bytes_per_token(r, context_len, kv_dtype) for r in attention),
        context_len=context_len,
        kv_dtype=str(kv_dtype).removeprefix("torch."),
        attention_layers=len(attention),
        ffn_layers=len(ffn),
    )
