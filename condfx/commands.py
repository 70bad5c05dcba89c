"""What each CLI command does. Each returns a JSON-able dict and prints tables unless ``--json``."""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from condfx.errors import check_input_file, check_output, read_text, reading

_OUT = Console()


class UserError(Exception):
    """A mistake in what the user asked for; the CLI prints it as one sentence."""


def json_safe(value: Any) -> Any:
    """``value`` with every non-finite float (NaN, ±inf) replaced by None, recursively.

    The CLI prints ``json.dumps(json_safe(result), ..., allow_nan=False)``: bare ``NaN`` or
    ``Infinity`` is not JSON, and ``allow_nan=False`` makes any that slips through an error.
    """
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def _progress(disable: bool) -> Progress:
    return Progress(
        TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
        TimeRemainingColumn(), console=Console(stderr=True), disable=disable, transient=True,
    )


def _load(spec: str):
    from condfx.models_zoo import load

    with reading(f"model '{spec}'"):
        return load(spec)


def _check_passes(spec: str | None) -> None:
    """Parses and configures a pass spec before the model loads, so a bad one costs nothing."""
    if spec is None:
        return
    from condfx.passes.spec import build_passes

    if os.path.isdir(spec):  # (os.path: a spec text too long for a file name is no error here)
        msg = f"--passes '{spec}' is a folder; give a pass spec or a .json/.yaml spec file."
        raise UserError(msg)
    with reading(f"pass spec '{spec}'"):
        build_passes(spec)


def _example_ids(model: torch.nn.Module, batch: int = 2, seq: int = 8) -> torch.Tensor:
    info = getattr(model, "info", None)
    vocab = info.vocab_size if info is not None else 2
    device = next(iter(model.parameters()), torch.empty(0)).device
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(0)).to(device)


def _capture(model: torch.nn.Module):
    import condfx

    return condfx.capture(model, (_example_ids(model),))


def _apply(gm, spec: str, allow_partial: bool = False):
    from condfx.passes.pipeline import apply

    return apply(gm, spec, allow_partial=allow_partial)


# ----------------------------------------------------------------------------------------- inspect
def inspect_cmd(args: argparse.Namespace) -> dict:
    from condfx.patterns import find_regions

    model, _ = _load(args.model)
    t0 = time.perf_counter()
    gm = _capture(model)
    regions = find_regions(gm)
    elapsed = time.perf_counter() - t0
    result = _regions_dict(regions)
    result.update(model=args.model, capture_and_match_s=round(elapsed, 3))
    if not args.json:
        _print_regions(args.model, result)
    return result


def _regions_dict(regions) -> dict:
    layers: dict[int, dict] = {}
    for a in regions.attention:
        layers.setdefault(a.layer, {})["attention"] = {
            "module": a.module_path, "form": a.core_form, "heads": a.num_heads,
            "kv_heads": a.num_kv_heads, "head_dim": a.head_dim, "causal": a.causal,
            "window": a.window, "rope": a.rope.style.value if a.rope else None,
            "qk_norm": a.q_norm is not None, "scale": a.scale,
        }
    for f in regions.ffn:
        layers.setdefault(f.layer, {})["ffn"] = {
            "module": f.module_path, "kind": f.kind.value, "dim": f.dim, "hidden_dim": f.hidden_dim,
        }
    norms: dict[str, int] = {}
    for n in regions.norms:
        norms[n.kind.value] = norms.get(n.kind.value, 0) + 1
    return {
        "attention_regions": len(regions.attention),
        "ffn_regions": len(regions.ffn),
        "norm_regions": norms,
        "residual_adds": len(regions.residuals),
        "blocks": len(regions.blocks),
        "layers": {str(k): v for k, v in sorted(layers.items())},
        "near_misses": [str(f) for f in regions.failures],
    }


def _print_regions(name: str, result: dict) -> None:
    table = Table(title=f"regions in {name}")
    for col in ("layer", "attention", "heads (q/kv x d)", "mask", "ffn"):
        table.add_column(col)
    for layer, entry in result["layers"].items():
        a, f = entry.get("attention"), entry.get("ffn")
        attn = f"{a['form']}{' +rope' if a['rope'] else ''}{' +qk-norm' if a['qk_norm'] else ''}" if a else "-"
        heads = f"{a['heads']}/{a['kv_heads']} x {a['head_dim']}" if a else "-"
        mask = ("causal" if a["causal"] else "full") + (f", window {a['window']}" if a and a["window"] else "") if a else "-"
        ffn = f"{f['kind']} {f['dim']}->{f['hidden_dim']}" if f else "-"
        table.add_row(layer, attn, heads, mask, ffn)
    _OUT.print(table)
    _OUT.print(
        f"{result['attention_regions']} attention, {result['ffn_regions']} FFN regions; norms "
        f"{result['norm_regions']}; {result['residual_adds']} residual adds "
        f"({result['capture_and_match_s']} s to capture and match)"
    )
    for miss in result["near_misses"]:
        _OUT.print(f"  near miss: {miss}", highlight=False)


