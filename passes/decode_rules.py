"""The decode rules table: ``{condfx op overload: DecodeRule}``, read by ``add-kv-cache``.

Each rule lives next to the pass that introduces its op (``passes/decode/<op>.py``); a new cached
attention op is one new rule module plus one line here (and one line in ``condfx.layouts.LAYOUTS``
and ``runtime/cache_table.CACHES`` when it needs a new cache kind).
"""

from __future__ import annotations

from types import MappingProxyType

import torch

import condfx.ops  # noqa: F401  (registers torch.ops.condfx.*)
from condfx.passes.decode.attention import AttentionDecodeRule
from condfx.passes.decode.interleaved import InterleavedDecodeRule
from condfx.passes.decode.quantized import QuantizedDecodeRule
from condfx.passes.decode.routed import RoutedDecodeRule
from condfx.passes.decode.sink_window import SinkWindowDecodeRule

DECODE_RULES = MappingProxyType({
    torch.ops.condfx.attention.default: AttentionDecodeRule(),
    torch.ops.condfx.interleaved_attention.default: InterleavedDecodeRule(),
    torch.ops.condfx.routed_attention.default: RoutedDecodeRule(),
    torch.ops.condfx.quantized_cache_attention.default: QuantizedDecodeRule(),
    torch.ops.condfx.sink_window_attention.default: SinkWindowDecodeRule(),
})
