"""Pass pipelines: the transactional ``apply`` over a spec (the spec language is in ``spec.py``).

``apply`` deep-copies the caller's GraphModule, runs the passes in order, checks the graph invariants
around each, optionally verifies outputs after each pass, and raises ``PassError`` naming the failing
pass and the passes before it. The caller's module is never modified.
"""

from __future__ import annotations

import copy
import json
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx

from condfx.passes.base import Pass, PassError, PassReport, PassResult
from condfx.passes.spec import PassSpec, build_config, build_passes, load_spec, parse_spec

__all__ = [
    "PassSpec", "PipelineReport", "PipelineResult", "apply", "build_config", "build_passes",
    "load_spec", "parse_spec", "run_pass",
]


@dataclass(frozen=True)
class PipelineReport:
    """The reports of every pass in a pipeline and the verification after each."""

    reports: tuple[PassReport, ...]
    verifications: tuple[Any, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict."""
        checks = [v.to_dict() if v is not None else None for v in self.verifications]
        return {"passes": [r.to_dict() for r in self.reports], "verification": checks}

    def to_markdown(self) -> str:
        """All pass reports as markdown sections, each followed by its verification line."""
        parts = ["## condfx pipeline report"]
        for i, report in enumerate(self.reports):
            parts.append(report.to_markdown())
            if i < len(self.verifications) and self.verifications[i] is not None:
                parts.append(f"- verification: {self.verifications[i].summary()}")
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

    @property
    def report(self) -> PipelineReport:
        """The combined report (``str()`` gives markdown, ``.to_dict()`` a dict)."""
        return PipelineReport(self.reports, self.verifications)

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


def _run_one(p: Pass, gm: fx.GraphModule, prior: tuple[str, ...]) -> PassResult:
    result = run_pass(p, gm, prior)
    if result.report.matched == 0:
        misses = "; ".join(result.report.near_misses[:5]) or "none recorded"
        raise PassError(p.name, f"{p.name} matched no {p.matches}; near misses: {misses}", prior=prior)
    return result


def apply(
    gm: fx.GraphModule,
    spec: Any,
    *,
    verify_inputs: Sequence[torch.Tensor] | None = None,
    registry: Mapping[str, type[Pass]] | None = None,
) -> PipelineResult:
    """Applies a pipeline of passes to a private deep copy of ``gm``; ``gm`` itself is never modified.

    Args:
        gm: a GraphModule in the canonical IR (``condfx.capture``).
        spec: a text spec, a ``.json``/``.yaml`` spec file path, or a list of PassSpecs / Pass objects.
        verify_inputs: when given, the rewritten module is compared with ``gm`` on these inputs after
            every pass (``condfx.verify``: exact while only exact passes ran, lossy afterwards).
        registry: the pass registry to resolve names in; defaults to ``passes.registry.PASSES``.

    Returns:
        The PipelineResult.

    Raises:
        ValueError, TypeError: the spec is malformed or names unknown passes or bad options.
        PassError: a pass failed, matched nothing or broke an invariant, or an exact pass changed the
            outputs beyond tolerance; it names the pass and the passes before it.
    """
    from condfx.verify import verify  # lazily: verify imports nothing from passes

    passes = build_passes(spec, registry)
    with warnings.catch_warnings():
        # deepcopy of an export GraphModule trips a pytree FutureWarning (torch 2.13); harmless.
        warnings.simplefilter("ignore", FutureWarning)
        work = copy.deepcopy(gm)  # FakeTensor meta survives: values are copied under their fake mode
    reports, checks, modified, exact = [], [], False, True
    for i, p in enumerate(passes):
        prior = tuple(q.name for q in passes[:i])
        result = _run_one(p, work, prior)
        work, modified = result.graph_module, modified or result.modified
        reports.append(result.report)
        if verify_inputs is None:
            continue
        exact = exact and p.exact
        check = verify(gm, work, verify_inputs, mode="exact" if exact else "lossy")
        checks.append(check)
        if not check.ok:
            raise PassError(p.name, f"outputs changed beyond tolerance: {check.summary()}", prior=prior)
    return PipelineResult(work, tuple(reports), modified, tuple(checks))
