"""Decode rule of ``condfx.sink_window_attention`` (``sink-window``): the sinks + window cache.

    condfx.sink_window_attention(q, k, v, positions, inv_freq, scale, sink, window)
        → the same op over cat([past_k, k], 2), cat([past_v, v], 2); presents: the two cats
  The cache (``SinkWindowKVLayout``) keeps the first ``sink`` positions and the last ``window - 1``;
  the op takes the first ``sink`` keys as the sinks and aligns the queries to the end of the rest,
  and ``positions`` is the RoPE arange that ``add-kv-cache`` offsets by P, so a trimmed past stays
  exact. Its length is not the position: another layer must give P.
"""

from __future__ import annotations

from typing import ClassVar

from torch import fx

from condfx.layouts.base import CacheLayout
from condfx.layouts.sink_window import SinkWindowKVLayout
from condfx.passes.decode.base import DecodeContext, DecodeRule, cat_past, kv_shape, op_arg


class SinkWindowDecodeRule(DecodeRule):
    """``condfx.sink_window_attention`` → the same op over cat(past, new)."""

    pass_name: ClassVar[str] = "sink-window"

    def layout(self, node: fx.Node, layer: int) -> CacheLayout:
        heads, dim, dtype = kv_shape(node)
        return SinkWindowKVLayout(layer, heads, dim, dtype, sink=int(op_arg(node, "sink")),
                                  window_size=int(op_arg(node, "window")))

    def rewire(self, node: fx.Node, layout: CacheLayout, past: list[fx.Node],
               ctx: DecodeContext) -> list[fx.Node]:
        return cat_past(ctx.graph, node, past)
