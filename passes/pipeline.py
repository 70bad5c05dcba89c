"""Pass pipelines: the transactional ``apply`` over a spec (the spec language is in ``spec.py``).

``apply`` deep-copies the caller's GraphModule, runs the passes in order, checks the graph invariants
around each, optionally verifies outputs after each pass, and raises ``PassError`` naming the failing
pass and the passes before it. The caller's module is never modified.

A pass asked for must change the graph: one that matched nothing, or matched regions and rewrote
none of them (every region skipped, the reasons listed per layer), is a PassError unless
``allow_partial=True`` (CLI ``--allow-partial``), which accepts a pass that rewrote nothing; a pass
whose every region is already in its output form (``ALREADY_DONE``) is no error. Refused
before any pass runs: a pass after ``add-kv-cache`` (the graph is in decode form), and two passes of
``ONE_PER_LAYER`` (``quantize-kv``, ``skip-ffn``) that would rewrite the same layers.

The life cycle: given calibration batches (``calib``) and a table of ``Calibrator``s (one row per
pass name, ``condfx.lifecycle.CALIBRATORS``; ``condfx.apply`` passes it), every pass whose ``need``
is not ``Need.NONE`` gets its ``before`` stage on its input graph (statistics, a chosen config), then
its rewrite, then its ``after`` stage (training) under the ``Budget``; the result carries one
``CalibrationRecord`` per pass (what was learned, or what going without cost).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import torch
from torch import fx

from condfx.layouts import is_decode_form
from condfx.passes.base import (
    Budget,
    CalibrationRecord,
    Calibrator,
    Need,
    Pass,
    PassError,
    PassReport,
    PassResult,
    Progress,
)
from condfx.passes.spec import PassSpec, build_config, build_passes, load_spec, parse_spec

__all__ = [
    "ALREADY_DONE", "ONE_PER_LAYER", "PassSpec", "PipelineReport", "PipelineResult", "apply", "build_config", "build_passes",
    "check_conflicts", "load_spec", "parse_spec", "run_pass",
]


# Passes of which one per layer can run: a second one over the same layers would find them rewritten.
ONE_PER_LAYER = frozenset({"quantize-kv", "skip-ffn"})
_MAX_DETAILS = 6  # per skip reason in a "rewrote nothing" message
# Skip reasons saying a region is already in the pass's output form: a pass that skipped every region
# for this reason leaves the graph as asked (fuse-attention run twice; prune-global{share} whose share
# rounds to no layer), so rewriting nothing is fine.
ALREADY_DONE = MappingProxyType({"fuse-attention": "already fused", "prune-global": "outside the pruned share"})


@dataclass(frozen=True)
class PipelineReport:
    """The reports of every pass in a pipeline and the verification after each."""

    reports: tuple[PassReport, ...]
    verifications: tuple[Any, ...] = ()
    calibrations: tuple[CalibrationRecord, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict."""
        checks = [v.to_dict() if v is not None else None for v in self.verifications]
        out = {"passes": [r.to_dict() for r in self.reports], "verification": checks}
        if self.calibrations:
            out["calibration"] = [c.to_dict() for c in self.calibrations]
        return out

    def to_markdown(self) -> str:
        """All pass reports as markdown sections, each followed by its verification line."""
        parts = ["## condfx pipeline report"]
        for i, report in enumerate(self.reports):
            parts.append(report.to_markdown())
            if i < len(self.verifications) and self.verifications[i] is not None:
                parts.append(f"- verification: {self.verifications[i].summary()}")
            cal = next((c for c in self.calibrations if c.index == i and c.need is not Need.NONE), None)
            if cal is not None:
                parts.append(f"- {cal.need.value}: {cal.summary}")
        return "\n\n".join(parts)

    def __str__(self) -> str:
        return self.to_markdown()


@dataclass(frozen=True)
class PipelineResult:
    """The rewritten module (a private copy) and what every pass did."""

    graph_module: fx.GraphModule
    reports: tuple[PassReport, ...]
    modified: bool
    verifications: tuple[Any, ...] = ()
    calibrations: tuple[CalibrationRecord, ...] = ()

    @property
    def report(self) -> PipelineReport:
        """The combined report (``str()`` gives markdown, ``.to_dict()`` a dict)."""
        return PipelineReport(self.reports, self.verifications, self.calibrations)

    @property
    def state(self) -> dict[str, torch.Tensor]:
        """Every learned tensor, named ``"{pass index}.{stage}.{name}"`` (what ``save_state`` writes)."""
        return {k: v for c in self.calibrations for k, v in c.state.items()}

    @property
    def spec(self) -> str:
        """The pipeline as it ran, calibrated configs included."""
        return ", ".join(c.spec for c in self.calibrations)

    def to_json(self) -> str:
        """The combined report as a JSON string."""
        return json.dumps(self.report.to_dict(), indent=2)


