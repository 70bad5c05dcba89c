"""skip-ffn at run time: the KV cache equals the dense one in layout and bytes; the skip fraction is counted."""

from __future__ import annotations

import functools

import pytest
import torch

from condfx.runtime import Session
from tests._data import require_data

SIMILARITY = "skip-ffn{threshold=0.5,span=2,cold_start=1,cold_end=1,warmup=4}"


@functools.cache
def _model():
    from condfx.models_zoo import load

    model, _ = load(require_data("stories260K.bin"))
    return model.eval()


def _run(session: Session, ids: torch.Tensor, prompt: int) -> torch.Tensor:
    session.prefill(ids[:, :prompt])
    return torch.cat([session.step(ids[:, i : i + 1]) for i in range(prompt, ids.shape[1])], 1)


def test_numerics_kv_cache_has_the_dense_layout_and_bytes():
    ids = torch.randint(3, 512, (2, 20), generator=torch.Generator().manual_seed(3))
    dense = Session.from_model(_model(), passes="fuse-attention")
    skip = Session.from_model(_model(), passes=f"fuse-attention, {SIMILARITY}")
    _run(dense, ids, 6)
    skip.prefill(ids[:, :6])
    with skip.count_ffn_skips() as counter:  # decode steps only
        for i in range(6, 20):
            skip.step(ids[:, i : i + 1])
    assert counter.rows == 2 * 14 * 3 and counter.ffn_layers == 5 and counter.masked_layers == 3
    assert 0 < counter.skipped <= counter.rows  # rows really skipped, yet the cache is the same size
    assert counter.fraction_of_all_ffn == pytest.approx(counter.skipped / (2 * 14 * 5))
    assert len(skip.caches) == len(dense.caches) == 5
    assert skip.cache_bytes() == dense.cache_bytes() and skip.position == dense.position == 20
    for a, b in zip(skip.caches, dense.caches, strict=True):
        assert type(a) is type(b)
        for x, y in zip(a.past(), b.past(), strict=True):
            assert x.shape == y.shape == (2, 4, 20, 8) and x.dtype == y.dtype
            # warm-up positions run every FFN: their keys/values are the dense ones
            torch.testing.assert_close(x[:, :, :4], y[:, :, :4], atol=1e-5, rtol=1e-5)
    # later positions' values shift (skipped FFNs change the residual stream), their size does not
    assert any(not torch.equal(a.past()[1], b.past()[1]) for a, b in zip(skip.caches, dense.caches, strict=True))


def test_rejects_counting_without_skip_ffn():
    from types import SimpleNamespace

    plain = Session(SimpleNamespace(layers=(), gm=SimpleNamespace(meta={})))
    with pytest.raises(ValueError, match=r"needs the PyTorch backend running a graph rewritten by skip-ffn"):
        plain.count_ffn_skips()


@pytest.mark.parametrize("target", [0.0, 1.0, 1.2, -0.5])
def test_rejects_calibration_target_outside_unit_interval(target):
    from condfx.calibrate import calibrate_similarity

    with pytest.raises(ValueError, match=r"target_skip must be a number in \(0, 1\)"):
        calibrate_similarity(_model(), torch.zeros(1, 8, dtype=torch.long), target_skip=target)
