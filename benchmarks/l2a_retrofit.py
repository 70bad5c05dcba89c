"""L2A retrofit (``route-attention{form=select}``): perplexity against the fraction of tokens that skip
global attention, for the oracle-taught router and the oracle itself, with calibration time.

    python benchmarks/l2a_retrofit.py --model M --text T --calib C --window W --context N [--sink 4]
        --targets 0.5,0.6,0.7,0.8 [--correct 128] [--floor F] [--rounds 2] [--refits 1] [--recall W] [--passkey 20 [--passkey-tokens 1024] [--passkey-chat]] [--json] [--out DIR]

Per target skip fraction: perplexity of the original, the window-only model (no token routes: every
token reads its window and the first ``--sink`` tokens), the learned router (``condfx.l2a_retrofit.calibrate_select``) and the oracle router (the
labels as decisions, thresholds allocated the same way; open loop: costs from the all-routed model on
the scored text itself), and the oracle at the learned router's measured skip (per layer, thresholds at
that quantile of the scored text's own costs: the same skip, beside it); the measured skip fraction on the scored text (min over layers, mean); the
calibration's CPU time (``time.process_time``, labels + fit) and wall time. Perplexity: the first
``--eval-tokens`` tokens of ``--text`` (BOS first) in non-overlapping windows of ``--context`` tokens,
each window scored from its second token. Calibration: ``--calib-tokens`` tokens of ``--calib`` in rows
of ``--context`` (taken after the evaluation tokens when ``--calib`` is ``--text``). Passkey (``--passkey
N``, N prompts of ``--passkey-tokens`` tokens from the essays, needle depths spread over [0, 1]): the
5-digit key is retrieved when every key token is the argmax after the question (teacher-forced greedy),
for the original, the learned router and the oracle router at ``--passkey-target`` (its calibrated thresholds,
then exactly the target in every layer of every prompt), with the mean log-probability of the key and
the skip on the passkey prompts. ``--recall W``: the labels add W x the recall cost
(``condfx.l2a_retrofit.recall_costs``; the passkey oracle leaves the key out of it). Writes a markdown table and a PNG
(matplotlib) of perplexity against skip to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import condfx
from condfx.data import data_file
from condfx.l2a import l2a_view
from condfx.l2a_retrofit import (
    OracleRouter,
    calibrate_select,
    copy_rows,
    fit_corrections,
    forced_routes,
    oracle_costs,
    oracle_labels,
    select_layers,
    set_forced_routes,
)
from condfx.models_zoo import load


def _read(path: str) -> str:
    p = Path(path)
    if not p.exists():
        p = data_file(path)
    return p.read_text(encoding="utf-8")


def _chunks(ids: list[int], context: int, n_tokens: int) -> list[torch.Tensor]:
    ids = ids[:n_tokens]
    return [torch.tensor(ids[i : i + context])[None] for i in range(0, len(ids) - 1, context) if len(ids[i : i + context]) > 1]


def _nll(logits: torch.Tensor, ids: torch.Tensor) -> tuple[float, int]:
    lp = F.cross_entropy(logits[0, :-1].double(), ids[0, 1:], reduction="sum")
    return float(lp), ids.shape[1] - 1


def _ppl(model, chunks) -> float:
    total = n = 0
    with torch.no_grad():
        for c in chunks:
            out = model(c)
            out = out[0] if isinstance(out, (tuple, list)) else out
            s, k = _nll(out, c)
            total, n = total + s, n + k
    return math.exp(total / n)


def _ppl_routed(sel, chunks) -> tuple[float, list[float]]:
    """Perplexity of the select graph and its skip fraction per layer on ``chunks``."""
    view = l2a_view(sel, "route")
    total = n = 0
    skipped = None
    with torch.no_grad():
        for c in chunks:
            logits, *routes = view(c)
            s, k = _nll(logits, c)
            total, n = total + s, n + k
            now = torch.tensor([float((~r).sum()) for r in routes])
            skipped = now if skipped is None else skipped + now
    count = sum(c.numel() for c in chunks)
    return math.exp(total / n), (skipped / count).tolist()


def _ppl_oracle(forced, chunks, eval_costs, thresholds) -> tuple[float, list[float]]:
    total = n = 0
    skipped = torch.zeros(len(thresholds))
    with torch.no_grad():
        for c, costs in zip(chunks, eval_costs, strict=True):
            routes = [(torch.log(x.double() + 1e-4) >= t).reshape(1, -1) for x, t in zip(costs, thresholds, strict=True)]
            set_forced_routes(forced, routes)
            s, k = _nll(forced(c), c)
            total, n = total + s, n + k
            skipped += torch.tensor([float((~r).sum()) for r in routes])
    count = sum(c.numel() for c in chunks)
    return math.exp(total / n), (skipped / count).tolist()


def _oracle_at(skip: list[float], eval_costs) -> list[float]:
    """Per-layer thresholds on the scored text's own true log costs that skip the fractions ``skip``
    (the oracle at the learned router's measured skip, layer by layer)."""
    thresholds = []
    for j, frac in enumerate(skip):
        y = torch.cat([torch.log(costs[j].double() + 1e-4) for costs in eval_costs]).sort().values
        k = int(round(frac * y.numel()))
        thresholds.append(float(y[k]) if k < y.numel() else math.inf)
    return thresholds


_CHAT_HEAD = ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
              "<|im_start|>user\nThere is a pass key hidden inside a lot of irrelevant text. Find it and memorize it.\n")
