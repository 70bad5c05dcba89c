"""The one causal / sliding-window mask of the torch references (condfx/ops/_masks.py)."""

from __future__ import annotations

import pytest
import torch

from condfx.ops._masks import causal_window_mask, visible


def _by_formula(t: int, s: int, window: int) -> torch.Tensor:
    """Key j visible to query i iff j <= i + (S - T) and, with a window, j > i + (S - T) - window."""
    keep = torch.zeros(t, s, dtype=torch.bool)
    for i in range(t):
        for j in range(s):
            pos = i + (s - t)
            keep[i, j] = j <= pos and (window == 0 or j > pos - window)
    return keep


@pytest.mark.parametrize(("t", "s", "window"), [(1, 1, 0), (4, 4, 0), (3, 7, 0), (5, 5, 2), (2, 9, 3), (6, 6, 6)])
def test_numerics_causal_window_mask_matches_formula(t, s, window):
    mask = causal_window_mask(t, s, window)
    assert mask.dtype == torch.bool and torch.equal(mask, _by_formula(t, s, window))


def test_numerics_causal_window_mask_rows_are_a_slice():
    full = causal_window_mask(7, 10, 3)
    assert torch.equal(causal_window_mask(7, 10, 3, rows=(2, 5)), full[2:5])


def test_numerics_visible_at_arbitrary_positions():
    keep = visible(torch.tensor([0, 3, 4]), torch.arange(2, 6), window=2)
    assert keep.tolist() == [[False] * 4, [True, True, False, False], [False, True, True, False]]
