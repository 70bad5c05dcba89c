"""Conformance table: every decoder-only class of the installed transformers, built small, through condfx.

For every model type in ``MODEL_FOR_CAUSAL_LM_MAPPING_NAMES`` (small configs: 2 layers, hidden 64, 4 heads,
2 KV heads, vocab 128, random weights; ``benchmarks/conformance_build.py``), in SDPA and eager where the class
offers them, it reports per row (``benchmarks/conformance_checks.py``): capture; attention and FFN regions
found in every layer; fuse-attention exact (max logit difference <= 1e-5, float32); route-attention,
quantize-kv{method=kivi}, quantize-kv{method=xquant} and skip-ffn rewriting every layer; greedy decode
through add-kv-cache and the torch Session equal to the HF model's own ``generate`` (8 new tokens); with
``--onnx``, the decode graph exported to ONNX and ONNX Runtime within 1e-4. Each cell is green or the
one-sentence reason. Classes left out (encoder-decoder, encoder-only, multimodal, a missing package, a
small config that does not build) are listed with their reason.

    python benchmarks/conformance.py [--classes llama,gemma3_text] [--attn sdpa,eager|auto] [--onnx]
        [--no-decode] [--no-passes] [--build-only] [--row-timeout 120] [--jobs 8] [--jsonl rows.jsonl [--resume]]
        [--json] [--out table.md]

It is not a test; ``tests/models/`` runs a representative third of the classes in CI and the full sweep
under ``-m slow``.
"""

from __future__ import annotations

