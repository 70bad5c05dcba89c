"""IHA vs MHA on multi-query associative recall (MQAR), trained from scratch at matched attention FLOPs.

Both models are the same zoo Llama (``condfx.eval.build_mqar_model``: ``--layers`` layers, dim
``--dim``, ``--heads`` heads, no GQA), captured with ``condfx.capture`` and trained with
``condfx.train`` (all parameters, AdamW, cosine, fresh MQAR batches every step, loss at the query
keys only). The IHA model is the MHA graph after ``interleave-heads``: every layer gets P pseudo-heads
per head; the last layer is global (full interleaved context, P^2 the attention cost of an MHA layer)
and the others are windowed local layers (window ``--window`` interleaved units), the
local/global schedule of the paper as read by TECHNIQUES.md 2.1. The MHA baseline has every layer
global, so with P = 2 and 4 layers the IHA global layer costs what the four MHA layers cost and the
local windows add a few percent: attention-core FLOPs per token are printed beside each (at context
``--seq-len``, from the pass report's formulas), with parameter counts.

Accuracy is measured on 512 held-out sequences (fresh seed) per run; mean and std over ``--seeds``.

    python benchmarks/iha_mqar.py [--seeds 0,1,2] [--steps 400] [--json]
    python benchmarks/iha_mqar.py --vocab 32 --pairs 4 --seq-len 32 --layers 2 --batch 64 \\
        --steps 250 --seeds 0 --all-global [--causal token --positions token]   # the demo task
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

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


def _iha_spec(args, layers: int) -> list[str]:
    local = ",".join(str(i) for i in range(layers - 1))
    common = f"P={args.P},causal={args.causal},positions={args.positions},collapse={args.collapse}"
    if args.all_global:  # not FLOP-matched: every layer sees the full interleaved context
        return [f"interleave-heads{{{common}}}"]
    specs = [f"interleave-heads{{{common},layers=[{layers - 1}]}}"]
    if local:
        specs.insert(0, f"interleave-heads{{{common},window={args.window},layers=[{local}]}}")
    return specs


def _flops(gm, args, iha: bool) -> tuple[int, int]:
    """(attention-core FLOPs/token, all attention FLOPs/token incl. projections) at --seq-len."""
    regions = find_regions(gm).attention
    n = args.seq_len
    if not iha:
        return sum(_core_flops(r, n) for r in regions), sum(attention_flops_per_token(r, n) for r in regions)
    core = total = 0
    for r in regions:
        window = args.window if r.layer < len(regions) - 1 and not args.all_global else 0
        cfg = InterleaveHeadsConfig(P=args.P, window=window)
        keys = min(window, args.P * n) if window else args.P * n
        core += 4 * r.num_heads * r.head_dim * args.P * keys
        total += iha_cost(r, cfg, n)[0]
    return core, total


def run(args, seed: int, iha: bool) -> dict:
    """Builds, rewrites (IHA) and trains one model; returns its row."""
    task = MQARConfig(vocab_size=args.vocab, num_pairs=args.pairs, seq_len=args.seq_len, gap=1)
    model = build_mqar_model(task, seed, dim=args.dim, n_layers=args.layers, n_heads=args.heads).eval()
    gm = condfx.capture(model, (torch.zeros(2, args.seq_len, dtype=torch.long),))
    core, total = _flops(gm, args, iha)
    if iha:
        gm = condfx.apply(gm, ", ".join(_iha_spec(args, args.layers))).graph_module
    params = sum(p.numel() for p in gm.parameters())
    start = time.perf_counter()
    result = train(
        gm, lambda step, gen: make_mqar_batch(task, args.batch, gen), steps=args.steps, lr=args.lr,
        batch_size=args.batch, warmup=args.steps // 10, seed=seed, progress=False,
    )
    acc = mqar_accuracy(gm, task, n=512, seed=10_000 + seed)
    print(f"{'IHA' if iha else 'MHA'} seed {seed}: accuracy {acc:.3f} "
          f"({time.perf_counter() - start:.0f} s)", file=sys.stderr, flush=True)
    return {"model": "IHA" if iha else "MHA", "seed": seed, "accuracy": acc, "params": params,
            "attn_core_flops_per_token": core, "attn_flops_per_token": total,
            "final_loss": sum(result.losses[-20:]) / 20, "train_s": time.perf_counter() - start}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--vocab", type=int, default=64)
    ap.add_argument("--pairs", type=int, default=12)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--heads", type=int, default=2)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--P", type=int, default=2)
    ap.add_argument("--window", type=int, default=4, help="local-layer window, interleaved units")
    ap.add_argument("--causal", default="flat")
    ap.add_argument("--positions", default="interleaved")
    ap.add_argument("--collapse", default="per-head")
    ap.add_argument("--all-global", action="store_true", help="IHA on every layer, no windows")
    ap.add_argument("--models", default="MHA,IHA")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    rows = [run(args, int(s), m == "IHA") for m in args.models.split(",") for s in args.seeds.split(",")]
    summary = {}
    for m in args.models.split(","):
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
          f"window {args.window} (interleaved units), {args.causal} causal, {args.positions} positions")
    print("| model | accuracy (mean ± std) | per seed | params | attn-core FLOPs/token | attn FLOPs/token |")
    print("|---|---:|---|---:|---:|---:|")
    for m, s in summary.items():
        per = ", ".join(f"{r['accuracy']:.3f}" for r in rows if r["model"] == m)
        print(f"| {m} | {100 * s['mean']:.1f} ± {100 * s['std']:.1f} | {per} | {s['params']:,} | "
              f"{s['attn_core_flops_per_token']:,} | {s['attn_flops_per_token']:,} |")


if __name__ == "__main__":
    main()
