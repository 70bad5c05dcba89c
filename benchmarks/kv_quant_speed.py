"""KV-cache quantization speed and memory: the per-token decode cost of reading each cache and
attending over it, at 4K and 8K context, SmolLM2 shapes (random weights), all methods in one run.

Per decoded token and layer, each cache is read the way its runtime does it and one query token
(9 heads, GQA over 3 KV heads, head dim 64) attends over the result with SDPA:
    fp16       K/V stored float16, cast to float32 (``FullKVCache``)
    kivi       packed K (per channel) and V (per token) dequantized (``KIVICache.past``), then SDPA
    kivi fused the same cache read from the packed codes (``KIVICache.attend`` →
               ``condfx.ops.kivi_cache.kivi_attend``, also what ``condfx::kivi_cache_attention``
               runs for a decode step): codes unpacked by a 256-entry table gather in ~512 KiB
               chunks that stay in L2, keys dequantized in the chunk and scored by one matmul,
               value scale/zero folded into the probabilities; no full float K/V
    xquant     packed SVD latents dequantized, rematerialised with the 192x192 factors and K
               re-rotated (RoPE) at every position (``XQuantCache.keys/values``)
Columns: ms per token for 30 layers and the tokens/s that gives for this part of decoding (the weight
matmuls are the same for every method and left out); for xquant the rematerialisation (matmuls +
RoPE) is also timed on its own; cache bytes are the exact ``nbytes()`` of the 30 layers' caches and
"read buffer" the float32 K/V each layer materialises while it reads (freed after the layer).
CPU figures are ratios within one run (a shared 2-core machine): the methods are timed round-robin,
``--repeats`` rounds, and the best (and median) time of each is reported.

    python benchmarks/kv_quant_speed.py [--contexts 4096,8192] [--bits 2] [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

from condfx.ops import kivi_cache
from condfx.runtime.caches import FullKVCache
from condfx.runtime.quant_caches import KIVICache, XQuantCache

LAYERS, HEADS, KV_HEADS, HEAD_DIM, DIM, THETA = 30, 9, 3, 64, 576, 100000.0


def _rope(k: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    inv = THETA ** (-torch.arange(0, HEAD_DIM, 2, dtype=torch.float32) / HEAD_DIM)
    ang = positions.float()[:, None] * inv[None, :]  # (N, D/2)
    cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)  # (N, D)
    half = HEAD_DIM // 2
    rotated = torch.cat([-k[..., half:], k[..., :half]], -1)
    return k * cos + rotated * sin


def _caches(method: str, n: int, bits: int, group: int, residual: int):
    torch.manual_seed(0)
    width = KV_HEADS * HEAD_DIM
    if method == "fp16":
        c = FullKVCache(1, KV_HEADS, HEAD_DIM, torch.float16)
        c.update(torch.randn(1, KV_HEADS, n, HEAD_DIM).half(), torch.randn(1, KV_HEADS, n, HEAD_DIM).half())
        return c
    if method in ("kivi", "kivi fused"):
        c = KIVICache(1, KV_HEADS, HEAD_DIM, bits, group, residual)
        c.update(torch.randn(1, KV_HEADS, n, HEAD_DIM), torch.randn(1, KV_HEADS, n, HEAD_DIM))
        return c
    up = {"k": torch.randn(width, width) / width**0.5, "v": torch.randn(width, width) / width**0.5}
    c = XQuantCache(1, {"k": width, "v": width}, bits, group, residual, up, KV_HEADS, HEAD_DIM,
                    rope=_rope)
    c.append(k=torch.randn(1, n, width), v=torch.randn(1, n, width))
    return c


def _step(method: str, cache, q):
    """One query token's attention over the cache, as the runtime reads it."""
    if method == "kivi fused":
        return cache.attend(q, HEAD_DIM**-0.5)
    return _attend(q, *_read(method, cache))


def _read(method: str, cache):
    if method == "fp16":
        k, v = cache.past()
        return k.float(), v.float()
    if method in ("kivi", "kivi fused"):
        return cache.past()
    return cache.keys(), cache.values()


def _attend(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, scale=HEAD_DIM**-0.5, enable_gqa=True)


def _median_ms(fn, repeats: int) -> float:
    return _interleaved_ms({"": fn}, repeats)[""][1]


