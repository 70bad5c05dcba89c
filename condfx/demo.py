"""``condfx demo``: the stack on stories260K, before and after, quality, speed and memory.

It loads stories260K from the data folder, captures it, and runs ``DEMO_PASSES`` (the L2A retrofit
``route-attention{form=select}`` with a 64-token window and 60% of the tokens skipping global attention,
KIVI 2-bit caches, FFN skipping) through the pass life cycle (``condfx.lifecycle``): the routers are
fitted to the oracle and the skip threshold calibrates on TinyStories text the evaluation does not see
(no training: seconds of CPU). The original and the result are measured the way
``condfx optimize`` measures (``condfx.measure``): perplexity, measured skip fraction, KV bytes per
token read from the torch Session's caches, prefill and decode tokens/s, peak memory. The learned
state is cached (``condfx.lifecycle.save_state``; checked against the model when loaded), so a second
run skips the calibration.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from condfx.errors import reading

DEMO_PASSES = ("route-attention{form=select,window=64,skip=0.6}, "
               "quantize-kv{method=kivi,bits=2,group=32,residual=32}, skip-ffn{threshold=0.9}")
_MODEL, _TEXT = "stories260K.bin", "tinystories_valid_head.txt"
_CALIB_FROM = 400_000  # characters: calibration reads the second half of the text, evaluation the first


@dataclass(frozen=True)
class DemoBudget:
    """What the demo spends.

    Attributes:
        steps: L2A training steps (read only by a trained route-attention form; the demo's select form
            calibrates without training).
        calib_tokens: calibration tokens (batches of ``seq_len``).
        seq_len: tokens per calibration batch.
        eval_tokens: evaluation tokens scored (windows of 256).
        decode_tokens: decode steps timed.
    """

    steps: int = 40
    calib_tokens: int = 4096
    seq_len: int = 128
    eval_tokens: int = 2048
    decode_tokens: int = 32


def cache_dir() -> Path:
    """Where the demo's learned state is kept (``CONDFX_CACHE`` or ``~/.cache/condfx``)."""
    root = os.environ.get("CONDFX_CACHE") or Path.home() / ".cache" / "condfx"
    return Path(root)


def cache_path(budget: DemoBudget | None = None) -> Path:
    """The cached learned state; its name changes with the passes and the budget."""
    import hashlib

    key = repr((DEMO_PASSES, budget or DemoBudget())).encode()
    return cache_dir() / f"demo_stack_{hashlib.sha1(key).hexdigest()[:10]}.safetensors"


def _check_cache_dir(folder: Path) -> None:
    """Refuses a cache folder that cannot hold the learned state, before the training starts."""
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    if not existing.is_dir():
        msg = (f"The demo's cache folder '{folder}' cannot be created: '{existing}' is a file "
               "(set CONDFX_CACHE to a folder).")
        raise ValueError(msg)


def _stack(gm, tok, budget: DemoBudget, retrain: bool, say):
    """(the pipeline result, "cached" or "calibrated"): the cached state when there is one."""
    from condfx.data import data_file
    from condfx.lifecycle import apply, load_state, save_state
    from condfx.passes.base import Budget, calibration_batches

    path = cache_path(budget)
    if path.is_file() and not retrain:
        with reading(f"the cached demo state '{path}' (delete it or run 'condfx demo --retrain')"):
            return load_state(path, gm), "cached"
    _check_cache_dir(path.parent)
    say(f"calibrating the stack on TinyStories ({budget.calib_tokens} tokens; cached in {path})")
    text = data_file(_TEXT).read_text(encoding="utf-8")[_CALIB_FROM:]
    cal = Budget(tokens=budget.calib_tokens, seq_len=budget.seq_len, steps=budget.steps)
    batches = calibration_batches(tok.encode(text[: budget.calib_tokens * 8], bos=True, eos=False), cal)
    result = apply(gm, DEMO_PASSES, calib=batches, budget=cal)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_state(result, gm, path)
    return result, "calibrated"


def run_demo(*, retrain: bool = False, quiet: bool = False, console: Console | None = None,
             budget: DemoBudget | None = None) -> dict:
    """Runs the demo: load stories260K, apply ``DEMO_PASSES`` (calibrated), measure before and after.

    Args:
        retrain: ignore the cached state and calibrate and train again.
        quiet: print nothing (the CLI prints the returned dict as JSON instead).
        console: where to print; a new rich Console by default.
        budget: what the demo spends (default ``DemoBudget()``).

    Returns:
        The figures: model, passes (as calibrated), how ("calibrated" or "cached"), before and after
        (``condfx.measure.Point`` as dicts), greedy agreement, and seconds.
    """
    import condfx
    from condfx.data import data_file
    from condfx.measure import MeasureConfig, greedy_agreement, measure_point, point_dict
    from condfx.models_zoo import load

    budget = budget or DemoBudget()
    console = console or Console()
    say = (lambda _m: None) if quiet else (lambda m: console.print(f"{m} ...", highlight=False))
    t0 = time.perf_counter()
    model, tok = load(data_file(_MODEL))
    limit = model.info.max_seq_len
    gm = condfx.capture(model, (torch.zeros(2, 8, dtype=torch.long),))
    result, how = _stack(gm, tok, budget, retrain, say)
    text = data_file(_TEXT).read_text(encoding="utf-8")[:_CALIB_FROM]
    ids = torch.tensor([tok.encode(text[: budget.eval_tokens * 8], bos=True, eos=False)[: budget.eval_tokens]])
    cfg = MeasureConfig(context=256, kv_context=min(limit, ids.shape[1]) - budget.decode_tokens - 1,
                        prefill_tokens=128, decode_tokens=budget.decode_tokens, repeats=1)
    before = measure_point("original", gm, ids, cfg, limit, say)
    after = measure_point("stack", result.graph_module, ids, cfg, limit, say)
    greedy = greedy_agreement(gm, result.graph_module, ids[:, :32], budget.decode_tokens, limit)
    summary = {
        "model": f"stories260K ({how} stack state)", "passes": result.spec, "how": how,
        "before": point_dict(before), "after": point_dict(after), "greedy": greedy,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    if not quiet:
        _print(console, summary)
    return summary


def _print(console: Console, summary: dict) -> None:
    b, a = summary["before"], summary["after"]
    table = Table(title=f"{summary['model']}: before and after (TinyStories, {b['tokens']} tokens)")
    for col in ("", "perplexity", "FFN skipped", "KV bytes/token", "prefill tok/s", "decode tok/s", "peak MB"):
        table.add_column(col, justify="right" if col else "left")

    def row(name: str, p: dict) -> None:
        skip = "-" if p["skip_fraction"] is None else f"{p['skip_fraction']:.1%}"
        kv = "-" if p["kv_bytes_per_token"] is None else f"{p['kv_bytes_per_token']:.0f} ({p['kv_context']} tokens)"
        fmt = {k: "-" if p[k] is None else f"{p[k]:.0f}" for k in ("prefill_tps", "decode_tps")}
        peak = "-" if p["peak_bytes"] is None else f"{p['peak_bytes'] / 2**20:.0f}"
        table.add_row(name, f"{p['ppl']:.3f}", skip, kv, fmt["prefill_tps"], fmt["decode_tps"], peak)

    row("original", b)
    row("stack", a)
    console.print(f"passes: {summary['passes']}", highlight=False, soft_wrap=True)
    console.print(table)
    g = summary["greedy"]
    console.print(f"greedy agreement {g['agreement']:.2f} over {g['tokens']} tokens; peak MB is the process's "
                  f"peak resident set (monotonic); done in {summary['seconds']} s", highlight=False)
