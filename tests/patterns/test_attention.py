"""Attention regions on Hugging Face models, zoo models and hand-built cores."""

from __future__ import annotations

import re

import pytest

from condfx.patterns import RoPEStyle, find_attention_regions, find_regions

from . import _models as M

HF_CASES = [(kind, impl) for kind in M.HF_KINDS for impl in ("sdpa", "eager")]
# kind -> (num_heads, num_kv_heads, head_dim, rope style, qk-norm)
EXPECTED = {
    "llama": (4, 2, 16, RoPEStyle.HALF, False),
    "qwen2": (4, 2, 16, RoPEStyle.HALF, False),
    "qwen3": (4, 2, 16, RoPEStyle.HALF, True),
    "gpt2": (4, 4, 16, None, False),
}


def _check_model(gm, kind: str, form: str) -> None:
    regions = find_regions(gm)
    heads, kv_heads, head_dim, rope, qk_norm = EXPECTED[kind]
    assert len(regions.attention) == M.N_LAYERS
    assert not [f for f in regions.failures if f.kind == "attention"]
    for i, region in enumerate(regions.attention):
        assert region.layer == i
        assert (region.num_heads, region.num_kv_heads, region.head_dim) == (heads, kv_heads, head_dim)
        assert region.scale == pytest.approx(head_dim**-0.5)
        assert region.causal and region.window is None
        assert region.core_form == form
        for node in (region.k, region.v):
            b, h, s, d = node.meta["val"].shape
            assert (h, d) == (kv_heads, head_dim)
        assert region.q.meta["val"].shape[1] == heads
        assert all(p is not None for p in (region.q_proj, region.k_proj, region.v_proj, region.o_proj))
        assert region.x_in is not None and region.input_norm is not None
        assert region.out is region.o_proj.node and region.residual is not None
        assert (region.rope.style if region.rope else None) == rope
        assert (region.q_norm is not None, region.k_norm is not None) == (qk_norm, qk_norm)


@pytest.mark.parametrize(("kind", "impl"), HF_CASES)
def test_matches_hf_attention(kind: str, impl: str) -> None:
    _check_model(M.capture_hf(kind, impl), kind, impl)


@pytest.mark.parametrize("name", M.ZOO_NAMES)
def test_matches_zoo_attention(name: str) -> None:
    kind = name.split("-")[0]
    _check_model(M.capture_zoo(name), kind, "eager" if name.endswith("eager") else "sdpa")


def test_matches_gpt2_fused_qkv_slices() -> None:
    region = find_attention_regions(M.capture_hf("gpt2", "eager"))[0]
    slices = [region.q_proj.out_slice, region.k_proj.out_slice, region.v_proj.out_slice]
    assert slices == [(0, 64), (64, 128), (128, 192)]
    assert region.q_proj.weight_layout == "in_out" and region.q_proj.bias is not None


def test_matches_qwen2_qkv_bias() -> None:
    region = find_attention_regions(M.capture_hf("qwen2", "sdpa"))[0]
    assert region.q_proj.bias is not None and region.o_proj.bias is None


@pytest.mark.parametrize(("mask", "window"), [("triu", None), ("masked_fill", None), ("where", None),
                                              ("window", 4), ("div_scale_q", None)])
def test_matches_bare_eager_core(mask: str, window: int | None) -> None:
    regions = find_regions(M.capture_bare(mask))
    assert regions.failures == []
    (region,) = regions.attention
    assert (region.num_heads, region.num_kv_heads, region.head_dim) == (4, 4, 8)
    assert region.scale == pytest.approx(8**-0.5)
    assert region.causal and region.window == window
    assert region.o_proj is not None and region.q_proj is not None


def test_matches_sdpa_bool_window_mask_with_enable_gqa() -> None:
    (region,) = find_attention_regions(M.capture_module(M.SDPAWindow()))
    assert (region.num_heads, region.num_kv_heads, region.head_dim) == (4, 2, 8)
    assert region.scale == 0.5 and region.causal and region.window == 3


@pytest.mark.parametrize(("mask", "reason"), [("full", r"^mask is not causal$"),
                                              ("padding", r"^mask depends on input data$")])
def test_rejects_non_causal_masks(mask: str, reason: str) -> None:
    regions = find_regions(M.capture_bare(mask))
    assert regions.attention == []
    failures = [f for f in regions.failures if f.kind == "attention"]
    assert len(failures) == 1 and re.match(reason, failures[0].reason)
    assert failures[0].node is not None


def test_rejects_nothing_without_attention() -> None:
    regions = find_regions(M.capture_module(M.NoAttention()))
    assert regions.attention == [] and regions.blocks == []
