"""The pass contract: ``Pass``, ``PassResult``, ``PassReport``, ``PassError`` and ``GraphSnapshot``.

A pass is a small class with a kebab-case ``name``, a frozen config dataclass and
``__call__(gm) -> PassResult``. It rewrites ``gm`` in place (the pipeline hands it a private deep
copy) and reports what it matched, rewrote and skipped. See ``passes/README.md`` for the graph
invariants every pass relies on and keeps.
"""

from __future__ import annotations

import abc
import dataclasses
import enum
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import fx

from condfx.options import Float, Int, check_options
from condfx.passes.report import CostEstimate


class PassError(Exception):
    """A pass failed or broke a graph invariant.

    Attributes:
        pass_name: the pass that failed.
        prior: names of the passes that ran before it, in order.
        node: ``node.format_node()`` of the offending node, or "".
        stack_trace: the node's source stack trace when known, or "".
        reason: the one-sentence description.
    """

    def __init__(
        self,
        pass_name: str,
        reason: str,
        *,
        prior: tuple[str, ...] = (),
        node: fx.Node | str | None = None,
        stack_trace: str | None = None,
    ):
        self.pass_name = pass_name
        self.reason = reason
        self.prior = tuple(prior)
        if isinstance(node, fx.Node):
            stack_trace = stack_trace or node.stack_trace
            node = node.format_node()
        self.node = node or ""
        self.stack_trace = stack_trace or ""
        super().__init__(self._message())

    def _message(self) -> str:
        after = ", ".join(self.prior) if self.prior else "none"
        lines = [f"pass '{self.pass_name}' failed (passes run before it: {after}): {self.reason}"]
        if self.node:
            lines.append(f"  offending node: {self.node}")
        if self.stack_trace:
            lines.append("  source:\n" + self.stack_trace.rstrip())
        return "\n".join(lines)

    def with_prior(self, prior: tuple[str, ...]) -> PassError:
        """Returns a copy of this error naming ``prior`` as the passes run before it."""
        return PassError(
            self.pass_name, self.reason, prior=prior, node=self.node, stack_trace=self.stack_trace
        )


@dataclass(frozen=True)
class PassReport:
    """What one pass did to one graph.

    Attributes:
        pass_name: the pass's registry name.
        matched: regions the pass's finder matched (including ones it then skipped).
        rewritten: regions rewritten.
        skipped: ``(reason, detail)`` per matched region that was not rewritten.
        near_misses: the finder's rejected candidates (``str(MatchFailure)``), for diagnostics.
        nodes_added: graph nodes present after the pass and not before.
        nodes_removed: graph nodes present before the pass and not after.
        params_added: parameter and buffer elements added (negative when removed).
        wall_time_s: seconds the pass took.
        cost_before: the cost estimate of the input graph, when the pass computed one.
        cost_after: the cost estimate of the output graph.
    """

    pass_name: str
    matched: int = 0
    rewritten: int = 0
    skipped: tuple[tuple[str, str], ...] = ()
    near_misses: tuple[str, ...] = ()
    nodes_added: int = 0
    nodes_removed: int = 0
    params_added: int = 0
    wall_time_s: float = 0.0
    cost_before: CostEstimate | None = None
    cost_after: CostEstimate | None = None

    def skip_counts(self) -> dict[str, int]:
        """Number of skipped regions per reason."""
        counts: dict[str, int] = {}
        for reason, _ in self.skipped:
            counts[reason] = counts.get(reason, 0) + 1
        return counts

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict of the report."""
        out = dataclasses.asdict(self)
        out["skipped"] = [{"reason": r, "detail": d} for r, d in self.skipped]
        out["near_misses"] = list(self.near_misses)
        out["cost_before"] = self.cost_before.to_dict() if self.cost_before else None
        out["cost_after"] = self.cost_after.to_dict() if self.cost_after else None
        return out

    def to_markdown(self) -> str:
        """A short markdown section: counts, skip reasons and the cost table."""
        lines = [
            f"### {self.pass_name}",
            "",
            f"- matched {self.matched}, rewritten {self.rewritten}, skipped {len(self.skipped)}",
            f"- nodes +{self.nodes_added} / -{self.nodes_removed}, params {self.params_added:+d}",
            f"- wall time {self.wall_time_s:.3f} s",
        ]
        lines += [f"- skipped ({n}x): {reason}" for reason, n in self.skip_counts().items()]
        if self.cost_before is not None and self.cost_after is not None:
            lines += ["", *self.cost_before.markdown_table(self.cost_after)]
        return "\n".join(lines)


@dataclass(frozen=True)
class PassResult:
    """The output of ``Pass.__call__``."""

    graph_module: fx.GraphModule
    modified: bool
    report: PassReport


@dataclass(frozen=True)
class GraphSnapshot:
    """Node set, parameter count and start time of a graph, taken before a pass runs.

    Holding the node objects keeps erased nodes alive, so identity comparison afterwards is exact.
    """

    nodes: frozenset[fx.Node]
    param_elements: int
    started: float = field(default_factory=time.perf_counter)

    @classmethod
    def take(cls, gm: fx.GraphModule) -> GraphSnapshot:
        """Records ``gm``'s nodes and parameter elements and starts the clock."""
        return cls(frozenset(gm.graph.nodes), _param_elements(gm))

    def report(self, gm: fx.GraphModule, pass_name: str, **counts: Any) -> PassReport:
        """Builds the PassReport for ``gm`` after the pass; ``counts`` are PassReport fields."""
        after = frozenset(gm.graph.nodes)
        return PassReport(
            pass_name=pass_name,
            nodes_added=len(after - self.nodes),
            nodes_removed=len(self.nodes - after),
            params_added=_param_elements(gm) - self.param_elements,
            wall_time_s=time.perf_counter() - self.started,
            **counts,
        )


