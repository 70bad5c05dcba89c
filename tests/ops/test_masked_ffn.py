"""Tests of ``condfx::masked_ffn``: reference vs the dense formula, fake, autograd, bad arguments."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import condfx.ops  # noqa: F401
from condfx.ops.masked_ffn import masked_ffn_reference

D, HID = 8, 12


def _weights(kind: str, layout: str, bias: bool, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    shape = (lambda o, i: (o, i)) if layout == "out_in" else (lambda o, i: (i, o))
    w = lambda o, i: torch.randn(*shape(o, i), generator=g, dtype=torch.float64)  # noqa: E731
    b = lambda o: torch.randn(o, generator=g, dtype=torch.float64) if bias else None  # noqa: E731
    gate = (w(HID, D), b(HID)) if kind == "swiglu" else (None, None)
    return w(HID, D), b(HID), *gate, w(D, HID), b(D)


def _textbook(x, w_up, b_up, w_gate, b_gate, w_down, b_down, kind, act, layout):
    """The dense formula, written independently of the op module."""
    lin = (lambda t, w, b: t @ w.T + (0 if b is None else b)) if layout == "out_in" else (
        lambda t, w, b: t @ w + (0 if b is None else b))
    a = {"silu": F.silu, "gelu": F.gelu, "gelu_tanh": lambda t: F.gelu(t, approximate="tanh")}[act]
    h = a(lin(x, w_gate, b_gate)) * lin(x, w_up, b_up) if kind == "swiglu" else a(lin(x, w_up, b_up))
    return lin(h, w_down, b_down)


_CASES = st.sampled_from([("swiglu", "silu"), ("swiglu", "gelu"), ("gelu-mlp", "gelu_tanh"), ("gelu-mlp", "gelu")])


@settings(max_examples=30, deadline=None)
@given(case=_CASES, layout=st.sampled_from(["out_in", "in_out"]), bias=st.booleans(),
       b=st.integers(1, 3), t=st.integers(1, 6), seed=st.integers(0, 2**16))
def test_reference_matches_dense_formula_on_executed_rows(case, layout, bias, b, t, seed):
    kind, act = case
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, t, D, generator=g, dtype=torch.float64)
    h_in = torch.randn(b, t, D, generator=g, dtype=torch.float64)
    execute = torch.rand(b, t, generator=g) < 0.5
    weights = _weights(kind, layout, bias, seed)
    update, cos = masked_ffn_reference(x, h_in, execute, *weights, kind, act, layout)
    dense = _textbook(x, *weights, kind, act, layout)
    want = torch.where(execute[..., None], dense, 0.0)
    torch.testing.assert_close(update, want, atol=1e-10, rtol=1e-10)
    want_cos = F.cosine_similarity(h_in, h_in + want, dim=-1).float()
    torch.testing.assert_close(cos, torch.where(execute, want_cos, 1.0), atol=1e-6, rtol=1e-6)
    assert cos.dtype == torch.float32 and bool((cos[~execute] == 1.0).all())


@pytest.mark.parametrize(("kind", "act"), [("swiglu", "silu"), ("gelu-mlp", "gelu_tanh")])
def test_all_true_mask_equals_dense_ffn(kind, act):
    torch.manual_seed(0)
    x, h_in = torch.randn(2, 5, D), torch.randn(2, 5, D)
    weights = [w.float() if w is not None else None for w in _weights(kind, "out_in", True)]
    update, _ = torch.ops.condfx.masked_ffn(x, h_in, torch.ones(2, 5, dtype=torch.bool), *weights, kind, act, "out_in")
    dense = _textbook(x, *weights, kind, act, "out_in")
    assert (update - dense).abs().max().item() <= 1e-6


def test_reference_runs_only_executed_rows(monkeypatch):
    seen = []
    real = F.linear
    monkeypatch.setattr(F, "linear", lambda x, w, b=None: seen.append(x.shape[0]) or real(x, w, b))
    x = torch.randn(1, 6, D)
    execute = torch.tensor([[True, False, False, True, False, False]])
    weights = [w.float() if w is not None else None for w in _weights("swiglu", "out_in", False)]
    masked_ffn_reference(x, x, execute, *weights, "swiglu", "silu", "out_in")
    assert seen == [2, 2, 2]


def test_fake_and_autograd():
    from torch._subclasses.fake_tensor import FakeTensorMode

    weights = [w.float() if w is not None else None for w in _weights("swiglu", "out_in", True)]
    x = torch.randn(2, 3, D, requires_grad=True)
    execute = torch.tensor([[True, False, True], [False, True, True]])
    update, cos = torch.ops.condfx.masked_ffn(x, x.detach(), execute, *weights, "swiglu", "silu", "out_in")
    (update.sum() + cos.sum()).backward()
    assert x.grad is not None and bool((x.grad[~execute] == 0).all())
    plain = x.detach()
    with FakeTensorMode() as mode:
        fx_ = mode.from_tensor(plain)
        fw = [mode.from_tensor(w) if w is not None else None for w in weights]
        u, c = torch.ops.condfx.masked_ffn(fx_, fx_, mode.from_tensor(execute), *fw, "swiglu", "silu", "out_in")
    assert u.shape == (2, 3, D) and c.shape == (2, 3) and c.dtype == torch.float32


@pytest.mark.parametrize(
    ("change", "match"),
    [({"kind": "moe"}, r"kind must be one of"), ({"act": "relu"}, r"act must be one of"),
     ({"layout": "x"}, r"layout must be one of"), ({"execute": "int"}, r"execute must be a bool tensor")],
)
def test_rejects_bad_arguments(change, match):
    weights = [w.float() if w is not None else None for w in _weights("swiglu", "out_in", False)]
    x = torch.randn(1, 2, D)
    execute = torch.ones(1, 2, dtype=torch.long if change.get("execute") else torch.bool)
    opts = {"kind": "swiglu", "act": "silu", "layout": "out_in"}
    opts.update({k: v for k, v in change.items() if k != "execute"})
    with pytest.raises(ValueError, match=match):
        masked_ffn_reference(x, x, execute, *weights, opts["kind"], opts["act"], opts["layout"])
