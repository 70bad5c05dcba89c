"""Mixture-of-experts FFN blocks, anchored on the router's top-k.

Recognised form (Mixtral, Qwen2/3-MoE, OLMoE, GraniteMoE, DeepSeek-V3 and hand-written loops):
    probs = softmax|sigmoid(router(x)); top-k(probs); experts(x, top-k) (+ shared_expert(x)) → y
    residual = stream + y
The router is a projection of the normalised input ``x`` whose scores (through casts, softmax or
sigmoid) feed ``aten.topk``. The block ends at the first add after the top-k that takes the residual
stream (the input norm's input) and a tensor of the same shape. Experts are either stacked 3-D
parameters read inside the block (transformers' grouped experts: ``expert_weights``) or per-expert
FFN regions found by ``ffn.py`` inside the block (``experts``); an FFN region inside the block whose
module path names a shared expert is ``shared``.
"""

from __future__ import annotations

import torch
from torch import fx

from condfx.patterns import _graph as g
from condfx.patterns.norm import norm_producing
from condfx.patterns.regions import FFNRegion, MatchFailure, MoERegion

aten = torch.ops.aten

NO_ROUTER = "top-k scores are not a projection"
NO_MOE_RESIDUAL = "no residual add after the routed experts"
NO_MOE_NORM = "router input is not a norm output"
MOE_FFN = "MoE FFN"  # recorded for passes that only handle dense FFNs

_SCORE_OPS = (aten.softmax, aten._softmax, aten.sigmoid)


def _fail(reason: str, node: fx.Node, detail: str = "") -> MatchFailure:
    return MatchFailure(reason, node, detail, "moe")


def _router(topk: fx.Node):
    """The router LinearRef behind the scores that ``topk`` selects from, or None."""
    node = g.skip_identity(topk.args[0])
    for _ in range(4):
        if g.is_op(node, *_SCORE_OPS):
            node = g.skip_identity(node.args[0])
            continue
        if g.is_op(node, aten.add) and any(g.as_get_attr(a) is not None for a in node.args[:2]):
            node = g.skip_identity(next(a for a in node.args[:2] if g.as_get_attr(a) is None))
            continue  # a score bias (DeepSeek-V3's e_score_correction_bias)
        break
    return g.trace_linear(node)


def _residual_add(stream: fx.Node, after: int, order: dict[fx.Node, int]) -> fx.Node | None:
    """The first ``add(stream, y)`` (either order, ``stream`` through casts, same shape) after
    position ``after``."""
    streams = [stream, *(u for u in stream.users if g.is_identity(u))]
    adds = [u for s in streams for u in s.users if g.is_op(u, aten.add) and order[u] > after and len(u.args) >= 2]
    adds = [u for u in adds if all(isinstance(a, fx.Node) for a in u.args[:2])]
    adds = [u for u in adds if g.shape(u.args[0]) == g.shape(u.args[1])]
    return min(adds, key=order.__getitem__) if adds else None


def match_moe(topk: fx.Node, norms, ffn: list[FFNRegion], order: dict[fx.Node, int]) -> MoERegion | MatchFailure:
    """Matches the MoE block whose routing is ``topk`` (see the module docstring)."""
    router = _router(topk)
    if router is None:
        return _fail(NO_ROUTER, topk)
    norm = norm_producing(norms, router.x_in) or norm_producing(norms, g.skip_views(router.x_in))
    if norm is None:
        return _fail(NO_MOE_NORM, router.op_node)
    stream = norm.x_in
    add = _residual_add(stream, order[topk], order)
    if add is None:
        return _fail(NO_MOE_RESIDUAL, topk)
    out = add.args[1] if g.skip_identity(add.args[0]) is stream else add.args[0]
    lo, hi = order[norm.out], order[add]
    inside = [r for r in ffn if lo < order[r.down.op_node] < hi]
    shared = next((r for r in inside if "shared" in r.module_path), None)
    experts = tuple(r for r in inside if r is not shared)
    weights = tuple(
        n for n in topk.graph.nodes
        if n.op == "get_attr" and g.ndim(n) == 3 and any(lo < order[u] < hi for u in n.users)
    )
    path = g.common_path([g.module_path(router.op_node), g.module_path(g.skip_views(out))])
    return MoERegion(
        layer=-1, module_path=path, x_in=router.x_in, router=router, top_k=int(topk.args[1]),
        num_experts=router.out_features, expert_weights=weights, experts=experts, shared=shared,
        out=out, residual=add, input_norm=norm,
    )


def find_moe(gm: fx.GraphModule, norms, ffn: list[FFNRegion], order: dict[fx.Node, int]):
    """(MoE regions, the FFN regions they do not contain, failures) for every top-k of ``gm``."""
    regions, failures = [], []
    for node in gm.graph.nodes:
        if not g.is_op(node, aten.topk):
            continue
        found = match_moe(node, norms, ffn, order)
        if isinstance(found, MatchFailure):
            failures.append(found)
            continue
        regions.append(found)
        failures.append(MatchFailure(MOE_FFN, found.router.op_node, "router + experts", "ffn"))
    inner = {id(r) for m in regions for r in (*m.experts, m.shared) if r is not None}
    return regions, [r for r in ffn if id(r) not in inner], failures
