"""What a pipeline bought and what it cost, measured (not estimated): ``condfx optimize``'s report.

``measure_point`` measures one graph (the original, or the stack after each pass) on real text:
perplexity with windows of ``MeasureConfig.context`` tokens, the measured fraction of FFN blocks
skipped (``skip-ffn``'s ``condfx.masked_ffn`` rows) and of queries routed to global attention
(``route-attention``), the KV-cache bytes per token held by a ``Session``'s actual cache tensors after
a prefill of ``kv_context`` tokens, prefill and decode tokens/s through the ``Session`` and peak
memory. ``greedy_agreement`` compares N greedy tokens of two sessions. ``full_precision_window`` is
the longest span a pass keeps exact (quantize-kv's residual and sink, a route window): perplexity on
windows no longer than it cannot see the pass, and the report says so.

``write_report`` writes ``report.md``, ``report.json`` and, when matplotlib imports, ``quality.png``
(perplexity against decode speed and KV bytes per token, one point per pass as the stack grows).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import resource
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import fx

from condfx.eval.perplexity import perplexity
from condfx.passes.pipeline import apply as pipeline_apply

__all__ = ["MeasureConfig", "Point", "full_precision_window", "greedy_agreement", "measure_point",
           "onnx_agreement", "write_report"]


@dataclass(frozen=True)
class MeasureConfig:
    """How ``measure_point`` measures.

    Attributes:
        context: perplexity window (tokens per forward); windows advance by half of it.
        kv_context: tokens prefilled before the cache bytes are read (the stated context).
        prefill_tokens: prompt length of the prefill timing.
        decode_tokens: steps of the decode timing (and of the greedy agreement).
        repeats: timings taken per figure (the fastest is kept).
    """

    context: int = 512
    kv_context: int = 512
    prefill_tokens: int = 128
    decode_tokens: int = 32
    repeats: int = 2


@dataclass(frozen=True)
class Point:
    """One measured graph: the original (``label`` "original") or the stack after a pass.

    Attributes:
        label: what was applied ("original", or the passes so far).
        ppl, nll, tokens: perplexity on the evaluation text and the tokens scored.
        skip_fraction: measured fraction of all FFN blocks skipped on the evaluation text, every token
            (in non-overlapping windows of ``context``; None: no skip-ffn).
        route_fraction: measured mean fraction of queries routed to global attention, the same way
            (None: no L2A layer).
        kv_bytes_per_token: ``Session.cache_bytes()`` / ``kv_context`` after a prefill of that many tokens.
        kv_context: the tokens prefilled for ``kv_bytes_per_token``.
        prefill_tps, decode_tps: tokens/s of ``Session.prefill`` and ``Session.step`` (batch 1).
        weights_bytes: bytes of the graph's parameters and buffers.
        peak_bytes: peak accelerator memory of the timings (CUDA), or the process's peak resident
            set (CPU, monotonic over the run: an upper bound).
        session_error: why no session could run the graph (then the session figures are None).
    """

    label: str
    ppl: float
    nll: float
    tokens: int
    skip_fraction: float | None = None
    route_fraction: float | None = None
    kv_bytes_per_token: float | None = None
    kv_context: int | None = None
    prefill_tps: float | None = None
    decode_tps: float | None = None
    weights_bytes: int = 0
    peak_bytes: int | None = None
    session_error: str | None = None


def full_precision_window(spec_passes: Sequence[Any]) -> int:
    """The longest token span a pass of the pipeline keeps in full precision (0 when none does)."""
    span = 0
    for p in spec_passes:
        cfg = p.config
        if p.name == "quantize-kv":
            span = max(span, int(getattr(cfg, "residual", 0)) + int(getattr(cfg, "sink", 0)))
        elif p.name in ("route-attention", "sink-window"):
            span = max(span, int(getattr(cfg, "window", 0) or 0) + int(getattr(cfg, "sink", 0) or 0))
    return span


def _has(gm: fx.GraphModule, fragment: str) -> bool:
    return any(fragment in str(n.target) for n in gm.graph.nodes if n.op == "call_function")


def _over_windows(fraction: Callable[[torch.Tensor], float], ids: torch.Tensor, context: int) -> float:
    """``fraction`` over the whole of ``ids`` (1, N): measured on each non-overlapping window of
    ``context`` tokens (the model's context: a fraction depends on the position in the window) and
    averaged by tokens."""
    windows = [ids[:, i : i + context] for i in range(0, ids.shape[1], context)]
    windows = [w for w in windows if w.shape[1] > 1] or windows[:1]
    total = sum(w.shape[1] for w in windows)
    return sum(fraction(w) * w.shape[1] for w in windows) / total


def _skip_fraction(gm: fx.GraphModule, ids: torch.Tensor, context: int) -> float | None:
    from condfx.passes.skip_ffn import measure_skip_fraction

    if not _has(gm, "masked_ffn"):
        return None
    return _over_windows(lambda w: float(measure_skip_fraction(gm, w)["fraction_of_all_ffn"]), ids, context)


def _route_fraction(gm: fx.GraphModule, ids: torch.Tensor, context: int) -> float | None:
    from condfx.l2a import route_fractions
    from condfx.patterns.routed import find_routed_layers

    if not find_routed_layers(gm):
        return None

    def mean(w: torch.Tensor) -> float:
        fr = route_fractions(gm, w)
        return sum(fr) / len(fr)

    return _over_windows(mean, ids, context)


def session_of(gm: fx.GraphModule, max_seq_len: int | None):
    """A torch ``Session`` on ``gm`` + ``add-kv-cache`` (attention fused first when it is not)."""
    from condfx.passes.base import PassError
    from condfx.runtime import Session

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            decode = pipeline_apply(gm, "add-kv-cache").graph_module
        except PassError:
            decode = pipeline_apply(gm, "fuse-attention, add-kv-cache", allow_partial=True).graph_module
    return Session.from_graph(decode, max_seq_len=max_seq_len)


def _peak_reset(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _peak(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * scale


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _session_figures(session, ids: torch.Tensor, cfg: MeasureConfig) -> dict[str, float]:
    """KV bytes per token at ``kv_context`` and the best-of-``repeats`` prefill and decode tokens/s."""
    device = session.device
    kv = ids[:, : cfg.kv_context]
    with torch.no_grad():
        session.prefill(kv)
        kv_bytes = session.cache_bytes() / kv.shape[1]
        prompt = ids[:, : cfg.prefill_tokens]
        best_p, best_d = math.inf, math.inf
        for _ in range(cfg.repeats):
            _sync(device)
            t0 = time.perf_counter()
            logits = session.prefill(prompt)
            _sync(device)
            best_p = min(best_p, time.perf_counter() - t0)
            nxt = logits[:, -1:].argmax(-1)
            t0 = time.perf_counter()
            for _ in range(cfg.decode_tokens):
                nxt = session.step(nxt)[:, -1:].argmax(-1)
            _sync(device)
            best_d = min(best_d, time.perf_counter() - t0)
    return {"kv_bytes_per_token": kv_bytes, "kv_context": int(kv.shape[1]), "prefill_tps": prompt.shape[1] / best_p,
            "decode_tps": cfg.decode_tokens / best_d}


def _weights_bytes(gm: fx.GraphModule) -> int:
    tensors = {id(t): t for t in (*gm.parameters(), *gm.buffers())}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def measure_point(label: str, gm: fx.GraphModule, eval_ids: torch.Tensor, cfg: MeasureConfig,
                  max_seq_len: int | None, progress: Callable[[str], None] | None = None,
                  session_ids: torch.Tensor | None = None, session: bool = True,
                  kv_context: int | None = None) -> Point:
    """Measures ``gm``: perplexity on ``eval_ids`` (1, N), the session figures on ``session_ids``
    (1, at least ``cfg.kv_context`` tokens; default ``eval_ids``; none when ``session`` is False),
    the KV bytes after a prefill of ``kv_context`` tokens (default ``cfg.kv_context``); see the
    module docstring."""
    if kv_context is not None:
        cfg = dataclasses.replace(cfg, kv_context=min(kv_context, cfg.kv_context))
    say = progress or (lambda _m: None)
    say(f"{label}: perplexity over {eval_ids.shape[1]} tokens")
    res = perplexity(gm, eval_ids[0], context=min(cfg.context, eval_ids.shape[1]))
    with torch.no_grad():
        skip, route = _skip_fraction(gm, eval_ids, cfg.context), _route_fraction(gm, eval_ids, cfg.context)
    figures: dict[str, Any] = {}
    device = next(iter(gm.parameters()), torch.empty(0)).device
    if not session:
        return Point(label, res.ppl, res.nll, res.tokens, skip, route, weights_bytes=_weights_bytes(gm))
    _peak_reset(device)
    say(f"{label}: session timings")
    try:
        session = session_of(gm, max_seq_len)
        figures = _session_figures(session, eval_ids if session_ids is None else session_ids, cfg)
    except Exception as exc:  # noqa: BLE001  (a graph no session runs: report why, keep measuring)
        figures = {"session_error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"}
    return Point(label, res.ppl, res.nll, res.tokens, skip, route, weights_bytes=_weights_bytes(gm),
                 peak_bytes=_peak(device), **figures)


def greedy_agreement(original: fx.GraphModule, result: fx.GraphModule, prompt: torch.Tensor, n: int,
                     max_seq_len: int | None) -> dict[str, Any]:
    """Greedy decoding of ``n`` tokens after ``prompt`` (1, T) by both graphs' sessions.

    Returns:
        {"tokens": n, "agreement": fraction of the n positions where both chose the same token,
        "first_difference": index of the first differing token (None when all agree)}.
    """
    outs = []
    for gm in (original, result):
        session = session_of(gm, max_seq_len)
        with torch.no_grad():
            nxt = session.prefill(prompt)[:, -1:].argmax(-1)
            toks = [int(nxt)]
            for _ in range(n - 1):
                nxt = session.step(nxt)[:, -1:].argmax(-1)
                toks.append(int(nxt))
        outs.append(toks)
    same = [a == b for a, b in zip(*outs, strict=True)]
    first = next((i for i, s in enumerate(same) if not s), None)
    return {"tokens": n, "agreement": sum(same) / n, "first_difference": first}


def _greedy_run(session, prompt: torch.Tensor, n: int) -> tuple[list[int], list[torch.Tensor]]:
    """n greedy tokens after ``prompt`` and the logits each was chosen from."""
    logits = [session.prefill(prompt)[:, -1].float().cpu()]
    tokens = [int(logits[-1].argmax())]
    for _ in range(n - 1):
        nxt = torch.tensor([[tokens[-1]]], device=session.device)
        logits.append(session.step(nxt)[:, -1].float().cpu())
        tokens.append(int(logits[-1].argmax()))
    return tokens, logits


def onnx_agreement(decode: fx.GraphModule, folder: Path, prompt: torch.Tensor, n: int,
                   max_seq_len: int | None = None) -> dict[str, Any]:
    """ONNX Runtime (the bundle in ``folder``) against the torch Session of ``decode`` on real tokens.

    Both sessions prefill ``prompt`` (1, T) and decode ``n`` greedy tokens, each with its own cache;
    then one more step is run by both backends on the torch Session's cache contents. A quantized
    cache can differ for good after a float rounding flips one code in a free run, so the same-cache
    step is the figure that isolates the graphs.

    Returns:
        {"prompt_tokens", "greedy_tokens", "greedy_equal", "first_difference", "free_running_max_abs_diff",
        "same_cache_max_abs_diff"}.
    """
    from condfx.runtime.onnx_backend import OnnxBackend
    from condfx.runtime.session import Session

    torch_s = Session.from_graph(decode, max_seq_len=max_seq_len)
    onnx_s = Session(OnnxBackend.from_dir(folder), max_seq_len=max_seq_len)
    with torch.no_grad():
        t_tokens, t_logits = _greedy_run(torch_s, prompt, n)
        o_tokens, o_logits = _greedy_run(onnx_s, prompt, n)
        nxt, past = torch.tensor([[t_tokens[-1]]]), torch_s.caches.past()
        ref = torch_s.backend.run(nxt.to(torch_s.device), past)[0].float().cpu()
        got = onnx_s.backend.run(nxt, [t.cpu() for t in past])[0].float()
    first = next((i for i, (a, b) in enumerate(zip(t_tokens, o_tokens, strict=True)) if a != b), None)
    return {"prompt_tokens": int(prompt.shape[1]), "greedy_tokens": n, "greedy_equal": first is None,
            "first_difference": first,
            "free_running_max_abs_diff": float((torch.stack(t_logits) - torch.stack(o_logits)).abs().max()),
            "same_cache_max_abs_diff": float((ref - got).abs().max())}


def snapshot(gm: fx.GraphModule) -> fx.GraphModule:
    """A private copy of ``gm`` to measure later (the pipeline keeps rewriting its own)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return copy.deepcopy(gm)


def _fmt(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _at(p: dict[str, Any]) -> str:
    return "" if p.get("kv_context") is None else f" ({p['kv_context']})"


def markdown(summary: dict[str, Any]) -> str:
    """The report's markdown: the figures table, the ratios, calibration lines and the notes."""
    pts = summary["points"]
    lines = [f"# condfx optimize: {summary['model']}", "", f"passes: `{summary['spec']}`", "",
             f"evaluation: {summary['eval']['tokens']} tokens of `{summary['eval']['text']}`, windows of "
             f"{summary['eval']['context']}; KV bytes at {summary['measure']['kv_context']} tokens; "
             f"prefill {summary['measure']['prefill_tokens']} tokens, decode {summary['measure']['decode_tokens']} "
             "steps, batch 1, torch Session.", "",
             "| stack | perplexity | skip | global route | KV B/token (at tokens) | prefill tok/s | decode tok/s | peak MB |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for p in pts:
        peak = None if p["peak_bytes"] is None else p["peak_bytes"] / 2**20
        lines.append(f"| {p['label']} | {p['ppl']:.3f} | {_fmt(p['skip_fraction'], '.3f')} | "
                     f"{_fmt(p['route_fraction'], '.3f')} | {_fmt(p['kv_bytes_per_token'], '.1f')}{_at(p)} | "
                     f"{_fmt(p['prefill_tps'], '.0f')} | {_fmt(p['decode_tps'], '.1f')} | {_fmt(peak, '.0f')} |")
    if summary.get("alone"):
        lines += ["", "Each lossy pass alone on the original (calibrated the same way; perplexity only) "
                  "beside the stack up to it:", "", "| pass | alone perplexity | alone skip | stack up to it |",
                  "|---|---:|---:|---:|"]
        for a in summary["alone"]:
            alone = a["ppl"] if a.get("ppl") is not None else None
            lines.append(f"| {a['pass']} | {_fmt(alone, '.3f') if alone is not None else a.get('why', '-')} | "
                         f"{_fmt(a.get('skip_fraction'), '.3f')} | {_fmt(a.get('stack_ppl'), '.3f')} |")
    r = summary["ratios"]
    lines += ["", f"Result vs original: perplexity x{_fmt(r['ppl'], '.3f')}, KV bytes/token x"
              f"{_fmt(r['kv_bytes_per_token'], '.3f')}, prefill x{_fmt(r['prefill_tps'], '.2f')}, decode "
              f"x{_fmt(r['decode_tps'], '.2f')} (timed in the same run); greedy agreement "
              f"{summary['greedy']['agreement']:.3f} over {summary['greedy']['tokens']} tokens "
              f"(first difference at {summary['greedy']['first_difference']})."]
    if summary.get("kv_fp16"):
        f = summary["kv_fp16"]
        x = f["times_smaller"]
        verdict = f"{x:.2f}x smaller" if x >= 1 else f"{1 / x:.2f}x larger"
        lines += ["", f"KV cache at {summary['measure']['kv_context']} tokens, read from the Session's cache "
                  f"tensors: {f['result_bytes_per_token']:.1f} B/token against {f['bytes_per_token']:.1f} for a "
                  f"dense float16 cache: **{verdict}**."]
    cals = [c for c in summary["calibration"] if c["need"] != "none"]
    lines += ["", "## calibration", ""] * bool(cals) + [f"- {c['pass']}: {c['need']}, "
                                           f"{'calibrated' if c['calibrated'] else 'not calibrated'}"
                                           f"{': ' + c['summary'] if c['summary'] else ''}"
                                           for c in cals]
    if summary.get("export"):
        e = summary["export"]
        lines += ["", f"ONNX bundle in `{e['folder']}`: max |ORT - PyTorch| {_fmt(e['max_abs_diff'], '.3g')} "
                  "(random 7-token prompt and one decode step)."]
        a = e.get("agreement")
        if a:
            lines += [f"On {a['prompt_tokens']} evaluation tokens then {a['greedy_tokens']} greedy tokens: "
                      f"greedy tokens {'equal' if a['greedy_equal'] else 'differ from token ' + str(a['first_difference'])}"
                      f"; one more step with both fed the torch cache: max |logit diff| "
                      f"{a['same_cache_max_abs_diff']:.3g}; free-running max |logit diff| "
                      f"{a['free_running_max_abs_diff']:.3g} (a rounding flip of one quantized code makes the "
                      "two caches differ for good)."]
    if summary["notes"]:
        lines += ["", "## notes", ""] + [f"- {n}" for n in summary["notes"]]
    return "\n".join(lines) + "\n"


def ratios(base: Point, last: Point) -> dict[str, float | None]:
    """last / base for each measured figure (None when either is missing)."""
    out = {}
    for key in ("ppl", "kv_bytes_per_token", "prefill_tps", "decode_tps"):
        a, b = getattr(base, key), getattr(last, key)
        out[key] = None if a in (None, 0) or b is None else b / a
    return out


def plot(points: Sequence[Point], path: Path, title: str) -> Path | None:
    """Perplexity against decode tokens/s and KV bytes per token, one labelled point per stack."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, xlabel in ((axes[0], "decode_tps", "decode tokens/s (Session, batch 1)"),
                            (axes[1], "kv_bytes_per_token", "KV-cache bytes per token")):
        xs = [getattr(p, key) for p in points]
        ys = [p.ppl for p in points]
        shown = [(x, y, p.label) for x, y, p in zip(xs, ys, points, strict=True) if x is not None]
        ax.plot([s[0] for s in shown], [s[1] for s in shown], marker="o")
        for x, y, label in shown:
            ax.annotate(label.split(", ")[-1], (x, y), fontsize="small", xytext=(3, 3), textcoords="offset points")
        ax.set_xlabel(xlabel)
        ax.ticklabel_format(axis="x", style="sci", scilimits=(-3, 4))
        ax.set_ylabel("perplexity")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _finite(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def write_report(summary: dict[str, Any], points: Sequence[Point], out: Path) -> list[str]:
    """Writes report.md, report.json and quality.png (when matplotlib imports) into ``out``."""
    (out / "report.md").write_text(markdown(summary))
    (out / "report.json").write_text(json.dumps(_finite(summary), indent=2, allow_nan=False))
    names = ["report.md", "report.json"]
    if plot(points, out / "quality.png", f"{Path(summary['model']).name}: quality against speed and memory"):
        names.append("quality.png")
    return names


def point_dict(p: Point) -> dict[str, Any]:
    """The point as a JSON-able dict."""
    return asdict(p)
