"""Small graph helpers shared by the region finders.

Everything here is a local walk: no helper visits more than a handful of nodes, so the finders stay
linear in the size of the graph.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable

import torch
from torch import fx

aten = torch.ops.aten

# Ops that return their (single) tensor input unchanged in value: casts, copies, eval-mode dropout.
_CAST_PACKETS = {aten.to, aten._to_copy, aten.type_as, aten.contiguous, aten.clone, aten.alias, aten.detach,
                 aten.lift_fresh_copy}
# Ops that only rearrange elements of their first argument.
_VIEW_PACKETS = {aten.view, aten.reshape, aten._unsafe_view, aten.transpose, aten.permute, aten.t,
                 aten.unsqueeze, aten.squeeze, aten.flatten, aten.expand, aten.unflatten}
_LAYER_RE = re.compile(r"(?:^|\.)(?:layers|h|blocks|layer)\.(\d+)(?:\.|$)")
_FULL_END = 2**62


def packet(node: object):
    """The OpOverloadPacket of a call_function node (``aten.view`` for ``aten.view.default``), or None."""
    if not isinstance(node, fx.Node) or node.op != "call_function":
        return None
    return getattr(node.target, "overloadpacket", node.target)


def is_op(node: object, *packets) -> bool:
    """True when ``node`` calls one of ``packets`` (any overload)."""
    return packet(node) in packets


def arg(node: fx.Node, index: int, name: str, default=None):
    """Positional-or-keyword argument ``name`` at position ``index`` of ``node``."""
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def val(node: object):
    """The FakeTensor (or other value) in ``node.meta['val']``; None when absent."""
    return node.meta.get("val") if isinstance(node, fx.Node) else None


def shape(node: object) -> tuple | None:
    """The shape of ``node``'s value as a tuple (entries may be SymInts), or None."""
    v = val(node)
    return tuple(v.shape) if isinstance(v, torch.Tensor) else None


def static_int(x) -> int | None:
    """``x`` as a Python int when it is a concrete integer, else None."""
    if isinstance(x, int) and not isinstance(x, bool):
        return x
    if isinstance(x, torch.SymInt):
        try:
            return int(x.node.maybe_as_int()) if x.node.maybe_as_int() is not None else None
        except (AttributeError, TypeError):
            return None
    return None


def ndim(node: object) -> int | None:
    s = shape(node)
    return len(s) if s is not None else None


def is_full_slice(node: fx.Node) -> bool:
    """``x[:]`` along one dim (HF emits these in repeat_kv and in slicing of position ids)."""
    if not is_op(node, aten.slice) or arg(node, 4, "step", 1) != 1:
        return False
    start, end = arg(node, 2, "start", None), arg(node, 3, "end", None)
    return start in (None, 0) and (end is None or (isinstance(end, int) and end >= _FULL_END))


def is_identity(node: object) -> bool:
    """A node whose value equals its first input's value: casts, copies, full slices, eval dropout."""
    if not isinstance(node, fx.Node) or node.op != "call_function":
        return False
    p = packet(node)
    if p in _CAST_PACKETS:
        return isinstance(node.args[0], fx.Node)
    if p in (aten.dropout, aten.feature_dropout, aten.alpha_dropout):
        return arg(node, 1, "p", 0.0) == 0.0 or not arg(node, 2, "train", True)
    return is_full_slice(node)


def is_view(node: object) -> bool:
    """A node that only rearranges its first input's elements (view, reshape, transpose, ...)."""
    return packet(node) in _VIEW_PACKETS


def skip_identity(node: fx.Node) -> fx.Node:
    """Walk from ``node`` back through casts, copies and no-op dropout."""
    while is_identity(node):
        node = node.args[0]
    return node


def skip_views(node: fx.Node) -> fx.Node:
    """Walk back through identities and element-rearranging views."""
    while is_identity(node) or is_view(node):
        node = node.args[0]
    return node


def single_user(node: fx.Node) -> fx.Node | None:
    users = list(node.users)
    return users[0] if len(users) == 1 else None


def forward_identity(node: fx.Node) -> fx.Node:
    """Follow single-user identity chains forward from ``node``; returns the last identity (or node)."""
    while True:
        nxt = single_user(node)
        if nxt is None or not is_identity(nxt) or nxt.args[0] is not node:
            return node
        node = nxt


