"""Decode rule of ``condfx.sink_window_attention`` (``sink-window``): the sinks + window cache.

    condfx.sink_window_attention(q, k, v, positions, inv_freq, scale, sink, window)
        → the same op over cat([past_k, k], 2), cat([past_v, v], 2); presents: the two cats
  The cache (``SinkWindowKVLayout``) keeps the first ``sink`` positions and the last ``window - 1``;
  the op takes the first ``sink`` keys as the sinks and aligns the queries to the end of the rest,
  and ``positions`` is the RoPE arange that ``add-kv-cache`` offsets by P, so a trimmed past stays
  exact. Its length is not the position: another layer must give P.
  When the op's k and v are float32 rounded through float16 (``quantize-kv`` does this to every
  sink-window op: ``round_through_float16``), the ring is stored as float16 (the layout's
  ``ring_dtype``) and handed back as float32: every value the op reads is one a float16 holds, so
  the decode form stays equal to the rewritten model while the ring takes half the bytes.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import fx

from condfx.layouts.base import CacheLayout
from condfx.layouts.sink_window import SinkWindowKVLayout
from condfx.passes.decode.base import DecodeContext, DecodeRule, cat_past, kv_shape, op_arg

aten = torch.ops.aten
_TO_COPY = aten._to_copy.default


def round_through_float16(graph: fx.Graph, x: fx.Node) -> fx.Node:
    """x (float32) → x.to(float16).to(float32), inserted after x: the values a float16 ring keeps."""
    from condfx.passes.graph_builder import GraphBuilder

    b = GraphBuilder(graph.owning_module, x.next, like=x)
    half = b.call(_TO_COPY, x, dtype=torch.float16)
    return b.call(_TO_COPY, half, dtype=torch.float32)


def _is_float16_round_trip(x) -> bool:
    if not (isinstance(x, fx.Node) and x.target is _TO_COPY and x.kwargs.get("dtype") == torch.float32):
        return False
    half = x.args[0]
    return isinstance(half, fx.Node) and half.target is _TO_COPY and half.kwargs.get("dtype") == torch.float16


def ring_dtype(node: fx.Node) -> str:
    """"float16" when the sink-window op's k and v are both rounded through float16, else "" (its own dtype)."""
    both = all(_is_float16_round_trip(op_arg(node, name)) for name in ("k", "v"))
    return "float16" if both else ""


class SinkWindowDecodeRule(DecodeRule):
    """``condfx.sink_window_attention`` → the same op over cat(past, new)."""

    pass_name: ClassVar[str] = "sink-window"

    def layout(self, node: fx.Node, layer: int) -> CacheLayout:
        heads, dim, dtype = kv_shape(node)
        return SinkWindowKVLayout(layer, heads, dim, dtype, sink=int(op_arg(node, "sink")),
                                  window_size=int(op_arg(node, "window")), ring_dtype=ring_dtype(node))

    def rewire(self, node: fx.Node, layout: CacheLayout, past: list[fx.Node],
               ctx: DecodeContext) -> list[fx.Node]:
        return cat_past(ctx.graph, node, past)
