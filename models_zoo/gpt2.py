"""GPT-2-family decoder: learned positions, fused qkv projection, LayerNorm, GELU(tanh) MLP.

Module names follow Hugging Face ``GPT2LMHeadModel`` (``wte``, ``wpe``, ``h.N.attn.c_attn``, ...),
but projections are ``nn.Linear`` (HF uses a transposed ``Conv1D``). The LM head is tied to ``wte``.
Export-friendly like ``llama.py``: no data-dependent Python control flow, meta-device buildable.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .info import ModelInfo
from .llama import AttnImpl, causal_mask, init_weights, parse_attn_impl


@dataclass(frozen=True)
class GPT2Config:
    """Shape and options of a GPT-2-family decoder.

    Attributes:
        vocab_size: number of tokens.
        dim: model width (``n_embd``).
        n_layers: number of blocks.
        n_heads: attention heads (must divide ``dim``).
        hidden_dim: MLP inner width (GPT-2 uses ``4 * dim``).
        max_seq_len: number of learned positions; longer inputs fail in the position lookup.
        norm_eps: LayerNorm epsilon.
        attn_impl: ``AttnImpl.SDPA`` or ``AttnImpl.EAGER`` (strings are accepted).
    """

    vocab_size: int = 256
    dim: int = 64
    n_layers: int = 2
    n_heads: int = 4
    hidden_dim: int = 256
    max_seq_len: int = 512
    norm_eps: float = 1e-5
    attn_impl: AttnImpl = AttnImpl.SDPA

    def __post_init__(self) -> None:
        object.__setattr__(
            self, "attn_impl", parse_attn_impl(self.attn_impl, "GPT2Config.attn_impl")
        )
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "hidden_dim", "max_seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                msg = f"GPT2Config.{name} must be a positive int; got {value!r}."
                raise ValueError(msg)
        if self.dim % self.n_heads:
            msg = f"GPT2Config.dim ({self.dim}) must be divisible by n_heads ({self.n_heads})."
            raise ValueError(msg)
        if not self.norm_eps > 0:
            msg = f"GPT2Config.norm_eps must be positive; got {self.norm_eps!r}."
            raise ValueError(msg)

    @property
    def head_dim(self) -> int:
        """Width of one attention head."""
        return self.dim // self.n_heads


class GPT2Attention(nn.Module):
    """Causal self-attention with a fused qkv projection (``c_attn``, with bias)."""

    def __init__(self, cfg: GPT2Config) -> None:
        super().__init__()
        self.n_heads, self.head_dim, self.attn_impl = cfg.n_heads, cfg.head_dim, cfg.attn_impl
        self.c_attn = nn.Linear(cfg.dim, 3 * cfg.dim, bias=True)
        self.c_proj = nn.Linear(cfg.dim, cfg.dim, bias=True)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.c_attn(x).split(c, dim=2)  # (B, T, C) each
        q = q.view(b, t, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = k.view(b, t, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        v = v.view(b, t, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        if self.attn_impl is AttnImpl.SDPA:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, H, T, D)
        else:
            scores = torch.matmul(q, k.transpose(-2, -1))  # (B, H, T, T)
            scores = scores * (1.0 / math.sqrt(self.head_dim))  # (B, H, T, T)
            if mask is not None:
                scores = scores + mask  # (B, H, T, T)
            probs = F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)  # (B, H, T, T)
            y = torch.matmul(probs, v)  # (B, H, T, D)
        y = y.transpose(1, 2).reshape(b, t, c)  # (B, T, C)
        return self.c_proj(y)  # (B, T, C)


class GPT2MLP(nn.Module):
    """c_proj(gelu_tanh(c_fc(x)))."""

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.c_fc = nn.Linear(dim, hidden_dim, bias=True)
        self.c_proj = nn.Linear(hidden_dim, dim, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(F.gelu(self.c_fc(x), approximate="tanh"))  # (B, T, C)


class GPT2Block(nn.Module):
    """Pre-LayerNorm block: x + attn(ln_1(x)), then h + mlp(ln_2(h))."""

    def __init__(self, cfg: GPT2Config) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.attn = GPT2Attention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.mlp = GPT2MLP(cfg.dim, cfg.hidden_dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        h = x + self.attn(self.ln_1(x), mask)  # (B, T, C)
        return h + self.mlp(self.ln_2(h))  # (B, T, C)


class GPT2Model(nn.Module):
    """GPT-2-family causal LM: ``forward(input_ids (B, T) int64) -> logits (B, T, V) float``.

    Args:
        cfg: the model shape and options.
        seed: seed of the deterministic weight init (see ``llama.init_weights``).
        name: the name reported in ``info``.
    """

    def __init__(self, cfg: GPT2Config, seed: int = 0, name: str = "gpt2") -> None:
        super().__init__()
        self.config = cfg
        self.name = name
        self.wte = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.wpe = nn.Embedding(cfg.max_seq_len, cfg.dim)
        self.h = nn.ModuleList(GPT2Block(cfg) for _ in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight
        init_weights(self, seed)

    @property
    def info(self):
        """The model's ``ModelInfo`` (shape summary shared by every zoo model)."""
        return info_from_gpt2(self.config, self.name)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        _, t = input_ids.shape
        pos = torch.arange(t, device=input_ids.device)  # (T,)
        h = self.wte(input_ids) + self.wpe(pos)  # (B, T, C)
        mask = None
        if self.config.attn_impl is AttnImpl.EAGER:
            mask = causal_mask(t, h.device, h.dtype)  # (T, T)
        for block in self.h:
            h = block(h, mask)  # (B, T, C)
        h = self.ln_f(h)  # (B, T, C)
        return self.lm_head(h)  # (B, T, V)


def info_from_gpt2(cfg: GPT2Config, name: str) -> ModelInfo:
    """``ModelInfo`` of a ``GPT2Model``."""
    return ModelInfo(
        name=name,
        family="gpt2",
        n_layers=cfg.n_layers,
        n_heads=cfg.n_heads,
        n_kv_heads=cfg.n_heads,
        head_dim=cfg.head_dim,
        dim=cfg.dim,
        hidden_dim=cfg.hidden_dim,
        vocab_size=cfg.vocab_size,
        max_seq_len=cfg.max_seq_len,
    )
