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
               per stream a basis A from calibration second moments, the keys' weighted by the query
               energy on each channel, the values' by W_oᵀW_o (``kv_calibrate.klt_basis``); its
               coefficients, by descending variance, get 0/2/3/4 bits per block of G
               (``allocate_bits``, within k_budget / v_budget bits per channel, scales included);
               each run of equal bits is a stream fq(x_in U_t + c_t), k̂ = cat(runs) A⁻¹ (+ the k path),
               a 0-bit run is dropped from the quantized tokens only (the full-precision tail keeps
               it)                                                         [several streams per K / V]
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

Requires: attention regions (fused or not) with their projections found; ``xquant`` needs
  ``k_proj``/``v_proj`` on a 3-D input, ``xquant-cl`` the layer's input norm. Must run before
  ``add-kv-cache``, whose decode form reads and updates the packed caches in the graph for every
  method (``passes/_decode_quantized.py``), except rotated or split-bit KIVI (teacher-forced only).

Does not handle: fused qkv projections, in_out (Conv1D) weights for the SVD latent; each such region
  is skipped with a reason.
  References: XQuant arXiv 2508.10395, KIVI arXiv 2402.02750, TECHNIQUES.md sections 5, 6; issue 6.
  latent=klt is transform coding (Karhunen-Loève transform + bit allocation by variance) applied to
  XQuant's latent; the query weighting of the keys follows the idea that a key error costs q·Δk.
