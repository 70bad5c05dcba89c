"""Triton kernels for ``condfx::masked_ffn``: gather the executed rows, gate/up/down, scatter back.

Provenance: written for condfx from the op's contract (``condfx/ops/masked_ffn.py``) and the
gather → GEMM → scatter design of TECHNIQUES.md §3.4/§4.4; a plain blocked GEMM (one program per
BLOCK_M x BLOCK_N output tile, a K loop of ``tl.dot``), not copied from a library.

Two launches over the N executed rows (their indices come from one host-side ``nonzero``):
    1. ``_gate_up_kernel``: for a tile of rows r and hidden columns f,
       h[r, f] = act(x[idx[r]] · Wg[f] + bg[f]) * (x[idx[r]] · Wu[f] + bu[f])   (GATED)
              or act(x[idx[r]] · Wu[f] + bu[f])                                  (GELU MLP)
       reading the x rows through ``idx`` (the gather is the load itself, no copy of x);
    2. ``_down_scatter_kernel``: out[idx[r], c] = h[r] · Wd[c] + bd[c], stored straight into the
       zero-filled (B*T, d) update (the scatter is the store).
Weights are read through their strides, so "out_in" (nn.Linear) and "in_out" (Conv1D) layouts
need no transposed copy. The cosine output is computed on the host from the update (``row_cosine``),
as in the reference. When no row executes, nothing is launched (the update is zeros).

Supported: float32 / float16 / bfloat16 x and weights (accumulation in float32), any B, T, d, F
(masked loads), activations silu, gelu (erf), gelu_tanh. Tested in the Triton interpreter
(``TRITON_INTERPRET=1``) on CPU at small shapes against ``masked_ffn_reference``; not yet timed on
a GPU. Not done: autotuning, the fused cos epilogue, a token-masked GEMM that skips M-tiles without
the gather (DynamicPruningKernels' ``gemm_mn``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.runtime.jit import JITFunction

_ACTS = {"silu": 0, "gelu": 1, "gelu_tanh": 2}


@triton.jit
def _activate(v, ACT: tl.constexpr):
    if ACT == 0:
        out = v / (1.0 + tl.exp(-v))
    elif ACT == 1:
        out = 0.5 * v * (1.0 + tl.erf(v * 0.7071067811865476))
    else:
        inner = 0.7978845608028654 * (v + 0.044715 * v * v * v)
        out = 0.5 * v * (1.0 + (2.0 / (1.0 + tl.exp(-2.0 * inner)) - 1.0))  # tanh via exp
    return out


@triton.jit
def _gate_up_kernel(
    x_ptr, idx_ptr, wu_ptr, bu_ptr, wg_ptr, bg_ptr, h_ptr,
    n_rows, d, f,
    sx, swu_f, swu_k, swg_f, swg_k, sh,
    GATED: tl.constexpr, HAS_BU: tl.constexpr, HAS_BG: tl.constexpr, ACT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # executed-row slots
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # hidden columns
    rk = tl.arange(0, BLOCK_K)
    row_ok, col_ok = rm < n_rows, rn < f
    rows = tl.load(idx_ptr + rm, mask=row_ok, other=0).to(tl.int64)  # gather: rows of x
    acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, d, BLOCK_K):
        k = k0 + rk
        k_ok = k < d
        a = tl.load(x_ptr + rows[:, None] * sx + k[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        wu = tl.load(wu_ptr + rn[None, :] * swu_f + k[:, None] * swu_k, mask=k_ok[:, None] & col_ok[None, :],
                     other=0.0)  # (BLOCK_K, BLOCK_N)
        acc_u += tl.dot(a.to(tl.float32), wu.to(tl.float32), input_precision="ieee")
        if GATED:
            wg = tl.load(wg_ptr + rn[None, :] * swg_f + k[:, None] * swg_k,
                         mask=k_ok[:, None] & col_ok[None, :], other=0.0)
            acc_g += tl.dot(a.to(tl.float32), wg.to(tl.float32), input_precision="ieee")
    if HAS_BU:
        acc_u += tl.load(bu_ptr + rn, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    if GATED:
        if HAS_BG:
            acc_g += tl.load(bg_ptr + rn, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        h = _activate(acc_g, ACT) * acc_u
    else:
        h = _activate(acc_u, ACT)
    tl.store(h_ptr + rm[:, None] * sh + rn[None, :], h, mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _down_scatter_kernel(
    h_ptr, idx_ptr, wd_ptr, bd_ptr, out_ptr,
    n_rows, f, d,
    sh, swd_c, swd_k, so,
    HAS_BD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rc = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # output channels
    rk = tl.arange(0, BLOCK_K)
    row_ok, col_ok = rm < n_rows, rc < d
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, f, BLOCK_K):
        k = k0 + rk
        k_ok = k < f
        a = tl.load(h_ptr + rm[:, None] * sh + k[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(wd_ptr + rc[None, :] * swd_c + k[:, None] * swd_k, mask=k_ok[:, None] & col_ok[None, :],
                    other=0.0)
        acc += tl.dot(a, w.to(tl.float32), input_precision="ieee")
    if HAS_BD:
        acc += tl.load(bd_ptr + rc, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    rows = tl.load(idx_ptr + rm, mask=row_ok, other=0).to(tl.int64)  # scatter: rows of the update
    tl.store(out_ptr + rows[:, None] * so + rc[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])


def is_interpreted() -> bool:
    """Whether the kernels were decorated under ``TRITON_INTERPRET=1`` (they then run on CPU tensors)."""
    return not isinstance(_gate_up_kernel, JITFunction)


def _strides(w: torch.Tensor, layout: str) -> tuple[int, int]:
    """(stride along the output feature, stride along the input feature) of a projection weight."""
    return (w.stride(0), w.stride(1)) if layout == "out_in" else (w.stride(1), w.stride(0))


def masked_ffn_fwd(x, h_in, execute, w_up, b_up, w_gate, b_gate, w_down, b_down,
                   kind: str = "swiglu", act: str = "silu", layout: str = "out_in",
                   block_m: int = 16, block_n: int = 32, block_k: int = 32):
    """``condfx::masked_ffn`` with the Triton kernels; same arguments and outputs as the reference.

    Returns:
        (update (B, T, d) in x's dtype, cos (B, T) float32).
    """
    from condfx.ops.masked_ffn import check_masked_ffn_args, row_cosine

    check_masked_ffn_args(x, h_in, execute, w_gate, kind, act, layout)
    b, t, d = x.shape
    flat = x.reshape(b * t, d).contiguous()  # (BT, d)
    idx = execute.reshape(-1).nonzero().squeeze(1).to(torch.int32)  # (N,) executed rows
    n = idx.numel()
    f = w_up.shape[0] if layout == "out_in" else w_up.shape[1]
    out = torch.zeros(b * t, d, dtype=x.dtype, device=x.device)
    if n:  # host-side fast path: nothing executes → no launch
        gated = kind == "swiglu"
        h = torch.empty(n, f, dtype=torch.float32, device=x.device)  # (N, F) hidden, fp32
        su_f, su_k = _strides(w_up, layout)
        sg_f, sg_k = _strides(w_gate, layout) if gated else (0, 0)
        grid = (triton.cdiv(n, block_m), triton.cdiv(f, block_n))
        _gate_up_kernel[grid](
            flat, idx, w_up, b_up if b_up is not None else w_up, w_gate if gated else w_up,
            b_gate if b_gate is not None else w_up, h, n, d, f, flat.stride(0), su_f, su_k, sg_f, sg_k,
            h.stride(0), GATED=gated, HAS_BU=b_up is not None, HAS_BG=b_gate is not None, ACT=_ACTS[act],
            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        )
        sd_c, sd_k = _strides(w_down, layout)
        grid = (triton.cdiv(n, block_m), triton.cdiv(d, block_n))
        _down_scatter_kernel[grid](
            h, idx, w_down, b_down if b_down is not None else w_down, out, n, f, d, h.stride(0), sd_c, sd_k,
            out.stride(0), HAS_BD=b_down is not None, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        )
    update = out.reshape(b, t, d)
    cos = torch.where(execute, row_cosine(h_in, h_in + update), 1.0)
    return update, cos


def register():
    """Registers ``masked_ffn_fwd`` as the CUDA kernel of ``torch.ops.condfx.masked_ffn``. Not called at import."""
    import condfx.ops  # noqa: F401

    def _cuda(x, h_in, execute, w_up, b_up, w_gate, b_gate, w_down, b_down, kind="swiglu", act="silu",
              layout="out_in"):
        update, cos = masked_ffn_fwd(x, h_in, execute, w_up, b_up, w_gate, b_gate, w_down, b_down, kind, act,
                                     layout)
        return update.contiguous(), cos.contiguous()

    torch.library.register_kernel("condfx::masked_ffn", "cuda", _cuda)
    return _cuda
