"""Normalisation regions: RMSNorm and LayerNorm, fused or spelled out.

Recognised forms (casts allowed anywhere on the x path, weight/bias multiplies in either order):
    x * rsqrt(mean(x², -1) + eps) * w                          RMSNorm
    x / sqrt(mean(x², -1) + eps) * w                           RMSNorm
    aten.layer_norm(x, [d], w, b, eps), aten.native_layer_norm LayerNorm
    (x - mean(x)) * rsqrt(var(x, -1) + eps) * w + b            LayerNorm (var or mean((x-mean)²))
"""

from __future__ import annotations

import operator

import torch
from torch import fx

from condfx.patterns import _graph as g
from condfx.patterns.regions import MatchFailure, NormKind, NormRegion

aten = torch.ops.aten

EPS_NOT_SCALAR = "eps is not a scalar"
NOT_LAST_DIM = "reduction is not over the last dim"
NO_NORMALISE_MUL = "rsqrt result does not scale its input"
LN_SHAPE = "layer_norm normalises more than the last dim"


def _fail(reason: str, node: fx.Node, detail: str = "") -> MatchFailure:
    return MatchFailure(reason, node, detail, "norm")


def _last_dim_only(node: fx.Node, dims) -> bool:
    rank = g.ndim(node.args[0])
    if rank is None:
        return False
    dims = [dims] if isinstance(dims, int) else list(dims or [])
    return len(dims) == 1 and dims[0] % rank == rank - 1


def _eps_of(add: fx.Node) -> tuple[fx.Node, float] | MatchFailure | None:
    """(reduction node, eps) for ``add(reduction, eps)`` in either order."""
    if not g.is_op(add, aten.add) or len(add.args) < 2:
        return None
    a, b = add.args[:2]
    red, eps = (a, b) if isinstance(a, fx.Node) else (b, a)
    if not isinstance(red, fx.Node):
        return None
    red = g.skip_identity(red)
    if not g.is_op(red, aten.mean, aten.var):
        return None
    if g.scalar(eps) is None:
        return _fail(EPS_NOT_SCALAR, add)
    return red, g.scalar(eps)


def _square_input(node: fx.Node) -> fx.Node | None:
    """x for pow(x, 2) or mul(x, x)."""
    node = g.skip_identity(node)
    if g.is_op(node, aten.pow) and node.args[1] == 2:
        return node.args[0]
    if g.is_op(node, aten.mul) and node.args[0] is node.args[1]:
        return node.args[0]
    return None


def _centered_source(node: fx.Node) -> fx.Node | None:
    """y for ``y - mean(y, -1)``, else None."""
    node = g.skip_identity(node)
    if not g.is_op(node, aten.sub) or not isinstance(node.args[1], fx.Node):
        return None
    mean = g.skip_identity(node.args[1])
    if g.is_op(mean, aten.mean) and g.skip_identity(mean.args[0]) is g.skip_identity(node.args[0]):
        return node.args[0]
    return None


def _normalised_user(anchor: fx.Node, operand: fx.Node) -> fx.Node | None:
    """The mul(operand, rsqrt) / div(operand, sqrt) that applies the normalisation."""
    base = g.skip_identity(operand)
    for user in anchor.users:
        if g.is_op(user, aten.mul) and anchor in user.args[:2]:
            other = user.args[1] if user.args[0] is anchor else user.args[0]
        elif g.is_op(user, aten.div) and user.args[1] is anchor:
            other = user.args[0]
        else:
            continue
        if isinstance(other, fx.Node) and (g.skip_identity(other) is base or _same_sub(g.skip_identity(other), base)):
            return user
    return None


def _same_sub(a: fx.Node, b: fx.Node) -> bool:
    """Whether ``a`` and ``b`` are two nodes computing the same ``x - mean`` (Cohere writes it twice)."""
    return g.is_op(a, aten.sub) and g.is_op(b, aten.sub) and [g.skip_identity(x) for x in a.args[:2]] == [
        g.skip_identity(x) for x in b.args[:2]] and a.kwargs == b.kwargs


def _offset_weight(node: object) -> tuple[fx.Node, float] | None:
    """(w, c) for a 1-D parameter ``w`` (through casts) or ``w + c`` / ``c + w`` with a scalar c."""
    w = g.as_get_attr(node)
    if w is not None:
        return (w, 0.0) if g.ndim(w) == 1 else None
    if not isinstance(node, fx.Node):
        return None
    node = g.skip_identity(node)
    if not g.is_op(node, aten.add) or len(node.args) != 2 or node.kwargs.get("alpha", 1) != 1:
        return None
    for a, c in (node.args, node.args[::-1]):
        w = g.as_get_attr(a)
        if w is not None and g.ndim(w) == 1 and g.scalar(c) is not None:
            return w, float(g.scalar(c))
    return None