"""

from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass
from enum import Enum
from typing import ClassVar

import torch
from torch import fx

import condfx.ops  # noqa: F401  (registers torch.ops.condfx.*)
from condfx.kv_calibrate import (
    DROP_PENALTY,
    META_KEY,
    allocate_bits,
    klt_basis,
    output_weights,
    query_weights,
)
from condfx.ops.kv_quant import stream_bytes_per_token
from condfx.passes._insert import erase_unused, remove_dead_calls
from condfx.passes.base import GraphSnapshot, Pass, PassError, PassReport, PassResult, coerce_enum
from condfx.passes.graph_builder import GraphBuilder
from condfx.patterns import find_regions
from condfx.patterns.regions import AttentionRegion

aten = torch.ops.aten
QCA = torch.ops.condfx.quantized_cache_attention.default
FQ = torch.ops.condfx.fake_group_quantize.default
ATTENTION = torch.ops.condfx.attention.default
ALLOWED_BITS = (2, 3, 4, 16, 32)
PASSTHROUGH_BITS = (16, 32)


class KVQuantMethod(Enum):
    XQUANT = "xquant"
    XQUANT_CL = "xquant-cl"
    KIVI = "kivi"


class LatentKind(Enum):
    """What ``xquant`` caches: X itself, the SVD latents, or X when d <= 2 d_kv (``auto``)."""

    AUTO = "auto"
    X = "x"
    SVD = "svd"
    KLT = "klt"


@dataclass(frozen=True)
class QuantizeKVConfig:
    """Options of ``quantize-kv``.

    Attributes:
        method: xquant, xquant-cl or kivi.
        bits: 2, 3 or 4; 16 (float16 cache) or 32 (quantization off).
        group: values sharing one scale and zero point (channels, or tokens for per-channel keys).
        residual: most recent tokens kept in full precision, 0 <= residual <= context.
        first_layers: the first layers get ``first_bits`` instead of ``bits``.
        first_bits: bits of those layers.
        latent: for xquant, cache X, the SVD latents, or choose (auto).
        context: tokens at which the report gives KV bytes per token.
        sink: the first tokens (the attention sink) kept in full precision, >= 0.
        k_bits: bits of the K stream (kivi, xquant SVD latents); 0 takes ``bits``.
        v_bits: bits of the V stream, likewise; layers in ``first_layers`` keep ``first_bits``.
        rotate: quantize each stream in a fixed normalised Hadamard basis (blocks of the largest
            power of two dividing the width, per head for kivi): x̂ = fq(x R) Rᵀ.
        k_budget: latent=klt: bits per K channel per token, codes plus scales and zero points
            (0: k_bits + 32 / group, the bytes of a plain stream at those bits).
        v_budget: likewise for V.
    """

    method: KVQuantMethod = KVQuantMethod.XQUANT
    bits: int = 4
    group: int = 32
    residual: int = 32
    first_layers: int = 0
    first_bits: int = 4
    latent: LatentKind = LatentKind.AUTO
    context: int = 4096
    sink: int = 0
    k_bits: int = 0
    v_bits: int = 0
    rotate: bool = False
    k_budget: float = 0.0
    v_budget: float = 0.0

    def __post_init__(self):
        object.__setattr__(self, "method", coerce_enum(KVQuantMethod, self.method, "QuantizeKVConfig.method"))
        object.__setattr__(self, "latent", coerce_enum(LatentKind, self.latent, "QuantizeKVConfig.latent"))
        for name in ("bits", "first_bits"):
            v = getattr(self, name)
            if isinstance(v, bool) or v not in ALLOWED_BITS:
                msg = f"QuantizeKVConfig.{name} must be one of {ALLOWED_BITS}; got {v!r}."
                raise ValueError(msg)
        for name in ("k_bits", "v_bits"):
            v = getattr(self, name)
            if isinstance(v, bool) or v not in (0, *ALLOWED_BITS):
                msg = f"QuantizeKVConfig.{name} must be 0 (use bits) or one of {ALLOWED_BITS}; got {v!r}."
                raise ValueError(msg)
        if self.latent is LatentKind.KLT and self.method is not KVQuantMethod.XQUANT:
            msg = f"QuantizeKVConfig.latent=klt is a latent of method=xquant; got method={self.method.value}."
            raise ValueError(msg)
        for name in ("k_budget", "v_budget"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v <= 32:
                msg = f"QuantizeKVConfig.{name} must be a number of bits per channel in [0, 32]; got {v!r}."
                raise ValueError(msg)
            if v and self.latent is not LatentKind.KLT:
                msg = f"QuantizeKVConfig.{name} applies to latent=klt only; got latent={self.latent.value}."
                raise ValueError(msg)
        if not isinstance(self.rotate, bool):
            msg = f"QuantizeKVConfig.rotate must be a bool; got {self.rotate!r}."
            raise ValueError(msg)
        one_stream = self.method is KVQuantMethod.XQUANT_CL or (
            self.method is KVQuantMethod.XQUANT and self.latent is LatentKind.X)
        if (self.k_bits or self.v_bits) and one_stream:
            what = "xquant-cl" if self.method is KVQuantMethod.XQUANT_CL else "xquant with latent=x"
            msg = f"QuantizeKVConfig.k_bits and v_bits need separate K and V streams; {what} caches one."
            raise ValueError(msg)
        for name, low in (("group", 1), ("residual", 0), ("first_layers", 0), ("context", 1),
                          ("sink", 0)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                msg = f"QuantizeKVConfig.{name} must be an int >= {low}; got {v!r}."
                raise ValueError(msg)
        if self.residual > self.context:
            msg = (
                f"QuantizeKVConfig.residual {self.residual} is longer than the context "
                f"{self.context}; the residual window must fit in the context."
            )
            raise ValueError(msg)


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


def _tensor(gm: fx.GraphModule, node: fx.Node) -> torch.Tensor:
    return functools.reduce(getattr, node.target.split("."), gm).detach()


def _fq(g: GraphBuilder, x: fx.Node, bits: int, group: int, dim: int, sink: int = 0) -> fx.Node:
    """fake_group_quantize over the tokens after the first ``sink`` (those stay as they are)."""
    return g.call(FQ, x, bits, group, dim, sink) if sink else g.call(FQ, x, bits, group, dim)


def _check_group(group: int, channels: int, what: str, layer: int) -> None:
    if channels % group:
        msg = f"quantize-kv group {group} must divide the {what} {channels} of layer {layer}."
        raise ValueError(msg)


def _unsupported(region: AttentionRegion, cfg: QuantizeKVConfig) -> str | None:
    if cfg.method is KVQuantMethod.KIVI:
        return None
    projs = (region.k_proj, region.v_proj)
    if region.x_in is None or any(p is None for p in projs):
        return "k/v projections not found"
    if any(p.out_slice is not None for p in projs):
        return "fused qkv projection"
    if cfg.method is KVQuantMethod.XQUANT_CL and region.input_norm is None:
        return "no input norm before the projections"
    if any(p.node.meta["val"].dim() != 3 or p.weight_layout != "out_in" for p in projs):
        return "projection is not a 3-D out_in linear"
    if cfg.latent is LatentKind.KLT and (region.o_proj is None or region.o_proj.weight_layout != "out_in"):
        return "no out_in output projection (latent=klt weighs the values by it)"
    return None


def _uses_svd(region: AttentionRegion, cfg: QuantizeKVConfig) -> bool:
    if cfg.latent is LatentKind.AUTO:
        return region.x_in.meta["val"].shape[-1] > 2 * region.k_proj.out_features
    return cfg.latent is LatentKind.SVD


def hadamard(n: int) -> torch.Tensor:
    """The normalised Sylvester Hadamard matrix of size ``n`` (a power of two): orthogonal, symmetric."""
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / n**0.5


def rotation(width: int) -> torch.Tensor:
    """Block-diagonal normalised Hadamard (float64) over ``width``: blocks of the largest power of two
    dividing it (``width`` itself when it is one)."""
    block = width & -width
    return torch.block_diag(*[hadamard(block)] * (width // block))


def _rotated_fq(g: GraphBuilder, region, x: fx.Node, bits: int, group: int, dim: int, sink: int,
                rot: torch.Tensor | None, which: str) -> fx.Node:
    """fq(x R) Rᵀ over x's last dimension for a rotation ``rot`` (float64), else fq(x)."""
    if rot is None or bits == 32:
        return _fq(g, x, bits, group, dim, sink)
    r = g.constant(region.module_path, f"kvq_rotation_{which}", rot.to(x.meta["val"].dtype).contiguous())
    y = _fq(g, g.call(aten.matmul.default, x, r), bits, group, dim, sink)
    return g.call(aten.matmul.default, y, g.call(aten.t.default, r))


