"""Tests of ``skip-ffn``: matches, rejections, numerics, golden graph, decode equality, calibration."""

from __future__ import annotations

import copy
import functools
import json
import warnings

import pytest
import torch
from expecttest import assert_expected_inline
from torch import nn

import condfx
from condfx.graph_text import graph_text
from condfx.passes import PassError, apply
from condfx.passes.op_args import op_arg
from condfx.passes.skip_ffn import (
    COUNTDOWN_FFN,
    MASKED_FFN,
    SkipFFN,
    SkipFFNConfig,
    measure_skip_fraction,
)
from tests._data import require_data

NOTHING_SKIPS = "skip-ffn{threshold=1.0,span=1,cold_start=0,cold_end=1,warmup=0}"


def _logits(out):
    return out[0] if isinstance(out, (tuple, list)) else out


@functools.cache
def _model(name: str):
    if name == "stories260K":
        from condfx.models_zoo import load

        model, _ = load(require_data("stories260K.bin"))
        return model.eval()
    from condfx.models_zoo import build_zoo

    return build_zoo(name)


@functools.cache
def _captured(name: str):
    torch.manual_seed(0)
    ids = torch.randint(0, 128, (2, 12))
    return condfx.capture(_model(name), (ids,)), ids


def _gm(name: str):
    gm, ids = _captured(name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return copy.deepcopy(gm), ids


def _masked(gm):
    return [n for n in gm.graph.nodes if n.target in (MASKED_FFN, COUNTDOWN_FFN)]


@pytest.mark.parametrize("name", ["llama-tiny", "gpt2-tiny"])
def test_matches_ffn_regions_outside_cold_layers(name):
    gm, _ = _gm(name)
    result = SkipFFN(SkipFFNConfig(cold_start=1, cold_end=0))(gm)
    assert result.modified and result.report.matched == 2 and result.report.rewritten == 1
    assert result.report.skipped == (("cold region", "layer 0"),)
    (node,) = _masked(result.graph_module)
    assert op_arg(node, "kind") == ("swiglu" if name == "llama-tiny" else "gelu-mlp")
    weights = [op_arg(node, w) for w in ("w_up", "b_up", "w_gate", "b_gate", "w_down", "b_down")]
    assert all(a.op == "get_attr" for a in weights if isinstance(a, torch.fx.Node))
    assert node.meta["val"][0].dtype == torch.float32


def test_matches_idempotent():
    gm, _ = _gm("llama-tiny")
    once = SkipFFN(SkipFFNConfig(cold_start=0, cold_end=1))(gm).graph_module
    again = SkipFFN(SkipFFNConfig(cold_start=0, cold_end=1))(once)
    assert not again.modified and again.report.skipped[0][0] == "already rewritten"


@pytest.mark.parametrize(
    ("field", "value"),
    [("threshold", 0.0), ("threshold", 1.5), ("span", 0), ("cold_start", -1), ("warmup", True), ("policy", "x")],
)
def test_rejects_bad_config(field, value):
    with pytest.raises(ValueError, match=rf"SkipFFNConfig.{field} must be"):
        SkipFFNConfig(**{field: value})


def test_rejects_cold_regions_covering_every_layer():
    gm, _ = _gm("llama-tiny")
    with pytest.raises(PassError, match=r"cold_start=1 \+ cold_end=1 leave none of the 2 FFN layers"):
        apply(gm, "skip-ffn{cold_start=1,cold_end=1}")


def test_rejects_model_without_ffn():
    gm = condfx.capture(nn.Sequential(nn.Linear(4, 4)), (torch.randn(2, 3, 4),))
    with pytest.raises(PassError, match=r"skip-ffn matched no FFN region"):
        apply(gm, "skip-ffn{cold_start=0,cold_end=0}")


@pytest.mark.parametrize("name", ["llama-tiny", "gpt2-tiny", "stories260K"])
def test_numerics_nothing_skipped_gives_original_logits(name):
    gm, ids = _gm(name)
    result = apply(gm, NOTHING_SKIPS)
    assert measure_skip_fraction(result.graph_module, ids)["skipped_rows"] == 0
    diff = (_logits(result.graph_module(ids)) - _logits(gm(ids))).abs().max().item()
    assert diff <= 1e-5


def test_numerics_skipping_changes_logits_and_is_measured():
    gm, ids = _gm("stories260K")
    result = apply(gm, "skip-ffn{threshold=0.5,span=1,cold_start=1,cold_end=1,warmup=2}")
    stats = measure_skip_fraction(result.graph_module, ids)
    assert stats["fraction"] > 0 and stats["ffn_layers"] == 5
    diff = (_logits(result.graph_module(ids)) - _logits(gm(ids))).abs().max().item()
    assert diff > 1e-3
    # warm-up tokens run every FFN: their logits are unchanged
    warm = (_logits(result.graph_module(ids))[:, :2] - _logits(gm(ids))[:, :2]).abs().max().item()
    assert warm <= 1e-5


def test_numerics_full_sequence_equals_token_by_token_decoding():
    from condfx.runtime import Session

    model = _model("stories260K")
    spec = "fuse-attention, skip-ffn{threshold=0.5,span=2,cold_start=1,cold_end=1,warmup=3}"
    session = Session.from_model(model, passes=spec)
    ids = torch.randint(3, 512, (1, 10), generator=torch.Generator().manual_seed(0))
    full = session.prefill(ids)
    session.prefill(ids[:, :2])
    steps = [session.step(ids[:, i : i + 1]) for i in range(2, 10)]
    torch.testing.assert_close(torch.cat(steps, 1), full[:, 2:], atol=1e-5, rtol=1e-5)
    gm, _ = _gm("stories260K")
    plain = apply(gm, spec).graph_module
    assert measure_skip_fraction(plain, ids)["fraction"] > 0


_POLICY_OPS = ("select", "zeros_like", "lt.", "eq.", "bitwise", "masked_ffn", "getitem", "ge.", "logical",
               "sub.", "clamp_min", "where")


def test_golden_llama_tiny():
    gm, _ = _gm("llama-tiny")
    result = SkipFFN(SkipFFNConfig(threshold=0.9, span=2, cold_start=0, cold_end=0, warmup=4))(gm)
    lines = graph_text(result.graph_module).splitlines()
    policy = [line for line in lines if any(op in line for op in _POLICY_OPS)]
    assert_expected_inline("\n".join(policy), """\
%3 = aten.arange.default(%1, dtype=torch.float32, device=cpu, pin_memory=False)
%55 = aten.select.int(%54, -1, 0)
%56 = aten.zeros_like.default(%55, dtype=torch.int64)
%57 = aten.lt.Scalar(%3, 4)
%58 = aten.zeros_like.default(%55, dtype=torch.bool)
%59 = aten.bitwise_or.Tensor(%58, %57)
%60 = condfx.countdown_masked_ffn.default(%54, %47, %56, %59, %layers.0.feed_forward.w3.weight, None, %layers.0.feed_forward.w1.weight, None, %layers.0.feed_forward.w2.weight, None, 'swiglu', 'silu', 'out_in', 0.9, 2)
%61 = getitem(%60, 0)
%62 = getitem(%60, 1)
%108 = condfx.countdown_masked_ffn.default(%107, %100, %62, %59, %layers.1.feed_forward.w3.weight, None, %layers.1.feed_forward.w1.weight, None, %layers.1.feed_forward.w2.weight, None, 'swiglu', 'silu', 'out_in', 0.9, 2)
%109 = getitem(%108, 0)""")


def test_calibration_round_trip_and_rejects_other_model(tmp_path):
    from condfx.calibrate import SkipCalibration, calibrate_similarity

    gm, _ = _gm("stories260K")
    ids = torch.randint(3, 512, (2, 24), generator=torch.Generator().manual_seed(1))
    cal = calibrate_similarity(gm, ids, target_skip=0.2)
    assert 0.0 < cal.measured_skip and cal.config().threshold <= 1.0
    path = tmp_path / "cal.json"
    cal.save(path)
    assert SkipCalibration.load(path, gm) == cal
    other, _ = _gm("llama-tiny")
    with pytest.raises(ValueError, match=r"was made for a different model"):
        SkipCalibration.load(path, other)
    data = json.loads(path.read_text())
    assert data["identity"]["n_layers"] == 5
