"""``condfx::sink_window_attention``: sliding-window attention that always keeps the first tokens
(the attention sinks), with StreamingLLM's positions.

Semantics (the contract every lowering must match):
    q (B, H, T, D) and k (B, Hkv, S, D) after RoPE at their absolute positions, v (B, Hkv, S, D),
    positions (T,) int64: the absolute position of each query, inv_freq (D / 2,): the RoPE
    frequencies (half-split layout), H % Hkv == 0, T <= S.
    Keys: the first ``min(sink, S)`` are the sink tokens (positions 0 .. sink - 1); the others are
    contiguous and end at the last query, so the query block is aligned to the end of the keys
    (query i reads key j >= sink iff S - T + i - window < j <= S - T + i, and every sink key
    j <= S - T + i). A full sequence (S = T, positions 0 .. T - 1) and a cache trimmed to the sinks
    plus the last ``window - 1`` tokens followed by the step's tokens are both of this form.
    Positions as StreamingLLM assigns them: inside the cache, not in the text. A query at position
    p whose cache has dropped tokens sits at cache position p - d, d = max(0, p - sink - window + 1),
    while its window keys keep their distances; so the sink keys are scored against the query
    rotated back by d: (R(-d) q) . k_sink, which equals RoPE at cache positions exactly (rotations
    compose). Window keys are scored with q itself.
    out (B, H, T, D) = softmax(scores * scale + mask) @ v.

The CPU implementation attends in query blocks of ``window`` rows, each reading the sinks and the
at most 2 * window - 1 keys its rows can see, so the work is O(T * (window + sink)); the reference
builds the whole (T, S) score block (tests compare the two). Reference: StreamingLLM, "Efficient
Streaming Language Models with Attention Sinks" (arXiv 2309.17453), section 3.2 ("positions within
the cache"). The ONNX lowering is ``codegen/onnx/sink_window.py``. Autograd (q, k and v): the
backward differentiates the blocked form, recomputed from the saved inputs.
"""

from __future__ import annotations

import torch

from condfx.ops import _flash_cpu
from condfx.ops._recompute import grads_by_recompute
from condfx.ops.attention import check_attention_shapes


def check_sink_window_args(q, positions, inv_freq, sink: int, window: int) -> None:
    """Raises ValueError for arguments that do not form a ``condfx::sink_window_attention`` call."""
    if sink < 0 or window < 1:
        msg = f"condfx.sink_window_attention: sink must be >= 0 and window >= 1; got sink={sink}, window={window}."
        raise ValueError(msg)
    if positions.dim() != 1 or positions.dtype != torch.long:
        msg = (f"condfx.sink_window_attention: positions must be a 1-D int64 tensor (T,); got "
               f"{positions.dtype} of shape {tuple(positions.shape)}.")
        raise ValueError(msg)
    d = q.shape[3]
    if inv_freq.dim() != 1 or (isinstance(d, int) and 2 * inv_freq.shape[0] != d):
        msg = (f"condfx.sink_window_attention: inv_freq must be (D / 2,) = ({d // 2},); got shape "
               f"{tuple(inv_freq.shape)}.")
        raise ValueError(msg)


def sink_rotation(positions: torch.Tensor, inv_freq: torch.Tensor, sink: int, window: int):
    """(cos, sin) (T, D) of the angle d * inv_freq by which a query is rotated back for the sinks,
    d = max(0, position - sink - window + 1) (its shift from text to cache position)."""
    shift = (positions - (sink + window - 1)).clamp(min=0).to(torch.float32)  # (T,)
    angle = shift[:, None] * inv_freq.to(torch.float32)[None, :]  # (T, D/2)
    angle = torch.cat([angle, angle], -1)  # (T, D), half-split layout
    return angle.cos(), angle.sin()


