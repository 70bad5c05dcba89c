"""Decode speed of the condfx torch Session against Hugging Face ``generate`` on SmolLM2, in one run.

Three engines over the same weights (the data folder's SmolLM2 GGUF, dequantized to float32) and
the same prompt, greedy, batch 1:
    hf        ``model.hf.generate`` (its DynamicCache concatenates K/V every step)
    session   ``Session.from_model(model)``: the decode graph with K/V grown in place in the caches'
              arenas and ``condfx.attention`` called without the custom-op dispatch
              (``runtime/session.grow_in_place``)
    graph     the same Session running the decode graph as ``add-kv-cache`` wrote it (``cat`` of
              the past every step, the custom op): what the Session did before
Decode tokens/s = (new - 1) / (time(prompt + new tokens) - time(prompt + 1 token)); each round runs
every engine once, in turn, and the table gives the median over rounds, so the ratios are measured
in one run under the same machine load (the absolute figures are not comparable across machines).

    python benchmarks/session_decode.py [--prompt 512] [--new 128] [--rounds 3] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def _engines(args):
    from condfx.models_zoo import load
    from condfx.runtime import Session, generate
    from condfx.runtime.session import TorchBackend

    model = load(args.gguf)[0] if args.gguf else load_default()
    session = Session.from_model(model, passes="fuse-attention")

    class GraphAsWritten(TorchBackend):
        """The decode graph as ``add-kv-cache`` wrote it."""

        def __init__(self, gm):
            super().__init__(gm)
            self.runner, self.in_place = gm, 0  # its caches keep each present as it is

    graph = Session(GraphAsWritten(session.backend.gm), max_seq_len=session.max_seq_len)
    ids = torch.randint(0, 49000, (1, args.prompt), generator=torch.Generator().manual_seed(0))

    def hf(n):
        with torch.no_grad():
            model.hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, use_cache=True,
                              max_new_tokens=n, min_new_tokens=n, pad_token_id=0)

    def run(s):
        return lambda n: generate(s, ids.tolist(), max_new_tokens=n, greedy=True)

    return {"hf": hf, "session": run(session), "graph": run(graph)}


def load_default():
    from condfx.data import data_file
    from condfx.models_zoo import load

    return load(data_file("SmolLM2-135M-Instruct.Q4_1.gguf"))[0]


def _decode_tok_s(fn, new: int) -> float:
    t0 = time.perf_counter()
    fn(1)
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    fn(new)
    full = time.perf_counter() - t0
    return (new - 1) / max(full - first, 1e-9)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gguf", default=None, help="default: the data folder's SmolLM2 GGUF")
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    engines = _engines(args)
    for fn in engines.values():
        fn(2)  # warm-up
    rates: dict[str, list[float]] = {name: [] for name in engines}
    for r in range(args.rounds):
        for name, fn in engines.items():
            rates[name].append(_decode_tok_s(fn, args.new))
        print(f"round {r}: " + ", ".join(f"{k} {v[-1]:.2f} tok/s" for k, v in rates.items()), flush=True)
    med = {name: statistics.median(v) for name, v in rates.items()}
    print(f"| engine | decode tok/s (median of {args.rounds}) | vs HF generate | rounds |")
    print("|---|---:|---:|---|")
    for name, rate in med.items():
        each = ", ".join(f"{x:.2f}" for x in rates[name])
        print(f"| {name} | {rate:.2f} | {rate / med['hf']:.2f}x | {each} |")


if __name__ == "__main__":
    main()
