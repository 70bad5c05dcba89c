"""FFN regions, anchored on the down projection.

Recognised forms (projections as linear, addmm (GPT-2 Conv1D), mm/matmul, fused gate/up via split):
    down(silu(gate(x)) * up(x))          SwiGLU, either operand order; silu as aten.silu or x*sigmoid(x)
    down(gelu(gate(x)) * up(x))          GeGLU, reported as FFNKind.SWIGLU with ``act`` the gelu node
    down(gelu(up(x)))                    GELU MLP; gelu as aten.gelu (any approximation) or the explicit
                                         tanh formula 0.5*x*(1+tanh(sqrt(2/pi)*(x+0.044715*x^3)))
    down(act(up(x)))                     MLP (FFNKind.MLP) with act relu, relu² (OPT, Persimmon, Nemotron,
                                         Arcee), silu, sigmoid or tanh
Fused gate_up (Phi-3, GLM): one projection split in halves by split / chunk / slice; gate and up are
LinearRefs of the same node with ``out_slice`` set. ``FFNRegion.activation`` names the activation.
"""

from __future__ import annotations

import math

import torch
from torch import fx

from condfx.patterns import _graph as g
from condfx.patterns.norm import norm_producing
from condfx.patterns.regions import FFNKind, FFNRegion, LinearRef, MatchFailure

aten = torch.ops.aten

NO_UP = "activation input is not a projection"
NO_GATED_UP = "gated activation is not multiplied by a projection"
INPUTS_DIFFER = "gate and up read different inputs"
WIDTH_MISMATCH = "down projection width does not match up"
UNSUPPORTED_ACT = "activation is not gelu/relu/relu2/silu/sigmoid/tanh or a gated silu/gelu"

_ACT_PACKETS = (aten.silu, aten.gelu, aten.relu, aten.sigmoid, aten.tanh)
_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


def _fail(reason: str, node: fx.Node, detail: str = "") -> MatchFailure:
    return MatchFailure(reason, node, detail, "ffn")


def _mul_tensor_args(node: fx.Node) -> tuple[fx.Node, fx.Node] | None:
    if g.is_op(node, aten.mul) and len(node.args) == 2 and all(isinstance(a, fx.Node) for a in node.args):
        return node.args[0], node.args[1]
    return None


def _silu_input(node: fx.Node) -> fx.Node | None:
    """x for silu(x) or x * sigmoid(x)."""
    node = g.skip_identity(node)
    if g.is_op(node, aten.silu):
        return node.args[0]
    pair = _mul_tensor_args(node)
    if pair is None:
        return None
    for a, b in (pair, pair[::-1]):
        b = g.skip_identity(b)
        if g.is_op(b, aten.sigmoid) and g.skip_identity(b.args[0]) is g.skip_identity(a):
            return a
    return None


def _factors(node: fx.Node, out: list, depth: int = 0) -> float:
    """Flattens a tree of muls into tensor factors (appended to ``out``); returns the constant."""
    if depth < 4 and g.is_op(node, aten.mul) and len(node.args) == 2:
        const = 1.0
        for a in node.args:
            const *= g.scalar(a) if g.scalar(a) is not None else _factors(a, out, depth + 1)
        return const
    out.append(node)
    return 1.0


def _tanh_formula_input(node: fx.Node) -> fx.Node | None:
    """x for the explicit tanh-GELU formula (HF "gelu_new")."""
    tensors: list[fx.Node] = []
    if not g.is_op(node, aten.mul) or not g.close(_factors(node, tensors), 0.5) or len(tensors) != 2:
        return None
    for x, one_plus in (tensors, tensors[::-1]):
        if not g.is_op(one_plus, aten.add) or 1.0 not in [g.scalar(a) for a in one_plus.args[:2]]:
            continue
        tanh = next((a for a in one_plus.args[:2] if isinstance(a, fx.Node)), None)
        if not g.is_op(tanh, aten.tanh):
            continue
        inner: list[fx.Node] = []
        if not g.close(_factors(tanh.args[0], inner), _SQRT_2_OVER_PI) or len(inner) != 1:
            continue
        poly = inner[0]
        if g.is_op(poly, aten.add) and x in poly.args[:2]:
            cubic = poly.args[1] if poly.args[0] is x else poly.args[0]
            terms: list[fx.Node] = []
            if isinstance(cubic, fx.Node) and g.close(_factors(cubic, terms), 0.044715) and _is_cube(terms, x):
                return x
    return None


def _is_cube(terms: list[fx.Node], x: fx.Node) -> bool:
    if len(terms) == 1 and g.is_op(terms[0], aten.pow):
        return terms[0].args[0] is x and terms[0].args[1] == 3
    return len(terms) == 3 and all(t is x for t in terms)