def _svd_stream(g: GraphBuilder, region, proj, which: str, bits: int, group: int, dim: int, sink: int,
                rotate: bool) -> fx.Node:
    """fq(x_in U R) Rᵀ Σ Bᵀ (+ bias) fed through the proj → k/v path; returns k̂ or v̂ (R = I
    unless ``rotate``; it is folded into the two constants)."""
    w = _tensor(g.gm, proj.weight)  # (d_kv, d)
    u, s, vh = torch.linalg.svd(w.T.double(), full_matrices=False)
    _check_group(group, int(s.numel()), f"{which} latent width", region.layer)
    if bits == 32:  # the latent is kept exactly: read through U Σ Bᵀ = W_kᵀ folded, no split rounding
        fold = ((u * s) @ vh).to(w.dtype).contiguous()
        y = g.call(aten.matmul.default, region.x_in, g.constant(region.module_path, f"xquant_w_{which}", fold))
    else:
        up = s[:, None] * vh
        if rotate:
            r = rotation(int(s.numel()))
            u, up = u @ r, r.T @ up
        u_node = g.constant(region.module_path, f"xquant_u_{which}", u.to(w.dtype).contiguous())
        up_node = g.constant(region.module_path, f"xquant_up_{which}", up.to(w.dtype).contiguous())
        latent = _fq(g, g.call(aten.matmul.default, region.x_in, u_node), bits, group, dim, sink)
        y = g.call(aten.matmul.default, latent, up_node)  # (B, T, d_kv)
    if proj.bias is not None:
        y = g.call(aten.add.Tensor, y, proj.bias)
    dst = region.k if which == "k" else region.v
    return g.copy_path(proj.node, dst, y)


