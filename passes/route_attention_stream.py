"""Where ``route-attention`` attaches an L2A layer: the residual add of an attention region, the
residual stream x its q/k/v read, and whether the block is sequential or parallel.

These read the regions ``condfx.patterns.find_regions`` records and fill two gaps it leaves:
``x_in`` when the q/k/v projections were not resolved (a fused qkv split per head: GPT-NeoX; a
QK-norm over the whole projection: OLMo2), and the block input of a parallel block, whose attention
residual add takes the MLP output instead of the stream.
"""

from __future__ import annotations

import torch
from torch import fx

from condfx.patterns import _graph as g
from condfx.patterns.regions import AttentionRegion, ResidualAdd

aten = torch.ops.aten


def _linear_above(node: fx.Node, width) -> fx.Node | None:
    """The nearest ``aten.linear`` above ``node`` whose input is ``width``-shaped, or None."""
    seen, frontier = set(), [node]
    for _ in range(24):  # q/k/v sit a few views, norms and rotations below their projection
        nxt = []
        for n in frontier:
            if g.is_op(n, aten.linear) and g.shape(n.args[0]) == width:
                return n
            nxt += [i for i in n.all_input_nodes if i.op == "call_function" and i not in seen]
            seen.update(nxt)
        frontier = nxt
    return None


def qkv_input(region: AttentionRegion) -> fx.Node | None:
    """The tensor q, k and v are projected from: ``region.x_in``, else (projections the region
    finder did not resolve: a fused qkv split per head, a QK-norm over the whole projection) the one
    input of the linears nearest above q, k and v."""
    if region.x_in is not None:
        return region.x_in
    if region.out is None:
        return None
    lins = [_linear_above(t, g.shape(region.out)) for t in (region.q, region.k, region.v)]
    inputs = {g.skip_identity(lin.args[0]) for lin in lins if lin is not None}
    return inputs.pop() if None not in lins and len(inputs) == 1 else None


def attention_add(region: AttentionRegion, adds: list[ResidualAdd]) -> ResidualAdd | None:
    """The record of ``region``'s residual add whose branch is the attention output (a parallel
    block's add is recorded twice: once from the attention, once from the MLP)."""
    return next((a for a in adds if a.node is region.residual and region.out in _ancestors(a.branch)), None)


def _ancestors(node: fx.Node) -> set[fx.Node]:
    seen, stack = set(), [node]
    while stack:
        n = stack.pop()
        if n not in seen:
            seen.add(n)
            stack.extend(n.all_input_nodes)
    return seen


def block_stream(region: AttentionRegion, add: ResidualAdd) -> tuple[fx.Node, bool] | None:
    """(x, parallel): the residual stream x the attention reads (an ancestor of its q/k/v input), and
    whether the block is parallel (GPT-J, GPT-NeoX, Falcon: ``x + (attn + mlp)``, so the attention's
    residual add takes the MLP output, and x is added by the add after it). None when neither fits."""
    upstream = _ancestors(qkv_input(region))
    if add.stream in upstream:
        return add.stream, False
    user = g.single_user(g.forward_identity(add.node))
    if user is None or not g.is_op(user, aten.add) or len(user.args) < 2:
        return None
    others = [a for a in user.args[:2] if isinstance(a, fx.Node) and a is not g.forward_identity(add.node)]
    if len(others) != 1 or others[0] not in upstream or g.shape(others[0]) != g.shape(add.node):
        return None
    return others[0], True