def _interleaved_ms(fns: dict, repeats: int) -> dict:
    """{name: (best, median) ms}, timing each of ``fns`` once per round, round-robin: a shared
    machine's slow spells hit every method alike."""
    for fn in fns.values():
        fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: (1000 * min(t), 1000 * statistics.median(t)) for name, t in times.items()}


def _remat_ms(cache: XQuantCache, repeats: int) -> float:
    """Time of the rematerialisation alone: X̂·B_k, X̂·B_v and RoPE on already dequantized latents."""
    lat = {name: s.read() for name, s in cache.streams.items()}  # (1, N, 192) each

    def remat():
        k = (lat["k"] @ cache.up["k"]).unflatten(2, (KV_HEADS, HEAD_DIM)).transpose(1, 2)
        v = (lat["v"] @ cache.up["v"]).unflatten(2, (KV_HEADS, HEAD_DIM)).transpose(1, 2)
        return _rope(k, torch.arange(k.shape[2])), v

    return _median_ms(remat, repeats)


def run(args) -> dict:
    torch.set_num_threads(args.threads)
    q = torch.randn(1, HEADS, 1, HEAD_DIM)
    rows = []
    for n in (int(c) for c in args.contexts.split(",")):
        methods = args.methods.split(",")
        caches = {m: _caches(m, n, args.bits, args.group, args.residual) for m in methods}
        timed = _interleaved_ms(
            {m: (lambda c=caches[m], m=m: _step(m, c, q)) for m in methods}, args.repeats)
        base = None
        for method in methods:
            cache = caches[method]
            best, median = timed[method]
            if method == "kivi fused":  # its reused chunk buffers and code indices
                buffer = sum(b.nbytes for b in kivi_cache._WORKSPACE.buffers.values())
            else:
                k, v = _read(method, cache)
                buffer = k.nbytes + v.nbytes
            row = {"context": n, "method": method if method == "fp16" else f"{method} {args.bits}-bit",
                   "ms_per_token": LAYERS * best, "median_ms_per_token": LAYERS * median,
                   "cache_bytes": LAYERS * cache.nbytes(), "read_buffer_bytes": buffer}
            if method == "xquant":
                row["remat_ms_per_token"] = LAYERS * _remat_ms(cache, args.repeats)
            base = base or row
            row["tok_s"] = 1000 / row["ms_per_token"]
            row["speed_vs_fp16"] = base["ms_per_token"] / row["ms_per_token"]
            row["median_speed_vs_fp16"] = base["median_ms_per_token"] / row["median_ms_per_token"]
            row["memory_vs_fp16"] = base["cache_bytes"] / row["cache_bytes"]
            rows.append(row)
            print(f"{n} {row['method']}: best {row['ms_per_token']:.1f} ms/token, median "
                  f"{row['median_ms_per_token']:.1f}", flush=True)
    return {"layers": LAYERS, "bits": args.bits, "group": args.group, "residual": args.residual,
            "threads": args.threads, "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--contexts", default="4096,8192")
    parser.add_argument("--methods", default="fp16,kivi,kivi fused,xquant",
                        help="comma-separated, fp16 first (the baseline): fp16, kivi, kivi fused, xquant")
    parser.add_argument("--bits", type=int, default=2)
    parser.add_argument("--group", type=int, default=64)
    parser.add_argument("--residual", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    result = run(args)
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print("| context | cache | best ms/token (30 layers) | tok/s (this part) | vs fp16 (best) "
          "| vs fp16 (median) | remat ms | cache MB | vs fp16 | read buffer MB/layer |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in result["rows"]:
        remat = f"{r['remat_ms_per_token']:.1f}" if "remat_ms_per_token" in r else "-"
        print(f"| {r['context']} | {r['method']} | {r['ms_per_token']:.1f} | {r['tok_s']:.1f} "
              f"| {r['speed_vs_fp16']:.2f}x | {r['median_speed_vs_fp16']:.2f}x | {remat} | {r['cache_bytes'] / 2**20:.2f} "
              f"| {r['memory_vs_fp16']:.2f}x smaller | {r['read_buffer_bytes'] / 2**20:.2f} |")


if __name__ == "__main__":
    main()
