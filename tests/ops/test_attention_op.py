"""Tests of ``condfx::attention``: reference vs the dense formula, fake impl under export, autograd."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import condfx.ops.attention as attention_module
from condfx.ops import attention_reference
from tests._helpers import TOLERANCES, dense_attention


def _qkv(b, h, hkv, t, s, d, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, t, d, generator=g, dtype=dtype)
    k = torch.randn(b, hkv, s, d, generator=g, dtype=dtype)
    v = torch.randn(b, hkv, s, d, generator=g, dtype=dtype)
    return q, k, v


@settings(max_examples=60, deadline=None)
@given(
    b=st.integers(1, 2),
    hkv=st.integers(1, 2),
    groups=st.integers(1, 3),
    t=st.integers(1, 6),
    extra=st.integers(0, 4),
    d=st.sampled_from([1, 4, 8]),
    window=st.integers(0, 5),
)
def test_numerics_reference_matches_dense_formula(b, hkv, groups, t, extra, d, window):
    q, k, v = _qkv(b, hkv * groups, hkv, t, t + extra, d, dtype=torch.float64)
    out = attention_reference(q, k, v, 0.37, window)
    torch.testing.assert_close(out, dense_attention(q, k, v, 0.37, window), **_tol(torch.float64))


def _tol(dtype):
    atol, rtol = TOLERANCES[dtype]
    return {"atol": atol, "rtol": rtol}


@pytest.mark.parametrize("window", [0, 3])
def test_numerics_custom_op_matches_reference_decode_step(window):
    q, k, v = _qkv(2, 4, 2, 1, 9, 8)  # one decode step over 9 cached keys
    out = torch.ops.condfx.attention(q, k, v, 0.5, window)
    torch.testing.assert_close(out, dense_attention(q, k, v, 0.5, window), **_tol(torch.float32))


def test_numerics_matches_sdpa_causal_gqa():
    q, k, v = _qkv(2, 6, 2, 7, 7, 8)
    expected = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    torch.testing.assert_close(torch.ops.condfx.attention(q, k, v, 8**-0.5), expected, **_tol(torch.float32))


def test_numerics_chunked_equals_unchunked(monkeypatch):
    q, k, v = _qkv(1, 4, 2, 33, 40, 8)
    whole = attention_reference(q, k, v, 0.3, 5)
    monkeypatch.setattr(attention_module, "_SCORE_BLOCK_ELEMENTS", 4 * 40 * 3)  # 3 query rows per chunk
    torch.testing.assert_close(attention_reference(q, k, v, 0.3, 5), whole, atol=1e-6, rtol=1e-6)


def test_numerics_long_context_runs_chunked():
    q, k, v = _qkv(1, 2, 1, 2048, 2048, 16)
    out = attention_reference(q, k, v, 0.25)
    assert out.shape == (1, 2, 2048, 16) and torch.isfinite(out).all()
    last = dense_attention(q[:, :, -4:], k, v, 0.25)  # the last 4 queries see all keys
    torch.testing.assert_close(out[:, :, -4:], last, atol=1e-5, rtol=1e-5)


def test_numerics_half_precision_keeps_dtype():
    q, k, v = _qkv(1, 2, 2, 5, 5, 8, dtype=torch.bfloat16)
    out = torch.ops.condfx.attention(q, k, v, 0.3)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, dense_attention(q, k, v, 0.3), **_tol(torch.bfloat16))


@pytest.mark.parametrize(
    ("shapes", "message"),
    [
        (((1, 3, 4, 8), (1, 2, 4, 8), (1, 2, 4, 8)), r"multiple of key/value heads"),
        (((1, 4, 4, 8), (1, 2, 4, 4), (1, 2, 4, 4)), r"head dim must match"),
        (((1, 4, 5, 8), (1, 2, 4, 8), (1, 2, 4, 8)), r"T=5 must be <= key length S=4"),
        (((1, 4, 4), (1, 2, 4, 8), (1, 2, 4, 8)), r"q must be 4-D"),
        (((1, 4, 4, 8), (1, 2, 4, 8), (1, 2, 5, 8)), r"k and v must have one shape"),
    ],
)
def test_rejects_inconsistent_shapes(shapes, message):
    q, k, v = (torch.zeros(s) for s in shapes)
    with pytest.raises(ValueError, match=message):
        torch.ops.condfx.attention(q, k, v, 1.0)


def test_rejects_negative_window():
    q, k, v = _qkv(1, 2, 2, 3, 3, 4)
    with pytest.raises(ValueError, match=r"window must be >= 0"):
        attention_reference(q, k, v, 1.0, -1)


class _CallsOp(torch.nn.Module):
    def forward(self, q, k, v):
        return torch.ops.condfx.attention(q, k, v, 0.5, 2) * 2


def test_matches_fake_impl_under_export_with_symbolic_shapes():
    q, k, v = _qkv(2, 4, 2, 5, 5, 8)
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq")
    dyn = ({0: batch, 2: seq},) * 3
    ep = torch.export.export(_CallsOp(), (q, k, v), dynamic_shapes=dyn, strict=False)
    (node,) = [n for n in ep.graph.nodes if n.target is torch.ops.condfx.attention.default]
    shape = node.meta["val"].shape
    assert isinstance(shape[0], torch.SymInt) and isinstance(shape[2], torch.SymInt)
    assert (shape[1], shape[3]) == (4, 8)
    q2, k2, v2 = _qkv(3, 4, 2, 7, 7, 8)
    torch.testing.assert_close(ep.module()(q2, k2, v2), 2 * attention_reference(q2, k2, v2, 0.5, 2))


@pytest.mark.parametrize(("t", "s", "window"), [(4, 4, 0), (3, 6, 2), (1, 5, 0)])
def test_numerics_gradcheck(t, s, window):
    q, k, v = (x.requires_grad_() for x in _qkv(1, 4, 2, t, s, 3, dtype=torch.float64))
    assert torch.autograd.gradcheck(
        lambda q, k, v: torch.ops.condfx.attention(q, k, v, 0.7, window), (q, k, v)
    )


def test_numerics_backward_matches_autograd_of_dense_formula():
    q, k, v = (x.requires_grad_() for x in _qkv(2, 4, 2, 5, 6, 4, dtype=torch.float64))
    grad = torch.randn(2, 4, 5, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    got = torch.autograd.grad(torch.ops.condfx.attention(q, k, v, 0.4, 3), (q, k, v), grad)
    want = torch.autograd.grad(dense_attention(q, k, v, 0.4, 3), (q, k, v), grad)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b)


def test_matches_opcheck():
    q, k, v = (x.requires_grad_() for x in _qkv(1, 4, 2, 3, 5, 4))
    torch.library.opcheck(torch.ops.condfx.attention.default, (q, k, v, 0.5, 2))
