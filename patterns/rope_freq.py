"""RoPE frequencies of an attention region, read by evaluating its cos/sin tables.

A rewrite that moves RoPE to other positions (IHA's virtual positions) needs the frequencies, not the
graph's (T, D) tables. They are recovered by evaluating the cos and sin nodes of the region at a probe
length (they depend on positions only, never on token values) and checking that
``cos[t] = cos(t * f)``, ``sin[t] = sin(t * f)`` for every probed t, half-split layout
(``cat(f, f)`` over D), to 1e-4 or the tables' dtype precision (float16 / bfloat16 models). A 1-D
tensor of the graph that fits (the model's ``inv_freq`` buffer) is preferred, so the result is
bit-exact; else f is the angle at position 1.
"""

from __future__ import annotations

import torch
from torch import fx

from condfx.patterns import _graph as g
from condfx.patterns.mask import _extract, _probe_input
from condfx.patterns.regions import MatchFailure, RoPERef, RoPEStyle

NOT_HALF = "RoPE is not half-split"
NOT_EVALUABLE = "RoPE cos/sin could not be evaluated"
NOT_TABLE = "RoPE cos/sin are not cos/sin(position * inv_freq)"
_PROBE_T = 7


def _fail(reason: str, node: fx.Node | None, detail: str = "") -> MatchFailure:
    return MatchFailure(reason, node, detail, "rope")


def _ancestors(node: fx.Node, order: dict[fx.Node, int]) -> list[fx.Node]:
    seen, stack = {node}, [node]
    while stack:
        for inp in stack.pop().all_input_nodes:
            if inp not in seen:
                seen.add(inp)
                stack.append(inp)
    return sorted(seen, key=order.__getitem__)


def _table(gm: fx.GraphModule, node: fx.Node, order, d: int) -> tuple[torch.Tensor, torch.dtype] | str:
    """(the (T, D) float64 values of a cos or sin node at probe length T, their dtype), or an error text."""
    nodes = _ancestors(node, order)
    if any(n.op == "get_attr" and isinstance(g.get_attr_value(gm, n), torch.nn.Parameter) for n in nodes):
        return "depends on a parameter"
    sub = _extract(gm, nodes, node)
    try:
        with torch.no_grad():
            value = sub(*[_probe_input(p, 1, _PROBE_T) for p in nodes if p.op == "placeholder"])
    except Exception as exc:  # arbitrary user code: any failure means "not evaluable"
        return f"{type(exc).__name__}: {exc}"[:200]
    if not isinstance(value, torch.Tensor) or value.numel() != _PROBE_T * d or value.shape[-1] != d:
        return f"shape {tuple(getattr(value, 'shape', ()))} is not (T={_PROBE_T}, D={d}) up to size-1 dims"
    return value.reshape(_PROBE_T, d).double(), value.dtype


def _deviation(cos: torch.Tensor, sin: torch.Tensor, freq: torch.Tensor) -> float:
    t = torch.arange(_PROBE_T, dtype=torch.float64).unsqueeze(1)
    angles = torch.cat([t * freq, t * freq], dim=1)
    return max((cos - angles.cos()).abs().max().item(), (sin - angles.sin()).abs().max().item())


def rope_inv_freq(gm: fx.GraphModule, rope: RoPERef, head_dim: int) -> torch.Tensor | MatchFailure:
    """The (D/2,) float32 frequencies of ``rope``, or why they cannot be read.

    Args:
        gm: the graph holding the region.
        rope: the region's RoPE reference (cos and sin nodes).
        head_dim: D.

    Returns:
        inv_freq (D/2,) float32, or a MatchFailure (not half-split, not evaluable, not a pure table).
    """
    if rope.style is not RoPEStyle.HALF or rope.cos is None or rope.sin is None:
        return _fail(NOT_HALF, rope.cos)
    order = g.node_order(gm)
    tables = _table(gm, rope.cos, order, head_dim), _table(gm, rope.sin, order, head_dim)
    for value in tables:
        if isinstance(value, str):
            return _fail(NOT_EVALUABLE, rope.cos, value)
    (cos, dtype), (sin, _) = tables
    tol = max(1e-4, torch.finfo(dtype).eps if dtype.is_floating_point else 0.0)
    half = head_dim // 2
    candidates = [value.detach().reshape(-1).double() for n in _ancestors(rope.cos, order)
                  if isinstance(value := g.get_attr_value(gm, n) if n.op == "get_attr" else None, torch.Tensor)
                  and value.numel() == half and value.is_floating_point()]
    candidates.append(torch.atan2(sin[1, :half], cos[1, :half]))  # the angle at position 1
    errors = [_deviation(cos, sin, freq) for freq in candidates]
    for freq, err in zip(candidates, errors, strict=True):
        if err <= tol:
            return freq.to(torch.float32).clone()
    return _fail(NOT_TABLE, rope.cos, f"max deviation {min(errors):.2e}")
