"""Decode rule of IHA's ``condfx.interleaved_attention`` (``interleave-heads``): P pseudo-K/V rows
per token, never trimmed (the op takes RoPE positions from the row index).

    condfx.interleaved_attention(q, k, v, inv_freq, scale, pseudo, ...)
        → the same op over cat([past_k, k], 2), cat([past_v, v], 2); k/v hold P rows per token
  The cache's length over P is the position (``InterleavedKVLayout.rows_per_token``).
"""

from __future__ import annotations

from typing import ClassVar

from torch import fx

from condfx.layouts import CacheLayout, InterleavedKVLayout
from condfx.passes.decode.base import DecodeContext, DecodeRule, cat_past, kv_shape, op_arg


class InterleavedDecodeRule(DecodeRule):
    """``condfx.interleaved_attention`` → the same op over cat(past, new), P rows per token."""

    pass_name: ClassVar[str] = "interleave-heads"

    def layout(self, node: fx.Node, layer: int) -> CacheLayout:
        return InterleavedKVLayout(layer, *kv_shape(node), pseudo_rows=int(op_arg(node, "pseudo")))

    def rewire(self, node: fx.Node, layout: CacheLayout, past: list[fx.Node],
               ctx: DecodeContext) -> list[fx.Node]:
        return cat_past(ctx.graph, node, past)
