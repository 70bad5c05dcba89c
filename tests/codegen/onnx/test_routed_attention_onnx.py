"""ONNX lowering of ``condfx::routed_attention``: the function against the op, and an L2A model."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import helper

import condfx
from condfx.codegen.onnx import DOMAIN
from condfx.codegen.onnx.routed_attention import (
    routed_attention_function,
    routed_attention_functions,
)
from condfx.patterns.routed import find_routed_layers


def _single_node_model(scale: float) -> onnx.ModelProto:
    f32, b = onnx.TensorProto.FLOAT, onnx.TensorProto.BOOL
    inputs = [
        helper.make_tensor_value_info("q", f32, ["B", "H", "T", "D"]),
        helper.make_tensor_value_info("k", f32, ["B", "Hkv", "S", "D"]),
        helper.make_tensor_value_info("v", f32, ["B", "Hkv", "S", "D"]),
        helper.make_tensor_value_info("route", b, ["B", "T"]),
    ]
    out = [helper.make_tensor_value_info("out", f32, ["B", "H", "T", "D"])]
    node = helper.make_node("RoutedAttention", ["q", "k", "v", "route"], ["out"], domain=DOMAIN, scale=scale)
    model = helper.make_model(helper.make_graph([node], "g", inputs, out),
                              opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid(DOMAIN, 1)],
                              functions=[routed_attention_function()])
    onnx.checker.check_model(model)
    return model


@pytest.mark.parametrize(("t", "s", "density"), [(7, 7, 0.4), (3, 9, 0.6), (5, 5, 0.0), (1, 6, 1.0)])
def test_function_matches_op(t, s, density):
    g = torch.Generator().manual_seed(t + s)
    q = torch.randn(2, 4, t, 8, generator=g)
    k, v = torch.randn(2, 2, s, 8, generator=g), torch.randn(2, 2, s, 8, generator=g)
    route = torch.rand(2, t, generator=g) < density
    sess = ort.InferenceSession(_single_node_model(0.35).SerializeToString(), providers=["CPUExecutionProvider"])
    (got,) = sess.run(None, {"q": q.numpy(), "k": k.numpy(), "v": v.numpy(), "route": route.numpy()})
    want = torch.ops.condfx.routed_attention(q, k, v, route, 0.35)
    np.testing.assert_allclose(got, want.numpy(), atol=1e-5, rtol=1e-5)


def _scored_model(scale: float, softcap: float) -> onnx.ModelProto:
    f32, b = onnx.TensorProto.FLOAT, onnx.TensorProto.BOOL
    inputs = [
        helper.make_tensor_value_info("q", f32, ["B", "H", "T", "D"]),
        helper.make_tensor_value_info("k", f32, ["B", "Hkv", "S", "D"]),
        helper.make_tensor_value_info("v", f32, ["B", "Hkv", "S", "D"]),
        helper.make_tensor_value_info("route", b, ["B", "T"]),
        helper.make_tensor_value_info("slopes", f32, ["H"]),
        helper.make_tensor_value_info("sinks", f32, ["H"]),
    ]
    out = [helper.make_tensor_value_info("out", f32, ["B", "H", "T", "D"])]
    node = helper.make_node("RoutedAttentionScored", ["q", "k", "v", "route", "slopes", "sinks"], ["out"],
                            domain=DOMAIN, scale=scale, softcap=softcap)
    model = helper.make_model(helper.make_graph([node], "g", inputs, out),
                              opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid(DOMAIN, 1)],
                              functions=routed_attention_functions())
    onnx.checker.check_model(model)
    return model


@pytest.mark.parametrize(
    "options",
    [{"softcap": 2.0}, {"alibi_slopes": [0.5, 0.25, 0.125, 0.0625]}, {"sinks": True},
     {"softcap": 3.0, "alibi_slopes": [0.5, 0.25, 0.125, 0.0625], "sinks": True}],
)
@pytest.mark.parametrize(("t", "s"), [(7, 7), (3, 9)])
def test_scored_function_matches_op(options, t, s):
    g = torch.Generator().manual_seed(t + s)
    q = torch.randn(2, 4, t, 8, generator=g)
    k, v = torch.randn(2, 2, s, 8, generator=g), torch.randn(2, 2, s, 8, generator=g)
    route = torch.rand(2, t, generator=g) < 0.6
    opts = dict(options)
    if opts.get("sinks"):
        opts["sinks"] = torch.randn(4, generator=g)
    slopes = np.array(opts.get("alibi_slopes", [0.0] * 4), dtype=np.float32)
    sinks = opts["sinks"].numpy() if "sinks" in opts else np.full(4, -np.inf, dtype=np.float32)
    model = _scored_model(0.35, float(opts.get("softcap", 0.0)))
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    feeds = {"q": q.numpy(), "k": k.numpy(), "v": v.numpy(), "route": route.numpy(), "slopes": slopes, "sinks": sinks}
    (got,) = sess.run(None, feeds)
    want = torch.ops.condfx.routed_attention(q, k, v, route, 0.35, **opts)
    np.testing.assert_allclose(got, want.numpy(), atol=1e-5, rtol=1e-5)


def test_export_l2a_model_matches_pytorch(tmp_path):
    from condfx.models_zoo import build_zoo

    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    gm = condfx.capture(build_zoo("llama-tiny"), (ids,))
    routed = condfx.apply(gm, "route-attention{window=3}").graph_module

    with torch.no_grad():  # a router that routes some tokens and not others
        for layer in find_routed_layers(routed):
            layer.state.router_weight.normal_(0, 0.5, generator=torch.Generator().manual_seed(layer.layer))
    result = condfx.export_onnx(routed, (ids,), tmp_path / "l2a.onnx")
    assert result.custom_ops.get("condfx::RoutedAttention") == 2
    assert result.custom_ops.get("condfx::Attention") == 2
    assert result.max_abs_diff <= 1e-4


@pytest.mark.slow
def test_export_l2a_gemma2_softcap_post_norm_matches_pytorch(tmp_path):
    """A routed Gemma-2 (softcapped scores, sandwich norms) exports with ``RoutedAttentionScored`` (~2 min)."""
    from tests.passes.test_route_attention_forms import _ids, _route

    _, _, routed = _route("gemma2")
    with torch.no_grad():
        for layer in find_routed_layers(routed):
            layer.state.router_weight.normal_(0, 0.5, generator=torch.Generator().manual_seed(layer.layer))
    result = condfx.export_onnx(routed, (_ids(),), tmp_path / "l2a.onnx")
    assert result.custom_ops.get("condfx::RoutedAttentionScored") == 2
    assert result.max_abs_diff <= 1e-4
