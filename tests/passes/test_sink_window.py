"""Tests of ``sink-window``: matches, rejections, numerics (exact while nothing is evicted), golden, idempotence."""

from __future__ import annotations

import copy
import functools
import warnings

import pytest
import torch

import condfx
from condfx.graph_text import graph_text
from condfx.passes.sink_window import SINK_WINDOW, SinkWindow, SinkWindowConfig


@functools.cache
def _captured(name: str, t: int = 12):
    from condfx.models_zoo import build_zoo

    model = build_zoo(name).eval()
    torch.manual_seed(0)
    ids = torch.randint(0, 128, (2, t))
    return model, condfx.capture(model, (ids,)), ids


def _gm(name: str):
    model, gm, ids = _captured(name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return model, copy.deepcopy(gm), ids


def _ops(gm):
    return [n for n in gm.graph.nodes if n.target is SINK_WINDOW]


@pytest.mark.parametrize("name", ["llama-tiny", "qwen3-tiny", "llama-tiny-eager"])
def test_matches_every_attention_region(name):
    _, gm, _ = _gm(name)
    result = SinkWindow(SinkWindowConfig(sink=2, window=4))(gm)
    assert result.modified and result.report.matched == result.report.rewritten == 2
    assert [n.args[6:] for n in _ops(result.graph_module)] == [(2, 4)] * 2
    assert not any(n.target is torch.ops.aten.scaled_dot_product_attention.default
                   for n in result.graph_module.graph.nodes)


def test_matches_selected_layers_and_idempotent():
    _, gm, _ = _gm("llama-tiny")
    result = SinkWindow(SinkWindowConfig(sink=1, window=3, layers=(1,)))(gm)
    assert result.report.rewritten == 1 and len(_ops(result.graph_module)) == 1
    again = SinkWindow(SinkWindowConfig(sink=1, window=3, layers=(1,)))(result.graph_module)
    assert not again.modified and again.report.rewritten == 0
    assert ("already sink-window", "node " + _ops(result.graph_module)[0].name) in again.report.skipped


def test_rejects_models_without_rope():
    _, gm, _ = _gm("gpt2-tiny")
    before = graph_text(gm)
    result = SinkWindow(SinkWindowConfig())(gm)
    assert not result.modified and result.report.rewritten == 0
    assert all(reason.startswith("no RoPE") for reason, _ in result.report.skipped)
    assert graph_text(result.graph_module) == before


def test_rejects_bad_options():
    with pytest.raises(ValueError, match=r"SinkWindowConfig.window must be an int >= 1; got 0"):
        SinkWindowConfig(window=0)
    with pytest.raises(ValueError, match=r"SinkWindowConfig.sink must be an int >= 0; got -1"):
        SinkWindowConfig(sink=-1)
    with pytest.raises(ValueError, match=r"SinkWindowConfig.layers must be a list"):
        SinkWindowConfig(layers=(-1,))


@pytest.mark.parametrize("name", ["llama-tiny", "qwen3-tiny"])
def test_numerics_exact_while_nothing_is_evicted(name):
    """window >= T: every query still reads every earlier token at its own position."""
    model, gm, ids = _gm(name)
    out = SinkWindow(SinkWindowConfig(sink=2, window=ids.shape[1]))(gm).graph_module
    with torch.no_grad():
        want = model(ids)
        want = want.logits if hasattr(want, "logits") else want
        got = out(ids)
    assert (got - want).abs().max().item() < 1e-5


def test_numerics_lossy_beyond_the_window_and_plain_window_differs():
    model, gm, ids = _gm("llama-tiny")
    out = SinkWindow(SinkWindowConfig(sink=2, window=4))(gm).graph_module
    no_sink = SinkWindow(SinkWindowConfig(sink=0, window=4))(_gm("llama-tiny")[1]).graph_module
    with torch.no_grad():
        dense = model(ids)
        a, b = out(ids), no_sink(ids)
    assert torch.isfinite(a).all()
    assert (a - dense).abs().max().item() > 1e-3 and (a - b).abs().max().item() > 1e-3
    # the first window tokens see everything either way
    assert (a[:, :4] - dense[:, :4]).abs().max().item() < 1e-5


def test_golden_graph_llama_tiny_layer_0():
    _, gm, _ = _gm("llama-tiny")
    out = SinkWindow(SinkWindowConfig(sink=2, window=4, layers=(0,)))(gm).graph_module
    text = graph_text(out)
    assert "condfx.sink_window_attention.default(" in text
    line = next(ln for ln in text.splitlines() if "sink_window_attention" in ln)
    assert line.rstrip().endswith(", 2, 4)"), line
    assert "sink_window_inv_freq" in text
