"""Attention sinks + sliding window (``sink-window``) against the dense model and a plain window of
the same cache size: perplexity on one long stream, and the KV bytes each keeps.

Rows: the dense model (full KV cache); for each ``--windows`` W: ``sink-window{sink=S,window=W}``
(cache: S + W - 1 tokens per layer) and a plain window of the same size S + W
(``sink-window{sink=0,window=S+W}``: every query reads only its last S + W tokens at their own
positions, the "window attention" baseline StreamingLLM compares with). The whole ``--tokens`` stream
is scored in one teacher-forced forward (context = tokens), so every token past the window is scored
with evicted history: what decoding with the bounded cache sees (``tests/runtime`` checks that
the Session's trimmed cache equals the teacher-forced forward).

    python benchmarks/sink_window_ppl.py --model <data>/SmolLM2-135M-Instruct.Q4_1.gguf \\
        --text <data>/wikitext2_raw_test.txt --tokens 4096 --sink 4 --windows 256,1024
    python benchmarks/sink_window_ppl.py            # stories260K on TinyStories (a quick check)
"""

from __future__ import annotations

import argparse
import json
import time

import torch

import condfx
from condfx.data import data_file
from condfx.eval.perplexity import perplexity
from condfx.models_zoo import load
from condfx.passes import apply


def _stream(args):
    """(model, one token stream) from --model/--text, or stories260K on its validation text."""
    if args.model:
        model, tok = load(args.model)
        text = open(args.text, encoding="utf-8").read()  # noqa: SIM115
    else:
        model, tok = load(data_file("stories260K.bin"))
        text = data_file("tinystories_valid_head.txt").read_text(encoding="utf-8")
    ids = tok.encode(text[: args.tokens * 12], bos=True, eos=False)[: args.tokens]
    if len(ids) < args.tokens:
        msg = f"--text gives only {len(ids)} tokens; --tokens asks for {args.tokens}."
        raise SystemExit(msg)
    return model.eval(), torch.tensor(ids)


def run(args) -> dict:
    model, ids = _stream(args)
    gm = condfx.capture(model, (torch.zeros(2, 8, dtype=torch.long),))
    specs = [("dense", None, args.tokens)]
    for w in (int(x) for x in args.windows.split(",")):
        specs.append((f"sink-window sink={args.sink} window={w}",
                      f"sink-window{{sink={args.sink},window={w}}}", args.sink + w - 1))
        specs.append((f"plain window {args.sink + w}", f"sink-window{{sink=0,window={args.sink + w}}}",
                      args.sink + w - 1))
    rows = []
    for label, spec, kept in specs:
        module = model if spec is None else apply(gm, spec).graph_module  # perplexity reads its logits
        start = time.perf_counter()
        res = perplexity(module, ids, context=args.tokens)
        rows.append({"config": label, "ppl": res.ppl, "nll": res.nll, "tokens": res.tokens,
                     "cached_tokens_per_layer": min(kept, args.tokens), "seconds": time.perf_counter() - start})
        if not args.json:
            print(f"{label:<36} ppl {res.ppl:9.3f}  cache {min(kept, args.tokens):>5} tokens/layer  "
                  f"({rows[-1]['seconds']:.0f} s)", flush=True)
    return {"model": args.model or "stories260K", "text": args.text, "tokens": args.tokens,
            "sink": args.sink, "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model path (default stories260K on TinyStories)")
    parser.add_argument("--text", default=None, help="text file (needed with --model)")
    parser.add_argument("--tokens", type=int, default=512, help="tokens scored in one stream")
    parser.add_argument("--sink", type=int, default=4, help="attention-sink tokens")
    parser.add_argument("--windows", default="64,128", help="window sizes, comma-separated")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args()
    if args.model and not args.text:
        parser.error("--model needs --text")
    result = run(args)
    if args.json:
        print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