# ---------------------------------------------------------------------------------------- optimize
def optimize_cmd(args: argparse.Namespace) -> dict:
    out = check_output(args.output, "-o", folder=True)
    _check_passes(args.passes)
    model, _ = _load(args.model)
    gm = _capture(model)
    result = _apply(gm, args.passes, args.allow_partial)
    check, ids = _verify_optimized(gm, result.graph_module, args.passes, model)
    saved = _write_outputs(result, ids, out)
    summary = {"output": str(out), "files": saved, "verify": check.to_dict(), "report": result.report.to_dict()}
    if not args.json:
        _OUT.print(str(result.report))
        _OUT.print(f"max |logit diff| vs original: {check.max_abs_diff:.3g}; wrote {', '.join(saved)} to {out}")
    return summary


def _verify_optimized(gm, rewritten, spec: str, model):
    """(VerifyResult, example ids): exact pipelines within ``EXACT_TOLERANCES``, lossy ones measured
    without a tolerance; either fails (``VerificationError``) on a figure out of bounds or not finite."""
    from condfx.passes.spec import build_passes
    from condfx.verify import verify

    ids = _example_ids(model)
    exact = all(p.exact for p in build_passes(spec))
    check = verify(gm, rewritten, (ids,), mode="exact" if exact else "lossy", sqnr_floor_db=None)
    check.raise_if_failed("the optimized model")
    return check, ids


def _write_outputs(result, ids: torch.Tensor, out: Path) -> list[str]:
    """Writes the reports and the rewritten program (a torch.export archive: load it after
    ``import condfx.ops``); all files are written to a scratch folder first and moved in at the
    end, so a failure leaves an existing output folder as it was."""
    import condfx.ops  # noqa: F401  (registers torch.ops.condfx.*)

    gm = result.graph_module
    auto = torch.export.Dim.AUTO
    ep = torch.export.export(gm, (ids,), dynamic_shapes=({0: auto, 1: auto},), strict=False)
    out.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=".condfx-optimize-", dir=out))
    try:
        (scratch / "report.md").write_text(str(result.report))
        (scratch / "report.json").write_text(result.to_json())
        torch.export.save(ep, scratch / "model.pt2")
        (scratch / "graph.py").write_text(gm.code)
        names = ["report.md", "report.json", "model.pt2", "graph.py"]
        for name in names:
            os.replace(scratch / name, out / name)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return names