def _gelu_input(node: fx.Node) -> fx.Node | None:
    node = g.skip_identity(node)
    if g.is_op(node, aten.gelu):
        return node.args[0]
    return _tanh_formula_input(node)


def _relu_input(node: fx.Node) -> fx.Node | None:
    node = g.skip_identity(node)
    return node.args[0] if g.is_op(node, aten.relu) else None


def _plain_act(node: fx.Node) -> tuple[fx.Node, str] | None:
    """(x, name) for an ungated activation other than gelu: relu, relu² (pow 2, square or r * r),
    silu, sigmoid, tanh."""
    node = g.skip_identity(node)
    if g.is_op(node, aten.pow) and node.args[1] == 2 and _relu_input(node.args[0]) is not None:
        return _relu_input(node.args[0]), "relu2"
    if g.is_op(node, aten.square) and _relu_input(node.args[0]) is not None:
        return _relu_input(node.args[0]), "relu2"
    pair = _mul_tensor_args(node)
    if pair is not None and pair[0] is pair[1] and _relu_input(pair[0]) is not None:
        return _relu_input(pair[0]), "relu2"
    for packet, name in ((aten.relu, "relu"), (aten.silu, "silu"), (aten.sigmoid, "sigmoid"), (aten.tanh, "tanh")):
        if g.is_op(node, packet):
            return node.args[0], name
    return None


# Elementwise ops an activation written out by hand may use (xIELU, Bloom's GELU, ...).
_ELEMENTWISE = (aten.add, aten.sub, aten.mul, aten.div, aten.neg, aten.pow, aten.exp, aten.expm1, aten.log,
                aten.log1p, aten.tanh, aten.sigmoid, aten.softplus, aten.erf, aten.where, aten.gt, aten.ge,
                aten.lt, aten.le, aten.minimum, aten.maximum, aten.clamp, aten.clamp_min, aten.clamp_max,
                aten.abs, aten.sqrt, aten.rsqrt, aten.relu, aten.gelu, aten.silu, aten.square, aten.sign)
_MAX_ACT_NODES = 48


def _numel(node: fx.Node) -> int | None:
    s = g.shape(node)
    if s is None:
        return None
    n = 1
    for d in s:
        d = g.static_int(d)
        if d is None:
            return None
        n *= d
    return n


def _elementwise_leaves(node: object, seen: dict, budget: list) -> set | None:
    """The projection outputs ``node`` is an elementwise function of (scalars and 1-element parameters
    aside), or None when a non-elementwise op, a larger parameter or an input is on the way."""
    if not isinstance(node, fx.Node):
        return set()
    if node in seen:
        return seen[node]
    budget[0] -= 1
    if budget[0] < 0:
        return None
    small = _numel(node) is not None and _numel(node) <= 1
    if node.op == "get_attr":
        found = set() if small else None
    elif node.op != "call_function":
        found = None
    elif not small and g.trace_linear(node) is not None:
        found = {node}
    elif g.is_identity(node) or g.is_op(node, *_ELEMENTWISE, aten.min, aten.max):
        if g.is_op(node, aten.min, aten.max) and not (len(node.args) == 2 and isinstance(node.args[1], fx.Node)):
            return None  # a reduction, not the elementwise min / max of two tensors
        found = set()
        for a in node.args:
            leaves = _elementwise_leaves(a, seen, budget)
            if leaves is None:
                return None
            found |= leaves
        found = None if small and found else found  # a 1-element value computed from the activation input
    else:
        found = None
    seen[node] = found
    return found


def elementwise_input(node: fx.Node) -> fx.Node | None:
    """x when ``node`` is an elementwise function of the one projection output x and of constants
    (an activation written out by hand: xIELU's two branches, Bloom's tanh GELU), else None."""
    if not g.is_op(node, *_ELEMENTWISE) or g.is_op(node, aten.mul) and _mul_tensor_args(node) and len(
            {g.skip_identity(a) for a in _mul_tensor_args(node)}) == 2 and all(
            g.trace_linear(a) is not None for a in _mul_tensor_args(node)):
        return None  # up(x) * gate(x) without an activation is no activation
    seen: dict = {}
    leaves = _elementwise_leaves(node, seen, [_MAX_ACT_NODES])
    linear = (aten.add, aten.sub, aten.mul, aten.div, aten.neg)
    if not leaves or len(leaves) != 1 or not any(
            g.is_op(n, *_ELEMENTWISE, aten.min, aten.max) and not g.is_op(n, *linear) for n in seen):
        return None  # no projection, several, or only a scale and shift (no nonlinearity)
    (x,) = leaves
    return x if g.shape(x) == g.shape(node) else None


