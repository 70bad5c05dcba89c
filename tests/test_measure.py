"""``condfx.measure``: the figures ``condfx optimize`` reports, measured on a tiny model."""

from __future__ import annotations

import warnings

import pytest
import torch

import condfx
from condfx.eval.tasks import MQARConfig, build_mqar_model, make_mqar_batch
from condfx.measure import (
    MeasureConfig,
    full_precision_window,
    greedy_agreement,
    measure_point,
    ratios,
)
from condfx.passes.spec import build_passes

TASK = MQARConfig(vocab_size=32, num_pairs=2, gap=8, seq_len=16)
CFG = MeasureConfig(context=16, kv_context=16, prefill_tokens=8, decode_tokens=2, repeats=1)


def _gm():
    torch.manual_seed(0)
    model = build_mqar_model(TASK, dim=32).eval()
    ids, _ = make_mqar_batch(TASK, 2, torch.Generator().manual_seed(0))  # batch 2: the batch stays dynamic
    return condfx.capture(model, (ids,)), torch.cat([ids[:1], ids[1:]], dim=1)


def test_points_read_the_session_caches_and_see_kv_quantization():
    gm, ids = _gm()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        kivi = condfx.apply(gm, "fuse-attention, quantize-kv{method=kivi,bits=2,group=8,residual=4}").graph_module
    dense, small = (measure_point(label, g, ids, CFG, None) for label, g in (("original", gm), ("kivi", kivi)))
    assert dense.session_error is None and small.session_error is None
    assert dense.kv_bytes_per_token == 2 * 2 * 32 * 4  # k and v, 2 layers, 32 channels, float32
    assert small.kv_bytes_per_token < dense.kv_bytes_per_token / 2
    assert small.ppl != dense.ppl and dense.tokens == ids.shape[1] - 1
    assert dense.skip_fraction is None and dense.route_fraction is None
    assert dense.prefill_tps > 0 and dense.decode_tps > 0 and dense.peak_bytes > 0
    assert ratios(dense, small)["kv_bytes_per_token"] == small.kv_bytes_per_token / dense.kv_bytes_per_token


def test_greedy_agreement_and_full_precision_window():
    gm, ids = _gm()
    same = greedy_agreement(gm, gm, ids[:, :8], 4, None)
    assert same == {"tokens": 4, "agreement": 1.0, "first_difference": None}
    spec = "route-attention{window=24}, quantize-kv{method=kivi,bits=2,residual=32,sink=4}"
    assert full_precision_window(build_passes(spec)) == 36
    assert full_precision_window(build_passes("fuse-attention")) == 0


def test_kv_context_override_and_perplexity_only_points():
    gm, ids = _gm()
    short = measure_point("original", gm, ids, CFG, None, kv_context=8)
    assert short.kv_context == 8 and short.kv_bytes_per_token == 2 * 2 * 32 * 4  # dense: the same per token
    bare = measure_point("alone", gm, ids, CFG, None, session=False)
    assert bare.ppl == short.ppl and bare.kv_bytes_per_token is None and bare.decode_tps is None


@pytest.mark.slow  # an ONNX export of the decode graph (about 2.5x the session test above)
def test_onnx_agreement_greedy_and_same_cache_step(tmp_path):
    pytest.importorskip("onnxruntime")
    from condfx.export_bundle import export_decode_graph
    from condfx.measure import onnx_agreement

    gm, ids = _gm()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        spec = "fuse-attention, quantize-kv{method=kivi,bits=4,group=8,residual=4}, add-kv-cache"
        decode = condfx.apply(gm, spec).graph_module
        export_decode_graph(decode, tmp_path, verify=False)
    found = onnx_agreement(decode, tmp_path, ids[:, :20], 4)
    assert found["prompt_tokens"] == 20 and found["greedy_tokens"] == 4
    assert found["greedy_equal"] and found["first_difference"] is None
    assert found["same_cache_max_abs_diff"] < 1e-3


def test_fractions_cover_the_whole_evaluation_text_window_by_window():
    """The measured skip / route fractions read every evaluation token, window by window of the
    context, averaged by tokens (a one-token tail, which cannot show a decision, is left out)."""
    from condfx.measure import _over_windows

    def mean(w: torch.Tensor) -> float:  # a "fraction" that shows which tokens it was given
        return float(w.float().mean())

    assert _over_windows(mean, torch.arange(10)[None], 4) == 4.5  # windows 0-3, 4-7, 8-9
    assert _over_windows(mean, torch.arange(9)[None], 4) == 3.5  # the tail [8] is left out
    assert _over_windows(mean, torch.arange(3)[None], 8) == 1.0  # one window shorter than the context
