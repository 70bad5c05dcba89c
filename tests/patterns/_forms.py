"""Hand-written decoder blocks in the forms of issue 15: offset norms, sandwich norms, scaled residuals,
fused gate_up, ReLU-family MLPs and MoE blocks. Each is tiny, seeded and runs on x (B, T, 32)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

DIM = 32


class OffsetRMSNorm(nn.Module):
    """Gemma-style RMSNorm: ``x * rsqrt(mean(x^2) + eps) * (1 + w)`` in float32."""

    def __init__(self, dim: int = DIM) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(dim) * 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)
        return (h * (1.0 + self.weight.float())).type_as(x)  # (B, T, C)


class Attention(nn.Module):
    """Causal SDPA with 4 heads over x (B, T, 32)."""

    def __init__(self, dim: int = DIM) -> None:
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim, bias=False) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = (p(x).view(b, t, 4, c // 4).transpose(1, 2) for p in (self.q, self.k, self.v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, H, T, D)
        return self.o(y.transpose(1, 2).reshape(b, t, c))  # (B, T, C)


class MLP(nn.Module):
    """An FFN in one of the forms: "swiglu", "fused" (Phi-3 gate_up split in halves), "relu",
    "relu2" (Nemotron / Persimmon squared ReLU), "silu" (ungated), "moe" (4 experts, top-2, shared)."""

    def __init__(self, form: str, dim: int = DIM, hidden: int = 64) -> None:
        super().__init__()
        self.form = form
        if form == "fused":
            self.gate_up = nn.Linear(dim, 2 * hidden, bias=False)
        elif form == "moe":
            self.router = nn.Linear(dim, 4, bias=False)
            self.experts = nn.ModuleList(MLP("swiglu", dim, hidden // 2) for _ in range(4))
            self.shared = MLP("swiglu", dim, hidden)
            return
        else:
            self.gate, self.up = nn.Linear(dim, hidden, bias=False), nn.Linear(dim, hidden, bias=False)
        self.down = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.form == "moe":
            return self._moe(x)
        if self.form == "fused":
            gate, up = self.gate_up(x).chunk(2, dim=-1)
            return self.down(F.silu(gate) * up)
        if self.form == "swiglu":
            return self.down(F.silu(self.gate(x)) * self.up(x))
        act = {"relu": torch.relu, "relu2": lambda h: torch.relu(h).square(), "silu": F.silu}[self.form]
        return self.down(act(self.up(x)))  # (B, T, C)

    def _moe(self, x: torch.Tensor) -> torch.Tensor:
        """Dense-evaluated top-2 routing (every expert runs; weights zero where not chosen)."""
        probs = self.router(x).softmax(-1)  # (B, T, E)
        top, idx = probs.topk(2, dim=-1)
        weights = torch.zeros_like(probs).scatter(-1, idx, top / top.sum(-1, keepdim=True))
        out = self.shared(x)
        for e, expert in enumerate(self.experts):
            out = out + expert(x) * weights[..., e : e + 1]
        return out  # (B, T, C)


class Block(nn.Module):
    """A decoder block: pre-norm attention and FFN, optional post (sandwich) norms and residual scale.

    Args:
        mlp: the MLP form (see ``MLP``).
        sandwich: norm the attention and FFN outputs before the residual add (Gemma2/3, Olmo2).
        scale: multiply the branch outputs by this before the add (Granite's residual_multiplier).
    """

    def __init__(self, mlp: str = "swiglu", sandwich: bool = False, scale: float | None = None) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.input_norm, self.ffn_norm = OffsetRMSNorm(), OffsetRMSNorm()
        self.post_attn = OffsetRMSNorm() if sandwich else nn.Identity()
        self.post_ffn = OffsetRMSNorm() if sandwich else nn.Identity()
        self.attn, self.mlp, self.scale = Attention(), MLP(mlp), scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.post_attn(self.attn(self.input_norm(x)))
        x = x + (h if self.scale is None else h * self.scale)
        h = self.post_ffn(self.mlp(self.ffn_norm(x)))
        return x + (h if self.scale is None else h * self.scale)  # (B, T, C)


class ScoresVariant(Attention):
    """Eager causal attention whose scores take a form the finder names but does not fuse:
    "softcap" (Gemma2), "sinks" (GPT-OSS), "alibi" (Bloom's baddbmm), "mul_mask" (OpenAI-GPT)."""

    def __init__(self, variant: str, dim: int = DIM) -> None:
        super().__init__(dim)
        torch.manual_seed(0)
        self.variant = variant
        self.sinks = nn.Parameter(torch.zeros(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = (p(x).view(b, t, 4, c // 4).transpose(1, 2) for p in (self.q, self.k, self.v))
        keep = torch.ones(t, t, dtype=torch.bool, device=x.device).tril()
        if self.variant == "alibi":
            bias = torch.arange(t, device=x.device, dtype=x.dtype).expand(b * 4, 1, t)  # (B*H, 1, T)
            s = torch.baddbmm(bias, q.reshape(b * 4, t, -1), k.reshape(b * 4, t, -1).transpose(1, 2))
            s = s.view(b, 4, t, t) * 0.5
        else:
            s = (q @ k.transpose(-2, -1)) * 0.5  # (B, H, T, T)
        if self.variant == "softcap":
            s = torch.tanh(s / 30.0) * 30.0
        if self.variant == "mul_mask":
            m = keep.to(s.dtype)
            s = s * m + (1.0 - m) * -10000.0
        else:
            s = s.masked_fill(~keep, float("-inf"))
        if self.variant == "sinks":
            s = torch.cat([s, self.sinks.reshape(1, -1, 1, 1).expand(b, -1, t, -1)], dim=-1)
            s = s - s.max(dim=-1, keepdim=True).values
            p = s.softmax(-1)[..., :-1]
        else:
            p = s.softmax(-1)
        return self.o((p @ v).transpose(1, 2).reshape(b, t, c))  # (B, T, C)
