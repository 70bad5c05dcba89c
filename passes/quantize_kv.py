"""Quantize the KV cache: XQuant (cache low-bit X or its SVD latent), XQuant-CL (cross-layer deltas)
or KIVI (K per channel, V per token), each with a full-precision window of recent tokens.

Rewrites (every attention region, layer i; K / V bits = first_bits for i < first_layers, else
k_bits / v_bits, each defaulting to bits):
    attention(q, k, v, s, w) → condfx.quantized_cache_attention(q, k, v, k̂, v̂, s, w, R, ck, cv)
  where k̂, v̂ are what the quantized cache hands back for the same tokens:
    kivi:      k̂ = fq(k, per channel, groups of G tokens)  (after RoPE), ck = G;
               v̂ = fq(v, per token, groups of G of the token's Hkv·D values), cv = 1
    xquant, X: x̂ = fq(x_in, per token); k̂, v̂ = copies of the x_in → k / v paths fed x̂
               (projection, QK-norm, RoPE at the same positions), ck = cv = 1     [MHA: 1 stream]
    xquant, SVD latent (GQA): W_kᵀ = U_k Σ_k B_kᵀ (offline, weights only); l_k = x_in U_k;
               k̂ = copy of the k_proj → k path fed fq(l_k, per channel) Σ_k B_kᵀ (+ bias), ck = G;
               v̂ likewise with fq(x_in U_v, per token), cv = 1                   [2 streams of d_kv]
    xquant, calibrated latent (latent=klt; needs ``condfx.kv_calibrate.record_kv_stats`` first):
               one stream per run of equal bits of a calibrated KLT basis (``kv_quant/klt.py``)
                                                                           [several streams per K / V]
    xquant-cl: r_i = pre-norm residual stream of layer i; a_0 = fq(r_0),
               a_i = a_{i-1} + fq(r_i - a_{i-1}) (deltas against the reconstructed accumulator,
               so errors do not drift); k̂, v̂ = copies of the r_i → k / v paths fed a_i (the layer's
               own norm re-applied), ck = cv = 1                                   [1 stream of d]
  fq = condfx.fake_group_quantize (asymmetric min/max, float16 scale and zero) over the tokens
  after the first ``sink`` (the attention sink, kept in full precision). The op reads k̂/v̂
  for tokens that left the residual window (``condfx/ops/kv_quant.py``), so one full-sequence
  forward is the teacher-forced form of token-by-token decoding with the quantized cache.
  bits=32 (quantization off) emits condfx.attention(q, k̂, v̂) on the rematerialised K/V through
  the exact path: nothing is lost, so the SVD latent reads through the folded U Σ Bᵀ = W_kᵀ (not
  two rounded factors) and CL's accumulator is r_i itself (delta + previous accumulator); the
  logits equal the dense ones to float rounding of one matmul. bits=16 rounds the cache to float16.
  rotate=true quantizes every stream in a fixed orthogonal basis, fq(x) → fq(x R) Rᵀ with R the
  normalised block Hadamard (``rotation``; per head of D for kivi, after RoPE): it spreads outlier
  channels over the group, so keys lose far less at 3 bits. The bytes do not change; a real decoder
  would fold R into q (K) and o_proj (V). For SVD latents R is folded into U and Σ Bᵀ (no extra node).

Each variant is a strategy (``passes/kv_quant/{kivi,xquant,xquant_cl,klt}.py``) chosen through
  ``kv_quant/strategies.STRATEGIES``. Every ``quantized_cache_attention`` node carries a typed plan,
  ``node.meta["condfx_kv_plan"]`` (``kv_quant/plan.QuantizedKVPlan``: streams, the names of their
  fake-quantize nodes, CL accumulations, decode form), which ``add-kv-cache``'s decode rule reads;
  ``gm.meta["condfx_kv_quant"]`` keeps one summary dict per layer for reports.

Stacked on route-attention (``passes/decode_rules.ORDER_RULES`` states the order rules): the
  window branch is an attention region like any other, and each routed layer's global branch
    condfx.routed_attention(q, k, v, route, scale)
        → quantized_cache_attention(q, k, v, k̂, v̂, scale, 0, R, G, 1) · route   (method=kivi)
  so its full-length cache is quantized too (the decode form computes the branch for every query
  and keeps the routed rows; the report says so). Other methods cache the layer input X, which the
  global branch does not read: they refuse a routed graph in one sentence naming both passes.
  route-attention{form=select}: the global branch is quantized the same way; a window branch with
  sink tokens (``condfx.sink_window_attention``, a bounded cache of sink + window - 1 tokens) is not
  an attention region and keeps its float cache; with ``ring_float16=true`` its k and v are rounded
  through float16 (every float32 sink-window op's, when anything was quantized), so add-kv-cache keeps
  that ring as float16 and the decode form still equals the rewritten model; with sink=0 the window op
  is a region like above.
  The report's bytes per token come from the cache layouts ``add-kv-cache`` will build (every
  cached-attention op of the graph, window rings and unquantized branches included) at ``context``
  tokens, against a float16 cache of every attention layer of the original model.

Requires: attention regions (fused or not) with their projections found; ``xquant`` needs
  ``k_proj``/``v_proj`` on a 3-D input, ``xquant-cl`` the layer's input norm. Must run before
  ``add-kv-cache``, whose decode form reads and updates the packed caches in the graph for every
  method (``passes/decode/quantized.py``; 16 bits: float16 streams, or plain KIVI's float16 cache),
  except a layer with one side unquantized (32 bits) beside a quantized one, which add-kv-cache refuses.

Does not handle: fused qkv projections, in_out (Conv1D) weights for the SVD latent; each such region
  is skipped with a reason.
  References: XQuant arXiv 2508.10395, KIVI arXiv 2402.02750, TECHNIQUES.md sections 5, 6; issue 6.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import fx

import condfx.ops  # noqa: F401  (registers torch.ops.condfx.*)
from condfx.layouts import FullKVLayout
from condfx.passes._insert import erase_unused, remove_dead_calls
from condfx.passes.base import GraphSnapshot, Pass, PassError, PassReport, PassResult
from condfx.passes.decode.base import kv_shape
from condfx.passes.graph_builder import GraphBuilder
from condfx.passes.kv_quant.common import ATTENTION, FQ, QCA, LayerBits, hadamard, rotation
from condfx.passes.kv_quant.config import (
    ALLOWED_BITS,
    PASSTHROUGH_BITS,
    KVQuantMethod,
    LatentKind,
    QuantizeKVConfig,
)
from condfx.passes.kv_quant.plan import PLAN_KEY, make_plan
from condfx.passes.kv_quant.strategies import STRATEGIES, Variant, unsupported, variant_of
from condfx.passes.op_args import op_arg, set_op_args
from condfx.patterns import find_regions
from condfx.patterns.regions import AttentionRegion
from condfx.patterns.routed import TAG, RoutedLayer, find_routed_layers

ROUTED = torch.ops.condfx.routed_attention.default
SINK_WINDOW = torch.ops.condfx.sink_window_attention.default
aten = torch.ops.aten

__all__ = [
    "ALLOWED_BITS", "ATTENTION", "FQ", "PASSTHROUGH_BITS", "QCA", "KVQuantMethod", "LatentKind", "QuantizeKV",
    "QuantizeKVConfig", "QuantizeKVReport", "hadamard", "is_quantized_cache_attention", "rotation",
]


@dataclass(frozen=True)
class QuantizeKVReport(PassReport):
    """The PassReport plus the cache size: bytes per token over all layers at ``context`` tokens."""

    kv_bytes_per_token: float = 0.0
    fp16_bytes_per_token: float = 0.0
    context: int = 0

    @property
    def compression(self) -> float:
        """fp16 KV bytes / quantized cache bytes."""
        return self.fp16_bytes_per_token / self.kv_bytes_per_token if self.kv_bytes_per_token else 0.0

    def to_markdown(self) -> str:
        return (
            f"{super().to_markdown()}\n- KV cache at {self.context} tokens: "
            f"{self.kv_bytes_per_token:.1f} B/token vs fp16 {self.fp16_bytes_per_token:.1f} "
            f"({self.compression:.2f}x)"
        )


def is_quantized_cache_attention(node: fx.Node) -> bool:
    """True when ``node`` is a ``condfx.quantized_cache_attention`` call."""
    return node.op == "call_function" and node.target is QCA


def _layer_bits(cfg: QuantizeKVConfig, index: int) -> LayerBits:
    """K / V bits and budgets of the ``index``-th attention region (budgets: latent=klt, 0 when unset
    or in the first layers, which keep ``first_bits``)."""
    if index < cfg.first_layers:
        return LayerBits(cfg.first_bits, cfg.first_bits)
    return LayerBits(cfg.k_bits or cfg.bits, cfg.v_bits or cfg.bits, cfg.k_budget, cfg.v_budget)


@dataclass(frozen=True)
class _Layer:
    """What quantizing one region gave: the accumulator for the next layer and its report entry."""

    acc: fx.Node | None
    summary: dict


def _quantize_region(gm: fx.GraphModule, region: AttentionRegion, cfg: QuantizeKVConfig, bits: LayerBits,
                     acc: fx.Node | None) -> _Layer:
    """Rewrites one region through its strategy and attaches the plan to the new attention node."""
    variant = variant_of(cfg, region)
    g = GraphBuilder(gm, region.core)
    before = set(gm.graph.nodes)
    hats = STRATEGIES[variant].hats(g, region, cfg, bits, acc)
    fqs = [n for n in gm.graph.nodes if n not in before and n.target is FQ]  # in graph order
    window = int(region.window or 0)
    if bits.k == bits.v == 32:  # nothing quantized: attention reads the rematerialised K/V throughout
        node = g.call(ATTENTION, region.q, hats.k_hat, hats.v_hat, float(region.scale), window)
    else:
        args = (region.q, region.k, region.v, hats.k_hat, hats.v_hat, float(region.scale), window,
                cfg.residual, hats.k_chunk, hats.v_chunk, cfg.sink)
        node = g.call(QCA, *args)
        one_stream = variant in (Variant.X, Variant.CL)
        node.meta[PLAN_KEY] = make_plan(cfg, region.layer, (bits.k, bits.v), fqs, (acc, hats.acc), one_stream)
    region.core.replace_all_uses_with(node)
    erase_unused(gm.graph, [region.core, *region.core_nodes])
    summary = {"layer": region.layer, "method": cfg.method.value, "bits": bits.k, "k_bits": bits.k,
               "v_bits": bits.v, "rotate": cfg.rotate, "group": cfg.group, "residual": cfg.residual,
               "sink": cfg.sink, "dropped": sum(c for c, _, b in hats.streams if b == 0)}
    return _Layer(hats.acc, summary)


@dataclass(frozen=True)
class _GlobalBranch:
    """What a strategy reads of a routed layer's global branch (the fields of an AttentionRegion it uses)."""

    k: fx.Node
    v: fx.Node
    num_kv_heads: int
    head_dim: int
    layer: int
    module_path: str


