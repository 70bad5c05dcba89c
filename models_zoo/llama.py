"""Llama/Qwen-family decoder: RMSNorm, half-split RoPE, GQA, SwiGLU; optional QK-norm and qkv bias.

Written to be captured: no data-dependent Python control flow and no ``.item()``, so
``torch.export`` works with dynamic batch and sequence dimensions; buildable on the meta device.

Conventions (match Hugging Face ``LlamaForCausalLM``):
- RoPE is the half-split ("rotate_half") form; llama2.c checkpoints are un-permuted on load.
- QK-norm (Qwen3) is an RMSNorm over ``head_dim`` applied to q and k per head, before RoPE.
- ``AttnImpl.SDPA`` calls ``F.scaled_dot_product_attention(is_causal=True, enable_gqa=...)``;
  ``AttnImpl.EAGER`` spells it out: repeat K/V heads -> matmul -> scale -> additive causal mask ->
  softmax (float32) -> matmul.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum

import torch
import torch.nn.functional as F
from torch import nn

from .info import ModelInfo


class AttnImpl(str, Enum):
    """How the attention core is computed."""

    SDPA = "sdpa"
    EAGER = "eager"


def parse_attn_impl(value: AttnImpl | str, owner: str = "attn_impl") -> AttnImpl:
    """Return ``value`` as an ``AttnImpl``, raising ValueError naming the allowed values."""
    try:
        return AttnImpl(value)
    except ValueError:
        allowed = ", ".join(a.value for a in AttnImpl)
        msg = f"{owner} must be one of {{{allowed}}}; got {value!r}."
        raise ValueError(msg) from None


@dataclass(frozen=True)
class LlamaConfig:
    """Shape and options of a Llama/Qwen-family decoder.

    Attributes:
        vocab_size: number of tokens.
        dim: model (residual stream) width.
        n_layers: number of decoder blocks.
        n_heads: query heads.
        n_kv_heads: key/value heads (GQA when fewer than ``n_heads``; must divide it).
        hidden_dim: SwiGLU inner width.
        max_seq_len: longest sequence the model is meant for (informational; RoPE is computed on
            the fly so capture needs no upper bound).
        rope_theta: RoPE base.
        norm_eps: RMSNorm epsilon.
        qk_norm: RMSNorm on q and k per head (Qwen3).
        qkv_bias: biases on the q/k/v projections (Qwen2).
        tie_embeddings: the LM head shares the token embedding.
        attn_impl: ``AttnImpl.SDPA`` or ``AttnImpl.EAGER`` (strings are accepted).
    """

    vocab_size: int = 256
    dim: int = 64
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: int = 2
    hidden_dim: int = 172
    max_seq_len: int = 512
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    qk_norm: bool = False
    qkv_bias: bool = False
    tie_embeddings: bool = False
    attn_impl: AttnImpl = AttnImpl.SDPA

    def __post_init__(self) -> None:
        object.__setattr__(
            self, "attn_impl", parse_attn_impl(self.attn_impl, "LlamaConfig.attn_impl")
        )
        for name in (
            "vocab_size",
            "dim",
            "n_layers",
            "n_heads",
            "n_kv_heads",
            "hidden_dim",
            "max_seq_len",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                msg = f"LlamaConfig.{name} must be a positive int; got {value!r}."
                raise ValueError(msg)
        if self.dim % self.n_heads:
            msg = f"LlamaConfig.dim ({self.dim}) must be divisible by n_heads ({self.n_heads})."
            raise ValueError(msg)
        if self.head_dim % 2:
            msg = (
                f"LlamaConfig head_dim = dim / n_heads must be even for RoPE; got {self.head_dim}."
            )
            raise ValueError(msg)
        if self.n_heads % self.n_kv_heads:
            msg = (
                f"LlamaConfig.n_kv_heads ({self.n_kv_heads}) must divide n_heads ({self.n_heads})."
            )
            raise ValueError(msg)
        if not self.rope_theta > 0 or not self.norm_eps > 0:
            msg = (
                f"LlamaConfig.rope_theta and norm_eps must be positive; "
                f"got {self.rope_theta!r} and {self.norm_eps!r}."
            )
            raise ValueError(msg)

    @property
    def head_dim(self) -> int:
        """Width of one attention head."""
        return self.dim // self.n_heads


class RMSNorm(nn.Module):
    """RMSNorm computed in float32, as Hugging Face Llama does."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)  # (..., D)
        return self.weight * x.to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """Rotate the two halves of the last dimension: (x1, x2) -> (-x2, x1)."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Apply half-split RoPE to ``x`` (B, H, T, D) with ``cos``/``sin`` of shape (T, D)."""
    return x * cos + rotate_half(x) * sin  # (B, H, T, D)


