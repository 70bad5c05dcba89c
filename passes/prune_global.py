"""Remove the global branch of L2A layers whose router rarely fires: they become window-only.

Which layers: those whose recorded routed fraction < ``max_fraction`` (threshold mode, the default
  0.05), or with ``share`` the floor(share x n + 0.5) of the n selected L2A layers that route the smallest
  fraction (ties: the lower layer index first), whatever their fractions: the recipe form, since a
  calibrated select form routes about the same fraction everywhere unless its ``floor`` lets cheap
  layers skip more. In share mode a layer left alone is skipped as "outside the pruned share", which
  ``passes/pipeline.py`` accepts when it is every layer (a report line, not an error).

Rewrites (per chosen L2A layer):
    h + gate * o'(condfx.routed_attention(q'(s), k'(s), v'(s), route, scale))    → h
    form=select: where(route, condfx.routed_attention(q, k, v, route, ...), window)  → window
      (the window branch with its correction, whose parameters move to ``<prefix>.l2a_window``)
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
import math
from dataclasses import dataclass
from types import MappingProxyType
from typing import ClassVar

import torch
from torch import fx, nn

from condfx.options import Float, check_options
from condfx.passes._insert import remove_dead_calls
from condfx.passes.base import GraphSnapshot, Pass, PassResult, layer_indices, select_layers
from condfx.passes.report import estimate_cost
from condfx.patterns import find_regions
from condfx.patterns.routed import TAG, RoutedLayer, find_routed_layers

_BOUNDS = MappingProxyType({"max_fraction": Float(0.0, 1.0), "share": Float(0.0, 1.0)})  # each may be None
DEFAULT_MAX_FRACTION = 0.05
OUTSIDE_SHARE = "outside the pruned share"  # the skip reason of share mode (pipeline.QUIET_SKIPS)


@dataclass(frozen=True)
class PruneGlobalConfig:
    """Options of ``prune-global``.

    Attributes:
        max_fraction: layers routing a smaller fraction of queries than this lose their global branch
            (None: 0.05 unless ``share`` is given).
        share: instead, the fraction of the selected L2A layers to prune, those routing least first
            (floor(share x n + 0.5) layers; 0 prunes none).
        layers: layer indices that may be pruned; None considers every L2A layer.
    """

    max_fraction: float | None = None
    share: float | None = None
    layers: tuple[int, ...] | None = None

    def __post_init__(self):
        check_options(self, {k: b for k, b in _BOUNDS.items() if getattr(self, k) is not None})
        if self.max_fraction is not None and self.share is not None:
            msg = (f"PruneGlobalConfig takes max_fraction (a routed-fraction threshold) or share (a fraction "
                   f"of the layers), not both; got max_fraction={self.max_fraction}, share={self.share}.")
            raise ValueError(msg)
        if self.max_fraction is None and self.share is None:
            object.__setattr__(self, "max_fraction", DEFAULT_MAX_FRACTION)
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


def _to_prune(chosen: list[RoutedLayer], cfg: PruneGlobalConfig):
    """The layers to prune and a ``(reason, detail)`` per layer kept."""
    if cfg.share is None:
        prune = [r for r in chosen if r.routed_fraction < cfg.max_fraction]
        skipped = tuple(
            ("routes too often", f"layer {r.layer}: {r.routed_fraction:.3f} >= {cfg.max_fraction}")
            for r in chosen if r not in prune
        )
        return prune, skipped
    count = math.floor(cfg.share * len(chosen) + 0.5)  # halves round up
    ranked = sorted(chosen, key=lambda r: (r.routed_fraction, r.layer))
    prune, kept = ranked[:count], ranked[count:]
    cut = f"the {count} of {len(chosen)} routing least (share {cfg.share})"
    skipped = tuple(
        (OUTSIDE_SHARE, f"layer {r.layer}: routes {r.routed_fraction:.3f}, not among {cut}")
        for r in sorted(kept, key=lambda r: r.layer)
    )
    return sorted(prune, key=lambda r: r.layer), skipped


def prune_global_replacement(gm: fx.GraphModule, layer: RoutedLayer) -> None:
    """Reroutes the layer's output to its window-branch stream and deletes its global branch; what the
    window branch still reads of the layer's ``l2a`` state (form=select's window correction) moves to
    ``<prefix>.l2a_window``."""
    out = layer.nodes["out"]
    select = out.target is torch.ops.aten.where.self  # form=select: where(route, global, window)
    out.replace_all_uses_with(out.args[2] if select else out.args[0])
    gm.graph.erase_node(out)
    remove_dead_calls(gm.graph)
    for node in gm.graph.nodes:  # form=select tags its window op and router input, which stay
        if node.meta.get(TAG, (None,))[0] == layer.prefix:
            del node.meta[TAG]
    stale = f"{layer.prefix}.l2a."
    kept = nn.Module()  # what the window branch still reads (form=select's window correction)
    for node in list(gm.graph.nodes):
        if node.op != "get_attr" or not str(node.target).startswith(stale):
            continue
        if not node.users:
            gm.graph.erase_node(node)
            continue
        name = str(node.target)[len(stale):]
        if not hasattr(kept, name):
            value = getattr(layer.state, name)
            (kept.register_parameter if isinstance(value, nn.Parameter) else kept.register_buffer)(name, value)
        node.target = f"{layer.prefix}.l2a_window.{name}"
    owner = gm.get_submodule(layer.prefix)
    delattr(owner, "l2a")
    if list(kept.named_parameters()) or list(kept.named_buffers()):
        owner.add_module("l2a_window", kept)


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
        prune, skipped = _to_prune(chosen, cfg)
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
