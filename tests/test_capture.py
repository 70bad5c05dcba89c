"""condfx.capture: the canonical IR, dynamic shapes, symbolic_trace input, and clear failures."""

import importlib
import inspect

import pytest
import torch
from torch import nn

import condfx
from condfx.models_zoo import build_zoo
from condfx.models_zoo.hf import build_hf


class _DataDependent(nn.Module):
    def forward(self, x):
        if x.sum() > 0:  # data-dependent Python control flow cannot be captured
            return x
        return -x


class _Outer(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 4)
        self.gate = _DataDependent()

    def forward(self, x):
        return self.gate(self.proj(x))


def test_capture_keeps_metadata_and_provenance():
    model = build_zoo("llama-tiny")
    gm = condfx.capture(model, torch.randint(0, 64, (2, 7)))
    calls = [n for n in gm.graph.nodes if n.op == "call_function"]
    assert all("val" in n.meta for n in calls)
    assert any("layers.1" in path for n in calls for path, _ in n.meta.get("nn_module_stack", {}).values())
    assert not any(n.target is torch.ops.aten._assert_tensor_metadata.default for n in calls)


def test_capture_dynamic_batch_and_sequence():
    model = build_zoo("llama-tiny")
    gm = condfx.capture(model, torch.randint(0, 64, (2, 7)))
    for shape in [(1, 3), (3, 11)]:
        ids = torch.randint(0, 64, shape)
        torch.testing.assert_close(gm(ids), model(ids), rtol=0, atol=1e-5)


def test_capture_reduces_hf_model_output_to_logits():
    model = build_hf("llama")
    ids = torch.randint(0, 256, (2, 6))
    gm = condfx.capture(model, (ids,))
    torch.testing.assert_close(gm(ids), model(input_ids=ids).logits, rtol=0, atol=1e-5)
    assert gm.meta["condfx"]["wrapped_model_output"]


def test_capture_normalises_symbolic_trace():
    model = nn.Sequential(nn.Linear(4, 8), nn.GELU(), nn.Linear(8, 4))
    traced = torch.fx.symbolic_trace(model)
    gm = condfx.capture(traced, torch.randn(2, 3, 4))
    assert all("val" in n.meta for n in gm.graph.nodes if n.op == "call_function")
    x = torch.randn(5, 2, 4)
    torch.testing.assert_close(gm(x), model(x))


def test_rejects_data_dependent_control_flow_naming_module_and_line():
    with pytest.raises(condfx.CaptureError, match=r"module 'gate' \(_DataDependent\) at .*test_capture.py:\d+"):
        condfx.capture(_Outer(), torch.randn(2, 3, 4))


def test_capture_stays_the_function_after_importing_its_module():
    importlib.import_module("condfx.capture")
    assert inspect.isfunction(condfx.capture)


def test_rejects_non_module():
    with pytest.raises(TypeError, match="needs a torch.nn.Module"):
        condfx.capture(lambda x: x, torch.randn(2))


def test_failed_capture_leaves_model_without_hooks():
    model = _Outer()
    with pytest.raises(condfx.CaptureError):
        condfx.capture(model, torch.randn(2, 3, 4))
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_public_functions_stay_callable_after_importing_their_modules():
    for module in ("condfx.verify", "condfx.train", "condfx.export_bundle"):
        importlib.import_module(module)
    assert inspect.isfunction(condfx.verify) and inspect.isfunction(condfx.train)
    assert callable(condfx.export) and callable(condfx.apply)
