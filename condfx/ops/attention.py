"""``condfx::attention``: causal (optionally sliding-window) multi-head attention with GQA.

Semantics (the contract every lowering must match):
    q (B, H, T, D), k (B, Hkv, S, D), v (B, Hkv, S, D), H % Hkv == 0, T <= S.
    The query block is aligned to the END of the keys: query i sits at absolute position
    ``pos = S - T + i`` and attends to keys ``j <= pos``; with ``window > 0`` also ``j > pos - window``.
    T == S is ordinary causal prefill; T == 1 is one decode step over a cache of S keys.
    Query head h reads key/value head ``h // (H // Hkv)`` (GQA); repeated heads are never materialised.
    out (B, H, T, D) = softmax(q @ k^T * scale + mask) @ v.
    Optional score options (``_scores.py``; defaults off, so older calls keep their meaning):
    ``softcap`` (c * tanh(s / c) before masking, Gemma2), ``alibi_slopes`` (H slopes: + m_h * (j - pos),
    Bloom / MPT / Falcon), ``sinks`` ((H,) learned logits: an extra softmax column with no value, GPT-OSS).

This module holds the three parts that live in ``condfx/ops`` (DESIGN.md "Custom ops are the contract"):
    * ``attention_reference``: the eager reference in plain PyTorch (CPU; chunked over queries so
      T = S = 2048 at small head counts stays within a few hundred MB). Tests and lowerings are
      checked against it.
    * ``attention_sdpa``: what the op runs on CPU: the same semantics through
      ``F.scaled_dot_product_attention`` (``enable_gqa``, explicit mask when T < S or windowed), so a
      fused model runs the kernel its unfused original ran.
    * the fake implementation (``register_fake``), so export, compile and shape propagation see through it.
    * autograd (``register_autograd``), whose backward is a second opaque op ``condfx::attention_backward``
      so a traced backward stays one node with a symbolic-shape-safe fake.

Backend lowerings do not live here; they are in codegen/:
    * ``codegen/onnx/attention.py``: the ``condfx``-domain ONNX node plus an ONNX local function whose
      body is ``attention_reference`` decomposed into standard ops.
    * ``codegen/triton/attention.py``: ``_attention_fwd_kernel`` / ``attention_fwd`` registered for CUDA
      (``torch.library.register_kernel("condfx::attention", "cuda", ...)``), tested on CPU with
      ``TRITON_INTERPRET=1`` against ``attention_reference``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from condfx.ops import _flash_cpu
from condfx.ops._masks import causal_window_mask
from condfx.ops._scores import check_options, has_options, scores_block, softmax_with_sinks

# Upper bound on the elements of one (B, H, chunk, S) score block in the reference: 2**24 floats = 64 MiB.
_SCORE_BLOCK_ELEMENTS = 1 << 24


def _is_static(*dims) -> bool:
    return all(isinstance(d, int) for d in dims)


def check_attention_shapes(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int, softcap: float = 0.0,
                           alibi_slopes: Sequence[float] | None = None, sinks: torch.Tensor | None = None) -> None:
    """Raises ValueError when q, k, v, window or the score options do not form a valid ``condfx::attention`` call.

    Symbolic dimensions (under export) are only checked where the check cannot add a guard.

    Args:
        q: (B, H, T, D) queries.
        k: (B, Hkv, S, D) keys.
        v: (B, Hkv, S, D) values.
        window: sliding-window size; 0 means no window.
        softcap, alibi_slopes, sinks: the score options (``_scores.check_options``).

    Raises:
        ValueError: a rank, head count, head dim, length or dtype mismatch, a negative window, or an
            option that does not fit the head count.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            msg = f"condfx.attention: {name} must be 4-D (B, heads, length, head_dim); got shape {tuple(t.shape)}."
            raise ValueError(msg)
    if not (q.dtype == k.dtype == v.dtype):
        msg = f"condfx.attention: q, k, v must share one dtype; got {q.dtype}, {k.dtype}, {v.dtype}."
        raise ValueError(msg)
    if window < 0:
        msg = f"condfx.attention: window must be >= 0 (0 = no window); got {window}."
        raise ValueError(msg)
    h, t, d = q.shape[1], q.shape[2], q.shape[3]
    hkv, s = k.shape[1], k.shape[2]
    if _is_static(h, hkv) and (hkv == 0 or h % hkv != 0):
        msg = f"condfx.attention: query heads H={h} must be a multiple of key/value heads Hkv={hkv}."
        raise ValueError(msg)
    if _is_static(d, k.shape[3], v.shape[3]) and not d == k.shape[3] == v.shape[3]:
        msg = f"condfx.attention: head dim must match; got q {d}, k {k.shape[3]}, v {v.shape[3]}."
        raise ValueError(msg)
    if _is_static(*k.shape, *v.shape) and tuple(k.shape) != tuple(v.shape):
        msg = f"condfx.attention: k and v must have one shape; got {tuple(k.shape)} and {tuple(v.shape)}."
        raise ValueError(msg)
    if _is_static(q.shape[0], k.shape[0]) and q.shape[0] != k.shape[0]:
        msg = f"condfx.attention: q and k batch sizes differ: {q.shape[0]} vs {k.shape[0]}."
        raise ValueError(msg)
    if _is_static(t, s) and t > s:
        msg = f"condfx.attention: query length T={t} must be <= key length S={s} (queries align to the end)."
        raise ValueError(msg)
    check_options(h, softcap, alibi_slopes, sinks)


