"""Shared models of the conformance suite: tiny Gemma-3 files (an HF folder and a GGUF) written once.

Tests marked ``slow`` (the full conformance sweep) run only when asked for: ``-m slow``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.hostile.test_loading import VOCAB, _gguf_tensors, _save_byte_tokenizer, _write_gguf


def pytest_collection_modifyitems(config, items):
    """Skips this folder's ``slow`` tests unless the marker expression selects them."""
    if "slow" in (config.getoption("-m") or ""):
        return
    skip = pytest.mark.skip(reason="the full sweep; run with -m slow")
    for item in items:
        if "slow" in item.keywords and "tests/models" in str(item.fspath).replace("\\", "/"):
            item.add_marker(skip)


def tiny_gemma3(n_layers: int = 3):
    """A seeded Gemma-3 text model: ``n_layers`` layers, the last one full and the others sliding
    (3 by default: calibrate needs three FFN layers), hidden 64, 4 heads, 2 KV heads, vocab 256."""
    import transformers as tf

    config = tf.Gemma3TextConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=n_layers,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, pad_token_id=0, bos_token_id=1,
        eos_token_id=2, max_position_embeddings=256, sliding_window=16,
        layer_types=["sliding_attention"] * (n_layers - 1) + ["full_attention"],
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return tf.Gemma3ForCausalLM(config).eval()


@pytest.fixture(scope="session")
def gemma3_folder(tmp_path_factory) -> Path:
    """``save_pretrained`` of ``tiny_gemma3`` with a byte-level tokenizer."""
    folder = tmp_path_factory.mktemp("gemma3-hf")
    tiny_gemma3().save_pretrained(folder)
    _save_byte_tokenizer(folder)
    return folder


@pytest.fixture(scope="session")
def gemma3_gguf(tmp_path_factory) -> Path:
    """A 2-layer ``tiny_gemma3``'s weights in a GGUF file written with the ``gguf`` package's writer
    (transformers reads GGUF's layer pattern: both layers sliding, window 4096)."""
    path = tmp_path_factory.mktemp("gemma3-gguf") / "gemma3-tiny.gguf"
    return _write_gguf(path, _gguf_tensors(tiny_gemma3(2)), arch="gemma3")
