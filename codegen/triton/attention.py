"""Triton forward kernels for ``condfx::attention`` (causal / sliding-window attention with GQA) and
``condfx::routed_attention`` (the same kernel reading compact routed queries' positions).

Provenance:
    FlashAttention-2 forward (Dao, 2023, https://arxiv.org/abs/2307.08691) as laid out in Triton's
    fused-attention tutorial (triton-lang/triton ``python/tutorials/06-fused-attention.py``), with
    the file layout of Dao-AILab/flash-attention ``flash_attn/flash_attn_triton.py``. Written for
    condfx, not copied: one program owns BLOCK_M query rows of one (batch, head), streams BLOCK_N
    keys at a time, and keeps an online softmax (running max ``m_i``, running sum ``l_i``) in fp32.

Supported:
    * q (B, H, T, D), k/v (B, Hkv, S, D) in float32, float16 or bfloat16; D in {16, 32, 64, 128}.
    * Causal masking with the query block aligned to the END of the keys (query i sits at absolute
      position S - T + i), so T == S is prefill and T < S is decode / chunked prefill; any T and S
      (masked loads, no padding to a block multiple).
    * Sliding window (``window > 0``: keys j with pos - window < j <= pos).
    * GQA: query head h reads key/value head h // (H // Hkv) by pointer arithmetic; K/V heads are
      indexed, never repeated in memory.
    * Arbitrary strides (all four strides of every tensor are passed), so transposed or sliced
      inputs need no copy.
    * Routed queries (``routed_attention_fwd``, constexpr ``HAS_POS``): the query rows are a compact,
      position-sorted subset, and each row's absolute position is loaded from ``Pos`` instead of
      derived from its index; a block streams keys up to its last row's position only.

Caveats:
    * Forward only; ``condfx::attention``'s backward stays on the eager reference.
    * Numerics tested in the Triton interpreter (``TRITON_INTERPRET=1``) on CPU only, with BLOCK
      sizes 16. It has NOT yet run or been timed on a GPU; it does compile to PTX/cubin without one
      (sm_90 fp16 in the tests; fp16/fp32 on sm_90 and bf16 on sm_80, D 16..128, by hand). The
      default GPU block sizes below are the tutorial's usual choices, untuned (see the benchmark).
    * float32 uses ``input_precision="ieee"`` dots (exact but slow on tensor-core GPUs).
    * In the interpreter, bfloat16 dots run in fp32 (``DOT_FP32``; Triton issue #11584), so the
      native bf16 tensor-core dot is only exercised on a GPU.
    * The grid's second axis is B * H, so B * H must be <= 65535, and row/column offsets inside one
      (batch, head) slice are int32 (batch and head offsets are int64); ``is_supported`` checks
      both.

Differences from the tutorial kernel:
    * The query block is end-aligned (T <= S) instead of T == S, and a sliding window is supported.
    * Key blocks fully outside [first visible key of the block's first row, last row's position]
      are skipped by the loop bounds, but every visited block is masked (no separate unmasked
      "diagonal" stage), which costs a few extra ``where``s on fully visible blocks.
    * Rows that have seen no visible key yet keep ``m_i = -inf`` and use 0 as their shift, instead
      of a finite mask value, so results are exact for windowed rows whose first blocks are empty.
    * No log-sum-exp output (no backward) and no autotuning; ``_launch_config`` picks block sizes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from triton.runtime.jit import JITFunction

from condfx.ops._masks import causal_window_mask

_LOG2E = 1.4426950408889634  # exp(x) == exp2(x * log2(e))
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_HEAD_DIMS = (16, 32, 64, 128)
_MAX_GRID_Y = 65535  # CUDA limit on the second grid dimension, which holds B * H


@triton.jit
def _attention_fwd_inner(
    acc, l_i, m_i, q,  # (BLOCK_M, HEAD_DIM), (BLOCK_M,), (BLOCK_M,), (BLOCK_M, HEAD_DIM)
    k_base, v_base, stride_kt, stride_kd, stride_vt, stride_vd,
    pos_m, first_m, kv_len, qk_scale, lo, hi,
    BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    DOT_FP32: tl.constexpr,
):
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    for start_n in range(lo, hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        cols = start_n + offs_n  # (BLOCK_N,) key positions
        in_range = cols < kv_len
        k_ptrs = k_base + cols[None, :] * stride_kt + offs_d[:, None] * stride_kd
        k = tl.load(k_ptrs, mask=in_range[None, :], other=0.0)  # (HEAD_DIM, BLOCK_N)
        if DOT_FP32:
            k = k.to(tl.float32)
        qk = tl.dot(q, k, input_precision=INPUT_PRECISION)  # (BLOCK_M, BLOCK_N)
        qk = qk * qk_scale  # log2 units: qk_scale = scale * log2(e), so exp2 replaces exp
        keep = (cols[None, :] <= pos_m[:, None]) & (cols[None, :] >= first_m[:, None])
        keep = keep & in_range[None, :]  # (BLOCK_M, BLOCK_N)
        qk = tl.where(keep, qk, float("-inf"))
        # online softmax: m_new = max(m_i, rowmax(qk)); old sums are rescaled by 2^(m_i - m_new)
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        # a row with no visible key yet has m_new = -inf; shifting by 0 keeps p = alpha = 0, not NaN
        m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(qk - m_shift[:, None])  # (BLOCK_M, BLOCK_N)
        alpha = tl.math.exp2(m_i - m_shift)  # (BLOCK_M,)
        l_i = l_i * alpha + tl.sum(p, 1)
        v_ptrs = v_base + cols[:, None] * stride_vt + offs_d[None, :] * stride_vd
        v = tl.load(v_ptrs, mask=in_range[:, None], other=0.0)  # (BLOCK_N, HEAD_DIM)
        p = p.to(v.dtype)  # P @ V runs in the input dtype, as in FlashAttention
        if DOT_FP32:
            p, v = p.to(tl.float32), v.to(tl.float32)
        acc = acc * alpha[:, None]
        acc = tl.dot(p, v, acc, input_precision=INPUT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _attention_fwd_kernel(
    Q, K, V, Out,
    stride_qb, stride_qh, stride_qt, stride_qd,
    stride_kb, stride_kh, stride_kt, stride_kd,
    stride_vb, stride_vh, stride_vt, stride_vd,
    stride_ob, stride_oh, stride_ot, stride_od,
    Pos, stride_pb, stride_pt,
    n_heads, q_len, kv_len, group_size, window, qk_scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, DOT_FP32: tl.constexpr, HAS_POS: tl.constexpr,
):
    start_m = tl.program_id(0)
    off_bh = tl.program_id(1)
    off_b = (off_bh // n_heads).to(tl.int64)
    off_h = (off_bh % n_heads).to(tl.int64)
    off_hkv = off_h // group_size  # GQA: index the shared K/V head, never repeat it
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)  # (BLOCK_M,) query rows
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < q_len
    if HAS_POS:
        # compact routed queries: each row's absolute position is read, sorted, -1 on padding rows
        # (which then see no key and are stored as 0)
        pos_m = tl.load(Pos + off_b * stride_pb + offs_m * stride_pt, mask=row_ok, other=-1)
    else:
        pos_m = offs_m + (kv_len - q_len)  # absolute positions: queries align to the end of the keys
    # first visible key per row (pos - window + 1, or 0 without a window), hoisted out of the loop
    first_m = tl.where(window > 0, pos_m - window + 1, 0)  # (BLOCK_M,)

    q_ptrs = Q + off_b * stride_qb + off_h * stride_qh
    q_ptrs = q_ptrs + offs_m[:, None] * stride_qt + offs_d[None, :] * stride_qd
    q = tl.load(q_ptrs, mask=row_ok[:, None], other=0.0)  # (BLOCK_M, HEAD_DIM)
    if DOT_FP32:
        q = q.to(tl.float32)
    k_base = K + off_b * stride_kb + off_hkv * stride_kh
    v_base = V + off_b * stride_vb + off_hkv * stride_vh

    # keys this block can see: [first row's window start, last valid row's position]
    if HAS_POS:
        first_pos = tl.min(tl.where(row_ok & (pos_m >= 0), pos_m, kv_len), 0)
        hi = tl.max(pos_m, 0) + 1
    else:
        first_pos = start_m * BLOCK_M + (kv_len - q_len)
        hi = tl.minimum(start_m * BLOCK_M + BLOCK_M, q_len) + (kv_len - q_len)
    lo = tl.where(window > 0, tl.maximum(first_pos - window + 1, 0), 0)
    lo = (lo // BLOCK_N) * BLOCK_N

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    acc, l_i, m_i = _attention_fwd_inner(
        acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_kd, stride_vt, stride_vd,
        pos_m, first_m, kv_len, qk_scale, lo, hi,
        BLOCK_N, HEAD_DIM, INPUT_PRECISION, DOT_FP32,
    )
    # every valid row sees at least its own key, so l_i > 0 there; padded rows are never stored
    acc = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]

    o_ptrs = Out + off_b * stride_ob + off_h * stride_oh
    o_ptrs = o_ptrs + offs_m[:, None] * stride_ot + offs_d[None, :] * stride_od
    tl.store(o_ptrs, acc.to(Out.dtype.element_ty), mask=row_ok[:, None])


@dataclass(frozen=True)
class _LaunchConfig:
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    input_precision: str
    dot_fp32: bool


def is_interpreted() -> bool:
    """Whether the kernel was decorated under ``TRITON_INTERPRET=1`` (runs on CPU tensors).

    Returns:
        True when ``_attention_fwd_kernel`` is an interpreter function rather than a compiled one.
    """
    return not isinstance(_attention_fwd_kernel, JITFunction)


def _launch_config(dtype: torch.dtype, head_dim: int, block_m: int | None, block_n: int | None):
    """Block sizes and launch options; explicit ``block_m`` / ``block_n`` override the defaults."""
    precision = "ieee" if dtype == torch.float32 else "tf32"  # tf32 is the no-op default for fp16
    # Workaround (2026-11-22): the Triton 3.9 interpreter multiplies the raw uint16 bit patterns in
    # a bfloat16 tl.dot (https://github.com/triton-lang/triton/issues/11584, "not supported yet"),
    # so interpreted bf16 runs its dots in fp32. Remove once the interpreter converts bf16 operands.
    dot_fp32 = is_interpreted() and dtype == torch.bfloat16
    if is_interpreted():
        default_m, default_n, warps, stages = 16, 16, 1, 1
    elif dtype == torch.float32:
        default_m, default_n, warps, stages = 64, 32, 4, 2
    else:
        default_m, default_n, warps, stages = 128, 64, 4 if head_dim <= 64 else 8, 3
    bm = default_m if block_m is None else block_m
    bn = default_n if block_n is None else block_n
    for name, value in (("block_m", bm), ("block_n", bn)):
        if value < 16 or value & (value - 1):
            msg = f"attention_fwd: {name} must be a power of two >= 16; got {value}."
            raise ValueError(msg)
    return _LaunchConfig(bm, bn, warps, stages, precision, dot_fp32)


def _shape_reason(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> str:
    """Empty string when the shapes and dtypes are supported, else why not."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        ranks = f"{q.dim()}, {k.dim()}, {v.dim()}"
        return f"q, k, v must be 4-D (B, heads, length, head_dim); got ranks {ranks}"
    if not q.dtype == k.dtype == v.dtype:
        return f"q, k, v must share one dtype; got {q.dtype}, {k.dtype}, {v.dtype}"
    if q.dtype not in _DTYPES:
        return f"dtype must be one of float32, float16, bfloat16; got {q.dtype}"
    if tuple(k.shape) != tuple(v.shape):
        return f"k and v must have one shape; got {tuple(k.shape)} and {tuple(v.shape)}"
    (b, h, t, d), (bk, hkv, s, dk) = q.shape, k.shape
    if d != dk or d not in _HEAD_DIMS:
        return f"head dim must be one of {_HEAD_DIMS} and equal in q, k, v; got q {d}, k/v {dk}"
    if b != bk:
        return f"q and k batch sizes differ: {b} vs {bk}"
    if hkv == 0 or h % hkv:
        return f"query heads H={h} must be a multiple of key/value heads Hkv={hkv}"
    if t > s:
        return f"query length T={t} must be <= key length S={s} (queries align to the end)"
    if b * h > _MAX_GRID_Y:
        return f"B * H must be <= {_MAX_GRID_Y} (grid limit); got {b * h}"
    span = max(x.shape[2] * x.stride(2) + x.shape[3] * x.stride(3) for x in (q, k, v))
    if span >= 2**31:
        return f"a (batch, head) slice must span < 2**31 elements (int32 offsets); got {span}"
    return ""


