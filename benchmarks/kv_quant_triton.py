"""Triton fused dequantize-and-project read (``codegen/triton/kv_quant.py``) at real cache shapes:
error against the eager reference and time against PyTorch (dequantize, then matmul).

Shapes are one SmolLM2 layer's XQuant stream: N cached tokens of a C = 192 latent packed at 2, 3 or 4
bits in groups of 32, projected by the (192, 192) up-projection (float16 weights). Needs a CUDA GPU;
without one it prints one line saying so and exits 0 (``--interpret`` runs tiny shapes on the CPU
interpreter: the code path, not the speed). Run:

    python benchmarks/kv_quant_triton.py [--json] [--tokens 4096 8192 32768]
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

CHANNELS, OUT, GROUP = 192, 192, 32


def _case(n: int, bits: int, device: str, timed: bool, blocks: tuple[int, int, int]) -> dict:
    from condfx.codegen.triton.kv_quant import dequant_project_fwd, dequant_project_reference
    from condfx.ops.kv_quant import dequantize_reference, quantize_reference

    gen = torch.Generator().manual_seed(n * 10 + bits)
    x = torch.randn(n, CHANNELS, generator=gen)
    w = (torch.randn(CHANNELS, OUT, generator=gen) / CHANNELS**0.5).half()
    codes, scale, zero = (t.to(device) for t in quantize_reference(x, bits, GROUP, -1))
    w = w.to(device)
    bn, bm, bk = blocks
    y = dequant_project_fwd(codes, scale, zero, w, bits, GROUP, bn, bm, bk)
    ref = dequant_project_reference(codes, scale, zero, w, bits, GROUP)
    row = {"tokens": n, "bits": bits, "max_abs_err": float((y - ref).abs().max()),
           "ref_max_abs": float(ref.abs().max())}
    if timed:
        import triton.testing

        def torch_read():
            return dequantize_reference(codes, scale, zero, bits, GROUP, -1, CHANNELS).half() @ w

        def triton_read():
            return dequant_project_fwd(codes, scale, zero, w, bits, GROUP, bn, bm, bk)

        t_torch = triton.testing.do_bench(torch_read, warmup=25, rep=100, return_mode="median")
        t_triton = triton.testing.do_bench(triton_read, warmup=25, rep=100, return_mode="median")
        moved = codes.nbytes + scale.nbytes + zero.nbytes + w.nbytes + n * OUT * 4
        row |= {"torch_ms": t_torch, "triton_ms": t_triton, "speedup": t_torch / t_triton,
                "triton_GBps": moved / t_triton / 1e6}
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, nargs="+", default=[4096, 8192, 32768])
    p.add_argument("--blocks", type=int, nargs=3, default=[64, 64, 32], help="BLOCK_N BLOCK_M BLOCK_K")
    p.add_argument("--interpret", action="store_true", help="CPU interpreter at tiny shapes")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    if args.interpret:
        os.environ["TRITON_INTERPRET"] = "1"
        device, tokens, timed, blocks = "cpu", [5, 37], False, (16, 16, 16)
    elif not torch.cuda.is_available():
        print("benchmarks/kv_quant_triton.py needs a CUDA GPU (torch.cuda.is_available() is False); "
              "use --interpret for the CPU code path.")
        return 0
    else:
        device, tokens, timed, blocks = "cuda", args.tokens, True, tuple(args.blocks)
    rows = [_case(n, bits, device, timed, blocks) for n in tokens for bits in (2, 3, 4)]
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu (interpreter)"
    if args.json:
        print(json.dumps({"device": name, "blocks": list(blocks), "rows": rows}, indent=2))
        return 0
    print(f"{name}: C={CHANNELS} -> M={OUT}, group {GROUP}, blocks {blocks}")
    print("| tokens | bits | max abs err (ref max) | torch ms | triton ms | speed-up | triton GB/s |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        t = (f"{r['torch_ms']:.3f} | {r['triton_ms']:.3f} | {r['speedup']:.2f}x | {r['triton_GBps']:.0f}"
             if timed else "— | — | — | —")
        print(f"| {r['tokens']} | {r['bits']} | {r['max_abs_err']:.2e} ({r['ref_max_abs']:.1f}) | {t} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