def rotate_back(q: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """R(-d) q for half-split RoPE: q cos - rotate_half(q) sin, rotate_half(x) = (-x2, x1)."""
    half = q.shape[-1] // 2
    rotated = torch.cat([-q[..., half:], q[..., :half]], -1)
    return q * cos - rotated * sin


def visible(t0: int, t1: int, t: int, s: int, sink: int, window: int, device) -> torch.Tensor:
    """(t1 - t0, S) bool, True where query row i (at S - T + i, end-aligned) may read key j."""
    pos = torch.arange(t0, t1, device=device).unsqueeze(1) + (s - t)  # (c, 1)
    j = torch.arange(s, device=device).unsqueeze(0)  # (1, S)
    return (j <= pos) & ((j < sink) | (j > pos - window))


def _attend(qg, kg, vg, positions, inv_freq, scale, sink, window, t0, t1, t, s, lo, hi):
    """Output rows [t0, t1) reading the sinks and keys [lo, hi): (B, Hkv, G, c, D) in float32."""
    acc = torch.float64 if qg.dtype == torch.float64 else torch.float32
    n_sink = min(sink, lo)
    cols = torch.cat([torch.arange(n_sink), torch.arange(lo, hi)]).to(qg.device)  # kept keys
    q = qg[..., t0:t1, :].to(acc)  # (B, Hkv, G, c, D)
    k = kg[..., cols, :].to(acc)  # (B, Hkv, 1, n, D)
    scores = q @ k.transpose(-1, -2)  # (B, Hkv, G, c, n)
    if sink:
        cos, sin = sink_rotation(positions[t0:t1], inv_freq, sink, window)
        q_back = rotate_back(q, cos.to(acc), sin.to(acc))
        is_sink = cols < sink  # (n,)
        scores = torch.where(is_sink, q_back @ k.transpose(-1, -2), scores)
    keep = visible(t0, t1, t, s, sink, window, qg.device)[:, cols]  # (c, n)
    probs = torch.softmax((scores * scale).masked_fill(~keep, float("-inf")), -1)
    return probs @ vg[..., cols, :].to(acc)  # (B, Hkv, G, c, D)


def _grouped(q, k, v):
    b, h, t, d = q.shape
    hkv = k.shape[1]
    return q.reshape(b, hkv, h // hkv, t, d), k.unsqueeze(2), v.unsqueeze(2)  # (B, Hkv, G|1, ., D)


def sink_window_attention_reference(q, k, v, positions, inv_freq, scale: float, sink: int,
                                    window: int) -> torch.Tensor:
    """Eager reference (the whole (T, S) score block at once); see the module docstring."""
    check_attention_shapes(q, k, v, 0)
    check_sink_window_args(q, positions, inv_freq, sink, window)
    t, s = q.shape[2], k.shape[2]
    qg, kg, vg = _grouped(q, k, v)
    out = _attend(qg, kg, vg, positions, inv_freq, scale, sink, window, 0, t, t, s, 0, s)
    return out.to(q.dtype).reshape(q.shape)


def sink_window_attention_blocked(q, k, v, positions, inv_freq, scale: float, sink: int,
                                  window: int) -> torch.Tensor:
    """The same result in query blocks of ``window`` rows, each reading the sinks and only the keys
    its rows can see (the op's CPU implementation)."""
    check_attention_shapes(q, k, v, 0)
    check_sink_window_args(q, positions, inv_freq, sink, window)
    t, s = q.shape[2], k.shape[2]
    qg, kg, vg = _grouped(q, k, v)
    outs = []
    for t0 in range(0, t, window):
        t1 = min(t, t0 + window)
        lo = max(0, s - t + t0 - window + 1)  # first non-sink key the block's first row sees
        hi = s - t + t1
        outs.append(_attend(qg, kg, vg, positions, inv_freq, scale, sink, window, t0, t1, t, s, lo, hi))
    return torch.cat(outs, 3).to(q.dtype).reshape(q.shape)


def sink_window_attention_banded(q, k, v, positions, inv_freq, scale: float, sink: int,
                                 window: int) -> torch.Tensor:
    """The same result for a whole sequence (T == S, window >= 2, CPU flash dtypes): the window
    part in one banded flash call (``_flash_cpu.banded_lse``), the sink keys outside each row's
    window (key j < sink, j <= i - window) scored against the rotated-back queries in one small
    matmul, the two merged by log-sum-exp. Exact when the rows that hold sink keys inside their
    window are not rotated (``_banded_ok``)."""
    check_attention_shapes(q, k, v, 0)
    check_sink_window_args(q, positions, inv_freq, sink, window)
    t = q.shape[2]
    out, lse = _flash_cpu.banded_lse(q, k, v, scale, window)
    if sink == 0 or t <= window:  # every row's window already holds the sinks it may read
        return out
    b, h, _, d = q.shape
    hkv, g, n, late = k.shape[1], h // k.shape[1], min(sink, k.shape[2]), t - window
    cos, sin = sink_rotation(positions[window:], inv_freq, sink, window)  # (T', D)
    # (R(-d) q) . k = (q cos) . k + (q sin) . rot(k), rot(k) = (-k2, k1): no rotated copy of q
    ks = k[:, :, :n].float()
    half = d // 2
    kr = torch.cat([-ks[..., half:], ks[..., :half]], -1)
    qg = q[:, :, window:].float().reshape(b, hkv, g * late, d)  # (B, Hkv, G T', D)
    cos, sin = cos.repeat(g, 1), sin.repeat(g, 1)
    scores = ((qg * cos) @ ks.transpose(-1, -2) + (qg * sin) @ kr.transpose(-1, -2)) * scale
    keep = torch.arange(n)[None, :] <= torch.arange(late)[:, None]  # key j <= i - window
    scores = scores.masked_fill_(~keep.repeat(g, 1), float("-inf"))  # (B, Hkv, G T', n)
    s_lse = torch.logsumexp(scores, -1)
    w_lse = lse[:, :, window:].reshape(s_lse.shape)
    total = torch.logaddexp(w_lse, s_lse)
    probs = torch.exp(scores - total.unsqueeze(-1))  # the sinks' weights in the merged softmax
    tail = out[:, :, window:].view(b, hkv, g, late, d)  # rows >= window, in place
    tail.mul_(torch.exp(w_lse - total).view(b, hkv, g, late, 1).to(out.dtype))
    tail.add_((probs @ v[:, :, :n].float()).view(b, hkv, g, late, d).to(out.dtype))
    return out


# Shorter sequences keep the blocked path: it is fast enough there, and its one softmax per block
# stays closer to a dense model's float32 rounding than the flash pieces merged by log-sum-exp
# (whole-model tests compare logits at 1e-5; the merged form differs by about that much).
_BANDED_MIN = 1024


def _banded_ok(q, k, v, positions, sink: int, window: int) -> bool:
    """True when ``sink_window_attention_banded`` applies: a whole sequence of at least
    ``_BANDED_MIN`` tokens on the CPU flash path
    whose rows that hold sink keys inside their window are not rotated (d = 0 there), as in a
    prefill from position 0."""
    if q.shape[2] != k.shape[2] or q.shape[2] < _BANDED_MIN or window < 2 or not _flash_cpu.usable(q, k, v):
        return False
    early = positions[: window + sink - 1]
    return early.numel() == 0 or int(early.max()) <= sink + window - 1


@torch.library.custom_op("condfx::sink_window_attention", mutates_args=())
def sink_window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                          inv_freq: torch.Tensor, scale: float, sink: int, window: int) -> torch.Tensor:
    """``torch.ops.condfx.sink_window_attention``: see the module docstring."""
    with torch.no_grad():
        if _banded_ok(q, k, v, positions, sink, window):
            return sink_window_attention_banded(q, k, v, positions, inv_freq, scale, sink, window).contiguous()
        return sink_window_attention_blocked(q, k, v, positions, inv_freq, scale, sink, window).contiguous()


@sink_window_attention.register_fake
def _sink_window_attention_fake(q, k, v, positions, inv_freq, scale, sink, window):
    check_attention_shapes(q, k, v, 0)
    check_sink_window_args(q, positions, inv_freq, sink, window)
    return q.new_empty(q.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, positions, inv_freq, scale, sink, window = inputs
    ctx.save_for_backward(q, k, v, positions, inv_freq)
    ctx.options = (scale, sink, window)


def _backward(ctx, grad):
    q, k, v, positions, inv_freq = ctx.saved_tensors
    scale, sink, window = ctx.options

    def eager(q, k, v):
        return sink_window_attention_blocked(q, k, v, positions, inv_freq, scale, sink, window)

    return (*grads_by_recompute(eager, (q, k, v), grad), None, None, None, None, None)


sink_window_attention.register_autograd(_backward, setup_context=_setup_context)
