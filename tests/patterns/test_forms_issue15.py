"""Forms the region finders learned for the conformance table (issue 15): activations written out
elementwise (xIELU, Bloom's GELU), ``x @ W.numpy_T`` projections (Falcon), a LayerNorm that writes
``x - mean`` twice (Cohere), and each one's near miss."""

from __future__ import annotations

import torch
from torch import nn

from condfx.patterns import FFNKind, find_ffn_regions, find_norm_regions, find_regions

from . import _models as M


class XIELUMLP(nn.Module):
    """down(xielu(up x)): two branches on the sign of x, 1-element learned parameters."""

    def __init__(self, dim: int = 32, numpy_t: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.norm, self.up, self.down = nn.LayerNorm(dim), nn.Linear(dim, 64), nn.Linear(64, dim)
        self.alpha_p, self.alpha_n = nn.Parameter(torch.tensor([0.8])), nn.Parameter(torch.tensor([0.8]))
        self.numpy_t = numpy_t

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        u = h @ self.up.weight.T if self.numpy_t else self.up(h)  # (B, T, 64): Falcon spells x @ W.T
        a_p, a_n = nn.functional.softplus(self.alpha_p), 0.5 + nn.functional.softplus(self.alpha_n)
        act = torch.where(u > 0, a_p * u * u + 0.5 * u, (torch.expm1(torch.clamp(u, max=-1e-6)) - u) * a_n + 0.5 * u)
        return x + self.down(act)  # (B, T, C)


class ScaledOnly(nn.Module):
    """down(0.5 * up x + 1): no nonlinearity, so no FFN."""

    def __init__(self, dim: int = 32) -> None:
        super().__init__()
        self.up, self.down = nn.Linear(dim, 64), nn.Linear(64, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(0.5 * self.up(x) + 1.0)


class CohereNorm(nn.Module):
    """LayerNorm without bias computing ``x - mean`` once for the variance and once to normalise."""

    def __init__(self, dim: int = 32) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean(-1, keepdim=True)
        var = (x - mean).pow(2).mean(-1, keepdim=True)
        return self.weight * ((x - mean) * torch.rsqrt(var + 1e-5))


def test_elementwise_activation_is_an_mlp_region() -> None:
    failures = []
    (region,) = find_ffn_regions(M.capture_module(XIELUMLP()), failures)
    assert (region.kind, region.activation, region.hidden_dim) == (FFNKind.MLP, "elementwise", 64)
    assert region.input_norm is not None and failures == []


def test_numpy_t_projection_is_a_linear() -> None:
    (region,) = find_ffn_regions(M.capture_module(XIELUMLP(numpy_t=True)))
    assert region.up.weight_layout == "out_in" and region.up.weight.op == "get_attr"


def test_scale_without_nonlinearity_is_no_ffn() -> None:
    assert find_regions(M.capture_module(ScaledOnly())).ffn == []


def test_layernorm_with_two_centerings() -> None:
    failures = []
    (norm,) = find_norm_regions(M.capture_module(CohereNorm()), failures)
    assert norm.kind.value == "layernorm" and norm.weight is not None and failures == []