def causal_mask(t: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Additive causal mask (T, T): 0 on and below the diagonal, -inf above."""
    return torch.triu(torch.full((t, t), float("-inf"), device=device, dtype=dtype), diagonal=1)


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """Repeat each K/V head ``n_rep`` times: (B, KV, T, D) -> (B, KV * n_rep, T, D)."""
    if n_rep == 1:
        return x
    b, kv, t, d = x.shape
    x = x[:, :, None, :, :].expand(b, kv, n_rep, t, d)  # (B, KV, R, T, D)
    return x.reshape(b, kv * n_rep, t, d)  # (B, H, T, D)


class Attention(nn.Module):
    """Multi-head attention with GQA, RoPE and optional QK-norm / qkv bias."""

    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.n_rep = cfg.n_heads // cfg.n_kv_heads
        self.attn_impl = cfg.attn_impl
        kv_dim = cfg.n_kv_heads * cfg.head_dim
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.wk = nn.Linear(cfg.dim, kv_dim, bias=cfg.qkv_bias)
        self.wv = nn.Linear(cfg.dim, kv_dim, bias=cfg.qkv_bias)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(cfg.head_dim, cfg.norm_eps) if cfg.qk_norm else None

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None
    ) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.wq(x).view(b, t, self.n_heads, self.head_dim)  # (B, T, H, D)
        k = self.wk(x).view(b, t, self.n_kv_heads, self.head_dim)  # (B, T, KV, D)
        v = self.wv(x).view(b, t, self.n_kv_heads, self.head_dim)  # (B, T, KV, D)
        if self.q_norm is not None and self.k_norm is not None:
            q = self.q_norm(q)  # (B, T, H, D)
            k = self.k_norm(k)  # (B, T, KV, D)
        q = apply_rope(q.transpose(1, 2), cos, sin)  # (B, H, T, D)
        k = apply_rope(k.transpose(1, 2), cos, sin)  # (B, KV, T, D)
        v = v.transpose(1, 2)  # (B, KV, T, D)
        if self.attn_impl is AttnImpl.SDPA:
            y = F.scaled_dot_product_attention(
                q, k, v, is_causal=True, enable_gqa=self.n_rep > 1
            )  # (B, H, T, D)
        else:
            y = self._eager_core(q, k, v, mask)  # (B, H, T, D)
        y = y.transpose(1, 2).reshape(b, t, self.n_heads * self.head_dim)  # (B, T, H*D)
        return self.wo(y)  # (B, T, C)

    def _eager_core(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None
    ) -> torch.Tensor:
        k = repeat_kv(k, self.n_rep)  # (B, H, T, D)
        v = repeat_kv(v, self.n_rep)  # (B, H, T, D)
        scores = torch.matmul(q, k.transpose(-2, -1))  # (B, H, T, T)
        scores = scores * (1.0 / math.sqrt(self.head_dim))  # (B, H, T, T)
        if mask is not None:
            scores = scores + mask  # (B, H, T, T)
        probs = F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)  # (B, H, T, T)
        return torch.matmul(probs, v)  # (B, H, T, D)


class FeedForward(nn.Module):
    """SwiGLU FFN: w2(silu(w1 x) * w3 x)."""

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))  # (B, T, C)


class Block(nn.Module):
    """Pre-norm decoder block: x + attn(norm(x)), then h + ffn(norm(h))."""

    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attention = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.feed_forward = FeedForward(cfg.dim, cfg.hidden_dim)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None
    ) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), cos, sin, mask)  # (B, T, C)
        return h + self.feed_forward(self.ffn_norm(h))  # (B, T, C)


class LlamaModel(nn.Module):
    """Llama/Qwen-family causal LM: ``forward(input_ids (B, T) int64) -> logits (B, T, V) float``.

    Args:
        cfg: the model shape and options.
        seed: seed of the deterministic weight init (normal(0, 0.02) for linears and embeddings,
            ones for norms, zeros for biases). Skipped on the meta device.
        name: the name reported in ``info`` (zoo name or checkpoint stem).
    """

    def __init__(self, cfg: LlamaConfig, seed: int = 0, name: str = "llama") -> None:
        super().__init__()
        self.config = cfg
        self.name = name
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        inv_freq = 1.0 / (
            cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2, dtype=torch.float32) / cfg.head_dim)
        )  # (D/2,)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        init_weights(self, seed)

    @property
    def info(self):
        """The model's ``ModelInfo`` (shape summary shared by every zoo model)."""
        return info_from_llama(self.config, self.name)

    def rope_cos_sin(self, t: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Return RoPE cos and sin tables of shape (T, D) for positions 0..t-1."""
        pos = torch.arange(t, device=device, dtype=torch.float32)  # (T,)
        freqs = torch.outer(pos, self.inv_freq.to(device))  # (T, D/2)
        emb = torch.cat((freqs, freqs), dim=-1)  # (T, D)
        return emb.cos(), emb.sin()

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        _, t = input_ids.shape
        h = self.tok_embeddings(input_ids)  # (B, T, C)
        cos, sin = self.rope_cos_sin(t, h.device)  # (T, D)
        cos, sin = cos.to(h.dtype), sin.to(h.dtype)
        mask = None
        if self.config.attn_impl is AttnImpl.EAGER:
            mask = causal_mask(t, h.device, h.dtype)  # (T, T)
        for layer in self.layers:
            h = layer(h, cos, sin, mask)  # (B, T, C)
        h = self.norm(h)  # (B, T, C)
        return self.output(h)  # (B, T, V)


def init_weights(model: nn.Module, seed: int, std: float = 0.02) -> None:
    """Deterministically initialise a zoo model from ``seed`` (no-op on the meta device).

    Linear and embedding weights get normal(0, std), biases zeros, norm weights (1-D, named
    ``weight`` inside a norm) ones. The global RNG is not touched.
    """
    params = list(model.named_parameters())
    if any(p.is_meta for _, p in params):
        return
    gen = torch.Generator(device="cpu").manual_seed(seed)
    with torch.no_grad():
        for name, p in params:
            if name.endswith("bias"):
                p.zero_()
            elif p.dim() == 1:
                p.fill_(1.0)
            else:
                p.copy_(torch.empty(p.shape).normal_(0.0, std, generator=gen))


def info_from_llama(cfg: LlamaConfig, name: str) -> ModelInfo:
    """``ModelInfo`` of a ``LlamaModel``; the family is qwen3 with QK-norm, qwen2 with qkv bias."""
    family = "qwen3" if cfg.qk_norm else "qwen2" if cfg.qkv_bias else "llama"
    return ModelInfo(
        name=name,
        family=family,
        n_layers=cfg.n_layers,
        n_heads=cfg.n_heads,
        n_kv_heads=cfg.n_kv_heads,
        head_dim=cfg.head_dim,
        dim=cfg.dim,
        hidden_dim=cfg.hidden_dim,
        vocab_size=cfg.vocab_size,
        max_seq_len=cfg.max_seq_len,
    )
