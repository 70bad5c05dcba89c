"""condfx.patterns: semantic region finders over the canonical IR from ``condfx.capture``.

``find_regions(gm)`` returns a ``Regions`` object: attention and FFN regions, norms, residual adds,
decoder blocks with layer indices, and every rejected candidate as a ``MatchFailure`` with a short
constant reason. A non-match is never an exception.

Recognised forms
----------------
Attention core (``attention.py``):
    - ``aten.scaled_dot_product_attention`` with ``attn_mask``, ``is_causal``, ``scale``, ``enable_gqa``.
    - eager: ``softmax(c * (q @ k^T) + mask) @ v``; the scale by mul or div on the scores, q or k;
      the mask additive, ``masked_fill(m, -inf)`` or ``where(m, scores, -inf)`` (either branch order);
      float32 casts around softmax, dropout with p=0 or train=False; matmul or bmm.
    - fused: ``condfx.attention(q, k, v, scale, window)`` left by ``fuse-attention`` (core_form "fused"),
      so later passes anchor on it like on the unfused forms.
    - K/V head repetition: HF ``repeat_kv`` (unsqueeze + expand + reshape), ``repeat_interleave(dim=1)``,
      or SDPA ``enable_gqa``; ``k``/``v`` are reported as (B, Hkv, S, D).
    - scale defaults to 1/sqrt(D) for SDPA and 1.0 for an eager chain without a factor.
Masks (``mask.py``): judged by evaluation, not template. The mask's ancestors may touch inputs only
    through shapes and may not read parameters; its subgraph is run at a few (B, T) sizes and the
    pattern compared with causal and sliding-window bands, in additive, bool-keep and bool-drop forms.
Outwards (``attention.py``): RoPE ``x*cos + rotate(x)*sin`` (half-split ``cat(-x2, x1)`` or interleaved
    ``stack(-x[1::2], x[::2])``), QK-norm on (B, T, H, D) or (B, H, T, D), q/k/v projections
    (linear, addmm / GPT-2 Conv1D with (in, out) weights, mm/matmul, fused qkv through split or slice,
    reported with ``out_slice``), the projections' input ``x_in`` and its norm (for a qkv projection split
    per head after a view, GPT-NeoX / Falcon, ``x_in`` without q/k/v LinearRefs), o_proj, residual add.
    Partial RoPE may sit on (B, T, H, D) before the head permute (GPT-J, CodeGen). A mask built partly at
    the captured length (Jamba, RecurrentGemma) is judged at that length.
FFN (``ffn.py``), anchored on the down projection: SwiGLU ``down(silu(gate x) * up x)`` (either order,
    silu or x*sigmoid(x)), GeGLU (reported as SWIGLU), GELU MLP ``down(gelu(up x))`` with ``aten.gelu``
    or the explicit tanh formula of HF "gelu_new", MLP ``down(act(up x))`` with relu, relu², silu,
    sigmoid or tanh (FFNKind.MLP); gate/up fused in one projection split by split, chunk or slice; any other
    activation written out elementwise on one projection with 1-element parameters (xIELU, Bloom's GELU:
    ``activation`` "elementwise"). Projections also as ``x @ W.T`` (``numpy_T`` / ``mT``, Falcon).
Norms (``norm.py``): RMSNorm ``x * rsqrt(mean(x^2, -1) + eps) * w`` (or ``/ sqrt``), casts anywhere,
    weight on either side, or ``* (c + w)`` (Gemma: ``weight_offset`` c = 1); LayerNorm as ``aten.layer_norm`` / ``native_layer_norm`` or spelled out
    with mean and var (or mean of squared deviations; ``x - mean`` may be computed twice, Cohere). eps is
    read from the graph.
MoE (``moe.py``), anchored on the router's top-k: router + experts (stacked 3-D parameters or
    per-expert FFN regions) + shared expert, up to the residual add; in ``Regions.moe`` and
    ``DecoderBlock.moe``, not in ``Regions.ffn`` (a "MoE FFN" near miss of kind "ffn" tells dense-FFN
    passes why).
Blocks (``blocks.py``): residual adds after region outputs, also through a post / sandwich norm
    (``post_norm``) and a scalar multiplier (``residual_scale``, Granite); layer index from ``.layers.<i>.`` /
    ``.h.<i>.`` / ``.blocks.<i>.`` in ``nn_module_stack`` when consistent, else order of appearance.

Score options (``AttentionRegion.softcap`` / ``alibi_slopes`` / ``sinks``, the fused op's arguments):
    softcapped scores ``c*tanh(s/c)`` before the mask (Gemma2), learned sinks concatenated to the scores
    and sliced off the probabilities (GPT-OSS), additive position biases that reduce to per-head ALiBi
    slopes (``attention_bias.py``: Bloom's ``baddbmm``, MPT's table, Falcon's bias in the mask, eager
    and SDPA). Eager scores may pass through (B*H, T, S) views and a clamp at the mask value (XGLM).
Named near misses: a softcap with a factor or bias outside / inside it, sinks after a scale or mask, a
bias not linear in the key position, scores multiplied by a mask (OpenAI-GPT).
Not handled: additive biases other than ALiBi, complex-number RoPE, parallel attention+FFN blocks (regions are found but share one residual add),
cross-attention, masks combining several partial masks that are only causal together.
"""