def scalar(x) -> float | None:
    """``x`` as a float when it is a Python number (not a tensor or node)."""
    if isinstance(x, bool):
        return None
    if isinstance(x, (int, float)):
        return float(x)
    return None


def get_attr_value(gm: fx.GraphModule, node: fx.Node):
    """The tensor a get_attr node refers to, or None when ``node`` is not a resolvable get_attr."""
    if not isinstance(node, fx.Node) or node.op != "get_attr":
        return None
    obj = gm
    for part in str(node.target).split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def as_get_attr(node: object) -> fx.Node | None:
    """The get_attr node behind ``node`` (through casts), or None."""
    if not isinstance(node, fx.Node):
        return None
    node = skip_identity(node)
    return node if node.op == "get_attr" else None


def module_path(node: fx.Node) -> str:
    """Innermost module path recorded in ``nn_module_stack`` ("" when absent)."""
    stack = node.meta.get("nn_module_stack") or {}
    paths = [v[0] for v in stack.values() if isinstance(v, tuple) and isinstance(v[0], str)]
    paths = [p for p in paths if not p.startswith("_empty")]
    return paths[-1] if paths else ""


def module_paths(node: fx.Node) -> list[str]:
    """All module paths recorded in ``nn_module_stack``, outermost first."""
    stack = node.meta.get("nn_module_stack") or {}
    return [v[0] for v in stack.values() if isinstance(v, tuple) and isinstance(v[0], str)]


def layer_from_path(path: str) -> int | None:
    """The block number in a module path such as ``model.layers.3.self_attn`` (or ``.h.3.``)."""
    found = _LAYER_RE.findall(path)
    return int(found[-1]) if found else None


def enclosing_path(node: fx.Node, depth_from: str) -> str:
    """Longest module path of ``node`` that is a prefix of ``depth_from`` (common ancestor)."""
    best = ""
    for p in module_paths(node):
        if depth_from == p or depth_from.startswith(p + "."):
            best = p if len(p) > len(best) else best
    return best


def common_path(paths: Iterable[str]) -> str:
    """Longest common dotted prefix of ``paths``."""
    parts = None
    for p in paths:
        if not p:
            continue
        ps = p.split(".")
        if parts is None:
            parts = ps
            continue
        n = 0
        while n < min(len(parts), len(ps)) and parts[n] == ps[n]:
            n += 1
        parts = parts[:n]
    return ".".join(parts or [])


def close(a: float, b: float, rel: float = 1e-3) -> bool:
    return math.isclose(a, b, rel_tol=rel, abs_tol=1e-12)


def node_order(gm: fx.GraphModule) -> dict[fx.Node, int]:
    """Position of every node in graph order (computed once per finder call)."""
    return {n: i for i, n in enumerate(gm.graph.nodes)}


# ---------------------------------------------------------------------------------------------
# Projections: y = x @ W.T + b however it was written (linear, addmm, mm/matmul with a weight).

_MATMUL_PACKETS = {aten.mm, aten.matmul}


def _weight(node: object) -> tuple[fx.Node, bool] | None:
    """(get_attr, transposed) for a 2-D weight operand, seen through casts and one transpose."""
    if not isinstance(node, fx.Node):
        return None
    node = skip_identity(node)
    transposed = False
    if is_op(node, aten.t, aten.numpy_T, aten.mT) or (is_op(node, aten.transpose, aten.permute) and ndim(node) == 2):
        transposed, node = True, skip_identity(node.args[0])
    if node.op != "get_attr" or ndim(node) != 2:
        return None
    return node, transposed


def _bias_add(op: fx.Node, out_features: int) -> tuple[fx.Node, fx.Node] | None:
    """(add node, bias get_attr) when ``op``'s only user adds a 1-D parameter of width out."""
    user = single_user(op)
    if not is_op(user, aten.add) or len(user.args) < 2:
        return None
    other = user.args[1] if user.args[0] is op else user.args[0]
    bias = as_get_attr(other)
    if bias is None or shape(bias) != (out_features,):
        return None
    return user, bias


def _unflatten_user(node: fx.Node) -> fx.Node:
    """The view/reshape that restores (B, T, out) after a 2-D matmul, or ``node`` itself."""
    user = single_user(node)
    if is_op(user, aten.view, aten.reshape, aten._unsafe_view) and user.args[0] is node:
        return user
    return node


def _flatten_source(node: fx.Node) -> fx.Node:
    """The (B, T, in) tensor behind a flattening view feeding a 2-D matmul."""
    while is_op(node, aten.view, aten.reshape, aten._unsafe_view) or is_identity(node):
        node = node.args[0]
    return node


