"""condfx.verify.max_abs_diff: the one max-difference function."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from condfx.verify import max_abs_diff


def test_numerics_max_abs_diff_of_tensors_arrays_and_nested_sequences():
    assert max_abs_diff(torch.tensor([1.0, 2.0]), torch.tensor([1.5, 2.0])) == 0.5
    assert max_abs_diff(np.ones(3, dtype=np.float32), torch.zeros(3)) == 1.0
    nested_a = (torch.ones(2), [torch.zeros(1), torch.tensor([3.0])])
    nested_b = (torch.ones(2), [torch.ones(1), torch.tensor([0.0])])
    assert max_abs_diff(nested_a, nested_b) == 3.0
    assert max_abs_diff(torch.empty(0), torch.empty(0)) == 0.0


@pytest.mark.parametrize("where", [0, 1])
def test_numerics_max_abs_diff_never_hides_nan(where):
    parts = [torch.tensor([1.0]), torch.tensor([1.0])]
    parts[where] = torch.tensor([math.nan])
    assert math.isnan(max_abs_diff(parts, [torch.tensor([2.0]), torch.tensor([2.0])]))


def test_numerics_max_abs_diff_equal_infinities_differ_by_zero():
    inf = math.inf
    assert max_abs_diff(torch.tensor([inf, -inf, 1.0]), torch.tensor([inf, -inf, 1.0])) == 0.0
    assert max_abs_diff(torch.tensor([inf]), torch.tensor([1.0])) == inf


def test_rejects_max_abs_diff_of_differently_nested_inputs():
    with pytest.raises(ValueError, match="two alike nested sequences"):
        max_abs_diff((torch.ones(1),), torch.ones(1))
