"""A representative slice of ``benchmarks/conformance.py`` in CI: transformers classes built small
(2 layers, hidden 64, random weights) in the forms of issue 15, regions found in every layer and
fuse-attention exact. The full table is ``python benchmarks/conformance.py``."""

from __future__ import annotations

import warnings

import pytest
import torch

import condfx
from benchmarks.conformance import N_LAYERS, Row, build_small, measure
from condfx.patterns import find_regions

# model type -> attention implementation; the form each one covers is in the comment.
CASES = {
    "gemma3_text": "sdpa",  # offset RMSNorm (1 + w), sandwich norms, QK-norm
    "granite": "sdpa",  # residual_multiplier: x + out * s
    "phi3": "sdpa",  # fused gate_up split with chunk
    "nemotron": "sdpa",  # relu² MLP, LayerNorm1P
    "qwen2_moe": "sdpa",  # MoE with a shared expert
    "xglm": "eager",  # eager attention through (B*H, T, S) views and a clamp
}


def _build(kind: str):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return build_small(kind, CASES[kind])


@pytest.mark.parametrize("kind", sorted(CASES))
def test_golden_conformance_rows(kind: str) -> None:
    row = measure(_build(kind), Row(kind, CASES[kind]), passes=False)
    assert row.capture == "ok"
    assert row.attention == f"ok {N_LAYERS}/{N_LAYERS}"
    assert row.ffn.startswith(f"ok {N_LAYERS}/{N_LAYERS}")
    assert row.fuse_attention.startswith("ok"), row.fuse_attention  # max logit diff <= 1e-5


def test_matches_gemma3_norms_and_residuals() -> None:
    gm = condfx.capture(_build("gemma3_text"), (torch.randint(0, 128, (2, 9)),))
    regions = find_regions(gm)
    for r in [*regions.attention, *regions.ffn]:
        assert r.residual is not None and r.post_norm is not None and r.post_norm.weight_offset == 1.0
        assert r.input_norm is not None and r.input_norm.weight_offset == 1.0
    assert all(r.q_norm is not None and r.k_norm is not None for r in regions.attention)


def test_matches_nemotron_partial_rope_and_layernorm1p() -> None:
    gm = condfx.capture(_build("nemotron"), (torch.randint(0, 128, (2, 9)),))
    regions = find_regions(gm)
    for r in regions.attention:
        assert r.q_proj is not None and r.k_proj is not None and r.v_proj is not None
        assert r.rope is not None and r.rope.rotary_dim is not None and r.rope.rotary_dim < r.head_dim
        assert r.input_norm is not None and r.input_norm.weight_offset == 1.0  # LayerNorm1P: (1 + w)
    assert {f.activation for f in regions.ffn} == {"relu2"}