def activation_name(act: fx.Node) -> str:
    """The name of the activation node ``act`` of an FFN region ("silu", "gelu", "gelu_tanh", "relu",
    "relu2", "sigmoid", "tanh")."""
    act = g.skip_identity(act)
    if g.is_op(act, aten.gelu):
        return "gelu_tanh" if g.arg(act, 1, "approximate", "none") == "tanh" else "gelu"
    if _silu_input(act) is not None:
        return "silu"
    if _tanh_formula_input(act) is not None:
        return "gelu_tanh"
    plain = _plain_act(act)
    if plain is not None:
        return plain[1]
    return "elementwise" if elementwise_input(act) is not None else "unknown"


def _width(ref: LinearRef) -> int:
    return ref.out_slice[1] - ref.out_slice[0] if ref.out_slice else ref.out_features


def _gated(h: fx.Node, down: LinearRef) -> tuple | MatchFailure | None:
    """(gate, up, act) for act(gate(x)) * up(x) in either order."""
    pair = _mul_tensor_args(h)
    if pair is None:
        return None
    for a, b in (pair, pair[::-1]):
        act_in = _silu_input(a) or _gelu_input(a)
        if act_in is None:
            continue
        gate, up = g.trace_linear(act_in), g.trace_linear(b)
        if gate is None or up is None:
            return _fail(NO_GATED_UP, h)
        return gate, up, g.skip_identity(a)
    if any(g.is_op(g.skip_identity(a), *_ACT_PACKETS) for a in pair):
        return _fail(UNSUPPORTED_ACT, h)
    return None


def match_ffn(down: LinearRef, norms) -> FFNRegion | MatchFailure | None:
    """Matches an FFN whose down projection is ``down``.

    Returns:
        The region (``layer`` = -1 until blocks are assembled), a MatchFailure for an FFN-looking
        candidate that does not fit, or None when ``down``'s input is not an activation.
    """
    h = g.skip_views(down.x_in)
    gelu_in = _gelu_input(h)
    if gelu_in is not None:
        up, gate, act, kind = g.trace_linear(gelu_in), None, h, FFNKind.GELU_MLP
        if up is None:
            return _fail(NO_UP, h)
    elif (plain := _plain_act(h)) is not None:
        up, gate, act, kind = g.trace_linear(plain[0]), None, h, FFNKind.MLP
        if up is None:
            return _fail(NO_UP, h)
    else:
        found = _gated(h, down)
        if (found is None or isinstance(found, MatchFailure) and found.reason == UNSUPPORTED_ACT) and (
                x := elementwise_input(h)) is not None:
            found = None
            up, gate, act, kind = g.trace_linear(x), None, h, FFNKind.MLP
        elif found is None:
            if g.is_op(h, *_ACT_PACKETS):
                return _fail(UNSUPPORTED_ACT, h)
            return None
        elif isinstance(found, MatchFailure):
            return found
        else:
            (gate, up, act), kind = found, FFNKind.SWIGLU
            if g.skip_identity(gate.x_in) is not g.skip_identity(up.x_in):
                return _fail(INPUTS_DIFFER, h)
    if down.out_features != up.in_features:
        return None  # d -> h -> d' with d' != d is no residual-stream FFN (a router, a head)
    hidden = _width(up)
    if down.in_features != hidden or (gate is not None and _width(gate) != hidden):
        return _fail(WIDTH_MISMATCH, down.op_node, f"up {hidden}, down {down.in_features}")
    path = g.common_path([g.module_path(up.op_node), g.module_path(down.op_node)])
    return FFNRegion(
        layer=-1, module_path=path, kind=kind, x_in=up.x_in, up=up, down=down, gate=gate, act=act,
        dim=up.in_features, hidden_dim=hidden, input_norm=norm_producing(norms, up.x_in),
        activation=activation_name(act),
    )


def find_ffn(gm: fx.GraphModule, norms) -> tuple[list[FFNRegion], list[MatchFailure]]:
    """(regions, failures) for every projection of ``gm`` that could be an FFN down projection."""
    regions, failures = [], []
    for node in gm.graph.nodes:
        if not g.is_op(node, aten.linear, aten.addmm, aten.mm, aten.matmul):
            continue
        down = g.linear_at(node)
        if down is None:
            continue
        found = match_ffn(down, norms)
        if isinstance(found, FFNRegion):
            regions.append(found)
        elif isinstance(found, MatchFailure):
            failures.append(found)
    return regions, failures