# -------------------------------------------------------------------------------------------- eval
def eval_cmd(args: argparse.Namespace) -> dict:
    from condfx.eval import documents_to_ids, perplexity, perplexity_of_text

    text_path = check_input_file(args.text, "--text", "Text file")
    for flag, value, least in (("--max-tokens", args.max_tokens, 2), ("--max-docs", args.max_docs, 1)):
        if value is not None and value < least:
            msg = f"{flag} must be at least {least}; got {value}."
            raise ValueError(msg)
    _check_passes(args.passes)
    model, tok = _load(args.model)
    text = read_text(text_path)
    _check_context(args.context, model, args.model)
    if args.passes:
        rewritten = _apply(_capture(model), args.passes, args.allow_partial).graph_module
        rewritten.info = getattr(model, "info", None)  # context length etc. for the evaluation
        model = rewritten
    t0 = time.perf_counter()
    with _progress(args.json) as bar:
        task = bar.add_task("scoring", total=None)

        def progress(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        if args.max_tokens is not None:
            res = perplexity_of_text(
                model, tok, text, max_tokens=args.max_tokens, context=args.context, progress=progress
            )
            unit = {"max_tokens": args.max_tokens}
        else:
            docs = documents_to_ids(text, tok, max_docs=args.max_docs)
            res = perplexity(model, docs, context=args.context, progress=progress)
            unit = {"documents": args.max_docs}
    result = {
        "model": args.model, "text": str(text_path), "nll": res.nll, "ppl": res.ppl,
        "tokens": res.tokens, "seconds": round(time.perf_counter() - t0, 2), **unit,
    }
    if not args.json:
        _OUT.print(f"NLL {res.nll:.4f}  perplexity {res.ppl:.3f}  over {res.tokens} tokens")
    return result


def _check_context(context: int | None, model: torch.nn.Module, name: str) -> None:
    """Refuses an ``--context`` the model was not built for (positions past it are extrapolated or
    out of the position table)."""
    limit = getattr(getattr(model, "info", None), "max_seq_len", None)
    if context is None:
        return
    if context < 2:
        msg = f"--context must be at least 2 tokens; got {context}."
        raise ValueError(msg)
    if limit is not None and context > limit:
        msg = f"--context {context} is beyond the maximum context of {name}, {limit} tokens; use --context {limit} or less."
        raise ValueError(msg)


# --------------------------------------------------------------------------------------- calibrate
def calibrate_cmd(args: argparse.Namespace) -> dict:
    from condfx.calibrate import calibrate_similarity

    t = args.target_skip
    if not 0.0 < t < 1.0:
        msg = f"--target-skip must be a fraction strictly between 0 and 1; got {t}."
        raise ValueError(msg)
    if args.max_tokens < 16:
        msg = f"--max-tokens must be at least 16; got {args.max_tokens}."
        raise ValueError(msg)
    text_path = check_input_file(args.text, "--text", "Text file")
    out = check_output(args.output or f"{Path(args.model).stem}.skip-calibration.json", "-o", folder=False)
    if args.plot:
        check_output(args.plot, "--plot", folder=False)
    model, tok = _load(args.model)
    text = read_text(text_path)[: args.max_tokens * 32]  # enough characters
    ids = tok.encode(text, bos=True, eos=False)[: args.max_tokens]
    if len(ids) < 16:
        msg = f"Text file '{args.text}' gives {len(ids)} tokens; calibration needs at least 16."
        raise ValueError(msg)
    t0 = time.perf_counter()
    cal = calibrate_similarity(_capture(model), torch.tensor([ids]), target_skip=t)
    cal.save(out)
    result = {
        "model": args.model, "text": str(text_path), "tokens": len(ids), "output": str(out),
        "spec": cal.spec(), "threshold": cal.threshold, "span": cal.span, "cold_start": cal.cold_start,
        "cold_end": cal.cold_end, "warmup": cal.warmup, "target_skip": t,
        "simulated_skip": cal.simulated_skip, "measured_skip": cal.measured_skip,
        "profile": _profile_rows(cal), "seconds": round(time.perf_counter() - t0, 2),
    }
    if args.plot:
        result["plot"] = str(_plot_profile(cal, Path(args.plot), args.model))
    if not args.json:
        _print_calibration(result)
    return result


def _profile_rows(cal) -> list[dict]:
    n = len(cal.profile)
    p50 = cal.profile_p50 or (None,) * n
    p90 = cal.profile_p90 or (None,) * n
    return [
        {"layer": i, "mean_cos": cal.profile[i], "p50": p50[i], "p90": p90[i], "cold": cal.is_cold(i)}
        for i in range(n)
    ]


def _print_calibration(result: dict) -> None:
    table = Table(title=f"FFN similarity cos(h_in, h_out) of {result['model']} over {result['tokens']} tokens")
    for col in ("layer", "mean cos", "p50", "p90", "cold"):
        table.add_column(col, justify="right")
    fmt = lambda v: "-" if v is None else f"{v:.4f}"  # noqa: E731
    for row in result["profile"]:
        table.add_row(str(row["layer"]), fmt(row["mean_cos"]), fmt(row["p50"]), fmt(row["p90"]),
                      "cold" if row["cold"] else "")
    _OUT.print(table)
    _OUT.print(
        f"threshold {result['threshold']:.4f}, span {result['span']}, cold regions {result['cold_start']} "
        f"(start) + {result['cold_end']} (end), warm-up {result['warmup']} tokens; target skip "
        f"{result['target_skip']:.3f}, simulated {result['simulated_skip']:.3f}, measured "
        f"{result['measured_skip']:.3f}", highlight=False, soft_wrap=True,
    )
    _OUT.print(f"pass spec: {result['spec']}", highlight=False, markup=False, soft_wrap=True)
    _OUT.print(f"wrote {result['output']}" + (f" and {result['plot']}" if "plot" in result else ""),
               highlight=False, soft_wrap=True)


def _plot_profile(cal, path: Path, model: str) -> Path:
    """Writes the per-layer similarity profile (mean, p50, p90, threshold, cold regions) as a PNG."""
    try:
        import matplotlib
    except ImportError:
        msg = "--plot needs matplotlib, which is not installed; install it or leave out --plot."
        raise UserError(msg) from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = list(range(len(cal.profile)))
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.plot(layers, cal.profile, marker="o", label="mean cos")
    if cal.profile_p50:
        ax.plot(layers, cal.profile_p50, linestyle="--", label="p50")
        ax.plot(layers, cal.profile_p90, linestyle=":", label="p90")
    ax.axhline(cal.threshold, color="red", linewidth=1, label=f"threshold {cal.threshold:.3f}")
    for i in layers:
        if cal.is_cold(i):
            ax.axvspan(i - 0.5, i + 0.5, color="grey", alpha=0.2)
    ax.set_xlabel("FFN layer (grey: cold)")
    ax.set_ylabel("cos(h_in, h_out)")
    ax.set_title(f"{Path(model).name}: target skip {cal.target_skip:.2f}, measured {cal.measured_skip:.3f}")
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# ------------------------------------------------------------------------------------------ export
def export_cmd(args: argparse.Namespace) -> dict:
    from condfx.export_bundle import export_model

    err = Console(stderr=True)
    say = (lambda _msg: None) if args.json else (lambda msg: err.print(f"{msg} ...", highlight=False, soft_wrap=True))
    check_output(args.output, "-o", folder=True)
    if args.kv_calib is not None:
        from condfx.kv_calibrate import check_kv_calibration_used

        check_input_file(args.kv_calib, "--kv-calib", "Calibration text")
        check_kv_calibration_used(args.passes)
    _check_passes(args.passes)
    t0 = time.perf_counter()
    bundle = export_model(
        args.model, args.output, passes=args.passes, verify=not args.no_verify, progress=say,
        kv_calibration=args.kv_calib,
    )
    if bundle.diffs:
        from condfx.verify import check_export_diffs

        check_export_diffs(bundle.diffs, where=f"the export in {str(bundle.out_dir)!r}")
    files = bundle.manifest["files"]
    result = {
        "model": args.model, "output": str(bundle.out_dir), "passes": args.passes,
        "files": sorted([f["path"] for f in files.values()] + ["condfx_manifest.json"]),
        "custom_ops": bundle.decode.custom_ops, "layers": len(bundle.manifest["layers"]),
        "max_abs_diff": bundle.max_abs_diff, "diffs": bundle.diffs,
        "seconds": round(time.perf_counter() - t0, 2),
    }
    if not args.json:
        diff = "not verified" if bundle.max_abs_diff is None else f"{bundle.max_abs_diff:.3g}"
        _OUT.print(
            f"wrote {', '.join(result['files'])} to {bundle.out_dir}; "
            f"max |ORT - PyTorch| (prefill, decode step): {diff}", highlight=False, soft_wrap=True,
        )
    return result


# ---------------------------------------------------------------------------------------- generate
_SAMPLING_FLAGS = (("temperature", "--temperature"), ("top_k", "--top-k"), ("top_p", "--top-p"))


def _sampling(args: argparse.Namespace) -> dict:
    """Sampling options for ``generate()``: greedy unless --temperature/--top-k/--top-p is given."""
    from condfx.runtime.sampling import SamplingConfig

    options = {name: getattr(args, name) for name, _ in _SAMPLING_FLAGS}
    options = {k: v for k, v in options.items() if v is not None}
    if not options:
        return {"greedy": True}
    if args.seed is not None:
        options["seed"] = args.seed
    SamplingConfig.from_options(**options)  # a bad value fails here, before the model loads
    return options


def _session(args: argparse.Namespace, model: torch.nn.Module):
    from condfx.runtime import Session

    if args.onnx is None:
        return Session.from_model(model, passes=args.passes or "fuse-attention")
    if args.passes:
        msg = "--passes cannot be combined with --onnx: the passes were fixed when the folder was exported."
        raise ValueError(msg)
    return Session.from_onnx(args.onnx, model=model)


def generate_cmd(args: argparse.Namespace) -> dict:
    from condfx.runtime import generate

    if args.max_new_tokens < 1:
        msg = f"--max-new-tokens must be at least 1; got {args.max_new_tokens}."
        raise ValueError(msg)
    sampling = _sampling(args)
    _check_passes(args.passes)
    model, tok = _load(args.model)
    prompt = tok.encode(args.prompt, bos=True, eos=False)
    limit = getattr(getattr(model, "info", None), "max_seq_len", None)
    if limit is not None and len(prompt) > limit:
        msg = f"--prompt has {len(prompt)} tokens, more than the model's context of {limit}."
        raise ValueError(msg)
    stop = () if tok.eos_id is None else (tok.eos_id,)
    # A tampered export folder fails inside ONNX Runtime (bad protobuf, unknown input names).
    with reading(f"ONNX folder '{args.onnx}'") if args.onnx else contextlib.nullcontext():
        session = _session(args, model)
        new = generate(session, [prompt], max_new_tokens=args.max_new_tokens, stop_ids=stop, **sampling)[0]
    text = tok.decode(prompt + new)
    if not args.json:
        _OUT.print(text, highlight=False, markup=False, soft_wrap=True)
    backend = "onnxruntime" if args.onnx else "torch"
    return {
        "model": args.model, "prompt": args.prompt, "text": text, "new_tokens": len(new),
        "tokens": new, "backend": backend, "sampling": sampling,
    }


# -------------------------------------------------------------------------------------------- demo
def demo_cmd(args: argparse.Namespace) -> dict:
    from condfx.demo import run_demo

    return run_demo(retrain=args.retrain, quiet=args.json, console=_OUT)
