"""SmolLM2-135M through ``torch.compile(backend="condfx", options={"passes": "fuse-attention"})``.

Prints the max |logit diff| against eager on a 64-token input and the number of rewrites (expect 30,
one per layer). ``--json`` prints a JSON object instead. ``--inductor`` compiles with Inductor
(slow on CPU); by default the rewritten graph runs eagerly.

    python benchmarks/compile_smollm2.py [--gguf PATH] [--inductor] [--json]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import condfx.compile_backend as cb
from condfx.models_zoo import load

DEFAULT_GGUF = Path("/work/shared/data/SmolLM2-135M-Instruct.Q4_1.gguf")


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gguf", type=Path, default=DEFAULT_GGUF)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--inductor", action="store_true")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    model, _ = load(args.gguf)
    load_s = time.perf_counter() - t0
    ids = torch.randint(0, 1000, (1, args.tokens), generator=torch.Generator().manual_seed(0))
    report = cb.CompileReport()
    options = {"passes": "fuse-attention", "inductor": args.inductor, "report": report}
    compiled = torch.compile(model, backend="condfx", options=options)
    with torch.no_grad():
        want = model(ids)
        t0 = time.perf_counter()
        got = compiled(ids)
        compile_s = time.perf_counter() - t0
    want, got = (x if isinstance(x, torch.Tensor) else x.logits for x in (want, got))
    row = {
        "model": args.gguf.name, "tokens": args.tokens, "inductor": args.inductor,
        "graphs": len(report.graphs), "rewrites": report.rewritten("fuse-attention"),
        "max_abs_logit_diff": (got - want).abs().max().item(),
        "load_s": round(load_s, 1), "first_call_s": round(compile_s, 1),
    }
    if args.json:
        print(json.dumps(row))
    else:
        print("| " + " | ".join(row) + " |")
        print("|" + "---|" * len(row))
        print("| " + " | ".join(str(v) for v in row.values()) + " |")
    return row


if __name__ == "__main__":
    main()
