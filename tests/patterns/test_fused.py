"""Attention regions anchored on fused ``condfx.attention`` cores (left by ``fuse-attention``)."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

import condfx
from condfx.passes import FuseAttention, FuseAttentionConfig
from condfx.patterns import find_regions
from tests._helpers import ToyStack

from . import _models as M

FUSED = torch.ops.condfx.attention.default
ZOO_CASES = ("llama-tiny", "qwen3-tiny", "gpt2-tiny", "hf-llama")


def _private(gm):
    """A private copy of a cached capture (fuse-attention rewrites its input in place)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # pytree deprecation inside deepcopy
        return copy.deepcopy(gm)


def _summary(region) -> tuple:
    """What fusing must not change: heads, scale, layer, window and the walk outwards."""
    o_proj = region.o_proj.weight.target if region.o_proj is not None else None
    return (
        region.layer, region.module_path, region.num_heads, region.num_kv_heads, region.head_dim,
        pytest.approx(region.scale), region.causal, region.window, o_proj,
        region.residual.name if region.residual is not None else None, region.q_proj is not None, region.k_proj is not None,
        region.v_proj is not None, region.q_norm is not None, region.k_norm is not None,
        region.rope.style if region.rope is not None else None, region.input_norm is not None,
    )


def _fuse(gm):
    result = FuseAttention()(gm)
    assert result.modified
    return result.graph_module


@pytest.mark.parametrize("name", ZOO_CASES)
def test_fused_zoo_regions_match_unfused(name):
    gm = _private(M.capture_zoo(name))
    before = find_regions(gm)
    expected = [_summary(r) for r in before.attention]
    after = find_regions(_fuse(gm))
    assert len(after.attention) == len(before.attention) == 2
    assert [_summary(r) for r in after.attention] == expected
    assert not [f for f in after.failures if f.kind == "attention"]
    assert [b.layer for b in after.blocks] == [b.layer for b in before.blocks]
    for region in after.attention:
        assert region.core_form == "fused"
        assert region.core.target is FUSED and region.core_nodes == (region.core,)
        assert (region.q, region.k, region.v) == tuple(region.core.args[:3])
        assert region.scale == region.core.args[3] and region.mask is None
        assert region.out is region.o_proj.node and region.residual is not None


def test_fused_qk_norm_and_rope_are_found():
    gm = _fuse(_private(M.capture_zoo("qwen3-tiny")))
    for region in find_regions(gm).attention:
        assert region.q_norm is not None and region.k_norm is not None
        assert region.rope is not None and region.rope.k_pre is not None


def test_fused_window_is_recovered():
    torch.manual_seed(0)
    model = ToyStack(form="eager", window=3).eval()
    gm = condfx.capture(model, (torch.randn(2, 7, 16),))
    assert [r.window for r in find_regions(gm).attention] == [3, 3]
    regions = find_regions(_fuse(gm)).attention
    assert [(r.core_form, r.window, r.causal) for r in regions] == [("fused", 3, True)] * 2


def test_fused_sdpa_window_with_gqa():
    gm = M.capture_module(M.SDPAWindow())
    (region,) = find_regions(_fuse(gm)).attention
    assert (region.core_form, region.window, region.scale) == ("fused", 3, 0.5)
    assert (region.num_heads, region.num_kv_heads, region.head_dim) == (4, 2, 8)


def test_window_zero_reads_as_none():
    gm = _fuse(_private(M.capture_zoo("llama-tiny")))
    regions = find_regions(gm).attention
    assert [r.core.args[4] for r in regions] == [0, 0]
    assert [r.window for r in regions] == [None, None]


def test_partially_fused_graph_reports_both_forms():
    gm = _private(M.capture_zoo("llama-tiny"))
    result = FuseAttention(FuseAttentionConfig(layers=(1,)))(gm)
    regions = find_regions(result.graph_module).attention
    assert [(r.layer, r.core_form) for r in regions] == [(0, "sdpa"), (1, "fused")]


def test_fuse_attention_second_run_skips_fused_regions():
    gm = _fuse(_private(M.capture_zoo("gpt2-tiny")))
    again = FuseAttention()(gm)
    assert not again.modified and again.report.rewritten == 0
    assert [reason for reason, _ in again.report.skipped] == ["already fused"] * 2
    assert sum(n.target is FUSED for n in gm.graph.nodes) == 2