def is_supported(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[bool, str]:
    """Whether ``attention_fwd`` can run these inputs, and the reason when it cannot.

    Args:
        q: (B, H, T, D) queries.
        k: (B, Hkv, S, D) keys.
        v: (B, Hkv, S, D) values.

    Returns:
        ``(True, "")`` when supported, else ``(False, reason)`` with a one-sentence reason.
    """
    if not all(isinstance(x, torch.Tensor) for x in (q, k, v)):
        return False, "q, k, v must be torch.Tensor objects."
    reason = _shape_reason(q, k, v)
    if reason:
        return False, f"condfx triton attention: {reason}."
    if not q.device == k.device == v.device:
        devices = f"{q.device}, {k.device}, {v.device}"
        return False, f"condfx triton attention: q, k, v must be on one device; got {devices}."
    wanted = "cpu" if is_interpreted() else "cuda"
    if q.device.type != wanted:
        mode = "the Triton interpreter (TRITON_INTERPRET=1)" if is_interpreted() else "the kernel"
        return False, f"condfx triton attention: {mode} needs {wanted} tensors; got {q.device}."
    return True, ""


def attention_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    window: int = 0,
    *,
    block_m: int | None = None,
    block_n: int | None = None,
) -> torch.Tensor:
    """Runs ``_attention_fwd_kernel``: the ``condfx::attention`` forward on one device.

    Args:
        q: (B, H, T, D) queries, any strides.
        k: (B, Hkv, S, D) keys, any strides; never repeated for GQA.
        v: (B, Hkv, S, D) values, any strides.
        scale: multiplier of q @ k^T, usually D ** -0.5.
        window: 0 for full causal attention, else only the last ``window`` keys up to each query.
        block_m: query rows per program (power of two >= 16); None picks a default.
        block_n: keys per inner step (power of two >= 16); None picks a default.

    Returns:
        (B, H, T, D) contiguous output in q's dtype.

    Raises:
        ValueError: the inputs are not supported (see ``is_supported``), the window is negative,
            or a block size is not a power of two >= 16.
    """
    ok, reason = is_supported(q, k, v)
    if not ok:
        raise ValueError(reason)
    if window < 0:
        msg = f"attention_fwd: window must be >= 0 (0 = no window); got {window}."
        raise ValueError(msg)
    return _launch(q, k, v, scale, window, None, _launch_config(q.dtype, q.shape[3], block_m, block_n))