def linear_at(node: object):
    """A LinearRef when ``node`` is the matmul of a projection (linear / addmm / mm / matmul).

    Returns:
        LinearRef whose ``node`` is the projection output in the caller's layout (after the bias
        add and the view back to (B, T, out) for the 2-D forms), or None.
    """
    from condfx.patterns.regions import LinearRef

    if is_op(node, aten.linear):
        w = _weight(node.args[1])
        if w is None or w[1]:
            return None
        bias = as_get_attr(arg(node, 2, "bias"))
        out_f, in_f = (static_int(d) for d in shape(w[0]))
        return LinearRef(node, w[0], bias, in_f, out_f, "out_in", None, x_in=node.args[0], op_node=node)
    if is_op(node, aten.addmm):
        w = _weight(node.args[2])
        bias = as_get_attr(node.args[0])
    elif is_op(node, *_MATMUL_PACKETS):
        w = _weight(node.args[1])
        bias = None
    else:
        return None
    if w is None:
        return None
    weight, transposed = w
    rows, cols = (static_int(d) for d in shape(weight))
    in_f, out_f = (cols, rows) if transposed else (rows, cols)
    layout = "out_in" if transposed else "in_out"
    x = node.args[1] if is_op(node, aten.addmm) else node.args[0]
    out = node
    if bias is None:
        found = _bias_add(node, out_f)
        if found is not None:
            out, bias = found
    out = _unflatten_user(out)
    return LinearRef(out, weight, bias, in_f, out_f, layout, None, x_in=_flatten_source(x), op_node=node)


def _split_slice(node: fx.Node) -> tuple[fx.Node, tuple[int, int]] | None:
    """(split input, [start, stop)) for ``getitem(split(x, size, -1), i)`` (or chunk) or a last-dim slice."""
    import operator

    if node.op == "call_function" and node.target is operator.getitem:
        split, index = node.args
        if not is_op(split, aten.split, aten.split_with_sizes, aten.chunk) or not isinstance(index, int):
            return None
        rank = ndim(split.args[0])
        dim = arg(split, 2, "dim", 0)
        if rank is None or dim % rank != rank - 1:
            return None
        sizes = split.args[1]
        if is_op(split, aten.chunk):  # chunk(x, n): pieces of ceil(width / n)
            width = static_int(shape(split.args[0])[-1])
            if width is None:
                return None
            sizes = -(-width // sizes)
        if isinstance(sizes, int):
            return split.args[0], (index * sizes, (index + 1) * sizes)
        start = sum(sizes[:index])
        return split.args[0], (start, start + sizes[index])
    if is_op(node, aten.slice) and arg(node, 4, "step", 1) == 1:
        rank, dim = ndim(node.args[0]), arg(node, 1, "dim", 0)
        start, end = arg(node, 2, "start", 0) or 0, arg(node, 3, "end", None)
        width = static_int(shape(node.args[0])[-1]) if rank else None
        if rank is None or dim % rank != rank - 1 or width is None or not isinstance(start, int):
            return None
        if end is not None and not isinstance(end, int):  # a symbolic end (Mamba's conv padding cut)
            return None
        end = width if end is None or end > width else end
        return node.args[0], (start, end)
    return None


def trace_linear(node: fx.Node, max_steps: int = 12):
    """The projection whose output ``node`` is, seen through views, casts and a last-dim split.

    Returns:
        LinearRef (with ``out_slice`` set for a fused projection such as GPT-2's c_attn), or None.
    """
    from dataclasses import replace

    out_slice = None
    for _ in range(max_steps):
        if out_slice is None and (found := _split_slice(node)) is not None:
            node, out_slice = found
            continue
        if is_identity(node) or is_op(node, aten.view, aten.reshape, aten._unsafe_view):
            node = node.args[0]
            continue
        if is_op(node, aten.add):
            # A separate bias add (mm + add): the projection is behind the tensor operand.
            inner = next((a for a in node.args[:2] if isinstance(a, fx.Node) and a.op != "get_attr"), None)
            ref = linear_at(inner) if inner is not None else None
            if ref is not None and ref.bias is not None:
                return replace(ref, out_slice=out_slice)
            return None
        ref = linear_at(node)
        return replace(ref, out_slice=out_slice) if ref is not None else None
    return None
