"""Tests of ``fuse-attention``: matches, rejections, numerics, golden graph, idempotence."""

from __future__ import annotations

import copy
import dataclasses
import functools
import re
import warnings

import pytest
import torch
import torch.nn.functional as F
from expecttest import assert_expected_inline
from torch import nn

import condfx
from condfx.graph_text import graph_text
from condfx.passes import FuseAttention, FuseAttentionConfig, PassError, apply
from condfx.passes.fuse_attention import FUSED_TARGET, check_fusable
from condfx.patterns import find_regions
from tests._helpers import TOLERANCES, ToyStack, max_abs_diff, tiny_hf_model

_SOURCE_OPS = ("scaled_dot_product_attention", "softmax", "repeat_interleave", "expand")


@functools.cache
def _captured_toy(seed, kwargs):
    torch.manual_seed(seed)
    model = ToyStack(**dict(kwargs)).eval()
    x = torch.randn(2, 7, 16)
    return model, condfx.capture(model, (x,)), x


def _capture_toy(seed=0, **kwargs):
    """(model, private copy of its captured graph, example input); captures are cached per config."""
    model, gm, x = _captured_toy(seed, tuple(sorted(kwargs.items())))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # pytree deprecation inside deepcopy
        return model, copy.deepcopy(gm), x


def _fused_nodes(gm):
    return [n for n in gm.graph.nodes if n.target is FUSED_TARGET]


@pytest.mark.parametrize("form", ["sdpa", "eager"])
@pytest.mark.parametrize("kv_heads", [4, 2, 1])
def test_matches_toy_attention(form, kv_heads):
    _, gm, _ = _capture_toy(form=form, kv_heads=kv_heads)
    result = FuseAttention()(gm)
    assert result.modified and result.report.rewritten == result.report.matched == 2
    text = graph_text(result.graph_module)
    assert text.count("condfx.attention.default") == 2
    assert not any(op in text for op in _SOURCE_OPS)
    k_arg = _fused_nodes(result.graph_module)[0].args[1]
    assert k_arg.meta["val"].shape[1] == kv_heads  # K/V heads are not repeated any more


def test_matches_sliding_window_mask():
    _, gm, x = _capture_toy(form="eager", window=3)
    result = FuseAttention()(gm)
    assert [n.args[4] for n in _fused_nodes(result.graph_module)] == [3, 3]


def test_matches_selected_layers_only():
    _, gm, _ = _capture_toy()
    result = FuseAttention(FuseAttentionConfig(layers=(1,)))(gm)
    assert result.report.matched == result.report.rewritten == 1
    (node,) = _fused_nodes(result.graph_module)
    assert "layers.1" in list(node.meta["nn_module_stack"].values())[-1][0]
    assert graph_text(gm).count("scaled_dot_product_attention") == 1


def test_matches_meta_on_the_fused_node():
    _, gm, _ = _capture_toy()
    (node, _) = _fused_nodes(FuseAttention()(gm).graph_module)
    q_val = node.args[0].meta["val"]
    assert node.meta["val"].shape == q_val.shape and node.meta["val"].fake_mode is q_val.fake_mode
    assert node.meta["stack_trace"] and node.meta["nn_module_stack"]


def test_rejects_non_causal_attention():
    _, gm, _ = _capture_toy(causal=False)
    before = graph_text(gm)
    result = FuseAttention()(gm)
    assert not result.modified and graph_text(result.graph_module) == before
    assert result.report.matched == 0 and result.report.rewritten == 0
    assert any(re.search(r"attention: mask is not causal", m) for m in result.report.near_misses)
    with pytest.raises(PassError, match=r"fuse-attention matched no attention region; near misses: "
                                        r"attention: mask is not causal"):
        apply(gm, "fuse-attention")


def test_rejects_region_marked_non_causal():
    _, gm, _ = _capture_toy()
    region = find_regions(gm).attention[0]
    failure = check_fusable(dataclasses.replace(region, causal=False))
    assert re.fullmatch(r"non-causal attention", failure.reason) and failure.node is region.core