def run_pass(p: Pass, gm: fx.GraphModule, prior: tuple[str, ...] = ()) -> PassResult:
    """Runs one pass between its ``requires``/``ensures`` hooks; any failure becomes a PassError.

    Args:
        p: the configured pass.
        gm: the module it rewrites (in place).
        prior: names of the passes that ran before it, for the error message.

    Returns:
        The pass's PassResult (a pass that matched nothing is not an error here).
    """
    try:
        p.requires(gm)
        result = p(gm)
        p.ensures(result.graph_module)
    except PassError as exc:
        raise exc.with_prior(prior) from exc
    except Exception as exc:  # any failure inside a pass becomes a PassError naming it
        raise PassError(p.name, f"{type(exc).__name__}: {exc}", prior=prior) from exc
    return result


def _skip_summary(report: PassReport) -> str:
    """``reason (layer 0, layer 1, ...); reason2 (...)``: the skips grouped by reason, compactly."""
    by_reason: dict[str, list[str]] = {}
    for reason, detail in report.skipped:
        by_reason.setdefault(reason, []).append(detail)
    parts = []
    for reason, details in by_reason.items():
        shown = ", ".join(details[:_MAX_DETAILS]) + (", ..." if len(details) > _MAX_DETAILS else "")
        parts.append(f"{reason} ({shown})")
    return "; ".join(parts) or "no skip reason recorded"


def _run_one(p: Pass, gm: fx.GraphModule, prior: tuple[str, ...], allow_partial: bool) -> PassResult:
    if is_decode_form(gm):
        after = "add-kv-cache" + (" (run before it)" if "add-kv-cache" in prior else " (the input graph)")
        reason = (f"{p.name} cannot run after {after}: the graph is in decode form (cache inputs and a "
                  "tuple output); put add-kv-cache last in the pipeline")
        raise PassError(p.name, reason, prior=prior)
    result = run_pass(p, gm, prior)
    report = result.report
    if report.matched == 0:
        misses = "; ".join(report.near_misses[:5]) or "none recorded"
        raise PassError(p.name, f"{p.name} matched no {p.matches}; near misses: {misses}", prior=prior)
    done = ALREADY_DONE.get(p.name)
    already = bool(report.skipped) and all(reason == done for reason, _ in report.skipped)
    if report.rewritten == 0 and not (allow_partial or already):
        reason = (f"{p.name} matched {report.matched} but rewrote none: {_skip_summary(report)}; "
                  "pass allow_partial=True (CLI --allow-partial) to accept a pass that changes nothing")
        raise PassError(p.name, reason, prior=prior)
    return result


def _spec_text(p: Pass) -> str:
    """``name{option=value,...}`` with the options that differ from their defaults."""
    cfg, options = p.config, []
    for f in dataclasses.fields(cfg) if dataclasses.is_dataclass(cfg) else ():
        value = getattr(cfg, f.name)
        if f.default is dataclasses.MISSING or value != f.default:
            options.append(f"{f.name}={getattr(value, 'value', value)}")
    return p.name + (f"{{{','.join(options)}}}" if options else "")


def _layers_of(p: Pass) -> frozenset[int] | None:
    layers = getattr(p.config, "layers", None)
    return None if layers is None else frozenset(layers)


def check_conflicts(passes: Sequence[Pass]) -> None:
    """PassError when two passes of ``ONE_PER_LAYER`` with the same name would rewrite one layer.

    Passes without a ``layers`` option rewrite every layer, so two of them always conflict.
    """
    for i, later in enumerate(passes):
        if later.name not in ONE_PER_LAYER:
            continue
        for earlier in passes[:i]:
            if earlier.name != later.name:
                continue
            a, b = _layers_of(earlier), _layers_of(later)
            if a is None or b is None or a & b:
                shared = "every layer" if a is None or b is None else f"layers {sorted(a & b)}"
                reason = (f"{_spec_text(later)} (pass {i + 1}) conflicts with {_spec_text(earlier)} (pass "
                          f"{passes.index(earlier) + 1}): both rewrite {shared}, and one {later.name} "
                          "per layer can run; keep one of them")
                raise PassError(later.name, reason, prior=tuple(q.name for q in passes[:i]))


def _no_progress(_stage: str, _done: int, _total: int) -> None:
    return None


def _prefixed(state: Mapping[str, torch.Tensor], index: int, stage: str) -> dict[str, torch.Tensor]:
    return {f"{index}.{stage}.{k}": v.detach().cpu().contiguous() for k, v in (state or {}).items()}


