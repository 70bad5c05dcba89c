"""Residual adds, layer indices, decoder blocks, and speed on a 7B-shaped meta graph."""

from __future__ import annotations

import time

import pytest
import torch

import condfx
from condfx.patterns import find_regions

from . import _models as M


@pytest.mark.parametrize(("kind", "impl"), [(k, i) for k in M.HF_KINDS for i in ("sdpa", "eager")])
def test_matches_hf_blocks(kind: str, impl: str) -> None:
    regions = find_regions(M.capture_hf(kind, impl))
    assert [b.layer for b in regions.blocks] == list(range(M.N_LAYERS))
    assert all(b.attention is not None and b.ffn is not None for b in regions.blocks)
    assert len(regions.residuals) == 2 * M.N_LAYERS
    order = {n: i for i, n in enumerate(regions.residuals[0].node.graph.nodes)}
    for block in regions.blocks:
        attn_res, ffn_res = block.attention.residual, block.ffn.residual
        assert order[attn_res] < order[block.ffn.down.op_node] < order[ffn_res]
        # the FFN reads the normalised output of the attention residual stream
        assert block.ffn.input_norm.x_in is attn_res


@pytest.mark.parametrize("name", M.ZOO_NAMES)
def test_matches_zoo_blocks(name: str) -> None:
    regions = find_regions(M.capture_zoo(name))
    assert [b.layer for b in regions.blocks] == list(range(M.N_LAYERS))
    assert len(regions.residuals) == 2 * M.N_LAYERS and regions.failures == []


def test_matches_meta_llama_7b_shape_quickly() -> None:
    from condfx.models_zoo import LlamaConfig, LlamaModel

    cfg = LlamaConfig(vocab_size=32000, dim=4096, n_layers=8, n_heads=32, n_kv_heads=32, hidden_dim=11008)
    with torch.device("meta"):
        model = LlamaModel(cfg).eval()
    gm = condfx.capture(model, torch.zeros(2, 12, dtype=torch.long, device="meta"))
    start = time.perf_counter()
    regions = find_regions(gm)
    elapsed = time.perf_counter() - start
    assert [b.layer for b in regions.blocks] == list(range(8))
    assert regions.attention[0].head_dim == 128 and regions.ffn[0].hidden_dim == 11008
    assert elapsed < 10.0 * 8 / 32, f"find_regions took {elapsed:.2f}s on 8 layers"
