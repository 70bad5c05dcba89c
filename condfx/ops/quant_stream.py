"""``condfx::quantized_stream``: one step of a quantized cache stream that the decode graph reads and
updates itself, held as packed integer codes. KIVI's two streams live inside
``condfx::kivi_cache_attention`` (``kivi_cache.py``); XQuant's X or SVD latents use this op directly.

A stream (B, H, N, C) is four tensors: ``codes`` (B, H, Nq, C * bits / 8) uint8 (packed as
``condfx.ops.kv_quant.pack_codes``), ``scale`` / ``zero`` float16 ((B, H, Nq, C / group) per token,
dim -1, or (B, H, Nq / group, C) per channel, dim -2) and ``fp`` (B, H, N - Nq, C) in full precision:
the first ``sink`` tokens followed by the tokens not quantized yet. Bits 0 is a dropped stream: codes,
scale and zero have no columns and its quantized tokens read 0 (``quantize-kv{latent=klt}``). Bits 16
is a float16 stream: ``codes`` holds the quantized tokens as float16 values (B, H, Nq, C), scale and
zero have no columns (``quantize-kv`` with 16 bits). The stream's tokens, in order, are
``fp[:sink]``, dequantize(codes), ``fp[sink:]``; Nq = ``quantized_count(N, residual, chunk, sink)``
with chunk = group per channel, 1 per token.

    quantized_stream(codes, scale, zero, fp, new, bits, group, dim, residual, sink)
        -> (full, hat, codes', scale', zero', fp')
    new (B, H, T, C): the step's tokens. full (B, H, N + T, C): the stream's tokens followed by new,
    as stored (the quantized ones dequantized). hat: the same with the not-yet-quantized tokens after
    the sink replaced by their quantize-dequantize in the stream's groups (whole chunks from the first
    of them; a trailing partial chunk stays in full precision: no query reads it quantized). The
    returned stream holds the N + T tokens with quantized_count(N + T, ...) of them packed: exactly
    the codes ``hat`` was made from, so ``condfx::quantized_cache_attention`` reading (full, hat)
    sees what one teacher-forced ``quantize-kv`` forward sees, for any split into steps.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from condfx.ops.kv_quant import (
    BITS,
    DROPPED,
    check_quant_args,
    dequantize_reference,
    quantize_reference,
    quantized_count,
    to_float16,
)

STREAM_PARTS = ("codes", "scale", "zero", "fp")
HALF = 16  # a float16 stream: its quantized tokens are stored as float16 values, no scale / zero
STREAM_BITS = (*BITS, DROPPED, HALF)


def stream_shapes(lead, channels: int, bits: int, group: int, dim: int, quantized, full) -> list:
    """Shapes of (codes, scale, zero, fp) of a stream with ``quantized`` packed and ``full`` fp tokens."""
    stats = (quantized, channels // group) if dim == -1 else (quantized // group, channels)
    if bits in (DROPPED, HALF):  # no scales or zero points
        stats = (stats[0], 0)
    columns = channels if bits == HALF else channels * bits // 8
    return [(*lead, quantized, columns), (*lead, *stats), (*lead, *stats), (*lead, full, channels)]


def stream_dtypes(dtype: torch.dtype, bits: int = BITS[0]) -> tuple:
    """dtypes of (codes, scale, zero, fp) for full-precision tokens of ``dtype``."""
    return (torch.float16 if bits == HALF else torch.uint8, torch.float16, torch.float16, dtype)


def check_stream_args(bits: int, group: int, dim: int, channels: int) -> None:
    """ValueError when bits/group/dim do not fit a stream of ``channels`` (bits 0 and 16 included)."""
    if bits != HALF:
        check_quant_args(bits, group, dim, channels, None, dropped_ok=True)
        return
    if dim not in (-1, -2) or group < 1 or (dim == -1 and channels % group):
        msg = (f"condfx.quantized_stream: a float16 stream needs dim -1 or -2 and a group dividing its "
               f"{channels} channels; got dim {dim}, group {group}.")
        raise ValueError(msg)


def _pack_tokens(x: torch.Tensor, bits: int, group: int, dim: int):
    """(codes, scale, zero) of whole chunks of tokens (float16 values for bits 16)."""
    if bits != HALF:
        return quantize_reference(x, bits, group, dim)
    rows = x.shape[-2] if dim == -1 else x.shape[-2] // group
    empty = x.new_zeros((*x.shape[:-2], rows, 0), dtype=torch.float16)
    return to_float16(x), empty, empty.clone()


def _unpack_tokens(codes, scale, zero, bits: int, group: int, dim: int, channels: int) -> torch.Tensor:
    """The float32 values of packed tokens (float16 values for bits 16)."""
    if bits == HALF:
        return codes.float()
    return dequantize_reference(codes, scale, zero, bits, group, dim, channels)


def empty_stream(lead, channels: int, bits: int, group: int, dim: int, dtype, device="cpu",
                 quantized: int = 0, full: int = 0) -> list:
    """The four tensors of a stream, zero-filled (sizes > 0: examples for tracing)."""
    shapes = stream_shapes(lead, channels, bits, group, dim, quantized, full)
    dtypes = stream_dtypes(dtype, bits)
    return [torch.zeros(s, dtype=t, device=device) for s, t in zip(shapes, dtypes, strict=True)]


def stream_read(codes, scale, zero, fp, bits: int, group: int, dim: int, sink: int) -> torch.Tensor:
    """The stream's tokens in order, in fp's dtype: fp[:sink], dequantize(codes), fp[sink:]."""
    deq = _unpack_tokens(codes, scale, zero, bits, group, dim, int(fp.shape[-1])).to(fp.dtype)
    return torch.cat([fp[..., :sink, :], deq, fp[..., sink:, :]], -2)


def stream_append(codes, scale, zero, fp, new, bits: int, group: int, dim: int, residual: int,
                  sink: int) -> list:
    """(codes', scale', zero', fp') after appending ``new``: the tokens that left the residual window
    (in whole chunks, after the sink) are packed; see the module docstring."""
    chunk = group if dim == -2 else 1
    nq = int(codes.shape[-2])
    if int(scale.shape[-2]) != (nq if dim == -1 else nq // group) or nq % chunk:
        msg = (f"condfx.quantized_stream: a stream with {nq} packed tokens needs "
               f"{nq if dim == -1 else nq // group} scale rows (group {group}); got {int(scale.shape[-2])}.")
        raise ValueError(msg)
    allf = torch.cat([fp, new.to(fp.dtype)], -2)
    head, rest = allf[..., :sink, :], allf[..., sink:, :]
    total = nq + int(allf.shape[-2])
    move = quantized_count(total, residual, chunk, sink) - nq
    if move < 0 or (move and int(head.shape[-2]) < sink):
        msg = (f"condfx.quantized_stream: a stream of {total} tokens holds {nq} packed, more than "
               f"its policy (residual {residual}, sink {sink}, chunk {chunk}) allows.")
        raise ValueError(msg)
    packed, sc, ze = _pack_tokens(rest[..., :move, :], bits, group, dim)
    return [torch.cat([codes, packed], -2), torch.cat([scale, sc], -2), torch.cat([zero, ze], -2),
            torch.cat([head, rest[..., move:, :]], -2)]


def stream_step(codes, scale, zero, fp, new, bits: int, group: int, dim: int, residual: int, sink: int):
    """One step of a stream: (full, hat, codes', scale', zero', fp'); see the module docstring.

    ``hat`` quantizes the whole chunks of the not-yet-packed tokens; ``stream_append`` packs the
    first of those chunks again (the same groups, so the same codes; at most residual + T tokens).
    """
    quant, chunk = (bits, group, dim), group if dim == -2 else 1
    updated = stream_append(codes, scale, zero, fp, new, *quant, residual, sink)
    allf = torch.cat([fp, new.to(fp.dtype)], -2)
    full = stream_read(codes, scale, zero, allf, *quant, sink)
    stored = min(sink, int(allf.shape[-2])) + int(codes.shape[-2])  # sink + packed tokens
    rest = full[..., stored:, :]
    whole = int(rest.shape[-2]) // chunk * chunk
    rest_hat = _unpack_tokens(*_pack_tokens(rest[..., :whole, :], *quant), *quant,
                              int(rest.shape[-1])).to(fp.dtype)
    hat = torch.cat([full[..., :stored, :], rest_hat, rest[..., whole:, :]], -2)
    return (full, hat, *updated)


def updated_lengths(stored, fp_len, new: int, residual: int, chunk: int, sink: int):
    """(Nq', N' - Nq') of a stream after ``new`` tokens; works on SymInts (export)."""
    total = stored + fp_len + new
    nq = torch.sym_max(0, total - residual - sink) // chunk * chunk
    return nq, total - nq


@dataclass(frozen=True)
class StreamSpec:
    """One quantized stream of a layer's decode-form cache.

    Attributes:
        name: ``k`` / ``v`` (KIVI keys and values, SVD latents) or ``x`` (XQuant's X).
        heads: dim 1 of the stream's tensors (KIVI keys: Hkv; otherwise 1).
        channels: C.
        bits, group, dim, residual, sink: the quantization (``quantized_stream``).
    """

    name: str
    heads: int
    channels: int
    bits: int
    group: int
    dim: int
    residual: int
    sink: int

    def empty(self, batch: int, dtype, device=None, length: int = 0) -> list[torch.Tensor]:
        """The four tensors of an empty stream (``length`` > 0: example sizes for tracing)."""
        return empty_stream((batch, self.heads), self.channels, self.bits, self.group, self.dim, dtype,
                            device, 2 * self.group * bool(length), length)

    def dtypes(self, dtype: torch.dtype) -> tuple:
        """dtypes of the stream's four tensors for full-precision tokens of ``dtype``."""
        return stream_dtypes(dtype, self.bits)


@torch.library.custom_op("condfx::quantized_stream", mutates_args=())
def quantized_stream(
    codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, fp: torch.Tensor, new: torch.Tensor,
    bits: int, group: int, dim: int, residual: int, sink: int, align: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``torch.ops.condfx.quantized_stream``: see the module docstring.

    ``align``: another stream's ``full`` output of the same layer (an XQuant V latent aligned to
    its K latent); ``full`` and ``hat`` must then have its length (dim 2), which their traced
    size says too, so graphs reading both streams need no guard relating their input lengths.
    """
    check_stream_args(bits, group, dim, int(new.shape[-1]))
    with torch.no_grad():
        outs = stream_step(codes, scale, zero, fp, new, bits, group, dim, residual, sink)
    if align is not None and align.shape[2] != outs[0].shape[2]:
        msg = (f"condfx.quantized_stream: the stream holds {outs[0].shape[2]} tokens but the stream "
               f"it is aligned to {align.shape[2]}; both must hold the same tokens.")
        raise ValueError(msg)
    return tuple(o.contiguous() for o in outs)


@quantized_stream.register_fake
def _quantized_stream_fake(codes, scale, zero, fp, new, bits, group, dim, residual, sink, align=None):
    check_stream_args(bits, group, dim, int(new.shape[-1]))
    b, h, t, c = new.shape
    ctx = torch.library.get_ctx()  # new sizes: see kivi_cache's fake for why they are unbacked
    nq, nf = ctx.new_dynamic_size(), ctx.new_dynamic_size()
    n = codes.shape[2] + fp.shape[2] + t if align is None else align.shape[2]
    if dim == -2:
        torch._check(nq % group == 0)
    shapes = stream_shapes((b, h), c, bits, group, dim, nq, nf)
    return (fp.new_empty((b, h, n, c)), fp.new_empty((b, h, n, c)),
            *(fp.new_empty(s, dtype=d) for s, d in zip(shapes, stream_dtypes(fp.dtype, bits), strict=True)))
