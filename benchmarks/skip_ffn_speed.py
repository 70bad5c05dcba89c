"""skip-ffn decode speed at batch 1 and 8 on CPU: runtime Session with vs without skip-ffn, same run.

For each model, both sessions (``passes="fuse-attention"`` and ``"fuse-attention, <calibrated
skip-ffn>"``) prefill the same prompt and greedily decode ``--steps`` tokens; rounds alternate
dense/skip and the best round of each is reported (tokens/s over the decode steps only). The skip
fraction beside each figure is measured on the decode steps of an extra, untimed skip-ffn run with
``Session.count_ffn_skips`` (fraction of all FFN blocks, cold layers included, that did not run).
Tokens/s count every row of the batch.

``--backends torch,onnx`` adds the same pair exported to ONNX and run by ONNX Runtime (its skip
fraction is the torch session's: ONNX Runtime's masks are not observable). Speed-ups are given on the
best round and on the median round.

Models: SmolLM2-135M (real weights, calibrated on WikiText-2 tokens 4096.. for ``--target``) and a
1B-class Llama config with random weights (calibrated on random tokens).

    nice python benchmarks/skip_ffn_speed.py [--models smollm2,llama-1b] [--batches 1,8]
        [--backends torch,onnx] [--threads N] [--ppl-tokens 4096] [--json]

``--ppl-tokens N`` adds SmolLM2's WikiText-2 perplexity, dense and under the calibrated spec, on the
first N test tokens in windows of 2,048 (the quality at the skip whose speed is measured).
"""

from __future__ import annotations

import argparse
import functools
import json
import time

import torch

import condfx
from condfx.calibrate import calibrate_similarity
from condfx.runtime import Session
from condfx.runtime.session import TorchBackend

_DATA_SMOL = "SmolLM2-135M-Instruct.Q4_1.gguf"


@functools.cache
def _smollm2_ids() -> tuple:
    """SmolLM2 and the WikiText-2 test text's first tokens (bos first)."""
    from condfx.data import data_file
    from condfx.models_zoo import load

    model, tok = load(data_file(_DATA_SMOL))
    text = data_file("wikitext2_raw_test.txt").read_text(encoding="utf-8")[:80000]
    return model, tok.encode(text, bos=True, eos=False)


def _smollm2(cal_tokens: int, batch: int):
    model, ids = _smollm2_ids()
    prompts = torch.tensor([ids[i * 32 : i * 32 + 32] for i in range(batch)])  # (batch, 32)
    return model, torch.tensor([ids[4096 : 4096 + cal_tokens]]), prompts


@functools.cache
def _llama_1b_model():
    from condfx.models_zoo.llama import LlamaConfig, LlamaModel

    cfg = LlamaConfig(vocab_size=32000, dim=2048, n_layers=16, n_heads=32, n_kv_heads=8,
                      hidden_dim=8192, max_seq_len=2048)
    return LlamaModel(cfg, seed=0).eval()


def _llama_1b(cal_tokens: int, batch: int):
    g = torch.Generator().manual_seed(0)
    cal = torch.randint(0, 32000, (1, cal_tokens), generator=g)
    return _llama_1b_model(), cal, torch.randint(0, 32000, (batch, 32), generator=g)


def _decode(session: Session, prompt: torch.Tensor, steps: int) -> tuple[float, list[list[int]]]:
    """Seconds for ``steps`` greedy decode steps after the prefill, and the tokens (per row)."""
    logits = session.prefill(prompt)
    tok = logits[:, -1].argmax(-1, keepdim=True)  # (B, 1)
    out = []
    t0 = time.perf_counter()
    for _ in range(steps):
        out.append(tok[:, 0].tolist())
        tok = session.step(tok)[:, -1].argmax(-1, keepdim=True)
    return time.perf_counter() - t0, out


def _decode_skip_fraction(session: Session, prompt: torch.Tensor, steps: int) -> float:
    """Fraction of all FFN blocks skipped over the decode steps (untimed; ``Session.count_ffn_skips``)."""
    logits = session.prefill(prompt)
    tok = logits[:, -1].argmax(-1, keepdim=True)
    with session.count_ffn_skips() as counter:
        for _ in range(steps):
            tok = session.step(tok)[:, -1].argmax(-1, keepdim=True)
    return counter.fraction_of_all_ffn


def _session(model, spec: str) -> Session:
    """``Session.from_model`` without weight copies: the passes run in place on a fresh capture, which
    shares the model's parameter tensors (``condfx.apply`` deep-copies; two 1B sessions would not fit)."""
    import copy

    from condfx.passes.pipeline import run_pass
    from condfx.passes.spec import build_passes

    captured = condfx.capture(model, (torch.zeros(2, 8, dtype=torch.long),))
    shared = {id(t): t for t in (*captured.parameters(), *captured.buffers())}
    gm = copy.deepcopy(captured, shared)  # the graph is copied, the weights are not (as condfx.apply, minus them)
    for p in build_passes(f"{spec}, add-kv-cache"):
        gm = run_pass(p, gm).graph_module
    return Session(TorchBackend(gm), max_seq_len=getattr(model.info, "max_seq_len", None))


