"""Triton ``condfx::attention`` and ``condfx::routed_attention`` forwards vs torch SDPA (causal, GQA;
SDPA picks its FlashAttention-2 kernel on a GPU for these shapes) on SmolLM2 head shapes.

SmolLM2 heads: 9 query heads, 3 key/value heads, head dim 64; batch 1, float16, prefill (T == S).
Both sides get the same un-repeated K/V (SDPA through ``enable_gqa=True``). Needs a CUDA GPU; on a
machine without one it prints one line saying so and exits 0. Run:

    python benchmarks/attention_triton.py                       # 1K..128K tokens, markdown table
    python benchmarks/attention_triton.py --json
    python benchmarks/attention_triton.py --interpret           # CPU interpreter, tiny sizes:
                                                                # the code path, not the speed
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

SEQ_LENS = (1024, 4096, 16384, 32768, 65536, 131072)
INTERPRET_SEQ_LENS = (16, 33)
HEADS, KV_HEADS, HEAD_DIM = 9, 3, 64
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def _time_ms(fn, device: str, warmup: int, reps: int) -> float:
    """Median milliseconds of ``fn()``: CUDA-event timing on a GPU, perf_counter on the CPU."""
    if device == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=warmup, rep=reps, return_mode="median"))
    fn()
    times = []
    for _ in range(max(1, min(reps, 3))):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def measure(kernel_module, seq_len: int, dtype: torch.dtype, device: str, warmup: int, reps: int,
            routed: float = 0.2):
    """Times one prefill of ``seq_len`` tokens: the Triton kernel, SDPA, and the Triton routed kernel
    with a random ``routed`` fraction of the queries going global (L2A's global branch).

    Returns:
        A dict with the sizes, milliseconds per implementation, their ratio and max abs difference.
    """
    gen = torch.Generator().manual_seed(0)
    n = seq_len
    q = torch.randn(1, HEADS, n, HEAD_DIM, generator=gen).to(device, dtype)  # (B, H, T, D)
    k = torch.randn(1, KV_HEADS, n, HEAD_DIM, generator=gen).to(device, dtype)  # (B, Hkv, S, D)
    v = torch.randn(1, KV_HEADS, n, HEAD_DIM, generator=gen).to(device, dtype)  # (B, Hkv, S, D)
    scale = HEAD_DIM**-0.5

    def triton_fn():
        return kernel_module.attention_fwd(q, k, v, scale)

    def sdpa_fn():
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True)

    route = torch.rand(1, n, generator=gen) < routed  # (B, T): L2A's routed queries
    route = route.to(device)

    def routed_fn():
        return kernel_module.routed_attention_fwd(q, k, v, route, scale)

    diff = (triton_fn().float() - sdpa_fn().float()).abs().max().item()
    routed_diff = (routed_fn().float() - sdpa_fn().float()).transpose(1, 2)[route].abs().max().item()
    triton_ms = _time_ms(triton_fn, device, warmup, reps)
    sdpa_ms = _time_ms(sdpa_fn, device, warmup, reps)
    routed_ms = _time_ms(routed_fn, device, warmup, reps)
    return {
        "tokens": seq_len, "heads": HEADS, "kv_heads": KV_HEADS, "head_dim": HEAD_DIM,
        "dtype": str(dtype).removeprefix("torch."), "triton_ms": triton_ms, "sdpa_ms": sdpa_ms,
        "triton_over_sdpa": triton_ms / sdpa_ms, "max_abs_diff": diff, "routed": routed,
        "routed_ms": routed_ms, "sdpa_over_routed": sdpa_ms / routed_ms, "routed_max_abs_diff": routed_diff,
    }


def _table(rows: list[dict], device_name: str) -> str:
    lines = [
        f"condfx Triton attention vs torch SDPA on {device_name} "
        f"(B=1, H={HEADS}, Hkv={KV_HEADS}, D={HEAD_DIM}, causal prefill)",
        "",
        "| tokens | dtype | triton ms | SDPA ms | triton / SDPA | max abs diff | routed | routed ms "
        "| SDPA / routed | routed max abs diff |",
        "|---:|:---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['tokens']} | {r['dtype']} | {r['triton_ms']:.3f} | {r['sdpa_ms']:.3f} | "
            f"{r['triton_over_sdpa']:.2f} | {r['max_abs_diff']:.1e} | {r['routed']:.0%} | "
            f"{r['routed_ms']:.3f} | {r['sdpa_over_routed']:.2f} | {r['routed_max_abs_diff']:.1e} |"
        )
    return "\n".join(lines)


def _parse(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", action="store_true", help="print JSON instead of a markdown table")
    p.add_argument("--interpret", action="store_true",
                   help="run the Triton interpreter on CPU at tiny sizes (code-path check only)")
    p.add_argument("--seq-lens", type=int, nargs="+", default=None,
                   help=f"token counts (default {SEQ_LENS}; {INTERPRET_SEQ_LENS} with --interpret)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp16")
    p.add_argument("--routed", type=float, default=0.2, help="fraction of queries the routed kernel runs")
    p.add_argument("--warmup", type=int, default=25, help="warm-up milliseconds (GPU)")
    p.add_argument("--reps", type=int, default=100, help="timed milliseconds (GPU)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = _parse(argv)
    if args.interpret:
        # read by @triton.jit when the kernel module is imported below
        os.environ["TRITON_INTERPRET"] = "1"
        device, device_name = "cpu", "CPU (Triton interpreter; timings are meaningless)"
    elif not torch.cuda.is_available():
        print(
            "benchmarks/attention_triton.py needs a CUDA GPU (torch.cuda.is_available() is False); "
            "nothing was measured. Use --interpret for a CPU check of the code path."
        )
        return 0
    else:
        device, device_name = "cuda", torch.cuda.get_device_name()
    from condfx.codegen.triton import attention as kernel_module

    seq_lens = args.seq_lens or (INTERPRET_SEQ_LENS if args.interpret else SEQ_LENS)
    dtype = DTYPES[args.dtype]
    rows = [measure(kernel_module, n, dtype, device, args.warmup, args.reps, args.routed) for n in seq_lens]
    if args.json:
        print(json.dumps({"device": device_name, "rows": rows}, indent=2))
    else:
        print(_table(rows, device_name))
    return 0


if __name__ == "__main__":
    sys.exit(main())
