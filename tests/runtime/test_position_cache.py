"""``PositionLayout`` / ``PositionCache``: the token count of a graph whose every layer is bounded."""

from __future__ import annotations

import pytest
import torch

from condfx.layouts import PositionLayout, WindowKVLayout, layout_from_json
from condfx.runtime.cache_table import make_cache
from condfx.runtime.caches import CacheSet, PositionCache


def test_matches_layout_json_round_trip_and_empty_tensor():
    layout = PositionLayout(2)
    assert layout_from_json(layout.to_json()) == layout and layout.to_json()["kind"] == "position"
    assert layout.io_names() == ["position"] and layout.length_dims() == ["past_position"]
    (past,) = layout.empty_past(3, length=4)
    assert past.shape == (3, 0, 4, 0) and layout.nbytes(1000, batch=8) == 0


def test_matches_cache_counts_tokens_reorders_and_holds_no_bytes():
    caches = CacheSet([make_cache(WindowKVLayout(0, 2, 4, torch.float32, window_size=3), 2),
                       make_cache(PositionLayout(1), 2)])
    position = caches[1]
    assert isinstance(position, PositionCache)
    k = torch.randn(2, 2, 5, 4)
    caches.update([k, k, torch.zeros(2, 0, 5, 0)])
    assert (position.length, position.stored, caches[0].stored) == (5, 5, 2)
    assert [t.shape for t in caches.past()][-1] == (2, 0, 5, 0)
    caches.reorder(torch.tensor([1]))
    assert position.past()[0].shape == (1, 0, 5, 0) and caches.nbytes_per_layer()[1] == 0
    with pytest.raises(ValueError, match=r"PositionCache.update: present must be \(B=1, 0, >= 5, 0\)"):
        position.update(torch.zeros(1, 0, 3, 0))
    caches.reset(4)
    assert position.past()[0].shape == (4, 0, 0, 0) and position.length == 0
