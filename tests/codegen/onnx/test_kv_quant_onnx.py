"""ONNX lowerings of the packed KV-cache ops (``kivi_cache_attention``, ``quantized_stream``): each
function against its op step by step, and KIVI / XQuant models exported with packed integer caches,
run by ONNX Runtime through the Session against the PyTorch Session."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper

import condfx
from condfx.codegen.onnx import DOMAIN
from condfx.codegen.onnx.kivi_cache_attention import (
    _INPUTS,
    _OUTPUTS,
    kivi_cache_attention_function,
)
from condfx.ops.quant_stream import empty_stream
from condfx.runtime.session import Session

_TYPES = {"codes": TensorProto.UINT8, "scale": TensorProto.FLOAT16, "zero": TensorProto.FLOAT16,
          "fp": TensorProto.FLOAT}


def _type(name: str) -> int:
    return _TYPES.get(name.split("_")[1], TensorProto.FLOAT) if "_" in name else TensorProto.FLOAT


def _single_node_model(bits: int, group: int, residual: int, sink: int) -> onnx.ModelProto:
    inputs = [helper.make_tensor_value_info(n, _type(n), [f"{n}{i}" for i in range(4)]) for n in _INPUTS]
    outputs = [helper.make_tensor_value_info(n, _type(n), [f"{n}{i}" for i in range(4)]) for n in _OUTPUTS]
    node = helper.make_node("KIVICacheAttention", list(_INPUTS), list(_OUTPUTS), domain=DOMAIN, scale=0.3,
                            window=0, bits=bits, group=group, residual=residual, sink=sink)
    model = helper.make_model(helper.make_graph([node], "g", inputs, outputs),
                              opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid(DOMAIN, 1)],
                              functions=[kivi_cache_attention_function()])
    onnx.checker.check_model(model)
    return model


@pytest.mark.parametrize(("bits", "group", "residual", "sink"), [(2, 4, 3, 1), (3, 8, 0, 0), (4, 2, 5, 3)])
def test_function_matches_op_step_by_step(bits, group, residual, sink):
    """ORT carries its own integer cache through a prefill and uneven decode steps; every output
    (attention and the eight updated stream tensors) matches the op's."""
    b, h, hkv, d, s = 2, 4, 2, 8, 23
    g = torch.Generator().manual_seed(bits)
    q, k, v = (torch.randn(b, n, s, d, generator=g) for n in (h, hkv, hkv))
    sess = ort.InferenceSession(_single_node_model(bits, group, residual, sink).SerializeToString(),
                                providers=["CPUExecutionProvider"])
    torch_streams = [*empty_stream((b, hkv), d, bits, group, -2, torch.float32),
                     *empty_stream((b, 1), hkv * d, bits, group, -1, torch.float32)]
    ort_streams = [t.numpy() for t in torch_streams]
    p = 0
    for n in (5, 1, 1, 3, 1, 7, 1, 4):
        new = [x[:, :, p : p + n] for x in (q, k, v)]
        out, *torch_streams = torch.ops.condfx.kivi_cache_attention(
            *new, *torch_streams, 0.3, 0, bits, group, residual, sink)
        got = sess.run(None, dict(zip(_INPUTS, [x.numpy() for x in new] + ort_streams, strict=True)))
        np.testing.assert_allclose(got[0], out.numpy(), atol=1e-5, rtol=1e-5)
        for a, w in zip(got[1:], torch_streams, strict=True):
            assert a.shape == tuple(w.shape) and a.dtype == w.numpy().dtype
            if a.dtype == np.uint8:
                assert a.size == 0 or (a == w.numpy()).mean() > 0.99  # a rounding tie may flip a code
            else:
                np.testing.assert_allclose(a.astype(np.float64), w.double().numpy(), atol=1e-2)
        ort_streams = got[1:]
        p += n


