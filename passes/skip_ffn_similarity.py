"""``skip-ffn{policy=similarity}`` (FFN-SkipLLM): skip the next ``span`` FFNs of a token once an
executed FFN barely changed its hidden state.

Rewrites (per rewritten FFN i, in graph order; countdown (B, T) int64 starts at 0):
    execute_i = (countdown == 0) | warm
    update_i, cos_i = condfx.masked_ffn(x, h_in, execute_i, ...);  h_out = h_in + update_i
      (or the general masked FFN of ``skip_ffn_branch`` for blocks the op does not carry)
    countdown = where(execute_i & ~warm & (cos_i >= threshold), span, max(countdown - 1, 0))
  The countdown flows from layer to layer as tensor data. Paper: Jaiswal et al., "FFN-SkipLLM".
  Blocks ``condfx.masked_ffn`` carries get all of the above as one op per layer,
  ``update_i, countdown, execute_i = condfx.countdown_masked_ffn(x, h_in, countdown, warm, ...,
  threshold, span)`` (``condfx/ops/countdown_ffn.py``: the same decisions, without ten small ops
  around each FFN at batch 1); general-form blocks keep the ops above.
"""

from __future__ import annotations

import operator
from typing import TYPE_CHECKING, Any

import torch
from torch import fx

from condfx.passes.graph_builder import GraphBuilder
from condfx.passes.skip_ffn_policy import FFNSite, call_countdown_ffn, masked_update

if TYPE_CHECKING:
    from condfx.passes.skip_ffn_config import SkipFFNConfig

aten = torch.ops.aten


class SimilarityPolicy:
    """The countdown policy above; carry: the countdown node."""

    def prepare(self, gm: fx.GraphModule, cfg: SkipFFNConfig) -> Any:
        """Nothing to read: the thresholds are options."""
        return None

    def start(self, b: GraphBuilder, row: fx.Node, cfg: SkipFFNConfig) -> fx.Node:
        """The countdown: (B, T) int64 zeros."""
        return b.call(aten.zeros_like.default, row, dtype=torch.int64)

    def rewrite(self, b: GraphBuilder, site: FFNSite, cfg: SkipFFNConfig, carry: fx.Node) -> fx.Node:
        """Inserts the masked FFN and the countdown update; returns the new countdown."""
        countdown, warm = carry, site.warm
        if site.branch is None:  # the fused op: one node per layer
            fused = call_countdown_ffn(b, site, countdown, cfg.threshold, cfg.span)
            site.residual.node.replace_input_with(site.residual.branch, b.call(operator.getitem, fused, 0))
            return b.call(operator.getitem, fused, 1)
        execute = b.call(aten.eq.Scalar, countdown, 0)  # (B, T)
        if warm is not None:
            execute = b.call(aten.bitwise_or.Tensor, execute, warm)
        update, cos = masked_update(b, site, execute)  # (B, T, d), (B, T)
        site.residual.node.replace_input_with(site.residual.branch, update)
        trigger = b.call(aten.logical_and.default, execute, b.call(aten.ge.Scalar, cos, cfg.threshold))
        if warm is not None:
            trigger = b.call(aten.logical_and.default, trigger, b.call(aten.logical_not.default, warm))
        left = b.call(aten.clamp_min.default, b.call(aten.sub.Tensor, countdown, 1), 0)
        return b.call(aten.where.ScalarSelf, trigger, cfg.span, left)

    def finish(self, gm: fx.GraphModule, cfg: SkipFFNConfig, sites: list[FFNSite], context: Any) -> None:
        """Nothing to do."""
