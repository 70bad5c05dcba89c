"""``GraphBuilder``: inserts nodes with FakeTensor values before an anchor node (passes/README.md
invariant 2), registers frozen constants, and copies a path of the graph with one input replaced.

Used by ``quantize-kv`` to re-run a model's own k/v path (projection, QK-norm, RoPE) on a
quantized input without knowing how the path is written.
"""

from __future__ import annotations

import torch
from torch import fx, nn

from condfx.passes._insert import call_with_meta


class GraphBuilder:
    """Inserts nodes before ``before``, each with its FakeTensor value and ``before``'s provenance.

    Args:
        gm: the module being rewritten (constants are registered on it).
        before: the anchor node; ``before.args[0]`` must carry a FakeTensor (its fake mode is used).
    """

    def __init__(self, gm: fx.GraphModule, before: fx.Node):
        self.gm, self.graph, self.before = gm, gm.graph, before
        self.mode = before.args[0].meta["val"].fake_mode

    def call(self, target, *args) -> fx.Node:
        """Inserts ``target(*args)`` with its FakeTensor value and ``before``'s provenance."""
        with self.graph.inserting_before(self.before):
            return call_with_meta(self.graph, target, args, self.before)

    def constant(self, owner: str, name: str, value: torch.Tensor) -> fx.Node:
        """Registers ``value`` as a frozen parameter ``owner.name`` and returns its get_attr node."""
        module = self.gm.get_submodule(owner) if owner else self.gm
        module.register_parameter(name, nn.Parameter(value, requires_grad=False))
        target = f"{owner}.{name}" if owner else name
        with self.graph.inserting_before(self.before):
            node = self.graph.get_attr(target)
        node.meta["val"] = self.mode.from_tensor(value, static_shapes=True)
        return node

    def copy_path(self, src: fx.Node, dst: fx.Node, new_src: fx.Node) -> fx.Node:
        """Copies every node on a path src → dst with src replaced by ``new_src``; returns dst's copy."""
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
            with self.graph.inserting_before(self.before):
                env[n] = self.graph.node_copy(n, lambda a: env.get(a, a))
        return env[dst]