def _life_cycle(p: Pass, work: fx.GraphModule, i: int, prior: tuple[str, ...], allow_partial: bool,
                cal: Calibrator | None, calib: Sequence[torch.Tensor] | None, budget: Budget,
                progress: Progress) -> tuple[PassResult, CalibrationRecord]:
    """Runs one pass between its calibrator's stages; the record says what was learned or not."""
    need = cal.need(p.config) if cal is not None else type(p).needs
    if need is Need.NONE or cal is None or calib is None:
        result = _run_one(p, work, prior, allow_partial)
        summary = "" if need is Need.NONE else (cal.without if cal is not None else
                                                 f"{p.name} was not {need.value}-tuned: no calibrator runs it")
        return result, CalibrationRecord(i, p.name, need, False, summary, _spec_text(p))
    t0, state, notes = time.perf_counter(), {}, []
    try:
        if cal.before is not None:
            p, learned, note = cal.before(work, p, calib, budget, progress)
            state.update(_prefixed(learned, i, "before"))
            notes.append(note)
        result = _run_one(p, work, prior, allow_partial)
        if cal.after is not None:
            learned, note = cal.after(result.graph_module, p, calib, budget, progress)
            state.update(_prefixed(learned, i, "after"))
            notes.append(note)
    except PassError:
        raise
    except Exception as exc:  # a stage failing is the pass failing: name it
        raise PassError(p.name, f"{need.value} failed: {type(exc).__name__}: {exc}", prior=prior) from exc
    record = CalibrationRecord(i, p.name, need, True, "; ".join(n for n in notes if n), _spec_text(p),
                               state, time.perf_counter() - t0)
    return result, record


def apply(
    gm: fx.GraphModule,
    spec: Any,
    *,
    verify_inputs: Sequence[torch.Tensor] | None = None,
    registry: Mapping[str, type[Pass]] | None = None,
    allow_partial: bool = False,
    calib: Sequence[torch.Tensor] | None = None,
    budget: Budget | None = None,
    calibrators: Mapping[str, Calibrator] | None = None,
    progress: Progress | None = None,
    on_pass: Any = None,
) -> PipelineResult:
    """Applies a pipeline of passes to a private deep copy of ``gm``; ``gm`` itself is never modified.

    Args:
        gm: a GraphModule in the canonical IR (``condfx.capture``).
        spec: a text spec, a ``.json``/``.yaml`` spec file path, or a list of PassSpecs / Pass objects.
        verify_inputs: when given, the rewritten module is compared with ``gm`` on these inputs after
            every pass (``condfx.verify``: exact while only exact passes ran, lossy afterwards).
        registry: the pass registry to resolve names in; defaults to ``passes.registry.PASSES``.
        allow_partial: accept a pass that matched regions but rewrote none of them (by default that
            is a PassError listing the skip reasons per layer).
        calib: calibration token batches ((1, T) int64 each; ``base.calibration_batches``); passes
            that need calibration or training run their ``calibrators`` stages on them.
        budget: what the stages may spend (default ``Budget()``).
        calibrators: pass name -> ``Calibrator`` (``condfx.lifecycle.CALIBRATORS`` via ``condfx.apply``).
        progress: ``progress(stage, done, total)`` as a stage advances.
        on_pass: called as ``on_pass(index, pass, graph_module)`` after each pass (and its stages),
            e.g. to measure the stack as it accumulates; it must not modify the graph.

    Returns:
        The PipelineResult.

    Raises:
        ValueError, TypeError: the spec is malformed or names unknown passes or bad options.
        PassError: a pass failed, matched nothing, rewrote nothing (unless ``allow_partial``), ran
            after ``add-kv-cache``, conflicts with an earlier pass (``ONE_PER_LAYER``) or broke an
            invariant, or an exact pass changed the outputs beyond tolerance; it names the pass and
            the passes before it.
    """
    from condfx.verify import verify  # lazily: verify imports nothing from passes

    passes = build_passes(spec, registry)
    check_conflicts(passes)
    if not isinstance(allow_partial, bool):
        msg = f"apply's allow_partial must be True or False; got {allow_partial!r}."
        raise TypeError(msg)
    with warnings.catch_warnings():
        # deepcopy of an export GraphModule trips a pytree FutureWarning (torch 2.13); harmless.
        warnings.simplefilter("ignore", FutureWarning)
        work = copy.deepcopy(gm)  # FakeTensor meta survives: values are copied under their fake mode
    budget = Budget() if budget is None else budget
    table = calibrators or {}
    reports, checks, records, modified, exact = [], [], [], False, True
    for i, p in enumerate(passes):
        prior = tuple(q.name for q in passes[:i])
        result, record = _life_cycle(p, work, i, prior, allow_partial, table.get(p.name), calib, budget,
                                     progress or _no_progress)
        work, modified = result.graph_module, modified or result.modified
        reports.append(result.report)
        records.append(record)
        if on_pass is not None:
            on_pass(i, p, work)
        if verify_inputs is None:
            continue
        exact = exact and p.exact
        check = verify(gm, work, verify_inputs, mode="exact" if exact else "lossy")
        checks.append(check)
        if not check.ok:
            raise PassError(p.name, f"outputs changed beyond tolerance: {check.summary()}", prior=prior)
    return PipelineResult(work, tuple(reports), modified, tuple(checks), tuple(records))
