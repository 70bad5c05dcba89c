"""FFN regions: SwiGLU (Llama/Qwen) and GELU MLP (GPT-2 Conv1D and gelu_new formula)."""

from __future__ import annotations

import re

import pytest
import torch

from condfx.patterns import FFNKind, find_ffn_regions, find_regions

from . import _models as M

# kind -> (FFN kind, dim, hidden_dim)
HF_EXPECTED = {"llama": (FFNKind.SWIGLU, 64, 128), "qwen2": (FFNKind.SWIGLU, 64, 128),
               "qwen3": (FFNKind.SWIGLU, 64, 128), "gpt2": (FFNKind.GELU_MLP, 64, 256)}
ZOO_EXPECTED = {"llama": (FFNKind.SWIGLU, 64, 172), "qwen2": (FFNKind.SWIGLU, 64, 172),
                "qwen3": (FFNKind.SWIGLU, 64, 172), "gpt2": (FFNKind.GELU_MLP, 64, 256)}


def _check(gm, expected) -> None:
    regions = find_regions(gm)
    kind, dim, hidden = expected
    assert len(regions.ffn) == M.N_LAYERS
    assert not [f for f in regions.failures if f.kind == "ffn"]
    for i, region in enumerate(regions.ffn):
        assert region.layer == i and region.kind is kind
        assert (region.dim, region.hidden_dim) == (dim, hidden)
        assert (region.gate is not None) == (kind is FFNKind.SWIGLU)
        assert region.input_norm is not None and region.residual is not None
        assert region.x_in is region.up.x_in and region.out is region.down.node


@pytest.mark.parametrize(("kind", "impl"), [(k, i) for k in M.HF_KINDS for i in ("sdpa", "eager")])
def test_matches_hf_ffn(kind: str, impl: str) -> None:
    _check(M.capture_hf(kind, impl), HF_EXPECTED[kind])


@pytest.mark.parametrize("name", M.ZOO_NAMES)
def test_matches_zoo_ffn(name: str) -> None:
    _check(M.capture_zoo(name), ZOO_EXPECTED[name.split("-")[0]])


def test_matches_gpt2_gelu_new_formula_and_conv1d() -> None:
    region = find_ffn_regions(M.capture_hf("gpt2", "eager"))[0]
    assert region.act.target.__name__.startswith("mul")  # the explicit tanh formula, not aten.gelu
    assert region.up.weight_layout == "in_out" and region.down.bias is not None


def test_matches_relu_mlp() -> None:
    # issue 15: a ReLU MLP (OPT) is an FFN region of kind MLP; it was rejected before.
    failures = []
    (region,) = find_ffn_regions(M.capture_module(M.NoAttention()), failures)
    assert (region.kind.value, region.activation) == ("mlp", "relu") and failures == []


def test_rejects_gated_relu_mlp() -> None:
    failures = []
    assert find_ffn_regions(M.capture_module(GatedReLU()), failures) == []
    assert len(failures) == 1 and re.match(r"^activation is not gelu", failures[0].reason)


class GatedReLU(torch.nn.Module):
    """down(relu(gate x) * up x): a gated activation other than silu / gelu."""

    def __init__(self, dim: int = 32) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.gate, self.up, self.down = (torch.nn.Linear(*s) for s in ((dim, 64), (dim, 64), (64, dim)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(torch.relu(self.gate(x)) * self.up(x))  # (B, T, C)
