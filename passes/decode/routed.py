"""Decode rule of L2A's ``condfx.routed_attention`` (``route-attention``): the global branch reads
every key, so it keeps a full K/V cache (a position source).

    condfx.routed_attention(q, k, v, route, scale)
        → condfx.routed_attention(q, cat([past_k, k], 2), cat([past_v, v], 2), route, scale)
  The layer's sliding-window branch is a ``condfx.attention`` with its own window cache; after
  ``prune-global`` only that one is left.
"""

from __future__ import annotations

from typing import ClassVar

from torch import fx

from condfx.layouts import CacheLayout, FullKVLayout
from condfx.passes.decode.base import DecodeContext, DecodeRule, cat_past, kv_shape


class RoutedDecodeRule(DecodeRule):
    """``condfx.routed_attention`` → the same op over cat(past, new), full cache."""

    pass_name: ClassVar[str] = "route-attention"

    def layout(self, node: fx.Node, layer: int) -> CacheLayout:
        return FullKVLayout(layer, *kv_shape(node))

    def rewire(self, node: fx.Node, layout: CacheLayout, past: list[fx.Node],
               ctx: DecodeContext) -> list[fx.Node]:
        return cat_past(ctx.graph, node, past)
