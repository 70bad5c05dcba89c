"""IHA at decode time: pseudo-K/V cache bytes, and the ONNX bundle against PyTorch.

stories260K with ``interleave-heads{P=...}`` on every layer (``--fold`` adds ``fold-interleave``): a
torch ``Session`` prefills ``--prompt`` tokens of a TinyStories story and decodes the next ``--new``
one at a time; the logits are compared with one full forward of the same graph, and the cache bytes
with those of the original model's session (``fuse-attention``). Then ``condfx.export`` writes the
ONNX bundle (prefill + decode graphs) and ONNX Runtime decodes the same tokens.

    python benchmarks/iha_runtime.py [--P 2] [--fold] [--json]
"""

from __future__ import annotations

import argparse
import json
import tempfile

import torch

import condfx
from condfx.data import data_file
from condfx.eval.perplexity import documents_to_ids
from condfx.models_zoo import load
from condfx.runtime.session import Session


def _decode(session: Session, ids: torch.Tensor, prompt: int) -> torch.Tensor:
    outs = [session.prefill(ids[:, :prompt])]
    outs += [session.step(ids[:, t : t + 1]) for t in range(prompt, ids.shape[1])]
    return torch.cat(outs, dim=1)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--P", type=int, default=2)
    ap.add_argument("--fold", action="store_true")
    ap.add_argument("--prompt", type=int, default=48)
    ap.add_argument("--new", type=int, default=16)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    model, tok = load(data_file("stories260K.bin"))
    text = data_file("tinystories_valid_head.txt").read_text(encoding="utf-8")
    doc = documents_to_ids(text, tok, max_docs=1)[0]
    ids = torch.tensor([doc[: args.prompt + args.new]])
    spec = f"interleave-heads{{P={args.P},init_noise=0.05}}" + (", fold-interleave" if args.fold else "")
    full = condfx.apply(condfx.capture(model, (torch.zeros(2, 8, dtype=torch.long),)), spec)
    expected = full.graph_module(ids)
    iha = Session.from_model(model, passes=spec)
    torch_out = _decode(iha, ids, args.prompt)
    base = Session.from_model(model)
    _decode(base, ids, args.prompt)
    with tempfile.TemporaryDirectory() as out:
        bundle = condfx.export(model, out, passes=spec)
        onnx_out = _decode(Session.from_onnx(out, model=model), ids, args.prompt)
    row = {
        "spec": spec, "tokens": ids.shape[1],
        "torch_decode_vs_full_forward": (torch_out - expected).abs().max().item(),
        "onnx_bundle_check": bundle.max_abs_diff,
        "onnx_decode_vs_torch_decode": (onnx_out - torch_out).abs().max().item(),
        "cache_bytes_iha": iha.cache_bytes(), "cache_bytes_original": base.cache_bytes(),
    }
    if args.json:
        print(json.dumps(row, indent=2))
        return
    print(f"stories260K, {spec}, {row['tokens']} tokens ({args.prompt} prefill + {args.new} decode steps)")
    print("| check | figure |")
    print("|---|---:|")
    print(f"| torch Session decode vs full forward, max abs logit diff | {row['torch_decode_vs_full_forward']:.2e} |")
    print(f"| ONNX bundle: ORT vs PyTorch (export check) | {row['onnx_bundle_check']:.2e} |")
    print(f"| ONNX Runtime decode vs torch decode, max abs logit diff | {row['onnx_decode_vs_torch_decode']:.2e} |")
    print(f"| cache bytes: IHA / original | {row['cache_bytes_iha']:,} / {row['cache_bytes_original']:,} "
          f"({row['cache_bytes_iha'] / row['cache_bytes_original']:.2f}x) |")
    print()
    print(iha.caches.table())


if __name__ == "__main__":
    main()
