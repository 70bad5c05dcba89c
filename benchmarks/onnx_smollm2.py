"""SmolLM2-135M exported to ONNX (prefill + decode graphs): agreement with PyTorch and decode speed.

Loads SmolLM2-135M-Instruct (float32, dequantized from the GGUF), captures it, applies
``fuse-attention`` + ``add-kv-cache`` and writes the ONNX bundle (``export_decode_graph``, the same
code as ``condfx export``). Then, on one prompt of ``--prompt-tokens`` tokens (from the Paul Graham
essays):

* the max |logit| difference of ONNX Runtime's prefill against the original Hugging Face model;
* the first ``--new-tokens`` greedy tokens from three loops: ONNX Runtime (condfx Session),
  the condfx torch Session (same decode graph in PyTorch) and Hugging Face ``generate``
  (``use_cache=True``, its own KV cache); agreement is the count of equal positions;
* decode tokens/s at batch 1 on CPU for the same three loops, all measured in this run, same
  prompt, same number of tokens: decode time = time(generate N tokens) - time(generate 1 token),
  best of ``--repeats``, the loops taking turns. CPU figures are ratios (DESIGN.md); the machine may be shared.

    nice python benchmarks/onnx_smollm2.py [--gguf PATH] [--out DIR [--reuse]] [--threads 2] [--opset 18] [--json]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

import condfx
from condfx.data import data_file
from condfx.export_bundle import MANIFEST_NAME, export_decode_graph, model_identity
from condfx.models_zoo import load
from condfx.runtime import Session, TorchBackend, generate


def _prompt(tok, n: int) -> list[int]:
    text = data_file("paul_graham_essays.txt").read_text(encoding="utf-8")[: 40 * n]
    ids = tok.encode(text, bos=True)[:n]
    if len(ids) < n:
        msg = f"the essay text gave {len(ids)} tokens, fewer than --prompt-tokens {n}."
        raise ValueError(msg)
    return ids


def _session_loop(session: Session, prompt: list[int]):
    def run(n: int) -> list[int]:
        return generate(session, [prompt], max_new_tokens=n, greedy=True)[0]

    return run


def _hf_loop(hf, prompt: list[int]):
    ids = torch.tensor([prompt], dtype=torch.long)  # (1, T)

    def run(n: int) -> list[int]:
        with torch.no_grad():
            out = hf.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                do_sample=False,
                use_cache=True,
                max_new_tokens=n,
                min_new_tokens=n,
                pad_token_id=0,
            )
        return out[0, ids.shape[1] :].tolist()

    return run


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _measure(loops: dict, n: int, repeats: int) -> dict:
    """Greedy tokens, prefill time and decode tokens/s per loop, best of ``repeats``.

    The loops take turns within each repeat, so load from other processes on a shared machine
    falls on all of them alike.
    """
    tokens = {name: run(n) for name, run in loops.items()}  # also the warm-up
    first = {name: [] for name in loops}
    full = {name: [] for name in loops}
    for _ in range(repeats):
        for name, run in loops.items():
            first[name].append(_timed(lambda run=run: run(1)))
            full[name].append(_timed(lambda run=run: run(n)))
    rows = {}
    for name in loops:
        decode_s = min(full[name]) - min(first[name])  # n - 1 decode steps
        rows[name] = {
            "tokens": tokens[name],
            "prefill_plus_one_s": round(min(first[name]), 4),
            "decode_tok_s": round((n - 1) / max(decode_s, 1e-9), 2),
        }
    return rows


def _export(model, out: Path, reuse: bool, say, opset: int = 18) -> tuple:
    t0 = time.perf_counter()
    gm = condfx.capture(model, (torch.zeros(2, 8, dtype=torch.long),))
    decode = condfx.apply(condfx.apply(gm, "fuse-attention").graph_module, "add-kv-cache")
    say(f"captured and rewritten in {time.perf_counter() - t0:.1f} s; exporting to {out}")
    if reuse and (out / MANIFEST_NAME).is_file():
        manifest = json.loads((out / MANIFEST_NAME).read_text())
        say(f"reusing the export in {out} (checked when the ONNX session opens)")
        return decode.graph_module, manifest["max_abs_diff"], None
    t1 = time.perf_counter()
    bundle = export_decode_graph(
        decode.graph_module,
        out,
        identity=model_identity(model, model.info.name),
        passes="fuse-attention",
        opset=opset,
    )
    say(f"exported and verified in {time.perf_counter() - t1:.1f} s: {bundle.diffs}")
    return decode.graph_module, bundle.diffs, round(time.perf_counter() - t0, 1)


def _agreement(a: list[int], b: list[int]) -> int:
    return sum(x == y for x, y in zip(a, b, strict=True))


def run(args: argparse.Namespace) -> dict:
    say = (lambda _m: None) if args.json else (lambda m: print(m, flush=True))
    torch.set_num_threads(args.threads)
    model, tok = load(args.gguf)
    out = Path(args.out or tempfile.mkdtemp(prefix="condfx-smollm2-onnx-"))
    gm, export_diffs, export_s = _export(model, out, args.reuse, say, args.opset)
    ort_session = Session.from_onnx(out, model=model, threads=args.threads)
    torch_session = Session(TorchBackend(gm), max_seq_len=model.info.max_seq_len)
    prompt = _prompt(tok, args.prompt_tokens)
    ids = torch.tensor([prompt], dtype=torch.long)
    with torch.no_grad():
        want = model(ids)  # (1, T, V) original Hugging Face model
    got = ort_session.prefill(ids)
    logit_diff = float((got - want).abs().max())
    say(f"max |logit diff| ORT prefill vs PyTorch on {len(prompt)} tokens: {logit_diff:.3g}")
    loops = {
        "onnxruntime (condfx Session)": _session_loop(ort_session, prompt),
        "condfx torch Session": _session_loop(torch_session, prompt),
        "HF generate (use_cache=True)": _hf_loop(model.hf, prompt),
    }
    rows = _measure(loops, args.new_tokens, args.repeats)
    ref = rows["HF generate (use_cache=True)"]
    for row in rows.values():
        row["agree_with_hf"] = _agreement(row["tokens"], ref["tokens"])
        row["speed_vs_hf"] = round(row["decode_tok_s"] / ref["decode_tok_s"], 3)
    return {
        "model": str(args.gguf),
        "out_dir": str(out),
        "threads": args.threads,
        "prompt_tokens": len(prompt),
        "new_tokens": args.new_tokens,
        "export_s": export_s,
        "export_diffs": export_diffs,
        "prefill_logit_max_abs_diff": logit_diff,
        "loops": rows,
    }


def _print_table(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(
        title=f"SmolLM2-135M, batch 1, {result['prompt_tokens']}-token prompt, "
        f"{result['new_tokens']} greedy tokens, {result['threads']} CPU threads"
    )
    for col in (
        "loop",
        "decode tok/s",
        "vs HF",
        "prefill+1 s",
        f"agree w/ HF /{result['new_tokens']}",
    ):
        table.add_column(col)
    for name, row in result["loops"].items():
        table.add_row(
            name,
            f"{row['decode_tok_s']:.1f}",
            f"{row['speed_vs_hf']:.2f}x",
            f"{row['prefill_plus_one_s']:.3f}",
            str(row["agree_with_hf"]),
        )
    console = Console()
    console.print(table)
    console.print(
        f"max |logit diff| ORT vs PyTorch (256-token prefill): {result['prefill_logit_max_abs_diff']:.3g}"
        f"; export check {result['export_diffs']}; export took {result['export_s']} s"
    )


def main(argv: list[str] | None = None) -> dict:
    """Runs the benchmark; prints a table (or JSON with ``--json``) and returns the result."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--gguf", type=Path, default=None, help="default: the data folder's SmolLM2 GGUF"
    )
    ap.add_argument("--out", type=Path, default=None, help="export folder (default: a temp folder)")
    ap.add_argument("--reuse", action="store_true", help="use the export already in --out")
    ap.add_argument("--prompt-tokens", type=int, default=256)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--opset", type=int, default=18,
                    help="ONNX opset of the export (23: attention with past and RMSNorm as single standard ops)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    args.gguf = args.gguf or data_file("SmolLM2-135M-Instruct.Q4_1.gguf")
    result = run(args)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        _print_table(result)
    return result


if __name__ == "__main__":
    main()
