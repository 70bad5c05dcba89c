"""Tests of ``condfx.verify`` and ``condfx.graph_text``."""

from __future__ import annotations

import math
import re

import pytest
import torch
from torch import nn

import condfx
from condfx.graph_text import graph_text
from condfx.verify import EXACT_TOLERANCES, compare_outputs, verify
from tests._helpers import ToyStack


class _Affine(nn.Module):
    def __init__(self, noise: float = 0.0, dtype=torch.float32):
        super().__init__()
        self.noise, self.dtype = noise, dtype

    def forward(self, x):
        out = (x * 3.0 + 1.0).to(self.dtype)
        return out + self.noise * torch.sin(100 * out)


def _x(dtype=torch.float32):
    return torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(0)).to(dtype)


def test_matches_identical_models_exact():
    result = verify(_Affine(), _Affine(), (_x(),))
    assert result.ok and result.max_abs_diff == 0 and math.isinf(result.sqnr_db)
    assert result.top1_agreement == 1.0 and result.kl == 0.0
    assert result.to_dict()["sqnr_db"] is None  # inf is not valid JSON


def test_rejects_exact_beyond_float32_tolerance():
    result = verify(_Affine(), _Affine(noise=1e-3), _x())
    assert not result.ok and result.max_abs_diff > result.tolerance
    assert "FAILED (exact, float32)" in result.summary()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_matches_tolerance_keyed_by_output_dtype(dtype):
    result = verify(_Affine(dtype=dtype), _Affine(noise=1e-4, dtype=dtype), _x())
    atol, rtol = EXACT_TOLERANCES[dtype]
    assert result.dtype == str(dtype).removeprefix("torch.") and result.tolerance >= atol
    assert result.ok


def test_matches_lossy_sqnr_floor():
    small = verify(_Affine(), _Affine(noise=1e-2), _x(), mode="lossy", sqnr_floor_db=30.0)
    large = verify(_Affine(), _Affine(noise=1.0), _x(), mode="lossy", sqnr_floor_db=30.0)
    assert small.ok and not large.ok and small.sqnr_db > 30.0 > large.sqnr_db
    assert small.sqnr_floor_db == 30.0 and small.tolerance is None


def test_numerics_metrics_against_hand_computed_values():
    ref = torch.tensor([[0.0, 1.0], [2.0, 0.0]])
    out = torch.tensor([[0.0, 2.0], [1.0, 0.0]])
    m = compare_outputs(ref, out)
    assert m["max_abs_diff"] == 1.0 and m["mean_abs_diff"] == 0.5
    assert m["sqnr_db"] == pytest.approx(10 * math.log10(5 / 2))
    assert m["top1_agreement"] == 1.0
    p = torch.softmax(ref.double(), -1)
    kl = (p * (torch.log_softmax(ref.double(), -1) - torch.log_softmax(out.double(), -1))).sum(-1).mean()
    assert m["kl"] == pytest.approx(kl.item())


def test_matches_metric_callable():
    result = verify(_Affine(), _Affine(), _x(), metric=lambda model: 7.0)
    assert result.metric_before == result.metric_after == 7.0


def test_rejects_bad_mode_and_shape_mismatch():
    with pytest.raises(ValueError, match=r"mode must be one of \{exact, lossy\}; got 'close'"):
        verify(_Affine(), _Affine(), _x(), mode="close")
    with pytest.raises(ValueError, match=r"output shapes differ"):
        verify(_Affine(), lambda x: x[:, :2], _x())


def test_golden_graph_text_is_stable_across_captures():
    torch.manual_seed(0)
    model = ToyStack(layers=1).eval()
    texts = {graph_text(condfx.capture(model, (torch.randn(b, t, 16),))) for b, t in [(2, 5), (3, 7)]}
    assert len(texts) == 1
    (text,) = texts
    assert not re.search(r"0x[0-9a-f]+|File \"|\bs\d+\b", text)  # no addresses, traces, symbols
    assert text.splitlines()[0] == "%layers.0.q_proj.weight = param()"
    assert text.splitlines()[-1].startswith("return (")
