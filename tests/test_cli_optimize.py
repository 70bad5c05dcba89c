"""``condfx optimize --calib/--eval``: the measured report, the learned state beside the result, and
one sentence (exit 2) for each bad input."""

from __future__ import annotations

import json

import pytest

from condfx.cli import main
from tests._data import require_data

_SMALL = ("--eval-tokens", "96", "--eval-context", "64", "--kv-context", "64", "--greedy-tokens", "4",
          "--calib-tokens", "256", "--calib-seq-len", "64")


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.slow  # 28 s (6 min on 2 loaded cores): four measured points, each with Session timings
def test_optimize_measures_each_pass_and_writes_report_state_and_plot(capsys, tmp_path):
    model = str(require_data("stories260K.bin"))
    text = str(require_data("tinystories_valid_head.txt"))
    spec = "fuse-attention, quantize-kv{method=kivi,bits=2,residual=16}, skip-ffn"
    code, out, err = _run(capsys, "optimize", model, "--passes", spec, "--calib", text, "--eval", text,
                          *_SMALL, "-o", str(tmp_path), "--json")
    assert code == 0, err
    assert "are the same file" in err  # the overlap warning
    summary = json.loads(out)
    points = summary["points"]
    assert [p["label"] for p in points] == ["original", "fuse-attention", "fuse-attention, quantize-kv",
                                            "fuse-attention, quantize-kv, skip-ffn"]
    assert points[1]["ppl"] == points[0]["ppl"] or abs(points[1]["ppl"] / points[0]["ppl"] - 1) < 1e-4
    assert abs(points[2]["ppl"] - points[1]["ppl"]) > 1e-3  # windows of 64 > 16 full-precision tokens see KIVI
    assert points[2]["kv_bytes_per_token"] < points[1]["kv_bytes_per_token"] / 2  # the Session caches at 64 tokens
    assert points[3]["skip_fraction"] > 0 and points[2]["skip_fraction"] is None
    assert all(p["decode_tps"] > 0 and p["prefill_tps"] > 0 for p in points)
    assert 0 <= summary["greedy"]["agreement"] <= 1 and summary["greedy"]["tokens"] == 4
    assert summary["ratios"]["kv_bytes_per_token"] < 0.5
    skip = summary["calibration"][2]
    assert skip["calibrated"] and "threshold=" in skip["spec"] and summary["spec"].endswith(skip["spec"])
    assert any("full-precision span of 16 tokens" in n for n in summary["notes"])
    for name in ("report.md", "report.json", "calibration.safetensors", "model.pt2", "passes.md"):
        assert (tmp_path / name).stat().st_size > 0
    assert "| original |" in (tmp_path / "report.md").read_text()


def test_optimize_refuses_calibration_text_too_short_for_the_pass(capsys, tmp_path):
    model = str(require_data("stories260K.bin"))
    short = tmp_path / "short.txt"
    short.write_text("Once upon a time there was a cat. " * 3)  # a few dozen tokens: 2 batches of 16
    code, _, err = _run(capsys, "optimize", model, "--passes", "route-attention{window=64}", "--calib", str(short),
                        "--calib-seq-len", "16", "--steps", "1", "-o", str(tmp_path / "out"))
    assert code == 2
    assert "Calibration text" in err and "route-attention needs at least 132" in err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_optimize_refuses_evaluation_text_too_short(capsys, tmp_path):
    model = str(require_data("stories260K.bin"))
    short = tmp_path / "eval.txt"
    short.write_text("The dog ran. " * 10)
    code, _, err = _run(capsys, "optimize", model, "--passes", "quantize-kv{method=kivi,bits=2}", "--eval", str(short),
                        "-o", str(tmp_path / "out"))
    assert code == 2
    assert "Evaluation text" in err and "the measurement needs at least 512" in err
    assert err.count("\n") == 1


