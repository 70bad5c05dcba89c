"""IHA vs MHA on multi-query associative recall (MQAR), trained from scratch at matched attention FLOPs.

All models are the same zoo Llama (``condfx.eval.build_mqar_model``: ``--layers`` layers, dim
``--dim``, ``--heads`` heads, no GQA), captured with ``condfx.capture`` and trained with
``condfx.train`` (all parameters, AdamW, cosine, fresh MQAR batches every step, loss at the query
keys only). Three models:

* ``MHA``: every layer global (full causal attention).
* ``IHA``: the MHA graph after ``interleave-heads`` (P pseudo-heads per head) on every layer, with
  the paper's FLOP-matched schedule as TECHNIQUES.md 2.1 reads it: layers marked S in ``--pattern``
  (tiled over the layers; default SL) are local with a window of N/(2P) interleaved units
  (``--window``), layers marked L are global (full interleaved context, P^2 an MHA layer's cost).
* ``MHA-SL``: the same S/L pattern with plain MHA heads; its local window (``--mha-window``, default
  P x the IHA window in tokens) makes a local MHA layer cost what a local IHA layer costs. Built with
  ``interleave-heads{P=1,causal=token,positions=token,init_noise=0}``, which is exactly MHA plus an
  identity-initialised, trainable H x H head mix (3H^2 + H^2 extra parameters).

Attention-core FLOPs per token (QK^T and PV, last token of a ``--seq-len`` context) and all attention
FLOPs (with projections and mixes, from the pass report's formulas) are printed beside each, with
parameter counts. Accuracy is on 512 held-out sequences (fresh seed) per run; mean and std over
``--seeds``. Runs go ``--jobs`` at a time, one thread each. Note: a model that has learned only to
copy some value from the context scores 1/pairs; chance over the value vocabulary is lower.

    python benchmarks/iha_mqar.py [--seeds 0,1,2] [--json]          # the README table
    python benchmarks/iha_mqar.py --vocab 32 --pairs 4 --seq-len 32 --layers 2 --batch 64 \
        --steps 250 --seeds 0 --all-global --models MHA,IHA [--causal token --positions token]   # demo task
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor

import torch

import condfx
from condfx.eval.tasks import MQARConfig, build_mqar_model, make_mqar_batch, mqar_accuracy
from condfx.passes.interleave_heads import InterleaveHeadsConfig, iha_cost
from condfx.passes.report import attention_flops_per_token
from condfx.patterns import find_regions
from condfx.train import train


def _core_flops(region, context: int) -> int:
    """Attention-core FLOPs per token (QK^T and PV) of an MHA region at ``context``."""
    return 4 * region.num_heads * region.head_dim * context


def _local_layers(args) -> list[int]:
    """Layers marked 'S' (local, windowed) in ``--pattern`` tiled over ``--layers``; the rest are global."""
    pat = args.pattern.upper()
    if not pat or set(pat) - {"S", "L"}:
        msg = f"--pattern must be a string of S (local) and L (global); got {args.pattern!r}."
        raise SystemExit(msg)
    return [i for i in range(args.layers) if pat[i % len(pat)] == "S"]


def _iha_window(args) -> int:
    """IHA local window in interleaved units: ``--window``, else the paper's N/(2P) (a multiple of P)."""
    w = args.window if args.window else args.seq_len // (2 * args.P)
    return max(args.P, w - w % args.P)


def _mha_window(args) -> int:
    """MHA-SL local window in tokens: ``--mha-window``, else P * the IHA window, so that a local MHA layer
    costs what a local IHA layer costs (P pseudo-queries per token, each over the IHA window)."""
    return args.mha_window if args.mha_window else _iha_window(args) * args.P


def _windows(args, model: str) -> list[int]:
    """Per-layer window (0 = global) of ``model``: MHA all global; IHA and MHA-SL by ``--pattern``."""
    if model == "MHA" or (model == "IHA" and args.all_global):
        return [0] * args.layers
    local, w = _local_layers(args), (_iha_window(args) if model == "IHA" else _mha_window(args))
    return [w if i in local else 0 for i in range(args.layers)]


def _spec(args, model: str) -> str:
    """The pass spec that turns the captured MHA model into ``model`` ('' for plain MHA)."""
    if model == "MHA":
        return ""
    if model == "IHA":
        common = f"P={args.P},causal={args.causal},positions={args.positions},collapse={args.collapse}"
    else:  # MHA-SL: P = 1, token causality and positions, no noise: exactly MHA, plus a window
        common = "P=1,causal=token,positions=token,init_noise=0"
    windows = _windows(args, model)
    specs = []
    for w in sorted(set(windows)):
        layers = ",".join(str(i) for i, x in enumerate(windows) if x == w)
        specs.append(f"interleave-heads{{{common},window={w},layers=[{layers}]}}")
    return ", ".join(specs)


def _flops(gm, args, model: str) -> tuple[int, int]:
    """(attention-core FLOPs/token, all attention FLOPs/token incl. projections) at --seq-len.

    Core FLOPs count QK^T and PV for the last token of a --seq-len context: 4 * H * d * (queries per
    token) * (keys each query sees), with P pseudo-queries per token for IHA.
    """
    regions = find_regions(gm).attention
    n = args.seq_len
    if model == "MHA":
        return sum(_core_flops(r, n) for r in regions), sum(attention_flops_per_token(r, n) for r in regions)
    p = args.P if model == "IHA" else 1
    core = total = 0
    for r, window in zip(regions, _windows(args, model), strict=True):
        keys = min(window, p * n) if window else p * n
        core += 4 * r.num_heads * r.head_dim * p * keys
        total += iha_cost(r, InterleaveHeadsConfig(P=p, window=window), n)[0]
    return core, total