import argparse
import gc
import json
import signal
import sys
import time
import warnings
from dataclasses import asdict
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make ``benchmarks`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.conformance_build import (
    N_LAYERS,
    Excluded,
    build_small,
    first_sentence,
    small_config,
)
from benchmarks.conformance_checks import COLUMNS, PASS_SPECS, Row, is_green, measure

__all__ = ["N_LAYERS", "PASS_SPECS", "Row", "build_small", "conformance_row", "measure", "small_config"]


def _build_row(model_type: str, attn: str):
    """``(model, row)``; ``attn="auto"`` is SDPA, or eager when the class does not offer SDPA.
    The model is None when the class is excluded or fails to build (the row says why)."""
    row = Row(model_type, "sdpa" if attn == "auto" else attn)
    for impl in ("sdpa", "eager") if attn == "auto" else (attn,):
        row.attn = impl
        try:
            model = build_small(model_type, impl)
            row.build = "ok"
            return model, row
        except Excluded as err:
            row.build, row.excluded = str(err), err.kind.value
            return None, row
        except Exception as err:  # noqa: BLE001  (SDPA not offered: the class refuses it)
            row.build = f"{impl} not offered: {first_sentence(err)}"
    return None, row


def conformance_row(model_type: str, attn: str, passes: bool = True, decode: bool = True,
                    onnx: bool = False, build_only: bool = False) -> Row:
    """Builds ``model_type`` small with ``attn`` and measures it (build failures become the row)."""
    start = time.perf_counter()
    model, row = _build_row(model_type, attn)
    if model is not None and not build_only:
        measure(model, row, passes=passes, decode=decode, onnx=onnx)
    row.seconds = round(time.perf_counter() - start, 2)
    return row


def _timed_row(model_type: str, attn: str, seconds: int, **checks: bool) -> Row:
    """``conformance_row`` cut off after ``seconds`` (SIGALRM; the row then says so)."""

    def _stop(signum, frame):
        msg = f"row took over {seconds} s"
        raise TimeoutError(msg)

    previous = signal.signal(signal.SIGALRM, _stop)
    signal.alarm(seconds)
    try:
        return conformance_row(model_type, attn, **checks)
    except TimeoutError as err:
        return Row(model_type, attn, build=str(err))
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def model_types() -> list[str]:
    """Every model type with a causal LM class in the installed transformers, sorted."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def markdown(rows: list[Row]) -> str:
    """The measured rows as a table (green cells "ok ..."/"n/a ..."), then the excluded classes."""
    head = ["model", "attn", *(c.replace("_", "-") for c in COLUMNS)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in (r for r in rows if r.build == "ok"):
        cells = [r.model_type, r.attn, *r.cells().values()]
        lines.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
    built = {r.model_type for r in rows if r.build == "ok"}
    left_out = sorted({(r.model_type, r.build) for r in rows if r.build != "ok" and r.model_type not in built
                       and "not offered" not in r.build})
    no_sdpa = sorted({r.model_type for r in rows if "sdpa not offered" in r.build})
    if no_sdpa:
        lines += ["", f"SDPA not offered (eager rows only): {', '.join(no_sdpa)}."]
    if left_out:
        lines += ["", "| class left out | reason |", "|---|---|"]
        lines += [f"| {kind} | {why.replace('|', '/')} |" for kind, why in left_out]
    return "\n".join(lines)


def summary(rows: list[Row]) -> dict[str, int]:
    """Counts: classes and rows built, all-green classes (every row green) and rows, green per column."""
    built = [r for r in rows if r.build == "ok"]
    classes = {r.model_type for r in built}
    red = {r.model_type for r in built if not r.green()}
    out = {"classes": len({r.model_type for r in rows}), "classes_covered": len(classes),
           "classes_all_green": len(classes - red), "rows": len(rows), "rows_built": len(built),
           "rows_all_green": sum(r.green() for r in built)}
    for col in COLUMNS:
        ran = [r.cells()[col] for r in built if r.cells()[col]]
        if ran:
            out[col] = sum(is_green(c) for c in ran)
    return out


def _progress(i: int, n: int, row: Row, start: float) -> None:
    state = "green" if row.green() else ("left out" if row.build != "ok" else "not green")
    eta = (time.perf_counter() - start) / i * (n - i)
    bar = "#" * (20 * i // n)
    print(f"[{bar:<20}] {i}/{n} {row.model_type} {row.attn}: {state} ({row.seconds:.1f} s, "
          f"~{eta / 60:.0f} min left)", file=sys.stderr, flush=True)


def _row_job(job: tuple[str, str, int, dict[str, bool]]) -> Row:
    """One row in a worker process (quiet transformers, warnings off)."""
    import torch
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    kind, attn, seconds, checks = job
    torch.set_num_threads(1)  # rows run side by side; one thread each is fastest for tiny models
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        row = _timed_row(kind, attn, seconds, **checks)
    gc.collect()  # built models and graphs are garbage now; a full sweep holds hundreds of them
    return row


def _done(jsonl: str) -> dict[tuple[str, str], Row]:
    """Rows already in ``jsonl`` (for ``--resume``), by (model type, requested attn)."""
    rows = {}
    if jsonl and Path(jsonl).is_file():
        for line in Path(jsonl).read_text().splitlines():
            data = json.loads(line)
            requested = data.pop("requested")
            rows[(data["model_type"], requested)] = Row(**data)
    return rows


def sweep(types: list[str], attns: list[str], row_timeout: int, jsonl: str = "", jobs: int = 1,
          resume: bool = False, **checks: bool) -> list[Row]:
    """Measures every (type, attn) pair, ``jobs`` rows at a time, with a progress line per row."""
    import concurrent.futures as cf
    import multiprocessing

    done = _done(jsonl) if resume else {}
    rows = {pair: row for pair, row in done.items() if pair[0] in types}
    todo = [(t, a) for t in types for a in attns if (t, a) not in rows]
    start, n = time.perf_counter(), len(todo)
    # (max_tasks_per_child would recycle workers, but Python 3.11's pool hangs once they retire.)
    with cf.ProcessPoolExecutor(max(1, jobs), mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {pool.submit(_row_job, (t, a, row_timeout, checks)): (t, a) for t, a in todo}
        for i, future in enumerate(cf.as_completed(futures), 1):
            pair = futures[future]
            try:
                rows[pair] = future.result()
            except Exception as err:  # noqa: BLE001  (a worker killed, e.g. out of memory)
                rows[pair] = Row(pair[0], pair[1], build=f"worker failed: {first_sentence(err)}")
            if jsonl:
                with open(jsonl, "a") as f:
                    f.write(json.dumps({"requested": pair[1], **asdict(rows[pair])}) + "\n")
            _progress(i, n, rows[pair], start)
    return [rows[(t, a)] for t in types for a in attns if (t, a) in rows]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--classes", "--only", default="", help="comma-separated model types (default: all)")
    parser.add_argument("--attn", default="sdpa,eager",
                        help="attention implementations; 'auto': SDPA, eager where SDPA is not offered")
    parser.add_argument("--row-timeout", type=int, default=120, help="seconds per row before it is cut off")
    parser.add_argument("--onnx", action="store_true", help="also export each row to ONNX (slow)")
    parser.add_argument("--no-decode", action="store_true", help="skip the Session column")
    parser.add_argument("--no-passes", action="store_true", help="skip the four lossy passes")
    parser.add_argument("--build-only", action="store_true", help="only build: which classes are covered")
    parser.add_argument("--jobs", type=int, default=1, help="rows measured at once (worker processes)")
    parser.add_argument("--jsonl", default="", help="also append each row to this file as it is measured")
    parser.add_argument("--resume", action="store_true", help="keep the rows already in --jsonl")
    parser.add_argument("--json", action="store_true", help="print JSON instead of markdown")
    parser.add_argument("--out", default="", help="also write the output to this file")
    args = parser.parse_args(argv)
    types = args.classes.split(",") if args.classes else model_types()
    rows = sweep(types, args.attn.split(","), args.row_timeout, args.jsonl, args.jobs, args.resume,
                 passes=not args.no_passes, decode=not args.no_decode, onnx=args.onnx,
                 build_only=args.build_only)
    if args.json:
        text = json.dumps({"summary": summary(rows), "rows": [asdict(r) for r in rows]}, indent=1)
    else:
        text = f"{markdown(rows)}\n\n{summary(rows)}"
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
