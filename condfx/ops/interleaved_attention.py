"""``condfx::interleaved_attention``: attention over the interleaved pseudo-token sequence of IHA.

Interleaved Head Attention (IHA, TECHNIQUES.md section 2) gives every token P pseudo-tokens per head.
The work splits between the graph and this op so that ``fold-interleave`` can fold the mixing:

    in the graph (``interleave-heads``), linear in learned ``nn.Parameter``s:
        mix      q~[b,h,t,p] = sum_m alpha_q[m,h,p] q[b,m,t]   (alpha_k, alpha_v within the KV heads)
        layout   (B, H, T, P, D) -> (B, H, T*P, D): row t*P + p is pseudo-token p of token t
        collapse o[b,h,t] = sum_p R[h,p] o~[b,h,t,p]   (per-head)  or  sum_{m,p} R[h,m,p] o~[b,m,t,p]
    in this op, what is not linear in learned weights:
        RoPE at virtual positions, the interleaved causal mask (flat or token-level), the window,
        softmax attention with GQA.

Semantics (the contract every lowering must match):
    q (B, H, T*P, D), k (B, Hkv, S*P, D), v (B, Hkv, S*P, D): pseudo q/k/v *before* RoPE,
    interleaved; H % Hkv == 0, T <= S. inv_freq (D/2,) float32: RoPE frequencies, half-split
    rotation (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin); all zeros = no rotation.
    Query row i has absolute index a = (S - T)*P + i (queries align to the end of the keys, as in
    ``condfx::attention``); key row j has index j. RoPE position of an index x:
        token_positions False: x (the virtual position t*P + p of the paper)
        token_positions True:  x // P (all pseudo-tokens of a token share its position)
    Key j is visible to query a when:
        token_causal False (flat): j <= a, and j > a - window when window > 0
        token_causal True:         j // P <= a // P, and j // P > a // P - window / P when window > 0
    window is in interleaved units and a multiple of P. out (B, H, T*P, D) = softmax(rope(q) rope(k)^T
    * scale + mask) @ v.
    With P = 1, token_positions irrelevant, and the model's inv_freq this is ``condfx::attention``
    after RoPE.

Parts here: ``interleaved_attention_reference`` (eager, plain PyTorch, differentiable), the op (runs
the reference), its fake, and autograd through a second opaque op
``condfx::interleaved_attention_backward`` (the written-out gradient, ``interleaved_attention_backward_reference``). The ONNX lowering
is ``codegen/onnx/interleaved_attention.py``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from condfx.ops._masks import causal_window_mask, visible


def _static(*dims) -> bool:
    return all(isinstance(d, int) for d in dims)


def check_interleaved_shapes(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, inv_freq: torch.Tensor, pseudo: int, window: int
) -> None:
    """Raises ValueError when the arguments do not form a valid ``condfx::interleaved_attention`` call.

    Args:
        q: (B, H, T*P, D) pseudo queries before RoPE.
        k: (B, Hkv, S*P, D) pseudo keys before RoPE.
        v: (B, Hkv, S*P, D) pseudo values.
        inv_freq: (D/2,) RoPE frequencies.
        pseudo: P, pseudo-tokens per token.
        window: window in interleaved units, 0 for none.

    Raises:
        ValueError: bad ranks, head counts, lengths, P or window.
    """
    if not isinstance(pseudo, int) or pseudo < 1:
        msg = f"condfx.interleaved_attention: pseudo (P) must be an int >= 1; got {pseudo!r}."
        raise ValueError(msg)
    if window < 0 or window % pseudo:
        msg = f"condfx.interleaved_attention: window must be >= 0 and a multiple of P={pseudo}; got {window}."
        raise ValueError(msg)
    if any(t.dim() != 4 for t in (q, k, v)):
        msg = "condfx.interleaved_attention: q, k, v must be 4-D (B, heads, length*P, head_dim)."
        raise ValueError(msg)
    h, hkv, d = q.shape[1], k.shape[1], q.shape[3]
    if _static(h, hkv) and (hkv == 0 or h % hkv):
        msg = f"condfx.interleaved_attention: query heads H={h} must be a multiple of key/value heads Hkv={hkv}."
        raise ValueError(msg)
    if _static(d) and (d % 2 or tuple(inv_freq.shape) != (d // 2,)):
        msg = f"condfx.interleaved_attention: inv_freq must have shape (D/2,) = ({d // 2},); got {tuple(inv_freq.shape)}."
        raise ValueError(msg)
    for name, t in (("q", q), ("k", k)):
        if _static(t.shape[2]) and t.shape[2] % pseudo:
            msg = f"condfx.interleaved_attention: {name} length {t.shape[2]} is not a multiple of P={pseudo}."
            raise ValueError(msg)
    if _static(q.shape[2], k.shape[2]) and q.shape[2] > k.shape[2]:
        msg = f"condfx.interleaved_attention: query length {q.shape[2]} exceeds key length {k.shape[2]}."
        raise ValueError(msg)


def rope_half(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """Half-split RoPE of x (..., L, D) at float ``positions`` (L,) with frequencies (D/2,)."""
    angles = positions.to(torch.float32).unsqueeze(1) * inv_freq.to(torch.float32).unsqueeze(0)
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)  # (L, D/2)
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def interleaved_visible(
    t_len: int, s_len: int, pseudo: int, window: int, token_causal: bool, device=None
) -> torch.Tensor:
    """(T*P, S*P) bool mask, True where query row i may read key row j (module docstring)."""
    if not token_causal:
        return causal_window_mask(t_len, s_len, window, device)
    a = torch.arange(t_len, device=device) + (s_len - t_len)  # (T*P,) absolute rows
    j = torch.arange(s_len, device=device)  # (S*P,)
    return visible(a // pseudo, j // pseudo, window // pseudo)  # causal over tokens


def _positions(length: int, total: int, pseudo: int, token_positions: bool, device) -> torch.Tensor:
    idx = torch.arange(length, device=device) + (total - length)
    return idx // pseudo if token_positions else idx


def interleaved_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    inv_freq: torch.Tensor,
    scale: float,
    pseudo: int,
    window: int = 0,
    token_causal: bool = False,
    token_positions: bool = False,
) -> torch.Tensor:
    """Eager reference for ``condfx::interleaved_attention`` (see the module docstring).

    Differentiable by ordinary autograd; scores and softmax in float32 (float64 for float64 inputs).

    Returns:
        (B, H, T*P, D) attention output in q's dtype.
    """
    check_interleaved_shapes(q, k, v, inv_freq, pseudo, window)
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    tl, sl = q.shape[2], k.shape[2]
    qr = rope_half(q.to(acc), _positions(tl, sl, pseudo, token_positions, q.device), inv_freq)
    kr = rope_half(k.to(acc), _positions(sl, sl, pseudo, token_positions, q.device), inv_freq)
    mask = interleaved_visible(tl, sl, pseudo, window, token_causal, q.device)  # (T*P, S*P)
    gqa = q.shape[1] != k.shape[1]
    out = F.scaled_dot_product_attention(
        qr, kr, v.to(acc), attn_mask=mask, scale=scale, enable_gqa=gqa
    )  # (B, H, T*P, D)
    return out.to(q.dtype)


def interleaved_attention_backward_reference(
    grad, q, k, v, inv_freq, scale, pseudo, window=0, token_causal=False, token_positions=False
):
    """Gradients w.r.t. q, k, v, written out (a custom op's kernel runs below autograd).

    With qr, kr the rotated q, k and P the probabilities: dV = P^T dO; dS = P * (dP - rowsum(dP * P))
    with dP = dO V^T; dqr = scale dS kr; dkr = scale dS^T qr; RoPE is a rotation, so dq and dk are
    dqr and dkr rotated back by the negative angles. dK and dV are summed over each KV head's queries.
    """
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    b, h, tl, d = q.shape
    hkv, sl = k.shape[1], k.shape[2]
    g = h // hkv
    qpos = _positions(tl, sl, pseudo, token_positions, q.device)
    kpos = _positions(sl, sl, pseudo, token_positions, q.device)
    qr = rope_half(q.to(acc), qpos, inv_freq).reshape(b, hkv, g, tl, d)  # (B, Hkv, G, T*P, D)
    kr = rope_half(k.to(acc), kpos, inv_freq).unsqueeze(2)  # (B, Hkv, 1, S*P, D)
    vg = v.to(acc).unsqueeze(2)  # (B, Hkv, 1, S*P, D)
    keep = interleaved_visible(tl, sl, pseudo, window, token_causal, q.device)
    probs = torch.softmax(((qr @ kr.transpose(-1, -2)) * scale).masked_fill(~keep, float("-inf")), -1)
    go = grad.to(acc).reshape(b, hkv, g, tl, d)
    dv = (probs.transpose(-1, -2) @ go).sum(2)  # (B, Hkv, S*P, D)
    dp = go @ vg.transpose(-1, -2)
    ds = probs * (dp - (dp * probs).sum(-1, keepdim=True)) * scale
    dqr = (ds @ kr).reshape(b, h, tl, d)
    dkr = (ds.transpose(-1, -2) @ qr).sum(2)
    dq = rope_half(dqr, qpos, -inv_freq)
    dk = rope_half(dkr, kpos, -inv_freq)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


@torch.library.custom_op("condfx::interleaved_attention", mutates_args=())
def interleaved_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    inv_freq: torch.Tensor,
    scale: float,
    pseudo: int,
    window: int = 0,
    token_causal: bool = False,
    token_positions: bool = False,
) -> torch.Tensor:
    """``torch.ops.condfx.interleaved_attention``: see the module docstring."""
    with torch.no_grad():
        return interleaved_attention_reference(
            q, k, v, inv_freq, scale, pseudo, window, token_causal, token_positions
        ).contiguous()


@interleaved_attention.register_fake
def _interleaved_attention_fake(q, k, v, inv_freq, scale, pseudo, window=0, token_causal=False,
                                token_positions=False):
    check_interleaved_shapes(q, k, v, inv_freq, pseudo, window)
    return q.new_empty(q.shape)


@torch.library.custom_op("condfx::interleaved_attention_backward", mutates_args=())
def interleaved_attention_backward(
    grad: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    inv_freq: torch.Tensor,
    scale: float,
    pseudo: int,
    window: int = 0,
    token_causal: bool = False,
    token_positions: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) of ``condfx::interleaved_attention``; see ``interleaved_attention_backward_reference``."""
    return interleaved_attention_backward_reference(
        grad.contiguous(), q, k, v, inv_freq, scale, pseudo, window, token_causal, token_positions
    )


@interleaved_attention_backward.register_fake
def _interleaved_attention_backward_fake(grad, q, k, v, inv_freq, scale, pseudo, window=0,
                                         token_causal=False, token_positions=False):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, inv_freq, *rest = inputs
    ctx.save_for_backward(q, k, v, inv_freq)
    ctx.rest = rest


def _backward(ctx, grad):
    q, k, v, inv_freq = ctx.saved_tensors
    dq, dk, dv = torch.ops.condfx.interleaved_attention_backward(grad, q, k, v, inv_freq, *ctx.rest)
    return dq, dk, dv, None, None, None, None, None, None


interleaved_attention.register_autograd(_backward, setup_context=_setup_context)
