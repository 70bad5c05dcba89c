"""``condfx::AttentionScored``: the ONNX lowering of ``condfx::attention`` with softcap / ALiBi / sinks."""

from __future__ import annotations

import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper
from torch import nn

from condfx.codegen.onnx import DOMAIN, LOWERINGS, attach_functions
from condfx.export_bundle import export_onnx
from condfx.ops import attention_reference

_SLOPES = [0.5, 0.25, 0.125, 0.0625]


def _scored_model(scale: float, window: int, softcap: float) -> onnx.ModelProto:
    node = helper.make_node("AttentionScored", ["q", "k", "v", "slopes", "sinks"], ["out"], domain=DOMAIN,
                            scale=scale, window=window, softcap=softcap)
    inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, dims) for n, dims in (
        ("q", ["B", "H", "T", "D"]), ("k", ["B", "Hkv", "S", "D"]), ("v", ["B", "Hkv", "S", "D"]),
        ("slopes", ["H"]), ("sinks", ["H"]))]
    graph = helper.make_graph([node], "scored", inputs,
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["B", "H", "T", "D"])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    assert attach_functions(model, LOWERINGS.values()) == ["condfx::AttentionScored"]
    onnx.checker.check_model(model, full_check=True)
    return model


@pytest.mark.parametrize(("softcap", "alibi", "sinks", "window"), [
    (2.0, False, False, 0), (0.0, True, False, 0), (0.0, False, True, 3), (1.5, True, True, 0),
])
def test_numerics_function_matches_reference(softcap, alibi, sinks, window):
    session = ort.InferenceSession(_scored_model(0.4, window, softcap).SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    gen = torch.Generator().manual_seed(0)
    z = torch.tensor([0.5, -1.0, 2.0, 0.0])
    for t, s in ((6, 6), (2, 7)):  # prefill, and queries aligned to the end of a longer key block
        q, k, v = torch.randn(2, 4, t, 8, generator=gen), *torch.randn(2, 2, 2, s, 8, generator=gen)
        slopes = torch.tensor(_SLOPES) if alibi else torch.zeros(4)
        feed = dict(q=q, k=k, v=v, slopes=slopes, sinks=z if sinks else torch.full((4,), float("-inf")))
        got = torch.from_numpy(session.run(None, {n: x.numpy() for n, x in feed.items()})[0])
        want = attention_reference(q, k, v, 0.4, window, softcap, _SLOPES if alibi else None, z if sinks else None)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


class _Sinky(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.qkv = nn.Linear(16, 32)
        self.sinks = nn.Parameter(torch.randn(4))

    def forward(self, x):
        b, t, _ = x.shape
        q, k, v = self.qkv(x).split([16, 8, 8], dim=-1)
        q = q.view(b, t, 4, 4).transpose(1, 2)
        k, v = (y.reshape(b, t, 2, 4).transpose(1, 2) for y in (k, v))
        o = torch.ops.condfx.attention(q, k, v, 0.5, 0, 2.0, _SLOPES, self.sinks)
        return o.transpose(1, 2).reshape(b, t, 16)


def test_numerics_toy_module_end_to_end(tmp_path):
    result = export_onnx(_Sinky().eval(), (torch.randn(2, 5, 16),), tmp_path / "scored.onnx",
                         input_names=("x",), output_names=("y",))
    assert result.custom_ops == {"condfx::AttentionScored": 1}
    assert result.max_abs_diff <= 1e-5
    saved = onnx.load(result.path)
    assert [(f.domain, f.name) for f in saved.functions] == [(DOMAIN, "AttentionScored")]