from __future__ import annotations

from torch import fx

from condfx.patterns import _graph as g
from condfx.patterns.attention import find_attention
from condfx.patterns.blocks import (
    assemble_blocks,
    assign_layers,
    assign_moe_layers,
    attach_residuals,
)
from condfx.patterns.ffn import find_ffn
from condfx.patterns.mask import MaskAnalyzer, MaskInfo, MaskKind
from condfx.patterns.moe import find_moe
from condfx.patterns.norm import find_norms, norm_index
from condfx.patterns.regions import (
    AttentionRegion,
    DecoderBlock,
    FFNKind,
    FFNRegion,
    LinearRef,
    MatchFailure,
    MoERegion,
    NormKind,
    NormRegion,
    Regions,
    ResidualAdd,
    RoPERef,
    RoPEStyle,
)


def find_regions(gm: fx.GraphModule) -> Regions:
    """Finds every semantic region of ``gm``.

    Args:
        gm: a GraphModule in condfx's canonical IR (``condfx.capture``).

    Returns:
        Regions with attention, FFN, norms, residual adds and blocks in graph order (layer indices
        set), and the rejected candidates in ``failures``.
    """
    order = g.node_order(gm)
    norms, failures = find_norms(gm)
    index = norm_index(norms)
    attention, failed = find_attention(gm, index, MaskAnalyzer(gm, order))
    failures += failed
    ffn, failed = find_ffn(gm, index)
    failures += failed
    moe, ffn, failed = find_moe(gm, index, ffn, order)
    failures += failed
    attention, ffn = assign_layers(attention, ffn, order, failures)
    moe = assign_moe_layers(attention, moe, order)
    attention, ffn, residuals = attach_residuals(attention, ffn, norms)
    residuals.sort(key=lambda r: order[r.node])
    blocks = assemble_blocks(attention, ffn, moe)
    return Regions(attention, ffn, norms, residuals, blocks, failures, moe)


def find_attention_regions(gm: fx.GraphModule, failures: list[MatchFailure] | None = None) -> list[AttentionRegion]:
    """Attention regions of ``gm`` with layer indices and residual adds; rejections go to ``failures``."""
    regions = find_regions(gm)
    if failures is not None:
        failures.extend(f for f in regions.failures if f.kind in ("attention", "block"))
    return regions.attention


def find_ffn_regions(gm: fx.GraphModule, failures: list[MatchFailure] | None = None) -> list[FFNRegion]:
    """FFN regions of ``gm`` with layer indices and residual adds; rejections go to ``failures``."""
    regions = find_regions(gm)
    if failures is not None:
        failures.extend(f for f in regions.failures if f.kind == "ffn")
    return regions.ffn


def find_norm_regions(gm: fx.GraphModule, failures: list[MatchFailure] | None = None) -> list[NormRegion]:
    """RMSNorm / LayerNorm regions of ``gm`` in graph order; rejections go to ``failures``."""
    norms, failed = find_norms(gm)
    if failures is not None:
        failures.extend(failed)
    return norms


__all__ = [
    "AttentionRegion",
    "DecoderBlock",
    "FFNKind",
    "FFNRegion",
    "LinearRef",
    "MaskInfo",
    "MaskKind",
    "MatchFailure",
    "MoERegion",
    "NormKind",
    "NormRegion",
    "Regions",
    "ResidualAdd",
    "RoPERef",
    "RoPEStyle",
    "find_attention_regions",
    "find_ffn_regions",
    "find_norm_regions",
    "find_regions",
]
