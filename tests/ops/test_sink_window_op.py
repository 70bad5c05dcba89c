"""``condfx::sink_window_attention``: StreamingLLM's cache positions, blocked = reference, trimmed cache = full."""

from __future__ import annotations

import pytest
import torch

import condfx.ops  # noqa: F401
from condfx.ops.sink_window import sink_window_attention_blocked, sink_window_attention_reference


def _rope(x, pos, inv_freq):
    """Half-split RoPE of x (..., T, D) at positions pos (T,)."""
    ang = pos.double()[:, None] * inv_freq.double()[None, :]
    cos, sin = torch.cat([ang, ang], -1).cos(), torch.cat([ang, ang], -1).sin()
    half = x.shape[-1] // 2
    rot = torch.cat([-x[..., half:], x[..., :half]], -1)
    return x * cos + rot * sin


def _streaming_llm(q_raw, k_raw, v, inv_freq, scale, sink, window):
    """Token by token, as StreamingLLM runs it: the cache holds the sinks and the last window
    tokens, and RoPE is applied at positions inside the cache (keys and query)."""
    b, h, t, d = q_raw.shape
    g = h // k_raw.shape[1]
    outs = []
    for p in range(t):
        keep = list(range(min(sink, p + 1))) + list(range(max(sink, p - window + 1), p + 1))
        cache_pos = torch.arange(len(keep))
        k = _rope(k_raw[:, :, keep], cache_pos, inv_freq).repeat_interleave(g, 1)
        q = _rope(q_raw[:, :, p : p + 1], cache_pos[-1:], inv_freq)
        probs = torch.softmax((q @ k.transpose(-1, -2)) * scale, -1)
        outs.append(probs @ v[:, :, keep].repeat_interleave(g, 1))
    return torch.cat(outs, 2)


