"""``condfx export`` and ``condfx generate --onnx``: files, manifest, the ORT run, one-sentence errors."""

from __future__ import annotations

import contextlib
import io
import json
import re

import pytest

from condfx.cli import main
from tests._data import STORIES_ZOO_REFERENCE, require_data


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(model path, export folder, stdout, stderr) of ``condfx export stories260K.bin -o DIR``."""
    model = str(require_data("stories260K.bin"))
    folder = tmp_path_factory.mktemp("cli_export") / "stories_onnx"
    out, err = io.StringIO(), io.StringIO()
    # a module-scoped fixture cannot use capsys, so the streams are redirected by hand
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["export", model, "-o", str(folder)])
    assert code == 0, err.getvalue()
    return model, folder, out.getvalue(), err.getvalue()


def test_export_writes_files_and_manifest(exported):
    model, folder, out, _ = exported
    names = sorted(p.name for p in folder.iterdir())
    assert names == ["condfx_manifest.json", "decode.onnx", "prefill.onnx", "weights.data"]
    manifest = json.loads((folder / "condfx_manifest.json").read_text())
    assert manifest["model"]["name"] == "stories260K" and manifest["model"]["spec"] == model
    assert manifest["vocab_size"] == 512 and manifest["max_seq_len"] == 512
    assert len(manifest["layers"]) == 5 and manifest["passes"] == "fuse-attention"
    diff = float(re.search(r"max \|ORT - PyTorch\| \(prefill, decode step\): (\S+)", out).group(1))
    assert diff <= 1e-4
    assert max(manifest["max_abs_diff"].values()) <= 1e-4


def test_export_prints_progress(exported):
    _, _, _, err = exported
    assert "capturing and applying passes" in err and "exporting prefill.onnx" in err


def test_generate_onnx_reproduces_reference_text(capsys, exported):
    model, folder, _, _ = exported
    argv = ["generate", model, "--prompt", "Zoo", "--max-new-tokens", "57", "--onnx", str(folder)]
    code, out, _ = _run(capsys, *argv)
    assert code == 0
    assert out.strip() == STORIES_ZOO_REFERENCE


def test_generate_onnx_sampling_is_seeded(capsys, exported):
    model, folder, _, _ = exported
    argv = ["generate", model, "--prompt", "Zoo", "--max-new-tokens", "20", "--onnx", str(folder)]
    argv += ["--temperature", "0.8", "--top-k", "20", "--top-p", "0.9", "--seed", "3", "--json"]
    runs = [json.loads(_run(capsys, *argv)[1]) for _ in range(2)]
    assert runs[0]["tokens"] == runs[1]["tokens"] and runs[0]["new_tokens"] == 20
    assert runs[0]["backend"] == "onnxruntime"
    assert runs[0]["sampling"] == {"temperature": 0.8, "top_k": 20, "top_p": 0.9, "seed": 3}


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--top-p", "1.5"], r"top_p must be in \(0, 1\]"),
        (["--temperature", "-1"], r"temperature must be a number >= 0"),
        (["--top-k", "-2"], r"top_k must be an int >= 0"),
        (["--top-k", "x"], r"rgument --top-k: invalid int value: 'x'"),
        (["--top-q", "3"], r"nrecognized arguments: --top-q 3"),
        (
            ["--prompt", "a " * 600],
            r"--prompt has \d+ tokens, more than the model's context of 512",
        ),
        (["--onnx", "no/such/folder"], r"ONNX folder 'no/such/folder' does not exist"),
        (
            ["--onnx", "DIR", "--passes", "fuse-attention"],
            r"--passes cannot be combined with --onnx",
        ),
    ],
)
def test_rejects_bad_generate_input_with_one_sentence(capsys, exported, extra, message):
    model, folder, _, _ = exported
    extra = [str(folder) if a == "DIR" else a for a in extra]
    code, _, err = _run(capsys, "generate", model, "--prompt", "Zoo", *extra)
    assert code == 2
    assert err.startswith("error: ")
    assert len(err.strip().splitlines()) <= 3  # one sentence, possibly soft-wrapped by the terminal
    assert re.search(message, err.replace("\n", "")), err


def test_rejects_onnx_folder_of_another_model(capsys, exported):
    _, folder, _, _ = exported
    code, _, err = _run(capsys, "generate", "llama-tiny", "--prompt", "hi", "--onnx", str(folder))
    assert code == 2
    assert "exported from model 'stories260K', not 'llama-tiny'" in err.replace("\n", "")


def test_rejects_bad_export_pass_spec(capsys, tmp_path):
    argv = ["export", "llama-tiny", "--passes", "fuse-atention", "-o", str(tmp_path / "o")]
    code, _, err = _run(capsys, *argv)
    assert code == 2
    assert "Did you mean 'fuse-attention'" in err.replace("\n", "")


@pytest.mark.slow  # about 95 s: KLT statistics, then the export
def test_export_klt_with_calibration_text(capsys, tmp_path):
    """``--kv-calib`` records the q/k/v statistics latent=klt needs; without it, one sentence says so."""
    model, text = str(require_data("stories260K.bin")), str(require_data("tinystories_valid_head.txt"))
    passes = "fuse-attention, quantize-kv{method=xquant,latent=klt,group=8,k_budget=4,v_budget=5,sink=1}"
    code, out, err = _run(capsys, "export", model, "--passes", passes, "--kv-calib", text, "-o",
                          str(tmp_path / "klt"), "--json")
    assert code == 0, err
    result = json.loads(out)
    assert result["max_abs_diff"] <= 1e-3 and "condfx::QuantizedStreamToken" in str(result["custom_ops"])
    code, _, err = _run(capsys, "export", model, "--passes", passes, "-o", str(tmp_path / "none"))
    assert code != 0 and "latent=klt needs calibration statistics for layer 0" in err
