"""IHA retrofitted into stories260K: closeness at insertion (logit KL) and perplexity after a brief fine-tune.

Variants, each captured with ``condfx.capture`` and fine-tuned with ``condfx.train`` (all parameters,
AdamW, cosine, the same ``--steps`` and the same batches: random ``--len``-token windows of TinyStories
stories 100 onwards of ``tinystories_valid_head.txt``):
    original          the unmodified model
    IHA token/token   ``interleave-heads{P=2,causal=token,positions=token}``: the init that starts
                      from the original function (copies + ``init_noise`` to break their symmetry)
    IHA paper         ``interleave-heads{P=2}``: flat causality, virtual positions t*P + p
Evaluation: the first ``--docs`` stories (``documents_to_ids``, BOS per story, context 512), never
trained on. KL is the mean per-token KL(original || variant) of the next-token distributions before
fine-tuning. Attention FLOPs/token are the pass report's estimate (context 2048).

    python benchmarks/iha_retrofit.py [--steps 150] [--docs 50] [--json]
"""

from __future__ import annotations

import argparse
import copy
import json
import time

import torch

import condfx
from condfx.data import data_file
from condfx.eval.perplexity import documents_to_ids, perplexity
from condfx.models_zoo import load
from condfx.passes.report import estimate_cost
from condfx.patterns import find_regions
from condfx.train import train

VARIANTS = {
    "original": None,
    "IHA token/token": "interleave-heads{P=2,causal=token,positions=token,init_noise=0.01}",
    "IHA paper (flat, t*P+p)": "interleave-heads{P=2,init_noise=0.01}",
}


def _mean_kl(ref, model, docs) -> float:
    """Mean per-token KL(ref || model) over ``docs``."""
    total = count = 0.0
    with torch.no_grad():
        for doc in docs:
            ids = torch.tensor([doc])
            p = ref(ids).log_softmax(-1)
            q = model(ids).log_softmax(-1)
            total += float((p.exp() * (p - q)).sum())
            count += ids.shape[1]
    return total / count


def _batches(train_ids: torch.Tensor, length: int, batch: int):
    def draw(step, gen):
        starts = torch.randint(0, train_ids.numel() - length - 1, (batch,), generator=gen)
        rows = torch.stack([train_ids[s : s + length + 1] for s in starts.tolist()])
        return rows[:, :-1].contiguous(), rows[:, 1:].contiguous()

    return draw


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--len", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--docs", type=int, default=50)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    model, tok = load(data_file("stories260K.bin"))
    text = data_file("tinystories_valid_head.txt").read_text(encoding="utf-8")
    docs = documents_to_ids(text, tok)
    evals, train_docs = docs[: args.docs], docs[100:]
    train_ids = torch.tensor([t for d in train_docs for t in d])
    base = condfx.capture(model.eval(), (torch.zeros(2, 16, dtype=torch.long),))
    rows = []
    for name, spec in VARIANTS.items():
        start = time.perf_counter()
        if spec is None:
            gm = copy.deepcopy(base)
            regions = find_regions(gm)
            flops = estimate_cost(regions.attention).attention_flops_per_token
        else:
            applied = condfx.apply(base, spec)
            gm, flops = applied.graph_module, applied.reports[-1].cost_after.attention_flops_per_token
        kl = _mean_kl(base, gm, evals)
        before = perplexity(gm, evals, context=512).ppl
        result = train(gm, _batches(train_ids, args.len, args.batch), steps=args.steps, lr=args.lr,
                       batch_size=args.batch, warmup=args.steps // 10, seed=0, progress=False)
        after = perplexity(gm, evals, context=512).ppl
        rows.append({"variant": name, "spec": spec, "kl_at_insertion": kl, "ppl_before": before,
                     "ppl_after": after, "params": sum(p.numel() for p in gm.parameters()),
                     "final_train_loss": sum(result.losses[-10:]) / 10,
                     "seconds": time.perf_counter() - start, "attn_flops_per_token_L2048": flops})
    if args.json:
        print(json.dumps({"config": vars(args), "rows": rows}, indent=2))
        return
    print(f"stories260K, fine-tune {args.steps} steps x {args.batch} x {args.len} tokens (lr {args.lr}); "
          f"perplexity on the first {args.docs} TinyStories stories")
    print("| variant | KL at insertion (nats/token) | ppl before | ppl after fine-tune | params "
          "| attn FLOPs/token (L=2048) |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['variant']} | {r['kl_at_insertion']:.2e} | {r['ppl_before']:.3f} | "
              f"{r['ppl_after']:.3f} | {r['params']:,} | {r['attn_flops_per_token_L2048']:,} |")


if __name__ == "__main__":
    main()
