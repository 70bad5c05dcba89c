"""``condfx::group_quantize`` / ``group_dequantize`` / ``fake_group_quantize`` /
``quantized_cache_attention``: the KV-cache quantization ops (XQuant, XQuant-CL, KIVI).

Semantics (the contract every lowering must match):
    A *stream* is a tensor (..., N, C): N tokens of C channels (K or V per head, an X latent, ...).
    Groups run along one axis, ``dim``:
        dim = -1: per token, groups of ``group`` consecutive channels (KIVI values, XQuant);
        dim = -2: per channel, groups of ``group`` consecutive tokens (KIVI keys).
    Values are first saturated to float16's finite range, x ← clamp(x, -65504, 65504), so every
    stored code, scale and zero is finite at any magnitude (the stated error: a value beyond the range
    reads back as ±65504, off by |x| - 65504; within it the error is the quantization step's).
    Asymmetric min/max quantization with ``L = 2**bits - 1`` levels per group:
        zero = min(x_g), scale = (max(x_g) - min(x_g)) / L, both stored as float16;
        code = clamp(round((x - zero) / scale), 0, L);   x̂ = code * scale + zero
    using the float16-rounded scale and zero in both directions (a constant group has scale 0 and
    dequantizes exactly to its value). Codes are packed little-endian bit by bit along C: the codes
    of one row form ``C * bits`` bits, stored as ``C * bits / 8`` uint8 (C * bits must be a multiple
    of 8; 3-bit codes pack 8 to 3 bytes, no padding).

    group_quantize(x, bits, group, dim) -> packed (..., N, C*bits/8) uint8,
        scale, zero (..., N, C/group) for dim -1 or (..., N/group, C) for dim -2, float16
    group_dequantize(packed, scale, zero, bits, group, dim, channels) -> (..., N, C) float32
    fake_group_quantize(x, bits, group, dim, sink) -> x̂ in x's dtype, the first ``sink`` tokens
        passed through and groups along tokens counted from there; bits 16 rounds to float16
        (saturated as above), bits 32 returns x unchanged (quantization off), bits 0 returns zeros (a channel dropped from
        the quantized tokens: ``quantize-kv{latent=klt}``'s low-variance coefficients); for dim -2 a trailing partial token group
        is quantized as if padded with its last token (cache policies never read it, see below).

    quantized_cache_attention(q, k, v, k_hat, v_hat, scale, window, residual, k_chunk, v_chunk, sink):
        ``condfx::attention`` (end-aligned causal, GQA, window) where the query at absolute position
        p reads key j as ``k_hat[j]`` when sink <= j < quantized_end(p, residual, k_chunk, sink), else as
        ``k[j]`` (and likewise v / v_hat with v_chunk). This is exactly what token-by-token
        decoding sees when the cache, holding the p earlier tokens, keeps the first
        quantized_count(p) of them quantized and the rest (the residual window, at least
        ``residual`` tokens) in full precision; the token's own K/V is always read in full.

    quantized_end(n, residual, chunk, sink) = sink + (max(0, n - residual - sink) // chunk) * chunk
    (the first ``sink`` tokens, the attention sink, are never quantized, as in KVQuant)

This module holds the eager references and fake implementations. Runtime storage (caches holding
packed codes) is ``runtime/quant_caches.py``; the Triton read path is ``codegen/triton/kv_quant.py``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from condfx.ops._masks import causal_window_mask
from condfx.ops.attention import check_attention_shapes

BITS = (2, 3, 4)
PASSTHROUGH_BITS = (16, 32)  # 16: stored as float16; 32: quantization off
DROPPED = 0  # fake_group_quantize / quantized_stream only: quantized tokens store nothing, read 0
DIMS = (-1, -2)
FLOAT16_MAX = 65504.0  # float16's largest finite value: stored values saturate there
_SCORE_BLOCK_ELEMENTS = 1 << 24


def quantized_count(n: int, residual: int, chunk: int, sink: int = 0) -> int:
    """Tokens held quantized by a cache of ``n`` tokens, after its ``sink`` first ones."""
    return (max(0, n - residual - sink) // chunk) * chunk


def stream_bytes_per_token(
    channels: int, bits: int, group: int, residual: int = 0, chunk: int = 1, context: int = 0,
    tail_bytes: int = 2, sink: int = 0,
) -> float:
    """Mean cache bytes per token of one stream at ``context`` tokens (0: the tail is ignored).

    Quantized tokens cost ``channels * bits / 8`` code bytes plus a float16 scale and zero per
    ``group`` values; tail tokens cost ``channels * tail_bytes``. Bits 16 and 32 store every token
    as float16 / float32.
    """
    if bits in (16, 32):
        return channels * bits / 8
    # bits 0: coefficients dropped from the quantized tokens, kept in the full-precision tail
    quantized = channels * bits / 8 + 4 * channels / group if bits else 0.0
    if context <= 0:
        return quantized
    nq = quantized_count(context, residual, chunk, sink)
    return (nq * quantized + (context - nq) * channels * tail_bytes) / context


def check_quant_args(bits: int, group: int, dim: int, channels: int, tokens: int | None,
                     dropped_ok: bool = False) -> None:
    """Raises ValueError when bits/group/dim do not fit a stream of ``channels`` (and ``tokens``);
    ``dropped_ok`` also allows bits 0 (a dropped stream)."""
    if dropped_ok and bits == DROPPED:
        if group < 1 or (dim == -1 and channels % group):
            msg = f"condfx.quantized_stream: group {group} must divide the {channels} channels of the stream."
            raise ValueError(msg)
        return
    if bits not in BITS:
        msg = f"condfx.group_quantize: bits must be one of {BITS}; got {bits!r}."
        raise ValueError(msg)
    if dim not in DIMS:
        msg = f"condfx.group_quantize: dim must be -1 (per token) or -2 (per channel); got {dim!r}."
        raise ValueError(msg)
    along = channels if dim == -1 else tokens
    if group < 1 or (isinstance(along, int) and along % group != 0):
        what = "channels" if dim == -1 else "tokens"
        msg = f"condfx.group_quantize: group {group} must divide the {along} {what} of the stream."
        raise ValueError(msg)
    if (channels * bits) % 8 != 0:
        msg = f"condfx.group_quantize: channels * bits must be a multiple of 8; got {channels} * {bits}."
        raise ValueError(msg)


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """(..., C) integer codes < 2**bits → (..., C * bits / 8) uint8, little-endian bits."""
    shifts = torch.arange(bits, device=codes.device, dtype=torch.int32)
    planes = (codes.to(torch.int32).unsqueeze(-1) >> shifts) & 1  # (..., C, bits)
    planes = planes.reshape(*codes.shape[:-1], codes.shape[-1] * bits // 8, 8)  # (..., C*bits/8, 8)
    weights = torch.arange(8, device=codes.device, dtype=torch.int32)
    return (planes << weights).sum(-1).to(torch.uint8)


def unpack_codes(packed: torch.Tensor, bits: int, channels: int) -> torch.Tensor:
    """Inverse of ``pack_codes``: (..., C * bits / 8) uint8 → (..., C) int32 codes."""
    if 8 % bits == 0:  # 2 and 4 bits: whole codes per byte, one shift per code slot
        shifts = torch.arange(0, 8, bits, device=packed.device, dtype=torch.uint8)
        codes = (packed.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)  # (..., C*bits/8, 8/bits)
        return codes.reshape(*packed.shape[:-1], channels).to(torch.int32)
    weights = torch.arange(8, device=packed.device, dtype=torch.int32)
    planes = (packed.to(torch.int32).unsqueeze(-1) >> weights) & 1  # (..., C*bits/8, 8)
    planes = planes.reshape(*packed.shape[:-1], channels, bits)
    shifts = torch.arange(bits, device=packed.device, dtype=torch.int32)
    return (planes << shifts).sum(-1)


def _grouped(x: torch.Tensor, group: int, dim: int) -> torch.Tensor:
    """(..., N, C) → (..., N, C/g, g) for dim -1, (..., N/g, g, C) for dim -2."""
    *lead, n, c = x.shape
    if dim == -1:
        return x.reshape(*lead, n, c // group, group)
    return x.reshape(*lead, n // group, group, c)


def _expand(stat: torch.Tensor, group: int, dim: int) -> torch.Tensor:
    """A per-group statistic broadcast back to the (..., N, C) element grid."""
    if dim == -1:
        return stat.repeat_interleave(group, dim=-1)
    return stat.repeat_interleave(group, dim=-2)


def saturate(x: torch.Tensor) -> torch.Tensor:
    """``x`` clamped to float16's finite range (same dtype): what the cache can store, never ±inf."""
    return x.clamp(-FLOAT16_MAX, FLOAT16_MAX)


