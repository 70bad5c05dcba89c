"""Remove the global branch of L2A layers whose router rarely fires: they become window-only.

Rewrites (per L2A layer of ``route-attention`` whose recorded routed fraction < ``max_fraction``):
    h + gate * o'(condfx.routed_attention(q'(s), k'(s), v'(s), route, scale))    → h
    form=select: where(route, condfx.routed_attention(q, k, v, route, ...), window)  → window
  and drops the layer's ``l2a`` state (router, norm and q/k/v/o copies, buffers), so the layer
  keeps only its sliding-window attention and its bounded cache; the full-length global KV cache
  of that layer disappears (the source of L2A's KV-memory savings).

Requires: ``route-attention`` output with routing statistics recorded by
  ``condfx.l2a.record_route_stats`` (the ``l2a.route_stats`` buffers); the pass fails with one
  sentence when a selected layer has none. Must run before ``add-kv-cache``.

Does not handle: graphs in decode form (run it before ``add-kv-cache``). Lossy (``exact = False``):
  tokens the pruned router would have routed lose their global attention. Paper: L2A, section
  "post-training pruning" (TECHNIQUES.md 1.1).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from types import MappingProxyType
from typing import ClassVar

import torch
from torch import fx

from condfx.options import Float, check_options
from condfx.passes._insert import remove_dead_calls
from condfx.passes.base import GraphSnapshot, Pass, PassResult, layer_indices, select_layers
from condfx.passes.report import estimate_cost
from condfx.patterns import find_regions
from condfx.patterns.routed import TAG, RoutedLayer, find_routed_layers

_BOUNDS = MappingProxyType({"max_fraction": Float(0.0, 1.0)})


@dataclass(frozen=True)
class PruneGlobalConfig:
    """Options of ``prune-global``.

    Attributes:
        max_fraction: layers routing a smaller fraction of queries than this lose their global branch.
        layers: layer indices that may be pruned; None considers every L2A layer.
    """

    max_fraction: float = 0.05
    layers: tuple[int, ...] | None = None

    def __post_init__(self):
        check_options(self, _BOUNDS)
        object.__setattr__(self, "layers", layer_indices(self.layers, "PruneGlobalConfig.layers"))


def _selected(gm: fx.GraphModule, cfg: PruneGlobalConfig) -> list[RoutedLayer]:
    layers = find_routed_layers(gm)
    if not layers:
        msg = "prune-global found no L2A layer: apply 'route-attention' (and train it) first."
        raise ValueError(msg)
    selected = select_layers(PruneGlobal.name, cfg.layers, (r.layer for r in layers), "L2A", "the")
    chosen = [r for r in layers if r.layer in selected]
    unrecorded = [r.layer for r in chosen if r.routed_fraction is None]
    if unrecorded:
        msg = (
            f"prune-global needs routing statistics, but layer {unrecorded[0]} has none recorded: run "
            "condfx.l2a.record_route_stats(gm, batches) on calibration text first."
        )
        raise ValueError(msg)
    return chosen


def prune_global_replacement(gm: fx.GraphModule, layer: RoutedLayer) -> None:
    """Reroutes the layer's output to its window-branch stream and deletes its global branch."""
    out = layer.nodes["out"]
    select = out.target is torch.ops.aten.where.self  # form=select: where(route, global, window)
    out.replace_all_uses_with(out.args[2] if select else out.args[0])
    gm.graph.erase_node(out)
    remove_dead_calls(gm.graph)
    for node in gm.graph.nodes:  # form=select tags its window op and router input, which stay
        if node.meta.get(TAG, (None,))[0] == layer.prefix:
            del node.meta[TAG]
    stale = f"{layer.prefix}.l2a."
    for node in list(gm.graph.nodes):
        if node.op == "get_attr" and str(node.target).startswith(stale) and not node.users:
            gm.graph.erase_node(node)
    delattr(gm.get_submodule(layer.prefix), "l2a")


def _global_regions(attention, layers: list[RoutedLayer]):
    """Stand-ins for the global branches of ``layers`` (full-length cache) for the cost estimate."""
    by_layer = {r.layer: r for r in attention}
    return [dataclasses.replace(by_layer[x.layer], window=None) for x in layers if x.layer in by_layer]


class PruneGlobal(Pass):
    """``prune-global``: L2A layers with a rarely-firing router → window-only layers."""

    name: ClassVar[str] = "prune-global"
    config_class: ClassVar[type] = PruneGlobalConfig
    matches: ClassVar[str] = "L2A layer"
    exact: ClassVar[bool] = False

    def requires(self, gm: fx.GraphModule) -> None:
        """The shared invariants and the order rules (``passes/decode_rules.ORDER_RULES``)."""
        from condfx.passes.decode_rules import check_order

        super().requires(gm)
        check_order(gm, self.name)

    def __call__(self, gm: fx.GraphModule) -> PassResult:
        snapshot = GraphSnapshot.take(gm)
        cfg = self.config
        chosen = _selected(gm, cfg)
        everyone = find_routed_layers(gm)
        regions = find_regions(gm)
        prune = [r for r in chosen if r.routed_fraction < cfg.max_fraction]
        skipped = tuple(
            ("routes too often", f"layer {r.layer}: {r.routed_fraction:.3f} >= {cfg.max_fraction}")
            for r in chosen if r not in prune
        )
        for layer in prune:
            prune_global_replacement(gm, layer)
        if prune:
            gm.graph.lint()
            gm.recompile()
        kept = [r for r in everyone if r not in prune]
        report = snapshot.report(
            gm, self.name, matched=len(chosen), rewritten=len(prune), skipped=skipped,
            cost_before=estimate_cost(regions.attention + _global_regions(regions.attention, everyone), regions.ffn),
            cost_after=estimate_cost(regions.attention + _global_regions(regions.attention, kept), regions.ffn),
        )
        return PassResult(gm, bool(prune), report)
