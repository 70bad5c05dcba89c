"""Quantized caches of a float16 model export: the stream functions compute in float32 inside and
hand the full-precision tokens back in the model's dtype (they failed the ONNX checker before)."""

from __future__ import annotations

import torch

import condfx
from condfx.runtime.session import Session


def test_export_float16_kivi_model_matches_pytorch(tmp_path, one_thread):
    from condfx.models_zoo import build_zoo

    model = build_zoo("llama-tiny").half()
    spec = "fuse-attention, quantize-kv{method=kivi,bits=2,group=4,residual=3}"
    bundle = condfx.export_model(model, tmp_path, passes=spec)
    assert bundle.max_abs_diff < 1e-2  # float16 logits, codes left out of the figure
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    logits = {}
    for name, session in (("torch", Session.from_model(model, passes=spec)),
                          ("onnx", Session.from_onnx(tmp_path, model=model))):
        steps = [session.prefill(ids[:, :6])] + [session.step(ids[:, t : t + 1]) for t in range(6, 16)]
        logits[name] = torch.cat(steps, 1).float()
        assert session.caches[0].past()[3].dtype == torch.float16  # the residual window, model dtype
    assert (logits["onnx"] - logits["torch"]).abs().max().item() < 1e-2
