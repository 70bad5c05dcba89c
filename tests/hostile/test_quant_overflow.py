"""Quantized caches at any magnitude: scales, zero points and float16 values saturate at ±65504
instead of overflowing to ±inf / NaN (issue: KIVI on stories260K with keys ×3000 gave NaN logits)."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto

import condfx
from condfx.ops.kv_quant import FLOAT16_MAX, dequantize_reference, quantize_reference
from condfx.ops.quant_stream import empty_stream
from condfx.runtime.session import Session
from tests.codegen.onnx.test_kv_quant_onnx import _function_model
from tests.runtime import STORIES, load_model, logits_of


@pytest.mark.parametrize("dim", [-1, -2])
def test_quantize_saturates_instead_of_overflowing(dim):
    """Values far beyond float16's range: every stored statistic is finite, values inside the range
    keep the usual error bound, values beyond read back as ±65504."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 16, 8, generator=g)
    x[0] *= 1e6  # |x| up to ~4e6: min, max and range all overflow float16
    packed, scale, zero = quantize_reference(x, 2, 4, dim)
    assert torch.isfinite(scale.float()).all() and torch.isfinite(zero.float()).all()
    back = dequantize_reference(packed, scale, zero, 2, 4, dim, 8)
    assert torch.isfinite(back).all()
    assert back.abs().max().item() <= FLOAT16_MAX * 1.001  # up to the float16 rounding of the scale
    small_step = (x[1].amax() - x[1].amin()).item() / 3  # a bound on any in-range group's step
    assert (back[1] - x[1]).abs().max().item() <= small_step


def test_onnx_stream_saturates_like_the_op():
    """The ONNX lowering of ``quantized_stream`` clamps like the op: finite codes, stats and reads."""
    from condfx.codegen.onnx.quantized_stream import quantized_stream_functions

    f32, f16 = TensorProto.FLOAT, TensorProto.FLOAT16
    inputs = {"codes": TensorProto.UINT8, "scale": f16, "zero": f16, "fp": f32, "new": f32}
    outputs = {"full": f32, "hat": f32, "codes_out": TensorProto.UINT8, "scale_out": f16, "zero_out": f16,
               "fp_out": f32}
    model = _function_model(quantized_stream_functions()[1], inputs, outputs, bits=2, group=4, residual=2, sink=0)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    x = torch.randn(1, 1, 12, 8, generator=torch.Generator().manual_seed(1)) * 3e5
    stream = empty_stream((1, 1), 8, 2, 4, -2, torch.float32)
    _, hat, *want = torch.ops.condfx.quantized_stream(*stream, x, 2, 4, -2, 2, 0)
    got = sess.run(None, dict(zip(inputs, [*(t.numpy() for t in stream), x.numpy()], strict=True)))
    assert all(np.isfinite(a.astype(np.float64)).all() for a in got)
    assert torch.isfinite(hat).all()
    np.testing.assert_allclose(got[1], hat.numpy(), rtol=1e-3, atol=1.0)


@pytest.fixture(scope="module")
def loud_keys():
    """stories260K with its key projections scaled by 3000 (keys near and beyond float16's range)."""
    model, _ = load_model(STORIES)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("wk.weight", "k_proj.weight")):
                p.mul_(3000)
    return model


@pytest.mark.parametrize("spec", ["quantize-kv{method=kivi,bits=2}", "quantize-kv{method=kivi,bits=16}",
                                  "quantize-kv{method=xquant,bits=2}"])
def test_loud_keys_give_finite_logits(loud_keys, spec, one_thread):
    ids = torch.randint(1, 500, (1, 80), generator=torch.Generator().manual_seed(0))
    gm = condfx.capture(loud_keys, (ids,))
    assert torch.isfinite(logits_of(gm(ids))).all()  # the dense model is finite
    rewritten = condfx.apply(gm, spec).graph_module
    assert torch.isfinite(logits_of(rewritten(ids))).all()


@pytest.mark.parametrize("spec", ["quantize-kv{method=kivi,bits=2,group=8,residual=8}",
                                  pytest.param("quantize-kv{method=kivi,bits=16}", marks=pytest.mark.slow)])
def test_loud_keys_decode_finite_in_session(loud_keys, spec, one_thread):
    """The torch Session's packed and float16 caches store the loud keys without overflowing."""
    ids = torch.randint(1, 500, (1, 40), generator=torch.Generator().manual_seed(0))
    session = Session.from_model(loud_keys, passes=f"fuse-attention, {spec}")
    steps = [session.prefill(ids[:, :24])] + [session.step(ids[:, t : t + 1]) for t in range(24, 40)]
    assert torch.isfinite(torch.cat(steps, 1)).all()