def _launch(q, k, v, scale, window, pos, cfg: _LaunchConfig) -> torch.Tensor:
    """Launches ``_attention_fwd_kernel`` on checked inputs; ``pos`` (B, T) int32 or None."""
    b, h, t, d = q.shape
    hkv, s = k.shape[1], k.shape[2]
    out = torch.empty((b, h, t, d), dtype=q.dtype, device=q.device)  # (B, H, T, D)
    if out.numel() == 0:
        return out
    if pos is None:  # the dummy pointer must live on the kernel's device
        pos_args = (torch.empty(1, dtype=torch.int32, device=q.device), 0, 0)
    else:
        pos_args = (pos, *pos.stride())
    grid = (triton.cdiv(t, cfg.block_m), b * h)
    _attention_fwd_kernel[grid](
        q, k, v, out,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        *pos_args,
        h, t, s, h // hkv, int(window), float(scale) * _LOG2E,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, HEAD_DIM=d, INPUT_PRECISION=cfg.input_precision,
        DOT_FP32=cfg.dot_fp32, HAS_POS=pos is not None,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return out


def routed_attention_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    route: torch.Tensor,
    scale: float,
    *,
    block_m: int | None = None,
    block_n: int | None = None,
) -> torch.Tensor:
    """The ``condfx::routed_attention`` forward: full causal attention for routed queries only.

    The routed rows of each batch row are compacted (``nonzero``, position order) and padded to the
    longest batch row with position -1; the kernel reads each compact row's absolute position, so a
    block of compact queries streams keys only up to its last routed position (work about N x S / 2
    for N routed queries, never T x S). Padding rows see no key. The result is scattered into zeros.

    Args:
        q: (B, H, T, D) queries; k, v: (B, Hkv, S, D), T <= S, queries end-aligned to the keys.
        route: (B, T) bool, True where the query attends.
        scale: multiplier of q @ k^T.
        block_m / block_n: as in ``attention_fwd``.

    Returns:
        (B, H, T, D) in q's dtype: attention on routed rows, exactly 0 elsewhere.

    Raises:
        ValueError: unsupported inputs (see ``is_supported``) or a route that is not (B, T) bool.
    """
    ok, reason = is_supported(q, k, v)
    if not ok:
        raise ValueError(reason)
    b, h, t, d = q.shape
    if route.dtype != torch.bool or tuple(route.shape) != (b, t):
        msg = f"routed_attention_fwd: route must be a ({b}, {t}) bool tensor; got {route.dtype} {tuple(route.shape)}."
        raise ValueError(msg)
    counts = route.sum(dim=1)  # (B,)
    n = int(counts.max()) if b else 0
    out = torch.zeros_like(q)  # (B, H, T, D)
    if n == 0:
        return out
    # stable sort puts routed rows first, in position order: (B, T) row indices
    order = torch.sort((~route).to(torch.int8), dim=1, stable=True).indices[:, :n]  # (B, N)
    valid = torch.arange(n, device=q.device)[None, :] < counts[:, None]  # (B, N)
    pos = torch.where(valid, order + (k.shape[2] - t), -1).to(torch.int32)  # (B, N) absolute
    gather = order[:, None, :, None].expand(b, h, n, d)  # (B, H, N, D)
    qc = torch.gather(q, 2, gather)  # (B, H, N, D) compact queries
    cfg = _launch_config(q.dtype, d, block_m, block_n)
    oc = _launch(qc, k, v, scale, 0, pos, cfg)  # (B, H, N, D), exactly 0 on padding rows
    # padding rows point at distinct unrouted rows (order is a permutation) and carry 0 there
    return out.scatter_(2, gather, oc)


