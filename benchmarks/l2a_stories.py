"""L2A on real weights: stories260K converted to L2A and briefly trained on TinyStories (CPU-sized).

Perplexity on the first ``--eval-docs`` stories of ``tinystories_valid_head.txt`` (BOS per story,
first 512 tokens each, ``condfx.eval.documents_to_ids``) for:
    original            the pretrained model
    window-only         every attention restricted to ``--window`` tokens, no training
    L2A trained         route-attention{window} + condfx.l2a.train_l2a for ``--steps``
    dense trained       the original with the same trainable set (attention + norms, MLP frozen),
                        the same data, steps and learning rate: the paper's dense baseline
Training text: the stories after the first 100 (never the evaluated ones), packed into
``--seq``-token rows (BOS per story). The global fraction per layer is measured on the evaluation
stories.

    nice python benchmarks/l2a_stories.py [--steps 150] [--window 32] [--json]

With ``--model PATH --text FILE`` (e.g. SmolLM2 on WikiText-2) the text is encoded once (first
``--chars`` characters, BOS first): perplexity is measured on its first ``--eval-tokens`` tokens
(windows of ``--eval-context``, stride half of it) and training draws ``--seq``-token rows from the
tokens after them. The global fraction is measured on the evaluation tokens.

    nice python benchmarks/l2a_stories.py --model <data>/SmolLM2-135M-Instruct.Q4_1.gguf \
        --text <data>/wikitext2_raw_test.txt --window 64 --seq 256 --batch 1 --steps 40
"""

from __future__ import annotations

import argparse
import json
import time

import torch

import condfx
from condfx.data import data_file
from condfx.eval.perplexity import documents_to_ids, perplexity
from condfx.l2a import L2ARecipe, l2a_trainable, route_fractions, train_l2a, window_only
from condfx.models_zoo import load
from condfx.train import train


def _packed(docs: list[list[int]], seq: int) -> torch.Tensor:
    flat = [t for d in docs for t in d]
    n = (len(flat) - 1) // seq
    return torch.tensor(flat[: n * seq + 1])


def _data(stream: torch.Tensor, seq: int, batch: int):
    def draw(step, g):
        starts = torch.randint(0, stream.numel() - seq - 1, (batch,), generator=g)
        rows = torch.stack([stream[s : s + seq + 1] for s in starts.tolist()])
        return rows[:, :-1], rows[:, 1:]
    return draw


def _stories(args):
    model, tok = load(data_file("stories260K.bin"))
    text = data_file("tinystories_valid_head.txt").read_text(encoding="utf-8")
    docs = documents_to_ids(text, tok)
    return model, docs[: args.eval_docs], _packed(docs[100:], args.seq), 512


def _text(args):
    model, tok = load(args.model)
    with open(args.text, encoding="utf-8") as f:
        ids = tok.encode(f.read()[: args.chars], bos=True, eos=False)
    if len(ids) < args.eval_tokens + 2 * args.seq:
        msg = f"--text gives {len(ids)} tokens; need more than --eval-tokens + 2 * --seq = {args.eval_tokens + 2 * args.seq}."
        raise ValueError(msg)
    return model, [ids[: args.eval_tokens]], torch.tensor(ids[args.eval_tokens:]), args.eval_context


def run(args) -> dict:
    t0 = time.perf_counter()
    model, eval_docs, stream, context = (_text if args.model else _stories)(args)
    model.eval()
    ids = stream[:32].reshape(2, 16)  # batch 2: keeps the batch dim symbolic
    gm = condfx.capture(model, (ids,))

    def ppl(m):
        with torch.no_grad():
            return perplexity(m, eval_docs, context=context).ppl

    rows = [{"model": "original", "ppl": ppl(gm)}]
    rows.append({"model": f"window-only (w={args.window}), untrained", "ppl": ppl(window_only(gm, args.window))})
    recipe = L2ARecipe(steps=args.steps, lr=args.lr, warmup=args.steps // 10, lam=args.lam, seed=0,
                       router_warmup=args.router_warmup)
    l2a = condfx.apply(gm, f"route-attention{{window={args.window}}}").graph_module
    res = train_l2a(l2a, _data(stream, args.seq, args.batch), recipe, progress=not args.json)
    flat = [t for d in eval_docs for t in d]
    flat_eval = torch.tensor(flat[: len(flat) // 256 * 256]).reshape(-1, 256)[:8]  # (<= 8, 256)
    rows.append({"model": "L2A trained", "ppl": ppl(l2a), "global": route_fractions(l2a, flat_eval),
                 "train_s": res.seconds})
    dense = condfx.apply(gm, "fuse-attention").graph_module
    names = l2a_trainable(dense)
    out = train(dense, _data(stream, args.seq, args.batch), steps=args.steps, lr=args.lr,
                warmup=args.steps // 10, trainable=lambda n: n in names, progress=False, seed=0)
    rows.append({"model": "dense trained (same steps)", "ppl": ppl(dense), "train_s": out.seconds})
    return {"model_file": args.model or "stories260K.bin", "text": args.text or "tinystories_valid_head.txt",
            "window": args.window, "steps": args.steps, "lam": args.lam, "router_warmup": args.router_warmup,
            "seq": args.seq, "batch": args.batch, "eval_docs": args.eval_docs, "rows": rows, "seconds": time.perf_counter() - t0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--window", type=int, default=32)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--lam", type=float, default=0.05)
    parser.add_argument("--eval-docs", type=int, default=50)
    parser.add_argument("--router-warmup", type=int, default=0, help="steps with frozen routers")
    parser.add_argument("--model", default=None, help="model file (GGUF, llama2.c); needs --text")
    parser.add_argument("--text", default=None, help="plain text for --model (e.g. wikitext2_raw_test.txt)")
    parser.add_argument("--chars", type=int, default=200000, help="characters of --text encoded")
    parser.add_argument("--eval-tokens", type=int, default=1024, help="--text tokens scored")
    parser.add_argument("--eval-context", type=int, default=512, help="perplexity window on --text")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if bool(args.model) != bool(args.text):
        parser.error("--model and --text go together.")
    out = run(args)
    if args.json:
        print(json.dumps(out, indent=2))
        return
    what = f"the first {out['eval_docs']} TinyStories stories" if not args.model else f"the first {args.eval_tokens} tokens of {out['text']}"
    print(f"{out['model_file']}, window {out['window']}, {out['steps']} steps of {out['batch']}x{out['seq']} tokens, "
          f"ppl on {what}")
    print("| model | perplexity | global fraction per layer |")
    print("|---|---:|---|")
    for r in out["rows"]:
        g = " / ".join(f"{x:.0%}" for x in r["global"]) if "global" in r else "-"
        print(f"| {r['model']} | {r['ppl']:.3f} | {g} |")


if __name__ == "__main__":
    main()
