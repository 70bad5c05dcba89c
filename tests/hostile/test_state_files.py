"""Hostile state files: made for other weights, partial, NaN, corrupt or predating the weights hash.

Each kind of state file (skip-ffn forecast state, trained-parameter files of ``condfx.train`` /
L2A, skip-ffn calibrations, KV statistics for ``latent=klt``, the demo's cached model) is refused
with one sentence naming the file (or the layer) and the problem. Files are written here.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import condfx
from condfx import forecast
from condfx.cli import main
from condfx.passes import PassError
from condfx.train import load_trained, save_trained
from tests.hostile._stories import stories_graph

pytestmark = pytest.mark.usefixtures("one_thread")

SPEC = "skip-ffn{policy=forecast,rank=4,router_hidden=8}"


def _with_state(path) -> str:
    return SPEC[:-1] + f',state="{path}"}}'


@pytest.fixture(scope="module")
def forecast_state(tmp_path_factory):
    """A forecast state file for stories260K (untrained routers), and its tensors and metadata."""
    path = tmp_path_factory.mktemp("state") / "state.safetensors"
    gm = condfx.apply(stories_graph(), SPEC).graph_module
    forecast.save_state(gm, path)
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    return path, load_file(str(path)), meta


def _single_sentence(exc: BaseException) -> str:
    text = str(exc)
    assert "\n" not in text, text
    return text


def test_forecast_state_round_trips(forecast_state):
    path, _, _ = forecast_state
    assert condfx.apply(stories_graph(), _with_state(path)).modified


def test_rejects_forecast_state_for_other_weights(forecast_state):
    path, _, _ = forecast_state
    gm = stories_graph()
    with torch.no_grad():  # same shapes, one weight changed: the old identity (shapes + 8 values) passed it
        gm.get_parameter(next(n for n, _ in gm.named_parameters() if "w2" in n)).mul_(1.01)
    with pytest.raises(PassError, match=r"was made for a different model \(n_layers 5, dim 64, weights sha256 "):
        condfx.apply(gm, _with_state(path))


@pytest.mark.parametrize("damage", ["nan", "partial", "corrupt", "old-identity"])
def test_rejects_damaged_forecast_state(forecast_state, tmp_path, damage):
    _, tensors, meta = forecast_state
    path = tmp_path / "bad.safetensors"
    tensors = dict(tensors)
    first = sorted(tensors)[0]
    if damage == "nan":
        tensors[first] = torch.full_like(tensors[first], float("nan"))
    elif damage == "partial":
        del tensors[first]
    elif damage == "old-identity":
        meta = {**meta, "identity": json.dumps({"n_layers": 5, "dim": 64, "hash": "0123456789abcdef"})}
    if damage == "corrupt":
        path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    else:
        save_file(tensors, str(path), metadata=meta)
    pattern = {
        "nan": r"holds NaN or infinite values in '" + first,
        "partial": r"is incomplete or altered: missing \['" + first,
        "corrupt": r"is not a readable safetensors file",
        "old-identity": r"by an older condfx: it carries no weights hash; retrain it",
    }[damage]
    with pytest.raises(PassError) as info:
        condfx.apply(stories_graph(), _with_state(path))
    assert "bad.safetensors" in _single_sentence(info.value)
    assert info.match(pattern)


class _Tiny(nn.Module):
    def __init__(self, seed: int):
        super().__init__()
        torch.manual_seed(seed)
        self.body = nn.Linear(4, 4)
        self.head = nn.Linear(4, 3)


@pytest.mark.parametrize("damage", ["other-weights", "nan", "partial", "corrupt", "no-identity"])
def test_rejects_damaged_trained_parameters(tmp_path, damage):
    path = tmp_path / "trained.safetensors"
    save_trained(_Tiny(0), ["head.weight", "head.bias"], path)
    target = _Tiny(0)
    if damage == "other-weights":
        target = _Tiny(1)  # same shapes, other frozen weights
    elif damage == "corrupt":
        path.write_bytes(path.read_bytes()[:40])
    else:
        tensors = load_file(str(path))
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata()
        if damage == "nan":
            tensors["head.bias"][0] = float("inf")
        elif damage == "partial":
            del tensors["head.bias"]
        else:
            meta = {}
        save_file(tensors, str(path), metadata=meta)
    pattern = {
        "other-weights": r"was made for a different model \(tensors 2, weights sha256 \w+\) than this one",
        "nan": r"holds NaN or infinite values in 'head.bias'",
        "partial": r"is incomplete or altered: missing \['head.bias'\]",
        "corrupt": r"is not a readable safetensors file",
        "no-identity": r"carries no weights hash; retrain it for this model",
    }[damage]
    with pytest.raises(ValueError, match=pattern) as info:
        load_trained(target, path)
    assert "trained.safetensors" in _single_sentence(info.value)


def test_trained_parameters_round_trip(tmp_path):
    path = tmp_path / "trained.safetensors"
    source = _Tiny(0)
    with torch.no_grad():
        source.head.weight.add_(1.0)
    save_trained(source, ["head.weight", "head.bias"], path)
    target = _Tiny(0)
    assert load_trained(target, path) == ["head.bias", "head.weight"]
    assert torch.equal(target.head.weight, source.head.weight)


def test_rejects_calibration_without_weights_hash(tmp_path):
    from condfx.calibrate import SkipCalibration

    data = {"threshold": 0.9, "span": 1, "cold_start": 1, "cold_end": 1, "warmup": 0, "target_skip": 0.2,
            "simulated_skip": 0.2, "measured_skip": 0.2, "profile": [0.5] * 5,
            "identity": {"n_layers": 5, "dim": 64, "hash": "0123456789abcdef"}}
    path = tmp_path / "cal.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"Calibration file '.*cal.json' was made for a different model or by an older condfx"):
        SkipCalibration.load(path, stories_graph())
    path.write_text(json.dumps({**data, "threshold": float("nan")}))
    with pytest.raises(ValueError, match=r"cal.json is not a readable skip-ffn calibration file \(.*threshold must be"):
        SkipCalibration.load(path)
    path.write_text("{")
    with pytest.raises(ValueError, match=r"cal.json is not a readable skip-ffn calibration file"):
        SkipCalibration.load(path)


def test_rejects_kv_statistics_from_other_weights():
    from condfx.kv_calibrate import META_KEY, record_kv_stats

    ids = torch.randint(3, 512, (1, 24), generator=torch.Generator().manual_seed(0))
    source = stories_graph()
    record_kv_stats(source, [ids])
    spec = "fuse-attention,quantize-kv{method=xquant,latent=klt,group=4,residual=4,sink=1}"
    gm = stories_graph()
    gm.meta[META_KEY] = source.meta[META_KEY]
    condfx.apply(gm, spec)  # the same weights: accepted
    with torch.no_grad():
        gm.get_parameter(next(n for n, _ in gm.named_parameters() if "wk" in n)).mul_(1.01)
    with pytest.raises(PassError, match=r"statistics of layer 0 were recorded on other q/k/v/o projection weights"):
        condfx.apply(gm, spec)


def test_cli_rejects_corrupt_demo_cache(capsys, tmp_path, monkeypatch):
    from condfx import demo

    monkeypatch.setenv("CONDFX_CACHE", str(tmp_path))
    demo.cache_path().parent.mkdir(parents=True, exist_ok=True)
    demo.cache_path().write_bytes(b"garbage")
    code = main(["demo", "--json"])
    _, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert demo.cache_path().name in lines[0] and "is not a readable safetensors file" in lines[0]
