"""Blockwise attention on CPU from pieces that the fast flash kernel runs, merged by log-sum-exp.

PyTorch's CPU flash kernel is about twice as fast per score as SDPA with an explicit mask, but it
only knows "no mask" and top-left "causal". Sliding-window and routed (Q-sparse) attention are
split into such pieces; each piece returns its output and log-sum-exp, and ``merge`` combines
them exactly: out = sum_i exp(lse_i - m) out_i / sum_i exp(lse_i - m).

Used only for forward passes without autograd (the ops' CPU implementations run under no_grad);
differentiable callers use the plain SDPA paths. Float32, float16 and bfloat16 on CPU.

Workaround (2025-11, torch 2.13): ``aten._scaled_dot_product_flash_attention_for_cpu`` is the
private op behind SDPA's CPU flash path, used here because it returns the log-sum-exp that the
public SDPA call drops. Remove when a public attention call returns it (FlexAttention's
``return_lse`` also does, but needs torch.compile on CPU).
"""

from __future__ import annotations

import torch

from condfx.ops._masks import visible

_FLASH = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def usable(*tensors: torch.Tensor) -> bool:
    """True when the flash pieces may run: CPU, a supported dtype, no autograd involved."""
    if _FLASH is None or torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return False
    return all(t.device.type == "cpu" and t.dtype in _DTYPES for t in tensors)


def attend_lse(q, k, v, scale: float, *, causal: bool = False, keep: torch.Tensor | None = None):
    """Attention of q (B, H, L, D) over k, v (B, Hkv, S, D) with its log-sum-exp.

    Args:
        q, k, v: queries and keys/values (H % Hkv == 0).
        scale: score multiplier.
        causal: top-left causal mask (row r sees keys <= r).
        keep: optional (L, S) bool mask, True = visible (every row must see at least one key).

    Returns:
        (out (B, H, L, D), lse (B, H, L) float32).
    """
    b, h, n, d = q.shape
    g = h // k.shape[1]
    if g > 1 and causal:
        k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)  # (B, H, S, D)
        g = 1
    mask = None
    if keep is not None:
        mask = torch.zeros(keep.shape, dtype=q.dtype).masked_fill_(~keep, float("-inf"))  # (L, S)
        mask = mask.repeat(g, 1) if g > 1 else mask
    qf = q.reshape(b, k.shape[1], g * n, d) if g > 1 else q  # fold the query group into rows
    out, lse = _FLASH(qf, k, v, 0.0, causal, attn_mask=mask, scale=scale)
    return out.reshape(b, h, n, d), lse.reshape(b, h, n)


def merge(parts) -> torch.Tensor:
    """Combines [(out_i (B, H, L, D), lse_i (B, H, L)), ...] over disjoint key sets."""
    if len(parts) == 1:
        return parts[0][0]
    m = torch.stack([lse for _, lse in parts]).amax(0)  # (B, H, L)
    num = den = 0
    for out, lse in parts:
        w = torch.exp(lse - m).unsqueeze(-1)  # (B, H, L, 1)
        num = num + w * out.float()
        den = den + w
    return (num / den).to(parts[0][0].dtype)


def window_attention(q, k, v, scale: float, window: int) -> torch.Tensor:
    """Causal sliding-window attention, T == S, in blocks of ``window - 1`` queries.

    Each block attends to its own keys (top-left causal) and to the ``window - 1`` keys before it,
    which, with rows and keys reversed, is again top-left causal; a last partial block uses a mask.
    K/V heads are repeated and the reversed copies made once for the whole sequence.
    """
    t, c = q.shape[2], window - 1
    g = q.shape[1] // k.shape[1]
    if g > 1:
        k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)  # (B, H, S, D)
    q_r, k_r, v_r = q.flip(2), k.flip(2), v.flip(2)  # position p is row t - 1 - p
    outs = []
    for t0 in range(0, t, c):
        t1 = min(t, t0 + c)
        qb = q[:, :, t0:t1]  # (B, H, c, D)
        parts = [attend_lse(qb, k[:, :, t0:t1], v[:, :, t0:t1], scale, causal=True)]
        lo = max(0, t0 - c)
        if t0 > 0 and t1 - t0 == c and t0 - lo == c:
            r0, r1 = t - t1, t - t0  # the block's rows, reversed
            out, lse = attend_lse(q_r[:, :, r0:r1], k_r[:, :, t - t0 : t - lo], v_r[:, :, t - t0 : t - lo],
                                  scale, causal=True)
            parts.append((out.flip(2), lse.flip(2)))
        elif t0 > 0:
            # keys lo..t0-1 precede every row (causal holds); every row sees key t0 - 1, since a
            # row i of the block has i - window < t0 - 1
            keep = visible(torch.arange(t0, t1), torch.arange(lo, t0), window)  # (c', t0 - lo)
            parts.append(attend_lse(qb, k[:, :, lo:t0], v[:, :, lo:t0], scale, keep=keep))
        outs.append(merge(parts))
    return torch.cat(outs, dim=2)