def _chunk_len(b: int, h: int, t: int, s: int) -> int:
    return max(1, min(t, _SCORE_BLOCK_ELEMENTS // max(1, b * h * s)))


def _probs(qg, kg, t0, t1, t, s, scale, window, softcap=0.0, alibi_slopes=None, sinks=None):
    """(probabilities, sink probabilities or None, d scores / d u or None) for query rows [t0, t1):
    (B, Hkv, G, c, S) in float32 or float64 (see ``_scores`` for the options)."""
    acc = torch.float64 if qg.dtype == torch.float64 else torch.float32
    u = (qg[..., t0:t1, :].to(acc) @ kg.to(acc).transpose(-1, -2)) * scale  # (B, Hkv, G, c, S)
    keep = causal_window_mask(t, s, window, qg.device, rows=(t0, t1))  # (c, S)
    if not has_options(softcap, alibi_slopes, sinks):
        return torch.softmax(u.masked_fill(~keep, float("-inf")), dim=-1), None, None
    pos = torch.arange(t0, t1, device=qg.device) + (s - t)  # (c,) absolute query positions
    scores, dsdu = scores_block(u, keep, pos, softcap, alibi_slopes)
    p, p_sink = softmax_with_sinks(scores, sinks)
    return p, p_sink, dsdu


def attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    window: int = 0,
    softcap: float = 0.0,
    alibi_slopes: Sequence[float] | None = None,
    sinks: torch.Tensor | None = None,
) -> torch.Tensor:
    """Eager reference for ``condfx::attention`` (see the module docstring for the semantics).

    Differentiable by ordinary autograd. Scores and softmax run in float32 (float64 for float64
    inputs); the result is cast back to q's dtype.

    Args:
        q: (B, H, T, D) queries.
        k: (B, Hkv, S, D) keys, before any head repetition.
        v: (B, Hkv, S, D) values.
        scale: multiplier of q @ k^T, usually D ** -0.5.
        window: 0 for full causal attention, else keys within the last ``window`` positions.
        softcap: 0 for none, else c in ``c * tanh(scores / c)``.
        alibi_slopes: None, or one ALiBi slope per query head.
        sinks: None, or (H,) sink logits.

    Returns:
        (B, H, T, D) attention output.

    Raises:
        ValueError: the shapes or options are inconsistent (see ``check_attention_shapes``).
    """
    check_attention_shapes(q, k, v, window, softcap, alibi_slopes, sinks)
    b, h, t, d = q.shape
    hkv, s = k.shape[1], k.shape[2]
    qg = q.reshape(b, hkv, h // hkv, t, d)  # (B, Hkv, G, T, D)
    kg, vg = k.unsqueeze(2), v.unsqueeze(2)  # (B, Hkv, 1, S, D)
    step = _chunk_len(b, h, t, s)
    outs = []
    for t0 in range(0, t, step):
        t1 = min(t, t0 + step)
        p = _probs(qg, kg, t0, t1, t, s, scale, window, softcap, alibi_slopes, sinks)[0]  # (B, Hkv, G, c, S)
        outs.append((p @ vg.to(p.dtype)).to(q.dtype))  # (B, Hkv, G, c, D)
    return torch.cat(outs, dim=3).reshape(b, h, t, d)


def attention_backward_reference(
    grad: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    window: int = 0,
    softcap: float = 0.0,
    alibi_slopes: Sequence[float] | None = None,
    sinks: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Gradients of ``attention_reference`` w.r.t. q, k, v (and sinks), recomputing the probabilities per chunk.

    dV = P^T dO; dP = dO V^T; dS = P * (dP - rowsum(dP * P)); dQ = scale dS K; dK = scale dS^T Q,
    with dK and dV summed over the G query heads that share a key/value head. A softcap multiplies dS
    by 1 - tanh^2; a sink column has dP = 0, so d sink = -sum over rows of P_sink * rowsum(dP * P).

    Args:
        grad: (B, H, T, D) gradient of the output.
        q, k, v, scale, window, softcap, alibi_slopes, sinks: the forward arguments.

    Returns:
        (dq, dk, dv, dsinks) with the shapes and dtypes of q, k, v and sinks (dsinks None without sinks).
    """
    b, h, t, d = q.shape
    hkv, s = k.shape[1], k.shape[2]
    g = h // hkv
    qg = q.reshape(b, hkv, g, t, d)  # (B, Hkv, G, T, D)
    gg = grad.reshape(b, hkv, g, t, d)  # (B, Hkv, G, T, D)
    kg, vg = k.unsqueeze(2), v.unsqueeze(2)  # (B, Hkv, 1, S, D)
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    dq_parts = []
    dk = torch.zeros(b, hkv, s, d, dtype=acc, device=q.device)
    dv = torch.zeros_like(dk)
    dsink = torch.zeros(hkv, g, dtype=acc, device=q.device)
    for t0 in range(0, t, _chunk_len(b, h, t, s)):
        t1 = min(t, t0 + _chunk_len(b, h, t, s))
        p, p_sink, dsdu = _probs(qg, kg, t0, t1, t, s, scale, window, softcap, alibi_slopes, sinks)
        go = gg[..., t0:t1, :].to(acc)  # (B, Hkv, G, c, D)
        dv += (p.transpose(-1, -2) @ go).sum(dim=2)
        dp = go @ vg.to(acc).transpose(-1, -2)  # (B, Hkv, G, c, S)
        row = (dp * p).sum(dim=-1, keepdim=True)  # (B, Hkv, G, c, 1)
        ds = p * (dp - row)
        if p_sink is not None:
            dsink -= (p_sink * row).sum(dim=(0, 3, 4))
        if dsdu is not None:
            ds = ds * dsdu
        ds = ds * scale
        dq_parts.append(ds @ kg.to(acc))  # (B, Hkv, G, c, D)
        dk += (ds.transpose(-1, -2) @ qg[..., t0:t1, :].to(acc)).sum(dim=2)
    dq = torch.cat(dq_parts, dim=3).reshape(b, h, t, d)
    dsinks = dsink.reshape(h).to(sinks.dtype) if sinks is not None else None
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dsinks


def attention_sdpa(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, window: int = 0
) -> torch.Tensor:
    """The same semantics through ``F.scaled_dot_product_attention`` (the op's CPU implementation).

    Models rewritten by ``fuse-attention`` mostly called SDPA before the rewrite; running the same
    kernel keeps them bit-for-bit where the original was causal prefill, which matters at 30 layers
    (the chunked reference drifts by ~5e-5 in the logits of SmolLM2 through float32 rounding).
    ``enable_gqa`` lets SDPA index K/V heads instead of the caller repeating them.
    """
    check_attention_shapes(q, k, v, window)
    t, s = q.shape[2], k.shape[2]
    gqa = q.shape[1] != k.shape[1]
    if t == s and window == 0:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
    if 0 < window and t > 2 * window:
        return _windowed_blocks(q, k, v, scale, window)
    mask = causal_window_mask(t, s, window, q.device)  # (T, S)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)


def _windowed_blocks(q, k, v, scale: float, window: int) -> torch.Tensor:
    """Sliding-window attention in query blocks of ``window`` rows, each reading only the keys
    its rows can see (at most 2 * window - 1), so the work is O(T * window), not O(T * S)."""
    t, s = q.shape[2], k.shape[2]
    if t == s and window > 1 and _flash_cpu.usable(q, k, v):
        return _flash_cpu.window_attention(q, k, v, scale, window)
    gqa = q.shape[1] != k.shape[1]
    outs = []
    for t0 in range(0, t, window):
        t1 = min(t, t0 + window)
        lo = max(0, s - t + t0 - window + 1)  # first key the block's first row sees
        hi = s - t + t1  # one past the block's last row position
        keep = causal_window_mask(t, s, window, q.device, rows=(t0, t1))[:, lo:hi]  # (c, hi - lo)
        outs.append(F.scaled_dot_product_attention(
            q[:, :, t0:t1], k[:, :, lo:hi], v[:, :, lo:hi], attn_mask=keep, scale=scale, enable_gqa=gqa
        ))  # (B, H, c, D)
    return torch.cat(outs, dim=2)


@torch.library.custom_op("condfx::attention", mutates_args=())
def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    window: int = 0,
    softcap: float = 0.0,
    alibi_slopes: list[float] | None = None,
    sinks: torch.Tensor | None = None,
) -> torch.Tensor:
    """``torch.ops.condfx.attention``: see the module docstring. Runs ``attention_sdpa``, or the
    reference when a score option is set."""
    with torch.no_grad():
        if has_options(softcap, alibi_slopes, sinks):
            return attention_reference(q, k, v, scale, window, softcap, alibi_slopes, sinks).contiguous()
        return attention_sdpa(q, k, v, scale, window).contiguous()


@attention.register_fake
def _attention_fake(q, k, v, scale, window=0, softcap=0.0, alibi_slopes=None, sinks=None):
    check_attention_shapes(q, k, v, window, softcap, alibi_slopes, sinks)
    return q.new_empty(q.shape)


@torch.library.custom_op("condfx::attention_backward", mutates_args=())
def attention_backward(
    grad: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    window: int = 0,
    softcap: float = 0.0,
    alibi_slopes: list[float] | None = None,
    sinks: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``torch.ops.condfx.attention_backward``: (dq, dk, dv) of ``condfx::attention``."""
    return attention_backward_reference(grad.contiguous(), q, k, v, scale, window, softcap, alibi_slopes, sinks)[:3]


@attention_backward.register_fake
def _attention_backward_fake(grad, q, k, v, scale, window=0, softcap=0.0, alibi_slopes=None, sinks=None):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


@torch.library.custom_op("condfx::attention_sinks_backward", mutates_args=())
def attention_sinks_backward(
    grad: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    window: int,
    softcap: float,
    alibi_slopes: list[float] | None,
    sinks: torch.Tensor,
) -> torch.Tensor:
    """``torch.ops.condfx.attention_sinks_backward``: d sinks of ``condfx::attention`` ((H,), sinks' dtype)."""
    return attention_backward_reference(grad.contiguous(), q, k, v, scale, window, softcap, alibi_slopes, sinks)[3]


@attention_sinks_backward.register_fake
def _attention_sinks_backward_fake(grad, q, k, v, scale, window, softcap, alibi_slopes, sinks):
    return sinks.new_empty(sinks.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, scale, window, softcap, alibi_slopes, sinks = inputs
    ctx.save_for_backward(q, k, v, sinks)
    ctx.options = (scale, window, softcap, alibi_slopes)


def _backward(ctx, grad):
    q, k, v, sinks = ctx.saved_tensors
    scale, window, softcap, slopes = ctx.options
    dq, dk, dv = torch.ops.condfx.attention_backward(grad, q, k, v, scale, window, softcap, slopes, sinks)
    dsinks = None
    if sinks is not None and ctx.needs_input_grad[7]:
        dsinks = torch.ops.condfx.attention_sinks_backward(grad, q, k, v, scale, window, softcap, slopes, sinks)
    return dq, dk, dv, None, None, None, None, dsinks


attention.register_autograd(_backward, setup_context=_setup_context)
