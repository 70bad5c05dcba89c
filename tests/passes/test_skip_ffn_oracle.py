"""Tests of the oracle of ``skip-ffn{policy=forecast}`` and of its pupil, ``teacher=oracle``
(``condfx.forecast.oracle_labels`` / ``allocate`` / ``OraclePolicy`` / ``teach_routers``)."""

from __future__ import annotations

import copy
import functools

import pytest
import torch

import condfx
from condfx import forecast
from condfx.passes import apply
from condfx.passes.base import Budget, calibration_batches
from condfx.passes.skip_ffn import measure_skip_fraction
from tests._helpers import max_abs_diff
from tests.passes.test_skip_ffn_forecast import SPEC, _gm, _logits, _stories


@functools.cache
def _labelled():
    """A forecast graph with fitted forecasters and the oracle's labels on 4 x 128 tokens."""
    _, ids = _stories()
    gm = apply(_gm(), SPEC).graph_module
    cal = ids[:, :512].reshape(4, 128)
    forecast.fit_forecasters(gm, cal)
    return gm, cal, forecast.oracle_labels(gm, cal)


@functools.cache
def _taught():
    """teacher=oracle at a 30% target on 4 x 128 tokens."""
    _, ids = _stories()
    gm = apply(_gm(), SPEC).graph_module
    out = forecast.teach_routers(gm, ids[:, :512].reshape(4, 128), 0.3, steps=100)
    return gm, out


def _nll(logits, ids):
    return float(torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:]))


@pytest.mark.slow  # about 48 s on the loaded 2-core machine (fixture capture, 4 label and 2 policy forwards)
def test_numerics_oracle_labels_spend_the_budget_where_skipping_is_cheap():
    gm, cal, labels = _labelled()
    assert labels.cost.shape == labels.drop.shape == (3, 512) and labels.features.shape == (3, 512, 64)
    assert int((~labels.scored).sum()) == 4 * 2  # warmup=2 in each of the 4 rows
    assert bool((labels.sensitivity > 0).all())
    # a fitted forecast leaves less error than dropping the update, on average
    assert bool((labels.cost.mean(1) < labels.drop.mean(1)).all())
    alloc = forecast.allocate(gm, labels, 0.3)
    # 30% of all 5 FFN layers' rows, spent in the 3 routed layers
    assert float((alloc.fractions * labels.scored.sum()).sum()) == pytest.approx(0.3 * 5 * 512, abs=2)
    _, ids = _stories()
    window = ids[:, 3000:3160]
    oracle = forecast.OraclePolicy(gm, alloc)
    got = _nll(oracle(window), window)
    measured = oracle.skipped / (oracle.rows * 5)
    assert 0.12 < measured < 0.4  # the online oracle sees the perturbed stream: it skips a little less
    # the same number of skips spent on the most expensive rows costs more: the labels rank
    worst = forecast.Allocation(0.3, alloc.fractions, alloc.thresholds)
    run = forecast._Routed(gm, lambda i, x, h, f, w: _expensive_first(gm, i, x, h, f, measured * 5 / 3))
    with torch.no_grad():
        bad = _nll(_logits(run.run(window)), window)
    assert worst.target == 0.3 and got < bad


def _expensive_first(gm, i, x, h, f, share):
    cost = forecast._local_cost(h, f, forecast._forecast_of(gm, forecast._routed(gm)[i]["ffn"], x))
    return cost < torch.quantile(cost.flatten(), 1 - share)


def test_numerics_oracle_taught_routers_rank_like_the_oracle_and_hit_the_target():
    gm, out = _taught()
    assert set(out["spearman"]) == {0, 1, 2} and all(r > 0.5 for r in out["spearman"].values())
    assert abs(out["measured"] - 0.3) < 0.06
    _, ids = _stories()
    assert 0.15 < measure_skip_fraction(gm, ids[:, 1000:1256])["fraction_of_all_ffn"] < 0.45


