"""How capture, region finding and fuse-attention scale with depth on a Llama-2-7B-shaped model.

The model is built on the meta device (no weights are allocated), so this measures the compiler
stages alone. Run:

    python benchmarks/capture_scale.py                 # condfx zoo Llama and HF LlamaForCausalLM
    python benchmarks/capture_scale.py --json
"""

from __future__ import annotations

import argparse
import json
import time

import torch

import condfx
from condfx.passes.pipeline import apply
from condfx.patterns import find_regions

SHAPE = dict(dim=4096, n_heads=32, n_kv_heads=32, hidden_dim=11008, vocab_size=32000)


def _build(family: str, n_layers: int) -> torch.nn.Module:
    with torch.device("meta"):
        if family == "zoo":
            from condfx.models_zoo.llama import LlamaConfig, LlamaModel

            cfg = LlamaConfig(
                vocab_size=SHAPE["vocab_size"], dim=SHAPE["dim"], n_layers=n_layers,
                n_heads=SHAPE["n_heads"], n_kv_heads=SHAPE["n_kv_heads"],
                hidden_dim=SHAPE["hidden_dim"], max_seq_len=4096,
            )
            return LlamaModel(cfg).eval()
        from transformers import LlamaConfig as HFConfig
        from transformers import LlamaForCausalLM

        cfg = HFConfig(
            vocab_size=SHAPE["vocab_size"], hidden_size=SHAPE["dim"], num_hidden_layers=n_layers,
            num_attention_heads=SHAPE["n_heads"], num_key_value_heads=SHAPE["n_kv_heads"],
            intermediate_size=SHAPE["hidden_dim"],
        )
        return LlamaForCausalLM(cfg).eval()


def measure(family: str, n_layers: int) -> dict:
    """Times the three stages for one depth; returns seconds per stage and region counts."""
    model = _build(family, n_layers)
    ids = torch.zeros(2, 16, dtype=torch.long, device="meta")
    t0 = time.perf_counter()
    gm = condfx.capture(model, (ids,))
    t1 = time.perf_counter()
    regions = find_regions(gm)
    t2 = time.perf_counter()
    result = apply(gm, "fuse-attention")
    t3 = time.perf_counter()
    return {
        "family": family, "layers": n_layers, "nodes": len(gm.graph.nodes),
        "attention_regions": len(regions.attention), "ffn_regions": len(regions.ffn),
        "rewritten": result.reports[0].rewritten,
        "capture_s": round(t1 - t0, 2), "regions_s": round(t2 - t1, 2),
        "fuse_attention_s": round(t3 - t2, 2), "total_s": round(t3 - t0, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, nargs="+", default=[8, 16, 32])
    parser.add_argument("--family", choices=["zoo", "hf", "both"], default="both")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    families = ["zoo", "hf"] if args.family == "both" else [args.family]
    rows = [measure(f, n) for f in families for n in args.layers]
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    cols = ["family", "layers", "nodes", "attention_regions", "rewritten", "capture_s",
            "regions_s", "fuse_attention_s", "total_s"]
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(str(r[c]) for c in cols) + " |")


if __name__ == "__main__":
    main()
