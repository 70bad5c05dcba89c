"""Turn attention layers into Interleaved Head Attention (IHA): P learned pseudo-heads per head.

Rewrites (per selected layer; q, k before RoPE, v as the core reads them, (B, heads, T, D)):
    core(rope(q), rope(k), v)
      → collapse(R, unflatten(condfx.interleaved_attention(flatten(einsum(q, alpha_q)),
                                                           flatten(einsum(k, alpha_k)),
                                                           flatten(einsum(v, alpha_v)), inv_freq, ...)))
    einsum(q, alpha_q) = "bmtd,mhp->bhtpd"  (alpha_q (H, H, P); alpha_k, alpha_v (Hkv, Hkv, P): GQA
    mixes K/V within the KV heads); flatten (B, H, T, P, D) → (B, H, T*P, D), row t*P + p;
    collapse per-head "bhtpd,hp->bhtd" (R (H, P)) or global "bmtpd,hmp->bhtd" (R (H, H, P)).
  The graph's RoPE is dropped: the op rotates at virtual positions (t*P + p, or t with
  ``positions=token``) with the frequencies read from the graph (``patterns.rope_freq``).
  New state: ``<module>.iha_alpha_q/_k/_v``, ``<module>.iha_collapse`` (nn.Parameters) and the
  ``<module>.iha_inv_freq`` buffer.
  Initialisation: every pseudo-head a copy of its head (alpha = identity for every p, plus
  ``init_noise`` * N(0, 1) to break the symmetry between copies), R = 1/P. With ``causal=token``,
  ``positions=token`` and ``init_noise=0`` the rewritten model computes the original function
  exactly (each key appears P times with one logit, so the softmax over tokens is unchanged); any
  other setting is not function-preserving (zero-noise copies at other positions, flat causality
  hiding later copies of the own token): the result needs training (TECHNIQUES.md 2.2).

Requires: attention regions with a (B, H, T, D) q and k before RoPE; half-split RoPE whose cos/sin
  evaluate to cos/sin(position * inv_freq), or no RoPE (position embeddings). Runs before
  ``fold-interleave`` and ``add-kv-cache``.

Does not handle: interleaved-pair RoPE, RoPE scaling that changes the table's amplitude, attention
  with a sliding window already in the model (skipped with reasons). Paper: Duvvuri et al.,
  "Interleaved Head Attention", arXiv 2602.21371; issue #7.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, replace
from types import MappingProxyType
from typing import ClassVar

import torch
from torch import fx

import condfx.ops  # noqa: F401  (registers torch.ops.condfx.*)
from condfx.options import BIG_INT, SEED, Float, Int, OneOf, check_allocation, check_options
from condfx.passes._insert import erase_unused, register_tensor, remove_dead_calls
from condfx.passes.base import (
    GraphSnapshot,
    Pass,
    PassResult,
    layer_indices,
    select_layers,
)
from condfx.passes.graph_builder import GraphBuilder
from condfx.passes.report import CostEstimate, estimate_cost
from condfx.patterns import _graph as g
from condfx.patterns import find_regions
from condfx.patterns.regions import AttentionRegion, MatchFailure
from condfx.patterns.rope_freq import rope_inv_freq

IHA_TARGET = torch.ops.condfx.interleaved_attention.default
IHA_PARAMETERS = r"(^|\.)iha_(alpha_[qkv]|collapse)$"
"""``condfx.train(..., trainable=[IHA_PARAMETERS])`` trains only the parameters this pass adds."""
aten = torch.ops.aten


class Causality(enum.Enum):
    FLAT = "flat"  # causal over the interleaved sequence: pseudo-query p sees own pseudo-keys 0..p
    TOKEN = "token"  # causal over tokens: the P pseudo-tokens of a token see each other


class Collapse(enum.Enum):
    PER_HEAD = "per-head"  # R (H, P): each head folds its own P outputs (Algorithm 1)
    GLOBAL = "global"  # R (H, H, P): each head reads all H*P outputs ("Definition 3")


class Positions(enum.Enum):
    INTERLEAVED = "interleaved"  # RoPE position t*P + p (the paper's virtual positions)
    TOKEN = "token"  # RoPE position t for every pseudo-token of token t


MAX_P = 64
"""Largest ``P``: attention FLOPs grow as P² and the KV cache as P (the paper uses P <= H, and
models have at most a few dozen heads), so a larger P is a typo, not an experiment."""

_IHA_BOUNDS = MappingProxyType({
    "P": Int(1, MAX_P), "window": Int(0, BIG_INT), "causal": OneOf(Causality),
    "collapse": OneOf(Collapse), "positions": OneOf(Positions), "init_noise": Float(0.0, 10.0),
    "seed": SEED,
})


@dataclass(frozen=True)
class InterleaveHeadsConfig:
    """Options of ``interleave-heads``.

    Attributes:
        P: pseudo-heads per head (pseudo-tokens per token), in [1, ``MAX_P``].
        layers: attention layers to rewrite; None rewrites every one.
        window: sliding window in interleaved units (a multiple of P); 0 for full causal.
        causal: "flat" or "token" (see ``Causality``).
        collapse: "per-head" or "global" (see ``Collapse``).
        positions: "interleaved" (t*P + p) or "token" (t) RoPE positions.
        init_noise: std of the noise added to the identity mixes (0 keeps the copies identical),
            in [0, 10].
        seed: seeds that noise.
    """

    P: int = 2
    layers: tuple[int, ...] | None = None
    window: int = 0
    causal: Causality = Causality.FLAT
    collapse: Collapse = Collapse.PER_HEAD
    positions: Positions = Positions.INTERLEAVED
    init_noise: float = 0.01
    seed: int = 0

    def __post_init__(self):
        check_options(self, _IHA_BOUNDS)
        if self.window % self.P:
            msg = f"InterleaveHeadsConfig.window must be 0 or a positive multiple of P={self.P}; got {self.window!r}."
            raise ValueError(msg)
        object.__setattr__(self, "layers", layer_indices(self.layers, "InterleaveHeadsConfig.layers"))


def is_interleaved_attention(node: fx.Node) -> bool:
    """True when ``node`` is a ``condfx.interleaved_attention`` call."""
    return node.op == "call_function" and node.target is IHA_TARGET


def interleaved_layers(gm: fx.GraphModule) -> dict[int, fx.Node]:
    """Layer index (from the module path) → ``condfx.interleaved_attention`` node."""
    found = {}
    for i, node in enumerate(n for n in gm.graph.nodes if is_interleaved_attention(n)):
        layer = g.layer_from_path(g.module_path(node))
        found[i if layer is None else layer] = node
    return found


def _bhtd(node: fx.Node | None, heads: int) -> bool:
    shape = g.shape(node) if node is not None else None
    return shape is not None and len(shape) == 4 and g.static_int(shape[1]) == heads


def check_interleavable(gm: fx.GraphModule, region: AttentionRegion):
    """(q, k, inv_freq) before RoPE for ``region``, or the MatchFailure saying why not."""
    def fail(reason, detail=""):
        return MatchFailure(reason, region.core, f"layer {region.layer} {detail}".strip(), "attention")

    if region.window:
        return fail("attention already has a sliding window")
    if region.score_options is not None:
        return fail(f"{region.score_options} (condfx.interleaved_attention has no score options)")
    if g.ndim(region.core) != 4:
        return fail("core output is not (B, H, T, D)")
    if region.rope is not None and region.rope.rotary_dim not in (None, region.head_dim):
        return fail("partial RoPE", f"({region.rope.rotary_dim} of {region.head_dim} dims rotate)")
    if region.rope is None:
        q, k, inv_freq = region.q, region.k, torch.zeros(region.head_dim // 2)
    else:
        q, k = region.rope.q_pre, region.rope.k_pre
        inv_freq = rope_inv_freq(gm, region.rope, region.head_dim)
        if isinstance(inv_freq, MatchFailure):
            return fail(inv_freq.reason, inv_freq.detail)
    if not (_bhtd(q, region.num_heads) and _bhtd(k, region.num_kv_heads)):
        return fail("q or k before RoPE is not (B, heads, T, D)")
    return q, k, inv_freq


def _init_tensors(cfg: InterleaveHeadsConfig, region: AttentionRegion, gen: torch.Generator):
    p, h, hkv = cfg.P, region.num_heads, region.num_kv_heads

    def mix(n):
        eye = torch.eye(n).unsqueeze(-1).expand(n, n, p)  # (n, n, P)
        return eye + cfg.init_noise * torch.randn(n, n, p, generator=gen)

    if cfg.collapse is Collapse.PER_HEAD:
        collapse = torch.full((h, p), 1.0 / p)  # (H, P)
    else:
        collapse = torch.eye(h).unsqueeze(-1).expand(h, h, p) / p  # (H, H, P)
    return {"alpha_q": mix(h), "alpha_k": mix(hkv), "alpha_v": mix(hkv), "collapse": collapse}


def new_tensor_bytes(cfg: InterleaveHeadsConfig, regions: list[AttentionRegion], itemsize: int = 4) -> int:
    """Bytes of the mixes and collapses ``_init_tensors`` makes for ``regions`` (before it does)."""
    total = 0
    for r in regions:
        h, hkv = r.num_heads, r.num_kv_heads
        collapse = h * cfg.P if cfg.collapse is Collapse.PER_HEAD else h * h * cfg.P
        total += (h * h * cfg.P + 2 * hkv * hkv * cfg.P + collapse) * itemsize
    return total


def interleave_replacement(gm, region, q, k, inv_freq, cfg, gen) -> tuple[fx.Node, int]:
    """Builds the IHA block in front of ``region.core`` and reroutes the core's users to it."""
    path = region.module_path or f"iha_{region.layer}"
    like = region.q.meta["val"]  # new parameters in the model's dtype and on its device
    names = {key: register_tensor(gm, path, f"iha_{key}", t.to(like.dtype).to(like.device), False)
             for key, t in _init_tensors(cfg, region, gen).items()}
    names["inv_freq"] = register_tensor(gm, path, "iha_inv_freq", inv_freq.to(torch.float32), True)
    core, p = region.core, cfg.P
    b = GraphBuilder(gm, core)
    attrs = {key: b.get_attr(name) for key, name in names.items()}
    flat = []
    for x, key in ((q, "alpha_q"), (k, "alpha_k"), (region.v, "alpha_v")):
        mixed = b.call(aten.einsum.default, "bmtd,mhp->bhtpd", [x, attrs[key]])
        flat.append(b.call(aten.flatten.using_ints, mixed, 2, 3))  # (B, h, T*P, D)
    token = cfg.causal is Causality.TOKEN, cfg.positions is Positions.TOKEN
    attn = b.call(IHA_TARGET, *flat, attrs["inv_freq"], float(region.scale), p, cfg.window, *token)  # (B, H, T*P, D)
    split = b.call(aten.unflatten.int, attn, 2, [-1, p])  # (B, H, T, P, D)
    eq = "bhtpd,hp->bhtd" if cfg.collapse is Collapse.PER_HEAD else "bmtpd,hmp->bhtd"
    out = b.call(aten.einsum.default, eq, [split, attrs["collapse"]])
    core.replace_all_uses_with(out)
    return attn, sum(gm.get_parameter(n).numel() for k, n in names.items() if k != "inv_freq")


