"""``ModelInfo``: the shape summary every zoo model carries as ``model.info``.

A leaf module: the builders (``llama``, ``gpt2``, ``hf``) and the zoo import it, it imports none
of them, so the zoo can import the builders without a cycle.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelInfo:
    """Shape summary every zoo model carries as ``model.info``.

    Attributes:
        name: zoo name or file/folder stem.
        family: ``llama``, ``qwen2``, ``qwen3`` or ``gpt2`` (the HF ``model_type`` for HF models).
        n_layers, n_heads, n_kv_heads, head_dim, dim, hidden_dim, vocab_size, max_seq_len: shape.
    """

    name: str
    family: str
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    dim: int
    hidden_dim: int
    vocab_size: int
    max_seq_len: int