def _onnx_session(model, spec: str, threads: int) -> Session:
    """The same passes exported to ONNX (prefill + decode bundle) and opened on ONNX Runtime."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="condfx-skipffn-") as tmp:
        condfx.export_model(model, tmp, passes=spec, verify=False)
        return Session.from_onnx(tmp, threads=threads, check_hashes=False)


def _perplexity(model, spec: str, tokens: int) -> float:
    """WikiText-2 perplexity of the model under ``spec`` on its first ``tokens`` test tokens, in
    windows of 2,048 (the skip-ffn quality table's protocol); SmolLM2 only."""
    from condfx.eval.perplexity import perplexity

    ids = _smollm2_ids()[1][:tokens]
    with torch.no_grad():
        gm = condfx.capture(model, (torch.tensor([ids[:16]]).expand(2, -1).contiguous(),))
        if spec:
            gm = condfx.apply(gm, spec).graph_module
        return perplexity(gm, [ids], context=2048, stride=2048).ppl


def _median(v: list[float]) -> float:
    return sorted(v)[len(v) // 2]


def bench(name: str, target: float, steps: int, rounds: int, cal_tokens: int, batch: int,
          backends: tuple[str, ...] = ("torch",), threads: int = 1, ppl_tokens: int = 0) -> dict:
    model, cal_ids, prompt = (_smollm2 if name == "smollm2" else _llama_1b)(cal_tokens, batch)
    t0 = time.perf_counter()
    with torch.no_grad():
        gm = condfx.capture(model, (cal_ids[:, :16].expand(2, -1).contiguous(),))
        cal = calibrate_similarity(gm, cal_ids, target_skip=target)
    del gm
    cal_s = time.perf_counter() - t0
    specs = {"dense": "fuse-attention", "skip-ffn": f"fuse-attention, {cal.spec()}"}
    sessions = {k: _session(model, v) for k, v in specs.items()}
    if "onnx" in backends:
        sessions |= {f"onnx {k}": _onnx_session(model, v, threads) for k, v in specs.items()}
    if "torch" not in backends:
        skip = _decode_skip_fraction(sessions["skip-ffn"], prompt, steps)
        sessions = {k: v for k, v in sessions.items() if k.startswith("onnx")}
    times: dict[str, list[float]] = {k: [] for k in sessions}
    tokens = {}
    for _ in range(rounds):
        for k, s in sessions.items():
            seconds, tokens[k] = _decode(s, prompt, steps)
            times[k].append(seconds)
    if "torch" in backends:
        skip = _decode_skip_fraction(sessions["skip-ffn"], prompt, steps)
    del sessions
    row = {"model": name, "batch": batch, "spec": cal.spec(), "target": target,
           "calibration_skip": cal.measured_skip, "calibration_s": round(cal_s, 1), "steps": steps,
           "prompt_len": prompt.shape[1], "decode_skip_fraction": skip, "times_s": times, "by_backend": {}}
    for backend in backends:
        d, k = ("dense", "skip-ffn") if backend == "torch" else ("onnx dense", "onnx skip-ffn")
        pairs = [(a, b) for ra, rb in zip(tokens[d], tokens[k], strict=True) for a, b in zip(ra, rb, strict=True)]
        row["by_backend"][backend] = {
            "dense_tok_s": batch * steps / min(times[d]), "skip_tok_s": batch * steps / min(times[k]),
            "speedup": min(times[d]) / min(times[k]), "median_speedup": _median(times[d]) / _median(times[k]),
            "greedy_agreement": sum(a == b for a, b in pairs) / len(pairs)}
    if ppl_tokens and name == "smollm2":
        row["ppl"] = {"tokens": ppl_tokens, "dense": _perplexity(model, "", ppl_tokens),
                      "skip-ffn": _perplexity(model, cal.spec(), ppl_tokens)}
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="smollm2,llama-1b")
    parser.add_argument("--targets", default="smollm2=0.3,llama-1b=0.26",
                        help="calibrated target skip per model (llama-1b tuned so decode skip lands in 25-30%%)")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--steps", type=int, default=32, help="decode steps timed per round")
    parser.add_argument("--rounds", type=int, default=2, help="alternating dense/skip rounds")
    parser.add_argument("--cal-tokens", type=int, default=256)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--backends", default="torch", help="torch, onnx or both (comma-separated)")
    parser.add_argument("--ppl-tokens", type=int, default=0,
                        help="also the WikiText-2 perplexity on this many test tokens (SmolLM2; 4096 = quality table)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    targets = {k: float(v) for k, v in (kv.split("=") for kv in args.targets.split(","))}
    backends = tuple(args.backends.split(","))
    rows = [bench(m, targets.get(m, 0.3), args.steps, args.rounds, args.cal_tokens, int(b), backends, args.threads,
                  args.ppl_tokens)
            for m in args.models.split(",") for b in args.batches.split(",")]
    if args.json:
        print(json.dumps({"threads": args.threads, "rows": rows}, indent=2))
        return
    print(f"{args.threads} thread(s), {args.steps} decode steps, best of {args.rounds} rounds")
    print("| model | backend | batch | dense tok/s | skip-ffn tok/s (decode skip) | speed-up best / median "
          "| greedy agree | spec |")
    print("|---|---|---:|---:|---:|---:|---:|---|")
    for r in rows:
        for backend, b in r["by_backend"].items():
            print(f"| {r['model']} | {backend} | {r['batch']} | {b['dense_tok_s']:.2f} | {b['skip_tok_s']:.2f} "
                  f"({r['decode_skip_fraction']:.3f}) | {b['speedup']:.3f}x / {b['median_speedup']:.3f}x "
                  f"| {b['greedy_agreement']:.2f} | {r['spec']} |")
    for r in rows:
        if "ppl" in r:
            p = r["ppl"]
            print(f"{r['model']} batch {r['batch']}: WikiText-2 ppl on {p['tokens']} tokens: dense {p['dense']:.3f}, "
                  f"skip-ffn {p['skip-ffn']:.3f} ({p['skip-ffn'] / p['dense'] - 1:+.1%})")


if __name__ == "__main__":
    main()
