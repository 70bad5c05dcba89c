"""What each CLI command does. Each returns a JSON-able dict and prints tables unless ``--json``."""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import shutil
import sys
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
    """Applies the passes (calibrating those that need it on ``--calib``), measures the original and
    the stack after each pass on ``--eval`` (``condfx.measure``), writes the result, its learned state
    and the report, and with ``--export onnx`` the bundle checked against PyTorch."""
    out = check_output(args.output, "-o", folder=True)
    _check_passes(args.passes)
    texts = _optimize_texts(args)
    model, tok = _load(args.model)
    calib, notes = _calibration(args, texts, tok)  # a bad --calib-start is refused before the capture
    gm = _capture(model)
    limit = getattr(getattr(model, "info", None), "max_seq_len", None)
    plan = _measure_plan(args, texts, tok, limit, notes) if texts.get("eval") else None
    points = []
    err = Console(stderr=True)
    with _progress(args.json or not sys.stderr.isatty()) as bar:
        stage_tasks: dict[str, Any] = {}

        def progress(stage: str, done: int, total: int) -> None:
            if stage not in stage_tasks:
                stage_tasks[stage] = bar.add_task(stage, total=total)
            bar.update(stage_tasks[stage], completed=done, total=total)

        def say(msg: str) -> None:
            if not args.json:
                err.print(f"{msg} ...", highlight=False, soft_wrap=True)

        if plan is not None:
            from condfx.measure import measure_point

            points.append(measure_point("original", gm, plan["scored"], plan["cfg"], limit, say, plan["ids"],
                                        kv_context=args.kv_context_each))
        from condfx.passes.spec import build_passes

        n_passes = len(build_passes(args.passes))
        labels: list[str] = []

        def on_pass(i: int, p, work) -> None:
            labels.append(p.name)
            if plan is not None:
                points.append(measure_point(", ".join(labels), work, plan["scored"], plan["cfg"], limit, say,
                                            plan["ids"], kv_context=None if i + 1 == n_passes else args.kv_context_each))

        result = _apply_calibrated(gm, args, calib, progress, on_pass)
        alone = _alone_points(gm, args, calib, plan, points, progress, say) if plan is not None else []
    check, ids = _verify_optimized(gm, result.graph_module, args.passes, model,
                                   plan["scored"][:, : plan["cfg"].context] if plan else None)
    summary = {"output": str(out), "verify": check.to_dict(), "report": result.report.to_dict(),
               "spec": result.spec, "model": args.model}
    if plan is not None:
        summary.update(_measured_summary(args, gm, result, points, plan, limit, notes))
        summary["alone"] = alone
    if args.export == "onnx":
        summary["export"] = _export_result(result, model, args, out, plan["ids"] if plan else None, limit)
    saved = _write_outputs(result, ids, out, gm, summary if plan is not None else None, points)
    summary["files"] = saved
    if not args.json:
        _print_optimized(result, check, summary, saved, out)
    return summary


def _optimize_texts(args: argparse.Namespace) -> dict[str, Path]:
    """Checks --calib / --eval / the measurement options before the model loads."""
    texts = {}
    for flag, value in (("--calib", args.calib), ("--eval", args.eval)):
        if value is not None:
            texts[flag[2:]] = check_input_file(value, flag, "Text file")
    for flag, value, least in (("--eval-tokens", args.eval_tokens, 16), ("--calib-tokens", args.calib_tokens, 16),
                               ("--steps", args.steps, 1), ("--greedy-tokens", args.greedy_tokens, 1),
                               ("--kv-context-each", args.kv_context_each, 1)):
        if value < least:
            msg = f"{flag} must be at least {least}; got {value}."
            raise UserError(msg)
    args.calib_from = _calib_start(getattr(args, "calib_start", None), args.calib)
    return texts