def test_export_kivi_model_ort_session_matches_pytorch(tmp_path):
    """The decode graph takes and returns the KIVI cache as uint8 codes + float16 scales; the
    Session over ONNX Runtime decodes like the PyTorch Session (prefill, 1-token and 4-token steps)."""
    from condfx.models_zoo import build_zoo

    model = build_zoo("llama-tiny")
    spec = "fuse-attention, quantize-kv{method=kivi,bits=2,group=4,residual=3,sink=1}"
    bundle = condfx.export_model(model, tmp_path, passes=spec)
    assert bundle.max_abs_diff < 1e-3
    decode = onnx.load(str(tmp_path / "decode.onnx"), load_external_data=False)
    types = {i.name: i.type.tensor_type.elem_type for i in decode.graph.input}
    assert types["past_k_0_codes"] == TensorProto.UINT8 and types["past_v_1_scale"] == TensorProto.FLOAT16
    outputs = {o.name: o.type.tensor_type.elem_type for o in decode.graph.output}
    assert outputs["present_k_1_codes"] == TensorProto.UINT8
    assert any(n.op_type == "KIVICacheAttention" for n in decode.graph.node)

    ids = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(0))
    logits = {}
    for name, session in (("torch", Session.from_model(model, passes=spec)),
                          ("onnx", Session.from_onnx(tmp_path, model=model))):
        steps = [session.prefill(ids[:, :6])] + [session.step(ids[:, t : t + 1]) for t in range(6, 20)]
        steps.append(session.step(ids[:, 20:24]))
        logits[name] = torch.cat(steps, 1)
        codes = session.caches[0].past()[0]
        assert codes.dtype == torch.uint8 and codes.shape[2] == 20  # (24 - 3 - 1) // 4 * 4
    assert (logits["onnx"] - logits["torch"]).abs().max().item() < 1e-3


def _function_model(function: onnx.FunctionProto, inputs: dict, outputs: dict, **attrs) -> onnx.ModelProto:
    node = helper.make_node(function.name, list(inputs), list(outputs), domain=DOMAIN, **attrs)
    graph = helper.make_graph(
        [node], "g",
        [helper.make_tensor_value_info(n, t, [f"{n}{i}" for i in range(4)]) for n, t in inputs.items()],
        [helper.make_tensor_value_info(n, t, [f"{n}{i}" for i in range(4)]) for n, t in outputs.items()])
    model = helper.make_model(graph, functions=[function],
                              opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid(DOMAIN, 1)])
    onnx.checker.check_model(model)
    return model


@pytest.mark.parametrize(("dim", "bits"), [(-1, 3), (-2, 3), (-1, 0), (-2, 0)])
def test_quantized_stream_function_matches_op(dim, bits):
    from condfx.codegen.onnx.quantized_stream import quantized_stream_functions

    function = quantized_stream_functions()[(0 if dim == -1 else 1) + (2 if bits == 0 else 0)]
    f32 = TensorProto.FLOAT
    inputs = {"codes": TensorProto.UINT8, "scale": TensorProto.FLOAT16, "zero": TensorProto.FLOAT16,
              "fp": f32, "new": f32}
    outputs = {"full": f32, "hat": f32, "codes_out": TensorProto.UINT8, "scale_out": TensorProto.FLOAT16,
               "zero_out": TensorProto.FLOAT16, "fp_out": f32}
    attrs = {"bits": bits} if bits else {}
    model = _function_model(function, inputs, outputs, **attrs, group=4, residual=2, sink=1)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    x = torch.randn(2, 1, 19, 16, generator=torch.Generator().manual_seed(0))
    stream = empty_stream((2, 1), 16, bits, 4, dim, torch.float32)
    p = 0
    for n in (6, 1, 5, 1, 6):
        full, hat, *want = torch.ops.condfx.quantized_stream(*stream, x[:, :, p : p + n], bits, 4, dim, 2, 1)
        got = sess.run(None, dict(zip(inputs, [*(t.numpy() for t in stream), x[:, :, p : p + n].numpy()],
                                      strict=True)))
        np.testing.assert_allclose(got[0], full.numpy(), atol=1e-6)
        np.testing.assert_allclose(got[1], hat.numpy(), atol=1e-5)
        assert [g.shape for g in got[2:]] == [tuple(w.shape) for w in want]
        stream, p = [torch.from_numpy(g) for g in got[2:]], p + n
    assert (hat - x).abs().max().item() > 1e-2  # quantized tokens were read


