"""The pass life cycle (``condfx.lifecycle`` + ``passes.pipeline.apply(calib=...)``): each lossy pass's
stages run behind ``condfx.apply``, their learned state round-trips through safetensors and is
refused for another model, and a pass applied without calibration text says what that costs."""

from __future__ import annotations

import copy
import functools
import warnings

import pytest
import torch

import condfx
from condfx.eval.tasks import MQARConfig, build_mqar_model, make_mqar_batch
from condfx.kv_calibrate import META_KEY
from condfx.l2a import L2ARecipe, train_l2a
from condfx.lifecycle import CALIBRATORS, load_state, save_state
from condfx.passes.base import Budget, Need, calibration_batches
from condfx.passes.skip_ffn import measure_skip_fraction
from condfx.patterns.routed import find_routed_layers
from tests._data import require_data

TASK = MQARConfig(vocab_size=32, num_pairs=2, gap=8, seq_len=16)


@functools.cache
def _stories():
    from condfx.models_zoo import load

    model, tok = load(str(require_data("stories260K.bin")))
    text = require_data("tinystories_valid_head.txt").read_text()
    ids = tok.encode(text, bos=True, eos=False)[:1024]
    return condfx.capture(model, (torch.zeros(2, 8, dtype=torch.long),)), ids


def _mqar():
    model = build_mqar_model(TASK, dim=32).eval()
    ids, _ = make_mqar_batch(TASK, 2, torch.Generator().manual_seed(0))
    return condfx.capture(model, (ids,)), ids


def _quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return fn(*args, **kwargs)


@pytest.mark.slow  # about 50 s on the loaded 2-core machine
def test_skip_ffn_is_calibrated_for_the_target_inside_apply():
    gm, ids = _stories()
    budget = Budget(tokens=512, seq_len=128, skip_target=0.25)
    seen = []
    result = _quiet(condfx.apply, gm, "skip-ffn", calib=calibration_batches(ids, budget), budget=budget,
                    progress=lambda stage, done, total: seen.append((stage, done, total)))
    record = result.calibrations[0]
    assert record.need is Need.CALIBRATION and record.calibrated
    assert "threshold=" in record.spec and "target skip 0.25" in record.summary
    assert seen[-1] == ("skip-ffn: similarity", 1, 1)
    measured = measure_skip_fraction(result.graph_module, torch.tensor([ids[:256]]))["fraction_of_all_ffn"]
    assert abs(measured - 0.25) < 0.1  # the default threshold 0.9 skips another fraction
    assert "calibration: threshold" in str(result.report)


def test_lossy_pass_without_calibration_text_runs_and_says_what_it_costs():
    gm, _ = _stories()
    result = _quiet(condfx.apply, gm, "skip-ffn")
    record = result.calibrations[0]
    assert not record.calibrated and record.summary == CALIBRATORS["skip-ffn"].without
    assert record.summary.endswith(".") and ". " not in record.summary and "default threshold 0.9" in record.summary
    assert CALIBRATORS["skip-ffn"].without in str(result.report)


def test_klt_statistics_are_recorded_by_the_pipeline_and_kivi_needs_none():
    gm, ids = _stories()
    budget = Budget(tokens=256, seq_len=128)
    spec = "fuse-attention, quantize-kv{method=xquant,latent=klt,group=4,residual=4,k_budget=4,v_budget=4}"
    result = _quiet(condfx.apply, gm, spec, calib=calibration_batches(ids, budget), budget=budget)
    record = result.calibrations[1]
    assert record.need is Need.CALIBRATION and record.calibrated and "over 248 tokens" in record.summary
    assert any(k.startswith("1.before.kv_stats.0.") for k in result.state)
    assert META_KEY not in gm.meta  # the caller's graph is untouched
    kivi = _quiet(condfx.apply, gm, "fuse-attention, quantize-kv{method=kivi,bits=2}",
                  calib=calibration_batches(ids, budget), budget=budget)
    assert kivi.calibrations[1].need is Need.NONE and not kivi.calibrations[1].state


@pytest.mark.slow  # about 30 s
def test_route_attention_trains_prune_global_calibrates_and_the_state_round_trips(tmp_path):
    gm, ids = _mqar()
    budget = Budget(tokens=256, seq_len=16, steps=3, route_target=0.3)
    batches = [make_mqar_batch(TASK, 1, torch.Generator().manual_seed(i))[0] for i in range(16)]
    spec = "route-attention{window=4}, prune-global{max_fraction=1.0}"
    result = _quiet(condfx.apply, gm, spec, calib=batches, budget=budget)
    train, prune = result.calibrations
    assert train.need is Need.TRAINING and "L2A trained 3 steps" in train.summary
    assert prune.need is Need.CALIBRATION and "routed fraction per L2A layer" in prune.summary
    assert any(".l2a.route_stats" in k for k in prune.state)
    assert not find_routed_layers(result.graph_module)  # every layer pruned (max_fraction=1.0)
    path = tmp_path / "state.safetensors"
    save_state(result, gm, path)
    again = _quiet(load_state, path, gm)
    torch.testing.assert_close(again.graph_module(ids), result.graph_module(ids), atol=0, rtol=0)
    other = copy.deepcopy(gm)
    with torch.no_grad():
        next(other.parameters()).add_(0.5)  # other weights, same shapes
    with pytest.raises(ValueError, match="was made for a different model .* recalibrate for this model"):
        load_state(path, other)


def test_calibration_text_shorter_than_a_pass_needs_is_refused_with_the_count():
    gm, _ = _mqar()
    budget = Budget(tokens=64, seq_len=16)
    few = [torch.zeros(1, 16, dtype=torch.long)]
    with pytest.raises(ValueError, match=r"calibration text gives 16 tokens; route-attention needs at least 32"):
        condfx.apply(gm, "route-attention{window=4}", calib=few, budget=budget)


def test_train_l2a_stops_at_its_time_budget_after_a_whole_step():
    gm, _ = _mqar()
    routed = _quiet(condfx.apply, copy.deepcopy(gm), "route-attention{window=4}").graph_module
    done = []
    out = train_l2a(routed, lambda step, g: make_mqar_batch(TASK, 2, g), L2ARecipe(steps=50, warmup=1),
                    progress=False, seconds=1e-9, on_step=lambda d, t: done.append((d, t)))
    assert len(out.losses) == 1 and done == [(1, 50)]
