"""Decode rule of ``condfx.attention`` (``fuse-attention``): full or sliding-window K/V cache.

    condfx.attention(q, k, v, scale, window)
        → condfx.attention(q, cat([past_k, k], 2), cat([past_v, v], 2), scale, window);
          presents: the two cats (B, Hkv, P + T, D)
  window 0 keeps every position (``FullKVLayout``, a position source); window W keeps the last W - 1
  (``WindowKVLayout``): the op aligns queries to the end of the keys, so a trimmed past stays exact.
"""

from __future__ import annotations

from typing import ClassVar

from torch import fx

from condfx.layouts import CacheLayout, FullKVLayout, WindowKVLayout
from condfx.passes.decode.base import DecodeContext, DecodeRule, cat_past, kv_shape, op_arg


class AttentionDecodeRule(DecodeRule):
    """``condfx.attention`` → the same op over cat(past, new)."""

    pass_name: ClassVar[str] = "fuse-attention"

    def layout(self, node: fx.Node, layer: int) -> CacheLayout:
        heads, dim, dtype = kv_shape(node)
        window = int(op_arg(node, "window") or 0)
        if window > 0:
            return WindowKVLayout(layer, heads, dim, dtype, window_size=window)
        return FullKVLayout(layer, heads, dim, dtype)

    def rewire(self, node: fx.Node, layout: CacheLayout, past: list[fx.Node],
               ctx: DecodeContext) -> list[fx.Node]:
        return cat_past(ctx.graph, node, past)
