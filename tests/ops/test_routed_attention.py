"""Tests of ``condfx::routed_attention``: dense-formula agreement, compaction, fake, autograd."""

from __future__ import annotations

import pytest
import torch

import condfx.ops.routed_attention as routed_module
from condfx.ops import routed_attention_reference
from tests._helpers import TOLERANCES, dense_attention


def _qkv(b, h, hkv, t, s, d, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, t, d, generator=g, dtype=dtype)
    k = torch.randn(b, hkv, s, d, generator=g, dtype=dtype)
    v = torch.randn(b, hkv, s, d, generator=g, dtype=dtype)
    route = torch.rand(b, t, generator=g) < 0.4
    return q, k, v, route


def _expected(q, k, v, route, scale):
    return dense_attention(q, k, v, scale) * route[:, None, :, None]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])  # float32 runs the flash pieces
@pytest.mark.parametrize(("t", "s", "hkv"), [(9, 9, 2), (5, 12, 1), (1, 7, 2), (11, 11, 4), (300, 300, 2)])
def test_numerics_matches_masked_dense_formula(t, s, hkv, dtype):
    q, k, v, route = _qkv(2, 4, hkv, t, s, 8, dtype=dtype)
    route[0, -1] = True  # at least one routed row
    out = torch.ops.condfx.routed_attention(q, k, v, route, 0.3)
    atol, rtol = TOLERANCES[dtype]
    torch.testing.assert_close(out, _expected(q, k, v, route, 0.3), atol=atol, rtol=rtol)


def test_numerics_unrouted_rows_are_exact_zeros_and_all_off_is_zero():
    q, k, v, route = _qkv(2, 2, 2, 6, 6, 4)
    out = torch.ops.condfx.routed_attention(q, k, v, route, 0.5)
    assert torch.all(out.permute(0, 2, 1, 3)[~route] == 0)
    none = torch.zeros_like(route)
    assert torch.all(torch.ops.condfx.routed_attention(q, k, v, none, 0.5) == 0)


def test_numerics_query_blocks_equal_one_block(monkeypatch):
    q, k, v, route = _qkv(1, 4, 2, 40, 40, 8, dtype=torch.float64)
    whole = routed_attention_reference(q, k, v, route, 0.3)
    monkeypatch.setattr(routed_module, "_QUERY_BLOCK", 3)
    torch.testing.assert_close(routed_attention_reference(q, k, v, route, 0.3), whole)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_reference_attends_only_routed_rows(monkeypatch, dtype):
    """Scores are computed for the compacted routed queries only (no masked T x T), and keys are
    read only up to the last routed position (float32 splits them in two flash pieces)."""
    q, k, v, route = _qkv(1, 2, 2, 64, 64, 4, dtype=dtype)
    route[:] = False
    route[0, [5, 40, 62]] = True
    seen = []
    module, name = (routed_module.F, "scaled_dot_product_attention") if dtype == torch.float64 else (
        routed_module._flash_cpu, "_FLASH")
    real = getattr(module, name)

    def spy(q_, k_, v_, *args, **kw):
        seen.append((q_.shape[2], k_.shape[2]))
        return real(q_, k_, v_, *args, **kw)

    monkeypatch.setattr(module, name, spy)
    with torch.no_grad():
        torch.ops.condfx.routed_attention(q, k, v, route, 0.5)
    assert {rows for rows, _ in seen} == {3} and sum(keys for _, keys in seen) == 63


def test_numerics_gradients_match_dense_formula():
    q, k, v, route = _qkv(2, 4, 2, 7, 7, 4, dtype=torch.float64)
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
    torch.ops.condfx.routed_attention(*leaves, route, 0.4).pow(2).sum().backward()
    ref = [t.clone().requires_grad_(True) for t in (q, k, v)]
    _expected(*ref, route, 0.4).pow(2).sum().backward()
    for a, b in zip(leaves, ref, strict=True):
        torch.testing.assert_close(a.grad, b.grad)