def test_optimize_warns_when_the_evaluation_text_shares_lines_with_the_calibration_text(capsys, tmp_path):
    from condfx.commands import _overlap_note

    calib, evaluation = tmp_path / "calib.txt", tmp_path / "eval.txt"
    shared = "This line of text is long enough to count as shared between the files."
    calib.write_text(f"{shared}\nOnly in the calibration text, and long enough to be compared too.\n")
    evaluation.write_text(f"Only in the evaluation text, long enough to be compared with others.\n{shared}\n")

    class Args:
        eval_tokens = 100

    note = _overlap_note({"calib": calib, "eval": evaluation}, Args())
    assert note.startswith("--eval shares 1 lines with --calib (first: 'This line of text")
    evaluation.write_text("Nothing in common with the calibration text at all, not one line.\n")
    assert _overlap_note({"calib": calib, "eval": evaluation}, Args()) is None


@pytest.mark.slow  # about 90 s: the ONNX export of prefill and decode graphs
def test_optimize_export_onnx_writes_the_bundle_checked_against_pytorch(capsys, tmp_path):
    model = str(require_data("stories260K.bin"))
    code, out, err = _run(capsys, "optimize", model, "--passes", "fuse-attention, quantize-kv{method=kivi,bits=2}",
                          "--export", "onnx", "-o", str(tmp_path), "--json")
    assert code == 0, err
    summary = json.loads(out)
    assert summary["export"]["max_abs_diff"] < 1e-3
    assert {"prefill.onnx", "decode.onnx", "condfx_manifest.json"} <= {p.name for p in (tmp_path / "onnx").iterdir()}


def test_calib_start_refuses_bad_values_in_one_sentence(capsys, tmp_path):
    model = str(require_data("stories260K.bin"))
    text = str(require_data("tinystories_valid_head.txt"))
    for value, words in (("abc", "must be a token offset"), ("-1", "must be a token offset"),
                         ("100%", "below 100"), ("99999999", "is past the end of")):
        code, _, err = _run(capsys, "optimize", model, "--passes", "skip-ffn", "--calib", text,
                            f"--calib-start={value}", "-o", str(tmp_path / "out"))
        assert code == 2 and words in err, (value, err)
        assert err.count("\n") == 1 and "Traceback" not in err
    code, _, err = _run(capsys, "optimize", model, "--passes", "skip-ffn", "--calib-start", "5",
                        "-o", str(tmp_path / "out"))
    assert code == 2 and "--calib-start needs --calib" in err


def test_calib_start_reads_from_a_token_offset_or_a_document_boundary(tmp_path):
    from condfx.commands import UserError, _calib_ids, _calib_start, _overlap_note
    from condfx.models_zoo import load

    path = require_data("tinystories_valid_head.txt")
    _, tok = load(str(require_data("stories260K.bin")))
    whole = tok.encode(path.read_text(encoding="utf-8")[:200_000], bos=True, eos=False)
    ids, first = _calib_ids(path, tok, 64, _calib_start("2048", str(path)))
    assert first == 2048 and ids == whole[2048:2112]  # the file's tokens from 2048, as they are
    ids, first = _calib_ids(path, tok, 64, _calib_start("50%", str(path)))
    text = path.read_text(encoding="utf-8")
    at = text.find("\n\n", len(text) // 2)
    assert ids == tok.encode(text[at:].lstrip()[:2000], bos=True, eos=False)[:64]  # a document's start
    assert tok.decode(ids[1:4]).strip() and first > 2048
    assert _calib_ids(path, tok, 64, None) == (whole[:64], 0)
    with pytest.raises(UserError, match="finds no blank line"):
        _calib_ids(path, tok, 64, _calib_start("99.9999%", str(path)))

    class Args:
        eval_tokens = 2048

    texts = {"calib": path, "eval": path}
    assert _overlap_note(texts, Args(), 2048) is None  # calibration after the scored tokens
    assert "inside the 2048 tokens --eval scores" in _overlap_note(texts, Args(), 1000)
    assert "are the same file" in _overlap_note(texts, Args(), 0)
