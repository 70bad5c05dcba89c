"""L2A on associative recall beyond the window: dense vs window-only vs L2A (converted + trained).

Task: MQAR (``condfx.eval.tasks``) with 4 key-value pairs in 32 tokens and every query at least
``--gap`` (12) tokens after its pair, so a 2-layer model whose attention sees only ``--window`` (4)
tokens (receptive field 2 x 3 = 6) cannot reach the pairs. The dense model is a zoo Llama (2 layers,
dim 64) trained from scratch on a mix of near (gap 1) and far sequences (the near half lets the
recall circuit form quickly); it is cached in ``CONDFX_CACHE`` (``~/.cache/condfx``).

Rows (accuracy on 512 far sequences the training never drew; global = fraction of all tokens
routed to global attention, per layer):
    dense            the trained model
    window-only      every attention restricted to the window, no training
    window-only FT   the same, attention and norms trained with the L2A budget (router-free)
    L2A              route-attention{window} + condfx.l2a.train_l2a (lambda ramp, 10 % dense steps)
    L2A pruned       + record_route_stats + prune-global{max_fraction}
    retrofit         route-attention{form=select,window,sink=0,router=input|window} calibrated
                     without training (condfx.l2a_retrofit.calibrate_select on 256 other far
                     sequences) to skip ``--retrofit-skip`` of the tokens in every layer
    retrofit oracle  the same thresholds' budget spent by the oracle router (the true costs), then
                     the oracle skipping exactly ``--retrofit-skip`` of each row's tokens past the
                     window in every layer; ``--recall W`` adds the recall cost to the labels
KV bytes per token at 8K context come from runtime Sessions (window ring caches + global KV)
after an 8192-token prefill.

    nice python benchmarks/l2a_mqar.py [--steps 400] [--retrofit-skip 0.6] [--retrofit-only] [--recall W] [--json]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time

import torch

import condfx
from condfx.demo import cache_dir
from condfx.eval.tasks import MQARConfig, build_mqar_model, make_mqar_batch, mqar_accuracy
from condfx.l2a import (
    L2ARecipe,
    l2a_trainable,
    record_route_stats,
    route_fractions,
    train_l2a,
    window_only,
)
from condfx.l2a_retrofit import OracleRouter, calibrate_select
from condfx.patterns.routed import find_routed_layers
from condfx.train import load_trained, train

EVAL_N, EVAL_SEED = 512, 123


def tasks(gap: int) -> tuple[MQARConfig, MQARConfig]:
    """(near, far) task shapes: the same 32-token layout with gap 1 and with ``gap``."""
    return (MQARConfig(vocab_size=32, num_pairs=4, gap=1, seq_len=32),
            MQARConfig(vocab_size=32, num_pairs=4, gap=gap, seq_len=32))


def mixed(near: MQARConfig, far: MQARConfig, half: int):
    """Data source: ``half`` near and ``half`` far sequences per batch."""
    def data(step, g):
        a, b = make_mqar_batch(near, half, g), make_mqar_batch(far, half, g)
        return torch.cat([a[0], b[0]]), torch.cat([a[1], b[1]])
    return data


def dense_model(gap: int, steps: int):
    """The trained dense model (cached by task and budget)."""
    near, far = tasks(gap)
    key = hashlib.sha1(repr((near, far, steps, "l2a-mqar-v1")).encode()).hexdigest()[:10]
    path = cache_dir() / f"l2a_mqar_dense_{key}.safetensors"
    model = build_mqar_model(far)
    if path.is_file():
        load_trained(model, path)
    else:
        train(model, mixed(near, far, 32), steps=steps, lr=3e-3, warmup=steps // 10,
              progress=False, save_to=path)
    return model.eval()


def _routing(gm, far: MQARConfig) -> list[float]:
    ids, _ = make_mqar_batch(far, 256, torch.Generator().manual_seed(EVAL_SEED))
    return route_fractions(gm, ids)


def kv_bytes_per_token(gm, context: int = 8192) -> float:
    """Bytes of every runtime cache after a ``context``-token prefill, per token."""
    from condfx.runtime.session import Session

    session = Session.from_graph(condfx.apply(gm, "add-kv-cache").graph_module)
    ids = torch.randint(1, 32, (1, context), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        session.prefill(ids)
    return session.cache_bytes() / context


def retrofit_rows(gm, far: MQARConfig, window: int, skip: float, recall: float = 0.0) -> list[dict]:
    """The retrofit (select form, calibrated by the oracle, no training; its router reading the
    attention input, then also the window output) and its oracle router, each skipping ``skip`` of
    the tokens in every layer; ``recall``: the weight of the recall cost in the labels
    (``calibrate_select(recall=...)``)."""
    calib, _ = make_mqar_batch(far, 256, torch.Generator().manual_seed(7))
    labels = f", labels + {recall:g} x recall cost" if recall else ""
    rows = []
    for router in ("input", "window"):
        sel = condfx.apply(gm, f"route-attention{{form=select,window={window},sink=0,router={router}}}").graph_module
        t0 = time.process_time()
        cal = calibrate_select(sel, [calib], skip=skip, recall=recall)
        seconds = time.process_time() - t0
        rows.append({"model": f"retrofit, router={router}" + labels, "accuracy": mqar_accuracy(sel, far, EVAL_N, EVAL_SEED),
                     "global": _routing(sel, far), "calib_cpu_s": seconds, "calib_skip": list(cal.skip)})
    ids, _ = make_mqar_batch(far, 256, torch.Generator().manual_seed(EVAL_SEED))
    for name, oracle in (("retrofit oracle", OracleRouter(sel)),
                         (f"retrofit oracle, {skip:g} skipped in every layer of every row", OracleRouter(sel, skip=skip))):
        with torch.no_grad():
            oracle(ids)
        rows.append({"model": name + labels, "accuracy": mqar_accuracy(oracle, far, EVAL_N, EVAL_SEED),
                     "global": oracle.fractions})
    return rows


def run(args) -> dict:
    near, far = tasks(args.gap)
    t0 = time.perf_counter()
    dense = dense_model(args.gap, args.dense_steps)
    ids, _ = make_mqar_batch(far, 2, torch.Generator().manual_seed(0))
    gm = condfx.capture(dense, (ids,))
    rows = [{"model": "dense", "accuracy": mqar_accuracy(dense, far, EVAL_N, EVAL_SEED), "global": None}]
    win = window_only(gm, args.window)
    rows.append({"model": "window-only", "accuracy": mqar_accuracy(win, far, EVAL_N, EVAL_SEED), "global": [0.0, 0.0]})
    rows += retrofit_rows(gm, far, args.window, args.retrofit_skip, args.recall)
    if args.retrofit_only:
        return {"task": repr(far), "window": args.window, "rows": rows, "seconds": time.perf_counter() - t0}
    data = mixed(near, far, args.batch // 2)
    recipe = L2ARecipe(steps=args.steps, lr=args.lr, warmup=args.steps // 10, lam=args.lam, seed=1)
    if not args.skip_window_ft:
        names = l2a_trainable(win)
        train(win, data, steps=args.steps, lr=args.lr, warmup=args.steps // 10, trainable=lambda n: n in names,
              progress=False, seed=1)
        rows.append({"model": "window-only FT", "accuracy": mqar_accuracy(win, far, EVAL_N, EVAL_SEED),
                     "global": [0.0, 0.0]})
    l2a = condfx.apply(gm, f"route-attention{{window={args.window}}}").graph_module
    res = train_l2a(l2a, data, recipe, progress=not args.json)
    rows.append({"model": "L2A", "accuracy": mqar_accuracy(l2a, far, EVAL_N, EVAL_SEED), "global": _routing(l2a, far)})
    calib, _ = make_mqar_batch(far, 256, torch.Generator().manual_seed(7))
    record_route_stats(l2a, [calib])
    pruned = condfx.apply(l2a, f"prune-global{{max_fraction={args.max_fraction}}}").graph_module
    left = [r.layer for r in find_routed_layers(pruned)]
    rows.append({"model": "L2A pruned", "accuracy": mqar_accuracy(pruned, far, EVAL_N, EVAL_SEED),
                 "global": _routing(pruned, far) if left else [], "global_layers": left})
    kv = {"dense": kv_bytes_per_token(condfx.apply(gm, "fuse-attention").graph_module),
          "L2A": kv_bytes_per_token(l2a), "L2A pruned": kv_bytes_per_token(pruned)}
    return {"task": repr(far), "window": args.window, "steps": args.steps, "lam": args.lam,
            "rows": rows, "kv_bytes_per_token_8k": kv, "train_seconds": res.seconds,
            "seconds": time.perf_counter() - t0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gap", type=int, default=12)
    parser.add_argument("--window", type=int, default=4)
    parser.add_argument("--dense-steps", type=int, default=1500)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--lam", type=float, default=0.05)
    parser.add_argument("--max-fraction", type=float, default=0.1)
    parser.add_argument("--skip-window-ft", action="store_true")
    parser.add_argument("--retrofit-skip", type=float, default=0.6,
                        help="fraction of tokens the retrofit rows skip global attention for, in every layer")
    parser.add_argument("--recall", type=float, default=0.0,
                        help="weight of the recall cost in the retrofit's oracle labels (0: the layer-local cost alone)")
    parser.add_argument("--retrofit-only", action="store_true",
                        help="dense, window-only and the retrofit rows only (no training of L2A)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    out = run(args)
    if args.json:
        print(json.dumps(out, indent=2))
        return
    dense_acc = out["rows"][0]["accuracy"]
    print(f"{out['task']}, window {out['window']}" + ("" if args.retrofit_only else
          f", L2A steps {out['steps']}, lambda {out['lam']}"))
    print("| model | accuracy | of dense | global fraction per layer | skip global |")
    print("|---|---:|---:|---|---:|")
    for r in out["rows"]:
        g = r["global"]
        if "global_layers" in r:  # pruned layers have no global branch: all their tokens skip it
            kept = dict(zip(r["global_layers"], g, strict=True))
            cells = [f"{kept[i]:.1%}" if i in kept else "pruned" for i in range(2)]
        else:
            cells = None if g is None else [f"{x:.1%}" for x in g]
        per = "-" if cells is None else " / ".join(cells)
        skip = "-" if g is None else f"{1 - sum(g) / 2:.1%}"  # over both layers
        print(f"| {r['model']} | {r['accuracy']:.3f} | {r['accuracy'] / dense_acc:.1%} | {per} | {skip} |")
    if args.retrofit_only:
        return
    kv = out["kv_bytes_per_token_8k"]
    print(f"KV bytes/token at 8K: dense {kv['dense']:.0f}, L2A {kv['L2A']:.0f}, L2A pruned {kv['L2A pruned']:.0f} "
          f"({1 - kv['L2A pruned'] / kv['L2A']:.1%} fewer than L2A)")


if __name__ == "__main__":
    main()