def attention_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, window: int = 0
) -> torch.Tensor:
    """Dense masked-softmax reference for the kernel, in plain torch (float32 math).

    Args:
        q: (B, H, T, D) queries.
        k: (B, Hkv, S, D) keys.
        v: (B, Hkv, S, D) values.
        scale: multiplier of q @ k^T.
        window: 0 for full causal attention, else the sliding-window size.

    Returns:
        (B, H, T, D) output in q's dtype.
    """
    b, h, t, d = q.shape
    hkv, s = k.shape[1], k.shape[2]
    qg = q.float().reshape(b, hkv, h // hkv, t, d)  # (B, Hkv, G, T, D)
    scores = qg @ k.float().unsqueeze(2).transpose(-1, -2) * scale  # (B, Hkv, G, T, S)
    keep = causal_window_mask(t, s, window, q.device)  # (T, S)
    probs = torch.softmax(scores.masked_fill(~keep, -math.inf), dim=-1)  # (B, Hkv, G, T, S)
    out = probs @ v.float().unsqueeze(2)  # (B, Hkv, G, T, D)
    return out.reshape(b, h, t, d).to(q.dtype)


def _attention_cuda(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, window: int = 0,
    softcap: float = 0.0, alibi_slopes: list[float] | None = None, sinks: torch.Tensor | None = None,
) -> torch.Tensor:
    """CUDA kernel of ``condfx::attention``: Triton when supported, else the eager reference (always for
    the score options softcap / alibi_slopes / sinks, which the kernel does not implement)."""
    plain = not softcap and alibi_slopes is None and sinks is None
    if plain and is_supported(q, k, v)[0] and window >= 0:
        return attention_fwd(q, k, v, scale, window)
    from condfx.ops import attention_reference as ops_reference

    return ops_reference(q, k, v, scale, window, softcap, alibi_slopes, sinks)


def _routed_attention_cuda(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, route: torch.Tensor, scale: float,
    softcap: float = 0.0, alibi_slopes: list[float] | None = None, sinks: torch.Tensor | None = None,
) -> torch.Tensor:
    """CUDA kernel of ``condfx::routed_attention``: Triton when supported, else the eager reference."""
    plain = not softcap and alibi_slopes is None and sinks is None
    if plain and is_supported(q, k, v)[0]:
        return routed_attention_fwd(q, k, v, route, scale)
    from condfx.ops.routed_attention import routed_attention_reference

    return routed_attention_reference(q, k, v, route, scale, softcap, alibi_slopes, sinks)


def register():
    """Registers the CUDA kernels of ``torch.ops.condfx.attention`` (``attention_fwd``) and
    ``torch.ops.condfx.routed_attention`` (``routed_attention_fwd``).

    Unsupported inputs (e.g. head dim 80, float64 or a score option) fall back to the op's eager
    reference. Calling it again re-registers the same functions. Not called at import time.

    Returns:
        The registered ``condfx::attention`` function,
        ``(q, k, v, scale, window=0, softcap=0.0, alibi_slopes=None, sinks=None) -> out``.
    """
    import condfx.ops  # noqa: F401  (defines condfx::attention and condfx::routed_attention)

    torch.library.register_kernel("condfx::attention", "cuda", _attention_cuda)
    torch.library.register_kernel("condfx::routed_attention", "cuda", _routed_attention_cuda)
    return _attention_cuda
