"""Norm regions: RMSNorm and LayerNorm, fused and spelled out."""

from __future__ import annotations

import re

import pytest

from condfx.patterns import NormKind, find_norm_regions

from . import _models as M

# kind -> (norm kind, norms per layer, eps); Qwen3 adds q_norm and k_norm to every layer.
HF_EXPECTED = {"llama": (NormKind.RMSNORM, 2, 1e-6), "qwen2": (NormKind.RMSNORM, 2, 1e-6),
               "qwen3": (NormKind.RMSNORM, 4, 1e-6), "gpt2": (NormKind.LAYERNORM, 2, 1e-5)}
ZOO_EXPECTED = {"llama": (NormKind.RMSNORM, 2, 1e-5), "qwen2": (NormKind.RMSNORM, 2, 1e-5),
                "qwen3": (NormKind.RMSNORM, 4, 1e-5), "gpt2": (NormKind.LAYERNORM, 2, 1e-5)}


def _check(gm, expected) -> None:
    kind, per_layer, eps = expected
    norms = find_norm_regions(gm)
    assert len(norms) == per_layer * M.N_LAYERS + 1
    for norm in norms:
        assert norm.kind is kind and norm.eps == pytest.approx(eps)
        assert norm.weight is not None and (norm.bias is not None) == (kind is NormKind.LAYERNORM)


@pytest.mark.parametrize(("kind", "impl"), [(k, i) for k in M.HF_KINDS for i in ("sdpa", "eager")])
def test_matches_hf_norms(kind: str, impl: str) -> None:
    _check(M.capture_hf(kind, impl), HF_EXPECTED[kind])


@pytest.mark.parametrize("name", M.ZOO_NAMES)
def test_matches_zoo_norms(name: str) -> None:
    _check(M.capture_zoo(name), ZOO_EXPECTED[name.split("-")[0]])


def test_matches_explicit_rmsnorm_and_layernorm() -> None:
    rms, ln = find_norm_regions(M.capture_module(M.ExplicitNorms()))
    assert (rms.kind, rms.eps, rms.weight.target, rms.bias) == (NormKind.RMSNORM, 1e-5, "w1", None)
    assert (ln.kind, ln.eps, ln.weight.target, ln.bias.target) == (NormKind.LAYERNORM, 1e-6, "w2", "b2")
    assert ln.x_in is rms.out


def test_rejects_reduction_over_wrong_axis() -> None:
    failures = []
    assert find_norm_regions(M.capture_module(M.WrongAxisNorm()), failures) == []
    assert len(failures) == 1 and re.match(r"^reduction is not over the last dim$", failures[0].reason)