def _klt_stream(g: GraphBuilder, region, proj, which: str, budget: float, group: int, dim: int, sink: int,
                rotate: bool) -> tuple[fx.Node, list[tuple[int, int]]]:
    """k̂ or v̂ from the calibrated latent: y = k A (A the query-weighted KLT for K, the output-weighted
    one for V, ``condfx/kv_calibrate.py``); blocks of ``group`` coefficients get 0, 2, 3 or 4 bits
    within ``budget`` bits per channel; each run of equal bits is one stream fq(x_in U_t + c_t)
    (rotated within the run when ``rotate``), read back through A⁻¹. A run at 0 bits is dropped from
    the quantized tokens only (fq with bits 0 reads 0): the full-precision tail (sink, residual window)
    keeps every coefficient, so those tokens read the exact K / V. Returns (hat, [(width, bits)])."""
    stats = g.gm.meta.get(META_KEY, {}).get(region.layer)
    if stats is None:
        msg = (f"quantize-kv latent=klt needs calibration statistics for layer {region.layer}: run "
               "condfx.kv_calibrate.record_kv_stats(gm, batches) on calibration text first.")
        raise ValueError(msg)
    w = _tensor(g.gm, proj.weight).double()  # (d_kv, d)
    c = int(w.shape[0])
    _check_group(group, c, f"{which} width", region.layer)
    if which == "k":
        a, a_inv, lam = klt_basis(stats.k, query_weights(region, stats))
    else:
        a, a_inv, lam = klt_basis(stats.v, output_weights(region, _tensor(g.gm, region.o_proj.weight)))
    bits = allocate_bits(lam, group, budget * c, DROP_PENALTY[which])
    bias = _tensor(g.gm, proj.bias).double() if proj.bias is not None else None
    dtype = region.x_in.meta["val"].dtype
    pieces, ups, streams, start = [], [], [], 0
    for tb, run in itertools.groupby(bits):
        width = group * len(list(run))
        cols = slice(start, start + width)
        start += width
        streams.append((width, tb))
        u, up = w.T @ a[:, cols], a_inv[cols]
        off = None if bias is None else bias @ a[:, cols]
        if rotate and tb:
            r = rotation(width)
            u, up, off = u @ r, r.T @ up, None if off is None else off @ r
        name = f"xquant_klt_{which}{len(pieces)}"
        lat = g.call(aten.matmul.default, region.x_in, g.constant(region.module_path, f"{name}_u",
                                                                    u.to(dtype).contiguous()))
        if off is not None:
            lat = g.call(aten.add.Tensor, lat, g.constant(region.module_path, f"{name}_c", off.to(dtype)))
        pieces.append(_fq(g, lat, tb, group, dim, sink))
        ups.append(up)
    if all(tb == 0 for _, tb in streams):
        msg = (f"quantize-kv latent=klt: a {which} budget of {budget:g} bits per channel buys nothing in "
               f"layer {region.layer}; one block of {group} coefficients at 2 bits needs "
               f"{(2 * group + 32) / c:.3g}.")
        raise ValueError(msg)
    latent = pieces[0] if len(pieces) == 1 else g.call(aten.cat.default, pieces, -1)
    up_node = g.constant(region.module_path, f"xquant_klt_{which}_up", torch.cat(ups).to(dtype).contiguous())
    y = g.call(aten.matmul.default, latent, up_node)  # (B, T, d_kv), the bias included
    dst = region.k if which == "k" else region.v
    return g.copy_path(proj.node, dst, y), streams


