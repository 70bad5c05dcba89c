"""What the two ``skip-ffn`` policies share: the ``condfx.masked_ffn`` call, the site of one
rewritten FFN, and the ``FFNSkipPolicy`` protocol that ``skip_ffn.POLICIES`` maps each
``SkipPolicy`` to (``skip_ffn_similarity.SimilarityPolicy``, ``skip_ffn_forecast.ForecastPolicy``).

A policy is stateless: what it reads before the graph changes is returned by ``prepare`` and handed
back to ``finish``; what flows from one FFN to the next (the similarity countdown) is the carry that
``start`` returns and each ``rewrite`` passes on.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import fx

import condfx.ops  # noqa: F401  (registers torch.ops.condfx.*)
from condfx.passes.graph_builder import GraphBuilder
from condfx.passes.skip_ffn_branch import Branch, masked_branch
from condfx.patterns.regions import FFNKind, FFNRegion, MoERegion, ResidualAdd

if TYPE_CHECKING:
    from condfx.passes.skip_ffn_config import SkipFFNConfig

MASKED_FFN = torch.ops.condfx.masked_ffn.default
COUNTDOWN_FFN = torch.ops.condfx.countdown_masked_ffn.default
aten = torch.ops.aten


def is_masked_ffn(node: fx.Node) -> bool:
    """True when ``node`` is a ``condfx.masked_ffn`` call."""
    return node.op == "call_function" and node.target is MASKED_FFN


def is_countdown_ffn(node: fx.Node) -> bool:
    """True when ``node`` is a ``condfx.countdown_masked_ffn`` call (the similarity policy fused)."""
    return node.op == "call_function" and node.target is COUNTDOWN_FFN


def execute_mask(node: fx.Node, env: dict, out: Any) -> torch.Tensor:
    """The (B, T) execute mask of a ``condfx.masked_ffn`` (its input) or ``condfx.countdown_masked_ffn``
    (its third output ``out[2]``) call that an interpreter just ran (``env``: its values so far)."""
    from condfx.passes.op_args import op_arg

    return out[2] if is_countdown_ffn(node) else env[op_arg(node, "execute")]


@dataclass(frozen=True)
class FFNSite:
    """One FFN region being rewritten.

    Attributes:
        region: the FFN region (or the MoE block).
        residual: its residual add (``residual.node`` is the builder's anchor).
        index: position among the rewritten regions (0 for the first non-cold one).
        warm: (B, T) bool, True for tokens at positions < warmup, or None without warm-up.
        branch: the block as the general masked FFN carries it (``skip_ffn_branch``), or None when
            ``condfx.masked_ffn`` carries it.
    """

    region: FFNRegion | MoERegion
    residual: ResidualAdd
    index: int
    warm: fx.Node | None
    branch: Branch | None = None


class FFNSkipPolicy(Protocol):
    """How one ``SkipPolicy`` decides which rows of each FFN execute."""

    def prepare(self, gm: fx.GraphModule, cfg: SkipFFNConfig) -> Any:
        """Checks and reads what the policy needs before the graph changes; returns its context."""

    def start(self, b: GraphBuilder, row: fx.Node, cfg: SkipFFNConfig) -> Any:
        """Builds what runs once before the first FFN (``row``: a (B, T) slice); returns the carry."""

    def rewrite(self, b: GraphBuilder, site: FFNSite, cfg: SkipFFNConfig, carry: Any) -> Any:
        """Rewrites one FFN (``b`` inserts before its residual add); returns the next carry."""

    def finish(self, gm: fx.GraphModule, cfg: SkipFFNConfig, sites: list[FFNSite], context: Any) -> None:
        """Runs after every FFN was rewritten, with ``prepare``'s context."""


def act_name(region: FFNRegion) -> str:
    """The ``act`` argument of ``condfx.masked_ffn`` for ``region``'s activation."""
    act = region.act
    if act.op == "call_function" and act.target is aten.silu.default:
        return "silu"
    if act.op == "call_function" and act.target is aten.gelu.default:
        return "gelu_tanh" if act.kwargs.get("approximate", "none") == "tanh" else "gelu"
    if region.kind is FFNKind.SWIGLU and act.target is aten.mul.Tensor:
        return "silu"  # x * sigmoid(x)
    return "gelu_tanh"  # the explicit tanh formula (HF "gelu_new")


def masked_update(b: GraphBuilder, site: FFNSite, execute: fx.Node) -> tuple[fx.Node, fx.Node]:
    """Inserts the masked FFN of ``site`` (``condfx.masked_ffn``, or the general form when
    ``site.branch`` is set) with the (B, T) bool ``execute``; returns (update (B, T, d), cos (B, T))."""
    if site.branch is not None:
        return masked_branch(b, site.branch, execute)
    fused = call_masked_ffn(b, site, execute)
    return b.call(operator.getitem, fused, 0), b.call(operator.getitem, fused, 1)


def call_countdown_ffn(b: GraphBuilder, site: FFNSite, countdown: fx.Node, threshold: float,
                      span: int) -> fx.Node:
    """Inserts ``condfx.countdown_masked_ffn`` for ``site`` (the similarity policy and the masked FFN
    in one op); returns the (update, next countdown, execute) tuple node."""
    region, gate = site.region, site.region.gate
    return b.call(
        COUNTDOWN_FFN,
        region.x_in, site.residual.stream, countdown, site.warm, region.up.weight, region.up.bias,
        gate.weight if gate else None, gate.bias if gate else None,
        region.down.weight, region.down.bias,
        region.kind.value, act_name(region), region.up.weight_layout, float(threshold), int(span),
    )


def call_masked_ffn(b: GraphBuilder, site: FFNSite, execute: fx.Node) -> fx.Node:
    """Inserts ``condfx.masked_ffn`` for ``site`` with the (B, T) bool ``execute``; returns the
    (update, cos) tuple node."""
    region, gate = site.region, site.region.gate
    return b.call(
        MASKED_FFN,
        region.x_in, site.residual.stream, execute, region.up.weight, region.up.bias,
        gate.weight if gate else None, gate.bias if gate else None,
        region.down.weight, region.down.bias,
        region.kind.value, act_name(region), region.up.weight_layout,
    )