def iha_cost(region: AttentionRegion, cfg: InterleaveHeadsConfig, context_len: int) -> tuple[int, float]:
    """(attention FLOPs per token, KV-cache bytes per token at fp16) of ``region`` after IHA.

    Projections as before; mixing 2*P*D*(H^2 + 2*Hkv^2), collapse 2*H*P*D (per-head) or 2*H^2*P*D;
    P pseudo-queries each reading min(window, P*L) pseudo-keys; the cache holds P pseudo-K/V per token.
    """
    h, hkv, d, p = region.num_heads, region.num_kv_heads, region.head_dim, cfg.P
    base = estimate_cost([replace(region, window=None)], context_len=context_len)
    proj = base.attention_flops_per_token - 4 * h * d * context_len
    mix = 2 * p * d * (h * h + 2 * hkv * hkv)
    collapse = 2 * h * p * d * (1 if cfg.collapse is Collapse.PER_HEAD else h)
    keys = min(cfg.window, p * context_len) if cfg.window else p * context_len
    return proj + mix + collapse + 4 * h * d * p * keys, base.kv_cache_bytes_per_token * p


def _cost_after(regions, rewritten, cfg, ffn) -> CostEstimate:
    kept = [r for r in regions if r.layer not in rewritten]
    cost = estimate_cost(kept, ffn)
    extra = [iha_cost(r, cfg, cost.context_len) for r in regions if r.layer in rewritten]
    return replace(
        cost,
        attention_flops_per_token=cost.attention_flops_per_token + sum(f for f, _ in extra),
        kv_cache_bytes_per_token=cost.kv_cache_bytes_per_token + sum(b for _, b in extra),
        attention_layers=len(regions),
    )


