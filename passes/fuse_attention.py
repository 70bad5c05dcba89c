"""Replace the core of every causal attention region with one ``condfx.attention`` op.

Rewrites:
    sdpa(q, repeat_kv(k), repeat_kv(v), is_causal=True, scale=s)             → condfx.attention(q, k, v, s, 0)
    softmax(q @ repeat_kv(k)^T * s + causal_mask) @ repeat_kv(v)              → condfx.attention(q, k, v, s, 0)
    ... the same with a sliding-window mask of size W                          → condfx.attention(q, k, v, s, W)
    ... c * tanh(s / c) before the mask (Gemma2)                              → condfx.attention(..., softcap=c)
    ... + ALiBi bias (Bloom baddbmm, MPT table, Falcon bias in the mask)     → condfx.attention(..., alibi_slopes=m)
    ... softmax(cat([s, sinks], -1))[..., :-1] (GPT-OSS)                      → condfx.attention(..., sinks=z)
  K/V head repetition (GQA) is dropped: the op reads the Hkv heads directly. Exact: outputs agree
  within dtype tolerance (float32 logits within 1e-5).

Requires: the canonical IR from ``condfx.capture`` (FakeTensor metadata on every node) and the
  attention regions of ``condfx.patterns.find_regions``. Must run before any pass that rewrites
  attention regions into other ``condfx`` ops (it gives them one anchor to look for).

Does not handle: non-causal attention (encoders, prefix-LM masks), additive biases other than ALiBi
  and padding masks (padded batches), dropout, and cores whose query and key lengths are not
  provably equal (cross-attention, graphs captured with a KV cache): each is skipped with a reason.
  The op's ONNX and Triton lowerings live in ``codegen/onnx/attention.py`` and
  ``codegen/triton/attention.py``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

import condfx.ops  # noqa: F401  (registers torch.ops.condfx.*)
from condfx.passes._insert import erase_unused, remove_dead_calls
from condfx.passes.base import GraphSnapshot, Pass, PassResult, layer_indices, missing_layers
from condfx.passes.graph_builder import GraphBuilder
from condfx.passes.report import estimate_cost
from condfx.patterns import find_regions
from condfx.patterns.regions import AttentionRegion, MatchFailure

FUSED_TARGET = torch.ops.condfx.attention.default


@dataclass(frozen=True)
class FuseAttentionConfig:
    """Options of ``fuse-attention``.

    Attributes:
        layers: layer indices to fuse; None fuses every attention region found.
    """

    layers: tuple[int, ...] | None = None

    def __post_init__(self):
        object.__setattr__(self, "layers", layer_indices(self.layers, "FuseAttentionConfig.layers"))


def is_fused_attention(node: fx.Node) -> bool:
    """True when ``node`` is a ``condfx.attention`` call."""
    return node.op == "call_function" and node.target is FUSED_TARGET


def _same_length(q: fx.Node, k: fx.Node) -> bool:
    qv, kv = q.meta.get("val"), k.meta.get("val")
    return qv is not None and kv is not None and statically_known_true(qv.shape[2] == kv.shape[2])


def check_fusable(region: AttentionRegion) -> MatchFailure | None:
    """Returns why ``region`` cannot be fused, or None when it can."""
    if is_fused_attention(region.core):
        return MatchFailure("already fused", region.core, f"layer {region.layer}", "attention")
    if not region.causal:
        return MatchFailure("non-causal attention", region.core, f"layer {region.layer}", "attention")
    if not _same_length(region.q, region.k):
        detail = f"layer {region.layer}: query and key lengths are not provably equal"
        return MatchFailure("query/key length mismatch", region.core, detail, "attention")
    return None


def fuse_attention_replacement(gm: fx.GraphModule, region: AttentionRegion) -> fx.Node:
    """Inserts ``condfx.attention`` after the region's core and reroutes the core's users to it."""
    b = GraphBuilder(gm, region.core.next, like=region.core)  # right after the core
    args = [region.q, region.k, region.v, float(region.scale), int(region.window or 0)]
    if region.score_options is not None:
        slopes = list(region.alibi_slopes) if region.alibi_slopes is not None else None
        args += [float(region.softcap), slopes, region.sinks]
    fused = b.call(FUSED_TARGET, *args)
    region.core.replace_all_uses_with(fused)
    return fused


def _fused_cores_not_in(gm: fx.GraphModule, regions) -> list[fx.Node]:
    """condfx.attention nodes the finder did not report as regions (already fused, earlier run)."""
    cores = {r.core for r in regions}
    return [n for n in gm.graph.nodes if is_fused_attention(n) and n not in cores]


def _fuse_regions(gm: fx.GraphModule, selected: list[AttentionRegion]):
    """Fuses every fusable region; returns (regions after, skips, number rewritten)."""
    after, skipped, replaced = [], [], []
    for region in selected:
        failure = check_fusable(region)
        if failure is not None:
            skipped.append((failure.reason, failure.detail))
            after.append(region)
            continue
        fused = fuse_attention_replacement(gm, region)
        after.append(dataclasses.replace(region, core=fused, core_nodes=(fused,)))
        replaced += [region.core, *region.core_nodes]
    if replaced:
        erase_unused(gm.graph, replaced)
        remove_dead_calls(gm.graph)
        gm.graph.lint()
        gm.recompile()
    return after, skipped, len(after) - len(skipped)


class FuseAttention(Pass):
    """``fuse-attention``: causal attention cores → ``torch.ops.condfx.attention``."""

    name: ClassVar[str] = "fuse-attention"
    config_class: ClassVar[type] = FuseAttentionConfig
    matches: ClassVar[str] = "attention region"

    def __call__(self, gm: fx.GraphModule) -> PassResult:
        snapshot = GraphSnapshot.take(gm)
        regions = find_regions(gm)
        wanted = self.config.layers
        selected = [r for r in regions.attention if wanted is None or r.layer in wanted]
        # A missing layer is a skip here, not select_layers' PassError: tests pin it (route-attention
        # calls this pass on layers it has already checked).
        missing = missing_layers(wanted, (r.layer for r in regions.attention))
        skipped = [("layer not found", f"layer {i}") for i in missing]
        # condfx.attention nodes the finder does not report (fused by an earlier run).
        unseen = _fused_cores_not_in(gm, regions.attention) if wanted is None else []
        skipped += [("already fused", f"node {n.name}") for n in unseen]
        fused, fuse_skips, rewritten = _fuse_regions(gm, selected)
        unselected = [r for r in regions.attention if r not in selected]
        report = snapshot.report(
            gm,
            self.name,
            matched=len(selected) + len(unseen),
            rewritten=rewritten,
            skipped=tuple(skipped + fuse_skips),
            near_misses=tuple(str(f) for f in regions.failures if f.kind in ("", "attention")),
            cost_before=estimate_cost(regions.attention, regions.ffn),
            cost_after=estimate_cost(unselected + fused, regions.ffn),
        )
        return PassResult(gm, rewritten > 0, report)
