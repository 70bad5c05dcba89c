"""Tests of the typed caches: growth, bytes, sliding window, reorder, reset, errors, table."""

from __future__ import annotations

import pytest
import torch

from condfx.ops.attention import attention_reference
from condfx.runtime.caches import (
    CacheSet,
    FullKVCache,
    LayerCache,
    SlidingWindowCache,
    append_kv,
    is_arena_prefix,
)
from tests._helpers import assert_close_exact

B, HKV, D = 2, 2, 4


def _kv(t, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(B, HKV, t, D, generator=gen), torch.randn(B, HKV, t, D, generator=gen)


def test_full_cache_append_grows_and_counts_bytes():
    cache = FullKVCache(B, HKV, D)
    assert (cache.length, cache.stored, cache.nbytes()) == (0, 0, 0)
    k1, v1 = _kv(3, 1)
    k2, v2 = _kv(1, 2)
    cache.append(k1, v1)
    k_all, v_all = cache.append(k2, v2)
    assert k_all.shape == (B, HKV, 4, D)
    torch.testing.assert_close(k_all, torch.cat([k1, k2], 2), rtol=0, atol=0)
    torch.testing.assert_close(v_all, torch.cat([v1, v2], 2), rtol=0, atol=0)
    assert (cache.length, cache.stored) == (4, 4)
    past_k, past_v = cache.past()
    assert cache.nbytes() == past_k.nbytes + past_v.nbytes == 2 * B * HKV * 4 * D * 4


def test_full_cache_grows_in_place_and_keeps_arena_presents_without_copy():
    cache = FullKVCache(B, HKV, D)
    cache.grow_in_place = True
    k, v = _kv(5)
    cache.update(k, v)  # a present from cat: copied once into an arena
    past_k, past_v = cache.past()
    assert is_arena_prefix(past_k) and torch.equal(past_k, k) and cache.length == 5
    k1, v1 = _kv(1)
    grown_k, grown_v = append_kv(past_k, k1), append_kv(past_v, v1)
    assert grown_k.data_ptr() == past_k.data_ptr() and past_k.shape[2] == 5  # written in place
    torch.testing.assert_close(grown_k, torch.cat([k, k1], 2), rtol=0, atol=0)
    cache.update(grown_k, grown_v)
    assert cache.past()[0] is grown_k and cache.length == 6
    assert cache.nbytes() == 2 * B * HKV * 6 * D * 4 < cache.reserved_nbytes()
    limited = FullKVCache(B, HKV, D)
    limited.grow_in_place, limited.capacity_limit = True, 10  # a 10-token context reserves 10 positions
    limited.update(k, v)
    assert limited.reserved_nbytes() == 2 * B * HKV * 10 * D * 4


def test_full_cache_keeps_presents_as_they_are_unless_it_grows_in_place():
    cache = FullKVCache(B, HKV, D)  # the default, and what the ONNX Runtime backend gets
    k, v = _kv(5)
    cache.update(k, v)
    assert cache.past()[0] is k and not is_arena_prefix(cache.past()[0])


def test_append_kv_concatenates_a_past_that_is_not_an_arena():
    k, k1 = _kv(3)[0], _kv(2)[0]
    view = torch.cat([k, k], 2)[:, :, :3]  # a prefix view, but of a caller's tensor
    out = append_kv(view, k1)
    assert out.data_ptr() != view.data_ptr()
    torch.testing.assert_close(out, torch.cat([k, k1], 2), rtol=0, atol=0)


def test_rejects_present_shorter_than_past_or_wrong_heads():
    cache = FullKVCache(B, HKV, D)
    cache.update(*_kv(4))
    with pytest.raises(ValueError, match=r"present must be \(B=2, Hkv=2, >= 4, D=4\)"):
        cache.update(*_kv(2))
    with pytest.raises(ValueError, match="present must be"):
        cache.update(torch.zeros(B, 3, 5, D), torch.zeros(B, 3, 5, D))


def test_sliding_window_keeps_last_window_minus_one_in_order():
    cache = SlidingWindowCache(B, HKV, D, window=3)
    k, v = _kv(6)
    cache.append(k[:, :, :4], v[:, :, :4])
    assert cache.stored == 2 and cache.length == 4
    torch.testing.assert_close(cache.past()[0], k[:, :, 2:4], rtol=0, atol=0)
    cache.append(k[:, :, 4:5], v[:, :, 4:5])
    torch.testing.assert_close(cache.past()[1], v[:, :, 3:5], rtol=0, atol=0)
    assert cache.nbytes() == 2 * B * HKV * 2 * D * 4


def test_numerics_sliding_window_decode_equals_full_windowed_attention():
    window, t = 3, 7
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(B, 4, t, D, generator=gen)
    k, v = _kv(t, 5)
    expected = attention_reference(q, k, v, 0.5, window)  # (B, H, T, D)
    cache = SlidingWindowCache(B, HKV, D, window=window)
    outs = []
    for i in range(t):
        k_all, v_all = cache.append(k[:, :, i : i + 1], v[:, :, i : i + 1])
        assert k_all.shape[2] <= window
        outs.append(attention_reference(q[:, :, i : i + 1], k_all, v_all, 0.5, window))
    assert_close_exact(torch.cat(outs, 2), expected)


def test_rejects_bad_window():
    with pytest.raises(ValueError, match="SlidingWindowCache.window must be a positive int; got 0"):
        SlidingWindowCache(B, HKV, D, window=0)


def test_reorder_and_reset():
    cache = FullKVCache(B, HKV, D)
    k, v = _kv(3)
    cache.update(k, v)
    cache.reorder(torch.tensor([1]))
    assert cache.batch == 1 and cache.past()[0].shape == (1, HKV, 3, D)
    torch.testing.assert_close(cache.past()[0][0], k[1], rtol=0, atol=0)
    cache.reset(batch=4)
    assert (cache.batch, cache.length, cache.stored, cache.nbytes()) == (4, 0, 0, 0)
    assert cache.past()[0].shape == (4, HKV, 0, D)


def test_cache_set_bytes_and_table():
    caches = CacheSet([FullKVCache(B, HKV, D), SlidingWindowCache(B, HKV, D, window=2)])
    presents = [t for _ in range(2) for t in _kv(5)]
    caches.update(presents)
    per_layer = caches.nbytes_per_layer()
    tensors = caches.past()
    assert per_layer == [2 * B * HKV * 5 * D * 4, 2 * B * HKV * 1 * D * 4]
    assert caches.nbytes() == sum(per_layer) == sum(t.nbytes for t in tensors)
    assert caches.length == 5
    table = caches.table()
    assert "| 1 | SlidingWindowCache | 1 | 5 | 128 |" in table
    assert f"| total | | | | {caches.nbytes()} |" in table
    with pytest.raises(ValueError, match="needs 4 present tensors; got 1"):
        caches.update(presents[:1])


def test_layer_cache_is_abstract():
    with pytest.raises(TypeError):
        LayerCache(B, HKV, D, torch.float32)  # type: ignore[abstract]


def test_cache_set_reorder_checks_the_index_before_any_layer_changes():
    """A bad index is one sentence naming CacheSet.reorder, and no layer is reordered (a partial
    reorder would leave the layers holding different rows)."""
    from condfx.runtime.caches import CacheSet

    caches = CacheSet([FullKVCache(2, 2, 4), FullKVCache(2, 2, 4)])
    for c in caches:
        c.update(torch.randn(2, 2, 3, 4), torch.randn(2, 2, 3, 4))
    before = [t.clone() for t in caches.past()]
    for bad, match in ((torch.tensor([0, 2]), "row 2 is outside the batch of 2 rows"),
                       ([], "got no rows"), (torch.tensor([[0]]), "1-D integer index")):
        with pytest.raises(ValueError, match=f"CacheSet.reorder.*{match}"):
            caches.reorder(bad)
        assert all(torch.equal(a, b) for a, b in zip(caches.past(), before, strict=True))
    caches.reorder([1])
    assert all(c.batch == 1 for c in caches)
    assert torch.equal(caches.past()[0], before[0][1:])