_CHAT_TAIL = "\nWhat is the pass key?<|im_end|>\n<|im_start|>assistant\nThe pass key is"


def chat_passkey_prompt(tok, essays: str, key: int, n_tokens: int, depth: float) -> list[int]:
    """The passkey prompt of ``condfx.eval.tasks.make_passkey_prompt`` (the essays, the needle at word
    boundary ``depth``) inside a ChatML user turn (SmolLM2-Instruct's template), the answer started."""
    from condfx.eval.tasks import _fit_words

    needle = f" The pass key is {key:05d}. Remember it. {key:05d} is the pass key."
    fixed = len(tok.encode(_CHAT_HEAD + needle + _CHAT_TAIL, bos=True, eos=False))
    words = _fit_words(tok, essays.split(), n_tokens - fixed)
    cut = round(depth * len(words))
    text = _CHAT_HEAD + " ".join(words[:cut]) + needle + " " + " ".join(words[cut:]) + _CHAT_TAIL
    return tok.encode(text, bos=True, eos=False)


def _passkey(model, tok, essays: str, trials: int, n_tokens: int, seed: int = 0, chat: bool = False,
             exact: int = 0) -> dict:
    """Passkey retrieval of ``model`` on ``trials`` prompts (the key teacher-forced after the prompt):
    the fraction whose every key token is the argmax, the mean log-probability of the key, and, when
    the model keeps ``routes`` (per layer the (1, T) route mask of its last call), the fraction of the prompt
    tokens past ``exact`` (those with keys outside their window) that skipped global attention, the
    least over layers and the mean: the skip of the passkey text, which the thresholds set on the
    calibration text do not fix."""
    from condfx.eval.tasks import make_passkey_prompt

    rng = random.Random(seed)
    hits, logprob, skipped = 0, 0.0, []
    with torch.no_grad():
        for i in range(trials):
            key = rng.randrange(10000, 100000)
            depth = i / max(1, trials - 1)
            build = chat_passkey_prompt if chat else make_passkey_prompt
            prompt = build(tok, essays, key, n_tokens, depth)
            answer = torch.tensor(tok.encode(f" {key:05d}", bos=False, eos=False))
            ids = torch.tensor(prompt + answer.tolist())[None]
            if hasattr(model, "scored_until"):  # an oracle must not rank by how well the key is predicted
                model.scored_until = len(prompt)
            out = model(ids)
            out = out[0] if isinstance(out, (tuple, list)) else out
            lp = out[0, len(prompt) - 1 : len(prompt) - 1 + len(answer)].float().log_softmax(-1)
            hits += bool((lp.argmax(-1) == answer).all())
            logprob += float(lp.gather(-1, answer[:, None]).sum())
            if hasattr(model, "routes"):
                skipped.append([float((~r[..., exact : len(prompt)]).double().mean()) for r in model.routes])
    out = {"accuracy": hits / trials, "key_logprob": logprob / trials}
    if skipped:
        per_layer = torch.tensor(skipped).mean(0)
        out |= {"skip_min": float(per_layer.min()), "skip_mean": float(per_layer.mean())}
    return out


