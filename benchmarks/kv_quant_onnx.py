"""Quantized KV caches exported to ONNX: ONNX Runtime against PyTorch on real weights, per method.

For each ``quantize-kv`` method, the model is captured, rewritten (``fuse-attention, quantize-kv{...}``)
and exported with ``condfx export``'s code: the decode graph takes and returns the packed caches
(uint8 codes, float16 scales and zero points, the full-precision sink and residual tokens). The
same text is then decoded by two Sessions, one on the PyTorch graph and one on ONNX Runtime: a
prefill of ``--prefill`` tokens, then one token per step up to ``--tokens``. Columns: "same cache":
max |logit| difference when every ORT step is fed the PyTorch Session's cache (the decode graph's
own agreement); "free-running": max |logit| difference of the two Sessions each carrying its own
cache, and how many packed codes differ at the end (one float rounding difference on a quantization
boundary flips a code, and the two caches then differ for good); the greedy next-token agreement of
the free-running pair; the exact cache
bytes per token after the last step (``Session.cache_bytes()``, every codes / scale / zero / fp
tensor) against an fp16 K/V cache, and the decode time of ORT relative to PyTorch (same run; CPU
figures are ratios).

    python benchmarks/kv_quant_onnx.py [--methods kivi,xquant,xquant-cl] [--bits 2] [--json]
    python benchmarks/kv_quant_onnx.py --model ../shared/data/SmolLM2-135M-Instruct.Q4_1.gguf \\
        --text ../shared/data/wikitext2_raw_test.txt --tokens 160 --group 32
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import torch

import condfx
from condfx.data import data_file
from condfx.kv_calibrate import record_kv_stats, text_batches
from condfx.models_zoo import load
from condfx.runtime.session import Session


def _decode(session: Session, ids: torch.Tensor, prefill: int) -> tuple[torch.Tensor, float]:
    steps = [session.prefill(ids[:, :prefill])]
    start = time.perf_counter()
    steps += [session.step(ids[:, t : t + 1]) for t in range(prefill, ids.shape[1])]
    return torch.cat(steps, 1), time.perf_counter() - start


def _same_cache_diff(torch_session: Session, onnx_session: Session, ids, prefill: int) -> float:
    """Max |logit| difference when each ORT call reads the PyTorch Session's cache."""
    empty = [t[:, :, :0] for t in torch_session.caches.past()]
    got, _ = onnx_session.backend.run(ids[:, :prefill], empty)
    worst = (got - torch_session.prefill(ids[:, :prefill])).abs().max().item()
    for t in range(prefill, ids.shape[1]):
        got, _ = onnx_session.backend.run(ids[:, t : t + 1], torch_session.caches.past())
        want = torch_session.step(ids[:, t : t + 1])
        worst = max(worst, (got - want).abs().max().item())
    return worst


def _code_flips(a: Session, b: Session) -> int:
    return sum(int((x != y).sum()) for x, y in zip(a.caches.past(), b.caches.past(), strict=True)
               if x.dtype == torch.uint8)


def _fp16_bytes_per_token(session: Session) -> float:
    return sum(2 * 2 * s.n_kv_heads * s.head_dim for s in session.backend.layers)


def _torch_session(model, spec: str, calib) -> Session:
    if calib is None:
        return Session.from_model(model, passes=spec)
    gm = condfx.capture(model, (torch.zeros(2, 8, dtype=torch.long),))  # as export_model captures
    record_kv_stats(gm, calib)
    return Session.from_graph(condfx.apply(gm, f"{spec}, add-kv-cache").graph_module)