def routed_rows(qb, kb, vb, pos: torch.Tensor, scale: float) -> torch.Tensor:
    """Causal attention for compact queries qb (1, H, N, D) at sorted absolute positions ``pos``:
    keys before the first position are visible to every row (no mask); the rest use a mask."""
    p0, p1 = int(pos[0]), int(pos[-1]) + 1
    keep = visible(pos, torch.arange(p0, p1))  # (N, p1 - p0)
    parts = [attend_lse(qb, kb[:, :, p0:p1], vb[:, :, p0:p1], scale, keep=keep)]
    if p0 > 0:
        parts.append(attend_lse(qb, kb[:, :, :p0], vb[:, :, :p0], scale))
    return merge(parts)


def _band_mask(c: int, dtype) -> torch.Tensor:
    """(c, 2c) additive mask of a window of c + 1 keys for a query block of c rows reading the
    block before it and its own: row r reads keys r .. r + c."""
    r, m = torch.arange(c)[:, None], torch.arange(2 * c)[None, :]
    keep = (m >= r) & (m <= r + c)
    return torch.zeros(keep.shape, dtype=dtype).masked_fill_(~keep, float("-inf"))


def banded_lse(q, k, v, scale: float, window: int):
    """Causal sliding-window attention, T == S, window >= 2, with its log-sum-exp; a handful of
    flash calls per K/V head, none per query block.

    Query blocks of c = window - 1 rows read their own block and the one before it: 2c keys under
    one (c, 2c) band mask shared by every block. For each K/V head one call covers all full blocks
    after the first: the G query heads sharing it are the call's batch (a view, no copy), its
    blocks the call's heads, the keys an overlapping strided view (block i starts c rows after
    block i - 1; stride 0 across the G heads), so no query, key or value is copied or repeated.
    The first block (causal over its own keys) and a trailing partial block take one call each.
    Returns (out (B, H, T, D), lse (B, H, T) float32).
    """
    b, h, t, d = q.shape
    hkv, c = k.shape[1], window - 1
    g = h // hkv
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    out = q.new_empty(q.shape)
    lse = torch.empty(b, h, t, dtype=torch.float32)
    nb, rest = divmod(t, c)
    band = _band_mask(c, q.dtype)
    for i in range(b):
        for j in range(hkv):
            hs = slice(j * g, (j + 1) * g)
            qh, kh, vh = q[i, hs], k[i, j : j + 1], v[i, j : j + 1]  # (G, T, D), (1, S, D)
            head = [(0, min(c, t), 0)]  # (first row, end row, first key) of each piece
            if rest and nb:
                head.append((nb * c, t, (nb - 1) * c))
            for r0, r1, k0 in head:  # the first block and the trailing partial one
                keep = torch.arange(k0, r1)[None, :] <= torch.arange(r0, r1)[:, None]
                keep &= torch.arange(k0, r1)[None, :] > torch.arange(r0, r1)[:, None] - window
                mask = torch.zeros(keep.shape, dtype=q.dtype).masked_fill_(~keep, float("-inf"))
                kv = [x[None, :, k0:r1].expand(1, g, -1, d) for x in (kh, vh)]  # stride 0 over G
                o, lse_part = _FLASH(qh[None, :, r0:r1], *kv, 0.0, False, attn_mask=mask, scale=scale)
                out[i, hs, r0:r1], lse[i, hs, r0:r1] = o[0], lse_part[0]
            if nb > 1:  # full blocks 1 .. nb - 1, one call
                rows = qh[:, c : nb * c].view(g, nb - 1, c, d)
                kv = [x.as_strided((g, nb - 1, 2 * c, d), (0, c * d, d, 1)) for x in (kh, vh)]
                o, lse_part = _FLASH(rows, *kv, 0.0, False, attn_mask=band, scale=scale)
                out[i, hs, c : nb * c] = o.view(g, (nb - 1) * c, d)
                lse[i, hs, c : nb * c] = lse_part.reshape(g, (nb - 1) * c)
    return out, lse
