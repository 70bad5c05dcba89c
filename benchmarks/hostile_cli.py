"""Hostile inputs for every CLI command: each must end in one sentence on stderr and exit 2.

Every case builds its files at run time in a scratch folder (tiny files, nothing binary in the
repository) and returns the argv to run. ``tests/hostile/test_cli.py`` runs the cases marked
``ci`` in-process; this script runs all of them, each in a subprocess as a user would, and lists
the runs that printed a traceback, exited with another status than 2, or printed more than one line:

    python benchmarks/hostile_cli.py [--only NAME,NAME] [--json]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

MODEL = "llama-tiny"
DEEP = 100_000  # nesting depth of the "deeply nested" files: past Python's recursion limit


@dataclass(frozen=True)
class Case:
    """One hostile CLI run.

    Attributes:
        build: makes the case's files under the given folder and returns the argv.
        pattern: a regex the one error line must match.
        ci: run by tests/hostile/test_cli.py (cheap, and owned by the CLI's error handling).
        env: extra environment variables; values may use ``{root}`` for the scratch folder.
    """

    build: Callable[[Path], list[str]]
    pattern: str
    ci: bool = True
    env: MappingProxyType = field(default_factory=lambda: MappingProxyType({}))


def _file(root: Path, name: str, data: str | bytes) -> str:
    path = root / name
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, bytes):
        path.write_bytes(data)
    else:
        path.write_text(data)
    return str(path)


def _dir(root: Path, name: str) -> str:
    (root / name).mkdir(parents=True, exist_ok=True)
    return str(root / name)


def _text(root: Path) -> str:
    return _file(root, "text.txt", "Once upon a time there was a tiny model.\n\n" * 40)


def _optimize(spec: str) -> Callable[[Path], list[str]]:
    return lambda r: ["optimize", MODEL, "--passes", spec, "-o", str(r / "out")]


def _spec_file(name: str, data: str | bytes) -> Callable[[Path], list[str]]:
    return lambda r: ["optimize", MODEL, "--passes", _file(r, name, data), "-o", str(r / "out")]


def _generate(*flags: str) -> Callable[[Path], list[str]]:
    return lambda r: ["generate", MODEL, "--prompt", "hi", "--max-new-tokens", "2", *flags]


def _eval(*flags: str) -> Callable[[Path], list[str]]:
    return lambda r: ["eval", MODEL, "--text", _text(r), "--max-tokens", "40", *flags]


def _hf_folder(config: str, weights: bytes | None = None) -> Callable[[Path], list[str]]:
    def build(r: Path) -> list[str]:
        _file(r, "hf/config.json", config)
        if weights is not None:
            _file(r, "hf/model.safetensors", weights)
        return ["inspect", str(r / "hf")]

    return build


def _bundle(manifest: Callable[[Path], object], onnx: bytes = b"") -> Callable[[Path], list[str]]:
    """An export folder with the given manifest (a JSON value, or raw text) and two onnx files."""

    def build(r: Path) -> list[str]:
        folder = r / "bundle"
        for name in ("prefill.onnx", "decode.onnx"):
            _file(folder, name, onnx)
        doc = manifest(folder)
        _file(folder, "condfx_manifest.json", doc if isinstance(doc, str) else json.dumps(doc))
        return ["generate", MODEL, "--prompt", "hi", "--max-new-tokens", "2", "--onnx", str(folder)]

    return build


def _valid_manifest(folder: Path) -> dict:
    """A manifest of the current format for llama-tiny whose hashes match the folder's files."""
    from condfx.export_bundle import MANIFEST_FORMAT, MANIFEST_FORMAT_VERSION, model_identity
    from condfx.models_zoo import load
    from condfx.version import __version__

    sha = lambda name: hashlib.sha256((folder / name).read_bytes()).hexdigest()  # noqa: E731
    layer = dict(kind="full", n_kv_heads=2, head_dim=16, dtype="float32")
    names = ["past_k_0", "past_v_0", "past_k_1", "past_v_1"]
    files = {
        kind: dict(path=f"{kind}.onnx", sha256=sha(f"{kind}.onnx"), external_data=None,
                   external_data_sha256=None, inputs=["input_ids", *names], outputs=["logits"])
        for kind in ("prefill", "decode")
    }
    return dict(
        format=MANIFEST_FORMAT, format_version=MANIFEST_FORMAT_VERSION, condfx_version=__version__,
        opset=18, model=model_identity(load(MODEL)[0], MODEL), vocab_size=256, max_seq_len=512,
        passes="fuse-attention", layers=[dict(layer, layer=i) for i in range(2)], files=files,
    )


def _demo_cache(data: bytes) -> Callable[[Path], list[str]]:
    def build(r: Path) -> list[str]:
        from condfx.demo import cache_path

        old = os.environ.get("CONDFX_CACHE")
        os.environ["CONDFX_CACHE"] = str(r / "cache")
        try:
            _file(r, str(cache_path().relative_to(r)), data)
        finally:
            os.environ.pop("CONDFX_CACHE") if old is None else os.environ.update(CONDFX_CACHE=old)
        return ["demo", "--json"]

    return build


_DEEP_JSON = "[" * DEEP + "]" * DEEP
_DEEP_YAML = "- " * 2000 + "fuse-attention\n"

CASES: MappingProxyType = MappingProxyType({
    # the model argument
    "model-empty-folder": Case(lambda r: ["inspect", _dir(r, "empty")], r"empty"),
    "model-random-bin": Case(lambda r: ["inspect", _file(r, "m.bin", os.urandom(300))], r"m\.bin"),
    "model-random-gguf": Case(lambda r: ["inspect", _file(r, "m.gguf", os.urandom(300))], r"m\.gguf"),
    "model-empty-gguf": Case(lambda r: ["inspect", _file(r, "m.gguf", b"")], r"m\.gguf"),
    "model-text-file": Case(lambda r: ["inspect", _file(r, "m.txt", "hello")], r"m\.txt"),
    "model-gguf-is-folder": Case(lambda r: ["inspect", _dir(r, "m.gguf")], r"m\.gguf"),
    "model-config-no-weights": Case(_hf_folder('{"model_type": "llama"}'), r"hf"),
    "model-config-deep": Case(_hf_folder(_DEEP_JSON), r"config\.json is not valid JSON \(maximum recursion"),
    "model-config-binary": Case(_hf_folder(b"\xff\xfe\x00bad".decode("latin-1")), r"config\.json"),
    # the pass spec
    "spec-yaml-malformed": Case(_spec_file("p.yaml", "- fuse-attention: {layers: [0,\n"), r"p\.yaml"),
    "spec-yaml-python-tag": Case(
        _spec_file("p.yaml", "!!python/object/apply:os.system ['echo owned']\n"), r"p\.yaml"
    ),
    "spec-yaml-deep": Case(_spec_file("p.yaml", _DEEP_YAML), r"p\.yaml"),
    "spec-yaml-deep-flow": Case(_spec_file("p.yaml", _DEEP_JSON), r"p\.yaml"),
    "spec-json-deep": Case(_spec_file("p.json", _DEEP_JSON), r"p\.json"),
    "spec-json-malformed": Case(_spec_file("p.json", "{"), r"p\.json"),
    "spec-json-binary": Case(_spec_file("p.json", b"\xff\xfe\x00\x01"), r"p\.json"),
    "spec-yaml-scalar": Case(_spec_file("p.yaml", "42\n"), r"p\.yaml"),
    "spec-yaml-nested-lists": Case(_spec_file("p.yaml", "[[1]]\n"), r"p\.yaml"),
    "spec-file-is-folder": Case(
        lambda r: ["optimize", MODEL, "--passes", _dir(r, "p.yaml"), "-o", str(r / "out")], r"p\.yaml"
    ),
    "spec-text-deep": Case(_optimize("fuse-attention{layers=" + "[" * DEEP + "}"), r"layers|column"),
    "spec-text-control-chars": Case(_optimize("fuse-attention\x07{}"), r"spec|pass|column"),
    "spec-layers-99": Case(_optimize("fuse-attention{layers=[0,99]}"), r"99", ci=False),
    "spec-init-noise-nan": Case(_optimize("interleave-heads{init_noise=nan}"), r"init_noise", ci=False),
    "spec-P-huge": Case(_optimize("interleave-heads{P=1000000000}"), r"P", ci=False),
    "spec-rank-huge": Case(
        _optimize("skip-ffn{policy=forecast,rank=1000000000,cold_start=0,cold_end=0}"), r"rank", ci=False
    ),
    # text files
    "eval-text-folder": Case(lambda r: ["eval", MODEL, "--text", _dir(r, "t.txt")], r"t\.txt"),
    "eval-text-binary": Case(
        lambda r: ["eval", MODEL, "--text", _file(r, "t.txt", b"\xff\xfe\x80" * 50)], r"t\.txt"
    ),
    "eval-text-empty": Case(lambda r: ["eval", MODEL, "--text", _file(r, "t.txt", "")], r"t\.txt"),
    "calibrate-text-binary": Case(
        lambda r: ["calibrate", MODEL, "--text", _file(r, "t.txt", b"\xff\x80" * 50),
                   "--target-skip", "0.5", "-o", str(r / "c.json")], r"t\.txt",
    ),
    "eval-context-zero": Case(_eval("--context", "0"), r"--context"),
    "eval-context-negative": Case(_eval("--context", "-5"), r"--context"),
    "eval-context-huge": Case(_eval("--context", "100000"), r"--context 100000 is beyond"),
    "eval-max-docs-zero": Case(
        lambda r: ["eval", MODEL, "--text", _text(r), "--max-docs", "0"], r"--max-docs"
    ),
    # output paths
    "optimize-o-file": Case(
        lambda r: ["optimize", MODEL, "--passes", "fuse-attention", "-o", _file(r, "o.txt", "x")],
        r"o\.txt",
    ),
    "optimize-o-under-file": Case(
        lambda r: ["optimize", MODEL, "--passes", "fuse-attention", "-o",
                   str(Path(_file(r, "o.txt", "x")) / "sub")], r"o\.txt",
    ),
    "calibrate-o-folder": Case(
        lambda r: ["calibrate", MODEL, "--text", _text(r), "--target-skip", "0.5", "-o",
                   _dir(r, "c.json")], r"c\.json",
    ),
    "calibrate-o-missing-parent": Case(
        lambda r: ["calibrate", MODEL, "--text", _text(r), "--target-skip", "0.5", "-o",
                   str(r / "no" / "such" / "c.json")], r"no/such",
    ),
    "calibrate-plot-folder": Case(
        lambda r: ["calibrate", MODEL, "--text", _text(r), "--target-skip", "0.5", "-o",
                   str(r / "c.json"), "--plot", _dir(r, "p.png")], r"p\.png",
    ),
    "export-o-file": Case(lambda r: ["export", MODEL, "-o", _file(r, "o.txt", "x")], r"o\.txt"),
    "export-kv-calib-folder": Case(
        lambda r: ["export", MODEL, "--passes", "fuse-attention,quantize-kv{latent=klt}",
                   "-o", str(r / "b"), "--kv-calib", _dir(r, "k.txt")], r"k\.txt",
    ),
    "export-kv-calib-missing": Case(
        lambda r: ["export", MODEL, "-o", str(r / "b"), "--kv-calib", str(r / "k.txt")], r"k\.txt"
    ),
    # sampling and numbers
    "generate-temperature-nan": Case(_generate("--temperature", "nan"), r"temperature"),
    "generate-temperature-inf": Case(_generate("--temperature", "inf"), r"temperature"),
    "generate-temperature-negative": Case(_generate("--temperature", "-1"), r"temperature"),
    "generate-top-p-nan": Case(_generate("--top-p", "nan"), r"top.p"),
    "generate-top-k-negative": Case(_generate("--top-k", "-1"), r"top.k"),
    "generate-seed-huge": Case(_generate("--temperature", "1", "--seed", str(2**64)), r"--seed"),
    "generate-max-new-tokens-word": Case(_generate("--max-new-tokens", "lots"), r"max-new-tokens"),
    # ONNX folders
    "onnx-folder-missing": Case(lambda r: _generate("--onnx", str(r / "nope"))(r), r"nope"),
    "onnx-folder-is-file": Case(lambda r: _generate("--onnx", _file(r, "b.onnx", "x"))(r), r"b\.onnx"),
    "onnx-manifest-list": Case(_bundle(lambda f: []), r"bundle"),
    "onnx-manifest-deep": Case(_bundle(lambda f: _DEEP_JSON), r"bundle"),
    "onnx-manifest-files-strings": Case(
        _bundle(lambda f: {**_valid_manifest(f), "files": {"prefill": "x", "decode": "y"}}), r"bundle"
    ),
    "onnx-manifest-layer-list": Case(
        _bundle(lambda f: {**_valid_manifest(f), "layers": [[1, 2]]}), r"bundle"
    ),
    "onnx-garbage-graphs": Case(_bundle(_valid_manifest, onnx=b"\x08\x07garbage" * 20), r"bundle"),
    # the demo's cache
    "demo-cache-corrupt": Case(_demo_cache(b"\x10\x00\x00\x00garbage"), r"demo|cache",
                               env=MappingProxyType({"CONDFX_CACHE": "{root}/cache"})),
    "demo-cache-is-file": Case(lambda r: [_file(r, "cachefile", "x") and "demo", "--json"],
                               r"cachefile", env=MappingProxyType({"CONDFX_CACHE": "{root}/cachefile"})),
})


def _one(name: str, case: Case, root: Path) -> dict:
    root.mkdir(parents=True, exist_ok=True)
    try:
        argv = case.build(root)
    except Exception as exc:  # noqa: BLE001 (a case that cannot be built is reported, not fatal)
        return dict(case=name, rc="build failed", ok=False, traceback=False, lines=0,
                    last=f"{type(exc).__name__}: {exc}"[:240], seconds=0.0)
    repo = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": repo, **{k: v.format(root=root) for k, v in case.env.items()}}
    env.pop("CONDFX_DEBUG", None)
    t0 = time.perf_counter()
    try:
        run = subprocess.run([sys.executable, "-m", "condfx.cli", *argv], capture_output=True,
                             text=True, env=env, timeout=120)
        rc, err = run.returncode, run.stderr
    except subprocess.TimeoutExpired:
        rc, err = "timeout", ""
    lines = [ln for ln in err.splitlines() if ln.strip() and not re.match(r"[WI]\d{4} ", ln)]
    ok = rc == 2 and len(lines) == 1 and "Traceback" not in err and re.search(case.pattern, lines[0])
    return dict(case=name, rc=rc, ok=bool(ok), traceback="Traceback" in err,
                lines=len(lines), last=lines[-1][:240] if lines else "",
                seconds=round(time.perf_counter() - t0, 1))


def main() -> None:
    """Runs the cases and prints the failures and the counts."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default=None, help="comma-separated case names")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    names = args.only.split(",") if args.only else list(CASES)
    with tempfile.TemporaryDirectory() as tmp:
        rows = []
        for n in names:
            rows.append(_one(n, CASES[n], Path(tmp) / n))
            row = rows[-1]
            mark = "ok " if row["ok"] else "BAD"
            print(f"{mark} {row['case']:30} rc={row['rc']} lines={row['lines']} {row['last']}",
                  flush=True)
    if args.json:
        print(json.dumps(rows, indent=1))
    bad = [r for r in rows if not r["ok"]]
    tracebacks = sum(r["traceback"] for r in rows)
    exit1 = sum(r["rc"] == 1 for r in rows)
    print(f"{len(rows)} cases: {len(bad)} not one sentence with exit 2 "
          f"({tracebacks} tracebacks, {exit1} exit 1)")


if __name__ == "__main__":
    main()