def to_float16(x: torch.Tensor) -> torch.Tensor:
    """``x`` rounded to float16, saturating at ±65504 instead of overflowing to ±inf."""
    return saturate(x).to(torch.float16)


def _dropped(x: torch.Tensor, group: int, dim: int):
    """bits 0: nothing stored, (codes, scale, zero) with no columns."""
    *lead, n, _ = x.shape
    rows = n if dim == -1 else n // group
    return (x.new_zeros((*lead, n, 0), dtype=torch.uint8), x.new_zeros((*lead, rows, 0), dtype=torch.float16),
            x.new_zeros((*lead, rows, 0), dtype=torch.float16))


def quantize_reference(x: torch.Tensor, bits: int, group: int, dim: int):
    """Eager reference of ``group_quantize``: (packed uint8, scale fp16, zero fp16); bits 0 (a dropped
    stream, used inside ``quantized_stream`` only) stores nothing."""
    if bits == DROPPED:
        return _dropped(x, group, dim)
    check_quant_args(bits, group, dim, int(x.shape[-1]), int(x.shape[-2]))
    levels = (1 << bits) - 1
    xf = saturate(x.float())
    g = _grouped(xf, group, dim)
    red = -1 if dim == -1 else -2
    lo, hi = g.amin(red), g.amax(red)
    zero = lo.to(torch.float16)
    scale = to_float16((hi - lo) / levels)
    s, z = _expand(scale.float(), group, dim), _expand(zero.float(), group, dim)
    codes = torch.round((xf - z) / torch.where(s > 0, s, torch.ones_like(s)))
    codes = codes.clamp(0, levels)
    return pack_codes(codes, bits), scale, zero


