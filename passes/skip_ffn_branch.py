"""The general masked FFN of ``skip-ffn``: the block's own nodes, run on the kept rows only.

``condfx.masked_ffn`` carries a SwiGLU/GeGLU or GELU MLP with plain weights. Every other FFN block
(ReLU-family or other activations, fused gate/up, post-norm or a scaled residual, a MoE block with
router, experts and shared expert, the MLP of a parallel attention + MLP block) keeps its own
subgraph: the nodes from its input ``x`` to the operand ``out`` of its residual add are copied
between a gather and a scatter, and the original nodes are dropped:

    xs = x[execute].unsqueeze(0)                            # (1, N, d): the N kept rows, row-major
    ys = <the block's nodes from x to out, on xs>           # (1, N, d): post-norm and scale included
    update = index_put(zeros_like(h_in), [execute], ys.reshape(N, d))    # 0 on skipped rows
    cos = where(execute, cos(h_in, h_in + update), 1.0)     # (B, T) float32, as condfx.masked_ffn

Sizes: the copied nodes see B = 1 and T = N. A size argument that is an expression of the input's
(B, T) (a view to (B*T, d), a reshape back to (B, T, d)) is rewritten with B = 1, T = N; a block
whose sizes are not c, c*B*T-style products (c*T, c*B*T) of them, or that reads another (B, T)
tensor than ``x``, is skipped with a reason. The gather node carries ``BRANCH_TAG`` in its meta
(``is_masked_branch``); its second argument holds the execute mask.

Everything stays standard ATen (boolean index / index_put), so the ONNX exporter and the decode path
see ordinary ops; a config under which every row executes reproduces the original outputs.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import sympy
import torch
from torch import fx

from condfx.passes.graph_builder import GraphBuilder

aten = torch.ops.aten
BRANCH_TAG = "condfx_masked_branch"
_EPS = 1e-12


@dataclass(frozen=True)
class Branch:
    """One FFN block as the general masked FFN sees it.

    Attributes:
        x: the block input (B, T, d), usually the normalised residual stream.
        out: the operand of the residual add that the block adds (after post-norm and scale).
        stream: the residual add's other operand (h_in).
        residual: the residual add.
        nodes: the nodes from ``x`` (excluded) to ``out`` (included), in graph order.
    """

    x: fx.Node
    out: fx.Node
    stream: fx.Node
    residual: fx.Node
    nodes: tuple[fx.Node, ...]


def is_masked_branch(node: fx.Node) -> bool:
    """True for the gather node of a general masked FFN (its args: x, [execute])."""
    return node.meta.get(BRANCH_TAG, False) is True


def branch_execute(node: fx.Node) -> fx.Node:
    """The (B, T) execute mask of the general masked FFN whose gather node is ``node``."""
    return node.args[1][0]


def _between(x: fx.Node, out: fx.Node) -> list[fx.Node] | str:
    """The nodes on a path x → out (x excluded), in graph order, or why they cannot be moved."""
    order = {n: i for i, n in enumerate(x.graph.nodes)}
    below, stack = set(), [x]
    while stack:
        for user in stack.pop().users:
            if user not in below and order[user] <= order[out]:
                below.add(user)
                stack.append(user)
    inside, stack = set(), [out] if out in below else []
    while stack:
        n = stack.pop()
        if n not in inside:
            inside.add(n)
            stack.extend(a for a in n.all_input_nodes if a in below)
    for n in below - inside:  # an in-place op off the data path that writes into the block
        if _mutates(n) and any(a in inside for a in n.all_input_nodes):
            return f"in-place {n.name} off the FFN's data path writes into it"
    return sorted(inside, key=order.__getitem__)


def _mutates(node: fx.Node) -> bool:
    schema = getattr(node.target, "_schema", None)
    return schema is not None and schema.is_mutable


def make_branch(x: fx.Node, out: fx.Node, stream: fx.Node, residual: fx.Node) -> Branch | str:
    """The ``Branch`` from ``x`` to ``out``, or why the general masked FFN cannot carry it."""
    val = x.meta.get("val")
    if not isinstance(val, torch.Tensor) or val.dim() not in (2, 3):
        return "FFN input is not (B, T, d) or (B*T, d)"
    nodes = _between(x, out)
    if isinstance(nodes, str):
        return nodes
    if not nodes:
        return "FFN output does not follow from its input"
    for n in nodes:
        if n.op != "call_function":
            return f"FFN subgraph holds a {n.op} node"
        if _mutates(n) and isinstance(n.args[0], fx.Node) and n.args[0] not in nodes:
            return "FFN subgraph writes in place into a tensor outside it"
    return Branch(x, out, stream, residual, tuple(nodes))


def _bt_symbols(execute: fx.Node) -> dict:
    """{"B": size, "T": size} of the (B, T) execute mask (SymInts in a captured graph)."""
    b, t = execute.meta["val"].shape
    return {"B": b, "T": t}


_N = sympy.Symbol("condfx_kept_rows", positive=True, integer=True)


def _kept_size(value, sizes: dict) -> tuple[int, int] | None:
    """(c0, c1) with value = c0 + c1 * N once B = 1 and T = N, or None when it is no such size."""
    b, t = sizes["B"], sizes["T"]
    if not isinstance(b, torch.SymInt) or not isinstance(t, torch.SymInt):
        return None
    expr = value.node.expr if isinstance(value, torch.SymInt) else sympy.Integer(value)
    new = sympy.expand(expr.xreplace({b.node.expr: 1, t.node.expr: _N}))
    if new.free_symbols - {_N}:
        return None
    c1, c0 = new.coeff(_N, 1), new.coeff(_N, 0)
    if sympy.expand(new - c0 - c1 * _N) != 0 or not (c0.is_integer and c1.is_integer):
        return None
    return int(c0), int(c1)


def _external_env(b: GraphBuilder, branch: Branch, execute: fx.Node, n_rows: fx.Node) -> dict[fx.Node, object]:
    """Replacements of the block's outside inputs that depend on (B, T): sizes become B = 1, T = N,
    and a tensor made from sizes alone (an ``arange`` over B*T*k) is rebuilt from the new sizes.

    Raises:
        ValueError: an outside input is a (B, T)-shaped tensor computed from other tensors, or a
            size of another form.
    """
    sizes, inside = _bt_symbols(execute), set(branch.nodes)
    bt = {s.node.expr for s in (sizes["B"], sizes["T"]) if isinstance(s, torch.SymInt)}
    env: dict[fx.Node, object] = {}

    def uses_bt(val) -> bool:
        if isinstance(val, torch.SymInt):
            return bool(val.node.expr.free_symbols & bt)
        return isinstance(val, torch.Tensor) and any(uses_bt(s) for s in val.shape)

    def rebind(a: fx.Node) -> None:
        val = a.meta.get("val")
        if a in env or a in inside or a is branch.x or not uses_bt(val):
            return
        if isinstance(val, torch.SymInt):
            kept = _kept_size(val, sizes)
            if kept is None:
                msg = f"FFN subgraph uses the size {val} that is no c0 + c1*B*T of its input's (B, T)"
                raise ValueError(msg)
            env[a] = _size_node(b, n_rows, *kept)
            return
        sources = [i for i in a.all_input_nodes if isinstance(i.meta.get("val"), torch.Tensor)]
        if a.op != "call_function" or any(uses_bt(i.meta["val"]) for i in sources):
            msg = f"FFN subgraph reads the (B, T) tensor {a.name} besides its input"
            raise ValueError(msg)
        for i in a.all_input_nodes:
            rebind(i)
        env[a] = b.copy(a, env)  # made from sizes alone (arange, zeros, ...): rebuilt for N rows

    for n in branch.nodes:
        for a in n.all_input_nodes:
            rebind(a)
    return env


def _size_node(b: GraphBuilder, n_rows: fx.Node, c0: int, c1: int):
    """c0 + c1 * N as a graph value (an int when c1 is 0)."""
    if c1 == 0:
        return c0
    node = n_rows if c1 == 1 else b.call(operator.mul, n_rows, c1)
    return node if c0 == 0 else b.call(operator.add, node, c0)


def row_cosine_nodes(b: GraphBuilder, h_in: fx.Node, update: fx.Node, execute: fx.Node) -> fx.Node:
    """where(execute, cos(h_in, h_in + update), 1.0) per row in float32, norms clamped at 1e-12."""
    a = b.call(aten._to_copy.default, h_in, dtype=torch.float32)
    out = b.call(aten.add.Tensor, a, b.call(aten._to_copy.default, update, dtype=torch.float32))
    dot = b.call(aten.sum.dim_IntList, b.call(aten.mul.Tensor, a, out), [-1])
    n_in = b.call(aten.clamp_min.default, b.call(aten.linalg_vector_norm.default, a, 2, [-1]), _EPS)
    n_out = b.call(aten.clamp_min.default, b.call(aten.linalg_vector_norm.default, out, 2, [-1]), _EPS)
    cos = b.call(aten.div.Tensor, dot, b.call(aten.mul.Tensor, n_in, n_out))
    return b.call(aten.where.ScalarOther, execute, cos, 1.0)


def masked_branch(b: GraphBuilder, branch: Branch, execute: fx.Node) -> tuple[fx.Node, fx.Node]:
    """Inserts the gather, the block's copied nodes on the kept rows and the scatter (module docstring).

    A block whose input and residual stream are flattened to (B*T, d) (OPT) is gathered and
    scattered with the flattened mask; its cos is reshaped back to (B, T).

    Returns:
        (update, 0 on skipped rows, in the shape and dtype of the branch; cos (B, T) float32).

    Raises:
        ValueError: the block's sizes cannot be rewritten for the kept rows (``_external_env``).
    """
    flat = b.call(aten.reshape.default, execute, [-1])  # (B*T,)
    x_flat = branch.x.meta["val"].dim() == 2
    picked = b.call(aten.index.Tensor, branch.x, [flat if x_flat else execute])  # (N, d)
    picked.meta[BRANCH_TAG] = True
    xs = picked if x_flat else b.call(aten.unsqueeze.default, picked, 0)  # (N, d) or (1, N, d)
    n_rows = b.call(aten.sym_size.int, picked, 0)
    env: dict[fx.Node, object] = {branch.x: xs, **_external_env(b, branch, execute, n_rows)}
    for node in branch.nodes:
        env[node] = b.copy(node, env)
    val = branch.out.meta["val"]
    rows = b.call(aten.reshape.default, env[branch.out], [-1, val.shape[-1]])  # (N, d)
    zeros = b.call(aten.zeros_like.default, branch.stream, dtype=val.dtype)
    s_flat = branch.stream.meta["val"].dim() == 2
    update = b.call(aten.index_put.default, zeros, [flat if s_flat else execute], rows)
    if s_flat:  # cos per flattened row (B*T,), then (B, T)
        cos = row_cosine_nodes(b, branch.stream, update, flat)
        sizes = [b.call(aten.sym_size.int, execute, 0), b.call(aten.sym_size.int, execute, 1)]
        return update, b.call(aten.reshape.default, cos, sizes)
    return update, row_cosine_nodes(b, branch.stream, update, execute)


def bt_row(b: GraphBuilder, template: fx.Node) -> fx.Node:
    """A (B, T) node from ``template``: itself when it is (B, T), else its slice [..., 0]."""
    return template if template.meta["val"].dim() == 2 else b.call(aten.select.int, template, -1, 0)


def probe_branch(gm: fx.GraphModule, branch: Branch, template: fx.Node) -> str | None:
    """Builds the general masked FFN for ``branch`` and removes it again (``template``: a (B, T) or
    (B, T, d) node, e.g. the model input); the reason it cannot be built, or None."""
    b = GraphBuilder(gm, branch.residual)
    try:
        execute = b.call(aten.ones_like.default, bt_row(b, template), dtype=torch.bool)
        masked_branch(b, branch, execute)
    except Exception as err:  # noqa: BLE001  (any failure of the rebuilt block is the skip reason)
        return f"FFN subgraph does not run on the kept rows ({' '.join(str(err).split())[:120]})"
    finally:
        for node in reversed(b.created):
            gm.graph.erase_node(node)
    return None
