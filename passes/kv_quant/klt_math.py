"""The KLT maths of ``quantize-kv{latent=klt}``: statistics type, bases and bit allocation.

Passes-level (``condfx.kv_calibrate`` records the statistics and re-exports these names), so that
``quantize-kv`` never imports the calibration module above it.

``klt_basis`` gives one basis per stream: the Karhunen-Loève transform of the keys in a query-weighted
space (an error in a key channel costs what the queries put on it, ``query_weights``) and of the values
in the space the output projection weighs them by (``output_weights``), with coefficients ordered by
variance; ``allocate_bits`` spends the stream's bits where the variance is.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch
from torch import fx

from condfx.patterns import _graph as g
from condfx.patterns.regions import AttentionRegion, RoPEStyle

META_KEY = "condfx_kv_stats"

# MSE of min/max asymmetric group quantization of unit-variance Gaussian values, per bit width
# (groups of 32; measured with condfx.ops.kv_quant): the distortion model of the bit allocation.
_DISTORTION = {0: 1.0, 2: 0.154, 3: 0.0279, 4: 0.0061}

# A dropped coefficient's error is the same in every token, so it does not average out in the
# attention's weighted sums the way independent rounding noise does: ``allocate_bits`` counts it this
# many times its variance. Values average directly (a large factor), keys through the softmax.
DROP_PENALTY = {"k": 3.0, "v": 30.0}


@dataclass(frozen=True)
class LayerKVStats:
    """Second moments of one attention layer over ``tokens`` calibration tokens (float64).

    ``weights_sha256`` is ``projection_sha256`` of the layer they were recorded on (None for
    statistics built by hand, which are taken as they are); ``quantize-kv`` refuses statistics
    recorded on other weights.
    """

    k: torch.Tensor  # (d_kv, d_kv): E[k kᵀ] of the k_proj output
    v: torch.Tensor  # (d_kv, d_kv): E[v vᵀ] of the v_proj output
    q: torch.Tensor  # (Hkv, D, D): E[q qᵀ] of the query heads of each KV head, summed
    tokens: int
    weights_sha256: str | None = None


def projection_sha256(gm: fx.GraphModule, region: AttentionRegion) -> str:
    """SHA256 of the q/k/v/o projection weights and biases of ``region`` (shapes and bytes)."""
    digest = hashlib.sha256()
    for proj in (region.q_proj, region.k_proj, region.v_proj, region.o_proj):
        for node in (proj.weight, proj.bias) if proj is not None else ():
            if node is None or node.op != "get_attr":
                continue
            t = g.get_attr_value(gm, node).detach().cpu().contiguous()
            digest.update(f"{tuple(t.shape)}{t.dtype};".encode())
            digest.update(t.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def check_stats_weights(gm: fx.GraphModule, region: AttentionRegion, stats: LayerKVStats) -> None:
    """Refuses statistics recorded on other weights than ``region``'s (one sentence)."""
    if stats.weights_sha256 is None or stats.weights_sha256 == projection_sha256(gm, region):
        return
    msg = (
        f"quantize-kv latent=klt: the calibration statistics of layer {region.layer} were recorded on "
        "other q/k/v/o projection weights than this model's; record them on this model with "
        "condfx.kv_calibrate.record_kv_stats."
    )
    raise ValueError(msg)


def query_weights(region: AttentionRegion, stats: LayerKVStats) -> torch.Tensor:
    """(d_kv,) weight of each key channel: the query energy on it, averaged over its RoPE pair
    (rotary position embedding mixes the two channels of a pair at every relative distance)."""
    w = torch.diagonal(stats.q, dim1=-2, dim2=-1).clone()  # (Hkv, D)
    if region.rope is not None:
        half = region.head_dim // 2
        if region.rope.style is RoPEStyle.HALF:
            w = (w + w.roll(half, -1)) / 2
        else:
            pairs = w.reshape(*w.shape[:-1], half, 2).mean(-1, keepdim=True)
            w = pairs.expand(*pairs.shape[:-1], 2).reshape(w.shape)
    return w.reshape(-1).clamp(min=w.max() * 1e-12)


def output_weights(region: AttentionRegion, w_o: torch.Tensor) -> torch.Tensor:
    """(d_kv, d_kv) block diagonal: Σ over the query heads h of KV head j of W_o[:, h]ᵀ W_o[:, h], the
    squared error in the layer's output that an error in head j's value costs (W_o out_in)."""
    hkv, hd, group = region.num_kv_heads, region.head_dim, region.num_heads // region.num_kv_heads
    cols = w_o.double().reshape(w_o.shape[0], hkv, group, hd)
    return torch.block_diag(*[torch.einsum("ogd,oge->de", cols[:, j], cols[:, j]) for j in range(hkv)])


def klt_basis(second_moment: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(A, A⁻¹, λ): y = x A gives coefficients with variances λ (descending) in the space where the
    squared error is xᵀ weight x (``weight`` (C,) diagonal or (C, C) positive definite)."""
    if weight.dim() == 1:
        half, inv_half = torch.diag(weight.sqrt()), torch.diag(weight.rsqrt())
    else:
        e, vecs = torch.linalg.eigh(weight)
        e = e.clamp(min=e.max() * 1e-12)
        half, inv_half = vecs @ torch.diag(e.sqrt()) @ vecs.T, vecs @ torch.diag(e.rsqrt()) @ vecs.T
    lam, vecs = torch.linalg.eigh(half @ second_moment @ half)
    lam, vecs = lam.flip(0).clamp(min=0), vecs.flip(1)
    return half @ vecs, vecs.T @ inv_half, lam


def allocate_bits(lam: torch.Tensor, group: int, budget: float, drop: float = 1.0) -> list[int]:
    """Bits (0, 2, 3 or 4) of each block of ``group`` coefficients (ordered by descending variance
    ``lam``) so that codes plus a float16 scale and zero per group cost at most ``budget`` bits per
    token, greedily buying the largest expected-error reduction per bit (a block at 0 bits is dropped;
    its error is its variance)."""
    blocks = lam.reshape(-1, group).sum(-1).tolist()
    bits, spent, steps = [0] * len(blocks), 0.0, {0: 2, 2: 3, 3: 4}
    while True:
        best, gain, best_cost = None, 0.0, 0
        for i, b in enumerate(bits):
            if b not in steps:
                continue
            nb = steps[b]
            cost = group * (nb - b) + (32 if b == 0 else 0)  # opening a block buys its scale and zero
            if spent + cost > budget + 1e-9:
                continue
            d0 = _DISTORTION[b] * (drop if b == 0 else 1.0)
            g = blocks[i] * (d0 - _DISTORTION[nb]) / cost
            if g > gain:
                best, gain, best_cost = i, g, cost
        if best is None:
            return bits
        spent += best_cost
        bits[best] = steps[bits[best]]
