"""Softcapped, ALiBi and sink attention as attention cores: found with the fused op's score options,
fused exactly by ``fuse-attention``, named near misses for forms the op cannot express, and skips in the
passes that build other attention ops."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import condfx
from benchmarks.conformance import build_small, small_config
from condfx.models_zoo.hf import CausalLMLogits
from condfx.passes.base import PassError
from condfx.patterns import find_regions
from condfx.patterns.attention import SOFTCAP
from condfx.patterns.attention_bias import ALIBI

from . import _forms as F

# Deselected by default (pyproject addopts: -m 'not slow'); run them with `python -m pytest -m slow`.
SLOW = [pytest.mark.slow]

EXACT = 1e-5


def _capture(model: nn.Module):
    return condfx.capture(model.eval(), (torch.randn(2, 12, F.DIM),))


def _variant(name: str) -> nn.Module:
    model = F.ScoresVariant(name)
    with torch.no_grad():
        model.sinks.copy_(torch.tensor([0.5, -1.0, 2.0, 0.0]))
    return model


def _fused_diff(model: nn.Module, gm, x) -> float:
    fused = condfx.apply(gm, "fuse-attention").graph_module
    with torch.no_grad():
        return (model(x) - fused(x)).abs().max().item()


@pytest.mark.parametrize(("name", "option"), [("softcap", "softcap"), ("alibi", "alibi_slopes"), ("sinks", "sinks")])
def test_matches_scores_variant_as_core(name: str, option: str) -> None:
    model = _variant(name)
    gm = _capture(model)
    (region,) = find_regions(gm).attention
    want = {"softcap": 30.0, "alibi_slopes": (0.5,) * 4}.get(option)
    got = getattr(region, option)
    assert got == want if want is not None else got.target == "sinks"
    assert region.scale == pytest.approx(0.5) and region.causal
    assert _fused_diff(model, gm, torch.randn(3, 17, F.DIM)) <= EXACT


class _ScaledAfterSoftcap(F.Attention):
    """2 * c * tanh(s / c): a factor outside the softcap, which the op cannot express."""

    def forward(self, x):
        b, t, c = x.shape
        q, k, v = (p(x).view(b, t, 4, c // 4).transpose(1, 2) for p in (self.q, self.k, self.v))
        s = torch.tanh((q @ k.transpose(-2, -1)) / 30.0) * 30.0 * 2.0
        keep = torch.ones(t, t, dtype=torch.bool).tril()
        p = s.masked_fill(~keep, float("-inf")).softmax(-1)
        return self.o((p @ v).transpose(1, 2).reshape(b, t, c))


class _QuadraticBias(F.Attention):
    """scores + 0.01 * j^2: an additive position bias that is not ALiBi."""

    def forward(self, x):
        b, t, c = x.shape
        q, k, v = (p(x).view(b, t, 4, c // 4).transpose(1, 2) for p in (self.q, self.k, self.v))
        j = torch.arange(t, dtype=x.dtype)
        keep = torch.ones(t, t, dtype=torch.bool).tril()
        s = (q @ k.transpose(-2, -1)) * 0.5 + (0.01 * j * j).expand(t, t)
        p = s.masked_fill(~keep, float("-inf")).softmax(-1)
        return self.o((p @ v).transpose(1, 2).reshape(b, t, c))


@pytest.mark.parametrize(("model", "reason", "detail"), [
    (_ScaledAfterSoftcap(), SOFTCAP, "outside the softcap"),
    (_QuadraticBias(), ALIBI, "not linear in the key position"),
])
def test_rejects_inexpressible_scores_with_named_reason(model, reason, detail) -> None:
    regions = find_regions(_capture(model))
    assert regions.attention == []
    (failure,) = [f for f in regions.failures if f.kind == "attention"]
    assert failure.reason == reason and detail in failure.detail, failure


@pytest.mark.parametrize("spec", ["quantize-kv{method=kivi,group=8}", "sink-window"])  # route-attention: takes them
def test_rejects_score_options_in_passes_building_other_ops(spec: str) -> None:
    gm = _capture(_variant("softcap"))
    assert find_regions(gm).attention[0].score_options == "softcapped scores"
    try:
        reasons = [reason for reason, _ in condfx.apply(gm, spec).reports[0].skipped]
    except PassError as err:  # a pass that rewrote nothing may refuse, listing the skip reasons
        reasons = [str(err)]
    assert any("softcapped scores" in r and "has no score options" in r for r in reasons), reasons


@pytest.fixture(scope="module", params=["bloom", pytest.param("gpt_oss", marks=SLOW)])
def hf_model(request):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return build_small(request.param, "eager")


def test_numerics_hf_fuse_attention_exact(hf_model) -> None:
    gm = condfx.capture(hf_model, (torch.randint(0, 128, (2, 9)),))
    regions = find_regions(gm)
    assert len(regions.attention) == 2
    assert all(r.score_options in ("ALiBi", "attention sinks") for r in regions.attention)
    assert _fused_diff(hf_model, gm, torch.randint(0, 128, (3, 17))) <= EXACT


@pytest.mark.parametrize(("kind", "attn", "alibi"), [
    ("gemma2", "eager", None), ("mpt", "eager", None), ("falcon", "eager", True), ("falcon", "sdpa", True),
])
@SLOW[0]
def test_numerics_hf_fuse_attention_exact_more_classes(kind, attn, alibi) -> None:
    from transformers import AutoModelForCausalLM

    config = small_config(kind, attn)
    if alibi is not None:
        config.alibi = alibi
    torch.manual_seed(0)
    model = CausalLMLogits(AutoModelForCausalLM.from_config(config, attn_implementation=attn).float().eval(), kind)
    gm = condfx.capture(model, (torch.randint(0, 128, (2, 9)),))
    assert len(find_regions(gm).attention) == 2
    assert _fused_diff(model, gm, torch.randint(0, 128, (3, 17))) <= EXACT


class _HeadSplitQKV(nn.Module):
    """Bloom's layout: one qkv projection viewed as (B, T, H, 3, D), q/k/v selected per head."""

    def __init__(self):
        super().__init__()
        self.qkv, self.o = nn.Linear(F.DIM, 3 * F.DIM), nn.Linear(F.DIM, F.DIM)

    def forward(self, x):
        b, t, c = x.shape
        qkv = self.qkv(x).view(b, t, 4, 3, c // 4)
        q, k, v = (qkv.select(3, i).transpose(1, 2) for i in range(3))
        y = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o(y.transpose(1, 2).reshape(b, t, c))


def test_rejects_head_split_qkv_in_xquant_with_precise_reason() -> None:
    gm = _capture(_HeadSplitQKV())
    try:
        reasons = [r for r, _ in condfx.apply(gm, "quantize-kv{method=xquant,group=8}").reports[0].skipped]
    except PassError as err:
        reasons = [str(err)]
    assert any("fused qkv projection split per head" in r for r in reasons), reasons
