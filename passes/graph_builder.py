"""``GraphBuilder``: the one way passes insert nodes (passes/README.md invariants 2 and 9).

Every node a builder inserts gets its FakeTensor value (``meta["val"]``, computed by running the
target under the graph's fake mode) and the provenance of the node it stands in for
(``PROVENANCE_KEYS``). A builder also reads parameters (``get_attr``), registers frozen constants,
copies single nodes with their arguments remapped, and copies a path of the graph with one input
replaced (``quantize-kv`` re-runs a model's own k/v path on a quantized input that way).
"""

from __future__ import annotations

import torch
from torch import fx, nn
from torch.utils import _pytree

from condfx.patterns import _graph as g

PROVENANCE_KEYS = ("nn_module_stack", "stack_trace", "source_fn_stack", "from_node")
"""``node.meta`` keys a new node takes from the node it stands in for: the only such list."""


def copy_provenance(src: fx.Node, dst: fx.Node) -> None:
    """Copies ``src``'s ``PROVENANCE_KEYS`` (those it has) into ``dst.meta``."""
    for key in PROVENANCE_KEYS:
        if key in src.meta:
            dst.meta[key] = src.meta[key]


def fake_mode_of(node: fx.Node):
    """The FakeTensorMode of ``node``'s value, or of its inputs' values when its own has none."""
    for holder in (node, *node.all_input_nodes):
        for leaf in _pytree.tree_leaves(holder.meta.get("val")):
            mode = getattr(leaf, "fake_mode", None)
            if mode is not None:
                return mode
    msg = f"node {node.format_node()} carries no FakeTensor value to take a fake mode from."
    raise ValueError(msg)


class GraphBuilder:
    """Inserts nodes before ``anchor``, each with its FakeTensor value and ``like``'s provenance.

    Args:
        gm: the module being rewritten (constants are registered on it, get_attr reads it).
        anchor: new nodes go right before it (pass ``node.next`` to insert after ``node``).
        like: the node whose provenance new nodes take and whose fake mode computes their values;
            defaults to ``anchor``.

    Attributes:
        created: every node this builder inserted, in insertion order.
    """

    def __init__(self, gm: fx.GraphModule, anchor: fx.Node, like: fx.Node | None = None):
        self.gm, self.graph, self.anchor = gm, gm.graph, anchor
        self.like = anchor if like is None else like
        self.mode = fake_mode_of(self.like)
        self.created: list[fx.Node] = []

    @property
    def before(self) -> fx.Node:
        """The anchor (the name ``quantize-kv`` uses)."""
        return self.anchor

    def value(self, arg):
        """The FakeTensor value of ``arg`` (a get_attr without one gets it now); non-nodes as is."""
        if not isinstance(arg, fx.Node):
            return arg
        if arg.op == "get_attr" and "val" not in arg.meta:
            arg.meta["val"] = self.mode.from_tensor(g.get_attr_value(self.gm, arg), static_shapes=True)
        return arg.meta["val"]

    def _finish(self, node: fx.Node) -> fx.Node:
        if node.op == "call_function":
            args = fx.node.map_aggregate(node.args, self.value)
            kwargs = fx.node.map_aggregate(node.kwargs, self.value)
            with self.mode:
                node.meta["val"] = node.target(*args, **kwargs)
        copy_provenance(self.like, node)
        self.created.append(node)
        return node

    def call(self, target, *args, **kwargs) -> fx.Node:
        """Inserts ``target(*args, **kwargs)`` with its FakeTensor value and ``like``'s provenance."""
        with self.graph.inserting_before(self.anchor):
            node = self.graph.call_function(target, args, kwargs)
        return self._finish(node)

    def get_attr(self, target: str) -> fx.Node:
        """Inserts a get_attr of the existing attribute ``target`` with a static FakeTensor value."""
        with self.graph.inserting_before(self.anchor):
            node = self.graph.get_attr(target)
        self.value(node)
        self.created.append(node)
        return node

    def constant(self, owner: str, name: str, value: torch.Tensor) -> fx.Node:
        """Registers ``value`` as a frozen parameter ``owner.name`` and returns its get_attr node."""
        module = self.gm.get_submodule(owner) if owner else self.gm
        module.register_parameter(name, nn.Parameter(value, requires_grad=False))
        with self.graph.inserting_before(self.anchor):
            node = self.graph.get_attr(f"{owner}.{name}" if owner else name)
        node.meta["val"] = self.mode.from_tensor(value, static_shapes=True)
        self.created.append(node)
        return node

    def copy(self, node: fx.Node, env: dict[fx.Node, fx.Node]) -> fx.Node:
        """Copies ``node`` with its inputs replaced through ``env`` (others kept), recomputing its
        value and giving it ``like``'s provenance."""
        with self.graph.inserting_before(self.anchor):
            copied = self.graph.node_copy(node, lambda a: env.get(a, a))
        return self._finish(copied)

    def copy_path(self, src: fx.Node, dst: fx.Node, new_src: fx.Node) -> fx.Node:
        """Copies every node on a path src → dst with src replaced by ``new_src``; returns dst's copy.

        The copies keep the metadata of the nodes they copy (values included).
        """
        ancestors, stack = set(), [dst]
        while stack:
            n = stack.pop()
            if n not in ancestors:
                ancestors.add(n)
                stack.extend(n.all_input_nodes)
        on_path, stack = set(), [src]
        while stack:
            for user in stack.pop().users:
                if user in ancestors and user not in on_path:
                    on_path.add(user)
                    stack.append(user)
        env = {src: new_src}
        for n in [n for n in self.graph.nodes if n in on_path]:
            with self.graph.inserting_before(self.anchor):
                env[n] = self.graph.node_copy(n, lambda a: env.get(a, a))
            self.created.append(env[n])
        return env[dst]
