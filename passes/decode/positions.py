"""Which values of a graph depend on the sequence length, and how ``add-kv-cache`` offsets each.

A decode call sees T new tokens after P cached ones, so every value computed from the tokens'
*positions* must see P + t where the prefill graph saw t. ``position_roots`` finds the sources: the
tensors whose shape depends on T but whose values do not depend on the tokens, taken at their roots.
``plan_positions`` then says what each root is:

    arange(T) reaching RoPE cos/sin, an embedding's indices or an index into a weight table
        → a position: offset to arange(P, P + T) (Llama, GPT-2, GPT-J, CodeGen, ...)
    a constant fill (ones, zeros, full) of shape (..., T, ...)
        → not a position (its values are the same at every position), left alone; a cumsum of a
          ``ones`` fill along T is a position (OPT's ``attention_mask.cumsum(1)``): offset by P
    an arange whose length is not T alone (e.g. B·T·k in an MoE dispatch)
        → an enumeration of the call's rows, not a position, left alone when it reaches no
          position use
    anything else (a RoPE table sliced to T, an arange(T) feeding neither)
        → refused in one sentence naming the node

Does not handle: position ids passed as graph inputs, cumsums of anything but a ``ones`` fill.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
from torch import fx

from condfx.passes.base import PassError

__all__ = ["PositionPlan", "find_position_aranges", "offset_positions", "plan_positions", "position_roots",
           "reaches_position_use"]

aten = torch.ops.aten
_ARANGES = (aten.arange.default, aten.arange.start)
_FILLS = (aten.ones.default, aten.zeros.default, aten.full.default, aten.new_ones.default,
          aten.new_zeros.default, aten.new_full.default, aten.ones_like.default,
          aten.zeros_like.default, aten.full_like.default)
_ONES = (aten.ones.default, aten.new_ones.default, aten.ones_like.default)
_CASTS = (aten.to.dtype, aten._to_copy.default, aten.to.dtype_layout)
_ROPE_TRIG = (aten.cos.default, aten.sin.default)
_SEARCH_DEPTH = 12  # nodes walked from an arange to its cos/sin or embedding user


@dataclass(frozen=True)
class PositionPlan:
    """What ``add-kv-cache`` does with the graph's position sources.

    Attributes:
        aranges: ``arange(T)`` nodes to replace by ``arange(P, P + T)``.
        cumsums: cumsum-of-ones nodes to add P to.
        left: ``(node name, why)`` of sources left alone (not positions).
    """

    aranges: tuple[fx.Node, ...] = ()
    cumsums: tuple[fx.Node, ...] = ()
    left: tuple[tuple[str, str], ...] = ()

    @property
    def offset(self) -> tuple[str, ...]:
        """Names of the nodes offset by P, in graph order of kind (aranges, then cumsums)."""
        return tuple(n.name for n in (*self.aranges, *self.cumsums))


def _is_position_use(user: fx.Node, n: fx.Node) -> bool:
    if user.op != "call_function":
        return False
    if user.target in _ROPE_TRIG:
        return True
    if user.target is aten.embedding.default and user.args[1] is n:
        return True
    if user.target is aten.index.Tensor and isinstance(user.args[0], fx.Node):
        return user.args[0].op == "get_attr" and n in user.args[1]
    return False


def reaches_position_use(node: fx.Node) -> bool:
    """True when ``node`` flows (within a few ops) into RoPE cos/sin or a position table lookup."""
    frontier, seen = [node], {node}
    for _ in range(_SEARCH_DEPTH):
        nxt = []
        for n in frontier:
            for user in n.users:
                if _is_position_use(user, n):
                    return True
                if user not in seen:
                    seen.add(user)
                    nxt.append(user)
        frontier = nxt
    return False


def _seq_symbols(ids: fx.Node) -> set:
    return set(ids.meta["val"].shape[1].node.expr.free_symbols)


def _symbols(value) -> set:
    if isinstance(value, (list, tuple)):
        return set().union(*(_symbols(v) for v in value)) if value else set()
    if not isinstance(value, torch.Tensor):
        return set()
    return {s for d in value.shape if isinstance(d, torch.SymInt) for s in d.node.expr.free_symbols}


def _is_local_arange(node: fx.Node, ids: fx.Node) -> bool:
    """An ``arange(T)`` (or ``arange(0, T)``), T the input's sequence length."""
    if node.op != "call_function" or node.target not in _ARANGES:
        return False
    val = node.meta.get("val")
    starts_at_zero = node.target is _ARANGES[0] or node.args[0] == 0
    if val is None or val.dim() != 1 or not starts_at_zero or len(node.args) > 2:
        return False
    return str(val.shape[0]) == str(ids.meta["val"].shape[1])


def find_position_aranges(gm: fx.GraphModule, ids: fx.Node) -> list[fx.Node]:
    """The ``arange(T)`` nodes, T = ``input_ids.shape[1]``, that feed RoPE or position tables."""
    return [n for n in gm.graph.nodes if _is_local_arange(n, ids) and reaches_position_use(n)]