def _klt_hats(g: GraphBuilder, region: AttentionRegion, cfg, bits: tuple[int, int],
              budgets: tuple[float, float]):
    """``_hats`` for latent=klt; a stream at 16 or 32 bits without a budget is the SVD latent's."""
    hats, streams = [], []
    for which, b, budget, dim, chunk in (("k", bits[0], budgets[0], -2, cfg.group), ("v", bits[1], budgets[1], -1, 1)):
        proj = region.k_proj if which == "k" else region.v_proj
        if not budget and b in PASSTHROUGH_BITS:
            hats.append(_svd_stream(g, region, proj, which, b, cfg.group, dim, cfg.sink, False))
            streams.append((proj.out_features, chunk, b))
            continue
        hat, runs = _klt_stream(g, region, proj, which, budget or b + 32 / cfg.group, cfg.group, dim,
                                cfg.sink, cfg.rotate)
        hats.append(hat)
        streams += [(w, chunk, tb) for w, tb in runs]
    return hats[0], hats[1], cfg.group, 1, None, streams


def _hats(g: GraphBuilder, region: AttentionRegion, cfg, kb: int, vb: int, acc: fx.Node | None,
          budgets: tuple[float, float] = (0.0, 0.0)):
    """(k̂, v̂, k_chunk, v_chunk, accumulator, streams) of one region with K / V at kb / vb bits;
    streams = [(C, chunk, bits)]."""
    group, d = cfg.group, int(region.x_in.meta["val"].shape[-1]) if region.x_in is not None else 0
    if cfg.method is KVQuantMethod.KIVI:
        hkv, hd = region.num_kv_heads, region.head_dim
        c = hkv * hd
        _check_group(group, c, "K/V width (heads x head dim)", region.layer)
        rot = rotation(hd) if cfg.rotate else None  # per head
        # values per token: groups of G among the token's Hkv * D values (B, S, Hkv * D)
        rows = g.call(aten.flatten.using_ints, g.call(aten.permute.default, region.v, [0, 2, 1, 3]), 2)
        v_rot = None if rot is None else torch.block_diag(*[rot] * hkv)
        v_rows = _rotated_fq(g, region, rows, vb, group, -1, cfg.sink, v_rot, "v")
        heads = g.call(aten.unflatten.int, v_rows, 2, [hkv, hd])
        v_hat = g.call(aten.permute.default, heads, [0, 2, 1, 3])
        k_hat = _rotated_fq(g, region, region.k, kb, group, -2, cfg.sink, rot, "k")
        return k_hat, v_hat, group, 1, acc, [(c, group, kb), (c, 1, vb)]
    rot = rotation(d) if cfg.rotate else None
    if cfg.method is KVQuantMethod.XQUANT_CL:
        _check_group(group, d, "model dimension", region.layer)
        r = region.input_norm.x_in
        if kb == 32:  # a lossless delta gives back r_i itself: the accumulator is r_i, exactly
            acc = r
        else:
            delta = r if acc is None else g.call(aten.sub.Tensor, r, acc)
            q = _rotated_fq(g, region, delta, kb, group, -1, cfg.sink, rot, "delta")
            acc = q if acc is None else g.call(aten.add.Tensor, acc, q)
        k_hat, v_hat = g.copy_path(r, region.k, acc), g.copy_path(r, region.v, acc)
        return k_hat, v_hat, 1, 1, acc, [(d, 1, kb)]
    if cfg.latent is LatentKind.KLT:
        return _klt_hats(g, region, cfg, (kb, vb), budgets)
    if _uses_svd(region, cfg):
        k_hat = _svd_stream(g, region, region.k_proj, "k", kb, group, -2, cfg.sink, cfg.rotate)
        v_hat = _svd_stream(g, region, region.v_proj, "v", vb, group, -1, cfg.sink, cfg.rotate)
        c = region.k_proj.out_features
        return k_hat, v_hat, group, 1, acc, [(c, group, kb), (c, 1, vb)]
    if kb != vb:
        msg = (f"quantize-kv k_bits {kb} and v_bits {vb} differ, but layer {region.layer} caches X "
               "(one stream); use latent=svd.")
        raise ValueError(msg)
    _check_group(group, d, "model dimension", region.layer)
    x_hat = _rotated_fq(g, region, region.x_in, kb, group, -1, cfg.sink, rot, "x")
    k_hat, v_hat = g.copy_path(region.x_in, region.k, x_hat), g.copy_path(region.x_in, region.v, x_hat)
    return k_hat, v_hat, 1, 1, acc, [(d, 1, kb)]