def _calib_start(value: str | None, calib: str | None) -> tuple[str, float] | None:
    """``--calib-start``: None, ("token", N) for a token offset or ("percent", P) for ``P%``."""
    if value is None:
        return None
    if calib is None:
        msg = "--calib-start needs --calib: it says where in the calibration text calibration starts."
        raise UserError(msg)
    text = str(value).strip()
    percent = text.endswith("%")
    try:
        number = float(text[:-1]) if percent else int(text)
    except ValueError:
        number = None
    if number is None or not math.isfinite(number) or number < 0 or (percent and number >= 100):
        msg = (f"--calib-start must be a token offset (an integer >= 0, e.g. 2048) or a percentage of the "
               f"file below 100 (e.g. 50%); got {value!r}.")
        raise UserError(msg)
    return ("percent", number) if percent else ("token", number)


def _calib_ids(path: Path, tok, tokens: int, start: tuple[str, float] | None) -> tuple[list[int], int]:
    """(the calibration ids, the file's token index where they start). A token offset N reads the
    file's tokens from index N on as they are (BOS is index 0; none is added: the stream continues);
    ``P%`` reads the text after the first blank line (a document boundary) at or after P% of the file's
    characters, encoded with a BOS (a document starts)."""
    if start is None:
        return _read_ids(path, tok, tokens), 0
    text = read_text(path)
    kind, value = start
    if kind == "percent":
        at = text.find("\n\n", int(len(text) * value / 100))
        body = text[at:].lstrip() if at >= 0 else ""
        if not body:
            msg = (f"--calib-start {value:g}% finds no blank line (document boundary) with text after it past "
                   f"{value:g}% of '{path}'; give a smaller percentage or a token offset.")
            raise UserError(msg)
        # the token index of the start (only the overlap note reads it): beyond 4M characters a lower bound
        first = len(tok.encode(text[: min(at, 1 << 22)], bos=True, eos=False))
        return tok.encode(body[: tokens * 24], bos=True, eos=False)[:tokens], first
    offset = int(value)
    ids = tok.encode(text[: (offset + tokens) * 24], bos=True, eos=False)
    if len(ids) <= offset + 1:
        msg = (f"--calib-start {offset} is past the end of '{path}', which gives {len(ids)} tokens; "
               "give a smaller offset.")
        raise UserError(msg)
    return ids[offset : offset + tokens], offset


def _read_ids(path: Path, tok, tokens: int) -> list[int]:
    return tok.encode(read_text(path)[: tokens * 24], bos=True, eos=False)[:tokens]


def _overlap_note(texts: dict[str, Path], args: argparse.Namespace, first: int = 0) -> str | None:
    """One sentence when the evaluation text shares lines with the calibration text (or is it);
    ``first``: the calibration file's token index where calibration starts (``--calib-start``)."""
    if "calib" not in texts or "eval" not in texts:
        return None
    if texts["calib"].resolve() == texts["eval"].resolve():
        if first >= args.eval_tokens:
            return None  # --calib-start: calibration begins after the scored tokens
        if first:
            return (f"--calib-start puts calibration at token {first} of {texts['eval']}, inside the "
                    f"{args.eval_tokens} tokens --eval scores, so the perplexity flatters the calibrated passes.")
        return (f"--eval and --calib are the same file ({texts['eval']}): the perplexity is measured on "
                "the text the passes were calibrated on, so it flatters them.")
    calib_lines = {ln.strip() for ln in read_text(texts["calib"]).splitlines() if len(ln.strip()) >= 40}
    shared = [ln.strip() for ln in read_text(texts["eval"])[: args.eval_tokens * 24].splitlines()
              if len(ln.strip()) >= 40 and ln.strip() in calib_lines]
    if not shared:
        return None
    return (f"--eval shares {len(shared)} lines with --calib (first: {shared[0][:60]!r}): the perplexity is "
            "partly measured on calibration text, so it flatters the calibrated passes.")


