"""KV-cache quantization quality: perplexity with the quantized cache in the loop, per method and bits,
with KV bytes per token and the compression against an fp16 cache; a PNG of the frontier.
``--sink N`` keeps the first N tokens (the attention sink) in full precision in every method.
``--methods`` picks methods, ``--rotate`` adds each row again with ``rotate=true`` (fixed Hadamard),
``--kv-bits 3/2,4/2`` adds kivi and xquant (SVD latent) rows with separate K / V bits, ``--configs "a;b"`` adds
one row per ``quantize-kv`` option string, optionally labelled ``label:options`` (e.g.
``K3/V2 rot:method=kivi,bits=2,k_bits=3,rotate=true,group=64``).

Each ``quantize-kv`` graph is evaluated teacher-forced: one full-sequence forward in which every
token attends to the quantized cache of the tokens before it (the full-precision residual window
of the most recent tokens excepted), exactly what token-by-token decoding with the runtime cache
sees (``tests/passes/test_quantize_kv.py`` checks this against the Session on stories260K).

Rows: the dense model (fp32 cache), the fp16 cache (``kivi`` with bits=16: K/V rounded to fp16),
then every method x bits x group. Bytes per token are over all layers at the scored length
(``--tokens``, or 512 for stories), the full-precision tail counted as fp16.

    python benchmarks/kv_quant_quality.py [--docs 50] [--json] [--plot kv_stories.png]
    python benchmarks/kv_quant_quality.py --model <data>/SmolLM2-135M-Instruct.Q4_1.gguf \\
        --text <data>/wikitext2_raw_test.txt --tokens 2048 --groups 32,128 --plot kv_smollm2.png
"""

from __future__ import annotations

import argparse
import json
import time

import torch

import condfx
from condfx.data import data_file
from condfx.eval.perplexity import documents_to_ids, perplexity
from condfx.models_zoo import load

METHODS = ("kivi", "xquant", "xquant-cl")


class _Logits(torch.nn.Module):
    def __init__(self, gm):
        super().__init__()
        self.gm = gm

    def forward(self, ids):
        out = self.gm(ids)
        return out[0] if isinstance(out, (tuple, list)) else out


def _data(args):
    if not args.model:
        model, tok = load(data_file("stories260K.bin"))
        text = data_file("tinystories_valid_head.txt").read_text(encoding="utf-8")
        return model, documents_to_ids(text, tok, max_docs=args.docs), 512
    model, tok = load(args.model)
    text = open(args.text, encoding="utf-8").read()  # noqa: SIM115
    if args.offset:  # a later window of the text (a held-out segment), still opened by BOS
        body = tok.encode(text[: (args.offset + args.tokens) * 12], bos=False, eos=False)
        bos = tok.encode("", bos=True, eos=False)
        ids = bos + body[args.offset : args.offset + args.tokens - len(bos)]
    else:
        ids = tok.encode(text[: args.tokens * 12], bos=True, eos=False)[: args.tokens]
    if len(ids) < args.tokens:
        msg = f"--text gives {len(ids)} tokens; --tokens needs {args.tokens}."
        raise ValueError(msg)
    return model, [ids], args.tokens


def _specs(args, context: int):
    base = f"residual={args.residual},context={context},sink={args.sink}"
    yield "dense (fp32 cache)", None
    yield "fp16 cache", f"quantize-kv{{method=kivi,bits=16,{base}}}"
    methods = args.methods.split(",") if args.methods else ()
    pairs = [tuple(int(b) for b in p.split("/")) for p in args.kv_bits.split(",")] if args.kv_bits else []
    for rotate in (False, True) if args.rotate else (False,):
        rot, tag = (",rotate=true", " rot") if rotate else ("", "")
        for group in (int(g) for g in args.groups.split(",")) if methods else ():
            for method in methods:
                for bits in (int(b) for b in args.bits.split(",")) if args.bits else ():
                    yield f"{method}{tag} {bits}-bit g{group}", (
                        f"quantize-kv{{method={method},bits={bits},group={group}{rot},{base}}}"
                    )
                if method == "xquant-cl":
                    continue
                latent = ",latent=svd" if method == "xquant" else ""  # two streams
                for kb, vb in pairs:
                    yield f"{method}{tag} K{kb}/V{vb} g{group}", (
                        f"quantize-kv{{method={method}{latent},bits={vb},k_bits={kb},group={group}{rot},{base}}}"
                    )
    for item in filter(None, (args.configs or "").split(";")):
        label, _, options = item.rpartition(":")
        method = options.split("method=", 1)[1].split(",", 1)[0] if "method=" in options else "xquant"
        yield f"{method}: {label or options}", f"quantize-kv{{{options},{base}}}"


