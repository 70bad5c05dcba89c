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

Evaluation is teacher-forced with full-sequence forwards: the policy applies to positions >= warmup
and each token's decision depends only on its own row, so this equals token-by-token decoding. The
skip fraction is measured on the evaluation tokens in the same forward and is the fraction of all
FFN blocks (every layer, every token, cold layers included) that did not run.

    python benchmarks/skip_ffn_quality.py [--docs 50] [--targets 0.1,0.2,0.3] [--json]
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


def _text_data(args):
    model, tok = load(args.model)
    need = args.cal_start + max(args.tokens, args.train_tokens)
    text = open(args.text, encoding="utf-8").read()  # noqa: SIM115
    chars = need * 8
    ids = tok.encode(text[:chars], bos=True, eos=False)
    while len(ids) < need and chars < len(text):
        chars *= 2
        ids = tok.encode(text[:chars], bos=True, eos=False)
    if len(ids) < need:
        msg = f"--text gives {len(ids)} tokens; --cal-start + --tokens needs {need}."
        raise ValueError(msg)
    cal = torch.tensor([ids[args.cal_start : args.cal_start + args.tokens]])
    train_ids = torch.tensor([ids[args.cal_start : args.cal_start + args.train_tokens]])
    return model, tok, [ids[: args.tokens]], cal, args.tokens, train_ids


def run(args) -> dict:
    torch.manual_seed(0)
    t0 = time.perf_counter()
    model, tok, docs, cal_ids, context, train_ids = (_text_data if args.model else _stories_data)(args)
    gm = condfx.capture(model, (cal_ids[:1, :16].expand(2, -1).contiguous(),))  # B=2: not specialized
    n_ffn = len(condfx.patterns.find_regions(gm).ffn)
    # the prompt must be longer than the calibrated warm-up, or the policy never runs in generation
    prompt = docs[0][: args.prompt_tokens] if args.model else tok.encode(_PROMPT, bos=True, eos=False)
    dense_tokens = _greedy(model, "fuse-attention", prompt, args.greedy) if args.greedy else []
    dense = perplexity(_Counted(gm, n_ffn), docs, context=context).ppl
    rows = [{"target": 0.0, "spec": "dense", "ppl": dense, "rel_ppl": 0.0, "skip_fraction": 0.0,
             "greedy_agreement": 1.0, "greedy_prefix": len(dense_tokens)}]
    policies = args.policies.split(",")
    targets = [float(t) for t in args.targets.split(",")]
    if "similarity" in policies:
        cos = layer_cosines(gm, cal_ids)
        for target in targets:
            cal = calibrate_similarity(gm, cal_ids, target_skip=target, cosines=cos)
            rows.append(_evaluate(args, model, gm, cal.spec(), "similarity", target, docs, context, n_ffn, dense,
                                  prompt, dense_tokens, calibration_skip=cal.measured_skip, warmup=cal.warmup))
    if "forecast" in policies:
        rows += _forecast_rows(args, model, gm, cal_ids, train_ids, targets, docs, context, n_ffn, dense,
                               prompt, dense_tokens)
    return {"model": args.model or "stories260K.bin", "text": args.text or "tinystories_valid_head.txt",
            "eval_tokens": sum(len(d) for d in docs), "calibration_tokens": list(cal_ids.shape),
            "train_tokens": list(train_ids.shape), "greedy_tokens": args.greedy,
            "seconds": round(time.perf_counter() - t0, 1), "rows": rows}


def _evaluate(args, model, gm, spec, policy, target, docs, context, n_ffn, dense, prompt, dense_tokens,
              rewritten=None, **extra) -> dict:
    """Perplexity, measured skip fraction and greedy agreement of one skip-ffn spec."""
    counted = _Counted(rewritten if rewritten is not None else condfx.apply(gm, spec).graph_module, n_ffn)
    ppl = perplexity(counted, docs, context=context).ppl
    row = {"policy": policy, "target": target, "spec": spec, "ppl": ppl, "rel_ppl": ppl / dense - 1,
           "skip_fraction": counted.fraction, **extra}
    if args.greedy:
        new = _greedy(model, f"fuse-attention, {spec}", prompt, args.greedy)
        row["greedy_agreement"], row["greedy_prefix"] = _agreement(dense_tokens, new)
        row["greedy_prompt_len"] = len(prompt)
    return row


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
    for target in targets:
        t0 = time.perf_counter()
        if trained is None or args.retrain:
            trained = condfx.apply(gm, base + "}").graph_module
            fit = forecast.fit_forecasters(trained, train_ids[:, : args.fit_tokens])
            train_target = target if args.retrain else args.train_target
            result = forecast.train_routers(trained, train_ids, target_skip=train_target, steps=args.steps,
                                            seq_len=args.seq_len, batch_size=1, lr=args.lr)
            fit_explained = sum(fit.values()) / len(fit)
            losses = result.losses
        work = copy.deepcopy(trained)
        cal_skip = forecast.set_skip_fraction(work, cal_ids[:, : args.fc_cal_tokens], target)
        path = tmp / f"state_{target}.safetensors"
        forecast.save_state(work, path)
        spec = base + f',state="{path}"}}'
        rows.append(_evaluate(args, model, gm, spec, "forecast", target, docs, context, n_ffn, dense, prompt,
                              dense_tokens, rewritten=work, calibration_skip=cal_skip,
                              trained_at=train_target, forecast_r2=fit_explained,
                              train_loss_first_last=[losses[0], sum(losses[-10:]) / len(losses[-10:])],
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
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args()
    if bool(args.model) != bool(args.text):
        parser.error("--model and --text go together.")
    result = run(args)
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"{result['model']} on {result['text']}: {result['eval_tokens']} tokens scored, "
          f"calibration {result['calibration_tokens']}, {result['seconds']} s")
    print("| policy | target | ppl | rel. ppl | skip fraction (eval) | greedy agree / prefix | spec |")
    print("|---|---:|---:|---:|---:|---:|---|")
    for r in result["rows"]:
        agree = f"{r.get('greedy_agreement', float('nan')):.2f} / {r.get('greedy_prefix', '-')}"
        print(f"| {r.get('policy', 'dense')} | {r['target']:.2f} | {r['ppl']:.3f} | {100 * r['rel_ppl']:+.2f}% "
              f"| {r['skip_fraction']:.3f} | {agree} | {r['spec']} |")


if __name__ == "__main__":
    main()