def _calibration(args, texts: dict[str, Path], tok) -> tuple[list | None, list[str]]:
    """(calibration batches or None, notes); warns about an evaluation text overlapping it."""
    from condfx.passes.base import calibration_batches

    notes: list[str] = []
    budget = _budget(args) if "calib" in texts else None
    ids, first = (_calib_ids(texts["calib"], tok, budget.tokens, getattr(args, "calib_from", None))
                  if budget is not None else ([], 0))
    overlap = _overlap_note(texts, args, first)
    if overlap is not None:
        notes.append(overlap)
        Console(stderr=True).print(f"warning: {overlap}", highlight=False, soft_wrap=True)
    if "calib" not in texts:
        return None, notes
    batches = calibration_batches(ids, budget)
    if not batches:
        msg = (f"Calibration text '{args.calib}' gives {len(ids)} tokens; calibration reads batches of "
               f"{budget.seq_len}, so it needs at least {budget.seq_len}.")
        raise UserError(msg)
    return batches, notes


def _budget(args):
    from condfx.passes.base import Budget

    return Budget(tokens=args.calib_tokens, seq_len=min(args.calib_seq_len, args.calib_tokens),
                  steps=args.steps, seconds=args.train_seconds, skip_target=args.skip_target,
                  route_target=args.route_target)


def _apply_calibrated(gm, args, calib, progress, on_pass):
    from condfx.lifecycle import apply, min_calibration_tokens
    from condfx.passes.spec import build_passes

    budget = _budget(args)
    if calib is not None:
        need, who = min_calibration_tokens(build_passes(args.passes), budget)
        have = sum(int(b.numel()) for b in calib)
        if have < need:
            msg = (f"Calibration text '{args.calib}' gives {have} tokens in whole batches of {budget.seq_len}; "
                   f"{who} needs at least {need}; give a longer text.")
            raise UserError(msg)
    return apply(gm, args.passes, allow_partial=args.allow_partial, calib=calib, budget=budget,
                 progress=progress, on_pass=on_pass)


def _measure_plan(args, texts, tok, limit: int | None, notes: list[str]) -> dict:
    """The evaluation ids and MeasureConfig; refuses an evaluation text too short to measure with."""
    from condfx.measure import MeasureConfig, full_precision_window
    from condfx.passes.spec import build_passes

    cap = limit or 2048
    context = min(args.eval_context or 512, cap, args.eval_tokens)
    kv_context = min(args.kv_context or 2048, cap)
    cfg = MeasureConfig(context=context, kv_context=kv_context, prefill_tokens=min(128, kv_context),
                        decode_tokens=args.greedy_tokens)
    fp = full_precision_window(build_passes(args.passes))
    need = max(kv_context, context, fp + 2, 16)
    ids = _read_ids(texts["eval"], tok, max(args.eval_tokens, kv_context))
    if len(ids) < need:
        why = (f"the KV figure prefills {kv_context} tokens" if need == kv_context else
               f"perplexity needs windows longer than the passes' full-precision span of {fp} tokens"
               if need == fp + 2 else f"perplexity windows are {context} tokens")
        msg = (f"Evaluation text '{args.eval}' gives {len(ids)} tokens; the measurement needs at least {need} "
               f"({why}); give a longer text or a smaller --kv-context / --eval-context.")
        raise UserError(msg)
    if fp and context <= fp:
        notes.append(f"Perplexity windows of {context} tokens lie within the passes' full-precision span of "
                     f"{fp} tokens, so perplexity cannot see their loss; raise --eval-context.")
    elif fp:
        notes.append(f"Perplexity windows of {context} tokens exceed the passes' full-precision span of {fp} "
                     "tokens, so the loss of the quantized or routed positions is in the figure.")
    eval_ids = torch.tensor([ids[: max(args.eval_tokens, kv_context)]])
    scored = eval_ids[:, : args.eval_tokens]
    return {"ids": eval_ids, "scored": scored, "cfg": cfg}


