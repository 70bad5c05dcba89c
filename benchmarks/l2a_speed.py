"""L2A prefill attention speed on CPU: routed layer vs dense SDPA vs FlexAttention sliding window.

SmolLM2's head shapes (9 query heads, 3 KV heads, head_dim 64), batch 1, float32, random q/k/v,
at each ``--lengths`` T. Timed in the same run, best of ``--reps``:
    dense SDPA      F.scaled_dot_product_attention(is_causal=True, enable_gqa=True): what the base
                    model runs (the CPU flash kernel, which skips the masked upper triangle).
    L2A layer       the whole routed attention of one layer: window branch
                    ``condfx.attention(q, k, v, s, window)`` + global branch
                    ``condfx.routed_attention(q', k', v', route, s)`` with ``--routed`` of the
                    queries routed (uniformly at random).
    flex window     FlexAttention with a sliding-window block mask (torch.compile, CPU), when it
                    compiles here; otherwise the reason is printed.
Projections are not included: they cost the same per token in the dense and the routed layer
(the routed layer runs them twice: see the README).

    nice python benchmarks/l2a_speed.py [--lengths 4096,8192,16384] [--routed 0.2] [--window 512] [--json]
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F

import condfx.ops  # noqa: F401  (registers torch.ops.condfx.*)

H, HKV, D = 9, 3, 64


def best_of(fn, reps: int) -> float:
    """Best wall time of ``reps`` calls of ``fn`` (seconds)."""
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def _flex(window: int):
    """A compiled sliding-window FlexAttention callable, or the reason it is unavailable."""
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        def sliding(b, h, q_idx, kv_idx):
            return (kv_idx <= q_idx) & (q_idx - kv_idx < window)

        compiled = torch.compile(flex_attention, dynamic=False)

        def run(q, k, v):
            mask = create_block_mask(sliding, None, None, q.shape[2], k.shape[2], device="cpu")
            return compiled(q, k, v, block_mask=mask, enable_gqa=True)

        return run, None
    except Exception as exc:  # noqa: BLE001 (reported in the table)
        return None, f"{type(exc).__name__}: {exc}"[:120]


def measure(t: int, routed: float, window: int, reps: int, flex) -> dict:
    """Times the three paths at length ``t``; returns the row of the table."""
    g = torch.Generator().manual_seed(t)
    q = torch.randn(1, H, t, D, generator=g)
    k, v = torch.randn(1, HKV, t, D, generator=g), torch.randn(1, HKV, t, D, generator=g)
    q2 = torch.randn(1, H, t, D, generator=g)
    k2, v2 = torch.randn(1, HKV, t, D, generator=g), torch.randn(1, HKV, t, D, generator=g)
    route = torch.rand(1, t, generator=g) < routed
    s = D**-0.5
    with torch.no_grad():
        dense = best_of(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=s, enable_gqa=True), reps)
        win = best_of(lambda: torch.ops.condfx.attention(q, k, v, s, window), reps)
        glob = best_of(lambda: torch.ops.condfx.routed_attention(q2, k2, v2, route, s), reps)
        row = {"T": t, "routed": float(route.float().mean()), "dense_sdpa_s": dense, "window_s": win,
               "routed_global_s": glob, "l2a_layer_s": win + glob, "speedup": dense / (win + glob)}
        fn, reason = flex
        if fn is not None:
            try:
                fn(q, k, v)  # compile outside the timing
                row["flex_window_s"] = best_of(lambda: fn(q, k, v), reps)
            except Exception as exc:  # noqa: BLE001
                row["flex_window_s"], reason = None, f"{type(exc).__name__}: {exc}"[:120]
        else:
            row["flex_window_s"] = None
        row["flex_note"] = reason or ""
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="4096,8192,16384")
    parser.add_argument("--routed", type=float, default=0.2)
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    parser.add_argument("--no-flex", action="store_true", help="skip FlexAttention")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    flex = (None, "skipped (--no-flex)") if args.no_flex else _flex(args.window)
    rows = [measure(int(t), args.routed, args.window, args.reps, flex) for t in args.lengths.split(",")]
    if args.json:
        print(json.dumps({"threads": torch.get_num_threads(), "window": args.window, "rows": rows}, indent=2))
        return
    print(f"threads {torch.get_num_threads()}, window {args.window}, heads {H}/{HKV}, head_dim {D}")
    print("| T | routed | dense SDPA s | window s | routed global s | L2A layer s | speedup vs SDPA | flex window s |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        flex_s = f"{r['flex_window_s']:.3f}" if r["flex_window_s"] is not None else f"n/a ({r['flex_note']})"
        print(f"| {r['T']} | {r['routed']:.1%} | {r['dense_sdpa_s']:.3f} | {r['window_s']:.3f} | "
              f"{r['routed_global_s']:.3f} | {r['l2a_layer_s']:.3f} | {r['speedup']:.2f}x | {flex_s} |")


if __name__ == "__main__":
    main()
