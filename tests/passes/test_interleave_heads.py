"""Tests of ``interleave-heads``: matches, rejections, numerics, golden graph, idempotence."""

from __future__ import annotations

import re

import pytest
import torch

from condfx.graph_text import graph_text
from condfx.passes import PassError, apply
from condfx.passes.interleave_heads import (
    IHA_TARGET,
    InterleaveHeads,
    InterleaveHeadsConfig,
    interleaved_layers,
)
from tests._helpers import max_abs_diff
from tests._iha import captured

EXACT_START = "causal=token,positions=token,init_noise=0"


def _gm(name: str = "llama-tiny"):
    return captured(name)


def _iha_nodes(gm):
    return [n for n in gm.graph.nodes if n.target is IHA_TARGET]


@pytest.mark.parametrize("name", ["llama-tiny", "gpt2-tiny"])
def test_matches_every_attention_layer(name):
    gm, _ = _gm(name)
    result = InterleaveHeads(InterleaveHeadsConfig(P=2))(gm)
    text = graph_text(result.graph_module)
    assert result.modified and result.report.rewritten == result.report.matched == 2
    assert len(_iha_nodes(result.graph_module)) == 2
    assert "scaled_dot_product_attention" not in text and "aten.cos" not in text
    assert sorted(interleaved_layers(result.graph_module)) == [0, 1]
    # alpha_q (H, H, P), alpha_k and alpha_v (Hkv, Hkv, P), collapse (H, P) per layer
    names = [n for n, _ in result.graph_module.named_parameters() if "iha_" in n]
    assert len(names) == 8


@pytest.mark.parametrize(
    ("name", "spec"),
    [("stories260K", EXACT_START), ("stories260K", EXACT_START + ",collapse=global,P=3"),
     ("stories260K", "P=1,init_noise=0"), ("gpt2-tiny", EXACT_START)],
)
def test_numerics_function_preserving_inits(name, spec):
    gm, ids = _gm(name)
    expected = gm(ids)
    result = apply(gm, f"interleave-heads{{{spec}}}")
    assert max_abs_diff(result.graph_module(ids), expected) < 1e-4


def test_numerics_paper_default_is_not_function_preserving_but_close():
    gm, ids = _gm("stories260K")
    expected = gm(ids).log_softmax(-1)
    got = apply(gm, "interleave-heads{P=2}").graph_module(ids).log_softmax(-1)
    kl = (expected.exp() * (expected - got)).sum(-1).mean().item()
    assert 1e-6 < kl < 1.0  # flat causality and stretched positions change the function


def test_numerics_windowed_layer_selection_and_report():
    gm, ids = _gm()
    result = apply(gm, "interleave-heads{P=2,window=4,layers=[1],collapse=global}")
    nodes = _iha_nodes(result.graph_module)
    assert len(nodes) == 1 and nodes[0].args[5:9] == (2, 4, False, False)
    report = result.reports[-1]
    assert report.rewritten == 1 and report.params_added > 0
    assert report.cost_after.kv_cache_bytes_per_token > report.cost_before.kv_cache_bytes_per_token
    assert torch.isfinite(result.graph_module(ids)).all()


def test_golden_iha_block():
    gm, _ = _gm()
    result = InterleaveHeads(InterleaveHeadsConfig(P=2, layers=(0,)))(gm)
    text = graph_text(result.graph_module)
    block = [
        "%layers.0.attention.iha_alpha_q", "aten.einsum.default('bmtd,mhp->bhtpd'",
        "aten.flatten.using_ints(", "condfx.interleaved_attention.default(",
        "layers.0.attention.iha_inv_freq, 0.25, 2, 0, False, False)",
        "aten.unflatten.int(", "aten.einsum.default('bhtpd,hp->bhtd'",
    ]
    pos = 0
    for line in block:  # CHECK lines, in order
        pos = text.index(line, pos)
        assert pos >= 0


def test_idempotent_second_run_is_a_no_op():
    gm, _ = _gm()
    first = InterleaveHeads()(gm).graph_module
    again = InterleaveHeads()(first)
    assert not again.modified and again.report.skip_counts() == {"already interleaved": 2}


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"P": 0}, "InterleaveHeadsConfig.P must be an int >= 1; got 0."),
        ({"P": 2, "window": 3}, "window must be 0 or a positive multiple of P=2; got 3."),
        ({"causal": "diagonal"}, "causal must be one of {flat, token}; got 'diagonal'."),
        ({"collapse": "sum"}, "collapse must be one of {per-head, global}; got 'sum'."),
    ],
)
def test_rejects_bad_config(kwargs, match):
    with pytest.raises(ValueError, match=re.escape(match)):
        InterleaveHeadsConfig(**kwargs)


def test_rejects_layers_that_do_not_exist():
    gm, _ = _gm()
    before = graph_text(gm)
    with pytest.raises(PassError, match=re.escape("layers [7] do not exist; the graph has attention layers [0, 1]")):
        apply(gm, "interleave-heads{layers=[0,7]}")
    assert graph_text(gm) == before
