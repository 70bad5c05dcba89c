"""Region forms of issue 15 on hand-written blocks: offset norms, sandwich norms, scaled residuals."""

from __future__ import annotations

import re

import pytest
import torch

import condfx
from condfx.patterns import find_regions

from . import _forms as F


def _capture(model: torch.nn.Module):
    return condfx.capture(model.eval(), (torch.randn(2, 12, F.DIM),))


def test_matches_offset_rmsnorm_whole() -> None:
    gm = _capture(F.OffsetRMSNorm())
    (norm,) = find_regions(gm).norms
    assert norm.weight_offset == 1.0 and norm.weight is not None
    # the region covers the scaling: its output feeds only the final cast
    assert norm.out.target is torch.ops.aten.mul.Tensor
    assert [u.target for u in norm.out.users] == [torch.ops.aten.type_as.default]


def test_matches_offset_norms_as_input_norms() -> None:
    regions = find_regions(_capture(F.Block()))
    (attn,), (ffn,) = regions.attention, regions.ffn
    assert attn.input_norm is not None and attn.input_norm.weight_offset == 1.0
    assert ffn.input_norm is not None and ffn.input_norm.weight_offset == 1.0
    assert attn.post_norm is None and attn.residual_scale is None


@pytest.mark.parametrize("scale", [None, 0.25])
def test_matches_sandwich_norm_residuals(scale: float | None) -> None:
    regions = find_regions(_capture(F.Block(sandwich=True, scale=scale)))
    (attn,), (ffn,) = regions.attention, regions.ffn
    assert attn.residual is not None and ffn.residual is not None
    assert attn.post_norm is not None and attn.post_norm.x_in is attn.out
    assert ffn.post_norm is not None and ffn.post_norm.x_in is ffn.out
    assert attn.residual_scale == scale and ffn.residual_scale == scale
    assert ffn.input_norm.x_in is attn.residual
    assert [r.post_norm for r in regions.residuals] == [attn.post_norm, ffn.post_norm]


def test_matches_scaled_residual_without_post_norm() -> None:
    regions = find_regions(_capture(F.Block(scale=0.5)))
    (attn,), (ffn,) = regions.attention, regions.ffn
    assert attn.residual_scale == 0.5 and ffn.residual_scale == 0.5 and attn.post_norm is None
    assert len(regions.residuals) == 2


def test_numerics_fuse_attention_exact_on_sandwich_block() -> None:
    model = F.Block(sandwich=True, scale=0.25).eval()
    gm = _capture(model)
    result = condfx.apply(gm, "fuse-attention")
    assert result.reports[0].rewritten == 1
    x = torch.randn(3, 17, F.DIM)
    with torch.no_grad():
        assert (model(x) - result.graph_module(x)).abs().max().item() <= 1e-5


@pytest.mark.parametrize(
    ("form", "kind", "activation"),
    [("swiglu", "swiglu", "silu"), ("fused", "swiglu", "silu"), ("relu", "mlp", "relu"),
     ("relu2", "mlp", "relu2"), ("silu", "mlp", "silu")],
)
def test_matches_ffn_forms(form: str, kind: str, activation: str) -> None:
    regions = find_regions(_capture(F.Block(mlp=form)))
    (ffn,) = regions.ffn
    assert (ffn.kind.value, ffn.activation) == (kind, activation)
    assert ffn.residual is not None and ffn.input_norm is not None and ffn.hidden_dim == 64
    if form == "fused":
        assert ffn.gate.node is ffn.up.node and (ffn.gate.out_slice, ffn.up.out_slice) == ((0, 64), (64, 128))


def test_matches_moe_block_with_shared_expert() -> None:
    regions = find_regions(_capture(F.Block(mlp="moe")))
    assert regions.ffn == [] and len(regions.attention) == 1
    (moe,) = regions.moe
    assert (moe.top_k, moe.num_experts, len(moe.experts)) == (2, 4, 4)
    assert moe.shared is not None and "shared" in moe.shared.module_path
    assert moe.input_norm is not None and moe.residual is not None and moe.router.out_features == 4
    assert regions.blocks[0].moe is moe and regions.blocks[0].ffn is None
    assert [f.reason for f in regions.failures if f.kind == "ffn"] == ["MoE FFN"]


def test_matches_moe_in_skip_ffn() -> None:
    """skip-ffn carries the hand-written MoE block (router, expert loop, shared expert) whole; with
    no row skipped it reproduces the block (passes/skip_ffn_branch.py)."""
    gm = _capture(F.Block(mlp="moe"))
    result = condfx.apply(gm, "skip-ffn{threshold=1.0,cold_start=0,cold_end=0}")
    assert result.reports[0].rewritten == 1
    x = torch.randn(2, 7, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (result.graph_module(x) - gm(x)).abs().max().item() <= 1e-5


# softcap, sinks and ALiBi are attention cores with score options now (issue 15; tests/patterns/
# test_attention_scores.py); their named near misses are kept for the forms the op cannot express.
@pytest.mark.parametrize(("variant", "reason"), [("mul_mask", r"^scores are multiplied by a mask")])
def test_rejects_attention_variants_with_named_reason(variant: str, reason: str) -> None:
    regions = find_regions(_capture(F.ScoresVariant(variant)))
    assert regions.attention == []
    failures = [f for f in regions.failures if f.kind == "attention"]
    assert len(failures) == 1 and re.match(reason, failures[0].reason), failures