def run(args, seed: int, model: str) -> dict:
    """Builds, rewrites (IHA, MHA-SL) and trains one model; returns its row."""
    task = MQARConfig(vocab_size=args.vocab, num_pairs=args.pairs, seq_len=args.seq_len, gap=1)
    torch.set_num_threads(1)
    net = build_mqar_model(task, seed, dim=args.dim, n_layers=args.layers, n_heads=args.heads).eval()
    gm = condfx.capture(net, (torch.zeros(2, args.seq_len, dtype=torch.long),))
    core, total = _flops(gm, args, model)
    if model != "MHA":
        gm = condfx.apply(gm, _spec(args, model)).graph_module
    params = sum(p.numel() for p in gm.parameters())
    start = time.perf_counter()
    result = train(
        gm, lambda step, gen: make_mqar_batch(task, args.batch, gen), steps=args.steps, lr=args.lr,
        batch_size=args.batch, warmup=args.steps // 10, seed=seed, progress=False,
    )
    acc = mqar_accuracy(gm, task, n=512, seed=10_000 + seed)
    print(f"{model} seed {seed}: accuracy {acc:.3f} "
          f"({time.perf_counter() - start:.0f} s)", file=sys.stderr, flush=True)
    return {"model": model, "windows": _windows(args, model), "seed": seed, "accuracy": acc, "params": params,
            "attn_core_flops_per_token": core, "attn_flops_per_token": total,
            "final_loss": sum(result.losses[-20:]) / 20, "train_s": time.perf_counter() - start}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--vocab", type=int, default=32)
    ap.add_argument("--pairs", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=32)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--heads", type=int, default=2)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--P", type=int, default=2)
    ap.add_argument("--pattern", default="SL", help="local (S) / global (L) layer pattern, tiled over the layers")
    ap.add_argument("--window", type=int, default=0, help="IHA local window, interleaved units (0: N/(2P))")
    ap.add_argument("--mha-window", type=int, default=0, help="MHA-SL local window, tokens (0: P x IHA window)")
    ap.add_argument("--causal", default="flat")
    ap.add_argument("--positions", default="interleaved")
    ap.add_argument("--collapse", default="per-head")
    ap.add_argument("--all-global", action="store_true", help="IHA on every layer, no windows")
    ap.add_argument("--models", default="MHA,MHA-SL,IHA", help="MHA (all global), MHA-SL (--pattern), IHA")
    ap.add_argument("--jobs", type=int, default=2, help="runs in parallel, one thread each")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    models = args.models.split(",")
    if set(models) - {"MHA", "MHA-SL", "IHA"}:
        msg = f"--models must name MHA, MHA-SL or IHA; got {args.models!r}."
        raise SystemExit(msg)
    jobs = [(args, int(s), m) for m in models for s in args.seeds.split(",")]
    with ProcessPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        rows = list(pool.map(run, *zip(*jobs, strict=True)))
    summary = {}
    for m in models:
        accs = [r["accuracy"] for r in rows if r["model"] == m]
        first = next(r for r in rows if r["model"] == m)
        summary[m] = {"mean": statistics.mean(accs), "std": statistics.pstdev(accs) if len(accs) > 1 else 0.0,
                      "params": first["params"], "attn_core_flops_per_token": first["attn_core_flops_per_token"],
                      "attn_flops_per_token": first["attn_flops_per_token"]}
    if args.json:
        print(json.dumps({"config": vars(args), "runs": rows, "summary": summary}, indent=2))
        return
    print(f"MQAR: {args.pairs} pairs, seq {args.seq_len}, vocab {args.vocab}; {args.layers} layers, dim "
          f"{args.dim}, {args.heads} heads; {args.steps} steps x {args.batch}; IHA P={args.P}, local "
          f"window {_iha_window(args)} (interleaved units), pattern {args.pattern} (MHA-SL local window "
          f"{_mha_window(args)} tokens), {args.causal} causal, {args.positions} positions")
    task = MQARConfig(vocab_size=args.vocab, num_pairs=args.pairs, seq_len=args.seq_len, gap=1)
    print(f"chance 1/{args.vocab - 1 - task.n_keys} = {100 / (args.vocab - 1 - task.n_keys):.1f}%; copying any "
          f"in-context value 1/{args.pairs} = {100 / args.pairs:.1f}%")
    print("| model | accuracy (mean ± std) | per seed | params | attn-core FLOPs/token | attn FLOPs/token |")
    print("|---|---:|---|---:|---:|---:|")
    for m, s in summary.items():
        per = ", ".join(f"{r['accuracy']:.3f}" for r in rows if r["model"] == m)
        print(f"| {m} | {100 * s['mean']:.1f} ± {100 * s['std']:.1f} | {per} | {s['params']:,} | "
              f"{s['attn_core_flops_per_token']:,} | {s['attn_flops_per_token']:,} |")


if __name__ == "__main__":
    main()