def coerce_enum(cls: type[enum.Enum], value: Any, field: str) -> enum.Enum:
    """Returns ``value`` as a member of ``cls`` for a config's ``__post_init__``.

    Raises:
        ValueError: one sentence naming ``field`` (e.g. ``"QuantizeKVConfig.method"``), the value and
            the allowed values.
    """
    if isinstance(value, cls):
        return value
    try:
        return cls(value)
    except ValueError:
        allowed = "{" + ", ".join(str(m.value) for m in cls) + "}"
        msg = f"{field} must be one of {allowed}; got {value!r}."
        raise ValueError(msg) from None


def layer_indices(value: Any, field: str) -> tuple[int, ...] | None:
    """A config's ``layers`` option as a tuple of layer indices, for ``__post_init__``.

    Args:
        value: None (every layer) or a list/tuple of non-negative ints.
        field: the option's name for the message, e.g. ``"FuseAttentionConfig.layers"``.

    Raises:
        ValueError: one sentence naming ``field``, the value and what is allowed.
    """
    if value is None:
        return None
    ok = isinstance(value, (list, tuple)) and all(
        isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in value
    )
    if not ok:
        msg = f"{field} must be a list of non-negative layer indices or None; got {value!r}."
        raise ValueError(msg)
    return tuple(value)


def missing_layers(requested: tuple[int, ...] | None, available) -> list[int]:
    """The indices of a ``layers=`` option that are not in ``available``, in the option's order."""
    have = set(available)
    return [i for i in requested or () if i not in have]


def check_layer_range(pass_name: str, requested: tuple[int, ...] | None, n_layers: int,
                      kind: str = "attention") -> None:
    """PassError when a ``layers=`` option names an index at or beyond ``n_layers``.

    Raises:
        PassError: one sentence naming the pass, the out-of-range indices and the valid range.
    """
    beyond = [i for i in requested or () if i >= n_layers]
    if beyond:
        valid = f"0..{n_layers - 1}" if n_layers else "none"
        reason = (f"{pass_name}: layers {beyond} are out of range; the graph has {n_layers} {kind} "
                  f"layers (valid indices {valid}).")
        raise PassError(pass_name, reason)


