"""skip-ffn quality on stories260K: perplexity and measured FFN skip fraction per calibrated target.

Calibrates ``skip-ffn`` (``condfx.calibrate.calibrate_similarity``) on stories 50-57 of
``tinystories_valid_head.txt`` (8 x 128 tokens) for each target, then scores the first ``--docs``
stories (``documents_to_ids``, BOS per story) with ``condfx.eval.perplexity`` on the dense graph and
on each rewritten graph (full-sequence forwards: the policy applies to positions >= warmup; each
token's decision depends only on its own row, so this equals token-by-token decoding). The skip
fraction is measured on the evaluation stories with ``measure_skip_fraction`` and is the fraction
of all FFN blocks (every layer, every token, cold layers included) that did not run.

    python benchmarks/skip_ffn_quality.py [--docs 50] [--targets 0.1,0.2,0.3] [--json]
"""

from __future__ import annotations

import argparse
import json

import torch

import condfx
from condfx.calibrate import calibrate_similarity
from condfx.data import data_file
from condfx.eval.perplexity import documents_to_ids, perplexity
from condfx.models_zoo import load
from condfx.passes.skip_ffn import measure_skip_fraction

_CAL_DOCS, _CAL_LEN = 8, 128


class _Logits(torch.nn.Module):
    """Wraps a captured graph so ``forward(ids)`` returns the logits tensor."""

    def __init__(self, gm):
        super().__init__()
        self.gm = gm

    def forward(self, ids):
        out = self.gm(ids)
        return out[0] if isinstance(out, (tuple, list)) else out


def _skip_fraction(gm, docs) -> float:
    skipped = total = 0.0
    for doc in docs:
        stats = measure_skip_fraction(gm, torch.tensor([doc]))
        skipped += stats["fraction_of_all_ffn"] * len(doc)
        total += len(doc)
    return skipped / total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=int, default=50)
    parser.add_argument("--targets", default="0.1,0.2,0.3")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args()
    torch.manual_seed(0)
    model, tok = load(data_file("stories260K.bin"))
    text = data_file("tinystories_valid_head.txt").read_text(encoding="utf-8")
    all_docs = documents_to_ids(text, tok, max_docs=args.docs + 2 * _CAL_DOCS)
    docs = all_docs[: args.docs]
    cal_docs = [d for d in all_docs[args.docs :] if len(d) >= _CAL_LEN][:_CAL_DOCS]
    cal_ids = torch.tensor([d[:_CAL_LEN] for d in cal_docs])
    gm = condfx.capture(model, (cal_ids[:2, :16].contiguous(),))
    rows = [{"target": 0.0, "spec": "dense", "ppl": perplexity(_Logits(gm), docs, context=512).ppl,
             "skip_fraction": 0.0}]
    for target in (float(t) for t in args.targets.split(",")):
        cal = calibrate_similarity(gm, cal_ids, target_skip=target)
        rewritten = condfx.apply(gm, cal.spec()).graph_module
        ppl = perplexity(_Logits(rewritten), docs, context=512).ppl
        rows.append({"target": target, "spec": cal.spec(), "ppl": ppl,
                     "skip_fraction": _skip_fraction(rewritten, docs),
                     "calibration_skip": cal.measured_skip, "profile": list(cal.profile)})
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print("| target | ppl | skip fraction (eval) | spec |\n|---:|---:|---:|---|")
    for r in rows:
        print(f"| {r['target']:.2f} | {r['ppl']:.3f} | {r['skip_fraction']:.3f} | {r['spec']} |")


if __name__ == "__main__":
    main()