def _select(self, gm, regions):
    existing = interleaved_layers(gm)
    wanted = self.config.layers
    chosen = select_layers(self.name, wanted, [*(r.layer for r in regions.attention), *existing])
    selected = [r for r in regions.attention if r.layer in chosen]
    skipped = [("already interleaved", f"layer {i}") for i in (wanted or existing) if i in existing]
    return selected, skipped


class InterleaveHeads(Pass):
    """``interleave-heads``: attention cores → IHA (mix, ``condfx.interleaved_attention``, collapse)."""

    name: ClassVar[str] = "interleave-heads"
    config_class: ClassVar[type] = InterleaveHeadsConfig
    matches: ClassVar[str] = "attention region"
    exact: ClassVar[bool] = False

    def __call__(self, gm: fx.GraphModule) -> PassResult:
        snapshot = GraphSnapshot.take(gm)
        regions = find_regions(gm)
        selected, skipped = _select(self, gm, regions)
        check_allocation(f"interleave-heads P={self.config.P}", new_tensor_bytes(self.config, selected))
        gen = torch.Generator().manual_seed(self.config.seed)
        replaced, rewritten = [], set()
        for region in selected:
            found = check_interleavable(gm, region)
            if isinstance(found, MatchFailure):
                skipped.append((found.reason, found.detail))
                continue
            interleave_replacement(gm, region, *found, self.config, gen)
            replaced += [region.core, *region.core_nodes]
            rewritten.add(region.layer)
        if rewritten:
            erase_unused(gm.graph, replaced)
            remove_dead_calls(gm.graph)
            gm.graph.lint()
            gm.recompile()
        report = snapshot.report(
            gm,
            self.name,
            matched=len(selected) + sum(1 for r, _ in skipped if r == "already interleaved"),
            rewritten=len(rewritten),
            skipped=tuple(skipped),
            near_misses=tuple(str(f) for f in regions.failures if f.kind in ("", "attention")),
            cost_before=estimate_cost(regions.attention, regions.ffn),
            cost_after=_cost_after(regions.attention, rewritten, self.config, regions.ffn),
        )
        return PassResult(gm, bool(rewritten), report)