def select_layers(
    pass_name: str, requested: tuple[int, ...] | None, available, kind: str = "attention",
    whose: str = "the model's",
) -> frozenset[int]:
    """The layers a pass's ``layers=`` option selects among ``available`` (all of them for None).

    Every pass with a ``layers=`` option selects through this function, so a layer that does not
    exist gets one behaviour and one message everywhere (``fuse-attention`` refuses indices beyond
    the graph's layers with ``check_layer_range`` and records a layer in range that it did not find
    as a skip: a layer fused by an earlier run is no region any more).

    Args:
        pass_name: the pass, named in the message.
        requested: the ``layers`` option (None selects every available layer).
        available: the layer indices the graph has for this pass.
        kind: what those layers are ("attention", "L2A").
        whose: the owner phrase in the message ("the model's", or "the" for layers a pass added).

    Raises:
        PassError: ``requested`` names layers that are not in ``available``; the message names the
            pass, the missing layers and the layers that exist.
    """
    known = sorted(set(available))
    missing = missing_layers(requested, known)
    if missing:
        reason = (
            f"{pass_name}: layers {missing} do not exist; the graph has {kind} layers {known} "
            f"(layers={list(requested)} names layer {missing[0]}, but {whose} {kind} layers are {known}; "
            f"valid indices: {', '.join(map(str, known)) or 'none'})."
        )
        raise PassError(pass_name, reason)
    return frozenset(known if requested is None else requested)


def _param_elements(gm: fx.GraphModule) -> int:
    tensors = {id(t): t for t in (*gm.parameters(), *gm.buffers())}
    return sum(t.numel() for t in tensors.values())


def check_graph_invariants(gm: fx.GraphModule, pass_name: str) -> None:
    """Raises PassError when ``gm`` breaks an invariant of passes/README.md.

    Checks: the graph lints, and every placeholder and call_function node carries ``meta["val"]``.
    """
    try:
        gm.graph.lint()
    except Exception as exc:  # fx raises RuntimeError and others from lint
        raise PassError(pass_name, f"graph does not lint: {exc}") from exc
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "call_function") and "val" not in node.meta:
            raise PassError(pass_name, "node has no FakeTensor metadata (meta['val'])", node=node)


class Need(enum.Enum):
    """What a pass needs to be faithful: nothing (exact or calibration-free), statistics recorded
    on calibration text, or training on it."""

    NONE = "none"
    CALIBRATION = "calibration"
    TRAINING = "training"


@dataclass(frozen=True)
class Budget:
    """How much calibration a pipeline may spend (``apply(..., calib=...)``).

    Attributes:
        tokens: calibration tokens read (batches of ``seq_len``).
        seq_len: tokens per calibration batch.
        steps: optimizer steps of a pass that trains (route-attention, skip-ffn{policy=forecast}).
        seconds: wall-clock limit of one training stage; None for no limit.
        skip_target: fraction of all FFN blocks a calibrated ``skip-ffn`` aims to skip.
        route_target: fraction of queries a trained ``route-attention`` aims to route globally.
    """

    tokens: int = 4096
    seq_len: int = 256
    steps: int = 100
    seconds: float | None = None
    skip_target: float = 0.2
    route_target: float = 0.1

    def __post_init__(self):
        check_options(self, {"tokens": Int(2, 1 << 40), "seq_len": Int(2, 1 << 30), "steps": Int(1, 1 << 30),
                             "skip_target": Float(0.0, 1.0, low_open=True, high_open=True),
                             "route_target": Float(0.0, 1.0, low_open=True, high_open=True)})
        if self.seconds is not None and not self.seconds > 0:
            msg = f"Budget.seconds must be a positive number of seconds or None; got {self.seconds!r}."
            raise ValueError(msg)


Progress = Callable[[str, int, int], None]
"""``progress(stage, done, total)``: called as a calibration stage advances."""

StageFn = Callable[..., Any]


