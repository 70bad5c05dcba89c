"""Tests of ``condfx::interleaved_attention``: a loop-level formula, P = 1 vs condfx.attention, fake, autograd."""

from __future__ import annotations

import math

import pytest
import torch

from condfx.ops import interleaved_attention_reference
from condfx.ops.interleaved_attention import rope_half


def _qkv(b, h, hkv, tp, sp, d, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    mk = lambda heads, n: torch.randn(b, heads, n, d, generator=g, dtype=dtype)  # noqa: E731
    return mk(h, tp), mk(hkv, sp), mk(hkv, sp)


def _loop_formula(q, k, v, inv_freq, scale, p, window, token_causal, token_positions):
    """Row by row, straight from the module docstring."""
    b, h, tl, d = q.shape
    hkv, sl = k.shape[1], k.shape[2]
    out = torch.zeros_like(q)
    pos = lambda x: (x // p) if token_positions else x  # noqa: E731
    for i in range(tl):
        a = sl - tl + i
        qi = rope_half(q[:, :, i : i + 1], torch.tensor([pos(a)]), inv_freq)
        keys = []
        for j in range(sl):
            ja, aa, w = (j // p, a // p, window // p) if token_causal else (j, a, window)
            if ja <= aa and (w == 0 or ja > aa - w):
                keys.append(j)
        idx = torch.tensor(keys)
        kr = rope_half(k[:, :, idx], torch.tensor([pos(j) for j in keys]), inv_freq)
        kr = kr.repeat_interleave(h // hkv, dim=1)
        vr = v[:, :, idx].repeat_interleave(h // hkv, dim=1)
        probs = torch.softmax((qi @ kr.transpose(-1, -2)) * scale, dim=-1)
        out[:, :, i : i + 1] = probs @ vr
    return out


@pytest.mark.parametrize(
    ("p", "window", "token_causal", "token_positions", "t", "s"),
    [(2, 0, False, False, 3, 3), (2, 0, True, True, 3, 3), (3, 6, True, False, 4, 4),
     (2, 4, False, True, 4, 4), (2, 0, True, False, 1, 5), (2, 4, False, False, 2, 6)],
)
def test_numerics_reference_matches_loop_formula(p, window, token_causal, token_positions, t, s):
    q, k, v = _qkv(2, 4, 2, t * p, s * p, 8)
    inv_freq = 1.0 / (100.0 ** (torch.arange(0, 8, 2, dtype=torch.float64) / 8))
    args = (inv_freq, 0.4, p, window, token_causal, token_positions)
    got = interleaved_attention_reference(q, k, v, *args)
    torch.testing.assert_close(got, _loop_formula(q, k, v, *args), atol=1e-10, rtol=1e-10)


def test_numerics_p1_equals_attention_after_rope():
    q, k, v = _qkv(1, 4, 2, 5, 5, 8, dtype=torch.float32)
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, 8, 2, dtype=torch.float32) / 8))
    pos = torch.arange(5)
    qr, kr = rope_half(q, pos, inv_freq), rope_half(k, pos, inv_freq)
    expected = torch.ops.condfx.attention(qr, kr, v, 0.3, 0)
    got = torch.ops.condfx.interleaved_attention(q, k, v, inv_freq, 0.3, 1, 0, False, False)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_numerics_autograd_matches_reference():
    q, k, v = (t.requires_grad_() for t in _qkv(1, 2, 1, 6, 6, 4))
    inv_freq = torch.tensor([1.0, 0.1], dtype=torch.float64)
    args = (inv_freq, 0.5, 2, 0, True, False)
    grads_op = torch.autograd.grad(torch.ops.condfx.interleaved_attention(q, k, v, *args).sum(), (q, k, v))
    grads_ref = torch.autograd.grad(interleaved_attention_reference(q, k, v, *args).sum(), (q, k, v))
    for a, b in zip(grads_op, grads_ref, strict=True):
        torch.testing.assert_close(a, b)
    assert torch.autograd.gradcheck(
        lambda a, b, c: torch.ops.condfx.interleaved_attention(a, b, c, *args), (q, k, v)
    )


def test_numerics_fake_shape_under_export():
    class M(torch.nn.Module):
        def forward(self, q, k, v):
            f = torch.zeros(4)
            return torch.ops.condfx.interleaved_attention(q, k, v, f, 0.5, 2, 0, False, False)

    q, k, v = _qkv(1, 2, 2, 6, 6, 8, dtype=torch.float32)
    ep = torch.export.export(M(), (q, k, v))
    node = next(n for n in ep.graph.nodes if "interleaved_attention" in str(n.target))
    assert tuple(node.meta["val"].shape) == (1, 2, 6, 8)
    assert not math.isnan(float(ep.module()(q, k, v).sum()))


@pytest.mark.parametrize(
    ("pseudo", "window", "match"),
    [(0, 0, "pseudo \\(P\\) must be an int >= 1; got 0"), (2, 3, "multiple of P=2; got 3")],
)
def test_rejects_bad_pseudo_or_window(pseudo, window, match):
    q, k, v = _qkv(1, 2, 2, 4, 4, 8, dtype=torch.float32)
    with pytest.raises(ValueError, match=match):
        interleaved_attention_reference(q, k, v, torch.zeros(4), 0.5, pseudo, window)