def dequantize_reference(packed, scale, zero, bits: int, group: int, dim: int, channels: int):
    """Eager reference of ``group_dequantize``: (..., N, C) float32 (zeros for bits 0)."""
    if bits == DROPPED:
        return torch.zeros((*packed.shape[:-1], channels), dtype=torch.float32, device=packed.device)
    codes = _grouped(unpack_codes(packed, bits, channels).float(), group, dim)
    s, z = scale.float().unsqueeze(-1 if dim == -1 else -2), zero.float().unsqueeze(-1 if dim == -1 else -2)
    return (codes * s + z).reshape(*packed.shape[:-1], channels)


def fake_quantize_reference(
    x: torch.Tensor, bits: int, group: int, dim: int, sink: int = 0
) -> torch.Tensor:
    """Eager reference of ``fake_group_quantize`` (quantize then dequantize, x's dtype)."""
    if sink:
        head, rest = x[..., :sink, :], x[..., sink:, :]
        return torch.cat([head, fake_quantize_reference(rest, bits, group, dim)], -2)
    if bits == 32 or x.shape[-2] == 0:
        return x.clone()
    if bits == DROPPED:  # the coefficient is not cached for quantized tokens: they read 0
        return torch.zeros_like(x)
    if bits == 16:
        return to_float16(x).to(x.dtype)
    n = int(x.shape[-2])
    pad = (-n) % group if dim == -2 else 0
    xp = torch.cat([x, x[..., -1:, :].expand(*x.shape[:-2], pad, x.shape[-1])], -2) if pad else x
    packed, scale, zero = quantize_reference(xp, bits, group, dim)
    out = dequantize_reference(packed, scale, zero, bits, group, dim, int(x.shape[-1]))
    return out[..., :n, :].to(x.dtype)


