"""Tests of ``skip-ffn{policy=forecast}`` (Informed Routing) and its training in ``condfx.forecast``."""

from __future__ import annotations

import copy
import functools
import warnings

import pytest
import torch

import condfx
from condfx import forecast
from condfx.passes import PassError, apply
from condfx.passes.skip_ffn import SkipFFNConfig, measure_skip_fraction
from tests._data import require_data
from tests._helpers import max_abs_diff

SPEC = "skip-ffn{policy=forecast,cold_start=1,cold_end=1,rank=8,router_hidden=16,warmup=2}"


@functools.cache
def _stories():
    from condfx.models_zoo import load

    model, tok = load(require_data("stories260K.bin"))
    text = require_data("tinystories_valid_head.txt").read_text(encoding="utf-8")[300_000:330_000]
    return model.eval(), torch.tensor([tok.encode(text, bos=True, eos=False)])


@functools.cache
def _captured():
    model, _ = _stories()
    return condfx.capture(model, (torch.zeros(2, 8, dtype=torch.long),))


def _gm():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return copy.deepcopy(_captured())


@functools.cache
def _trained():
    """A forecast graph: forecasters fitted, routers trained 6 steps, biases set for 30% skip."""
    _, ids = _stories()
    gm = apply(_gm(), SPEC).graph_module
    before = {n: p.detach().clone() for n, p in gm.named_parameters() if "skip_ffn_router" in n}
    explained = forecast.fit_forecasters(gm, ids[:, :512])
    result = forecast.train_routers(gm, ids[:, 512:], target_skip=0.3, steps=6, seq_len=32)
    measured = forecast.set_skip_fraction(gm, ids[:, :256], 0.3)
    return gm, before, explained, result, measured