def _quantize_global(gm: fx.GraphModule, routed: RoutedLayer, cfg: QuantizeKVConfig, bits: LayerBits) -> dict:
    """routed_attention(q, k, v, route, s) → quantized_cache_attention(q, k, v, k̂, v̂, s, 0, ...) · route."""
    node = routed.nodes["routed"]
    q, k, v, route = (op_arg(node, n) for n in ("q", "k", "v", "route"))
    shape = k.meta["val"].shape
    branch = _GlobalBranch(k, v, int(shape[1]), int(shape[3]), routed.layer, routed.prefix)
    g = GraphBuilder(gm, node)
    before = set(gm.graph.nodes)
    hats = STRATEGIES[Variant.KIVI].hats(g, branch, cfg, bits, None)
    fqs = [n for n in gm.graph.nodes if n not in before and n.target is FQ]
    args = (q, k, v, hats.k_hat, hats.v_hat, float(op_arg(node, "scale")), 0, cfg.residual,
            hats.k_chunk, hats.v_chunk, cfg.sink)
    core = g.call(QCA, *args)
    core.meta[PLAN_KEY] = make_plan(cfg, routed.layer, (bits.k, bits.v), fqs, (None, None), False)
    keep = g.call(aten.unsqueeze.default, g.call(aten.unsqueeze.default, route, 1), -1)  # (B, 1, T, 1)
    out = g.call(aten.mul.Tensor, core, g.call(aten.to.dtype, keep, core.meta["val"].dtype))
    out.meta[TAG] = node.meta[TAG]  # still the layer's "routed" node for find_routed_layers
    node.replace_all_uses_with(out)
    gm.graph.erase_node(node)
    return {"layer": routed.layer, "branch": "global", "method": cfg.method.value, "bits": bits.k,
            "k_bits": bits.k, "v_bits": bits.v, "rotate": cfg.rotate, "group": cfg.group,
            "residual": cfg.residual, "sink": cfg.sink, "dropped": 0}


