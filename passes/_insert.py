"""Small helpers for passes that insert state and clean up: registering tensors on holder modules,
the two ways passes drop what a rewrite left unused, and a view of a graph that returns other nodes.

New nodes are inserted with ``condfx.passes.graph_builder.GraphBuilder`` (FakeTensor values and
provenance, passes/README.md invariants 2 and 9)."""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import fx, nn


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
