"""Imports each project module on its own, as a fresh interpreter would; run by tests/test_imports.py.

Usage::

    python -m tests._import_check [--path DIR]... [--jobs N] [--preload M,M] [--times] TARGET...

A TARGET is a module name (``condfx.passes.skip_ffn``) or ``script:PATH``: a script run as
``python PATH --help`` (its folder first on ``sys.path``, as when it is run), which must stop there with exit 0.
Prints ``FAIL <target>: <error>`` for each failing target and exits 1 if any failed.

How: this process imports the heavy third-party libraries named by ``--preload`` (torch, numpy,
onnx, ...; those not installed are skipped) and none of the project, then forks one child per
target, a few at a time. Each child imports its one target and reports through its exit status
and a pipe.

Why a forked child is as good as a fresh interpreter for import cycles: a circular import fails
or succeeds depending only on which project modules are already in ``sys.modules`` (complete or
half-initialised) when the import starts, since that decides the order in which module bodies
run. In every child no project module is in ``sys.modules`` (this process never imports one,
checked after the preload), so each child starts its target from the same empty project state as
``python -c "import condfx.kv_calibrate"``. The preloaded third-party modules take part in no
project cycle; preloading them only saves their import time in every child (torch alone takes
about 2 s). What a child does not reproduce: a project import that works only because a
third-party module is *not* yet loaded; no such import exists here.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import os
import runpy
import sys
import time
import traceback
from pathlib import Path

SCRIPT = "script:"
_MAX_MESSAGE = (
    3000  # characters per failure: under a pipe's buffer, read only after the child exits
)


def run_target(target: str) -> None:
    """Imports one module, or runs one script with ``--help`` (exit status 0 expected)."""
    if not target.startswith(SCRIPT):
        importlib.import_module(target)
        return
    path = target[len(SCRIPT) :]
    sys.path.insert(0, str(Path(path).resolve().parent))
    sys.argv = [path, "--help"]
    try:
        runpy.run_path(path, run_name="__main__")
    except SystemExit as exc:
        if exc.code not in (0, None):
            raise
    else:  # --help must stop the script before it does any work
        msg = "ran to the end instead of stopping at --help (no argument parser?)"
        raise RuntimeError(msg)


def _quiet() -> None:
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)


def _fork(job) -> tuple[int, int]:
    """Forks a child that runs ``job()`` and writes what it returns (or its error) to a pipe."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid:
        os.close(write_fd)
        return pid, read_fd
    os.close(read_fd)
    status = 0
    try:
        _quiet()
        message = job()
    except BaseException as exc:  # noqa: BLE001  (any failure is the report)
        last = traceback.extract_tb(exc.__traceback__)[-1:]
        where = f" (at {last[0].filename}:{last[0].lineno})" if last else ""
        message, status = f"{type(exc).__name__}: {exc}{where}"[:_MAX_MESSAGE], 1
    data = message.encode()
    while data:
        data = data[os.write(write_fd, data) :]
    os.close(write_fd)
    os._exit(status)


def _collect(read_fd: int) -> str:
    chunks = []
    while chunk := os.read(read_fd, 65536):
        chunks.append(chunk)
    os.close(read_fd)
    return b"".join(chunks).decode(errors="replace")


def _preload(names: list[str], project: set[str]) -> None:
    """Imports the third-party ``names`` that are installed; fails if that loaded project code."""
    for name in names:
        try:
            importlib.import_module(name)
        except BaseException:  # noqa: BLE001, S110  (a preload only saves time)
            pass
    leaked = sorted(n for n in sys.modules if n.split(".")[0] in project)
    if leaked:
        msg = f"preloading third-party modules imported project modules: {', '.join(leaked)}"
        raise RuntimeError(msg)


def check(
    targets: list[str], project: set[str], jobs: int, preload: list[str]
) -> dict[str, tuple[str, float]]:
    """Runs every target in its own forked child; returns ``{target: (error or '', seconds)}``."""
    _preload(preload, project)
    # Frozen objects are skipped by the children's garbage collector, which would otherwise write
    # to (and so copy) every page of the preloaded libraries in every child.
    gc.freeze()
    try:
        return _run_children(targets, jobs)
    finally:
        gc.unfreeze()


def _run_children(targets: list[str], jobs: int) -> dict[str, tuple[str, float]]:
    pending = list(reversed(targets))
    running: dict[int, tuple[str, int, float]] = {}
    results: dict[str, tuple[str, float]] = {}
    while pending or running:
        while pending and len(running) < jobs:
            target = pending.pop()
            pid, read_fd = _fork(lambda target=target: run_target(target) or "")
            running[pid] = (target, read_fd, time.perf_counter())
        pid, status = os.waitpid(-1, 0)
        target, read_fd, start = running.pop(pid)
        message = _collect(read_fd)
        if os.waitstatus_to_exitcode(status) != 0 and not message:
            message = f"child exited with status {os.waitstatus_to_exitcode(status)}"
        results[target] = (message if status else "", time.perf_counter() - start)
    return results


def _project_names(targets: list[str]) -> set[str]:
    """Top-level names that belong to the project: the modules' packages and the scripts' folders."""
    names = {t.split(".")[0] for t in targets if not t.startswith(SCRIPT)}
    for target in targets:
        if target.startswith(SCRIPT):
            folder = Path(target[len(SCRIPT) :]).resolve().parent
            names |= {p.stem for p in folder.glob("*.py")}
    return names


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("targets", nargs="+")
    parser.add_argument("--path", action="append", default=[], help="prepend to sys.path")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument(
        "--preload", default="", help="comma-separated third-party modules to import once, first"
    )
    parser.add_argument("--times", action="store_true", help="print each target's seconds")
    args = parser.parse_args(argv)
    sys.path[:0] = args.path
    preload = [name for name in args.preload.split(",") if name]
    results = check(args.targets, _project_names(args.targets), max(1, args.jobs), preload)
    for target in args.targets:
        error, seconds = results[target]
        if args.times:
            print(f"{seconds:6.2f}s {target}")
        if error:
            print(f"FAIL {target}: {error}")
    return 1 if any(error for error, _ in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