def _affine(node: fx.Node, nodes: list[fx.Node], with_bias: bool):
    """Follow casts and the optional ``* w`` or ``* (c + w)`` (and ``+ b``) after the normalisation."""
    weight = bias = None
    offset = 0.0
    out = node
    base = g.forward_identity(node)
    user = g.single_user(base)
    if g.is_op(user, aten.mul) and len(user.args) == 2:
        pair = (user.args[1], user.args[0]) if g.skip_identity(user.args[0]) is g.skip_identity(base) else user.args
        found = _offset_weight(pair[0]) or _offset_weight(pair[1])
        if found is not None:
            (weight, offset), out = found, user
            nodes.append(user)
            user = g.single_user(g.forward_identity(out))
    if with_bias and g.is_op(user, aten.add) and len(user.args) == 2:
        b = next((g.as_get_attr(a) for a in user.args if g.as_get_attr(a) is not None), None)
        if b is not None and g.ndim(b) == 1:
            bias, out = b, user
            nodes.append(user)
    return out, weight, bias, offset


def match_norm_at_rsqrt(anchor: fx.Node) -> NormRegion | MatchFailure | None:
    """Matches an explicit RMSNorm / LayerNorm around an ``rsqrt`` (or ``sqrt`` + div) node."""
    found = _eps_of(g.skip_identity(anchor.args[0]))
    if found is None or isinstance(found, MatchFailure):
        return found
    red, eps = found
    dims = g.arg(red, 1, "dim", None)
    if not _last_dim_only(red, dims):
        return _fail(NOT_LAST_DIM, red)
    if g.is_op(red, aten.var):
        x_in, operand = red.args[0], None
    else:
        sq = _square_input(red.args[0])
        if sq is None:
            return None
        centered = _centered_source(sq)
        x_in, operand = (centered, sq) if centered is not None else (sq, sq)
    if operand is None:  # var form: the normalised operand is x - mean(x)
        operand = next((u for u in g.skip_identity(x_in).users if _centered_source(u) is not None), None)
        if operand is None:
            return None
    kind = NormKind.LAYERNORM if operand is not x_in else NormKind.RMSNORM
    user = _normalised_user(anchor, operand)
    if user is None:
        return _fail(NO_NORMALISE_MUL, anchor)
    nodes = [red.args[0], red, anchor.args[0], anchor, user]
    out, weight, bias, offset = _affine(user, nodes, kind is NormKind.LAYERNORM)
    x_in = g.skip_identity(x_in)
    return NormRegion(kind, x_in, out, weight, bias, eps, tuple(nodes), g.module_path(anchor), offset)


def match_layer_norm(node: fx.Node) -> NormRegion | MatchFailure | None:
    """Matches ``aten.layer_norm`` / ``aten.native_layer_norm`` over the last dim."""
    x, normalized_shape = node.args[0], node.args[1]
    if len(normalized_shape) != 1:
        return _fail(LN_SHAPE, node)
    weight, offset = _offset_weight(g.arg(node, 2, "weight")) or (None, 0.0)  # (1 + w): Nemotron
    bias = g.as_get_attr(g.arg(node, 3, "bias"))
    eps = g.arg(node, 4, "eps", 1e-5)
    if g.scalar(eps) is None:
        return _fail(EPS_NOT_SCALAR, node)
    out = node
    if g.is_op(node, aten.native_layer_norm):
        out = next((u for u in node.users if u.target is operator.getitem and u.args[1] == 0), None)
        if out is None:
            return None
    return NormRegion(NormKind.LAYERNORM, g.skip_identity(x), out, weight, bias, float(eps), (node,),
                      g.module_path(node), offset)


def find_norms(gm: fx.GraphModule) -> tuple[list[NormRegion], list[MatchFailure]]:
    """All norm regions of ``gm`` in graph order, and the rejected candidates."""
    norms, failures = [], []
    for node in gm.graph.nodes:
        if g.is_op(node, aten.rsqrt, aten.sqrt):
            found = match_norm_at_rsqrt(node)
        elif g.is_op(node, aten.layer_norm, aten.native_layer_norm):
            found = match_layer_norm(node)
        else:
            continue
        if isinstance(found, NormRegion):
            norms.append(found)
        elif isinstance(found, MatchFailure):
            failures.append(found)
    return norms, failures


def find_norm_regions(gm: fx.GraphModule, failures: list[MatchFailure] | None = None) -> list[NormRegion]:
    """RMSNorm and LayerNorm regions of ``gm`` in graph order.

    Args:
        gm: a GraphModule from ``condfx.capture``.
        failures: when given, rejected candidates are appended to it.

    Returns:
        The norm regions, in graph order.
    """
    norms, failed = find_norms(gm)
    if failures is not None:
        failures.extend(failed)
    return norms


def norm_index(norms: list[NormRegion]) -> dict[fx.Node, NormRegion]:
    """Map from a norm's output node (and the casts right after it) to the region."""
    index = {}
    for norm in norms:
        index[norm.out] = norm
    return index


def norm_producing(index: dict[fx.Node, NormRegion], node: fx.Node | None) -> NormRegion | None:
    """The norm whose output ``node`` is (through casts), or None."""
    if node is None:
        return None
    return index.get(node) or index.get(g.skip_identity(node))
