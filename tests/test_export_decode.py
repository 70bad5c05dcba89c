"""``condfx.export`` (``export_model``): prefill + decode ONNX graphs of a Hugging Face Llama, and errors."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

import condfx
import condfx.export_bundle as ex
from condfx import models_zoo
from condfx.export_bundle import (
    DECODE_FILE,
    MANIFEST_NAME,
    PREFILL_FILE,
    ExportBundle,
    export_decode_graph,
    export_model,
    export_onnx,
    file_sha256,
)
from condfx.passes import PassError
from tests.runtime import decode_graph

_CPU = ["CPUExecutionProvider"]


@pytest.fixture(scope="module")
def hf_llama(tmp_path_factory):
    """(model, bundle) of the zoo's tiny LlamaForCausalLM (2 layers, 4 heads, 2 KV heads)."""
    model, _ = models_zoo.load("hf-llama")
    bundle = export_model(model, tmp_path_factory.mktemp("hf_llama_onnx"))
    return model, bundle


def _dims(value_info) -> list:
    return [d.dim_param or d.dim_value for d in value_info.type.tensor_type.shape.dim]


def _ids(batch, length, seed=0):
    return torch.randint(3, 256, (batch, length), generator=torch.Generator().manual_seed(seed))


def test_numerics_decode_onnx_matches_torch_logits(hf_llama):
    model, bundle = hf_llama
    prefill = ort.InferenceSession(str(bundle.out_dir / PREFILL_FILE), providers=_CPU)
    decode = ort.InferenceSession(str(bundle.out_dir / DECODE_FILE), providers=_CPU)
    names = [i.name for i in decode.get_inputs()]
    ids = _ids(3, 9)
    with torch.no_grad():
        expected = model(ids).numpy()  # (3, 9, V)
    logits, *present = prefill.run(None, {"input_ids": ids[:, :5].numpy()})
    got = [logits]
    for start, end in ((5, 7), (7, 8), (8, 9)):  # two tokens, then one at a time
        feeds = dict(zip(names, [ids[:, start:end].numpy(), *present], strict=True))
        logits, *present = decode.run(None, feeds)
        got.append(logits)
    assert np.abs(np.concatenate(got, 1) - expected).max() <= 1e-4
    assert present[0].shape == (3, 2, 9, 16)
    assert bundle.max_abs_diff <= 1e-4 and set(bundle.diffs) == {"prefill", "decode"}


def test_numerics_decode_onnx_with_empty_past_equals_prefill(hf_llama):
    """Past length 0 was not specialised away: decode.onnx also runs a prefill."""
    _, bundle = hf_llama
    prefill = ort.InferenceSession(str(bundle.out_dir / PREFILL_FILE), providers=_CPU)
    decode = ort.InferenceSession(str(bundle.out_dir / DECODE_FILE), providers=_CPU)
    ids = _ids(1, 4, seed=2).numpy()
    empty = np.zeros((1, 2, 0, 16), dtype=np.float32)
    feeds = {i.name: empty for i in decode.get_inputs()[1:]}
    got = decode.run(None, {"input_ids": ids, **feeds})
    want = prefill.run(None, {"input_ids": ids})
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, atol=1e-5)


def test_golden_io_names_and_dynamic_dims(hf_llama):
    _, bundle = hf_llama
    decode = onnx.load(bundle.out_dir / DECODE_FILE, load_external_data=False)
    prefill = onnx.load(bundle.out_dir / PREFILL_FILE, load_external_data=False)
    assert [(i.name, _dims(i)) for i in decode.graph.input] == [
        ("input_ids", ["batch", "seq"]),
        ("past_k_0", ["batch", 2, "past_0", 16]),
        ("past_v_0", ["batch", 2, "past_0", 16]),
        ("past_k_1", ["batch", 2, "past_1", 16]),
        ("past_v_1", ["batch", 2, "past_1", 16]),
    ]
    assert [i.name for i in prefill.graph.input] == ["input_ids"]
    outputs = ["logits", "present_k_0", "present_v_0", "present_k_1", "present_v_1"]
    assert [o.name for o in decode.graph.output] == outputs
    assert [o.name for o in prefill.graph.output] == outputs
    assert _dims(decode.graph.output[0]) == ["batch", "seq", 256]
    assert bundle.decode.custom_ops == {"condfx::Attention": 2}
    assert bundle.prefill.custom_ops == {"condfx::Attention": 2}


def test_golden_manifest(hf_llama):
    _, bundle = hf_llama
    manifest = json.loads((bundle.out_dir / MANIFEST_NAME).read_text())
    assert manifest == bundle.manifest
    assert manifest["format"] == "condfx-onnx" and manifest["format_version"] == 2
    assert manifest["condfx_version"] == condfx.__version__ and manifest["opset"] == 18
    assert (
        manifest["model"]["name"] == "hf-llama" and len(manifest["model"]["weights_sha256"]) == 64
    )
    assert manifest["vocab_size"] == 256 and manifest["max_seq_len"] == 512
    assert manifest["passes"] == "fuse-attention"
    assert manifest["layers"][1] == {
        "kind": "full",
        "layer": 1,
        "n_kv_heads": 2,
        "head_dim": 16,
        "dtype": "float32",
    }
    files = manifest["files"]
    assert files["prefill"]["inputs"] == ["input_ids"]
    assert files["decode"]["inputs"][1:3] == ["past_k_0", "past_v_0"]
    for entry in files.values():
        assert entry["sha256"] == file_sha256(bundle.out_dir / entry["path"])
        assert entry["external_data"] == "weights.data"
    assert set(manifest["max_abs_diff"]) == {"prefill", "decode"}


def test_numerics_export_onnx_verifies_pasts_on_dims_0_and_2(tmp_path):
    """export_onnx's automatic dims: a past input resizes batch and past length, never heads."""
    _, result = decode_graph("llama-tiny")
    gm = result.graph_module
    names = ["input_ids"] + [f"past_{kv}_{s.layer}" for s in gm.meta["condfx_kv"] for kv in "kv"]
    past = [torch.randn(2, 2, 3, 16) for _ in names[1:]]
    out = export_onnx(gm, (_ids(2, 4), *past), tmp_path / "d.onnx", input_names=names)
    assert out.verified_shapes[1][:2] == ((3, 6), (3, 2, 5, 16))
    assert out.max_abs_diff <= 1e-4


def test_export_is_a_plain_function():
    """``condfx.export(...)`` is ``export_model``, a plain function; the exporter's names live in
    ``condfx.export_bundle`` (issue 13 replaced the callable-module swap this test once checked)."""
    import inspect

    assert condfx.export is export_model and inspect.isfunction(condfx.export)
    assert ex.export_onnx is export_onnx and ex.ExportBundle is ExportBundle


def test_rejects_bad_model_opset_and_graph(tmp_path):
    with pytest.raises(TypeError, match=r"export_model needs a torch.nn.Module or a model spec"):
        export_model(123, tmp_path)
    with pytest.raises(ValueError, match=r"opset must be an int in \[18, "):
        export_model("llama-tiny", tmp_path, opset=9)
    with pytest.raises(ValueError, match=r"Unknown model 'llama-huge'"):
        export_model("llama-huge", tmp_path)
    with pytest.raises(ValueError, match=r"needs the decode form of a graph"):
        export_decode_graph(torch.nn.Linear(2, 2), tmp_path)


def test_rejects_passes_that_do_not_fuse_attention(tmp_path):
    model, _ = models_zoo.load("llama-tiny")
    with pytest.raises(PassError, match=r"run fuse-attention first"):
        export_model(model, tmp_path, passes="fuse-attention{layers=[0]}")
