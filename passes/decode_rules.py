"""The decode rules table: ``{condfx op overload: DecodeRule}``, read by ``add-kv-cache``; and the
order rules table: which pass may not follow which, read by the passes that stack on one graph.

Each rule lives next to the pass that introduces its op (``passes/decode/<op>.py``); a new cached
attention op is one new rule module plus one line here (and one line in ``condfx.layouts.LAYOUTS``
and ``runtime/cache_table.CACHES`` when it needs a new cache kind).

Order rules (``ORDER_RULES``, ``{(earlier pass, later pass): why}``; a pair not listed composes in
that order). The stack ``route-attention → prune-global → quantize-kv → skip-ffn → add-kv-cache``
composes into one graph with one cache set: quantize-kv then quantizes the window ring of every
layer and the global cache of every routed layer (``method=kivi``), and skip-ffn may come anywhere
before add-kv-cache. The passes that have run are read from the graph itself (``passes_in``: the ops
with a decode rule name their pass, route-attention's nodes carry its tag), so the rule holds for
any pipeline, spec file or recipe.
"""

from __future__ import annotations

from types import MappingProxyType

import torch
from torch import fx

import condfx.ops  # noqa: F401  (registers torch.ops.condfx.*)
from condfx.passes.base import PassError
from condfx.passes.decode.attention import AttentionDecodeRule
from condfx.passes.decode.interleaved import InterleavedDecodeRule
from condfx.passes.decode.quantized import QuantizedDecodeRule
from condfx.passes.decode.routed import RoutedDecodeRule
from condfx.passes.decode.sink_window import SinkWindowDecodeRule
from condfx.patterns.routed import TAG

DECODE_RULES = MappingProxyType({
    torch.ops.condfx.attention.default: AttentionDecodeRule(),
    torch.ops.condfx.interleaved_attention.default: InterleavedDecodeRule(),
    torch.ops.condfx.routed_attention.default: RoutedDecodeRule(),
    torch.ops.condfx.quantized_cache_attention.default: QuantizedDecodeRule(),
    torch.ops.condfx.sink_window_attention.default: SinkWindowDecodeRule(),
})
"""Decode rules, one module per cached-attention op (the table is ``passes/decode_rules.py``)."""

ORDER_RULES = MappingProxyType({
    ("quantize-kv", "route-attention"): (
        "route-attention rewrites plain attention into a window and a global branch, and quantize-kv "
        "has already turned the attention into quantized-cache attention; put route-attention first"),
    ("quantize-kv", "prune-global"): (
        "prune-global would delete global branches whose quantized caches quantize-kv has already "
        "planned and counted; put prune-global before quantize-kv"),
    ("quantize-kv", "sink-window"): (
        "sink-window rewrites plain attention and quantize-kv has already turned it into "
        "quantized-cache attention; put sink-window first"),
    ("quantize-kv", "interleave-heads"): (
        "interleave-heads rewrites plain attention and quantize-kv has already turned it into "
        "quantized-cache attention; put interleave-heads first"),
})
"""``(earlier, later) -> why``: ``later`` may not run on a graph ``earlier`` has rewritten."""


def passes_in(gm: fx.GraphModule) -> frozenset[str]:
    """Names of the attention passes whose work is in ``gm`` (by their ops and route-attention's tag)."""
    names = set()
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        rule = DECODE_RULES.get(node.target)
        if rule is not None and rule.pass_name:
            names.add(rule.pass_name)
        if TAG in node.meta:
            names.add("route-attention")
    return frozenset(names)


def check_order(gm: fx.GraphModule, later: str) -> None:
    """PassError naming both passes and why, when ``later`` may not follow a pass already in ``gm``."""
    for earlier in sorted(passes_in(gm)):
        why = ORDER_RULES.get((earlier, later))
        if why is not None:
            raise PassError(later, f"{later} cannot follow {earlier}: {why}")
