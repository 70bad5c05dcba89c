"""Reading and writing a custom op's arguments by their schema names, never by position.

``op_arg(node, "window")`` and ``set_op_args(node, k=..., v=...)`` work on any ``torch.ops.condfx.*``
call node (they read ``node.target._schema``); a passes-level module, so decode rules, quantize-kv's
plans and any pass can use them without importing each other.
"""

from __future__ import annotations

from typing import Any

from torch import fx


def _schema_names(node: fx.Node) -> list[str]:
    return [a.name for a in node.target._schema.arguments]


def op_arg(node: fx.Node, name: str) -> Any:
    """The argument ``name`` of a custom-op call node, by its schema (its default when omitted).

    Raises:
        KeyError: the op has no argument of that name.
    """
    for i, arg in enumerate(node.target._schema.arguments):
        if arg.name != name:
            continue
        if i < len(node.args):
            return node.args[i]
        if name in node.kwargs:
            return node.kwargs[name]
        return arg.default_value if arg.has_default_value() else None
    msg = f"{node.target} has no argument {name!r}; its arguments are {_schema_names(node)}."
    raise KeyError(msg)


def set_op_args(node: fx.Node, **values: Any) -> None:
    """Replaces arguments of a custom-op call node by their schema names."""
    names = _schema_names(node)
    args, kwargs = list(node.args), dict(node.kwargs)
    for name, value in values.items():
        if name not in names:
            msg = f"{node.target} has no argument {name!r}; its arguments are {names}."
            raise KeyError(msg)
        i = names.index(name)
        if i < len(args):
            args[i] = value
        else:
            kwargs[name] = value
    node.args, node.kwargs = tuple(args), kwargs