def _layer_bits(cfg: QuantizeKVConfig, index: int) -> tuple[int, int, float, float]:
    """(K bits, V bits, K budget, V budget) of the ``index``-th attention region (budgets: latent=klt,
    0 when unset or in the first layers, which keep ``first_bits``)."""
    if index < cfg.first_layers:
        return cfg.first_bits, cfg.first_bits, 0.0, 0.0
    return cfg.k_bits or cfg.bits, cfg.v_bits or cfg.bits, cfg.k_budget, cfg.v_budget


class QuantizeKV(Pass):
    """``quantize-kv``: attention reads a quantized cache (XQuant, XQuant-CL or KIVI)."""

    name: ClassVar[str] = "quantize-kv"
    config_class: ClassVar[type] = QuantizeKVConfig
    matches: ClassVar[str] = "attention region"
    exact: ClassVar[bool] = False

    def __call__(self, gm: fx.GraphModule) -> PassResult:
        snapshot, cfg = GraphSnapshot.take(gm), self.config
        done = [n for n in gm.graph.nodes if is_quantized_cache_attention(n)]
        if done:
            skipped = tuple(("already quantized", f"node {n.name}") for n in done)
            return PassResult(gm, False, snapshot.report(gm, self.name, matched=len(done), skipped=skipped))
        regions = find_regions(gm).attention
        if not regions:
            reason = "found no attention region: quantize-kv needs a model with attention layers"
            raise PassError(self.name, reason)
        acc, skipped, bytes_q, bytes_fp, rewritten, specs = None, [], 0.0, 0.0, 0, []
        for i, region in enumerate(regions):
            bytes_fp += 2 * 2 * region.num_kv_heads * region.head_dim
            reason = _unsupported(region, cfg)
            if reason:
                skipped.append((reason, f"layer {region.layer}"))
                bytes_fp_layer = 2 * 2 * region.num_kv_heads * region.head_dim
                bytes_q += bytes_fp_layer
                continue
            kb, vb, kbud, vbud = _layer_bits(cfg, i)
            g = GraphBuilder(gm, region.core)
            k_hat, v_hat, ck, cv, acc, streams = _hats(g, region, cfg, kb, vb, acc, (kbud, vbud))
            window = int(region.window or 0)
            if kb == vb == 32:  # nothing quantized: attention reads the rematerialised K/V throughout
                node = g.call(ATTENTION, region.q, k_hat, v_hat, float(region.scale), window)
            else:
                args = (region.q, region.k, region.v, k_hat, v_hat, float(region.scale), window,
                        cfg.residual, ck, cv, cfg.sink)
                node = g.call(QCA, *args)
            region.core.replace_all_uses_with(node)
            erase_unused(gm.graph, [region.core, *region.core_nodes])
            bytes_q += sum(
                stream_bytes_per_token(c, bits, cfg.group, cfg.residual, chunk, cfg.context,
                                       sink=cfg.sink)
                for c, chunk, bits in streams
            )
            specs.append({"layer": region.layer, "method": cfg.method.value, "bits": kb, "k_bits": kb,
                          "v_bits": vb, "rotate": cfg.rotate, "group": cfg.group,
                          "residual": cfg.residual, "sink": cfg.sink,
                          "dropped": sum(c for c, _, bits in streams if bits == 0)})
            rewritten += 1
        remove_dead_calls(gm.graph)
        gm.graph.lint()
        gm.recompile()
        gm.meta["condfx_kv_quant"] = tuple(specs)
        base = snapshot.report(gm, self.name, matched=len(regions), rewritten=rewritten,
                               skipped=tuple(skipped))
        fields = {f: getattr(base, f) for f in base.__dataclass_fields__}
        report = QuantizeKVReport(**fields, kv_bytes_per_token=bytes_q,
                                  fp16_bytes_per_token=bytes_fp, context=cfg.context)
        return PassResult(gm, rewritten > 0, report)
