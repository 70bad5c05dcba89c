"""``condfx::attention`` score options (softcap, ALiBi slopes, sinks) against the HF eager formulas."""

from __future__ import annotations

import math

import pytest
import torch

import condfx.ops  # noqa: F401  (registers torch.ops.condfx.*)
from condfx.ops import attention_reference
from condfx.ops._masks import causal_window_mask

_SLOPES = [0.5, 0.25, 0.125, 0.0625]


def _qkv(b, h, hkv, t, s, d, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(b, n, m, d, generator=gen).to(dtype) for n, m in ((h, t), (hkv, s), (hkv, s)))


def _hf_style(q, k, v, scale, window=0, softcap=0.0, slopes=None, sinks=None, relative=False):
    """The transformers eager forms: Gemma2 softcap, Bloom ALiBi (slope * j; ``relative``: slope * (j - pos),
    which differs from it only when a sink column is present), GPT-OSS sinks (cat, drop)."""
    t, s = q.shape[2], k.shape[2]
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, dim=1).double(), v.repeat_interleave(rep, dim=1).double()
    scores = (q.double() @ k.transpose(-1, -2)) * scale
    if softcap:
        scores = torch.tanh(scores / softcap) * softcap
    if slopes is not None:
        dist = torch.arange(s) - (torch.arange(t) + s - t).unsqueeze(1) if relative else torch.arange(s)
        scores = scores + torch.tensor(slopes, dtype=torch.float64).view(1, -1, 1, 1) * dist
    scores = scores.masked_fill(~causal_window_mask(t, s, window), -math.inf)
    if sinks is not None:
        z = sinks.double().view(1, -1, 1, 1).expand(*scores.shape[:-1], 1)
        probs = torch.softmax(torch.cat([scores, z], -1), -1)[..., :-1]
    else:
        probs = torch.softmax(scores, -1)
    return (probs @ v).to(q.dtype)


_OPTIONS = {
    "softcap": dict(softcap=2.0),
    "alibi": dict(alibi_slopes=_SLOPES),
    "sinks": dict(sinks=torch.tensor([0.5, -1.0, 2.0, 0.0], dtype=torch.float64)),
    "all": dict(softcap=3.0, alibi_slopes=_SLOPES, sinks=torch.tensor([1.0, 0.0, -2.0, 0.3], dtype=torch.float64)),
}


@pytest.mark.parametrize("name", list(_OPTIONS))
@pytest.mark.parametrize(("t", "s", "window"), [(7, 7, 0), (3, 9, 0), (1, 6, 0), (8, 8, 3)])
def test_numerics_options_match_hf_formulas(name, t, s, window):
    opts = _OPTIONS[name]
    q, k, v = _qkv(2, 4, 2, t, s, 8)
    want = _hf_style(q, k, v, 0.4, window, opts.get("softcap", 0.0), opts.get("alibi_slopes"), opts.get("sinks"),
                     relative=name == "all")
    torch.testing.assert_close(attention_reference(q, k, v, 0.4, window, **opts), want)
    torch.testing.assert_close(torch.ops.condfx.attention(q, k, v, 0.4, window, **opts), want)


def test_numerics_defaults_are_the_plain_op():
    q, k, v = _qkv(1, 4, 2, 5, 5, 8, dtype=torch.float32)
    plain = torch.ops.condfx.attention(q, k, v, 0.3, 0)
    torch.testing.assert_close(torch.ops.condfx.attention(q, k, v, 0.3, 0, 0.0, None, None), plain)


@pytest.mark.parametrize("name", ["all"])
def test_numerics_gradcheck(name):
    q, k, v = (x.requires_grad_() for x in _qkv(1, 4, 2, 2, 3, 2))
    opts = dict(_OPTIONS[name])
    sinks = opts.pop("sinks", None)
    inputs = (q, k, v, sinks.clone().requires_grad_()) if sinks is not None else (q, k, v)

    def fn(*x):
        return torch.ops.condfx.attention(x[0], x[1], x[2], 0.5, 0, sinks=x[3] if len(x) > 3 else None, **opts)

    assert torch.autograd.gradcheck(fn, inputs)


def test_matches_fake_impl_under_export():
    class _M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.sinks = torch.nn.Parameter(torch.zeros(4))

        def forward(self, q, k, v):
            return torch.ops.condfx.attention(q, k, v, 0.5, 0, 1.5, _SLOPES, self.sinks)

    q, k, v = _qkv(1, 4, 2, 5, 5, 8, dtype=torch.float32)
    t = torch.export.Dim("t", min=2, max=64)
    ep = torch.export.export(_M(), (q, k, v), dynamic_shapes=({2: t}, {2: t}, {2: t}))
    q2, k2, v2 = _qkv(1, 4, 2, 9, 9, 8, dtype=torch.float32, seed=1)
    torch.testing.assert_close(ep.module()(q2, k2, v2), attention_reference(q2, k2, v2, 0.5, 0, 1.5, _SLOPES,
                                                                            torch.zeros(4)))


@pytest.mark.parametrize(("options", "message"), [
    (dict(softcap=-1.0), "softcap must be >= 0"),
    (dict(alibi_slopes=[0.5]), "one slope per query head"),
    (dict(sinks=torch.zeros(3)), "sinks must have shape"),
])
def test_rejects_bad_options(options, message):
    q, k, v = _qkv(1, 4, 2, 3, 3, 4, dtype=torch.float32)
    with pytest.raises(ValueError, match=message):
        attention_reference(q, k, v, 0.5, 0, **options)
