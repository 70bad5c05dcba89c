"""Verification acts: a check beyond its tolerance or not finite fails with one sentence giving the
figure and the tolerance (``VerificationError``, exit 2 through the CLI), and JSON output never
holds NaN or Infinity."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace
from typing import ClassVar

import pytest
import torch

import condfx
from condfx import commands
from condfx.cli import main
from condfx.passes import PassError
from condfx.passes.base import GraphSnapshot, Pass, PassResult
from condfx.verify import VerificationError, check_export_diffs, verify
from tests.hostile._stories import stories_graph

pytestmark = pytest.mark.usefixtures("one_thread")

X = torch.randn(2, 3, 8, generator=torch.Generator().manual_seed(0))


def _nan_weights(gm):
    with torch.no_grad():
        for p in gm.parameters():
            p.fill_(float("nan"))
    return gm


@pytest.mark.parametrize(
    ("after", "mode", "floor", "pattern"),
    [
        (lambda x: x + 1e-2, "exact", 20.0, r"max \|logit diff\| against the original is 0\.01, above the float32 tolerance \d\.\d+e-05\.$"),
        (lambda x: x * float("nan"), "exact", 20.0, r"max \|logit diff\| against the original is nan, not a finite number\.$"),
        (lambda x: x * float("nan"), "lossy", None, r"max \|logit diff\| against the original is nan, not a finite number\.$"),
        (lambda x: -x, "lossy", 20.0, r"SQNR against the original is -6\.02 dB, below the floor 20\.0 dB\.$"),
    ],
)
def test_verify_result_raises_with_figure_and_tolerance(after, mode, floor, pattern):
    check = verify(lambda x: x, after, X, mode=mode, sqnr_floor_db=floor)
    assert not check.ok
    with pytest.raises(VerificationError, match=r"^Verification of the model failed: " + pattern[:-1]):
        check.raise_if_failed("the model")
    assert isinstance(VerificationError("x"), ValueError)


def test_measured_lossy_check_has_no_tolerance_and_passes_finite_outputs():
    check = verify(lambda x: x, lambda x: x * 3, X, mode="lossy", sqnr_floor_db=None)
    assert check.ok and check.tolerance is None and check.sqnr_floor_db is None
    assert "measured, no tolerance" in check.summary()
    check.raise_if_failed("the model")


@pytest.mark.parametrize(("diffs", "bad"), [({"prefill": 1e-6, "decode": float("nan")}, "decode"),
                                            ({"prefill": 0.5, "decode": 0.0}, "prefill")])
def test_export_check_refuses_large_or_non_finite_differences(diffs, bad):
    check_export_diffs({"prefill": 2e-5, "decode": 3e-4})
    with pytest.raises(VerificationError, match=rf"on the {bad} check is \S+, above the float32 tolerance 0\.001\.$"):
        check_export_diffs(diffs, where="the export in 'b'")


def test_json_output_never_holds_nan():
    check = verify(lambda x: x, lambda x: x * float("nan"), X, mode="lossy", sqnr_floor_db=None)
    payload = {"verify": check.to_dict(), "figures": [math.inf, -math.inf, 1.5, (math.nan,)]}
    text = json.dumps(commands.json_safe(payload), allow_nan=False)
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text)["figures"] == [None, None, 1.5, [None]]


class _PoisonWeights(Pass):
    """A test pass claiming to be exact that turns every weight into NaN."""

    name: ClassVar[str] = "poison-weights"
    config_class: ClassVar[type] = SimpleNamespace
    matches: ClassVar[str] = "weight"
    exact: ClassVar[bool] = True

    def __call__(self, gm):
        snapshot = GraphSnapshot.take(gm)
        _nan_weights(gm)
        return PassResult(gm, True, snapshot.report(gm, self.name, matched=1, rewritten=1))


def test_apply_with_verify_inputs_refuses_non_finite_outputs():
    ids = torch.randint(3, 512, (1, 8), generator=torch.Generator().manual_seed(0))
    with pytest.raises(PassError, match=r"outputs changed beyond tolerance: FAILED \(exact, float32\): max\|diff\| nan"):
        condfx.apply(stories_graph(), [_PoisonWeights(SimpleNamespace())], verify_inputs=(ids,))


def _one_line_error(capsys, *argv: str) -> str:
    code = main(list(argv))
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert "NaN" not in out
    return lines[0]


def test_cli_optimize_fails_when_the_rewrite_is_not_finite(capsys, tmp_path, monkeypatch):
    real = commands._apply_calibrated

    def poisoned(gm, args, calib, progress, on_pass):
        result = real(gm, args, calib, progress, on_pass)
        _nan_weights(result.graph_module)
        return result

    monkeypatch.setattr(commands, "_apply_calibrated", poisoned)
    line = _one_line_error(capsys, "optimize", "llama-tiny", "--passes", "fuse-attention", "-o", str(tmp_path), "--json")
    assert "Verification of the optimized model failed: max |logit diff| against the original is nan" in line
    assert not (tmp_path / "model.pt2").exists()


def test_cli_export_fails_when_ort_disagrees(capsys, tmp_path, monkeypatch):
    import condfx.export_bundle

    fake = SimpleNamespace(diffs={"prefill": 1e-6, "decode": float("nan")}, max_abs_diff=float("nan"),
                           out_dir=tmp_path / "b", manifest={}, decode=None)
    monkeypatch.setattr(condfx.export_bundle, "export_model", lambda *a, **k: fake)
    line = _one_line_error(capsys, "export", "llama-tiny", "-o", str(tmp_path / "b"), "--json")
    assert "on the decode check is nan, above the float32 tolerance 0.001." in line
