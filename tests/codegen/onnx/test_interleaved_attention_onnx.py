"""The ``condfx::InterleavedAttention`` ONNX lowering: the function alone, and an IHA model end to end."""

from __future__ import annotations

import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper

import condfx
from condfx.codegen.onnx import DOMAIN, LOWERINGS, attach_functions
from condfx.export_bundle import export_onnx
from condfx.ops import interleaved_attention_reference
from tests._iha import captured


def _model(scale, pseudo, window, token_causal, token_positions) -> onnx.ModelProto:
    node = helper.make_node(
        "InterleavedAttention", ["q", "k", "v", "f"], ["out"], domain=DOMAIN, scale=scale,
        pseudo=pseudo, window=window, token_causal=int(token_causal), token_positions=int(token_positions),
    )
    f32 = TensorProto.FLOAT
    graph = helper.make_graph(
        [node], "one_iha",
        [helper.make_tensor_value_info("q", f32, ["B", "H", "T", "D"]),
         helper.make_tensor_value_info("k", f32, ["B", "Hkv", "S", "D"]),
         helper.make_tensor_value_info("v", f32, ["B", "Hkv", "S", "D"]),
         helper.make_tensor_value_info("f", f32, ["F"])],
        [helper.make_tensor_value_info("out", f32, ["B", "H", "T", "D"])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    assert attach_functions(model, LOWERINGS.values()) == ["condfx::InterleavedAttention"]
    onnx.checker.check_model(model)
    return model


@pytest.mark.parametrize(
    ("pseudo", "window", "token_causal", "token_positions", "t", "s"),
    [(2, 0, False, False, 5, 5), (3, 6, True, True, 4, 4), (2, 4, False, True, 1, 6), (2, 2, True, False, 2, 7)],
)
def test_numerics_function_matches_reference(pseudo, window, token_causal, token_positions, t, s):
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, t * pseudo, 8, generator=gen)
    k, v = (torch.randn(2, 2, s * pseudo, 8, generator=gen) for _ in range(2))
    f = 1.0 / (100.0 ** (torch.arange(0, 8, 2, dtype=torch.float32) / 8))
    args = (0.35, pseudo, window, token_causal, token_positions)
    sess = ort.InferenceSession(_model(*args).SerializeToString(), providers=["CPUExecutionProvider"])
    (got,) = sess.run(None, {"q": q.numpy(), "k": k.numpy(), "v": v.numpy(), "f": f.numpy()})
    expected = interleaved_attention_reference(q, k, v, f, *args)
    torch.testing.assert_close(torch.from_numpy(got), expected, atol=1e-5, rtol=1e-5)


def test_numerics_exported_iha_model_matches_pytorch(tmp_path):
    gm, ids = captured("llama-tiny")
    gm = condfx.apply(gm, "interleave-heads{P=2,window=4,init_noise=0.1}")
    result = export_onnx(gm.graph_module, (ids,), tmp_path / "iha.onnx")
    assert result.custom_ops == {"condfx::InterleavedAttention": 2}
    assert result.max_abs_diff < 1e-4