def _positional(gm: fx.GraphModule, ids: fx.Node) -> tuple[list[fx.Node], list[fx.Node]]:
    """(every node whose shape depends on T but whose values do not depend on the tokens, roots)."""
    seq = _symbols(ids.meta["val"]) & _seq_symbols(ids)
    tokens, positional, roots = {ids}, [], []
    seen: set[fx.Node] = set()
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        # shapes (SymInts from sym_size) carry T, not token values
        inputs = [a for a in node.all_input_nodes if not isinstance(a.meta.get("val"), torch.SymInt)]
        if any(a in tokens for a in inputs):
            tokens.add(node)
        elif seq & _symbols(node.meta.get("val")):
            positional.append(node)
            seen.add(node)
            if not any(a in seen for a in inputs):
                roots.append(node)
    return positional, roots


def position_roots(gm: fx.GraphModule, ids: fx.Node) -> list[fx.Node]:
    """Tensors whose shape depends on T but whose values do not depend on the tokens.

    These are the position sources of the graph (``arange(T)``, a RoPE table sliced to T, ...),
    taken at their roots: nodes none of whose inputs is already such a tensor.
    """
    return _positional(gm, ids)[1]


def _ones_cumsums(fill: fx.Node) -> list[fx.Node]:
    """cumsum nodes over the last dim or dim 1 of a ``ones`` fill (through dtype casts)."""
    found, frontier = [], [fill]
    while frontier:
        n = frontier.pop()
        for user in n.users:
            if user.op == "call_function" and user.target in _CASTS:
                frontier.append(user)
            elif user.op == "call_function" and user.target is aten.cumsum.default:
                found.append(user)
    return found


def _refuse(name: str, node: fx.Node, what: str) -> PassError:
    reason = (f"position-dependent value '{node.name}' is not an arange(T) feeding RoPE cos/sin or a "
              f"position table, a constant fill or a cumsum of ones ({what}), so the pass cannot "
              "offset it by the cache length")
    return PassError(name, reason, node=node)


def _classify(root: fx.Node, ids: fx.Node, name: str, plan: dict) -> None:
    """Files ``root`` under plan["aranges"], ["cumsums"] or ["left"]; PassError when unknown."""
    target = root.target if root.op == "call_function" else None
    if target in _ARANGES and _is_local_arange(root, ids):
        if not reaches_position_use(root):
            raise _refuse(name, root, "it is an arange(T) that feeds neither")
        plan["aranges"].append(root)
    elif target in _ARANGES:
        if reaches_position_use(root):
            raise _refuse(name, root, "it is an arange not of length T that feeds one")
        plan["left"].append((root.name, "enumerates the call's rows, not positions"))
    elif target in _FILLS:
        sums = _ones_cumsums(root) if target in _ONES else []
        plan["cumsums"] += [s for s in sums if s not in plan["cumsums"]]
        plan["left"].append((root.name, "a constant fill, the same at every position"))
    else:
        what = f"it is computed by {getattr(target, '__name__', target)}, e.g. a table sliced to T"
        raise _refuse(name, root, what)


def _check_cumsum(node: fx.Node, ids: fx.Node, name: str) -> None:
    """PassError unless the cumsum runs along the sequence dimension."""
    val = node.meta["val"]
    size = val.shape[node.args[1] % val.dim()]
    if not (isinstance(size, torch.SymInt) and size.node.expr.free_symbols & _seq_symbols(ids)):
        raise _refuse(name, node, "it is a cumsum of ones along a dimension other than the sequence")


def plan_positions(gm: fx.GraphModule, ids: fx.Node, name: str) -> PositionPlan:
    """Classifies every position source of ``gm`` (see the module docstring).

    Raises:
        PassError: a source that is none of the understood forms; one sentence naming the node.
    """
    plan: dict = {"aranges": [], "cumsums": [], "left": []}
    positional, roots = _positional(gm, ids)
    for root in roots:
        _classify(root, ids, name, plan)
    for node in plan["cumsums"]:
        _check_cumsum(node, ids, name)
    for node in positional:  # a running sum of anything else would count from 0 again at every step
        if node.target is aten.cumsum.default and node not in plan["cumsums"]:
            raise _refuse(name, node, "it is a cumsum of something other than a ones fill")
    return PositionPlan(tuple(plan["aranges"]), tuple(plan["cumsums"]), tuple(plan["left"]))


def offset_positions(graph: fx.Graph, plan: PositionPlan, ids: fx.Node, p: fx.Node) -> None:
    """arange(T) → arange(P, P + T); cumsum(ones) → cumsum(ones) + P (T read from the input)."""
    for node in plan.aranges:
        with graph.inserting_before(node):
            t = graph.call_function(aten.sym_size.int, (ids, 1))
            end = graph.call_function(operator.add, (p, t))
            new = graph.call_function(aten.arange.start, (p, end), dict(node.kwargs))
        node.replace_all_uses_with(new)
        graph.erase_node(node)
    for node in plan.cumsums:
        with graph.inserting_after(node):
            shifted = graph.call_function(aten.add.Tensor, (node, p))
        node.replace_all_uses_with(shifted, delete_user_cb=lambda user, new=shifted: user is not new)
