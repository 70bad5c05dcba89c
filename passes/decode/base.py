"""What a decode rule is: how ``add-kv-cache`` lowers one cached-attention op to its decode form.

A ``DecodeRule`` answers three questions for one op (``passes/decode_rules.DECODE_RULES`` maps each
op overload to its rule):
    layout(node, layer) -> CacheLayout       which cache the layer needs (``condfx.layouts``)
    rewire(node, layout, past, ctx) -> presents
                                             rewrites the op to read its past inputs (the layout's
                                             ``past_*`` placeholders) and returns its present nodes
    gives_position(layout) -> bool           whether the layer's cache length is the absolute
                                             position of the first new token (full caches: yes;
                                             windowed ones: no)
``ctx.position`` is that position P (an fx node, computed once from the first layer whose rule says
so), for rules that need it (a bounded cache that re-derives positions: set ``needs_position``);
None when no layer gives it, and then add-kv-cache refuses a rule that needs it in one sentence
naming the passes that made the graph's layers.

Op arguments are read and written by their schema names (``op_arg`` / ``set_op_args``), never by
position.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import fx

from condfx.layouts import CacheLayout
from condfx.passes.op_args import op_arg, set_op_args

__all__ = ["DecodeContext", "DecodeRule", "cat_past", "kv_shape", "op_arg", "set_op_args"]

aten = torch.ops.aten


def kv_shape(node: fx.Node) -> tuple[int, int, torch.dtype]:
    """(Hkv, D, dtype) of a cached-attention node's ``k`` argument (B, Hkv, T, D)."""
    k = op_arg(node, "k").meta["val"]
    return int(k.shape[1]), int(k.shape[3]), k.dtype


@dataclass(frozen=True)
class DecodeContext:
    """What every rule of one ``add-kv-cache`` run shares.

    Attributes:
        gm: the module being rewritten.
        ids: the graph input (B, T) (or embeddings (B, T, C)).
        position: P, the absolute position of the first new token (an int-valued node), or None.
        nodes: the graph's nodes by name, taken before any rewiring (plans name their nodes).
        state: per-run scratch shared by the rules of one kind (e.g. XQuant-CL accumulations).
        deferred: callables run once every layer is rewired.
    """

    gm: fx.GraphModule
    ids: fx.Node
    position: fx.Node | None
    nodes: dict[str, fx.Node]
    state: dict[str, Any] = field(default_factory=dict)
    deferred: list = field(default_factory=list)

    @property
    def graph(self) -> fx.Graph:
        return self.gm.graph


class DecodeRule:
    """The decode form of one cached-attention op (see the module docstring)."""

    pass_name: ClassVar[str] = ""  # the pass that introduces the op, for messages
    needs_position: ClassVar[bool] = False  # rewire reads ctx.position (add-kv-cache then requires it)

    def layout(self, node: fx.Node, layer: int) -> CacheLayout:
        """The cache layout the op's layer needs."""
        raise NotImplementedError

    def rewire(self, node: fx.Node, layout: CacheLayout, past: list[fx.Node],
               ctx: DecodeContext) -> list[fx.Node]:
        """Rewrites ``node`` to read ``past`` (the layout's inputs); returns its present nodes."""
        raise NotImplementedError

    def gives_position(self, layout: CacheLayout) -> bool:
        """True when the layer's cache length is the absolute position of the next token."""
        return layout.keeps_every_token


def cat_past(graph: fx.Graph, node: fx.Node, past: list[fx.Node],
             names: tuple[str, ...] = ("k", "v")) -> list[fx.Node]:
    """Feeds ``cat([past_i, arg], 2)`` to the op's arguments ``names``; returns the cats."""
    cats = []
    with graph.inserting_before(node):
        for p, name in zip(past, names, strict=True):
            cats.append(graph.call_function(aten.cat.default, ([p, op_arg(node, name)], 2)))
    set_op_args(node, **dict(zip(names, cats, strict=True)))
    return cats