@torch.library.custom_op("condfx::group_quantize", mutates_args=())
def group_quantize(
    x: torch.Tensor, bits: int, group: int, dim: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``torch.ops.condfx.group_quantize``: see the module docstring."""
    return quantize_reference(x, bits, group, dim)


@group_quantize.register_fake
def _group_quantize_fake(x, bits, group, dim):
    *lead, n, c = x.shape
    check_quant_args(bits, group, dim, int(c), None)
    stats = (*lead, n, c // group) if dim == -1 else (*lead, n // group, c)
    packed = x.new_empty((*lead, n, c * bits // 8), dtype=torch.uint8)
    return packed, x.new_empty(stats, dtype=torch.float16), x.new_empty(stats, dtype=torch.float16)


@torch.library.custom_op("condfx::group_dequantize", mutates_args=())
def group_dequantize(
    packed: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    bits: int,
    group: int,
    dim: int,
    channels: int,
) -> torch.Tensor:
    """``torch.ops.condfx.group_dequantize``: see the module docstring."""
    return dequantize_reference(packed, scale, zero, bits, group, dim, channels)


@group_dequantize.register_fake
def _group_dequantize_fake(packed, scale, zero, bits, group, dim, channels):
    return packed.new_empty((*packed.shape[:-1], channels), dtype=torch.float32)


@torch.library.custom_op("condfx::fake_group_quantize", mutates_args=())
def fake_group_quantize(
    x: torch.Tensor, bits: int, group: int, dim: int, sink: int = 0
) -> torch.Tensor:
    """``torch.ops.condfx.fake_group_quantize``: see the module docstring."""
    return fake_quantize_reference(x, bits, group, dim, sink)


@fake_group_quantize.register_fake
def _fake_group_quantize_fake(x, bits, group, dim, sink=0):
    return x.new_empty(x.shape)


def _uses_hat(t0, t1, t, s, residual, chunk, device, sink=0) -> torch.Tensor:
    """(t1 - t0, S) bool: True where query row i reads the quantized copy of key j."""
    n = torch.arange(t0, t1, device=device) + (s - t)  # tokens cached before row i's own
    count = torch.div((n - residual - sink).clamp(min=0), chunk, rounding_mode="floor") * chunk
    j = torch.arange(s, device=device).unsqueeze(0)
    return (j >= sink) & (j < sink + count.unsqueeze(1))


def quantized_cache_attention_reference(
    q, k, v, k_hat, v_hat, scale: float, window: int, residual: int, k_chunk: int, v_chunk: int,
    sink: int = 0,
) -> torch.Tensor:
    """Eager reference of ``quantized_cache_attention`` (float32 scores, float64 for float64 inputs; chunked over queries)."""
    check_attention_shapes(q, k, v, window)
    b, h, t, d = q.shape
    hkv, s = k.shape[1], k.shape[2]
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    qg = q.to(acc).reshape(b, hkv, h // hkv, t, d)  # (B, Hkv, G, T, D)
    kg, khg = k.to(acc).unsqueeze(2), k_hat.to(acc).unsqueeze(2)  # (B, Hkv, 1, S, D)
    vg, vhg = v.to(acc).unsqueeze(2), v_hat.to(acc).unsqueeze(2)
    step = max(1, min(t, _SCORE_BLOCK_ELEMENTS // max(1, b * h * s)))
    outs = []
    for t0 in range(0, t, step):
        t1 = min(t, t0 + step)
        qc = qg[..., t0:t1, :]
        use_k = _uses_hat(t0, t1, t, s, residual, k_chunk, q.device, sink)  # (c, S)
        scores = torch.where(use_k, qc @ khg.transpose(-1, -2), qc @ kg.transpose(-1, -2)) * scale
        keep = causal_window_mask(t, s, window, q.device, rows=(t0, t1))  # (c, S)
        p = torch.softmax(scores.masked_fill(~keep, float("-inf")), dim=-1)  # (B, Hkv, G, c, S)
        use_v = _uses_hat(t0, t1, t, s, residual, v_chunk, q.device, sink)
        out = (p * use_v) @ vhg + (p * ~use_v) @ vg  # (B, Hkv, G, c, D)
        outs.append(out.to(q.dtype))
    return torch.cat(outs, dim=3).reshape(b, h, t, d)


def quantized_cache_attention_sdpa(
    q, k, v, k_hat, v_hat, scale: float, window: int, residual: int, k_chunk: int, v_chunk: int,
    sink: int = 0,
) -> torch.Tensor:
    """The same semantics as one SDPA call (what the op runs on CPU).

    Every key position j appears once per (key copy, value copy) pairing: (k̂, v̂), (k̂, v),
    (k, v̂), (k, v), and the mask lets query row i see exactly the pairing it reads at j, so the
    softmax runs over the same set of scores as the reference. With k_chunk == v_chunk the two
    mixed pairings are never used and are left out (2S keys instead of 4S).
    """
    check_attention_shapes(q, k, v, window)
    t, s = q.shape[2], k.shape[2]
    hk = _uses_hat(0, t, t, s, residual, k_chunk, q.device, sink)  # (T, S)
    hv = _uses_hat(0, t, t, s, residual, v_chunk, q.device, sink)
    keep = causal_window_mask(t, s, window, q.device)  # (T, S)
    pairs = [(k_hat, v_hat, hk & hv), (k, v, ~hk & ~hv)]
    if k_chunk != v_chunk:
        pairs += [(k_hat, v, hk & ~hv), (k, v_hat, ~hk & hv)]
    keys = torch.cat([p[0] for p in pairs], 2)  # (B, Hkv, nS, D)
    values = torch.cat([p[1] for p in pairs], 2)
    mask = torch.cat([keep & p[2] for p in pairs], 1)  # (T, nS)
    gqa = q.shape[1] != k.shape[1]
    return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=scale, enable_gqa=gqa)


@torch.library.custom_op("condfx::quantized_cache_attention", mutates_args=())
def quantized_cache_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_hat: torch.Tensor,
    v_hat: torch.Tensor,
    scale: float,
    window: int,
    residual: int,
    k_chunk: int,
    v_chunk: int,
    sink: int = 0,
) -> torch.Tensor:
    """``torch.ops.condfx.quantized_cache_attention``: see the module docstring."""
    with torch.no_grad():
        return quantized_cache_attention_sdpa(
            q, k, v, k_hat, v_hat, scale, window, residual, k_chunk, v_chunk, sink
        ).contiguous()


@quantized_cache_attention.register_fake
def _quantized_cache_attention_fake(
    q, k, v, k_hat, v_hat, scale, window, residual, k_chunk, v_chunk, sink=0
):
    check_attention_shapes(q, k, v, window)
    return q.new_empty(q.shape)
