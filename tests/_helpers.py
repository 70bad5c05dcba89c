"""Shared test helpers: the tolerance table, toy attention modules and tiny Hugging Face models."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from condfx.ops._masks import causal_window_mask
from condfx.verify import EXACT_TOLERANCES, max_abs_diff  # noqa: F401  (max_abs_diff: re-exported for the tests)

# (atol, rtol) per dtype for exact rewrites: the same table condfx.verify uses.
TOLERANCES = EXACT_TOLERANCES
# Lossy rewrites assert an SQNR floor instead (dB).
SQNR_FLOOR_DB = {"int8": 30.0, "int4": 15.0}


def assert_close_exact(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Asserts ``actual`` matches ``expected`` within the tolerance of ``expected``'s dtype."""
    atol, rtol = TOLERANCES[expected.dtype]
    torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol)


def dense_attention(q, k, v, scale: float, window: int = 0) -> torch.Tensor:
    """The textbook formula: repeat K/V heads, full (T, S) score matrix, end-aligned causal mask."""
    t, s = q.shape[2], k.shape[2]
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    keep = causal_window_mask(t, s, window)  # (T, S)
    scores = (q.double() @ k.double().transpose(-1, -2)) * scale
    probs = torch.softmax(scores.masked_fill(~keep, -math.inf), dim=-1)
    return (probs @ v.double()).to(q.dtype)


class ToyAttention(nn.Module):
    """One attention block: q/k/v projections, optional GQA repeat, a core, o_proj.

    ``form`` is "sdpa" (F.scaled_dot_product_attention) or "eager" (matmul, scale, mask, softmax,
    matmul). ``causal=False`` builds the non-causal near miss.
    """

    def __init__(self, dim=16, heads=4, kv_heads=2, form="sdpa", causal=True, window=0):
        super().__init__()
        self.h, self.hkv, self.hd = heads, kv_heads, dim // heads
        self.form, self.causal, self.window = form, causal, window
        self.q_proj = nn.Linear(dim, heads * self.hd, bias=False)
        self.k_proj = nn.Linear(dim, kv_heads * self.hd, bias=False)
        self.v_proj = nn.Linear(dim, kv_heads * self.hd, bias=False)
        self.o_proj = nn.Linear(heads * self.hd, dim, bias=False)

    def _core(self, q, k, v):
        if self.form == "sdpa":
            return F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        t = q.shape[2]
        scores = (q @ k.transpose(-1, -2)) * self.hd**-0.5  # (B, H, T, T)
        if self.causal:
            mask = torch.ones(t, t, dtype=torch.bool, device=q.device).tril()
            if self.window:
                mask = mask & ~torch.ones(t, t, dtype=torch.bool, device=q.device).tril(-self.window)
            scores = scores.masked_fill(~mask, float("-inf"))
        return torch.softmax(scores, dim=-1) @ v

    def forward(self, x):
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.h, self.hd).transpose(1, 2)  # (B, H, T, D)
        k = self.k_proj(x).view(b, t, self.hkv, self.hd).transpose(1, 2)  # (B, Hkv, T, D)
        v = self.v_proj(x).view(b, t, self.hkv, self.hd).transpose(1, 2)  # (B, Hkv, T, D)
        rep = self.h // self.hkv
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)  # (B, H, T, D)
        out = self._core(q, k, v).transpose(1, 2).reshape(b, t, -1)  # (B, T, H*D)
        return self.o_proj(out)


class ToyStack(nn.Module):
    """``layers`` ToyAttention blocks with residual adds, under ``layers.<i>`` module paths."""

    def __init__(self, layers=2, **kwargs):
        super().__init__()
        self.layers = nn.ModuleList(ToyAttention(**kwargs) for _ in range(layers))

    def forward(self, x):
        for layer in self.layers:
            x = x + layer(x)
        return x


def tiny_hf_model(family: str, attn_implementation: str = "sdpa") -> nn.Module:
    """A seeded 2-layer Hugging Face causal LM of ``family`` (llama, qwen2, qwen3, gpt2), eval mode."""
    import transformers as tf

    torch.manual_seed(0)
    common = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    configs = {
        "llama": lambda: tf.LlamaConfig(**common),
        "qwen2": lambda: tf.Qwen2Config(**common),
        "qwen3": lambda: tf.Qwen3Config(head_dim=8, **common),
        "gpt2": lambda: tf.GPT2Config(vocab_size=128, n_embd=32, n_layer=2, n_head=4, n_positions=64),
    }
    classes = {"llama": tf.LlamaForCausalLM, "qwen2": tf.Qwen2ForCausalLM,
               "qwen3": tf.Qwen3ForCausalLM, "gpt2": tf.GPT2LMHeadModel}
    config = configs[family]()
    config._attn_implementation = attn_implementation
    return classes[family](config).eval()