def _routed_globals(gm: fx.GraphModule, cfg: QuantizeKVConfig) -> list[RoutedLayer]:
    """The routed layers whose global branch is still a ``condfx.routed_attention``; PassError when
    the method cannot quantize it."""
    layers = [r for r in find_routed_layers(gm) if getattr(r.nodes.get("routed"), "target", None) is ROUTED]
    if layers and cfg.method is not KVQuantMethod.KIVI:
        reason = (f"quantize-kv{{method={cfg.method.value}}} cannot follow route-attention: it caches the "
                  "layer input X, which route-attention's global branch does not read, so the full-length "
                  "global cache would stay unquantized; use method=kivi")
        raise PassError(QuantizeKV.name, reason)
    return layers


def _dense_fp16_bytes(routed: RoutedLayer) -> int:
    """Bytes per token of a dense float16 K/V cache for a routed layer's global branch."""
    shape = op_arg(routed.nodes["routed"], "k").meta["val"].shape  # (B, Hkv, S, D)
    return 2 * 2 * int(shape[1]) * int(shape[3])


def layout_bytes_per_token(gm: fx.GraphModule, context: int) -> float:
    """Bytes per token at ``context`` tokens of the caches ``add-kv-cache`` would build for ``gm``:
    every cached-attention op's layout (``passes/decode_rules.DECODE_RULES``), batch 1."""
    from condfx.passes.decode_rules import (
        DECODE_RULES,  # lazily: the rules import this package's plans
    )

    ops = [n for n in gm.graph.nodes if n.op == "call_function" and n.target in DECODE_RULES]
    total = 0
    for i, node in enumerate(ops):
        try:
            layout = DECODE_RULES[node.target].layout(node, i)
        except PassError:  # a layer with no decode form (one side at 32 bits): counted as a dense cache
            layout = FullKVLayout(i, *kv_shape(node))
        total += layout.nbytes(context)
    return total / context