def _alone_points(gm, args, calib, plan, points, progress, say) -> list[dict]:
    """Each lossy pass after the first applied alone to the original (calibrated as in the stack, or
    after fuse-attention when it needs fused attention) and its perplexity, beside the stack's up to it.
    A pass that needs an earlier one of the pipeline (prune-global after route-attention) says so."""
    from condfx.lifecycle import apply
    from condfx.measure import measure_point
    from condfx.passes.base import PassError
    from condfx.passes.spec import build_passes

    passes, rows = build_passes(args.passes), []
    for i, p in enumerate(passes):
        if p.exact:
            continue
        row: dict[str, Any] = {"pass": str(p.name), "stack_ppl": points[i + 1].ppl if i + 1 < len(points) else None}
        if all(q.exact for q in passes[:i]):  # the stack up to it is the pass alone
            row.update(ppl=points[i + 1].ppl, skip_fraction=points[i + 1].skip_fraction)
            rows.append(row)
            continue
        work, why = None, None
        for spec in ([p], [*build_passes("fuse-attention"), p]):
            try:
                work = apply(gm, spec, calib=calib, budget=_budget(args), progress=progress,
                             allow_partial=args.allow_partial).graph_module
                break
            except (PassError, ValueError) as exc:
                why = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if work is None:
            row["why"], row["error"] = "needs an earlier pass", why
        else:
            pt = measure_point(f"{p.name} alone", work, plan["scored"], plan["cfg"], None, say, session=False)
            row.update(ppl=pt.ppl, skip_fraction=pt.skip_fraction)
        rows.append(row)
    return rows


def _fp16_reference(gm, points) -> dict | None:
    """The dense float16 cache's bytes per token (the original's measured cache rescaled from its
    dtype) and the result's measured bytes against it."""
    base, last = points[0].kv_bytes_per_token, points[-1].kv_bytes_per_token
    weight = next(iter(gm.parameters()), None)
    if base is None or last is None or weight is None or not weight.is_floating_point():
        return None
    fp16 = base * 2 / weight.element_size()
    return {"bytes_per_token": fp16, "result_bytes_per_token": last, "times_smaller": fp16 / last}


def _measured_summary(args, gm, result, points, plan, limit, notes) -> dict:
    from condfx.measure import greedy_agreement, point_dict, ratios

    prompt = plan["ids"][:, : min(32, plan["ids"].shape[1])]
    greedy = greedy_agreement(gm, result.graph_module, prompt, args.greedy_tokens, limit)
    uncalibrated = [c.summary for c in result.calibrations if c.summary and not c.calibrated]
    return {
        "eval": {"text": str(args.eval), "tokens": points[0].tokens, "context": plan["cfg"].context},
        "measure": {"kv_context": plan["cfg"].kv_context, "prefill_tokens": plan["cfg"].prefill_tokens,
                    "decode_tokens": plan["cfg"].decode_tokens},
        "points": [point_dict(p) for p in points], "ratios": ratios(points[0], points[-1]),
        "kv_fp16": _fp16_reference(gm, points),
        "greedy": greedy, "calibration": [c.to_dict() for c in result.calibrations],
        "notes": notes + uncalibrated,
    }


def _export_result(result, model, args, out: Path, ids: torch.Tensor | None = None,
                   limit: int | None = None) -> dict:
    """Writes the ONNX bundle of the calibrated result into ``out/onnx`` and checks it against PyTorch;
    with evaluation ``ids`` also on real tokens (``measure.onnx_agreement``): a prompt longer than the
    passes' full-precision span, ``--greedy-tokens`` greedy tokens, one step on the same cache."""
    from condfx.export_bundle import export_decode_graph, model_identity
    from condfx.passes.pipeline import apply

    try:
        decode = apply(result.graph_module, "add-kv-cache").graph_module
    except Exception as exc:  # noqa: BLE001  (say which stack cannot be exported, in one sentence)
        first = str(exc).splitlines()[0]
        msg = f"--export onnx: the stack '{result.spec}' cannot be put in decode form: {first}"
        raise UserError(msg) from None
    bundle = export_decode_graph(decode, out / "onnx", identity=model_identity(model, args.model),
                                 passes=result.spec, verify=True)
    if bundle.diffs:
        from condfx.verify import check_export_diffs

        check_export_diffs(bundle.diffs, where=f"the export in {str(out / 'onnx')!r}")
    found = {"folder": str(out / "onnx"), "max_abs_diff": bundle.max_abs_diff}
    if ids is not None:
        from condfx.measure import full_precision_window, onnx_agreement
        from condfx.passes.spec import build_passes

        room = (limit or ids.shape[1] + args.greedy_tokens) - args.greedy_tokens - 1
        length = min(full_precision_window(build_passes(result.spec)) + 64, room, ids.shape[1])
        found["agreement"] = onnx_agreement(decode, out / "onnx", ids[:, :length], args.greedy_tokens, limit)
    return found


