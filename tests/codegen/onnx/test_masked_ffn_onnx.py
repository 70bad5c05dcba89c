"""ONNX lowering of ``condfx::masked_ffn``: the function against the reference, and a skip-ffn'd model."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import helper

import condfx
from condfx.codegen.onnx import DOMAIN
from condfx.codegen.onnx.masked_ffn import masked_ffn_function
from condfx.ops.masked_ffn import masked_ffn_reference

D, HID = 8, 12
_SHAPES = {"x": ["B", "T", D], "h_in": ["B", "T", D], "execute": ["B", "T"], "w_up": [HID, D], "b_up": [HID],
           "w_gate": [HID, D], "b_gate": [HID], "w_down": [D, HID], "b_down": [D]}


def _single_node_model(gated: int, act: int) -> onnx.ModelProto:
    names = ["x", "h_in", "execute", "w_up", "b_up", "w_gate", "b_gate", "w_down", "b_down"]
    f32, b = onnx.TensorProto.FLOAT, onnx.TensorProto.BOOL
    inputs = [helper.make_tensor_value_info(n, b if n == "execute" else f32, _SHAPES[n]) for n in names]
    outputs = [helper.make_tensor_value_info(n, f32, s) for n, s in (("update", ["B", "T", D]), ("cos", ["B", "T"]))]
    node = helper.make_node("MaskedFFN", names, ["update", "cos"], domain=DOMAIN, gated=gated, act=act)
    graph = helper.make_graph([node], "g", inputs, outputs)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid(DOMAIN, 1)],
                              functions=[masked_ffn_function()])
    onnx.checker.check_model(model)
    return model


@pytest.mark.parametrize(("kind", "act", "gated", "code"),
                         [("swiglu", "silu", 1, 0), ("gelu-mlp", "gelu_tanh", 0, 2), ("gelu-mlp", "gelu", 0, 1)])
def test_function_matches_reference(kind, act, gated, code):
    g = torch.Generator().manual_seed(0)
    x, h_in = torch.randn(2, 5, D, generator=g), torch.randn(2, 5, D, generator=g)
    execute = torch.rand(2, 5, generator=g) < 0.5
    w_up, b_up = torch.randn(HID, D, generator=g), torch.randn(HID, generator=g)
    w_gate, b_gate = (torch.randn(HID, D, generator=g), torch.randn(HID, generator=g)) if gated else (w_up, b_up)
    w_down, b_down = torch.randn(D, HID, generator=g), torch.randn(D, generator=g)
    args = [x, h_in, execute, w_up, b_up, w_gate, b_gate, w_down, b_down]
    sess = ort.InferenceSession(_single_node_model(gated, code).SerializeToString(), providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    update, cos = sess.run(None, {n: a.numpy() for n, a in zip(names, args, strict=True)})
    ref_args = args if gated else [*args[:5], None, None, *args[7:]]
    want_u, want_c = masked_ffn_reference(*ref_args, kind, act, "out_in")
    np.testing.assert_allclose(update, want_u.numpy(), atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(cos, want_c.numpy(), atol=1e-5)


def test_export_skip_ffn_llama_tiny(tmp_path):
    from condfx.models_zoo import build_zoo

    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    gm = condfx.capture(build_zoo("llama-tiny"), (ids,))
    spec = "fuse-attention, skip-ffn{threshold=0.3,span=1,cold_start=0,cold_end=1,warmup=2}"
    rewritten = condfx.apply(gm, spec).graph_module
    result = condfx.export_onnx(rewritten, (ids,), tmp_path / "skip.onnx")
    assert result.custom_ops.get("condfx::MaskedFFN") == 1
    assert result.max_abs_diff <= 1e-4


def test_export_forecast_policy_llama_tiny(tmp_path):
    """The forecast policy (routers + low-rank forecasters) exports with rows really routed out; the
    stories260K Session round trip of a trained state runs under -m slow (test_skip_ffn_forecast)."""
    from condfx import forecast
    from condfx.models_zoo import build_zoo
    from condfx.passes.skip_ffn import measure_skip_fraction

    ids = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(0))
    gm = condfx.capture(build_zoo("llama-tiny"), (ids,))
    spec = "fuse-attention, skip-ffn{policy=forecast,cold_start=0,cold_end=1,rank=4,router_hidden=8,warmup=2}"
    rewritten = condfx.apply(gm, spec).graph_module
    forecast.fit_forecasters(rewritten, ids)
    forecast.set_skip_fraction(rewritten, ids, 0.4)
    assert measure_skip_fraction(rewritten, ids)["skipped_rows"] > 0
    result = condfx.export_onnx(rewritten, (ids,), tmp_path / "forecast.onnx")
    assert result.max_abs_diff <= 1e-4