def run(args) -> dict:
    model_path = args.model or str(data_file("stories260K.bin"))
    model, tok = load(model_path)
    model.eval()
    text = open(args.text or data_file("tinystories_valid_head.txt"), encoding="utf-8").read()  # noqa: SIM115
    ids = torch.tensor([tok.encode(text[: args.tokens * 12], bos=True, eos=False)[: args.tokens]])
    rows = []
    calib = text_batches(args.calib_text, tok) if args.calib_text else None
    items = [(m, f"method={m},bits={args.bits}") for m in filter(None, args.methods.split(","))]
    items += [item.rpartition(":")[::2] for item in filter(None, args.configs.split(";"))]
    for method, options in items:
        spec = (f"fuse-attention, quantize-kv{{{options},group={args.group},"
                f"residual={args.residual},sink={args.sink}}}")
        with tempfile.TemporaryDirectory(prefix="condfx-kvq-") as tmp:
            t0 = time.perf_counter()
            bundle = condfx.export_model(model, tmp, passes=spec, kv_calibration=calib)
            export_s = time.perf_counter() - t0
            torch_session = _torch_session(model, spec, calib)
            onnx_session = Session.from_onnx(tmp, model=model)
            want, t_torch = _decode(torch_session, ids, args.prefill)
            got, t_onnx = _decode(onnx_session, ids, args.prefill)
            flips = _code_flips(torch_session, onnx_session)
            same_cache = _same_cache_diff(torch_session, onnx_session, ids, args.prefill)
        agree = (want.argmax(-1) == got.argmax(-1)).float().mean().item()
        per_token = onnx_session.cache_bytes() / onnx_session.position
        fp16 = _fp16_bytes_per_token(onnx_session)
        rows.append({
            "method": method, "options": options, "group": args.group,
            "same_cache_max_abs_diff": same_cache,
            "max_abs_diff": (want - got).abs().max().item(), "code_flips": flips, "greedy_agreement": agree,
            "bundle_check": bundle.max_abs_diff, "cache_bytes_per_token": per_token,
            "fp16_bytes_per_token": fp16, "compression": fp16 / per_token,
            "onnx_vs_torch_decode_time": t_onnx / t_torch, "export_s": export_s,
            "cache_inputs": len(onnx_session.caches.past()),
        })
        if not args.json:
            r = rows[-1]
            print(f"{method}: same cache max|Δ| {same_cache:.2e}; free-running {r['max_abs_diff']:.2e} "
                  f"({flips} codes differ), agreement {agree:.3f}, "
                  f"{per_token:.0f} B/token ({r['compression']:.2f}x vs fp16), "
                  f"ORT/torch time {r['onnx_vs_torch_decode_time']:.2f}, export {export_s:.0f} s", flush=True)
    return {"model": model_path, "tokens": int(ids.shape[1]), "prefill": args.prefill, "rows": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="model spec (default: stories260K)")
    ap.add_argument("--text", default=None, help="text file (default: TinyStories head)")
    ap.add_argument("--methods", default="kivi,xquant,xquant-cl")
    ap.add_argument("--configs", default="", help="extra rows 'label:quantize-kv options;...' (no group/"
                    "residual/sink: those come from the flags)")
    ap.add_argument("--calib-text", default=None, help="calibration text for latent=klt rows")
    ap.add_argument("--bits", type=int, default=2)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--residual", type=int, default=32)
    ap.add_argument("--sink", type=int, default=1)
    ap.add_argument("--tokens", type=int, default=160)
    ap.add_argument("--prefill", type=int, default=64)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    out = run(args)
    if args.json:
        print(json.dumps(out, indent=2))
        return
    print("\n| method | options | max abs logit diff, same cache | free-running (codes differing) | greedy agreement | cache B/token | vs fp16 | ORT / PyTorch decode time |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in out["rows"]:
        print(f"| {r['method']} | {r['options']} | {r['same_cache_max_abs_diff']:.2e} | "
              f"{r['max_abs_diff']:.2e} ({r['code_flips']}) | {r['greedy_agreement']:.3f} | "
              f"{r['cache_bytes_per_token']:.0f} | {r['compression']:.2f}x | {r['onnx_vs_torch_decode_time']:.2f} |")


if __name__ == "__main__":
    main()
