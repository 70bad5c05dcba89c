"""``condfx::kivi_cache_attention``: one prefill or decode step of attention over a KIVI cache that the
graph itself reads and updates, held as packed integer codes (the decode form ``add-kv-cache`` gives a
``quantize-kv{method=kivi}`` layer; ``runtime/quant_caches.GraphKIVICache`` carries the tensors).

A cache *stream* is four tensors (packed uint8 codes, float16 scale and zero point, the
full-precision sink and recent tokens), as ``condfx/ops/quant_stream.py`` describes.

    kivi_cache_attention(q, k, v, k_codes, k_scale, k_zero, k_fp, v_codes, v_scale, v_zero, v_fp,
                         scale, window, bits, group, residual, sink)
        -> (out, k_codes', k_scale', k_zero', k_fp', v_codes', v_scale', v_zero', v_fp')
    q (B, H, T, D); k, v (B, Hkv, T, D) the step's new keys (after RoPE) and values;
    K stream (B, Hkv, ., D): per channel, groups of ``group`` tokens (chunk = group);
    V stream (B, 1, ., Hkv * D): per token, groups of ``group`` of the token's Hkv * D values (chunk 1).

Semantics: with S = N + T, the output is ``condfx::quantized_cache_attention(q, K, V, K̂, V̂, scale,
window, residual, group, 1, sink)`` where K = the stream's tokens followed by k, and K̂ = the same with
the not-yet-quantized tokens after the sink replaced by their quantize-dequantize in the stream's groups
(whole chunks from the first of them; a trailing partial chunk is never read quantized); likewise V.
The returned stream holds the S tokens with Nq' = quantized_count(S, ...) of them quantized: the new
codes are exactly those K̂ / V̂ were made from. So a prefill followed by any mix of decode steps gives
what one teacher-forced ``quantize-kv`` forward gives (the token's own and the residual window's K/V
read in full precision), and the stream a decode step returns is what the next step reads.
"""

from __future__ import annotations

import torch

from condfx.ops.kv_quant import check_quant_args, quantized_cache_attention_sdpa
from condfx.ops.quant_stream import stream_dtypes, stream_shapes, stream_step


def _check(q, k, v, bits, group) -> None:
    b, hkv, t, d = k.shape
    check_quant_args(bits, group, -2, int(d), None)
    check_quant_args(bits, group, -1, int(hkv * d), None)
    if v.shape != k.shape or q.shape[0] != b or q.shape[2] != t or q.shape[3] != d:
        msg = (f"condfx.kivi_cache_attention: q (B, H, T, D) and k, v (B, Hkv, T, D) must agree; got "
               f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}.")
        raise ValueError(msg)


def kivi_cache_attention_reference(
    q, k, v, k_codes, k_scale, k_zero, k_fp, v_codes, v_scale, v_zero, v_fp,
    scale: float, window: int, bits: int, group: int, residual: int, sink: int,
):
    """Eager reference of ``kivi_cache_attention`` (see the module docstring)."""
    _check(q, k, v, bits, group)
    b, hkv, t, d = k.shape
    kf, kh, *k_out = stream_step(k_codes, k_scale, k_zero, k_fp, k, bits, group, -2, residual, sink)
    rows = v.transpose(1, 2).reshape(b, 1, t, hkv * d)  # (B, 1, T, Hkv * D)
    vf, vh, *v_out = stream_step(v_codes, v_scale, v_zero, v_fp, rows, bits, group, -1, residual, sink)

    def heads(x):  # (B, 1, S, Hkv * D) -> (B, Hkv, S, D)
        return x.reshape(b, -1, hkv, d).transpose(1, 2)

    if kf.shape[2] != vf.shape[2]:
        msg = (f"condfx.kivi_cache_attention: the K stream holds {kf.shape[2] - t} tokens but the V "
               f"stream {vf.shape[2] - t}; both must hold the same past.")
        raise ValueError(msg)
    if t == 1:  # the one query reads quantized copies only of tokens packed before this step,
        # whose stored value is already the dequantized one: plain attention over S keys, not 2S
        out = torch.ops.condfx.attention(q, kf.to(q.dtype), heads(vf).to(q.dtype), scale, window)
    else:
        out = quantized_cache_attention_sdpa(
            q, kf.to(q.dtype), heads(vf).to(q.dtype), kh.to(q.dtype), heads(vh).to(q.dtype),
            scale, window, residual, group, 1, sink,
        )
    return (out.contiguous(), *k_out, *v_out)


@torch.library.custom_op("condfx::kivi_cache_attention", mutates_args=())
def kivi_cache_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    k_codes: torch.Tensor, k_scale: torch.Tensor, k_zero: torch.Tensor, k_fp: torch.Tensor,
    v_codes: torch.Tensor, v_scale: torch.Tensor, v_zero: torch.Tensor, v_fp: torch.Tensor,
    scale: float, window: int, bits: int, group: int, residual: int, sink: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
           torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``torch.ops.condfx.kivi_cache_attention``: see the module docstring."""
    with torch.no_grad():
        outs = kivi_cache_attention_reference(
            q, k, v, k_codes, k_scale, k_zero, k_fp, v_codes, v_scale, v_zero, v_fp,
            scale, window, bits, group, residual, sink,
        )
    return tuple(o.contiguous() for o in outs)


@kivi_cache_attention.register_fake
def _kivi_cache_attention_fake(q, k, v, k_codes, k_scale, k_zero, k_fp, v_codes, v_scale, v_zero,
                               v_fp, scale, window, bits, group, residual, sink):
    _check(q, k, v, bits, group)
    b, hkv, t, d = k.shape
    # The updated lengths are new (unbacked) sizes: as expressions of the input sizes (Max, floor
    # division) every contiguity check on them would add a guard that the next call breaks.
    ctx = torch.library.get_ctx()
    nqk, nfk, nqv, nfv = (ctx.new_dynamic_size() for _ in range(4))
    torch._check(nqk % group == 0)
    ks = stream_shapes((b, hkv), d, bits, group, -2, nqk, nfk)
    vs = stream_shapes((b, 1), hkv * d, bits, group, -1, nqv, nfv)
    k_out = [q.new_empty(s, dtype=dt) for s, dt in zip(ks, stream_dtypes(k_fp.dtype), strict=True)]
    v_out = [q.new_empty(s, dtype=dt) for s, dt in zip(vs, stream_dtypes(v_fp.dtype), strict=True)]
    return (q.new_empty(q.shape), *k_out, *v_out)