def run(args) -> dict:
    torch.manual_seed(0)
    t0 = time.perf_counter()
    model, docs, context = _data(args)
    example = torch.tensor([docs[0][:16]] * 2)
    gm = condfx.capture(model, (example,))
    if args.calib_text:  # second moments for latent=klt rows, from a text other than the scored one
        from condfx.kv_calibrate import record_kv_stats, text_batches

        tok = load(args.model)[1] if args.model else load(data_file("stories260K.bin"))[1]
        n = record_kv_stats(gm, text_batches(args.calib_text, tok, args.calib_tokens))
        print(f"calibrated on {next(iter(n.values()))} tokens of {args.calib_text}", flush=True)
    rows = []
    for label, spec in _specs(args, context):
        result = condfx.apply(gm, spec) if spec else None
        module = _Logits(result.graph_module if result else gm)
        ppl = perplexity(module, docs, context=context).ppl
        rep = result.reports[-1] if result else None
        fp16 = rep.fp16_bytes_per_token if rep else rows[-1]["fp16_bytes_per_token"] if rows else 0
        row = {"config": label, "spec": spec, "ppl": ppl,
               "kv_bytes_per_token": rep.kv_bytes_per_token if rep else 2 * fp16,
               "fp16_bytes_per_token": fp16}
        rows.append(row)
        print(f"{label}: ppl {ppl:.4f} ({time.perf_counter() - t0:.0f} s)", flush=True)
    rows[0]["fp16_bytes_per_token"] = rows[1]["fp16_bytes_per_token"]
    rows[0]["kv_bytes_per_token"] = 2 * rows[1]["fp16_bytes_per_token"]
    fp16_ppl = rows[1]["ppl"]
    for row in rows:
        row["compression"] = row["fp16_bytes_per_token"] / row["kv_bytes_per_token"]
        row["delta_ppl_vs_fp16"] = row["ppl"] - fp16_ppl
    return {"model": args.model or "stories260K.bin", "text": args.text or "tinystories_valid_head.txt",
            "tokens": sum(len(d) for d in docs), "context": context, "residual": args.residual, "sink": args.sink,
            "seconds": round(time.perf_counter() - t0, 1), "rows": rows}


def plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    fp16 = result["rows"][1]["ppl"]
    for method, marker in zip(METHODS, "os^", strict=True):
        pts = sorted((r["compression"], r["ppl"], r["config"]) for r in result["rows"]
                     if r["config"].split(" ", 1)[0].rstrip(":") == method)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker, label=method, linestyle="none")
        for x, y, name in pts:
            ax.annotate(name.split(" ", 1)[1], (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points")
    ax.axhline(fp16, color="gray", lw=1, label=f"fp16 cache ({fp16:.3f})")
    ax.axhline(fp16 + 0.1, color="gray", lw=1, ls="--", label="fp16 + 0.1")
    ax.axvline(5, color="red", lw=0.8, ls=":", label="5x")
    ax.set_xlabel("KV compression vs fp16 (bytes per token)")
    ax.set_ylabel("perplexity")
    ax.set_yscale("log")
    name = result["model"].rsplit("/", 1)[-1]
    ax.set_title(f"{name}, {result['tokens']} tokens, residual {result['residual']}, sink {result['sink']}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model path (default stories260K with its stories)")
    parser.add_argument("--text", default=None, help="text file (needed with --model)")
    parser.add_argument("--tokens", type=int, default=2048, help="with --model: first N tokens, one window")
    parser.add_argument("--offset", type=int, default=0, help="with --model: start N tokens into the text")
    parser.add_argument("--docs", type=int, default=50, help="stories260K: stories scored")
    parser.add_argument("--groups", default="32", help="group sizes, comma-separated")
    parser.add_argument("--residual", type=int, default=32, help="full-precision window (tokens)")
    parser.add_argument("--sink", type=int, default=0, help="first tokens kept in full precision")
    parser.add_argument("--bits", default="2,3,4", help="bit widths, comma-separated ('' for none)")
    parser.add_argument("--methods", default=",".join(METHODS), help="methods, comma-separated")
    parser.add_argument("--rotate", action="store_true", help="every row also with rotate=true")
    parser.add_argument("--kv-bits", default="", help="K/V bit pairs for kivi and xquant, e.g. 3/2,4/2")
    parser.add_argument("--configs", default="", help="extra rows: quantize-kv options, ';'-separated")
    parser.add_argument("--calib-text", default=None,
                        help="calibration text for latent=klt rows (record_kv_stats), not the scored one")
    parser.add_argument("--calib-tokens", type=int, default=4096, help="calibration tokens (512 per batch)")
    parser.add_argument("--plot", default=None, help="write the frontier PNG here")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args()
    if bool(args.model) != bool(args.text):
        parser.error("--model and --text go together.")
    result = run(args)
    if args.plot:
        plot(result, args.plot)
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"{result['model']} on {result['text']}: {result['tokens']} tokens, {result['seconds']} s")
    print("| cache | ppl | Δ vs fp16 | KV bytes/token | compression vs fp16 |")
    print("|---|---:|---:|---:|---:|")
    for r in result["rows"]:
        print(f"| {r['config']} | {r['ppl']:.3f} | {r['delta_ppl_vs_fp16']:+.3f} "
              f"| {r['kv_bytes_per_token']:.0f} | {r['compression']:.2f}x |")


if __name__ == "__main__":
    main()
