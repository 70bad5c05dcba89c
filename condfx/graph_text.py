"""A normalised, stable text form of an FX graph for golden tests.

One line per node, ``%name = target(args)``: placeholders keep their names, ``get_attr`` nodes are
named by their attribute path (``%layers.0.q.weight``), every other node is numbered in graph order
(``%0``, ``%1``, ...). Targets print as ``aten.mm.default`` / ``condfx.attention.default``; there
are no shapes with symbolic ids, memory addresses or stack traces. Export's bookkeeping nodes
(``_guards_fn`` calls) are left out.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import fx

_HIDDEN_MODULES = ("_guards_fn",)


def _target_name(node: fx.Node) -> str:
    target = node.target
    if isinstance(target, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
        return str(target)
    if isinstance(target, str):
        return target
    name = getattr(target, "__name__", None) or repr(target)
    module = getattr(target, "__module__", "") or ""
    return name if module in ("_operator", "operator", "builtins") else f"{module}.{name}"


def _format_arg(arg: Any, names: dict[fx.Node, str]) -> str:
    if isinstance(arg, fx.Node):
        return names.get(arg, f"%{arg.name}")
    if isinstance(arg, (list, tuple)):
        inner = ", ".join(_format_arg(a, names) for a in arg)
        return f"[{inner}]" if isinstance(arg, list) else f"({inner}{',' if len(arg) == 1 else ''})"
    if isinstance(arg, dict):
        return "{" + ", ".join(f"{k!r}: {_format_arg(v, names)}" for k, v in arg.items()) + "}"
    if isinstance(arg, float):
        return repr(arg) if math.isfinite(arg) else str(arg)
    if isinstance(arg, (torch.dtype, torch.device, torch.memory_format, torch.layout)):
        return str(arg)
    return repr(arg)


def _is_hidden(node: fx.Node) -> bool:
    return node.op == "call_module" and node.target in _HIDDEN_MODULES


def graph_text(gm: fx.GraphModule | fx.Graph) -> str:
    """Returns the normalised text of ``gm``'s graph (see the module docstring).

    Args:
        gm: a GraphModule or a Graph.

    Returns:
        The text, one node per line, ending with a ``return`` line.
    """
    graph = gm.graph if isinstance(gm, fx.GraphModule) else gm
    names: dict[fx.Node, str] = {}
    counter = 0
    lines = []
    for node in graph.nodes:
        if _is_hidden(node):
            continue
        if node.op == "output":
            lines.append(f"return {_format_arg(node.args[0], names)}")
            continue
        if node.op == "placeholder":
            names[node] = f"%{node.target}"
            lines.append(f"{names[node]} = input()")
            continue
        if node.op == "get_attr":
            names[node] = f"%{node.target}"
            lines.append(f"{names[node]} = param()")
            continue
        names[node] = f"%{counter}"
        counter += 1
        args = [_format_arg(a, names) for a in node.args]
        args += [f"{k}={_format_arg(v, names)}" for k, v in node.kwargs.items()]
        lines.append(f"{names[node]} = {_target_name(node)}({', '.join(args)})")
    return "\n".join(lines)