@pytest.mark.slow  # about 200 s on the loaded 2-core machine (two Sessions, one ONNX export)
def test_numerics_oracle_taught_state_exports_and_decodes_like_the_forecast_one(tmp_path):
    from condfx.runtime import Session

    gm, _ = _taught()
    path = tmp_path / "oracle.safetensors"
    forecast.save_state(gm, path)
    spec = SPEC[:-1] + f',state="{path}"}}'
    loaded = apply(_gm(), spec).graph_module
    model, ids = _stories()
    window = ids[:, 2000:2016]
    torch.testing.assert_close(_logits(loaded(window)), _logits(gm(window)), atol=0, rtol=0)
    assert measure_skip_fraction(loaded, window)["skipped_rows"] > 0
    for backend in ("torch", "onnx"):
        session = Session.from_model(model, passes=f"fuse-attention, {spec}", backend=backend)
        session.prefill(window[:, :4])
        steps = torch.cat([session.step(window[:, i : i + 1]) for i in range(4, 16)], 1)
        ref = _logits(gm(window))[:, 4:]
        assert max_abs_diff(steps, ref) <= 1e-4 + 1e-4 * ref.abs().max().item(), backend


@pytest.mark.slow  # about 37 s on the loaded 2-core machine
def test_teacher_oracle_runs_in_the_life_cycle_with_progress():
    model, ids = _stories()
    gm = condfx.capture(model, (torch.zeros(2, 8, dtype=torch.long),))
    budget = Budget(tokens=256, seq_len=128, skip_target=0.25)
    seen = []
    result = condfx.apply(gm, SPEC[:-1] + ",teacher=oracle}", calib=calibration_batches(ids[0].tolist(), budget),
                          budget=budget, progress=lambda stage, done, total: seen.append((stage, done, total)))
    record = result.calibrations[0]
    assert record.calibrated and "routers fitted to the oracle" in record.summary
    assert ("skip-ffn: oracle labels", 4, 4) in seen and ("skip-ffn: routers fitted to the oracle", 3, 3) in seen
    assert len(record_state := [k for k in result.state if "router_w1" in k]) == 3, record_state
    measured = measure_skip_fraction(result.graph_module, ids[:, 600:760])["fraction_of_all_ffn"]
    assert 0.1 < measured < 0.4


@pytest.mark.parametrize("target", [0.0, 1.0, -0.1, 1.2, True])
def test_rejects_target_outside_unit_interval(target):
    gm = apply(_gm(), SPEC).graph_module
    _, ids = _stories()
    with pytest.raises(ValueError, match=r"^teach_routers target_skip must be a number in \(0, 1\); got"):
        forecast.teach_routers(gm, ids[:, :128], target)


def test_rejects_too_short_calibration_text():
    gm = apply(_gm(), SPEC).graph_module
    _, ids = _stories()
    with pytest.raises(ValueError, match=r"^teach_routers needs at least 64 calibration tokens .* got 1 x 40\.$"):
        forecast.teach_routers(gm, ids[:, :40], 0.2)
    model, _ = _stories()
    with pytest.raises(ValueError, match=r"calibration text gives 40 tokens; skip-ffn needs at least 64"):
        condfx.apply(condfx.capture(model, (torch.zeros(2, 8, dtype=torch.long),)), SPEC[:-1] + ",teacher=oracle}",
                     calib=[ids[:, :40]], budget=Budget(tokens=64, seq_len=40))


def test_rejects_teacher_with_the_similarity_policy():
    from condfx.passes.skip_ffn import SkipFFNConfig

    with pytest.raises(ValueError, match=r"SkipFFNConfig.teacher is not read by policy=similarity; got teacher=oracle:"):
        SkipFFNConfig(teacher="oracle")
    assert copy.copy(SkipFFNConfig(policy="forecast", teacher="oracle")).teacher.value == "oracle"
