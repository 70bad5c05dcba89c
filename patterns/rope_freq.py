"""RoPE frequencies of an attention region, read by evaluating its cos/sin tables.

A rewrite that moves RoPE to other positions (IHA's virtual positions) needs the frequencies, not the
graph's (T, D) tables. They are recovered by evaluating the cos and sin nodes of the region at a probe
length (they depend on positions only, never on token values) and checking that
``cos[t] = cos(t * f)``, ``sin[t] = sin(t * f)`` for every probed t, half-split layout
(``cat(f, f)`` over D). When a 1-D tensor of the graph equals the recovered f to float precision
(the model's ``inv_freq`` buffer) it is returned instead, so the result is bit-exact.
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


def _table(gm: fx.GraphModule, node: fx.Node, order, d: int) -> torch.Tensor | str:
    """The (T, D) values of a cos or sin node at probe length T, or an error text."""
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
    return value.reshape(_PROBE_T, d).double()


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
    cos, sin = _table(gm, rope.cos, order, head_dim), _table(gm, rope.sin, order, head_dim)
    for value in (cos, sin):
        if isinstance(value, str):
            return _fail(NOT_EVALUABLE, rope.cos, value)
    half = head_dim // 2
    freq = torch.atan2(sin[1, :half], cos[1, :half])  # angle at position 1
    t = torch.arange(_PROBE_T, dtype=torch.float64).unsqueeze(1)
    angles = torch.cat([t * freq, t * freq], dim=1)
    err = max((cos - angles.cos()).abs().max().item(), (sin - angles.sin()).abs().max().item())
    if err > 1e-4:
        return _fail(NOT_TABLE, rope.cos, f"max deviation {err:.2e}")
    for n in _ancestors(rope.cos, order):
        value = g.get_attr_value(gm, n) if n.op == "get_attr" else None
        if isinstance(value, torch.Tensor) and value.numel() == half and value.is_floating_point():
            if torch.allclose(value.double().reshape(-1), freq, atol=1e-6, rtol=1e-5):
                return value.detach().reshape(-1).to(torch.float32).clone()
    return freq.to(torch.float32)
