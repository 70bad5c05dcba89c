"""Keep the first tokens and a sliding window: StreamingLLM's attention sinks, a bounded KV cache.

Rewrites (every selected causal attention region with half-split RoPE):
    attention(q, k, v, s)   (SDPA, the eager chain, or condfx.attention without a window)
        → condfx.sink_window_attention(q, k, v, positions, inv_freq, s, sink, window)
  where ``positions`` is the arange(T) that feeds the region's RoPE (so the decode form's offset
  positions reach the op) and ``inv_freq`` the RoPE frequencies read from the graph
  (``patterns.rope_freq``). Every query reads the first ``sink`` tokens and the last ``window``
  tokens (itself included); the sinks are scored at StreamingLLM's cache positions
  (``condfx/ops/sink_window.py``). In decode form the layer's cache holds at most
  sink + window - 1 tokens (``condfx.layouts.sink_window``): memory stays bounded however long the
  generation runs. Lossy: positions further back than the window are no longer read.

Requires: the canonical IR and attention regions whose RoPE cos/sin evaluate to
  cos/sin(position * inv_freq) and descend from an arange(T) (int64, or float: then cast). Must run before ``add-kv-cache``.

Does not handle: models without RoPE (learned or absolute position embeddings, ALiBi: StreamingLLM
  shifts positions inside the cache, which those cannot express), layers that already have a
  window: each is skipped with a reason. Reference: arXiv 2309.17453; issue 13 item 7.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import fx

import condfx.ops  # noqa: F401  (registers torch.ops.condfx.*)
from condfx.options import BIG_INT, Int, check_options
from condfx.passes._insert import erase_unused, remove_dead_calls
from condfx.passes.base import GraphSnapshot, Pass, PassResult, layer_indices, select_layers
from condfx.passes.graph_builder import GraphBuilder
from condfx.patterns import find_regions
from condfx.patterns.regions import AttentionRegion, MatchFailure
from condfx.patterns.rope_freq import rope_inv_freq

SINK_WINDOW = torch.ops.condfx.sink_window_attention.default
_ARANGES = (torch.ops.aten.arange.default, torch.ops.aten.arange.start, torch.ops.aten.arange.start_step)


@dataclass(frozen=True)
class SinkWindowConfig:
    """Options of ``sink-window``.

    Attributes:
        sink: the first tokens every query keeps reading (the attention sinks), >= 0.
        window: the most recent tokens every query reads, itself included, >= 1.
        layers: layer indices to rewrite; None rewrites every attention region found.
    """

    sink: int = 4
    window: int = 1024
    layers: tuple[int, ...] | None = None

    def __post_init__(self):
        check_options(self, {"sink": Int(0, BIG_INT), "window": Int(1, BIG_INT)})
        object.__setattr__(self, "layers", layer_indices(self.layers, "SinkWindowConfig.layers"))


def is_sink_window_attention(node: fx.Node) -> bool:
    """True when ``node`` is a ``condfx.sink_window_attention`` call."""
    return node.op == "call_function" and node.target is SINK_WINDOW


def position_arange(region: AttentionRegion) -> fx.Node | None:
    """The 1-D arange among the ancestors of the region's RoPE cos table (its positions), or None."""
    stack, seen = [region.rope.cos], set()
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        val = node.meta.get("val")
        if node.target in _ARANGES and isinstance(val, torch.Tensor) and val.dim() == 1:
            return node
        stack.extend(node.all_input_nodes)
    return None


def check_sink_window(gm: fx.GraphModule, region: AttentionRegion):
    """(positions node, inv_freq) for ``region``, or the MatchFailure saying why it is skipped."""
    def fail(reason: str) -> MatchFailure:
        return MatchFailure(reason, region.core, f"layer {region.layer}", "attention")

    if is_sink_window_attention(region.core):
        return fail("already sink-window")
    if not region.causal:
        return fail("non-causal attention")
    if region.score_options is not None:
        return fail(f"{region.score_options} (condfx.sink_window_attention has no score options)")
    if region.window:
        return fail("layer already has a sliding window")
    if region.rope is None or region.rope.cos is None:
        return fail("no RoPE (positions cannot move into the cache)")
    if region.rope.rotary_dim not in (None, region.head_dim):
        return fail("partial RoPE")
    inv_freq = rope_inv_freq(gm, region.rope, region.head_dim)
    if isinstance(inv_freq, MatchFailure):
        return fail(inv_freq.reason)
    positions = position_arange(region)
    if positions is None:
        return fail("no position arange feeds RoPE")
    return positions, inv_freq


def sink_window_replacement(gm, region: AttentionRegion, positions, inv_freq, cfg) -> fx.Node:
    """Inserts the op in place of the region's core; returns it."""
    g = GraphBuilder(gm, region.core)
    if positions.meta["val"].dtype != torch.long:  # a float arange (RoPE tables built in float)
        positions = g.call(torch.ops.aten.to.dtype, positions, torch.long)
    freq = g.constant(region.module_path, "sink_window_inv_freq", inv_freq.to(torch.float32).contiguous())
    node = g.call(SINK_WINDOW, region.q, region.k, region.v, positions, freq, float(region.scale),
                  cfg.sink, cfg.window)
    region.core.replace_all_uses_with(node)
    erase_unused(gm.graph, [region.core, *region.core_nodes])
    return node


class SinkWindow(Pass):
    """``sink-window``: attention reads the first ``sink`` and the last ``window`` tokens only."""

    name: ClassVar[str] = "sink-window"
    config_class: ClassVar[type] = SinkWindowConfig
    matches: ClassVar[str] = "attention region"
    exact: ClassVar[bool] = False

    def __call__(self, gm: fx.GraphModule) -> PassResult:
        snapshot, cfg = GraphSnapshot.take(gm), self.config
        regions = find_regions(gm)
        done = [n for n in gm.graph.nodes if is_sink_window_attention(n)]
        if done:  # a second run: the rewritten layers are no attention regions any more
            skipped = tuple(("already sink-window", f"node {n.name}") for n in done)
            return PassResult(gm, False, snapshot.report(gm, self.name, matched=len(done), skipped=skipped))
        chosen = select_layers(self.name, cfg.layers, (r.layer for r in regions.attention))
        selected = [r for r in regions.attention if r.layer in chosen]
        skipped = []
        rewritten = 0
        for region in selected:
            checked = check_sink_window(gm, region)
            if isinstance(checked, MatchFailure):
                skipped.append((checked.reason, checked.detail))
                continue
            sink_window_replacement(gm, region, *checked, cfg)
            rewritten += 1
        if rewritten:
            remove_dead_calls(gm.graph)
            gm.graph.lint()
            gm.recompile()
        report = snapshot.report(gm, self.name, matched=len(selected), rewritten=rewritten,
                                 skipped=tuple(skipped))
        return PassResult(gm, rewritten > 0, report)
