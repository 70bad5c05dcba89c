"""skip-ffn quality: perplexity, measured FFN skip fraction and greedy agreement per calibrated target.

Default (stories260K): calibrates ``skip-ffn`` (``condfx.calibrate.calibrate_similarity``) on stories
50-57 of ``tinystories_valid_head.txt`` (8 x 128 tokens) for each target, then scores the first
``--docs`` stories (``documents_to_ids``, BOS per story) with ``condfx.eval.perplexity``.

With ``--model PATH --text FILE`` (e.g. SmolLM2 on WikiText-2): the text is encoded once; the first
``--tokens`` tokens (BOS included) are scored as one window, and calibration uses a different span,
tokens ``--cal-start`` .. ``--cal-start + --tokens``. Also reports agreement of the first
``--greedy`` greedy tokens with the dense model for one prompt, the first ``--prompt-tokens``
text tokens (runtime Session, KV cache); the prompt must be longer than the calibrated warm-up
(5-10% of the calibration length), otherwise generation never reaches the policy.

``--calib-text FILE`` (with ``--model``) takes every calibration and training token from another file
(its first tokens), so nothing the policies learn from is scored; ``--context`` scores the ``--tokens``
in windows of that length, each advancing by the whole window (``perplexity(..., stride=context)``).

Policies (``--policies``, one frontier): ``similarity``, ``forecast`` (routers trained with the LM loss),
``oracle`` (``condfx.forecast.OraclePolicy``: each routed FFN's row takes the forecast when the
oracle's local cost on the current stream is under its layer's cut; the cuts come from the budget
allocation on the calibration labels; it computes every FFN to decide, so it bounds what a router
reading the same features could do, and it is benchmark-only) and ``oracle-taught`` (the forecast
policy's routers fitted to the oracle's labels, per-layer cuts from the same allocation, then one
common shift to the target; a ``state`` file the ``skip-ffn{policy=forecast}`` graph reads). Each row
carries its calibration time (wall and process CPU seconds): for the oracle and its pupil, the
forecaster fit and the labels are shared by all targets and counted in every row.

Evaluation is teacher-forced with full-sequence forwards: the policy applies to positions >= warmup
and each token's decision depends only on its own row, so this equals token-by-token decoding. The
skip fraction is measured on the evaluation tokens in the same forward and is the fraction of all
FFN blocks (every layer, every token, cold layers included) that did not run.

    python benchmarks/skip_ffn_quality.py [--docs 50] [--targets 0.1,0.2,0.3] [--json] [--png F.png]
    python benchmarks/skip_ffn_quality.py --policies similarity,forecast,oracle-taught,oracle \
        --model <data>/SmolLM2-135M-Instruct.Q4_1.gguf --text <data>/wikitext2_raw_test.txt \
        --calib-text <data>/paul_graham_essays.txt --tokens 4096 --context 2048 --json
    python benchmarks/skip_ffn_quality.py --model <data>/SmolLM2-135M-Instruct.Q4_1.gguf \\
        --text <data>/wikitext2_raw_test.txt --targets 0.1,0.2,0.3,0.4 [--json]
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from torch import fx

import condfx
from condfx.calibrate import calibrate_similarity, layer_cosines
from condfx.data import data_file
from condfx.eval.perplexity import documents_to_ids, perplexity
from condfx.models_zoo import load
from condfx.passes.skip_ffn import is_countdown_ffn, is_masked_ffn
from condfx.passes.skip_ffn_policy import execute_mask

_CAL_DOCS, _CAL_LEN = 8, 128
_PROMPT = "The history of the city begins in the Middle Ages, when"


class _Counted(torch.nn.Module):
    """``forward(ids)`` returns the logits of ``gm`` and counts the rows its masked FFNs skipped."""

    def __init__(self, gm: fx.GraphModule, n_ffn: int):
        super().__init__()
        self.gm, self.n_ffn = gm, n_ffn
        self.skipped = self.blocks = 0

    def forward(self, ids):
        counter = self

        class _Interp(fx.Interpreter):
            def run_node(self, node):
                out = super().run_node(node)
                if is_masked_ffn(node) or is_countdown_ffn(node):
                    counter.skipped += int((~execute_mask(node, self.env, out)).sum())
                return out

        out = _Interp(self.gm).run(ids)
        self.blocks += ids.numel() * self.n_ffn
        return out[0] if isinstance(out, (tuple, list)) else out

    @property
    def fraction(self) -> float:
        return self.skipped / self.blocks if self.blocks else 0.0


def _greedy(model, spec: str, prompt: list[int], n: int) -> list[int]:
    from condfx.runtime import Session, generate

    session = Session.from_model(model, passes=spec)
    return generate(session, [prompt], max_new_tokens=n, greedy=True)[0]


def _agreement(dense: list[int], other: list[int]) -> tuple[float, int]:
    same = [a == b for a, b in zip(dense, other, strict=False)]
    prefix = next((i for i, s in enumerate(same) if not s), len(same))
    return sum(same) / max(len(dense), 1), prefix


def _stories_data(args):
    model, tok = load(data_file("stories260K.bin"))
    text = data_file("tinystories_valid_head.txt").read_text(encoding="utf-8")
    all_docs = documents_to_ids(text, tok, max_docs=args.docs + 2 * _CAL_DOCS)
    cal_docs = [d for d in all_docs[args.docs :] if len(d) >= _CAL_LEN][:_CAL_DOCS]
    # forecast training text: stories after the scored ones (never scored), one stream
    train_text = text[len(text) // 2 :]
    train_ids = tok.encode(train_text[: args.train_tokens * 6], bos=True, eos=False)[: args.train_tokens]
    return (model, tok, all_docs[: args.docs], torch.tensor([d[:_CAL_LEN] for d in cal_docs]), 512,
            torch.tensor([train_ids]))


def _encode(tok, path: str, need: int, flag: str) -> list[int]:
    text = open(path, encoding="utf-8").read()  # noqa: SIM115
    chars = need * 8
    ids = tok.encode(text[:chars], bos=True, eos=False)
    while len(ids) < need and chars < len(text):
        chars *= 2
        ids = tok.encode(text[:chars], bos=True, eos=False)
    if len(ids) < need:
        msg = f"{flag} gives {len(ids)} tokens; {need} are needed."
        raise ValueError(msg)
    return ids


def _text_data(args):
    model, tok = load(args.model)
    cal_len = args.cal_tokens or args.tokens
    if args.calib_text:
        ids = _encode(tok, args.text, args.tokens, "--text")
        need = max(cal_len, args.train_tokens, args.fit_tokens + args.oracle_tokens)
        cids = _encode(tok, args.calib_text, need, "--calib-text")
        start = 0
    else:
        need = args.cal_start + max(cal_len, args.train_tokens, args.fit_tokens + args.oracle_tokens)
        ids = _encode(tok, args.text, need, "--text")
        cids, start = ids, args.cal_start
    cal = torch.tensor([cids[start : start + cal_len]])
    train_ids = torch.tensor([cids[start : start + max(args.train_tokens, args.fit_tokens + args.oracle_tokens)]])
    return model, tok, [ids[: args.tokens]], cal, args.context or args.tokens, train_ids


def run(args) -> dict:
    torch.manual_seed(0)
    t0 = time.perf_counter()
    model, tok, docs, cal_ids, context, train_ids = (_text_data if args.model else _stories_data)(args)
    gm = condfx.capture(model, (cal_ids[:1, :16].expand(2, -1).contiguous(),))  # B=2: not specialized
    n_ffn = len(condfx.patterns.find_regions(gm).ffn)
    # the prompt must be longer than the calibrated warm-up, or the policy never runs in generation
    prompt = docs[0][: args.prompt_tokens] if args.model else tok.encode(_PROMPT, bos=True, eos=False)
    dense_tokens = _greedy(model, "fuse-attention", prompt, args.greedy) if args.greedy else []
    dense = perplexity(_Counted(gm, n_ffn), docs, context=context, stride=context).ppl
    rows = [_logged({"target": 0.0, "spec": "dense", "ppl": dense, "rel_ppl": 0.0, "skip_fraction": 0.0,
                     "greedy_agreement": 1.0, "greedy_prefix": len(dense_tokens)})]
    policies = args.policies.split(",")
    targets = [float(t) for t in args.targets.split(",")]
    unknown = set(policies) - {"similarity", "forecast", "oracle", "oracle-taught"}
    if unknown:
        msg = f"--policies: unknown {sorted(unknown)}; allowed: similarity, forecast, oracle-taught, oracle."
        raise ValueError(msg)
    for policy in dict.fromkeys(policies):  # in the order given, so a cut-short run has the first ones
        if policy == "similarity":
            rows += _similarity_rows(args, model, gm, cal_ids, targets, docs, context, n_ffn, dense, prompt,
                                     dense_tokens)
        elif policy == "forecast":
            rows += _forecast_rows(args, model, gm, cal_ids, train_ids, targets, docs, context, n_ffn, dense,
                                   prompt, dense_tokens)
        elif not any(r.get("policy", "").startswith("oracle") for r in rows):  # both oracle rows at once
            rows += _oracle_rows(args, model, gm, cal_ids, train_ids, targets, docs, context, n_ffn, dense,
                                 prompt, dense_tokens, policies)
    return {"model": args.model or "stories260K.bin", "text": args.text or "tinystories_valid_head.txt",
            "eval_tokens": sum(len(d) for d in docs), "calibration_tokens": list(cal_ids.shape),
            "train_tokens": list(train_ids.shape), "greedy_tokens": args.greedy,
            "seconds": round(time.perf_counter() - t0, 1), "rows": rows}


def _evaluate(args, model, gm, spec, policy, target, docs, context, n_ffn, dense, prompt, dense_tokens,
              rewritten=None, **extra) -> dict:
    """Perplexity, measured skip fraction and greedy agreement of one skip-ffn spec."""
    counted = _Counted(rewritten if rewritten is not None else condfx.apply(gm, spec).graph_module, n_ffn)
    ppl = perplexity(counted, docs, context=context, stride=context).ppl
    row = {"policy": policy, "target": target, "spec": spec, "ppl": ppl, "rel_ppl": ppl / dense - 1,
           "skip_fraction": counted.fraction, **extra}
    if args.greedy:
        new = _greedy(model, f"fuse-attention, {spec}", prompt, args.greedy)
        row["greedy_agreement"], row["greedy_prefix"] = _agreement(dense_tokens, new)
        row["greedy_prompt_len"] = len(prompt)
    return _logged(row)


def _logged(row: dict) -> dict:
    """Prints ``row`` to stderr as one JSON line as soon as it is measured (a cut-short run keeps it)."""
    import sys

    print("ROW " + json.dumps(row), file=sys.stderr, flush=True)
    return row


def _similarity_rows(args, model, gm, cal_ids, targets, docs, context, n_ffn, dense, prompt, dense_tokens):
    """FFN-SkipLLM calibrated per target (the cosine profile shared by all targets)."""
    clock, rows = _Clock(), []
    cos = layer_cosines(gm, cal_ids)
    shared = clock.split()
    for target in targets:
        cal = calibrate_similarity(gm, cal_ids, target_skip=target, cosines=cos)
        own = clock.split()
        rows.append(_evaluate(args, model, gm, cal.spec(), "similarity", target, docs, context, n_ffn, dense,
                              prompt, dense_tokens, calibration_skip=cal.measured_skip, warmup=cal.warmup,
                              **_calib_time(shared, own)))
        clock.split()
    return rows


class _Clock:
    """Wall and process-CPU seconds since the last ``split``."""

    def __init__(self):
        self.wall, self.cpu = time.perf_counter(), time.process_time()

    def split(self) -> tuple[float, float]:
        wall, cpu = time.perf_counter(), time.process_time()
        out = (wall - self.wall, cpu - self.cpu)
        self.wall, self.cpu = wall, cpu
        return out


def _calib_time(*parts: tuple[float, float]) -> dict:
    return {"calib_s": round(sum(p[0] for p in parts), 1), "calib_cpu_s": round(sum(p[1] for p in parts), 1)}


def _oracle_rows(args, model, gm, cal_ids, train_ids, targets, docs, context, n_ffn, dense, prompt,
                 dense_tokens, policies) -> list[dict]:
    """The oracle and the oracle-taught routers, from one forecaster fit and one set of labels."""
    import copy
    import tempfile
    from pathlib import Path

    from condfx import forecast

    base = (f"skip-ffn{{policy=forecast,rank={args.rank},router_hidden={args.router_hidden},"
            f"cold_start={args.fc_cold},cold_end={args.fc_cold},warmup={args.fc_warmup}")
    tmp = Path(tempfile.mkdtemp(prefix="condfx_oracle_"))
    clock = _Clock()
    graph = condfx.apply(gm, base + "}").graph_module
    fit = forecast.fit_forecasters(graph, train_ids[:, : args.fit_tokens])
    n = args.oracle_tokens // args.oracle_row * args.oracle_row
    start = args.fit_tokens if train_ids.shape[1] >= args.fit_tokens + n else 0  # not the fit's own tokens
    label_ids = train_ids[:, start : start + n].reshape(-1, args.oracle_row)
    labels = forecast.oracle_labels(graph, label_ids)
    shared = clock.split()
    common = {"forecast_r2": sum(fit.values()) / len(fit), "label_tokens": list(label_ids.shape),
              "sensitivity": [round(float(v), 6) for v in labels.sensitivity]}
    rows, taught, fitted = [], None, None
    if "oracle-taught" in policies:
        taught = copy.deepcopy(graph)
        spearman = forecast.fit_routers_to_oracle(taught, labels, steps=args.oracle_steps)
        fitted = clock.split()
        common["spearman_mean"] = sum(spearman.values()) / len(spearman)
    for target in targets:
        clock.split()
        alloc = forecast.allocate(graph, labels, target)
        own = clock.split()
        extra = {**common, "layer_fractions": [round(float(f), 3) for f in alloc.fractions]}
        if "oracle" in policies:
            oracle = forecast.OraclePolicy(graph, alloc)
            ppl = perplexity(oracle, docs, context=context, stride=context).ppl
            rows.append(_logged({"policy": "oracle", "target": target, "spec": "OraclePolicy (benchmark only)",
                                 "ppl": ppl, "rel_ppl": ppl / dense - 1,
                                 "skip_fraction": oracle.skipped / (oracle.rows * n_ffn),
                                 **_calib_time(shared, own), **extra}))
        if taught is not None:
            clock.split()
            work = copy.deepcopy(taught)
            forecast.set_layer_biases(work, labels, alloc)
            cal_skip = forecast.set_skip_fraction(work, cal_ids[:, : args.fc_cal_tokens], target)
            own_t = clock.split()
            path = tmp / f"oracle_taught_{target}.safetensors"
            forecast.save_state(work, path)
            spec = base + f',state="{path}"}}'
            rows.append(_evaluate(args, model, gm, spec, "oracle-taught", target, docs, context, n_ffn, dense,
                                  prompt, dense_tokens, rewritten=work, calibration_skip=cal_skip,
                                  **_calib_time(shared, fitted, own, own_t), **extra))
    return rows


def _forecast_rows(args, model, gm, cal_ids, train_ids, targets, docs, context, n_ffn, dense, prompt,
                   dense_tokens) -> list[dict]:
    """Informed Routing: fit forecasters, train routers at each target (or once), set the bias per target."""
    import copy
    import tempfile
    from pathlib import Path

    from condfx import forecast

    base = (f"skip-ffn{{policy=forecast,rank={args.rank},router_hidden={args.router_hidden},"
            f"cold_start={args.fc_cold},cold_end={args.fc_cold},warmup={args.fc_warmup}")
    tmp = Path(tempfile.mkdtemp(prefix="condfx_forecast_"))
    rows, trained = [], None
    clock, train_time = _Clock(), None
    for target in targets:
        t0 = time.perf_counter()
        clock.split()
        if trained is None or args.retrain:
            trained = condfx.apply(gm, base + "}").graph_module
            fit = forecast.fit_forecasters(trained, train_ids[:, : args.fit_tokens])
            train_target = target if args.retrain else args.train_target
            result = forecast.train_routers(trained, train_ids, target_skip=train_target, steps=args.steps,
                                            seq_len=args.seq_len, batch_size=1, lr=args.lr)
            fit_explained = sum(fit.values()) / len(fit)
            losses = result.losses
            train_time = clock.split()
        work = copy.deepcopy(trained)
        cal_skip = forecast.set_skip_fraction(work, cal_ids[:, : args.fc_cal_tokens], target)
        own = clock.split()
        path = tmp / f"state_{target}.safetensors"
        forecast.save_state(work, path)
        spec = base + f',state="{path}"}}'
        rows.append(_evaluate(args, model, gm, spec, "forecast", target, docs, context, n_ffn, dense, prompt,
                              dense_tokens, rewritten=work, calibration_skip=cal_skip,
                              trained_at=train_target, forecast_r2=fit_explained,
                              train_loss_first_last=[losses[0], sum(losses[-10:]) / len(losses[-10:])],
                              **_calib_time(train_time, own),
                              seconds=round(time.perf_counter() - t0, 1)))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model path (default stories260K with its stories)")
    parser.add_argument("--text", default=None, help="text file (needed with --model)")
    parser.add_argument("--tokens", type=int, default=2048, help="with --model: tokens scored (one window)")
    parser.add_argument("--cal-start", type=int, default=4096, help="with --model: first calibration token")
    parser.add_argument("--prompt-tokens", type=int, default=256,
                        help="with --model: greedy prompt = first N text tokens (keep it above the warm-up)")
    parser.add_argument("--docs", type=int, default=50, help="stories260K: stories scored")
    parser.add_argument("--greedy", type=int, default=64, help="greedy tokens compared with dense (0: off)")
    parser.add_argument("--targets", default="0.1,0.2,0.3")
    parser.add_argument("--policies", default="similarity,forecast")
    parser.add_argument("--train-tokens", type=int, default=8192, help="forecast: training tokens (unscored text)")
    parser.add_argument("--fit-tokens", type=int, default=4096, help="forecast: tokens for the forecaster fit")
    parser.add_argument("--steps", type=int, default=100, help="forecast: router training steps")
    parser.add_argument("--seq-len", type=int, default=256, help="forecast: router training window")
    parser.add_argument("--lr", type=float, default=2e-3, help="forecast: router learning rate")
    parser.add_argument("--rank", type=int, default=64, help="forecast: forecaster rank")
    parser.add_argument("--router-hidden", type=int, default=64, help="forecast: router hidden width")
    parser.add_argument("--fc-cold", type=int, default=1, help="forecast: cold layers at each end")
    parser.add_argument("--fc-warmup", type=int, default=4, help="forecast: warm-up tokens (attention sink)")
    parser.add_argument("--fc-cal-tokens", type=int, default=512, help="forecast: tokens per row to set the bias")
    parser.add_argument("--train-target", type=float, default=0.3, help="forecast: router training target")
    parser.add_argument("--retrain", action="store_true", help="forecast: train the routers at every target")
    parser.add_argument("--calib-text", default=None, help="with --model: take calibration/training tokens from this file")
    parser.add_argument("--context", type=int, default=None, help="with --model: scoring window (default --tokens)")
    parser.add_argument("--cal-tokens", type=int, default=None,
                        help="with --model: calibration tokens (similarity, bias shift; default --tokens)")
    parser.add_argument("--oracle-tokens", type=int, default=1024, help="oracle: tokens labelled")
    parser.add_argument("--oracle-row", type=int, default=128, help="oracle: tokens per labelled row")
    parser.add_argument("--oracle-steps", type=int, default=300, help="oracle-taught: Adam steps per router")
    parser.add_argument("--png", default=None, help="write the frontier plot (ppl vs measured skip) here")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--from-json", default=None,
                        help="render the table (and --png) from saved --json outputs of one model, comma-separated")
    args = parser.parse_args()
    if args.from_json:
        result = merge([json.loads(open(f, encoding="utf-8").read()) for f in args.from_json.split(",")])  # noqa: SIM115
        if args.png:
            _plot(result, args.png)
        print(json.dumps(result, indent=2) if args.json else markdown(result))
        return
    if bool(args.model) != bool(args.text):
        parser.error("--model and --text go together.")
    if (args.calib_text or args.context or args.cal_tokens) and not args.model:
        parser.error("--calib-text, --context and --cal-tokens go with --model.")
    result = run(args)
    if args.png:
        _plot(result, args.png)
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(markdown(result))


def merge(results: list[dict]) -> dict:
    """One result from runs of the same model and text with other policies (one dense row kept)."""
    first = results[0]
    for other in results[1:]:
        same = all(other[k] == first[k] for k in ("model", "text", "eval_tokens"))
        dense = [next(r for r in res["rows"] if r["spec"] == "dense")["ppl"] for res in (first, other)]
        if not same or abs(dense[0] - dense[1]) > 1e-6 * dense[0]:
            msg = "--from-json: the runs scored different models, texts or tokens; merge runs of one setting only."
            raise ValueError(msg)
    rows = [r for r in first["rows"] if r["spec"] == "dense"]
    rows += [r for res in results for r in res["rows"] if r["spec"] != "dense"]
    return {**first, "seconds": round(sum(res["seconds"] for res in results), 1), "rows": rows,
            "runs": [{k: v for k, v in res.items() if k != "rows"} for res in results]}


def markdown(result: dict) -> str:
    """The frontier as a markdown table: one row per (policy, target), in order of measured skip."""
    lines = [f"{result['model']} on {result['text']}: {result['eval_tokens']} tokens scored, "
             f"calibration {result['calibration_tokens']}, {result['seconds']} s",
             "| policy | target | FFN executions skipped (measured) | ppl | rel. ppl | greedy agree / prefix "
             "| calibration s (wall / CPU) |", "|---|---:|---:|---:|---:|---:|---:|"]
    order = {"dense": 0, "similarity": 1, "forecast": 2, "oracle-taught": 3, "oracle": 4}
    for r in sorted(result["rows"], key=lambda r: (order[r.get("policy", "dense")], r["skip_fraction"])):
        shown = "greedy_agreement" in r and result.get("greedy_tokens")
        agree = f"{r['greedy_agreement']:.2f} / {r['greedy_prefix']}" if shown else "-"
        calib = f"{r['calib_s']} / {r['calib_cpu_s']}" if "calib_s" in r else "-"
        lines.append(f"| {r.get('policy', 'dense')} | {r['target']:.2f} | {100 * r['skip_fraction']:.1f}% "
                     f"| {r['ppl']:.3f} | {100 * r['rel_ppl']:+.1f}% | {agree} | {calib} |")
    return "\n".join(lines)


def _plot(result: dict, path: str) -> None:
    """Perplexity against the measured skip fraction, one line per policy (dense at 0)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dense = next(r for r in result["rows"] if r["spec"] == "dense")
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for policy, marker in (("similarity", "s"), ("forecast", "o"), ("oracle-taught", "^"), ("oracle", "*")):
        pts = sorted((r["skip_fraction"], r["ppl"]) for r in result["rows"] if r.get("policy") == policy)
        if pts:
            ax.plot([0.0] + [p[0] for p in pts], [dense["ppl"]] + [p[1] for p in pts], marker=marker, label=policy)
    ax.axhline(dense["ppl"] * 1.05, color="grey", linestyle=":", label="dense +5%")
    ax.axvline(0.2, color="grey", linestyle="--", linewidth=0.8)
    ax.set_yscale("log")
    ax.set_xlabel("fraction of FFN executions skipped (measured on the scored text)")
    ax.set_ylabel("perplexity")
    ax.set_title(f"skip-ffn frontier: {result['model'].rsplit('/', 1)[-1]}", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