@pytest.mark.parametrize(("sink", "window"), [(4, 8), (1, 5), (0, 6), (3, 64)])
def test_numerics_equals_streaming_llm_positions(sink, window):
    gen = torch.Generator().manual_seed(0)
    b, h, hkv, t, d = 2, 4, 2, 29, 8
    q_raw, k_raw, v = (torch.randn(b, n, t, d, generator=gen, dtype=torch.float64) for n in (h, hkv, hkv))
    inv_freq = 1.0 / (100.0 ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    pos = torch.arange(t)
    q, k = _rope(q_raw, pos, inv_freq), _rope(k_raw, pos, inv_freq)
    want = _streaming_llm(q_raw, k_raw, v, inv_freq, 0.3, sink, window)
    got = sink_window_attention_reference(q, k, v, pos, inv_freq.float(), 0.3, sink, window)
    assert (got - want).abs().max().item() < 1e-5
    blocked = sink_window_attention_blocked(q, k, v, pos, inv_freq.float(), 0.3, sink, window)
    assert (blocked - got).abs().max().item() < 1e-12


def test_numerics_trimmed_cache_equals_full_sequence():
    """Decoding over the sinks + the last window - 1 tokens gives the full forward's rows."""
    gen = torch.Generator().manual_seed(1)
    b, h, hkv, t, d, sink, window = 1, 2, 1, 40, 8, 3, 7
    q, k, v = (torch.randn(b, n, t, d, generator=gen) for n in (h, hkv, hkv))
    inv_freq = 1.0 / (1e4 ** (torch.arange(0, d, 2).float() / d))
    pos = torch.arange(t)
    full = torch.ops.condfx.sink_window_attention(q, k, v, pos, inv_freq, 0.5, sink, window)
    for p in (10, 25, 39):
        cols = list(range(sink)) + list(range(p - window + 1, p + 1))
        step = torch.ops.condfx.sink_window_attention(
            q[:, :, p : p + 1], k[:, :, cols], v[:, :, cols], pos[p : p + 1], inv_freq, 0.5, sink, window)
        assert (step - full[:, :, p : p + 1]).abs().max().item() < 1e-5


def test_rejects_bad_arguments():
    q = torch.randn(1, 2, 4, 8)
    pos, inv = torch.arange(4), torch.ones(4)
    with pytest.raises(ValueError, match="window must be >= 0|window >= 1"):
        torch.ops.condfx.sink_window_attention(q, q, q, pos, inv, 1.0, 2, 0)
    with pytest.raises(ValueError, match="positions must be a 1-D int64"):
        torch.ops.condfx.sink_window_attention(q, q, q, pos.float(), inv, 1.0, 2, 4)
    with pytest.raises(ValueError, match=r"inv_freq must be \(D / 2,\)"):
        torch.ops.condfx.sink_window_attention(q, q, q, pos, torch.ones(3), 1.0, 2, 4)


@pytest.mark.parametrize(("t", "sink", "window"), [(29, 4, 8), (64, 4, 9), (50, 0, 6), (40, 3, 64), (33, 1, 2), (70, 5, 7)])
def test_numerics_banded_prefill_equals_reference(t, sink, window):
    """The CPU prefill path (window part in banded flash calls, sinks merged by log-sum-exp) =
    the reference, for full and partial query blocks, windows past T, window 2 and GQA."""
    from condfx.ops.sink_window import sink_window_attention_banded

    gen = torch.Generator().manual_seed(t)
    b, h, hkv, d = 2, 6, 3, 8
    q, k, v = (torch.randn(b, n, t, d, generator=gen) for n in (h, hkv, hkv))
    inv_freq = 1.0 / (1e4 ** (torch.arange(0, d, 2).float() / d))
    pos = torch.arange(t)
    want = sink_window_attention_reference(q.double(), k.double(), v.double(), pos, inv_freq, 0.3, sink, window)
    got = sink_window_attention_banded(q, k, v, pos, inv_freq, 0.3, sink, window)
    assert (got.double() - want).abs().max().item() < 1e-5
    blocked = sink_window_attention_blocked(q, k, v, pos, inv_freq, 0.3, sink, window)
    assert (got - blocked).abs().max().item() < 1e-5


def test_numerics_long_prefill_takes_the_banded_path(monkeypatch):
    """From ``_BANDED_MIN`` tokens on, the op's CPU implementation is the banded one."""
    import condfx.ops.sink_window as sw

    monkeypatch.setattr(sw, "_BANDED_MIN", 16)
    gen = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, n, 40, 8, generator=gen) for n in (4, 2, 2))
    inv_freq = 1.0 / (1e4 ** (torch.arange(0, 8, 2).float() / 8))
    pos = torch.arange(40)
    op = torch.ops.condfx.sink_window_attention(q, k, v, pos, inv_freq, 0.3, 4, 8)
    assert torch.equal(op, sw.sink_window_attention_banded(q, k, v, pos, inv_freq, 0.3, 4, 8))
    assert not torch.equal(op, sink_window_attention_blocked(q, k, v, pos, inv_freq, 0.3, 4, 8))


def test_gradients_match_the_reference_and_a_numerical_check():
    """The op's backward (the blocked form, recomputed) against autograd through the eager reference,
    on a trimmed cache with rotated-back sink scores, and against finite differences (gradcheck)."""
    g = torch.Generator().manual_seed(3)
    q = torch.randn(1, 4, 5, 8, generator=g, dtype=torch.float64)  # 5 new tokens
    k = torch.randn(1, 2, 9, 8, generator=g, dtype=torch.float64)  # 2 sinks + 2 kept + 5 new
    v = torch.randn(1, 2, 9, 8, generator=g, dtype=torch.float64)
    positions, inv_freq = torch.arange(11, 16), 1.0 / 10000 ** (torch.arange(4) / 4)
    args = (positions, inv_freq, 0.3, 2, 3)

    def leaves():
        return [t.clone().requires_grad_(True) for t in (q, k, v)]

    mine, ref = leaves(), leaves()
    up = torch.randn(q.shape, generator=g, dtype=torch.float64)
    (torch.ops.condfx.sink_window_attention(*mine, *args) * up).sum().backward()
    (sink_window_attention_reference(*ref, *args) * up).sum().backward()
    for a, b in zip(mine, ref, strict=True):
        assert float(a.grad.abs().max()) > 0.0
        torch.testing.assert_close(a.grad, b.grad, atol=1e-10, rtol=1e-8)
    assert torch.autograd.gradcheck(lambda *t: torch.ops.condfx.sink_window_attention(*t, *args), tuple(leaves()))
