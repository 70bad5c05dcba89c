"""Tests of ``route-attention``: matches, rejections, numerics at initialisation, golden, gradients."""

from __future__ import annotations

import copy
import functools
import warnings

import pytest
import torch

import condfx
from condfx.graph_text import graph_text
from condfx.l2a import window_only
from condfx.passes import apply
from condfx.passes.route_attention import ROUTED, RouteAttention, RouteAttentionConfig
from condfx.patterns.routed import find_routed_layers
from tests._helpers import TOLERANCES


@functools.cache
def _captured(name: str, t: int = 12):
    from condfx.models_zoo import build_zoo

    model = build_zoo(name).eval()
    torch.manual_seed(0)
    ids = torch.randint(0, 128, (2, t))
    return model, condfx.capture(model, (ids,)), ids


def _gm(name: str):
    model, gm, ids = _captured(name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return model, copy.deepcopy(gm), ids


def _routed(gm):
    return [n for n in gm.graph.nodes if n.target is ROUTED]


@pytest.mark.parametrize("name", ["llama-tiny", "qwen3-tiny", "gpt2-tiny"])
def test_matches_every_attention_region(name):
    _, gm, ids = _gm(name)
    result = RouteAttention(RouteAttentionConfig(window=4))(gm)
    out = result.graph_module
    assert result.modified and result.report.matched == result.report.rewritten == 2
    assert len(_routed(out)) == 2
    windows = [n.args[4] for n in out.graph.nodes if n.target is torch.ops.condfx.attention.default]
    assert windows == [4, 4]
    layers = find_routed_layers(out)
    assert [r.layer for r in layers] == [0, 1]
    assert all(set(r.nodes) == {"prob", "route", "routed", "out"} for r in layers)
    assert torch.all(layers[0].state.router_weight == 0)
    assert result.report.params_added > 0
    assert torch.isfinite(out(ids)).all()


def test_matches_selected_layers_and_idempotent():
    _, gm, _ = _gm("llama-tiny")
    once = RouteAttention(RouteAttentionConfig(window=4, layers=(1,)))(gm).graph_module
    assert [r.layer for r in find_routed_layers(once)] == [1]
    again = RouteAttention(RouteAttentionConfig(window=4, layers=(1,)))(once)
    assert not again.modified and again.report.skipped == (("already routed", "layer 1"),)


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"window": 0}, "window must be an int >= 1; got 0"),
        ({"temperature": 0.0}, "temperature must be a number > 0"),
        ({"layers": [-1]}, "layers must be a list of non-negative layer indices"),
        ({"window": 64, "context": 32}, "window=64 must be smaller than the context length 32"),
    ],
)
def test_rejects_bad_config(options, match):
    with pytest.raises(ValueError, match=match):
        RouteAttentionConfig(**options)


def test_rejects_missing_layer_and_leaves_input_untouched():
    _, gm, ids = _gm("llama-tiny")
    before = graph_text(gm)
    with pytest.raises(condfx.passes.PassError, match=r"names layer 7, but the model's attention layers are \[0, 1\]"):
        apply(gm, "route-attention{window=4,layers=[7]}")
    assert graph_text(gm) == before


def _attention_twice(model, ids):
    """The initial L2A function by hand: h = x + A(n(x)); h + A(n'(h)) with n' = n, A' = A."""
    blocks = list(model.layers)
    originals = [b.forward for b in blocks]

    def twice(block):
        def forward(x, cos, sin, mask):
            h = x + block.attention(block.attention_norm(x), cos, sin, mask)
            h = h + block.attention(block.attention_norm(h), cos, sin, mask)
            return h + block.feed_forward(block.ffn_norm(h))
        return forward

    try:
        for b in blocks:
            b.forward = twice(b)
        return model(ids)
    finally:
        for b, f in zip(blocks, originals, strict=True):
            b.forward = f


@pytest.mark.parametrize("name", ["llama-tiny", "qwen3-tiny"])
def test_numerics_initial_model_runs_attention_twice(name):
    """Zero-initialised router: every token is routed and the global branch copies the base weights."""
    model, gm, ids = _gm(name)
    out = apply(gm, f"route-attention{{window={ids.shape[1]}}}").graph_module
    atol, rtol = TOLERANCES[torch.float32]
    torch.testing.assert_close(out(ids), _attention_twice(model, ids), atol=atol, rtol=rtol)


def test_numerics_zero_global_output_is_window_attention():
    model, gm, ids = _gm("llama-tiny")
    out = apply(gm, "route-attention{window=3}").graph_module
    for layer in find_routed_layers(out):
        layer.state.global_wo_weight.data.zero_()
    windowed = window_only(gm, 3)
    atol, rtol = TOLERANCES[torch.float32]
    torch.testing.assert_close(out(ids), windowed(ids), atol=atol, rtol=rtol)
    assert (out(ids) - model(ids)).abs().max() > 1e-3  # the window really cuts attention


def test_numerics_router_gets_tempered_sigmoid_gradient_and_hard_forward():
    _, gm, ids = _gm("llama-tiny")
    out = apply(gm, "route-attention{window=4,temperature=0.5}").graph_module
    layer = find_routed_layers(out)[0]
    with torch.no_grad():
        layer.state.router_weight.normal_(0, 1.0)
    out(ids).pow(2).mean().backward()
    assert layer.state.router_weight.grad is not None
    assert layer.state.router_weight.grad.abs().sum() > 0
    # the gate is exactly 0/1 in the forward pass
    gm2 = torch.fx.GraphModule(out, copy.deepcopy(out.graph))
    out_node = next(n for n in gm2.graph.nodes if n.op == "output")
    gate = layer.nodes["out"].args[1].args[1].args[0].args[0]  # unsqueeze(to(gate))
    new_gate = next(n for n in gm2.graph.nodes if n.name == gate.name)
    out_node.args = ((new_gate,),)
    gm2.recompile()
    vals = gm2(ids)[0]
    assert set(vals.unique().tolist()) <= {0.0, 1.0}


def test_golden_layer_structure():
    _, gm, _ = _gm("llama-tiny")
    text = graph_text(RouteAttention(RouteAttentionConfig(window=4, layers=(0,)))(gm).graph_module)
    order = ["condfx.attention", "aten.sigmoid", "aten.ge", "aten.detach", "aten.logical_or",
             "condfx.routed_attention", "aten.mul", "aten.add"]
    pos = 0
    for op in order:
        pos = text.index(op, pos)
        assert pos >= 0
    assert "l2a.router_weight" in text and "l2a.dense" in text
