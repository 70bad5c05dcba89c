"""Every module of the package imports on its own, and every benchmark the README names shows --help.

A module that imports only after another one was imported first (a circular import hidden by the
order the tests happen to import things in) fails here with its name and error; so does a
benchmark script that cannot even start. ``tests/_import_check.py`` runs each target in its own
forked child that starts with no project module loaded; its docstring explains why that is as
good as a fresh interpreter. All targets share one checker process (a few seconds of torch import
paid once).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_JOBS = str(min(4, os.cpu_count() or 1))
# Imported once by the checker before it forks (only to save time: each child would import them
# anyway); a module missing here costs each child its import time, an absent one is skipped.
_PRELOAD = (
    "torch",
    "torch.nn.functional",
    "torch.fx.experimental.symbolic_shapes",
    "torch.export",
    "torch.onnx",
    "torch._dynamo",
    "numpy",
    "sympy",
    "onnx",
    "onnxscript",
    "onnxruntime",
    "triton",
    "triton.language",
    "rich.console",
    "rich.progress",
    "rich.table",
    "rich.markdown",
)


def package_modules() -> list[str]:
    """Every module of condfx, including the stage folders it maps (condfx/passes -> ../passes)."""
    names = []
    for folder, subfolders, files in os.walk(ROOT / "condfx", followlinks=True):
        subfolders[:] = sorted(d for d in subfolders if d != "__pycache__")
        parts = Path(folder).relative_to(ROOT).parts
        names += [".".join(parts) for f in files if f == "__init__.py"]
        names += [
            ".".join((*parts, f[:-3])) for f in files if f.endswith(".py") and f != "__init__.py"
        ]
    return sorted(names)


def readme_benchmarks() -> list[Path]:
    """The benchmark scripts that README.md tells the reader to run."""
    text = (ROOT / "README.md").read_text()
    return [ROOT / p for p in sorted(set(re.findall(r"python (benchmarks/\w+\.py)", text)))]


def run_checker(
    targets: list[str], *paths: Path, preload: tuple[str, ...] = ()
) -> subprocess.CompletedProcess:
    """Runs ``tests._import_check`` on ``targets`` in a new interpreter rooted at the checkout."""
    extra = [arg for p in paths for arg in ("--path", str(p))]
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "tests._import_check",
            "--jobs",
            _JOBS,
            "--preload",
            ",".join(preload),
        ]
        + extra
        + targets,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )


def _failures(result: subprocess.CompletedProcess) -> dict[str, str]:
    lines = [line.removeprefix("FAIL ") for line in result.stdout.splitlines()]
    return dict(line.split(": ", 1) for line in lines if ": " in line)


@pytest.fixture(scope="module")
def checked() -> tuple[subprocess.CompletedProcess, list[str]]:
    targets = package_modules() + [f"script:{p}" for p in readme_benchmarks()]
    return run_checker(targets, preload=_PRELOAD), targets


def test_package_modules_are_found():
    modules = package_modules()
    for name in ("condfx", "condfx.passes.registry", "condfx.runtime.session", "condfx.ops"):
        assert name in modules
    assert "condfx.models_zoo.zoo" in modules and "condfx.codegen.onnx.attention" in modules


def test_every_module_imports_on_its_own(checked):
    result, targets = checked
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    assert result.returncode == 0 or _failures(result), result.stdout + result.stderr[-3000:]
    failed = {t: e for t, e in _failures(result).items() if not t.startswith("script:")}
    assert not failed, "\n".join(f"{t}: {e}" for t, e in failed.items())


def test_every_readme_benchmark_shows_help(checked):
    result, targets = checked
    scripts = [t for t in targets if t.startswith("script:")]
    assert len(scripts) >= 10, scripts
    assert all(Path(t.removeprefix("script:")).is_file() for t in scripts), scripts
    failed = {t: e for t, e in _failures(result).items() if t.startswith("script:")}
    assert not failed, "\n".join(f"{t}: {e}" for t, e in failed.items())


def _fake_package(root: Path) -> None:
    """``circ.a`` imports ``circ.b``, which imports a name from ``circ.a``: a circular pair that
    imports cleanly when ``circ.b`` comes first and fails when ``circ.a`` comes first."""
    pkg = root / "circ"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from circ import b\n\nVALUE = 1\n")
    (pkg / "b.py").write_text("from circ.a import VALUE\n")
    (pkg / "fine.py").write_text("import json\n")


def test_checker_fails_on_a_circular_pair(tmp_path):
    _fake_package(tmp_path)
    # b first: in one shared interpreter circ.a would then import fine; each child starts fresh.
    result = run_checker(["circ.b", "circ.fine", "circ.a"], tmp_path)
    assert result.returncode == 1, result.stdout + result.stderr
    failures = _failures(result)
    assert set(failures) == {"circ.a"}, failures
    assert re.search(
        r"ImportError: cannot import name 'VALUE'.*circular import", failures["circ.a"]
    )


def test_checker_fails_on_a_script_that_cannot_start(tmp_path):
    (tmp_path / "broken.py").write_text("import no_such_module_xyz\n")
    (tmp_path / "good.py").write_text(
        "import argparse\nif __name__ == '__main__':\n    argparse.ArgumentParser().parse_args()\n"
    )
    result = run_checker([f"script:{tmp_path / 'good.py'}", f"script:{tmp_path / 'broken.py'}"])
    assert result.returncode == 1, result.stdout + result.stderr
    failures = _failures(result)
    assert list(failures) == [f"script:{tmp_path / 'broken.py'}"], failures
    assert "ModuleNotFoundError" in failures[f"script:{tmp_path / 'broken.py'}"]


def test_checker_fails_on_a_script_that_ignores_help(tmp_path):
    """A README benchmark with no argument parser would run its whole workload under ``--help``."""
    script = tmp_path / "no_parser.py"
    script.write_text("print('working')\n")
    result = run_checker([f"script:{script}"])
    assert result.returncode == 1, result.stdout + result.stderr
    assert "stopping at --help" in _failures(result)[f"script:{script}"]
