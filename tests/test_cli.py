"""The condfx command line: each command end to end, and one clear sentence for each bad input."""

import json
import re

import pytest

from condfx.cli import main
from tests._data import STORIES_ZOO_REFERENCE, require_data


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_inspect_json_counts_regions(capsys):
    code, out, _ = _run(capsys, "inspect", "llama-tiny", "--json")
    result = json.loads(out)
    assert code == 0
    assert result["attention_regions"] == 2 and result["ffn_regions"] == 2
    assert result["layers"]["0"]["attention"]["kv_heads"] == 2


def test_inspect_table_lists_layers(capsys):
    code, out, _ = _run(capsys, "inspect", "gpt2-tiny")
    assert code == 0
    assert "gelu-mlp" in out and "2 attention, 2 FFN regions" in out


def test_optimize_writes_report_and_program(capsys, tmp_path):
    code, out, _ = _run(capsys, "optimize", "llama-tiny", "--passes", "fuse-attention", "-o", str(tmp_path), "--json")
    assert code == 0
    summary = json.loads(out)
    assert summary["verify"]["max_abs_diff"] <= 1e-5
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["passes"][0]["rewritten"] == 2
    assert (tmp_path / "model.pt2").stat().st_size > 0
    assert "condfx.attention" in (tmp_path / "graph.py").read_text()


def test_generate_reproduces_reference_text(capsys):
    model = str(require_data("stories260K.bin"))
    code, out, _ = _run(capsys, "generate", model, "--prompt", "Zoo", "--max-new-tokens", "57")
    assert code == 0
    assert out.strip() == STORIES_ZOO_REFERENCE


def test_eval_json_on_token_stream(capsys):
    model = str(require_data("stories260K.bin"))
    text = str(require_data("tinystories_valid_head.txt"))
    code, out, _ = _run(capsys, "eval", model, "--text", text, "--max-tokens", "600", "--json")
    result = json.loads(out)
    assert code == 0
    assert result["tokens"] == 599 and 1.0 < result["nll"] < 2.0
    assert result["ppl"] == pytest.approx(2.718281828 ** result["nll"], rel=1e-6)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["inspect", "no/such/model.bin"], r"No model file or folder at no/such/model.bin"),
        (["inspect", "llama-huge"], r"llama-huge"),
        (["optimize", "llama-tiny", "--passes", "fuse-atention", "-o", "OUT"], r"Did you mean 'fuse-attention'"),
        (["optimize", "llama-tiny", "--passes", "fuse-attention{layers=[0,", "-o", "OUT"], r"column"),
        (["optimize", "llama-tiny", "--passes", "fuse-attention{layers=x}", "-o", "OUT"], r"option 'layers' must be"),
        (["optimize", "llama-tiny", "--passes", "fuse-attention{colour=1}", "-o", "OUT"], r"colour"),
        (["optimize", "llama-tiny", "--passes", "missing.yaml", "-o", "OUT"], r"missing.yaml' does not exist"),
        (["eval", "llama-tiny", "--text", "no_such.txt"], r"no_such.txt' does not exist"),
        (["generate", "llama-tiny", "--prompt", "hi", "--max-new-tokens", "0"], r"at least 1"),
    ],
)
def test_rejects_bad_input_with_one_sentence(capsys, tmp_path, argv, message):
    argv = [a.replace("OUT", str(tmp_path / "out")) for a in argv]
    code, out, err = _run(capsys, *argv)
    assert code == 2
    assert err.startswith("error: ")
    assert len(err.strip().splitlines()) <= 3  # one sentence, possibly soft-wrapped by the terminal
    assert re.search(message, err.replace("\n", "")), err


def test_rejects_truncated_checkpoint(capsys, tmp_path):
    data = require_data("stories260K.bin").read_bytes()
    bad = tmp_path / "stories260K.bin"
    bad.write_bytes(data[: len(data) // 2])
    (tmp_path / "tok512.bin").write_bytes(require_data("tok512.bin").read_bytes())
    code, _, err = _run(capsys, "inspect", str(bad))
    assert code == 2
    assert "stories260K.bin" in err and "bytes" in err


def test_eval_with_passes_matches_eval_without(capsys):
    text = str(require_data("tinyshakespeare.txt"))
    base = ["eval", "llama-tiny", "--text", text, "--max-tokens", "200", "--json"]
    _, plain, _ = _run(capsys, *base)
    code, fused, _ = _run(capsys, *base, "--passes", "fuse-attention")
    assert code == 0
    assert json.loads(fused)["nll"] == pytest.approx(json.loads(plain)["nll"], abs=1e-5)


def test_rejects_pass_that_rewrote_nothing_unless_allow_partial(capsys, tmp_path):
    """sink-window needs RoPE; on GPT-2 it matches both layers and rewrites none: exit 2 with the
    per-layer reason, and --allow-partial keeps the unchanged model."""
    code, _, err = _run(capsys, "optimize", "gpt2-tiny", "--passes", "sink-window", "-o", str(tmp_path / "a"))
    assert code == 2 and "rewrote none: no RoPE" in err and "--allow-partial" in err
    code, _, _ = _run(capsys, "optimize", "gpt2-tiny", "--passes", "sink-window", "-o", str(tmp_path / "b"),
                      "--allow-partial")
    assert code == 0 and (tmp_path / "b" / "report.json").is_file()
