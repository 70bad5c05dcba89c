"""``condfx.export_onnx``: a real Hugging Face Llama, rewritten and not, and error paths."""

from __future__ import annotations

import onnx
import pytest
import torch
from torch import nn

import condfx
from condfx.export_bundle import ExportResult, export_onnx
from condfx.passes.pipeline import apply

_LAYERS = 2


@pytest.fixture(scope="module")
def llama():
    """A seeded 2-layer LlamaForCausalLM (hidden 64, 4 heads, 2 KV heads, vocab 256), captured."""
    import transformers as tf

    torch.manual_seed(0)
    config = tf.LlamaConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=_LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    config._attn_implementation = "sdpa"
    model = tf.LlamaForCausalLM(config).eval()
    ids = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(0))
    return model, ids, condfx.capture(model, ids)


def _dim_params(value_info) -> list[str]:
    return [d.dim_param for d in value_info.type.tensor_type.shape.dim]


def test_numerics_llama_fused_attention_exports_condfx_nodes(llama, tmp_path):
    model, ids, gm = llama
    fused = apply(gm, "fuse-attention").graph_module
    before = fused.code
    result = export_onnx(fused, ids, tmp_path / "llama_fused.onnx")
    assert isinstance(result, ExportResult)
    assert result.custom_ops == {"condfx::Attention": _LAYERS}
    assert result.max_abs_diff <= 1e-4
    assert len(result.diffs) == 2 and result.verified_shapes == (((2, 9),), ((3, 11),))
    assert fused.code == before  # the caller's module is untouched
    saved = onnx.load(result.path)
    assert [(f.domain, f.name) for f in saved.functions] == [("condfx", "Attention")]
    assert _dim_params(saved.graph.input[0]) == ["batch", "seq"]
    assert saved.graph.input[0].name == "input_ids" and saved.graph.output[0].name == "logits"
    with torch.no_grad():  # ORT on the fused graph also matches the original HF model
        ref = model(input_ids=ids).logits
    import onnxruntime as ort

    session = ort.InferenceSession(str(result.path), providers=["CPUExecutionProvider"])
    got = torch.from_numpy(session.run(None, {"input_ids": ids.numpy()})[0])
    assert (got - ref).abs().max().item() <= 1e-4


def test_numerics_llama_baseline_sdpa_graph(llama, tmp_path):
    _, ids, gm = llama
    result = export_onnx(gm, ids, tmp_path / "llama.onnx")
    assert result.custom_ops == {}
    assert result.max_abs_diff <= 1e-4
    assert onnx.load(result.path).functions == []


class _ToyAttention(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.qkv = nn.Linear(16, 32)

    def forward(self, x):
        b, t, _ = x.shape
        q, kv = self.qkv(x).split(16, dim=-1)
        q = q.reshape(b, t, 4, 4).transpose(1, 2)  # (B, 4, T, 4)
        k, v = kv.reshape(b, t, 2, 8).transpose(1, 2).split(4, dim=-1)  # (B, 2, T, 4)
        return torch.ops.condfx.attention(q, k.contiguous(), v.contiguous(), 0.5, 0)


def test_numerics_external_data_and_static_shapes(tmp_path):
    x = torch.randn(2, 5, 16)
    result = export_onnx(
        _ToyAttention().eval(),
        x,
        tmp_path / "out" / "toy.onnx",
        dynamic=False,
        input_names=("x",),
        output_names=("y",),
        external_data=True,
        opset=20,
    )
    assert result.external_data and (tmp_path / "out" / "toy.onnx.data").is_file()
    assert result.verified_shapes == (((2, 5, 16),),) and result.max_abs_diff <= 1e-5
    saved = onnx.load(result.path, load_external_data=False)
    assert {i.domain: i.version for i in saved.opset_import} == {"": 20, "condfx": 1}
    assert [d.dim_value for d in saved.graph.input[0].type.tensor_type.shape.dim] == [2, 5, 16]


class _NeedsBackward(nn.Module):
    def forward(self, g):
        q = g.reshape(g.shape[0], 2, g.shape[1], 4)  # (B, 2, T, 4)
        return torch.ops.condfx.attention_backward(q, q, q, q, 0.5, 0)[0]


def test_rejects_op_without_lowering(tmp_path):
    with pytest.raises(
        ValueError,
        match=r"No ONNX lowering for condfx\.attention_backward\.default; "
        r"ops with lowerings: condfx\.attention\.default",
    ):
        export_onnx(_NeedsBackward(), torch.randn(2, 3, 8), tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()


def test_rejects_unwritable_output_folder(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    with pytest.raises(ValueError, match="output folder .*a_file.* is not writable"):
        export_onnx(_ToyAttention(), torch.randn(2, 5, 16), blocker / "m.onnx")


@pytest.mark.parametrize("opset", [17, 99, "18"])
def test_rejects_bad_opset(opset, tmp_path):
    with pytest.raises(ValueError, match="opset must be an int in"):
        export_onnx(_ToyAttention(), torch.randn(2, 5, 16), tmp_path / "m.onnx", opset=opset)


def test_rejects_bad_inputs(tmp_path):
    with pytest.raises(TypeError, match="example_inputs must be a tensor or a tuple of tensors"):
        export_onnx(_ToyAttention(), [[1, 2]], tmp_path / "m.onnx")
    with pytest.raises(TypeError, match="needs a torch.nn.Module"):
        export_onnx(lambda x: x, torch.randn(2, 5, 16), tmp_path / "m.onnx")