def _float16_rings(gm: fx.GraphModule) -> None:
    """Rounds the k and v of every float32 sink-window op through float16, so ``add-kv-cache`` stores
    its bounded ring as float16 (``passes/decode/sink_window.py``); an op already rounded is left."""
    from condfx.passes.decode.sink_window import ring_dtype, round_through_float16

    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target is not SINK_WINDOW or ring_dtype(node):
            continue
        k, v = op_arg(node, "k"), op_arg(node, "v")
        if k.meta["val"].dtype != torch.float32 or v.meta["val"].dtype != torch.float32:
            continue
        set_op_args(node, k=round_through_float16(gm.graph, k), v=round_through_float16(gm.graph, v))


class QuantizeKV(Pass):
    """``quantize-kv``: attention reads a quantized cache (XQuant, XQuant-CL or KIVI)."""

    name: ClassVar[str] = "quantize-kv"
    config_class: ClassVar[type] = QuantizeKVConfig
    matches: ClassVar[str] = "attention region"
    exact: ClassVar[bool] = False

    def requires(self, gm: fx.GraphModule) -> None:
        """The shared invariants and the order rules (``passes/decode_rules.ORDER_RULES``)."""
        from condfx.passes.decode_rules import check_order

        super().requires(gm)
        check_order(gm, self.name)

    def __call__(self, gm: fx.GraphModule) -> PassResult:
        snapshot, cfg = GraphSnapshot.take(gm), self.config
        done = [n for n in gm.graph.nodes if is_quantized_cache_attention(n)]
        if done:
            skipped = tuple(("already quantized", f"node {n.name}") for n in done)
            return PassResult(gm, False, snapshot.report(gm, self.name, matched=len(done), skipped=skipped))
        regions = find_regions(gm).attention
        routed = _routed_globals(gm, cfg)
        if not regions and not routed:
            reason = "found no attention region: quantize-kv needs a model with attention layers"
            raise PassError(self.name, reason)
        acc, skipped, bytes_fp, summaries = None, [], 0.0, []
        # route-attention{form=select} with sink tokens: the layer's window branch is a sink-window op
        # (a bounded cache, left in float) and no attention region; its full-length cache is the global
        # branch's, quantized below and counted here
        region_layers = {x.layer for x in regions}
        bytes_fp += sum(_dense_fp16_bytes(r) for r in routed if r.layer not in region_layers)
        bits_of = {}
        for i, region in enumerate(regions):
            bytes_fp += 2 * 2 * region.num_kv_heads * region.head_dim  # dense K and V at 2 bytes per value
            bits_of[region.layer] = _layer_bits(cfg, i)
            reason = unsupported(cfg, region)
            if reason:
                skipped.append((reason, f"layer {region.layer}"))
                continue
            layer = _quantize_region(gm, region, cfg, bits_of[region.layer], acc)
            acc = layer.acc
            summaries.append(layer.summary)
        for r in routed:
            bits = bits_of.get(r.layer, _layer_bits(cfg, len(bits_of)))
            if bits.k == bits.v == 32:
                continue  # quantization off: the global branch keeps its exact cache
            summaries.append(_quantize_global(gm, r, cfg, bits))
        if summaries and cfg.ring_float16:
            _float16_rings(gm)
        remove_dead_calls(gm.graph)
        gm.graph.lint()
        gm.recompile()
        gm.meta["condfx_kv_quant"] = tuple(summaries)
        bytes_q = layout_bytes_per_token(gm, cfg.context)
        base = snapshot.report(gm, self.name, matched=len(regions) + len(routed), rewritten=len(summaries),
                               skipped=tuple(skipped))
        fields = {f: getattr(base, f) for f in base.__dataclass_fields__}
        report = QuantizeKVReport(**fields, kv_bytes_per_token=bytes_q,
                                  fp16_bytes_per_token=bytes_fp, context=cfg.context)
        return PassResult(gm, bool(summaries), report)