def test_numerics_gradients_are_zero_when_nothing_routes():
    q, k, v, route = _qkv(1, 2, 2, 5, 5, 4)
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
    torch.ops.condfx.routed_attention(*leaves, torch.zeros_like(route), 0.4).sum().backward()
    assert all(torch.all(t.grad == 0) for t in leaves)


def test_fake_impl_under_export_keeps_symbolic_shapes():
    class M(torch.nn.Module):
        def forward(self, q, k, v, route):
            return torch.ops.condfx.routed_attention(q, k, v, route, 0.5)

    q, k, v, route = _qkv(2, 4, 2, 6, 6, 8)
    dims = torch.export.Dim("t", min=2)
    dyn = ({2: dims}, {2: dims}, {2: dims}, {1: dims})
    ep = torch.export.export(M(), (q, k, v, route), dynamic_shapes=dyn, strict=False)
    q2, k2, v2, r2 = _qkv(2, 4, 2, 9, 9, 8, seed=1)
    torch.testing.assert_close(ep.module()(q2, k2, v2, r2), M()(q2, k2, v2, r2))


@pytest.mark.parametrize(
    ("route", "match"),
    [
        (torch.ones(2, 6, dtype=torch.int64), "must be a bool tensor"),
        (torch.ones(2, 5, dtype=torch.bool), r"route shape \(2, 5\) must be"),
        (torch.ones(12, dtype=torch.bool), "must be 2-D"),
    ],
)
def test_rejects_bad_route(route, match):
    q, k, v, _ = _qkv(2, 2, 2, 6, 6, 4)
    with pytest.raises(ValueError, match=match):
        routed_attention_reference(q, k, v, route, 0.5)


@pytest.mark.parametrize(("t", "s", "window"), [(40, 40, 4), (30, 35, 5), (17, 17, 8), (70, 70, 2), (64, 64, 9)])
def test_numerics_windowed_attention_blocks_match_dense(t, s, window):
    """``condfx.attention`` with a window runs in query blocks on long inputs (L2A's window branch)."""
    g = torch.Generator().manual_seed(3)
    q = torch.randn(2, 4, t, 8, generator=g)
    k, v = torch.randn(2, 2, s, 8, generator=g), torch.randn(2, 2, s, 8, generator=g)
    out = torch.ops.condfx.attention(q, k, v, 0.3, window)
    atol, rtol = TOLERANCES[torch.float32]
    torch.testing.assert_close(out, dense_attention(q, k, v, 0.3, window), atol=atol, rtol=rtol)


_SLOPES = [0.5, 0.25, 0.125, 0.0625]


@pytest.mark.parametrize("options", [{"softcap": 2.0}, {"alibi_slopes": _SLOPES}, {"sinks": True},
                                     {"softcap": 3.0, "alibi_slopes": _SLOPES, "sinks": True}])
@pytest.mark.parametrize(("t", "s"), [(9, 9), (4, 11)])
def test_numerics_score_options_match_masked_attention_op(options, t, s):
    """Routed rows equal ``condfx::attention`` with the same score options; the others are zero."""
    q, k, v, route = _qkv(2, 4, 2, t, s, 8, dtype=torch.float64)
    opts = {**options, "sinks": torch.randn(4, dtype=torch.float64)} if options.get("sinks") else options
    out = torch.ops.condfx.routed_attention(q, k, v, route, 0.3, **opts)
    dense = torch.ops.condfx.attention(q, k, v, 0.3, 0, **opts)
    torch.testing.assert_close(out, dense * route[:, None, :, None], atol=1e-12, rtol=1e-12)


def test_numerics_score_option_gradients_match_reference_autograd():
    q, k, v, route = _qkv(1, 4, 2, 6, 6, 4, dtype=torch.float64)
    sinks = torch.randn(4, dtype=torch.float64, requires_grad=True)
    q.requires_grad_(True)

    def f(q, sinks):
        return torch.ops.condfx.routed_attention(q, k, v, route, 0.5, 2.0, _SLOPES, sinks)

    assert torch.autograd.gradcheck(f, (q, sinks))
