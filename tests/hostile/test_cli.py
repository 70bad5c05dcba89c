"""Hostile CLI input: every case ends in one line on stderr naming the problem, exit 2, no traceback.

The cases (``benchmarks/hostile_cli.py``, which also runs them all as subprocesses) build their files
here at test time. They run in-process through ``condfx.cli.main``; one goes through the real entry
point. Output paths are refused before the model loads, and a failed run leaves an existing output
as it was.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import condfx
from benchmarks.hostile_cli import CASES
from condfx import errors
from condfx.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")


def _run(capsys, argv: list[str]) -> tuple[int, str, str]:
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def _assert_one_sentence(code: int, err: str, pattern: str) -> str:
    lines = err.strip().splitlines()
    assert code == 2 and "Traceback" not in err and len(lines) == 1, (code, err)
    assert lines[0].startswith("error: ") and re.search(pattern, lines[0]), lines[0]
    return lines[0]


@pytest.mark.parametrize("name", sorted(n for n, c in CASES.items() if c.ci))
def test_rejects_hostile_input_with_one_sentence(capsys, monkeypatch, tmp_path, name):
    case = CASES[name]
    monkeypatch.delenv(errors.DEBUG_VARIABLE, raising=False)
    for key, value in case.env.items():
        monkeypatch.setenv(key, value.format(root=tmp_path))
    argv = case.build(tmp_path)
    code, _, err = _run(capsys, argv)
    _assert_one_sentence(code, err, case.pattern)


def _cli(argv: list[str], **env: str) -> subprocess.CompletedProcess:
    root = str(Path(condfx.__file__).resolve().parents[1])
    full = {k: v for k, v in os.environ.items() if k != errors.DEBUG_VARIABLE}
    full.update(PYTHONPATH=root, **env)
    return subprocess.run(
        [sys.executable, "-m", "condfx.cli", *argv], capture_output=True, text=True, env=full,
        timeout=120,
    )


def test_rejects_hostile_spec_file_through_the_entry_point(tmp_path):
    argv = CASES["spec-json-deep"].build(tmp_path)
    run = _cli(argv)
    line = _assert_one_sentence(run.returncode, run.stderr, r"p\.json.*nested too deeply")
    assert "out" not in os.listdir(tmp_path), line  # refused before any output was made


def test_debug_variable_raises_instead(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv(errors.DEBUG_VARIABLE, "1")
    with pytest.raises(ValueError, match=r"p\.json.*not valid JSON"):
        main(CASES["spec-json-malformed"].build(tmp_path))
    assert capsys.readouterr().err == ""


def test_help_documents_the_debug_variable(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "CONDFX_DEBUG=1" in capsys.readouterr().out.replace("\n", " ")


def test_internal_error_is_one_line_with_exit_1(capsys, monkeypatch):
    def broken(_args):
        return {}["no such key"]

    monkeypatch.delenv(errors.DEBUG_VARIABLE, raising=False)
    monkeypatch.setattr(condfx.commands, "inspect_cmd", broken)
    code, _, err = _run(capsys, ["inspect", "llama-tiny"])
    assert code == 1 and err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("internal error: missing key 'no such key'; set CONDFX_DEBUG=1")


def test_failed_optimize_leaves_the_existing_output_as_it_was(capsys, tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    before = {name: f"old {name}".encode() for name in ("report.md", "model.pt2", "graph.py")}
    for name, data in before.items():
        (out / name).write_bytes(data)

    def failing_save(*_args, **_kwargs):
        raise OSError(28, "No space left on device", str(out / "model.pt2"))

    monkeypatch.setattr("torch.export.save", failing_save)
    code, _, err = _run(capsys, ["optimize", "llama-tiny", "--passes", "fuse-attention", "-o", str(out)])
    _assert_one_sentence(code, err, r"model\.pt2")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def _safetensors_garbage(path: Path) -> None:
    from safetensors.torch import load_file

    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage}")
    load_file(path)


def _onnx_garbage(path: Path) -> None:
    import onnxruntime as ort

    path.write_bytes(b"\x08\x07garbage" * 10)
    ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _yaml_garbage(path: Path) -> None:
    import yaml

    yaml.safe_load("- a: {b: [1,\n")


@pytest.mark.parametrize(
    ("library", "pattern"),
    [
        (_safetensors_garbage, r"^Could not read f\.bin: [^\n]+\.$"),
        (_onnx_garbage, r"^Could not read f\.bin: [^\n]*(protobuf|Protobuf)[^\n]*\.$"),
        (_yaml_garbage, r"^Could not read f\.bin: not valid YAML \(.* at line 2, column 1\)\.$"),
        (lambda p: p.with_name("nope").read_text(), r"^Could not read f\.bin: '.*nope' does not exist\.$"),
        (lambda p: p.parent.read_text(), r"^Could not read f\.bin: '.*' is a folder, not a file\.$"),
    ],
)
def test_reading_turns_library_errors_into_one_sentence(tmp_path, library, pattern):
    with pytest.raises(errors.InputError) as info:
        with errors.reading("f.bin"):
            library(tmp_path / "f.bin")
    assert re.search(pattern, str(info.value)), str(info.value)
    assert errors.explain(info.value) == (str(info.value), 2)


@pytest.mark.parametrize(
    ("exc", "line", "status"),
    [
        (ZeroDivisionError("division by zero"), "ZeroDivisionError: division by zero; set CONDFX_DEBUG=1", 1),
        (AttributeError("'list' object has no attribute 'get'"), "AttributeError: 'list'", 1),
        (MemoryError(), "Out of memory (ask for smaller sizes", 2),
        (RecursionError("maximum recursion depth exceeded"), "Nested too deeply to read", 2),
        (KeyboardInterrupt(), "interrupted.", 130),
        (ValueError("a library's\nmulti-line\nmessage"), "A library's.", 2),
    ],
)
def test_explain_gives_one_line_and_the_status(exc, line, status):
    got, code = errors.explain(exc)
    assert code == status and got.startswith(line) and "\n" not in got, got