class _RoutesOf(torch.nn.Module):
    """The select graph as a model that keeps the route masks of its last call (``routes``)."""

    def __init__(self, sel):
        super().__init__()
        self.view, self.routes = l2a_view(sel, "route"), []

    def forward(self, ids):
        logits, *self.routes = self.view(ids)
        return logits


def run(args) -> dict:
    t_start = time.perf_counter()
    model, tok = load(args.model if Path(args.model).exists() else data_file(args.model))
    model.eval()
    text_ids = tok.encode(_read(args.text), bos=True, eos=False)
    chunks = _chunks(text_ids, args.context, args.eval_tokens)
    if args.calib == args.text:
        calib_ids = text_ids[args.eval_tokens :]
    else:
        calib_ids = tok.encode(_read(args.calib), bos=True, eos=False)
    n_rows = max(1, min(args.calib_tokens, len(calib_ids)) // args.context)
    calib = [torch.tensor(calib_ids[i * args.context : (i + 1) * args.context])[None] for i in range(n_rows)]
    gm = condfx.capture(model, (torch.zeros(2, 16, dtype=torch.long),))
    spec = (f"route-attention{{form=select,window={args.window},sink={args.sink},correct={args.correct},"
            f"router={args.router}}}")
    sel = condfx.apply(gm, spec).graph_module
    rows = []
    base = {"original": _ppl(gm, chunks)}
    print(f"original ppl {base['original']:.3f} ({time.perf_counter() - t_start:.0f} s)", flush=True)
    base["window-only"] = _ppl(_never_routed(sel), chunks) if args.window_only else float("nan")
    print(f"window-only ppl {base['window-only']:.3f} ({time.perf_counter() - t_start:.0f} s)", flush=True)
    c0, w0 = time.process_time(), time.perf_counter()
    corrected = fit_corrections(sel, calib)
    recall = args.recall > 0
    labels = oracle_labels(sel, calib, progress=lambda d, t: print(f"  labels {d}/{t} ({time.perf_counter() - t_start:.0f} s)", flush=True),
                           corrections=corrected, recall=recall)
    teach = oracle_labels(sel, copy_rows(calib, args.window), recall=recall) if args.copy_rows else None
    label_cpu, label_wall = time.process_time() - c0, time.perf_counter() - w0
    eval_labels = [oracle_labels(sel, [c], recall=recall) for c in chunks]
    forced = forced_routes(sel)
    passkey = {}
    for target in args.targets:
        floor = min(target, args.floor) if args.floor else None
        c1, w1 = time.process_time(), time.perf_counter()
        cal = calibrate_select(sel, calib, skip=target, floor=floor, labels=labels, rounds=args.rounds,
                               refits=args.refits, teach=teach, recall=args.recall)
        fit_cpu, fit_wall = time.process_time() - c1, time.perf_counter() - w1
        eval_costs = [oracle_costs(sel, lab) for lab in eval_labels]
        learned, skip = _ppl_routed(sel, chunks)
        oracle, oskip = _ppl_oracle(forced, chunks, eval_costs, cal.oracle_thresholds)
        same, sskip = _ppl_oracle(forced, chunks, eval_costs, _oracle_at(skip, eval_costs))
        row = {"target": target, "floor": floor or target, "learned_ppl": learned, "learned_skip_min": min(skip),
               "learned_skip_mean": sum(skip) / len(skip), "learned_skip": skip,
               "oracle_ppl": oracle, "oracle_skip_min": min(oskip), "oracle_skip_mean": sum(oskip) / len(oskip),
               "oracle_same_ppl": same, "oracle_same_skip_min": min(sskip),
               "oracle_same_skip_mean": sum(sskip) / len(sskip),
               "calib_cpu_s": label_cpu + fit_cpu, "calib_wall_s": label_wall + fit_wall,
               "correlation_mean": sum(cal.correlation) / len(cal.correlation), "calib_skip_min": min(cal.skip),
               "head_ridges": list(cal.ridges)}
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "learned_skip"}), flush=True)
        if args.passkey and abs(target - args.passkey_target) < 1e-9:
            essays = data_file("paul_graham_essays.txt").read_text(encoding="utf-8")
            exact = args.window + args.sink
            common = {"essays": essays, "trials": args.passkey, "n_tokens": args.passkey_tokens, "chat": args.passkey_chat}
            passkey = {"target": target, "trials": args.passkey, "tokens": args.passkey_tokens,
                       "format": "chat" if args.passkey_chat else "plain",
                       "original": _passkey(gm, tok, **common),
                       "learned": _passkey(_RoutesOf(sel), tok, **common, exact=exact),
                       "oracle": _passkey(OracleRouter(sel, forced), tok, **common, exact=exact),
                       "oracle_exact": _passkey(OracleRouter(sel, forced, skip=target), tok, **common, exact=exact)}
            print(json.dumps(passkey), flush=True)
    return {"model": args.model, "text": args.text, "calib": args.calib, "window": args.window, "sink": args.sink, "correct": args.correct, "router": args.router,
            "recall": args.recall,
            "corrected_layers": len(corrected.layers) if corrected else 0,
            "copy_rows": args.copy_rows, "rounds": args.rounds, "refits": args.refits,
            "context": args.context, "eval_tokens": sum(c.numel() for c in chunks),
            "calib_tokens": sum(c.numel() for c in calib), "layers": len(select_layers(sel)),
            **{f"{k}_ppl": v for k, v in base.items()}, "rows": rows, "passkey": passkey,
            "seconds": time.perf_counter() - t_start, "process_cpu_s": time.process_time()}


