"""Triton kernel for the quantized-cache read path: dequantize packed low-bit rows and project them,
``Y = dequant(codes, scale, zero) @ W``, in one pass (XQuant's K/V rematerialisation, X̂ · B).

Provenance: written for condfx from the storage format of ``condfx/ops/kv_quant.py`` (asymmetric
min/max, float16 scale and zero per ``GROUP`` channels of a token, codes packed little-endian bit by
bit along the channels). The tiling is the plain blocked-GEMM layout of Triton's matmul tutorial;
the A-operand tile loader is replaced by a loader that unpacks codes and dequantizes in registers,
so the full-precision X̂ never exists in memory.

Supported:
    * codes (N, C * BITS / 8) uint8, scale / zero (N, C / GROUP) float16 (per-token groups, dim -1),
      W (C, M) float32 / float16; Y (N, M) float32. BITS in {2, 3, 4}; C a multiple of GROUP and
      C * BITS a multiple of 8. 3-bit codes that straddle two bytes are read as a 16-bit window.
    * Any N, M (masked tiles); BLOCK_K is a multiple of GROUP or GROUP a multiple of BLOCK_K.

Caveats:
    * Tested in the Triton interpreter (``TRITON_INTERPRET=1``) on CPU at small shapes only; not yet
      run or timed on a GPU. Block sizes are untuned defaults.
    * Per-channel groups (KIVI keys, dim -2) are not handled here; dequantize them first.

Differences from the reference (``dequantize_reference`` then ``@``): the sum over C runs in
BLOCK_K-wide fp32 tiles, so results agree to float32 rounding, not bit for bit.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _dequant_project_fwd_kernel(
    codes_ptr, scale_ptr, zero_ptr, w_ptr, y_ptr,
    N, M, C, stride_cn, stride_sn, stride_wc, stride_yn,
    BITS: tl.constexpr, GROUP: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_n, pid_m = tl.program_id(0), tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # (BLOCK_N,)
    cols = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # (BLOCK_M,)
    row_ok, col_ok = rows < N, cols < M
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    mask_bits = (1 << BITS) - 1
    n_bytes = C * BITS // 8
    for k0 in range(0, C, BLOCK_K):
        ch = k0 + tl.arange(0, BLOCK_K)  # (BLOCK_K,) channels of this tile
        ch_ok = ch < C
        bit = ch * BITS
        byte, shift = bit // 8, bit % 8
        ok = row_ok[:, None] & ch_ok[None, :]
        base = codes_ptr + rows[:, None] * stride_cn
        lo = tl.load(base + byte[None, :], mask=ok, other=0).to(tl.int32)  # (BLOCK_N, BLOCK_K)
        hi = tl.load(base + byte[None, :] + 1, mask=ok & (byte[None, :] + 1 < n_bytes), other=0)
        word = lo | (hi.to(tl.int32) << 8)  # a 3-bit code may straddle two bytes
        code = ((word >> shift[None, :]) & mask_bits).to(tl.float32)
        grp = ch // GROUP
        s = tl.load(scale_ptr + rows[:, None] * stride_sn + grp[None, :], mask=ok, other=0.0)
        z = tl.load(zero_ptr + rows[:, None] * stride_sn + grp[None, :], mask=ok, other=0.0)
        x = code * s.to(tl.float32) + z.to(tl.float32)  # (BLOCK_N, BLOCK_K) dequantized X̂
        x = tl.where(ok, x, 0.0)
        w_ok = ch_ok[:, None] & col_ok[None, :]
        w = tl.load(w_ptr + ch[:, None] * stride_wc + cols[None, :], mask=w_ok, other=0.0)
        acc += tl.dot(x, w.to(tl.float32), input_precision="ieee")  # (BLOCK_N, BLOCK_M)
    out = y_ptr + rows[:, None] * stride_yn + cols[None, :]
    tl.store(out, acc, mask=row_ok[:, None] & col_ok[None, :])


def dequant_project_reference(codes, scale, zero, weight, bits: int, group: int) -> torch.Tensor:
    """Y = dequantize(codes, scale, zero) @ weight in float32 (the eager reference)."""
    from condfx.ops.kv_quant import dequantize_reference

    channels = weight.shape[0]
    x = dequantize_reference(codes, scale, zero, bits, group, -1, channels)
    return x @ weight.float()


def dequant_project_fwd(
    codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, weight: torch.Tensor,
    bits: int, group: int, block_n: int = 16, block_m: int = 16, block_k: int = 16,
) -> torch.Tensor:
    """Launches ``_dequant_project_fwd_kernel``: (N, C*bits/8) codes × (C, M) weight → (N, M) fp32.

    Raises:
        ValueError: bits, group or shapes outside the supported set (see the module docstring).
    """
    n, c = codes.shape[0], weight.shape[0]
    if bits not in (2, 3, 4) or c % group or (c * bits) % 8 or codes.shape[1] != c * bits // 8:
        msg = (
            f"dequant_project_fwd: need bits in (2, 3, 4), group dividing C={c} and codes of "
            f"C*bits/8 bytes per row; got bits={bits}, group={group}, codes {tuple(codes.shape)}."
        )
        raise ValueError(msg)
    if scale.shape != (n, c // group) or zero.shape != scale.shape:
        msg = f"dequant_project_fwd: scale and zero must be ({n}, {c // group}); got {tuple(scale.shape)}."
        raise ValueError(msg)
    codes, scale, zero, weight = (t.contiguous() for t in (codes, scale, zero, weight))
    y = torch.empty((n, weight.shape[1]), dtype=torch.float32, device=codes.device)
    grid = (triton.cdiv(n, block_n), triton.cdiv(weight.shape[1], block_m))
    _dequant_project_fwd_kernel[grid](
        codes, scale, zero, weight, y, n, weight.shape[1], c,
        codes.stride(0), scale.stride(0), weight.stride(0), y.stride(0),
        BITS=bits, GROUP=group, BLOCK_N=block_n, BLOCK_M=block_m, BLOCK_K=block_k,
    )
    return y
