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

import math

import torch

from condfx.ops.kv_quant import check_quant_args, quantized_cache_attention_sdpa
from condfx.ops.quant_stream import stream_append, stream_dtypes, stream_shapes, stream_step


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


class Workspace:
    """Reusable buffers for the packed reads: a decode step asks for the same shapes every time, and
    fresh multi-megabyte tensors cost page faults on every call (the allocator returns them)."""

    def __init__(self):
        self.buffers: dict = {}

    def get(self, name: str, shape, dtype, device) -> torch.Tensor:
        """A flat buffer of at least ``shape``'s elements (a quarter more when it grows), viewed to ``shape``."""
        shape = tuple(int(s) for s in shape)
        buf = self.buffers.get(name)
        numel = math.prod(shape)
        if buf is None or buf.numel() < numel or buf.dtype != dtype or buf.device != torch.device(device):
            buf = torch.empty(max(numel, 1) * 5 // 4, dtype=dtype, device=device)  # room for growth
            self.buffers[name] = buf
        return buf[:numel].view(shape)


_WORKSPACE = Workspace()


# A byte of 8 / bits codes unpacks to that many float32 values, i.e. one element of a dtype of
# 4 * 8 / bits bytes: the lookup table holds all 256 bytes as such elements (2 bits: complex128,
# 4 bits: int64), so one ``index_select`` unpacks every byte (plain element copies, exact bits).
_TABLE_DTYPES = {2: torch.complex128, 4: torch.int64}
_TABLES: dict = {}


def code_table(bits: int, device) -> torch.Tensor:
    """(256,) table whose element ``b`` is the codes of byte ``b`` as float32 values, code ``i``
    (bits ``bits * i`` upwards) first: a byte's codes in channel order (``pack_codes``)."""
    key = (bits, str(device))
    if key not in _TABLES:
        byte = torch.arange(256, dtype=torch.int32).unsqueeze(1)
        shifts = torch.arange(0, 8, bits, dtype=torch.int32)
        values = ((byte >> shifts) & ((1 << bits) - 1)).float()  # (256, 8 / bits)
        _TABLES[key] = values.view(_TABLE_DTYPES[bits]).reshape(256).to(device)
    return _TABLES[key]


def _unpacked_chunks(codes: torch.Tensor, bits: int, rows: int, name: str, workspace: Workspace):
    """Yields (start, float32 codes) for ``rows`` rows of ``codes`` (R, W) at a time, each unpacked
    by one table gather into the same small buffer (it stays in the core's cache for the matmul
    that reads it)."""
    n, w = int(codes.shape[0]), int(codes.shape[1])
    table = code_table(bits, codes.device)
    index = workspace.get(name + ".chunk_index", (min(rows, n) * w,), torch.int32, codes.device)
    buf = workspace.get(name + ".chunk", (min(rows, n) * w,), table.dtype, codes.device)
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        chunk, at = buf[: (r1 - r0) * w], index[: (r1 - r0) * w]
        torch.index_select(table, 0, at.copy_(codes[r0:r1].reshape(-1)), out=chunk)
        yield r0, chunk.view(torch.float32).view(r1 - r0, w * 8 // bits)


# Rows unpacked per chunk: about 512 KiB of float32 codes for SmolLM2's 64-wide K groups and
# 192-wide V tokens, so a chunk is still in the core's L2 cache when its matmul reads it.
_CHUNK_BYTES = 1 << 19


def kivi_attend(q, k_codes, k_scale, k_zero, k_fp, v_codes, v_scale, v_zero, v_fp,
                scale: float, bits: int, group: int, workspace: Workspace = _WORKSPACE) -> torch.Tensor:
    """One query token's attention over a KIVI cache (no sink), read from the packed codes.

    q (B, H, 1, D); the K stream (B, Hkv, ., D) per channel and the V stream (B, ., Hkv * D) per
    token, as ``KIVICache`` holds them (2 or 4 bits). The float K/V is never materialised: the
    codes are read in chunks of about 512 KiB of float32 (``_unpacked_chunks``: one gather from a
    256-entry table per chunk, channel order, into one reused buffer that stays in the L2 cache),
        keys   a chunk of whole token groups is dequantized in place (codes * s_k + z_k, per group
               and channel) and scored by one matmul with the K/V head's queries;
        values the per-token scale and zero point are folded into the probabilities,
               out = sum_n (p_n s_v[n, g]) codes_n[g] + sum_n p_n z_v[n, g], one batched matmul
               per chunk over the value groups.
    Returns (B, H, 1, D) float32.
    """
    b, h, _, d = q.shape
    hkv = k_fp.shape[1]
    if not (d % group == 0 and group % (8 // bits) == 0):  # value groups within a head: the fold below
        msg = f"kivi_attend needs the value group to divide the head dim {d}; got group {group}."
        raise ValueError(msg)
    rep, nk = h // hkv, int(k_codes.shape[2])
    qs = q.float().reshape(b, hkv, rep, d) * scale  # (B, Hkv, R, D)
    nf = int(k_fp.shape[2])
    scores = workspace.get("scores", (b, hkv, rep, nk + nf), torch.float32, q.device)
    scales, zeros = k_scale.float(), k_zero.float()  # (B, Hkv, ng, D)
    step = max(1, _CHUNK_BYTES // (4 * group * d)) * group  # tokens per chunk, whole groups
    for i in range(b):
        for j in range(hkv):
            for t0, keys in _unpacked_chunks(k_codes[i, j], bits, step, "k", workspace):
                n, g0, g1 = keys.shape[0], t0 // group, (t0 + keys.shape[0]) // group
                grouped = keys.view(n // group, group, d)  # dequantized in the cached chunk, in place
                torch.addcmul(zeros[i, j, g0:g1, None], grouped, scales[i, j, g0:g1, None], out=grouped)
                torch.mm(qs[i, j], keys.t(), out=scores[i, j, :, t0 : t0 + n])
    torch.matmul(qs, k_fp.float().transpose(2, 3), out=scores[..., nk:])  # the tail's scores
    p = torch.softmax(scores, -1)  # (B, Hkv, R, N)
    nv, gh = int(v_codes.shape[1]), d // group  # V quantizes per token: its own count; gh groups a head
    pt = p[..., :nv]  # (B, Hkv, R, Nv)
    vs = v_scale.float().view(b, nv, hkv, gh).permute(0, 2, 3, 1)  # (B, Hkv, gh, Nv)
    vz = v_zero.float().view(b, nv, hkv, gh).permute(0, 2, 1, 3)  # (B, Hkv, Nv, gh)
    weights = (pt.unsqueeze(2) * vs.unsqueeze(3)).reshape(b, hkv * gh, rep, nv)  # P' = p * s_v
    out_q = q.new_zeros(b, hkv * gh, rep, group, dtype=torch.float32)  # (B, Hkv * gh, R, g)
    step = max(1, _CHUNK_BYTES // (4 * hkv * d))  # tokens per chunk
    for i in range(b):
        for t0, values in _unpacked_chunks(v_codes[i], bits, step, "v", workspace):
            rows = values.view(-1, hkv * gh, group).transpose(0, 1)  # (Hkv * gh, n, g)
            out_q[i].baddbmm_(weights[i, :, :, t0 : t0 + rows.shape[1]], rows)
    out_q = out_q.view(b, hkv, gh, rep, group) + (pt @ vz).transpose(2, 3).unsqueeze(-1)
    out_q = out_q.transpose(2, 3).reshape(b, hkv, rep, d)
    v_tail = v_fp.float().view(b, -1, hkv, d).transpose(1, 2)  # (B, Hkv, Nf, D)
    out = out_q + p[..., nv:] @ v_tail  # (B, Hkv, R, D)
    return out.reshape(b, h, 1, d)


def _reads_packed(q, k, v, bits: int, group: int, window: int, sink: int) -> bool:
    """True for a decode step ``kivi_attend`` computes: one token, no window or sink, 2 or 4
    bits, value groups within a head."""
    _check(q, k, v, bits, group)
    d = int(q.shape[3])
    return (int(q.shape[2]) == 1 and window == 0 and sink == 0 and bits in (2, 4)
            and d % group == 0 and group % (8 // bits) == 0)


def _decode_step(q, k, v, k_codes, k_scale, k_zero, k_fp, v_codes, v_scale, v_zero, v_fp,
                 scale: float, bits: int, group: int, residual: int):
    """One decode step read from the packed codes: the query attends over the stream with the
    step's token added to the full-precision tail (tokens packed before the step are read
    quantized, the rest in full precision, as the reference's t == 1 case), then the token is
    appended to both streams (``stream_append``: no dequantize pass)."""
    b, hkv, t, d = k.shape
    rows = v.transpose(1, 2).reshape(b, 1, t, hkv * d)  # (B, 1, 1, Hkv * D)
    k_out = stream_append(k_codes, k_scale, k_zero, k_fp, k, bits, group, -2, residual, 0)  # checks the streams
    v_out = stream_append(v_codes, v_scale, v_zero, v_fp, rows, bits, group, -1, residual, 0)
    k_tail = torch.cat([k_fp, k.to(k_fp.dtype)], 2)
    v_tail = torch.cat([v_fp, rows.to(v_fp.dtype)], 2)
    if int(k_codes.shape[2]) + int(k_tail.shape[2]) != int(v_codes.shape[2]) + int(v_tail.shape[2]):
        msg = (f"condfx.kivi_cache_attention: the K stream holds {k_codes.shape[2] + k_fp.shape[2]} tokens "
               f"but the V stream {v_codes.shape[2] + v_fp.shape[2]}; both must hold the same past.")
        raise ValueError(msg)
    out = kivi_attend(q, k_codes, k_scale, k_zero, k_tail, v_codes[:, 0], v_scale[:, 0], v_zero[:, 0],
                      v_tail[:, 0], scale, bits, group).to(q.dtype)
    return tuple(o.contiguous() for o in (out, *k_out, *v_out))


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
        if _reads_packed(q, k, v, bits, group, window, sink):
            return _decode_step(q, k, v, k_codes, k_scale, k_zero, k_fp, v_codes, v_scale, v_zero, v_fp,
                                scale, bits, group, residual)
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
