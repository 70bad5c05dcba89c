"""ONNX lowering of ``condfx::sink_window_attention``: the function against the op, and a rewritten model."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import helper

import condfx
from condfx.codegen.onnx import DOMAIN
from condfx.codegen.onnx.sink_window import sink_window_function


def _single_node_model(scale: float, sink: int, window: int) -> onnx.ModelProto:
    f32, i64 = onnx.TensorProto.FLOAT, onnx.TensorProto.INT64
    inputs = [
        helper.make_tensor_value_info("q", f32, ["B", "H", "T", "D"]),
        helper.make_tensor_value_info("k", f32, ["B", "Hkv", "S", "D"]),
        helper.make_tensor_value_info("v", f32, ["B", "Hkv", "S", "D"]),
        helper.make_tensor_value_info("positions", i64, ["T"]),
        helper.make_tensor_value_info("inv_freq", f32, ["F"]),
    ]
    out = [helper.make_tensor_value_info("out", f32, ["B", "H", "T", "D"])]
    node = helper.make_node("SinkWindowAttention", [i.name for i in inputs], ["out"], domain=DOMAIN,
                            scale=scale, sink=sink, window=window)
    model = helper.make_model(helper.make_graph([node], "g", inputs, out),
                              opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid(DOMAIN, 1)],
                              functions=[sink_window_function()])
    onnx.checker.check_model(model)
    return model


@pytest.mark.parametrize(("t", "s", "start", "sink", "window"),
                         [(20, 20, 0, 3, 5), (1, 9, 30, 3, 6), (4, 12, 40, 2, 7), (6, 6, 0, 0, 4)])
def test_function_matches_op(t, s, start, sink, window):
    g = torch.Generator().manual_seed(t + s)
    q = torch.randn(2, 4, t, 8, generator=g)
    k, v = torch.randn(2, 2, s, 8, generator=g), torch.randn(2, 2, s, 8, generator=g)
    pos = torch.arange(start, start + t) if start else torch.arange(t)
    inv = 1.0 / (1e4 ** (torch.arange(0, 8, 2).float() / 8))
    model = _single_node_model(0.35, sink, window)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    feeds = {"q": q.numpy(), "k": k.numpy(), "v": v.numpy(), "positions": pos.numpy(), "inv_freq": inv.numpy()}
    (got,) = sess.run(None, feeds)
    want = torch.ops.condfx.sink_window_attention(q, k, v, pos, inv, 0.35, sink, window)
    np.testing.assert_allclose(got, want.numpy(), atol=1e-5, rtol=1e-5)


def test_export_rewritten_model_matches_pytorch(tmp_path):
    from condfx.models_zoo import build_zoo

    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    gm = condfx.capture(build_zoo("llama-tiny"), (ids,))
    rewritten = condfx.apply(gm, "sink-window{sink=2,window=3}").graph_module
    result = condfx.export_onnx(rewritten, (ids,), tmp_path / "sink.onnx")
    assert result.custom_ops.get("condfx::SinkWindowAttention") == 2
    assert result.max_abs_diff <= 1e-4
