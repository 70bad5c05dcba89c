"""Small helpers for passes that insert nodes and state: new nodes get FakeTensor metadata and the
provenance of the node they stand in for (passes/README.md, invariants 2 and 9); the two ways
passes drop what a rewrite left unused; and a view of a graph that returns other nodes."""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import fx, nn

from condfx.patterns import _graph as g

_COPIED_META = ("nn_module_stack", "stack_trace", "source_fn_stack", "from_node")


def register_tensor(gm: fx.GraphModule, path: str, name: str, value: torch.Tensor, buffer: bool) -> str:
    """Registers ``value`` on (a holder module at) ``path``; returns the dotted name."""
    holder = gm
    for part in [p for p in path.split(".") if p]:
        if not hasattr(holder, part):
            holder.add_module(part, nn.Module())
        holder = getattr(holder, part)
    if buffer:
        holder.register_buffer(name, value.contiguous())
    else:
        holder.register_parameter(name, nn.Parameter(value.contiguous().clone()))
    return f"{path}.{name}" if path else name


def call_with_meta(graph: fx.Graph, target, args, like: fx.Node) -> fx.Node:
    """Inserts ``target(*args)`` and gives it FakeTensor metadata and the provenance of ``like``."""
    node = graph.call_function(target, args)
    fake_mode = like.meta["val"].fake_mode
    with fake_mode:
        vals = fx.node.map_arg(args, lambda n: n.meta["val"])
        node.meta["val"] = target(*vals)
    for key in _COPIED_META:
        if key in like.meta:
            node.meta[key] = like.meta[key]
    return node


def get_attr_with_meta(gm: fx.GraphModule, name: str, like: fx.Node) -> fx.Node:
    """Inserts a get_attr of ``name`` with a FakeTensor from ``like``'s fake mode."""
    node = gm.graph.get_attr(name)
    node.meta["val"] = like.meta["val"].fake_mode.from_tensor(g.get_attr_value(gm, node))
    return node


def _kept(node: fx.Node) -> bool:
    return node.op != "call_function" or node.is_impure()


def remove_dead_calls(graph: fx.Graph) -> None:
    """Dead-code elimination of unused pure ``call_function`` nodes only (placeholders, get_attr
    nodes and impure calls stay)."""
    graph.eliminate_dead_code(is_impure_node=_kept)


def erase_unused(graph: fx.Graph, nodes) -> None:
    """Erases those of ``nodes`` that have no users, users before producers.

    Needed besides DCE because ``Node.is_impure`` counts SDPA (which may use dropout) as impure.
    """
    order = {n: i for i, n in enumerate(graph.nodes)}
    for node in sorted(set(nodes), key=order.__getitem__, reverse=True):
        if not node.users:
            graph.erase_node(node)


def output_view(gm: fx.GraphModule, outputs: Callable[[fx.Graph, fx.Node], tuple]) -> fx.GraphModule:
    """A module sharing ``gm``'s parameters whose forward returns ``outputs(graph, output)``, picked
    from a copy of the graph (``output`` its output node), as a plain tuple of positional results."""
    graph = copy.deepcopy(gm.graph)
    output = next(n for n in graph.nodes if n.op == "output")
    output.args = (tuple(outputs(graph, output)),)
    graph._codegen = fx.graph.CodeGen()  # plain positional inputs and a tuple output
    return fx.GraphModule(gm, graph)
