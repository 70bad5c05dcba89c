"""``condfx calibrate``: files written, profile table printed, bad input rejected."""

import json

import pytest

from condfx.cli import main
from tests._data import require_data


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def stories():
    return str(require_data("stories260K.bin")), str(require_data("tinystories_valid_head.txt"))


def test_calibrate_writes_file_plot_and_table(capsys, tmp_path, monkeypatch, stories):
    from condfx.calibrate import SkipCalibration

    model, text = stories
    monkeypatch.chdir(tmp_path)
    code, out, _ = _run(capsys, "calibrate", model, "--text", text, "--target-skip", "0.25",
                        "--max-tokens", "128", "--plot", "profile.png")
    assert code == 0
    assert "mean cos" in out and "p90" in out and "cold" in out and "measured" in out
    cal = SkipCalibration.load(tmp_path / "stories260K.skip-calibration.json")
    assert len(cal.profile) == 5 and len(cal.profile_p90) == 5
    assert 0.0 < cal.measured_skip < 0.6 and cal.spec() in out.replace("\n", "")
    assert (tmp_path / "profile.png").read_bytes()[:4] == b"\x89PNG"


def test_calibrate_json_and_output_path(capsys, tmp_path, stories):
    model, text = stories
    path = tmp_path / "calib.json"
    code, out, _ = _run(capsys, "calibrate", model, "--text", text, "--target-skip", "0.2",
                        "--max-tokens", "96", "-o", str(path), "--json")
    assert code == 0
    result = json.loads(out)
    assert result["output"] == str(path) and path.is_file()
    assert [r["cold"] for r in result["profile"]][0] is True
    assert result["spec"].startswith("skip-ffn{threshold=")


@pytest.mark.parametrize("target", ["0", "1", "-0.1", "1.5"])
def test_calibrate_rejects_target_outside_unit_interval(capsys, target, stories):
    model, text = stories
    code, out, err = _run(capsys, "calibrate", model, "--text", text, "--target-skip", target)
    assert code == 2 and out == ""
    assert "--target-skip must be a fraction strictly between 0 and 1" in err


def test_calibration_from_another_model_rejected(capsys, tmp_path, stories):
    import condfx
    from condfx.calibrate import SkipCalibration
    from condfx.models_zoo import load

    model, text = stories
    path = tmp_path / "calib.json"
    assert _run(capsys, "calibrate", model, "--text", text, "--target-skip", "0.2",
                "--max-tokens", "64", "-o", str(path), "--json")[0] == 0
    own, _ = load(model)
    assert SkipCalibration.load(path, own).target_skip == 0.2
    other, _ = load("llama-tiny")
    with pytest.raises(ValueError, match=r"was made for a different model"):
        SkipCalibration.load(path, condfx.capture(other, (__import__("torch").zeros(1, 8, dtype=int),)))


def test_calibrate_missing_text_file(capsys, tmp_path, stories):
    code, _, err = _run(capsys, "calibrate", stories[0], "--text", str(tmp_path / "nope.txt"), "--target-skip", "0.2")
    assert code == 2 and "does not exist" in err