def test_rejects_layer_not_in_graph():
    # issue 18: an out-of-range layer used to be a silent skip ("layer not found"); it is refused now
    _, gm, _ = _capture_toy()
    with pytest.raises(PassError, match=r"fuse-attention: layers \[5\] are out of range; the graph has 2 "
                                        r"attention layers \(valid indices 0\.\.1\)"):
        FuseAttention(FuseAttentionConfig(layers=(5,)))(gm)


@pytest.mark.parametrize("bad", [["x"], [-1], 3, [True]])
def test_rejects_bad_config(bad):
    with pytest.raises(ValueError, match=r"FuseAttentionConfig.layers must be a list of non-negative"):
        FuseAttentionConfig(layers=bad)


def test_rejects_graph_without_attention_through_pipeline():
    gm = condfx.capture(nn.Sequential(nn.Linear(4, 4)), (torch.randn(2, 3, 4),))
    with pytest.raises(PassError, match=r"fuse-attention matched no attention region"):
        apply(gm, "fuse-attention")


@pytest.mark.parametrize("form", ["sdpa", "eager"])
def test_numerics_toy_logits(form):
    model, gm, _ = _capture_toy(form=form, kv_heads=2, window=0)
    fused = apply(gm, "fuse-attention").graph_module
    x = torch.randn(3, 11, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert max_abs_diff(fused(x), model(x)) <= TOLERANCES[torch.float32][0]


# The full family x implementation grid is measured in the report; CI runs a spread of four.
@pytest.mark.parametrize(
    ("family", "impl"), [("llama", "sdpa"), ("qwen2", "eager"), ("qwen3", "sdpa"), ("gpt2", "eager")]
)
def test_numerics_hf_models(family, impl):
    model = tiny_hf_model(family, impl)
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    result = apply(condfx.capture(model, (ids,)), "fuse-attention", verify_inputs=(ids,))
    assert result.reports[0].rewritten == 2
    assert result.reports[0].cost_before == result.reports[0].cost_after
    ids = torch.randint(0, 128, (3, 13), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        diff = max_abs_diff(result.graph_module(ids), model(ids).logits)
    assert diff <= 1e-5


class _TwoOpAttention(nn.Module):
    def forward(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2)


def test_golden_two_op_attention():
    q, k, v = torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3, 4)
    gm = condfx.capture(_TwoOpAttention(), (q, k, v), dynamic=False)
    assert_expected_inline(graph_text(gm), """\
%q = input()
%k = input()
%v = input()
%0 = aten.scaled_dot_product_attention.default(%q, %k, %v, None, 0.0, True)
%1 = aten.transpose.int(%0, 1, 2)
return (%1,)""")
    fused = FuseAttention()(gm).graph_module
    assert_expected_inline(graph_text(fused), """\
%q = input()
%k = input()
%v = input()
%0 = condfx.attention.default(%q, %k, %v, 0.5, 0)
%1 = aten.transpose.int(%0, 1, 2)
return (%1,)""")


def test_golden_report_markdown():
    _, gm, _ = _capture_toy()
    report = FuseAttention()(gm).report
    text = re.sub(r"wall time [0-9.]+ s", "wall time <t> s", report.to_markdown())
    assert_expected_inline(text, """\
### fuse-attention

- matched 2, rewritten 2, skipped 0
- nodes +2 / -6, params +0
- wall time <t> s

| estimate | before | after | change |
|---|---:|---:|---:|
| attention FLOPs/token | 265,216 | 265,216 | +0.0% |
| FFN FLOPs/token | 0 | 0 | n/a |
| KV-cache bytes/token (L=2048, float16) | 64 | 64 | +0.0% |""")


def test_matches_idempotent_second_run():
    _, gm, _ = _capture_toy()
    once = apply(gm, "fuse-attention").graph_module
    text = graph_text(once)
    twice = FuseAttention()(once)
    assert not twice.modified and graph_text(twice.graph_module) == text
    assert twice.report.rewritten == 0 and [r for r, _ in twice.report.skipped] == ["already fused"] * 2
    assert not apply(once, "fuse-attention").modified  # matched (already fused), so no error
