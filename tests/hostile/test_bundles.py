"""Hostile ONNX bundles: each is refused with one sentence naming the folder and the field.

The stories260K bundle the runtime tests export once (``tests.runtime.stories_bundle``) is copied and
damaged: manifest fields
edited with their hash rewritten (the structural checks must catch them on their own: swapped past or
present names, reordered or dropped layers, a window added to a full layer, heads, dtype, vocab,
max_seq_len, a path outside the folder) and without (the hash names the field), then missing,
changed or truncated files. Two refusals also go through the CLI (exit 2, one line, no traceback).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

import condfx
from condfx.cli import main
from condfx.codegen.bundle import MANIFEST_HASH_KEY, MANIFEST_NAME, manifest_hashes
from condfx.runtime import Session, generate
from condfx.runtime.onnx_backend import OnnxBackend, read_manifest
from tests._data import require_data
from tests.runtime import STORIES, load_model, stories_bundle

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model():
    return load_model(STORIES)[0]


def copy_bundle(dest: Path) -> Path:
    shutil.copytree(stories_bundle(), dest)
    return dest


def _edited(dest: Path, edit: Callable[[dict], None], rehash: bool) -> Path:
    folder = copy_bundle(dest)
    path = folder / MANIFEST_NAME
    manifest = json.loads(path.read_text())
    edit(manifest)
    if rehash:
        manifest.pop(MANIFEST_HASH_KEY, None)
        manifest[MANIFEST_HASH_KEY] = manifest_hashes(manifest)
    path.write_text(json.dumps(manifest, indent=2))
    return folder


def _swap(key: str, a: str, b: str) -> Callable[[dict], None]:
    def edit(m: dict) -> None:
        for kind in ("prefill", "decode"):
            names = m["files"][kind][key]
            if a in names:
                i, j = names.index(a), names.index(b)
                names[i], names[j] = names[j], names[i]

    return edit


def _set(path: str, value) -> Callable[[dict], None]:
    *parents, last = path.split(".")

    def edit(m: dict) -> None:
        node = m
        for p in parents:
            node = node[int(p)] if p.isdigit() else node[p]
        node[last] = value

    return edit


def _drop_layer(m: dict) -> None:
    """Every layer but the first, from the layers and the names alike (consistent with itself)."""
    m["layers"] = m["layers"][:1]
    for kind in ("prefill", "decode"):
        for key in ("inputs", "outputs"):
            m["files"][kind][key] = [n for n in m["files"][kind][key] if not re.search(r"_[1-9]\d*$", n)]


def _seq_len_everywhere(m: dict) -> None:
    m["max_seq_len"] = m["model"]["max_seq_len"] = 5


def _field(name: str) -> str:
    return rf"manifest whose field '{re.escape(name)}'"


# (edit, rehash, pattern): with rehash the structural checks alone must refuse it.
_CASES = {
    "swapped-past-names": (
        _swap("inputs", "past_k_0", "past_v_0"), True,
        _field("files.decode.inputs") + r" lists 'past_v_0' at position 1 where its layers give 'past_k_0'",
    ),
    "swapped-past-names-no-rehash": (
        _swap("inputs", "past_k_0", "past_v_0"), False,
        _field("files") + r" was edited after export \(its 'manifest_sha256' does not match\)",
    ),
    "swapped-present-names": (
        _swap("outputs", "present_k_1", "present_v_1"), True,
        _field("files.prefill.outputs") + r" lists 'present_v_1' at position 3",
    ),
    "reordered-layers": (
        lambda m: m.update(layers=[m["layers"][1], m["layers"][0], *m["layers"][2:]]), True,
        _field("layers[0]") + r" is layer 1, not 0 \(layers must be listed in graph order\)",
    ),
    "window-added": (
        _set("layers.0.window_size", 3), True,
        _field("layers[0]") + r" has 'window_size', which a 'full' cache layout does not have",
    ),
    "window-kind": (
        lambda m: m["layers"][0].update(kind="window", window_size=3), False,
        _field("layers") + r" was edited after export",
    ),
    "max-seq-len": (
        _set("max_seq_len", 5), True,
        _field("max_seq_len") + r" is 5, but its model 'stories260K' has a context of 512",
    ),
    "max-seq-len-zero": (
        _set("max_seq_len", 0), True,
        _field("max_seq_len") + r" is 0, not a positive int",
    ),
    "heads": (
        _set("layers.1.n_kv_heads", 2), True,
        r"has prefill\.onnx's present_k_1 of size 4 in dim 1, but its manifest states 2",
    ),
    "dtype": (
        _set("layers.0.dtype", "float16"), True,
        r"has prefill\.onnx's present_k_0 of type tensor\(float\), but its manifest states torch\.float16",
    ),
    "vocab": (
        _set("vocab_size", 300), True,
        r"has prefill\.onnx's logits of size 512 in dim 2, but its manifest states 300",
    ),
    "vocab-no-rehash": (_set("vocab_size", 300), False, _field("vocab_size") + r" was edited"),
    "dropped-layer": (
        _drop_layer, True,
        r"has a prefill\.onnx whose outputs have 'present_k_1' at position 3 where its manifest's "
        r"field 'files\.prefill\.outputs' has 'nothing'",
    ),
    "path-outside": (
        _set("files.decode.path", "../decode.onnx"), True,
        _field("files.decode.path") + r" is '\.\./decode\.onnx', not a file name inside the folder",
    ),
    "files-a-list": (_set("files", []), True, r"field 'files' is a JSON list, not a dict"),
    "heads-a-string": (
        _set("layers.0.n_kv_heads", "4"), True, _field("layers[0]") + r" is not a valid 'full' cache layout",
    ),
    "inputs-missing": (
        lambda m: m["files"]["decode"].pop("inputs"), True,
        _field("files.decode.inputs") + r" is not a list of names",
    ),
    "no-layers": (
        _set("layers", []), True, _field("files.prefill.outputs") + r" lists 11 names where its layers give 1",
    ),
    "hash-removed": (
        lambda m: m.pop(MANIFEST_HASH_KEY), False,
        r"has a manifest without 'manifest_sha256' \(written before manifests were hashed",
    ),
    "hash-of-a-field-removed": (
        lambda m: m[MANIFEST_HASH_KEY].pop("passes"), False, _field("passes") + r" was added after export",
    ),
}


@pytest.mark.parametrize("case", sorted(_CASES))
def test_rejects_tampered_manifest(tmp_path, case):
    edit, rehash, pattern = _CASES[case]
    folder = _edited(tmp_path / case, edit, rehash)
    with pytest.raises(ValueError, match=rf"^ONNX folder '{re.escape(str(folder))}' .*{pattern}") as info:
        Session.from_onnx(folder)
    assert len(str(info.value).splitlines()) == 1
    assert str(info.value).endswith("; write it again with 'condfx export'.")


def test_rejects_max_seq_len_edited_with_the_identity_for_the_model_given(tmp_path, model):
    folder = _edited(tmp_path / "b", _seq_len_everywhere, rehash=True)
    read_manifest(folder)  # consistent with itself: only the model can tell
    with pytest.raises(ValueError, match=_field("max_seq_len") + r" is 5, but the model has a context of 512"):
        Session.from_onnx(folder, model=model)


def test_numerics_untouched_bundle_opens_and_generates(model):
    session = Session.from_onnx(stories_bundle(), model=model)
    assert session.max_seq_len == 512 and session.vocab_size == 512
    out = generate(session, [[1, 2, 3], [4, 5, 6]], max_new_tokens=4, greedy=True)
    assert [len(o) for o in out] == [4, 4]


def test_rejects_missing_changed_and_truncated_files(tmp_path):
    folder = copy_bundle(tmp_path / "missing")
    (folder / "decode.onnx").unlink()
    with pytest.raises(FileNotFoundError, match=rf"'{re.escape(str(folder))}' is missing decode\.onnx"):
        OnnxBackend.from_dir(folder)
    folder = copy_bundle(tmp_path / "truncated")
    data = (folder / "prefill.onnx").read_bytes()
    (folder / "prefill.onnx").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"has a prefill\.onnx that differs from the one its manifest lists"):
        OnnxBackend.from_dir(folder)
    with pytest.raises(ValueError, match=r"has a prefill\.onnx that ONNX Runtime cannot load \(") as info:
        OnnxBackend.from_dir(folder, check_hashes=False)
    assert len(str(info.value).splitlines()) == 1
    (folder / MANIFEST_NAME).write_text("[1, 2]")
    with pytest.raises(ValueError, match=r"has a condfx_manifest\.json that is not a JSON object"):
        OnnxBackend.from_dir(folder)


# Through the CLI: exit 2, one line naming the folder and the field --------------------------------



@pytest.mark.parametrize("case", ["reordered-layers", "max-seq-len", "vocab"])
def test_cli_refuses_tampered_bundle(tmp_path, capsys, case):
    edit, rehash, pattern = _CASES[case]
    folder = _edited(tmp_path / case, edit, rehash)
    code = main(["generate", str(require_data("stories260K.bin")), "--prompt", "hi", "--max-new-tokens", "3", "--onnx", str(folder)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert err.startswith("error: ONNX folder") and str(folder) in " ".join(err.split())
    assert re.search(pattern, err), err


def test_cli_subprocess_refuses_swapped_cache_names_without_traceback(tmp_path):
    edit, _, pattern = _CASES["swapped-past-names"]
    folder = _edited(tmp_path / "swapped", edit, rehash=True)
    root = str(Path(condfx.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    env.pop("CONDFX_DEBUG", None)
    argv = ["generate", str(require_data("stories260K.bin")), "--prompt", "hi", "--onnx", str(folder)]
    result = subprocess.run(
        [sys.executable, "-m", "condfx.cli", *argv], capture_output=True, text=True, env=env, timeout=120
    )
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert re.search(pattern, lines[0]), lines[0]
