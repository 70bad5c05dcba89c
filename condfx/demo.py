"""``condfx demo``: the whole pipeline on an embedded default, with no files needed.

It trains a 2-layer zoo Llama on multi-query associative recall (cached after the first run), captures
it, applies every pass that exists and is exact, and prints the report and the quality before and after.
"""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.markdown import Markdown
from rich.table import Table

from condfx.errors import reading

DEMO_PASSES = "fuse-attention"
_SEED = 0
_EVAL_SEQS = 256
_EVAL_SEED = 123


def cache_dir() -> Path:
    """Where the trained demo model is kept (``CONDFX_CACHE`` or ``~/.cache/condfx``)."""
    root = os.environ.get("CONDFX_CACHE") or Path.home() / ".cache" / "condfx"
    return Path(root)


def cache_path() -> Path:
    """The cached demo model; its name changes with the demo task and training budget."""
    from condfx.eval import tasks

    key = repr((tasks.DEMO_MQAR, tasks.DEMO_STEPS, _SEED)).encode()
    return cache_dir() / f"demo_mqar_{hashlib.sha1(key).hexdigest()[:10]}.safetensors"


def _demo_model(retrain: bool, console: Console | None):
    from condfx.eval import tasks
    from condfx.train import load_trained

    cfg, path = tasks.DEMO_MQAR, cache_path()
    if path.is_file() and not retrain:
        model = tasks.build_mqar_model(cfg, seed=_SEED)
        with reading(f"the cached demo model '{path}' (delete it or run 'condfx demo --retrain')"):
            load_trained(model, path)
        return model.eval(), cfg, "cached"
    _check_cache_dir(path.parent)
    if console is not None:
        console.print(
            f"training the demo model on associative recall ({tasks.DEMO_STEPS} steps; "
            f"cached in {path}) ..."
        )
    model = tasks.train_mqar_model(
        cfg, tasks.DEMO_STEPS, seed=_SEED, save_to=path, progress=console is not None
    )
    return model.eval(), cfg, "trained"


def _check_cache_dir(folder: Path) -> None:
    """Refuses a cache folder that cannot hold the trained model, before the training starts."""
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    if not existing.is_dir():
        msg = (f"The demo's cache folder '{folder}' cannot be created: '{existing}' is a file "
               "(set CONDFX_CACHE to a folder).")
        raise ValueError(msg)


def run_demo(*, retrain: bool = False, quiet: bool = False, console: Console | None = None) -> dict:
    """Runs the demo: train or load, capture, apply ``DEMO_PASSES``, verify, score before and after.

    Args:
        retrain: ignore the cached model and train (and cache) a fresh one.
        quiet: print nothing (the CLI prints the returned dict as JSON instead).
        console: where to print; a new rich Console by default.

    Returns:
        The figures: model, passes, accuracy_before/after (MQAR, 256 sequences),
        max_abs_logit_diff, verified, the pipeline report as a dict, and seconds.
    """
    import condfx
    from condfx.eval.tasks import make_mqar_batch, mqar_accuracy
    from condfx.verify import verify

    console = console or Console()
    t0 = time.perf_counter()
    model, cfg, how = _demo_model(retrain, None if quiet else console)
    ids, _ = make_mqar_batch(cfg, 4, torch.Generator().manual_seed(1))
    gm = condfx.capture(model, (ids,))
    result = condfx.apply(gm, DEMO_PASSES)
    check = verify(gm, result.graph_module, (ids,))
    acc_before = mqar_accuracy(model, cfg, n=_EVAL_SEQS, seed=_EVAL_SEED)
    acc_after = mqar_accuracy(result.graph_module, cfg, n=_EVAL_SEQS, seed=_EVAL_SEED)
    summary = {
        "model": f"2-layer zoo Llama on MQAR ({how})",
        "task": repr(cfg),
        "passes": DEMO_PASSES,
        "accuracy_before": acc_before,
        "accuracy_after": acc_after,
        "max_abs_logit_diff": check.max_abs_diff,
        "verified": check.ok,
        "report": result.report.to_dict(),
        "seconds": round(time.perf_counter() - t0, 1),
    }
    if not quiet:
        _print(console, result.report, summary)
    return summary


def _print(console: Console, report, summary: dict) -> None:
    console.print(Markdown(str(report)))
    table = Table(title=f"quality before and after ({summary['model']})")
    for col in ("model", "MQAR accuracy", "max |logit diff| vs original"):
        table.add_column(col)
    table.add_row("original", f"{summary['accuracy_before']:.3f}", "-")
    table.add_row(
        DEMO_PASSES, f"{summary['accuracy_after']:.3f}", f"{summary['max_abs_logit_diff']:.2e}"
    )
    console.print(table)
    console.print(f"done in {summary['seconds']} s")
