"""Tests for codegen/triton/masked_ffn.py: the Triton gather → gate/up/down → scatter kernels.

Run in the Triton interpreter on CPU tensors by default, with the interpreter set-up of
``test_attention_kernel`` (its module fixture ``_interpreter_env`` is imported, so the same
``triton.language`` swaps and restores apply; see that module's docstring). The kernel module is
loaded as a private copy decorated under ``TRITON_INTERPRET=1``, so ``condfx.codegen.triton.masked_ffn``
itself stays compiled. On a GPU: ``TRITON_INTERPRET=0 pytest tests/codegen/triton``.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys

import pytest
import torch

from tests.codegen.triton.test_attention_kernel import _INTERPRET, ROOT, _interpreter_env  # noqa: F401


def _load():
    if _INTERPRET != "1":
        return importlib.import_module("condfx.codegen.triton.masked_ffn")
    prior = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        spec = importlib.util.spec_from_file_location("_condfx_masked_ffn_interpreted",
                                                      ROOT / "codegen" / "triton" / "masked_ffn.py")
        private = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = private
        spec.loader.exec_module(private)
    finally:
        if prior is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = prior
    return private


tri = _load()
DEVICE = "cpu" if tri.is_interpreted() else "cuda"


def _case(kind, act, layout, bias, dtype, b=2, t=5, d=24, f=40, p=0.5, seed=0):
    from condfx.ops.masked_ffn import masked_ffn_reference

    g = torch.Generator().manual_seed(seed)
    shape = (lambda o, i: (o, i)) if layout == "out_in" else (lambda o, i: (i, o))
    w = lambda o, i: (torch.randn(*shape(o, i), generator=g) / i**0.5).to(DEVICE, dtype)  # noqa: E731
    bb = lambda o: torch.randn(o, generator=g).to(DEVICE, dtype) if bias else None  # noqa: E731
    w_up, b_up = w(f, d), bb(f)
    w_gate, b_gate = (w(f, d), bb(f)) if kind == "swiglu" else (None, None)
    w_down, b_down = w(d, f), bb(d)
    x = torch.randn(b, t, d, generator=g).to(DEVICE, dtype)
    h_in = torch.randn(b, t, d, generator=g).to(DEVICE, dtype)
    execute = (torch.rand(b, t, generator=g) < p).to(DEVICE)
    args = (x, h_in, execute, w_up, b_up, w_gate, b_gate, w_down, b_down, kind, act, layout)
    update, cos = tri.masked_ffn_fwd(*args, block_m=16, block_n=16, block_k=16)
    ref_args = [a.float() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args]
    ref_update, ref_cos = masked_ffn_reference(*(a.cpu() if isinstance(a, torch.Tensor) else a for a in ref_args))
    return update, cos, ref_update, ref_cos, execute


@pytest.mark.parametrize(("kind", "act", "layout", "bias"), [
    ("swiglu", "silu", "out_in", False), ("swiglu", "gelu", "in_out", True),
    ("gelu-mlp", "gelu_tanh", "in_out", True), ("gelu-mlp", "gelu", "out_in", False),
])
def test_numerics_fp32_matches_reference(kind, act, layout, bias):
    update, cos, ref_update, ref_cos, execute = _case(kind, act, layout, bias, torch.float32)
    assert update.dtype == torch.float32 and cos.dtype == torch.float32
    torch.testing.assert_close(update.cpu(), ref_update, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(cos.cpu(), ref_cos, atol=1e-5, rtol=1e-5)
    assert bool((update[~execute] == 0).all())  # skipped rows: exactly zero update


def test_numerics_fp16_matches_reference():
    update, _, ref_update, _, _ = _case("swiglu", "silu", "out_in", True, torch.float16, t=9, d=32, f=48)
    assert update.dtype == torch.float16
    torch.testing.assert_close(update.float().cpu(), ref_update, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("p", [0.0, 1.0])
def test_numerics_no_row_and_every_row(p):
    update, cos, ref_update, ref_cos, _ = _case("swiglu", "silu", "out_in", False, torch.float32, p=p, seed=3)
    torch.testing.assert_close(update.cpu(), ref_update, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(cos.cpu(), ref_cos, atol=1e-5, rtol=1e-5)
