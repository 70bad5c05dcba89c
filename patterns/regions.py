"""Semantic regions: the named endpoints that passes rewrite.

A region is found by anchoring on one characteristic node (the attention core, the FFN down
projection, the normalisation's reduction) and walking outwards. Passes never repeat that walk; they
read the endpoints below. All nodes belong to the canonical IR produced by ``condfx.capture``.

Shapes use B = batch, T = query length, S = key length, H = query heads, Hkv = key/value heads,
D = head dim, d = model dim.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from torch import fx


@dataclass(frozen=True)
class MatchFailure:
    """Why a candidate was rejected. ``reason`` is a short constant string; ``detail`` is free text."""

    reason: str
    node: fx.Node | None = None
    detail: str = ""
    kind: str = ""  # "attention", "ffn", "norm", ...

    def __str__(self) -> str:
        where = f" at {self.node.name}" if self.node is not None else ""
        extra = f" ({self.detail})" if self.detail else ""
        return f"{self.kind or 'region'}: {self.reason}{where}{extra}"


class NormKind(enum.Enum):
    RMSNORM = "rmsnorm"
    LAYERNORM = "layernorm"


class FFNKind(enum.Enum):
    SWIGLU = "swiglu"  # down(act(gate(x)) * up(x))
    GELU_MLP = "gelu-mlp"  # down(gelu(up(x)))
    MLP = "mlp"  # down(act(up(x))), act not gelu (relu, relu², silu, ...): see FFNRegion.activation


class RoPEStyle(enum.Enum):
    HALF = "half"  # rotate_half: (x1, x2) -> (-x2, x1) over the two halves of D
    INTERLEAVED = "interleaved"  # adjacent pairs (x0, x1), (x2, x3), ...


@dataclass(frozen=True)
class LinearRef:
    """A projection ``y = x @ W.T + b`` however it was written (linear, matmul, addmm, Conv1D).

    ``weight`` and ``bias`` are get_attr nodes. ``weight_layout`` says how the stored tensor is laid
    out: "out_in" (nn.Linear) or "in_out" (GPT-2 Conv1D). For a fused projection (GPT-2 c_attn),
    ``out_slice`` gives the [start, stop) range of output features that belong to this projection.
    """

    node: fx.Node
    weight: fx.Node
    bias: fx.Node | None
    in_features: int
    out_features: int
    weight_layout: str = "out_in"
    out_slice: tuple[int, int] | None = None
    x_in: fx.Node | None = None  # the input (B, T, in), before any flattening view
    op_node: fx.Node | None = None  # the linear / addmm / mm node itself


@dataclass(frozen=True)
class NormRegion:
    """One RMSNorm / LayerNorm: ``out = normalise(x_in) * (weight_offset + weight) (+ bias)``.

    ``weight_offset`` is 1.0 for Gemma-style norms that store ``w`` and scale by ``1 + w``, else 0.0;
    a pass that re-applies the norm must add it to the stored weight.
    """

    kind: NormKind
    x_in: fx.Node  # the tensor being normalised
    out: fx.Node  # the normalised (and scaled) tensor
    weight: fx.Node | None
    bias: fx.Node | None
    eps: float
    nodes: tuple[fx.Node, ...] = ()
    module_path: str = ""
    weight_offset: float = 0.0


@dataclass(frozen=True)
class RoPERef:
    style: RoPEStyle
    cos: fx.Node | None
    sin: fx.Node | None
    q_pre: fx.Node | None = None  # q before rotation, (B, H, T, D)
    k_pre: fx.Node | None = None  # k before rotation, (B, Hkv, S, D)
    rotary_dim: int | None = None  # partial RoPE: only the first rotary_dim of D rotate (None: all D)


@dataclass(frozen=True)
class AttentionRegion:
    """One attention block, anchored on its core.

    ``q``, ``k`` and ``v`` are what the core consumes, after QK-norm and RoPE, with K/V taken *before*
    any head repetition: k and v are (B, Hkv, S, D) even when the model repeats them to H heads.
    ``core`` is the node whose value is the attention output (B, H, T, D); ``core_nodes`` are the
    nodes that compute it from q, k, v (the SDPA call, or matmul, scale, mask, softmax, matmul, and the
    head repetition), which a pass replacing the core makes dead.
    """

    layer: int
    module_path: str
    core: fx.Node
    core_nodes: tuple[fx.Node, ...]
    q: fx.Node  # (B, H, T, D)
    k: fx.Node  # (B, Hkv, S, D)
    v: fx.Node  # (B, Hkv, S, D)
    num_heads: int
    num_kv_heads: int
    head_dim: int
    scale: float
    causal: bool
    window: int | None = None  # keys j with i - window < j <= i, when set
    core_form: str = "sdpa"  # "sdpa", "eager" or "fused" (a condfx.attention node)
    x_in: fx.Node | None = None  # the (normalised) input of the q/k/v projections, (B, T, d)
    q_proj: LinearRef | None = None
    k_proj: LinearRef | None = None
    v_proj: LinearRef | None = None
    o_proj: LinearRef | None = None
    q_norm: NormRegion | None = None
    k_norm: NormRegion | None = None
    rope: RoPERef | None = None
    out: fx.Node | None = None  # output of o_proj, (B, T, d)
    residual: fx.Node | None = None  # the residual add that takes ``out``
    input_norm: NormRegion | None = None
    post_norm: NormRegion | None = None  # a norm between ``out`` and ``residual`` (sandwich norm)
    residual_scale: float | None = None  # c in ``residual = stream + c * branch`` (None: no multiplier)
    mask: fx.Node | None = None  # the mask tensor the core consumes (None for is_causal / no mask)
    # Score options of the core (``condfx/ops/_scores.py``): c in c * tanh(s / c) (0 = none), one ALiBi
    # slope per query head (scores + m_h * (j - i)), the (H,) sink-logit node (GPT-OSS).
    softcap: float = 0.0
    alibi_slopes: tuple[float, ...] | None = None
    sinks: fx.Node | None = None

    @property
    def score_options(self) -> str | None:
        """A short name of the score options this core has ("softcapped scores", ...), None for none.

        Passes that build another attention op from the region without these options skip it with this.
        """
        names = [name for name, on in (("softcapped scores", bool(self.softcap)),
                                       ("ALiBi", self.alibi_slopes is not None),
                                       ("attention sinks", self.sinks is not None)) if on]
        return " + ".join(names) or None


@dataclass(frozen=True)
class FFNRegion:
    layer: int
    module_path: str
    kind: FFNKind
    x_in: fx.Node  # (B, T, d)
    up: LinearRef
    down: LinearRef  # the anchor; down.node is the FFN output before the residual add
    gate: LinearRef | None
    act: fx.Node
    dim: int
    hidden_dim: int
    residual: fx.Node | None = None
    input_norm: NormRegion | None = None
    post_norm: NormRegion | None = None  # a norm between ``out`` and ``residual`` (sandwich norm)
    residual_scale: float | None = None  # c in ``residual = stream + c * branch`` (None: no multiplier)
    activation: str = ""  # "silu", "gelu", "gelu_tanh", "relu", "relu2", "sigmoid", "tanh"

    @property
    def out(self) -> fx.Node:
        return self.down.node


@dataclass(frozen=True)
class MoERegion:
    """A mixture-of-experts FFN block: router + top-k + experts (+ shared expert) → ``out``.

    ``expert_weights`` are the stacked (E, ., .) parameters of grouped experts (transformers'
    ``experts.gate_up_proj`` / ``down_proj``); ``experts`` are per-expert FFN regions when the experts
    are separate modules. ``out`` is the block output added to the residual stream by ``residual``.
    """

    layer: int
    module_path: str
    x_in: fx.Node  # the (normalised) input of the router and the experts, (B, T, d) or (B*T, d)
    router: LinearRef
    top_k: int
    num_experts: int
    expert_weights: tuple[fx.Node, ...]
    experts: tuple[FFNRegion, ...]
    shared: FFNRegion | None
    out: fx.Node
    residual: fx.Node | None = None
    input_norm: NormRegion | None = None


@dataclass(frozen=True)
class ResidualAdd:
    """``node = stream + branch``; ``branch`` is the region output after ``post_norm`` and ``scale``."""

    node: fx.Node  # the add
    stream: fx.Node  # the residual stream operand
    branch: fx.Node  # the block output operand
    post_norm: NormRegion | None = None
    scale: float | None = None


@dataclass(frozen=True)
class DecoderBlock:
    layer: int
    attention: AttentionRegion | None
    ffn: FFNRegion | None
    moe: MoERegion | None = None  # a MoE block in place of the dense FFN


@dataclass
class Regions:
    """Everything found in one graph, in graph order, plus the rejected candidates."""

    attention: list[AttentionRegion] = field(default_factory=list)
    ffn: list[FFNRegion] = field(default_factory=list)
    norms: list[NormRegion] = field(default_factory=list)
    residuals: list[ResidualAdd] = field(default_factory=list)
    blocks: list[DecoderBlock] = field(default_factory=list)
    failures: list[MatchFailure] = field(default_factory=list)
    moe: list[MoERegion] = field(default_factory=list)  # MoE blocks (not in ``ffn``)