def _never_routed(sel):
    """A copy of the select model where no token routes: the window branch (and its sinks) alone."""
    import copy

    from condfx.patterns.routed import find_routed_layers

    never = copy.deepcopy(sel)
    with torch.no_grad():
        for r in find_routed_layers(never):
            r.state.threshold.fill_(float("inf"))
    return never


def table(out: dict) -> str:
    lines = [f"{out['model']}, window {out['window']}, context {out['context']}: perplexity on the first "
             f"{out['eval_tokens']} tokens of {out['text']} (original {out['original_ppl']:.3f}, window+{out.get('sink', 0)} sinks only "
             f"{out['window-only_ppl']:.3f}); calibration on {out['calib_tokens']} tokens of {out['calib']}; labels: the "
             + (f"cost + {out['recall']:g} x the recall cost" if out.get("recall") else "layer-local cost"), "",
             "| target skip | learned ppl | Δ vs original | skip min / mean (learned) | oracle ppl at the learned skip | Δ | "
             "oracle ppl, calibrated thresholds | skip min / mean (oracle) | calibration CPU s / wall s |",
             "|---:|---:|---:|---|---:|---:|---:|---|---|"]
    for r in out["rows"]:
        delta = r["learned_ppl"] / out["original_ppl"] - 1
        lines.append(f"| {r['target']:.2f} | {r['learned_ppl']:.3f} | {delta:+.1%} | {r['learned_skip_min']:.3f} / "
                     f"{r['learned_skip_mean']:.3f} | {r['oracle_same_ppl']:.3f} | "
                     f"{r['oracle_same_ppl'] / out['original_ppl'] - 1:+.1%} | {r['oracle_ppl']:.3f} | {r['oracle_skip_min']:.3f} / "
                     f"{r['oracle_skip_mean']:.3f} | {r['calib_cpu_s']:.0f} / {r['calib_wall_s']:.0f} |")
    pk = out.get("passkey")
    if pk:
        lines += ["", f"Passkey ({pk['trials']} {pk.get('format', 'plain')} prompts of {pk['tokens']} tokens, thresholds of "
                  f"target {pk['target']:.2f}; skip = fraction of the prompt tokens with keys outside the window that "
                  "skipped, on the passkey prompts):", "",
                  "| model | accuracy | mean log p(key) | skip min / mean |", "|---|---:|---:|---|"]
        names = {"original": "original", "learned": "learned router", "oracle": "oracle router (calibrated thresholds)",
                 "oracle_exact": f"oracle router, {pk['target']:.2f} skipped in every layer of every prompt"}
        for key, name in names.items():
            r = pk.get(key)
            if r is not None:
                skip = f"{r['skip_min']:.3f} / {r['skip_mean']:.3f}" if "skip_min" in r else "-"
                lines.append(f"| {name} | {r['accuracy']:.2f} | {r['key_logprob']:.2f} | {skip} |")
    return "\n".join(lines)


