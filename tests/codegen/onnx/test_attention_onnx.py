"""The ``condfx::Attention`` ONNX lowering: the local function alone and a toy module end to end."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper
from torch import nn

from condfx.codegen.onnx import DOMAIN, LOWERINGS, attach_functions, lower_custom_ops
from condfx.codegen.onnx._functions import retarget_function
from condfx.codegen.onnx.attention import attention_function
from condfx.export_bundle import export_onnx
from condfx.ops import attention_reference

_DTYPES = {torch.float32: TensorProto.FLOAT, torch.float16: TensorProto.FLOAT16}


def _attention_model(
    scale: float, window: int, *, dtype=torch.float32, opset=18
) -> onnx.ModelProto:
    """One condfx::Attention node (output through Identity so its inferred type is visible)."""
    elem = _DTYPES[dtype]
    node = helper.make_node(
        "Attention", ["q", "k", "v"], ["attn"], domain=DOMAIN, scale=scale, window=window
    )
    graph = helper.make_graph(
        [node, helper.make_node("Identity", ["attn"], ["out"])],
        "one_attention",
        [
            helper.make_tensor_value_info("q", elem, ["B", "H", "T", "D"]),
            helper.make_tensor_value_info("k", elem, ["B", "Hkv", "S", "D"]),
            helper.make_tensor_value_info("v", elem, ["B", "Hkv", "S", "D"]),
        ],
        [helper.make_tensor_value_info("out", elem, ["B", "H", "T", "D"])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    assert attach_functions(model, LOWERINGS.values()) == ["condfx::Attention"]
    return model


def _session(model: onnx.ModelProto) -> ort.InferenceSession:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def _qkv(b, h, hkv, t, s, d, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, t, d, generator=gen).to(dtype)
    k = torch.randn(b, hkv, s, d, generator=gen).to(dtype)
    v = torch.randn(b, hkv, s, d, generator=gen).to(dtype)
    return q, k, v


def _run(session, q, k, v) -> torch.Tensor:
    out = session.run(None, {"q": q.numpy(), "k": k.numpy(), "v": v.numpy()})[0]
    return torch.from_numpy(out)


# (B, H, Hkv, T, S, D): MHA, GQA, MQA; T == S prefill, T < S chunk, T == 1 decode.
_SHAPES = [
    (2, 4, 4, 6, 6, 8),
    (2, 4, 2, 6, 6, 8),
    (1, 6, 2, 3, 9, 4),
    (3, 4, 1, 1, 7, 8),
    (2, 8, 2, 5, 12, 16),
]


@pytest.mark.parametrize("window", [0, 3])
def test_numerics_function_matches_reference_dynamic_shapes(window):
    # One session serves every shape: B, H, Hkv, T, S and D are all dynamic in the function body.
    session = _session(_attention_model(0.3, window))
    for b, h, hkv, t, s, d in _SHAPES:
        q, k, v = _qkv(b, h, hkv, t, s, d)
        got = _run(session, q, k, v)
        want = attention_reference(q, k, v, 0.3, window)
        assert got.shape == (b, h, t, d)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_numerics_function_window_larger_than_keys_is_causal():
    q, k, v = _qkv(2, 4, 2, 4, 6, 8)
    got = _run(_session(_attention_model(0.5, 100)), q, k, v)
    torch.testing.assert_close(got, attention_reference(q, k, v, 0.5, 0), atol=1e-5, rtol=1e-5)


def test_numerics_function_float16():
    q, k, v = _qkv(2, 4, 2, 5, 7, 8, dtype=torch.float16)
    got = _run(_session(_attention_model(0.35, 3, dtype=torch.float16)), q, k, v)
    assert got.dtype == torch.float16
    torch.testing.assert_close(got, attention_reference(q, k, v, 0.35, 3), atol=2e-3, rtol=2e-3)


@pytest.mark.parametrize("opset", [18, 21])
def test_matches_checker_and_shape_inference(opset):
    model = _attention_model(0.25, 3, opset=opset)
    onnx.checker.check_model(model, full_check=True)
    inferred = onnx.shape_inference.infer_shapes(
        model, check_type=True, strict_mode=True, data_prop=True
    )
    attn = {vi.name: vi for vi in inferred.graph.value_info}["attn"].type.tensor_type
    assert attn.elem_type == TensorProto.FLOAT
    assert [dim.dim_param for dim in attn.shape.dim] == ["B", "H", "T", "D"]
    fn = {(f.domain, f.name): f for f in model.functions}[(DOMAIN, "Attention")]
    assert {i.domain: i.version for i in fn.opset_import}[""] == opset
    assert {i.domain: i.version for i in model.opset_import}[DOMAIN] == 1


def test_matches_function_signature():
    fn = attention_function()
    assert (fn.domain, fn.name) == (DOMAIN, "Attention")
    assert list(fn.input) == ["q", "k", "v"] and len(fn.output) == 1
    assert set(fn.attribute) | {a.name for a in fn.attribute_proto} == {"scale", "window"}
    ops = {n.op_type for n in fn.node}
    assert {"Range", "Where", "Softmax", "MatMul", "Reshape"} <= ops
    assert all(n.domain in ("", "ai.onnx") for n in fn.node)  # standard ops only


def test_rejects_opset_below_18():
    with pytest.raises(ValueError, match="opset must be >= 18"):
        retarget_function(attention_function(), 17)


class _CrossAttention(nn.Module):
    """Queries from ``x`` (B, T, 16), GQA keys/values from ``mem`` (B, S, 16), S >= T."""

    def __init__(self, window: int):
        super().__init__()
        torch.manual_seed(0)
        self.q = nn.Linear(16, 16)
        self.kv = nn.Linear(16, 16)
        self.window = window

    def forward(self, x, mem):
        b, t, _ = x.shape
        s = mem.shape[1]
        q = self.q(x).view(b, t, 4, 4).transpose(1, 2)  # (B, 4, T, 4)
        k, v = self.kv(mem).view(b, s, 2, 8).transpose(1, 2).split(4, dim=-1)  # (B, 2, S, 4)
        o = torch.ops.condfx.attention(q, k.contiguous(), v.contiguous(), 0.5, self.window)
        return o.transpose(1, 2).reshape(b, t, 16)  # (B, T, 16)


def test_numerics_toy_module_end_to_end(tmp_path):
    model = _CrossAttention(window=3).eval()
    x, mem = torch.randn(2, 5, 16), torch.randn(2, 8, 16)
    result = export_onnx(
        model, (x, mem), tmp_path / "toy.onnx", input_names=("x", "mem"), output_names=("y",)
    )
    assert result.custom_ops == {"condfx::Attention": 1}
    assert result.max_abs_diff <= 1e-5
    assert result.verified_shapes == (((2, 5, 16), (2, 8, 16)), ((3, 7, 16), (3, 10, 16)))
    saved = onnx.load(result.path)
    assert [(f.domain, f.name) for f in saved.functions] == [(DOMAIN, "Attention")]
    node = next(n for n in saved.graph.node if n.domain == DOMAIN)
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    assert attrs == {"scale": 0.5, "window": 3}
    y = _session(saved).run(
        None, {"x": np.ones((1, 3, 16), np.float32), "mem": np.ones((1, 4, 16), np.float32)}
    )
    assert y[0].shape == (1, 3, 16)


def test_matches_lowering_leaves_the_input_graph_alone():
    import condfx

    gm = condfx.capture(
        _CrossAttention(window=0).eval(), (torch.randn(2, 5, 16), torch.randn(2, 8, 16))
    )
    before = gm.code
    lowered, counts = lower_custom_ops(gm, LOWERINGS)
    assert counts == {"condfx::Attention": 1}
    assert gm.code == before
    assert "emit_attention" in lowered.code and "condfx.attention" not in lowered.code
    x, mem = torch.randn(3, 4, 16), torch.randn(3, 6, 16)
    torch.testing.assert_close(lowered(x, mem), gm(x, mem))  # outside export: runs the op