def _logits(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def test_matches_untrained_forecast_adds_parameters_and_keeps_outputs():
    gm = _gm()
    ids = torch.randint(3, 512, (2, 16), generator=torch.Generator().manual_seed(0))
    result = apply(gm, SPEC)
    out = result.graph_module
    report = result.reports[0]
    assert report.rewritten == 3 and report.params_added == 3 * (16 * 64 + 16 + 16 + 1 + 8 * 64 + 64 * 8 + 64)
    names = forecast.forecast_param_names(out)
    assert "layers.1.feed_forward.skip_ffn_router_w1" in names and len(names) == 21
    assert measure_skip_fraction(out, ids)["skipped_rows"] == 0
    torch.testing.assert_close(_logits(out(ids)), _logits(gm(ids)), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("field", "value"), [("rank", 0), ("router_hidden", 0), ("state", 3)])
def test_rejects_bad_forecast_config(field, value):
    with pytest.raises(ValueError, match=rf"SkipFFNConfig.{field} must be"):
        SkipFFNConfig(policy="forecast", **{field: value})


def test_numerics_fit_and_training_route_out_rows_and_use_the_forecast():
    gm, before, explained, result, measured = _trained()
    assert set(explained) == {0, 1, 2} and all(0.2 < v <= 1.0 for v in explained.values())
    assert result.steps == 6 and all(n.startswith("gm.") and "router" in n for n in result.trainable_params)
    changed = [n for n, p in gm.named_parameters() if n in before and not torch.equal(p, before[n])]
    assert any(n.endswith("router_w2") for n in changed)  # the gradient reached the routers
    assert abs(measured - 0.3) < 0.06
    _, ids = _stories()
    stats = measure_skip_fraction(gm, ids[:, 256:512])
    assert 0.15 < stats["fraction_of_all_ffn"] < 0.45
    # a routed-out row gets the forecast: zeroing the forecasters changes the outputs
    dropped = copy.deepcopy(gm)
    for n, p in dropped.named_parameters():
        if "skip_ffn_forecast" in n:
            p.data.zero_()
    assert (_logits(dropped(ids[:, :64])) - _logits(gm(ids[:, :64]))).abs().max() > 1e-3


def test_numerics_state_round_trip_and_decode_equals_full_sequence(tmp_path):
    from condfx.runtime import Session

    gm, *_ = _trained()
    path = tmp_path / "state.safetensors"
    forecast.save_state(gm, path)
    spec = SPEC[:-1] + f',state="{path}"}}'
    loaded = apply(_gm(), spec).graph_module
    _, ids = _stories()
    window = ids[:, 1000:1024]
    torch.testing.assert_close(_logits(loaded(window)), _logits(gm(window)), atol=0, rtol=0)
    model, _ = _stories()
    session = Session.from_model(model, passes=f"fuse-attention, {spec}")
    full = session.prefill(window)
    with session.count_ffn_skips() as counter:
        session.prefill(window[:, :3])
        steps = [session.step(window[:, i : i + 1]) for i in range(3, 24)]
    # condfx.verify's float32 exactness (atol + rtol * max|ref|): one-row steps run the forecasters'
    # low-rank matmuls with another BLAS blocking than the 24-row prefill, a rounding difference
    got, ref = torch.cat(steps, 1), full[:, 3:]
    assert max_abs_diff(got, ref) <= 1e-5 + 1e-5 * ref.abs().max().item()
    assert counter.rows == 24 * 3 and counter.ffn_layers == 5 and counter.masked_layers == 3
    want = measure_skip_fraction(loaded, window)
    assert counter.skipped == want["skipped_rows"] > 0
    assert counter.fraction_of_all_ffn == pytest.approx(want["fraction_of_all_ffn"])


def test_rejects_state_from_another_model(tmp_path):
    gm, *_ = _trained()
    path = tmp_path / "state.safetensors"
    forecast.save_state(gm, path, identity={"n_layers": 5, "dim": 64, "hash": "0000"})
    with pytest.raises(PassError, match=r"was made for a different model"):
        apply(_gm(), SPEC[:-1] + f',state="{path}"}}')
    with pytest.raises(PassError, match=r"does not exist"):
        apply(_gm(), SPEC[:-1] + f',state="{tmp_path / "nope.safetensors"}"}}')


def test_rejects_state_with_other_options(tmp_path):
    gm, *_ = _trained()
    path = tmp_path / "state.safetensors"
    forecast.save_state(gm, path)
    with pytest.raises(PassError, match=r"different cold regions, rank or router_hidden"):
        apply(_gm(), SPEC.replace("cold_start=1", "cold_start=2")[:-1] + f',state="{path}"}}')


@pytest.mark.parametrize("target", [0.0, 1.0, -0.2, 1.5, True])
def test_rejects_target_skip_outside_unit_interval(target):
    gm = apply(_gm(), SPEC).graph_module
    _, ids = _stories()
    with pytest.raises(ValueError, match=r"target_skip must be a number in \(0, 1\)"):
        forecast.train_routers(gm, ids, target_skip=target, steps=1)


def test_rejects_target_the_routed_layers_cannot_reach():
    gm = apply(_gm(), SPEC).graph_module
    _, ids = _stories()
    with pytest.raises(ValueError, match=r"needs more than every row of the 3 routed layers"):
        forecast.set_skip_fraction(gm, ids[:, :64], 0.7)


def test_rejects_graph_without_forecast_policy():
    gm = apply(_gm(), "skip-ffn{cold_start=1,cold_end=1}").graph_module
    with pytest.raises(ValueError, match=r"apply 'skip-ffn\{policy=forecast\}' first"):
        forecast.ForecastTraining(gm)


@pytest.mark.slow  # 60-190 s (a stories260K export); CI exports the policy on llama-tiny (test_masked_ffn_onnx)
def test_numerics_onnx_session_matches_torch_graph(tmp_path):
    from condfx.runtime import Session

    gm, *_ = _trained()
    path = tmp_path / "state.safetensors"
    forecast.save_state(gm, path)
    spec = "fuse-attention, " + SPEC[:-1] + f',state="{path}"}}'
    model, ids = _stories()
    window = ids[:, 2000:2014]
    session = Session.from_model(model, passes=spec, backend="onnx")
    session.prefill(window[:, :4])
    steps = torch.cat([session.step(window[:, i : i + 1]) for i in range(4, 14)], 1)
    assert measure_skip_fraction(gm, window)["skipped_rows"] > 0
    torch.testing.assert_close(steps, _logits(gm(window))[:, 4:], atol=1e-4, rtol=1e-4)
