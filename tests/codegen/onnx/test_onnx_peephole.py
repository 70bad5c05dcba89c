"""``condfx.codegen.onnx_peephole``: the rewrites match what they should, keep the rest, and keep the numbers."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from condfx.codegen.onnx import DOMAIN, LOWERINGS, attach_functions
from condfx.codegen.onnx_peephole import (
    attention_with_past,
    rotary_tables_to_batch,
    rsqrt_to_div,
    simplify,
)

_F32 = TensorProto.FLOAT


def _run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def _rmsnorm_model(extra_reader: bool = False) -> onnx.ModelProto:
    """x * rsqrt(mean(x^2) + eps) * w, rsqrt written as the exporter writes it (Sqrt + Reciprocal)."""
    inits = [numpy_helper.from_array(np.array(2.0, np.float32), "two"),
             numpy_helper.from_array(np.array([-1], np.int64), "axes"),
             numpy_helper.from_array(np.array(1e-6, np.float32), "eps"),
             numpy_helper.from_array(np.linspace(0.5, 1.5, 8).astype(np.float32), "w")]
    nodes = [helper.make_node("Pow", ["x", "two"], ["sq"]),
             helper.make_node("ReduceMean", ["sq", "axes"], ["mean"]),
             helper.make_node("Add", ["mean", "eps"], ["var"]),
             helper.make_node("Sqrt", ["var"], ["rms"]),
             helper.make_node("Reciprocal", ["rms"], ["inv"]),
             helper.make_node("Mul", ["x", "inv"], ["normed"]),
             helper.make_node("Mul", ["w", "normed"], ["y"])]
    outputs = [helper.make_tensor_value_info("y", _F32, [2, 3, 8])]
    if extra_reader:  # the reciprocal is read elsewhere too: it must stay
        nodes.append(helper.make_node("Identity", ["inv"], ["inv_out"]))
        outputs.append(helper.make_tensor_value_info("inv_out", _F32, [2, 3, 1]))
    graph = helper.make_graph(nodes, "rmsnorm", [helper.make_tensor_value_info("x", _F32, [2, 3, 8])], outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def test_matches_rsqrt_product_and_keeps_numerics():
    model = _rmsnorm_model()
    x = np.random.default_rng(0).standard_normal((2, 3, 8)).astype(np.float32)
    (want,) = _run(model, {"x": x})
    assert rsqrt_to_div(model.graph) == 1
    ops = [n.op_type for n in model.graph.node]
    assert "Reciprocal" not in ops and ops.count("Div") == 1
    onnx.checker.check_model(model, full_check=True)
    (got,) = _run(model, {"x": x})
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_rejects_rsqrt_with_another_reader():
    model = _rmsnorm_model(extra_reader=True)
    assert rsqrt_to_div(model.graph) == 0
    assert "Reciprocal" in [n.op_type for n in model.graph.node]


def _cached_attention_model(opset: int, window: int = 0, h: int = 4, hkv: int = 2, d: int = 8) -> onnx.ModelProto:
    """Concat(past, new) for k and v, then condfx::Attention over the presents, as a decode graph has it."""
    nodes = [helper.make_node("Concat", ["past_k", "k"], ["present_k"], axis=2),
             helper.make_node("Concat", ["past_v", "v"], ["present_v"], axis=2),
             helper.make_node("Attention", ["q", "present_k", "present_v"], ["attn"], domain=DOMAIN,
                              scale=0.3, window=window),
             helper.make_node("Identity", ["attn"], ["out"])]
    ins = [helper.make_tensor_value_info("q", _F32, ["B", h, "T", d]),
           helper.make_tensor_value_info("k", _F32, ["B", hkv, "T", d]),
           helper.make_tensor_value_info("v", _F32, ["B", hkv, "T", d]),
           helper.make_tensor_value_info("past_k", _F32, ["B", hkv, "P", d]),
           helper.make_tensor_value_info("past_v", _F32, ["B", hkv, "P", d])]
    outs = [helper.make_tensor_value_info(n, _F32, None) for n in ("out", "present_k", "present_v")]
    graph = helper.make_graph(nodes, "cached_attention", ins, outs)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])  # q's dtype: a graph input


def _feeds(b=2, h=4, hkv=2, t=3, p=5, d=8) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    shapes = {"q": (b, h, t, d), "k": (b, hkv, t, d), "v": (b, hkv, t, d), "past_k": (b, hkv, p, d),
              "past_v": (b, hkv, p, d)}
    return {name: rng.standard_normal(shape).astype(np.float32) for name, shape in shapes.items()}


@pytest.mark.parametrize("t", [1, 3])
def test_numerics_attention_with_past_equals_local_function(t):
    """Several new tokens after a past: the standard op's causal mask must be end-aligned like condfx's."""
    reference = _cached_attention_model(23)
    attach_functions(reference, LOWERINGS.values())
    feeds = _feeds(t=t)
    want = _run(reference, feeds)
    model = _cached_attention_model(23)
    assert simplify(model).attention == 1
    assert [n.op_type for n in model.graph.node] == ["Attention", "Identity"]
    assert model.graph.node[0].domain == ""
    got = _run(model, feeds)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("opset", "window"), [(18, 0), (23, 4)])
def test_rejects_attention_below_opset_23_or_with_window(opset, window):
    model = _cached_attention_model(opset, window=window)
    assert attention_with_past(model) == 0
    assert [n.op_type for n in model.graph.node] == ["Concat", "Concat", "Attention", "Identity"]
    assert model.graph.node[2].domain == DOMAIN


def _rotary_model(table_batch: int | str = 1) -> onnx.ModelProto:
    """RotaryEmbedding as torch.onnx.export writes it at opset 23: cos / sin from one (1, T, R) angle table."""
    nodes = [helper.make_node("Cos", ["angles"], ["cos"]), helper.make_node("Sin", ["angles"], ["sin"]),
             helper.make_node("RotaryEmbedding", ["x", "cos", "sin"], ["y"], interleaved=0, num_heads=2)]
    ins = [helper.make_tensor_value_info("x", _F32, ["batch", 2, "T", 8]),
           helper.make_tensor_value_info("angles", _F32, [table_batch, "T", 4])]
    graph = helper.make_graph(nodes, "rope", ins, [helper.make_tensor_value_info("y", _F32, ["batch", 2, "T", 8])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)])


def _rotate_half_reference(x: np.ndarray, angles: np.ndarray) -> np.ndarray:
    cos, sin = np.cos(angles)[:, None], np.sin(angles)[:, None]  # (1, 1, T, R)
    x1, x2 = x[..., :4], x[..., 4:]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def test_matches_batch_one_rotary_tables_and_keeps_numerics():
    """ORT refuses batch-1 tables for a batch-2 x; expanded, the op gives rotate-half RoPE."""
    rng = np.random.default_rng(2)
    feeds = {"x": rng.standard_normal((2, 2, 5, 8)).astype(np.float32),
             "angles": rng.standard_normal((1, 5, 4)).astype(np.float32)}
    model = _rotary_model()
    with pytest.raises(Exception, match="same shape"):
        _run(model, feeds)
    assert rotary_tables_to_batch(model) == 1
    onnx.checker.check_model(model, full_check=True)
    (got,) = _run(model, feeds)
    np.testing.assert_allclose(got, _rotate_half_reference(feeds["x"], feeds["angles"]), rtol=1e-5, atol=1e-5)


def test_rejects_rotary_tables_that_have_a_batch():
    model = _rotary_model(table_batch="batch")
    assert rotary_tables_to_batch(model) == 0
    assert [n.op_type for n in model.graph.node] == ["Cos", "Sin", "RotaryEmbedding"]