def plot(out: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    rows = out["rows"]
    ax.plot([r["learned_skip_mean"] for r in rows], [r["learned_ppl"] for r in rows], "o-", label="learned router")
    ax.plot([r["oracle_skip_mean"] for r in rows], [r["oracle_ppl"] for r in rows], "s--", label="oracle router")
    ax.axhline(out["original_ppl"], color="k", lw=1, label="original")
    ax.axhline(out["window-only_ppl"], color="r", lw=1, ls=":", label=f"window + {out.get('sink', 0)} sinks only")
    ax.set_xlabel("fraction of tokens skipping global attention (mean over layers)")
    ax.set_ylabel("perplexity")
    values = [out["original_ppl"], out["window-only_ppl"]] + [r[k] for r in rows for k in ("learned_ppl", "oracle_ppl")]
    values = [v for v in values if v == v]  # the window-only baseline may be skipped (nan)
    if max(values) > 3 * min(values):
        ax.set_yscale("log")
    ax.set_title(f"L2A retrofit, window {out['window']}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="stories260K.bin", help="model file (GGUF, llama2.c) or data file name")
    parser.add_argument("--text", default="tinystories_valid_head.txt", help="scored text (path or data file name)")
    parser.add_argument("--calib", default=None, help="calibration text; default --text after the scored tokens")
    parser.add_argument("--window", type=int, default=64)
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--sink", type=int, default=4, help="first tokens the window branch keeps reading")
    parser.add_argument("--correct", type=int, default=128,
                        help="rank of the window correction (route-attention{correct=R}); 0: none")
    parser.add_argument("--copy-rows", action="store_true",
                        help="also fit the router heads on calibration rows that repeat their first half")
    parser.add_argument("--targets", default="0.5,0.6,0.7,0.8")
    parser.add_argument("--floor", type=float, default=None, help="per-layer least skip (default: the target)")
    parser.add_argument("--rounds", type=int, default=2, help="closed-loop threshold rounds (calibrate_select)")
    parser.add_argument("--refits", type=int, default=1, help="closed-loop refits of the router heads (calibrate_select)")
    parser.add_argument("--eval-tokens", type=int, default=4096)
    parser.add_argument("--calib-tokens", type=int, default=8192)
    parser.add_argument("--router", choices=("input", "window"), default="input",
                        help="what the routers read: the attention input, or it and the window output")
    parser.add_argument("--recall", type=float, default=0.0,
                        help="weight of the recall cost in the oracle labels (calibrate_select(recall=...)); 0: none")
    parser.add_argument("--passkey", type=int, default=0, help="passkey prompts (0: none)")
    parser.add_argument("--passkey-tokens", type=int, default=2048)
    parser.add_argument("--passkey-chat", action="store_true",
                        help="passkey prompts in a ChatML user turn (instruct models)")
    parser.add_argument("--passkey-target", type=float, default=0.6)
    parser.add_argument("--no-window-only", dest="window_only", action="store_false",
                        help="skip the window-only baseline (two forwards per scored window)")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--out", default=None, help="folder for table.md, result.json and plot.png")
    args = parser.parse_args()
    args.calib = args.calib or args.text
    args.targets = [float(x) for x in args.targets.split(",")]
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    out = run(args)
    text = table(out)
    if args.out:
        folder = Path(args.out)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "table.md").write_text(text + "\n")
        (folder / "result.json").write_text(json.dumps(out, indent=2))
        plot(out, folder / "plot.png")
    print(json.dumps(out, indent=2) if args.json else text)


if __name__ == "__main__":
    main()
