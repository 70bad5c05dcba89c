"""Test subjects for the region finders: Hugging Face classes from small configs and hand-built cores.

Every builder is seeded and tiny; ``capture_*`` helpers return GraphModules from ``condfx.capture``.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import nn

import condfx

VOCAB = 128
N_LAYERS = 2
HF_KINDS = ("llama", "qwen2", "qwen3", "gpt2")
ZOO_NAMES = ("llama-tiny", "llama-tiny-eager", "qwen3-tiny", "qwen2-tiny", "gpt2-tiny", "gpt2-tiny-eager")


def build_hf(kind: str, attn_impl: str) -> nn.Module:
    """A 2-layer Hugging Face causal LM (hidden 64, 4 heads, 2 KV heads where supported)."""
    import transformers as tf

    torch.manual_seed(0)
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=N_LAYERS,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    if kind == "gpt2":
        config = tf.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=N_LAYERS, n_head=4, n_positions=64,
                               bos_token_id=0, eos_token_id=0)
    elif kind == "qwen3":
        config = tf.Qwen3Config(head_dim=16, **common)
    else:
        config = {"llama": tf.LlamaConfig, "qwen2": tf.Qwen2Config}[kind](**common)
    config._attn_implementation = attn_impl
    cls = {"llama": tf.LlamaForCausalLM, "qwen2": tf.Qwen2ForCausalLM, "qwen3": tf.Qwen3ForCausalLM,
           "gpt2": tf.GPT2LMHeadModel}[kind]
    return cls(config).eval()


@functools.cache
def capture_hf(kind: str, attn_impl: str):
    """Captured graph of ``build_hf(kind, attn_impl)`` (cached: capture takes seconds)."""
    return condfx.capture(build_hf(kind, attn_impl), torch.randint(0, VOCAB, (2, 12)))


@functools.cache
def capture_zoo(name: str):
    """Captured graph of the zoo model ``name``."""
    from condfx.models_zoo import build_zoo

    return condfx.capture(build_zoo(name), torch.randint(0, VOCAB, (2, 12)))


class BareAttention(nn.Module):
    """Eager attention on x (B, T, 32) with 4 heads; ``mask`` picks how (and whether) it is causal.

    mask: "triu" (additive -inf triu), "masked_fill" (bool triu, masked_fill -inf), "where" (bool
    tril, where(m, s, -inf)), "window" (sliding window 4 via masked_fill), "full" (additive zeros:
    not causal), "padding" (built from a padding input), "div_scale_q" (scale on q by div, triu mask).
    """

    def __init__(self, mask: str, dim: int = 32, heads: int = 4) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.mask, self.heads, self.head_dim = mask, heads, dim // heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        return x.view(b, t, self.heads, self.head_dim).transpose(1, 2)  # (B, H, T, D)

    def forward(self, x: torch.Tensor, pad: torch.Tensor | None = None) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self._split(self.q(x)), self._split(self.k(x)), self._split(self.v(x))
        if self.mask == "div_scale_q":
            q = q / math.sqrt(self.head_dim)
            s = q @ k.transpose(-2, -1)  # (B, H, T, T)
        else:
            s = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(self.head_dim))  # (B, H, T, T)
        s = self._masked(s, t, x.device, pad)
        y = s.softmax(-1) @ v  # (B, H, T, D)
        return self.o(y.transpose(1, 2).reshape(b, t, c))  # (B, T, C)

    def _masked(self, s, t, device, pad):
        ones = torch.ones(t, t, dtype=torch.bool, device=device)
        if self.mask in ("triu", "div_scale_q"):
            return s + torch.full((t, t), float("-inf"), device=device).triu(1)
        if self.mask == "masked_fill":
            return s.masked_fill(ones.triu(1), float("-inf"))
        if self.mask == "where":
            return torch.where(ones.tril(), s, float("-inf"))
        if self.mask == "window":
            return s.masked_fill(ones.triu(1) | ones.tril(-4), float("-inf"))
        if self.mask == "full":
            return s + torch.zeros(t, t, device=device)
        if self.mask == "padding":
            keep = ones.tril() & pad[:, None, None, :]  # (B, 1, T, T)
            return s.masked_fill(~keep, float("-inf"))
        msg = f"BareAttention.mask must be one of triu, masked_fill, where, window, full, padding; got {self.mask!r}."
        raise ValueError(msg)


def capture_bare(mask: str):
    """Captured BareAttention; the padding variant also takes a (B, T) bool input."""
    model = BareAttention(mask).eval()
    x = torch.randn(2, 12, 32)
    inputs = (x, torch.ones(2, 12, dtype=torch.bool)) if mask == "padding" else (x,)
    return condfx.capture(model, inputs)


class SDPAWindow(nn.Module):
    """SDPA with a bool sliding-window mask (window 3) and enable_gqa with 2 KV heads."""

    def __init__(self, dim: int = 32) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.q, self.kv = nn.Linear(dim, dim), nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.q(x).view(b, t, 4, 8).transpose(1, 2)  # (B, 4, T, 8)
        k, v = self.kv(x).view(b, t, 2, 2, 8).transpose(1, 3).unbind(2)  # (B, 2, T, 8) each
        i = torch.arange(t, device=x.device)
        keep = (i[None, :] <= i[:, None]) & (i[None, :] > i[:, None] - 3)  # (T, T)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=keep, enable_gqa=True, scale=0.5)
        return y.transpose(1, 2).reshape(b, t, 32)  # (B, T, C)


class NoAttention(nn.Module):
    """LayerNorm + a ReLU MLP: no attention, one FFN-looking near miss."""

    def __init__(self, dim: int = 32) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.norm, self.up, self.down = nn.LayerNorm(dim), nn.Linear(dim, 64), nn.Linear(64, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(torch.relu(self.up(self.norm(x))))  # (B, T, C)


class ExplicitNorms(nn.Module):
    """RMSNorm with weight on the left and a cast, then LayerNorm spelled out with var."""

    def __init__(self, dim: int = 32) -> None:
        super().__init__()
        self.w1, self.w2, self.b2 = (nn.Parameter(torch.ones(dim)) for _ in range(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = self.w1 * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-5)).to(x.dtype)  # (B, T, C)
        mu = h.mean(-1, keepdim=True)
        var = h.var(-1, keepdim=True, unbiased=False)
        return (h - mu) * torch.rsqrt(var + 1e-6) * self.w2 + self.b2  # (B, T, C)


class WrongAxisNorm(nn.Module):
    """An RMSNorm-looking reduction over the sequence dim: a near miss."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(1, keepdim=True) + 1e-5)  # (B, T, C)


def capture_module(model: nn.Module):
    return condfx.capture(model.eval(), (torch.randn(2, 12, 32),))