def _print_optimized(result, check, summary: dict, saved: list[str], out: Path) -> None:
    if "points" in summary:
        from condfx.measure import markdown

        _OUT.print(markdown(summary), highlight=False, markup=False, soft_wrap=True)
    else:
        _OUT.print(str(result.report))
    _OUT.print(f"max |logit diff| vs original: {check.max_abs_diff:.3g}; wrote {', '.join(saved)} to {out}",
               highlight=False, soft_wrap=True)


def _verify_optimized(gm, rewritten, spec: str, model, real_ids: torch.Tensor | None = None):
    """(VerifyResult, example ids): exact pipelines within ``EXACT_TOLERANCES``, lossy ones measured
    without a tolerance; either fails (``VerificationError``) on a figure out of bounds or not finite.
    With ``real_ids`` (evaluation tokens, longer than any full-precision span) the check runs on them;
    otherwise on 2 x 8 random tokens, which cannot see a pass whose full-precision span is longer."""
    from condfx.passes.spec import build_passes
    from condfx.verify import verify

    ids = _example_ids(model) if real_ids is None else real_ids
    exact = all(p.exact for p in build_passes(spec))
    check = verify(gm, rewritten, (ids,), mode="exact" if exact else "lossy", sqnr_floor_db=None)
    check.raise_if_failed("the optimized model")
    return check, ids


def _write_outputs(result, ids: torch.Tensor, out: Path, original=None, summary: dict | None = None,
                   points=()) -> list[str]:
    """Writes the reports, the learned state (``calibration.safetensors``, checked against the model
    by ``condfx.lifecycle.load_state``) and the rewritten program (a torch.export archive: load it
    after ``import condfx.ops``); all files are written to a scratch folder first and moved in at the
    end, so a failure leaves an existing output folder as it was."""
    import condfx.ops  # noqa: F401  (registers torch.ops.condfx.*)

    gm = result.graph_module
    auto = torch.export.Dim.AUTO
    ep = torch.export.export(gm, (ids,), dynamic_shapes=({0: auto, 1: auto},), strict=False)
    out.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=".condfx-optimize-", dir=out))
    try:
        if summary is not None:
            from condfx.measure import write_report

            summary = {**summary, "passes_report": result.report.to_dict()}
            names = write_report(summary, points, scratch)
            (scratch / "passes.md").write_text(str(result.report))
            names.append("passes.md")
        else:
            (scratch / "report.md").write_text(str(result.report))
            (scratch / "report.json").write_text(result.to_json())
            names = ["report.md", "report.json"]
        if result.state or any(c.calibrated for c in result.calibrations):
            from condfx.lifecycle import save_state

            save_state(result, original, scratch / "calibration.safetensors")
            names.append("calibration.safetensors")
        torch.export.save(ep, scratch / "model.pt2")
        (scratch / "graph.py").write_text(gm.code)
        names += ["model.pt2", "graph.py"]
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
        "files": sorted({f[k] for f in files.values() for k in ("path", "external_data") if f.get(k)}
                        | {"condfx_manifest.json"}),
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