@dataclass(frozen=True)
class Calibrator:
    """How one pass is made faithful: the stages the pipeline runs around it (one table row).

    The life cycle, for a pass with ``need(config) != Need.NONE`` and calibration text:
    ``before(gm, pass, batches, budget, progress) -> (pass, state, summary)`` runs on the pass's input
    graph (it records statistics the rewrite reads, or chooses the config: the returned pass runs);
    the pass rewrites; ``after(gm, pass, batches, budget, progress) -> (state, summary)`` trains what
    the rewrite added. ``state`` maps names of ``gm``'s parameters and buffers (or other named
    tensors) to the learned values, saved with the result and checked against the model on load.

    Attributes:
        need: the need of a pass of this name, from its config.
        without: one sentence: what running the pass without calibration text costs.
        min_tokens: calibration tokens the stages need, from the config and the budget.
        before: the stage run before the rewrite, or None.
        after: the stage run after the rewrite, or None.
    """

    need: Callable[[Any], Need]
    without: str
    min_tokens: Callable[[Any, Budget], int] = lambda _cfg, budget: budget.seq_len
    before: StageFn | None = None
    after: StageFn | None = None


@dataclass(frozen=True)
class CalibrationRecord:
    """What the life cycle did for one pass of a pipeline.

    Attributes:
        index: the pass's position in the pipeline.
        pass_name: its name.
        need: what it needs.
        calibrated: True when its stages ran on calibration text.
        summary: one line: what the stages found, or (not calibrated) what that costs.
        spec: the pass as it ran (a calibrated config differs from the one asked for).
        state: learned tensors (name -> tensor), saved beside the result.
        seconds: time the stages took.
    """

    index: int
    pass_name: str
    need: Need
    calibrated: bool
    summary: str
    spec: str
    state: Mapping[str, torch.Tensor] = field(default_factory=dict)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict (tensor names only)."""
        return {"index": self.index, "pass": self.pass_name, "need": self.need.value,
                "calibrated": self.calibrated, "summary": self.summary, "spec": self.spec,
                "state": sorted(self.state), "seconds": round(self.seconds, 3)}


def calibration_batches(ids: Sequence[int] | torch.Tensor, budget: Budget) -> list[torch.Tensor]:
    """The first ``budget.tokens`` of ``ids`` as (1, ``budget.seq_len``) batches (a short tail dropped)."""
    flat = torch.as_tensor(ids, dtype=torch.long).reshape(-1)[: budget.tokens]
    n = budget.seq_len
    return [flat[i : i + n][None] for i in range(0, flat.numel() - n + 1, n)]


class Pass(abc.ABC):
    """Base class of every pass.

    Subclasses set ``name`` (kebab-case, verb + object), ``config_class`` (a frozen dataclass) and
    ``matches`` (what the finder looks for, used in "matched nothing" errors), and implement
    ``__call__``. ``exact`` says whether the rewrite preserves outputs within dtype tolerance.
    ``needs`` says what a lossy pass needs to be faithful (the pipeline's ``calibrators`` table,
    ``condfx.lifecycle.CALIBRATORS``, refines it per config and runs the stages).
    """

    name: ClassVar[str]
    config_class: ClassVar[type]
    matches: ClassVar[str] = "region"
    exact: ClassVar[bool] = True
    needs: ClassVar[Need] = Need.NONE

    def __init__(self, config: Any = None):
        if config is None:
            config = self.config_class()
        if not isinstance(config, self.config_class):
            msg = (
                f"{type(self).__name__} needs a {self.config_class.__name__}; "
                f"got {type(config).__name__}."
            )
            raise TypeError(msg)
        self.config = config

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config!r})"

    @abc.abstractmethod
    def __call__(self, gm: fx.GraphModule) -> PassResult:
        """Rewrites ``gm`` in place and returns the result with its report."""

    def requires(self, gm: fx.GraphModule) -> None:
        """Precondition hook, run by the pipeline before the pass. Default: the shared invariants."""
        check_graph_invariants(gm, self.name)

    def ensures(self, gm: fx.GraphModule) -> None:
        """Postcondition hook, run by the pipeline after the pass. Default: the shared invariants."""
        check_graph_invariants(gm, self.name)