# one latent in CI; each export takes minutes on a loaded 2-core machine
@pytest.mark.parametrize("latent", ["x", pytest.param("svd", marks=pytest.mark.slow),
                                    pytest.param("cl", marks=pytest.mark.slow)])
def test_export_xquant_model_ort_session_matches_pytorch(tmp_path, latent):
    """XQuant's decode graph takes and returns its X / latent streams as uint8 codes + float16
    scales and re-runs the k/v path in ONNX Runtime; the ORT Session decodes like the PyTorch one."""
    from condfx.models_zoo import build_zoo

    model = build_zoo("llama-tiny")
    method = "xquant-cl" if latent == "cl" else f"xquant,latent={latent}"
    spec = f"fuse-attention, quantize-kv{{method={method},bits=3,group=4,residual=3,sink=1}}"
    bundle = condfx.export_model(model, tmp_path, passes=spec)
    assert bundle.max_abs_diff < 1e-3
    stream = "k" if latent == "svd" else "x"
    decode = onnx.load(str(tmp_path / "decode.onnx"), load_external_data=False)
    types = {i.name: i.type.tensor_type.elem_type for i in decode.graph.input}
    assert types[f"past_{stream}_0_codes"] == TensorProto.UINT8
    ids = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(0))
    logits = {}
    for name, session in (("torch", Session.from_model(model, passes=spec)),
                          ("onnx", Session.from_onnx(tmp_path, model=model))):
        steps = [session.prefill(ids[:, :6])] + [session.step(ids[:, t : t + 1]) for t in range(6, 20)]
        logits[name] = torch.cat([*steps, session.step(ids[:, 20:24])], 1)
    assert (logits["onnx"] - logits["torch"]).abs().max().item() < 1e-3


@pytest.mark.slow  # minutes; the 0-bit (dropped) stream function is tested in CI by test_quantized_stream_function_matches_op
def test_export_klt_model_with_dropped_streams_ort_session_matches_pytorch(tmp_path):
    """latent=klt: several latent streams per layer, some at 0 bits (dropped from the quantized
    tokens, kept in the full-precision tail), as decode-graph inputs and outputs; ORT decodes like
    PyTorch."""
    from condfx.kv_calibrate import record_kv_stats
    from condfx.models_zoo import build_zoo

    model = build_zoo("llama-tiny")
    calib = [torch.randint(0, 128, (2, 32), generator=torch.Generator().manual_seed(1))]
    spec = "fuse-attention, quantize-kv{method=xquant,latent=klt,group=4,residual=3,sink=1,k_budget=5,v_budget=8}"
    bundle = condfx.export_model(model, tmp_path, passes=spec, kv_calibration=calib)
    assert bundle.max_abs_diff < 1e-3
    gm = condfx.capture(model, (torch.zeros(2, 8, dtype=torch.long),))
    record_kv_stats(gm, calib)
    torch_session = Session.from_graph(condfx.apply(gm, f"{spec}, add-kv-cache").graph_module)
    streams = torch_session.backend.layers[0].streams
    assert any(st.bits == 0 for st in streams) and len(streams) > 2
    decode = onnx.load(str(tmp_path / "decode.onnx"), load_external_data=False)
    assert any(n.op_type.startswith("QuantizedStreamDropped") for n in decode.graph.node)
    ids = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(0))
    logits = {}
    for name, session in (("torch", torch_session), ("onnx", Session.from_onnx(tmp_path, model=model))):
        steps = [session.prefill(ids[:, :6])] + [session.step(ids[:, t : t + 1]) for t in range(6, 20)]
        logits[name] = torch.cat([*steps, session.step(ids[:, 20:24])], 1)
    assert (logits["onnx"] - logits["torch"]).abs().max().item() < 1e-3
