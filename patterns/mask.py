"""Causal and sliding-window mask recognition by evaluation, not by template.

A mask is accepted only when it depends on nothing but shapes: its ancestors may reach the graph
inputs only through shape queries (``sym_size``, ``*_like`` constructors), and may read buffers but no
parameters. Its ancestor subgraph is then copied into a small GraphModule and evaluated on CPU at a
few concrete (B, T) sizes; the resulting (T, T) pattern, broadcast over batch and heads, is compared
with the lower-triangular (causal) and banded (sliding window ``w``: keys ``i - w < j <= i``) patterns.

Mask forms (``MaskKind``): additive float (0 where allowed, -inf or very negative elsewhere), bool with
True = attend (SDPA ``attn_mask``, ``where(m, scores, -inf)``), bool with True = masked out
(``masked_fill(m, -inf)``, ``where(m, -inf, scores)``).

Does not handle: windows at least as long as the largest probe (``PROBE_SIZES``) look causal; masks
built from buffers that live on the meta device cannot be evaluated and are rejected.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import sympy
import torch
from torch import fx, nn

from condfx.patterns import _graph as g
from condfx.patterns.regions import MatchFailure

aten = torch.ops.aten

NOT_CAUSAL = "mask is not causal"
DATA_DEPENDENT = "mask depends on input data"
PARAMETER_DEPENDENT = "mask depends on a parameter"
META_BUFFER = "mask buffer is on the meta device"
NOT_EVALUABLE = "mask could not be evaluated"
NOT_PURE = "additive mask has finite non-zero values"

# (B, T) probes. The last one is large so that long sliding windows are told apart from causal;
# it is skipped (not an error) when the mask cannot be built at that length (e.g. a short buffer).
PROBE_SIZES = ((1, 5), (2, 9), (1, 4099))
_VERY_NEGATIVE = -1e4

# Ops that read only the shape (not the values) of a graph input.
_SHAPE_ONLY = {aten.sym_size, aten.sym_numel, aten.sym_stride, aten.size, aten.ones_like, aten.zeros_like,
               aten.full_like, aten.new_ones, aten.new_zeros, aten.new_full, aten.arange}


class MaskKind(enum.Enum):
    ADDITIVE = "additive"  # float added to the scores
    KEEP = "keep"  # bool, True = attend
    DROP = "drop"  # bool, True = masked out


@dataclass(frozen=True)
class MaskInfo:
    """What a mask allows: causal attention, optionally restricted to a sliding window."""

    causal: bool
    window: int | None = None


def _fail(reason: str, node: fx.Node, detail: str = "") -> MatchFailure:
    return MatchFailure(reason, node, detail, "attention")


class MaskAnalyzer:
    """Classifies mask nodes of one graph; results are cached per node and per subgraph structure."""

    def __init__(self, gm: fx.GraphModule, order: dict[fx.Node, int] | None = None):
        self.gm = gm
        self.order = order if order is not None else g.node_order(gm)
        self._by_node: dict[tuple[fx.Node, MaskKind], MaskInfo | MatchFailure] = {}
        self._by_structure: dict[tuple, MaskInfo | MatchFailure] = {}

    def analyze(self, node: fx.Node, kind: MaskKind) -> MaskInfo | MatchFailure:
        """Classifies the mask ``node`` used as ``kind``.

        Returns:
            MaskInfo when the mask is causal (possibly windowed), else a MatchFailure with reason.
        """
        key = (node, kind)
        if key not in self._by_node:
            self._by_node[key] = self._analyze(node, kind)
        return self._by_node[key]

    def probe_sizes(self, node: fx.Node) -> tuple[tuple[int, int], ...]:
        """The (B, T) sizes ``node`` is evaluated at: its traced size when static, else ``PROBE_SIZES``."""
        shape = g.val(node).shape if isinstance(g.val(node), torch.Tensor) else ()
        if len(shape) >= 2 and all(isinstance(d, int) for d in shape):
            return ((1, int(shape[-1])),)  # a static graph: the mask exists at its traced size only
        return PROBE_SIZES

    def evaluate(self, node: fx.Node, b: int, t: int) -> torch.Tensor | MatchFailure:
        """The value of the shape-only subgraph ending at ``node`` at batch ``b`` and length ``t``.

        Returns:
            The tensor, or a MatchFailure when ``node`` reads input data or a parameter, or fails to run.
        """
        ancestors = self._ancestors(node)
        if isinstance(ancestors, MatchFailure):
            return ancestors
        sub = _extract(self.gm, ancestors, node)
        roles = self._roles()
        try:
            with torch.no_grad():
                return sub(*[_probe_input(p, b, t, roles) for p in ancestors if p.op == "placeholder"])
        except Exception as exc:  # evaluation of arbitrary user code: any error means "unknown"
            return _fail(NOT_EVALUABLE, node, f"{type(exc).__name__}: {exc}"[:200])

    def _analyze(self, node: fx.Node, kind: MaskKind) -> MaskInfo | MatchFailure:
        ancestors = self._ancestors(node)
        if isinstance(ancestors, MatchFailure):
            return ancestors
        structure = (kind, *self._structure(ancestors))
        if structure not in self._by_structure:
            self._by_structure[structure] = self._evaluate(node, ancestors, kind)
        return self._by_structure[structure]

    def _ancestors(self, node: fx.Node) -> list[fx.Node] | MatchFailure:
        seen, stack = {node}, [node]
        while stack:
            n = stack.pop()
            for inp in n.all_input_nodes:
                if inp.op == "placeholder" and isinstance(g.val(inp), (torch.SymInt, int)):
                    continue  # a size passed as an input (Dynamo graphs): a shape, not data
                if inp.op == "placeholder" and g.packet(n) not in _SHAPE_ONLY:
                    return _fail(DATA_DEPENDENT, node, f"{n.name} reads input {inp.name}")
                if inp.op == "get_attr" and (bad := self._bad_attr(inp)) is not None:
                    return _fail(bad, node, inp.name)
                if inp not in seen:
                    seen.add(inp)
                    stack.append(inp)
        return sorted(seen, key=self.order.__getitem__)

    def _bad_attr(self, node: fx.Node) -> str | None:
        value = g.get_attr_value(self.gm, node)
        if isinstance(value, nn.Parameter):
            return PARAMETER_DEPENDENT
        if isinstance(value, torch.Tensor) and value.device.type == "meta":
            return META_BUFFER
        return None

    def _structure(self, nodes: list[fx.Node]) -> tuple:
        local = {n: i for i, n in enumerate(nodes)}

        def canon(a):
            if isinstance(a, fx.Node):
                return ("%", local[a])
            if isinstance(a, (list, tuple)):
                return tuple(canon(x) for x in a)
            return repr(a)

        return tuple(
            (n.op, str(n.target), canon(n.args), tuple(sorted((k, canon(v)) for k, v in n.kwargs.items())))
            for n in nodes
        )

    def _roles(self) -> dict[sympy.Symbol, str]:
        """Which size symbols are the batch ("b") and which the sequence ("t"), from the token input."""
        roles: dict[sympy.Symbol, str] = {}
        for p in self.gm.graph.find_nodes(op="placeholder"):
            v = g.val(p)
            if isinstance(v, torch.Tensor) and v.dim() >= 2:
                for i, d in enumerate(v.shape[:2]):
                    if isinstance(d, torch.SymInt):
                        for sym in d.node.expr.free_symbols:
                            roles.setdefault(sym, "b" if i == 0 else "t")
        return roles

    def _evaluate(self, node: fx.Node, nodes: list[fx.Node], kind: MaskKind) -> MaskInfo | MatchFailure:
        sub = _extract(self.gm, nodes, node)
        placeholders = [n for n in nodes if n.op == "placeholder"]
        roles = self._roles()
        probes = PROBE_SIZES
        shape = g.val(node).shape if isinstance(g.val(node), torch.Tensor) else ()
        if len(shape) >= 2 and all(isinstance(d, int) for d in shape):
            probes = ((1, int(shape[-1])),)  # a static graph: the mask exists at its traced size only
        windows = []
        for i, (b, t) in enumerate(probes):
            try:
                with torch.no_grad():
                    value = sub(*[_probe_input(p, b, t, roles) for p in placeholders])
                allowed = _allowed(value, kind, t)
            except Exception as exc:  # evaluation of arbitrary user code: any error means "unknown"
                if i == len(probes) - 1 and len(probes) > 1:
                    continue
                traced = self._traced_size()
                if i == 0 and traced is not None and len(probes) > 1:
                    return self._at_traced_size(node, sub, placeholders, kind, traced, exc)
                return _fail(NOT_EVALUABLE, node, f"{type(exc).__name__}: {exc}"[:200])
            if isinstance(allowed, str):
                return _fail(allowed, node, f"at (B, T) = ({b}, {t})")
            window = window_of(allowed)
            if window is None:
                return _fail(NOT_CAUSAL, node, f"at (B, T) = ({b}, {t})")
            windows.append(window)
        finite = {w for w, t in zip(windows, (t for _, t in probes), strict=False) if w < t}
        if len(finite) > 1:
            return _fail(NOT_CAUSAL, node, "window changes with length")
        return MaskInfo(True, finite.pop() if finite else None)


    def _traced_size(self) -> tuple[int, int] | None:
        """(B, T) of the example the graph was captured with, or None."""
        shapes = (self.gm.meta.get("condfx") or {}).get("example_shapes") or []
        return tuple(int(d) for d in shapes[0][:2]) if shapes and len(shapes[0]) >= 2 else None

    def _at_traced_size(self, node, sub, placeholders, kind, traced, exc) -> MaskInfo | MatchFailure:
        """A mask built partly at the captured length (Jamba, RecurrentGemma: a buffer or shape fixed
        at trace time) exists at that length only: it is judged there, and named when it fails."""
        b, t = traced
        why = f"part of the mask is fixed at the captured length {t} ({type(exc).__name__}: {exc})"[:200]
        try:
            with torch.no_grad():
                allowed = _allowed(sub(*[_probe_input(p, b, t, self._roles()) for p in placeholders]), kind, t)
        except Exception:  # noqa: BLE001 (arbitrary user code)
            return _fail(NOT_EVALUABLE, node, why)
        window = window_of(allowed) if not isinstance(allowed, str) else None
        if window is None:
            return _fail(NOT_EVALUABLE, node, why)
        return MaskInfo(True, window if window < t else None)


def _extract(gm: fx.GraphModule, nodes: list[fx.Node], out: fx.Node) -> fx.GraphModule:
    """Copies ``nodes`` (topologically sorted, closed under inputs) into a CPU-only GraphModule."""
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    cpu = torch.device("cpu")

    def on_cpu(a):
        return cpu if isinstance(a, torch.device) else a

    for n in nodes:
        copied = graph.node_copy(n, lambda x: env[x])
        if n.op == "call_function":
            copied.args = fx.node.map_aggregate(copied.args, on_cpu)
            copied.kwargs = fx.node.map_aggregate(copied.kwargs, on_cpu)
        env[n] = copied
    graph.output(env[out])
    return fx.GraphModule(gm, graph)


def _concrete(d, default: str, b: int, t: int, roles: dict) -> int:
    """A size (int or SymInt) with its symbols replaced by the probe's batch ``b`` or length ``t``."""
    if not isinstance(d, torch.SymInt):
        return int(d)
    expr = d.node.expr
    subs = {s: (b if roles.get(s, default) == "b" else t) for s in expr.free_symbols}
    return int(expr.subs(subs)) if subs else int(sympy.Integer(expr))


def _probe_input(node: fx.Node, b: int, t: int, roles: dict | None = None):
    """A probe value for placeholder ``node``: zeros of its shape, or its size, at batch b / length t.

    Symbols are mapped through ``roles`` (batch or sequence); unknown ones count as batch in dim 0 and
    as sequence elsewhere. A SymInt placeholder (a size passed as input) becomes an int.
    """
    roles = roles or {}
    v = g.val(node)
    if isinstance(v, torch.SymInt):
        return _concrete(v, "t", b, t, roles)
    if not isinstance(v, torch.Tensor):
        return v
    sizes = [_concrete(d, "b" if i == 0 else "t", b, t, roles) for i, d in enumerate(v.shape)]
    return torch.zeros(sizes, dtype=v.dtype)


def _rows(t: int) -> torch.Tensor:
    """Query rows to check: all of them for small probes, the first and last few for large ones."""
    if t <= 64:
        return torch.arange(t)
    return torch.cat([torch.arange(8), torch.arange(t - 8, t)])


def _allowed(value, kind: MaskKind, t: int) -> torch.Tensor | str:
    """The bool pattern of allowed (query, key) pairs on rows ``_rows(t)``, or a failure reason."""
    if not isinstance(value, torch.Tensor) or value.dim() < 2:
        return NOT_CAUSAL
    value = torch.broadcast_to(value, (*value.shape[:-2], t, t)).reshape(-1, t, t)
    value = value[:, _rows(t)]
    if kind is MaskKind.ADDITIVE and value.is_floating_point() and bool(
            ((value > _VERY_NEGATIVE) & (value != 0)).any()):
        return NOT_PURE  # a position bias (ALiBi: MPT, Falcon), per head or not
    if not bool((value == value[:1]).all()):
        return NOT_CAUSAL  # differs across batch or heads
    plane = value[0]
    if kind is MaskKind.ADDITIVE:
        if plane.dtype == torch.bool:
            return NOT_CAUSAL
        allowed = plane > _VERY_NEGATIVE
        if bool((plane[allowed] != 0).any()):
            return NOT_PURE
        return allowed
    plane = plane.bool()
    return plane if kind is MaskKind.KEEP else ~plane


def window_of(allowed: torch.Tensor) -> int | None:
    """The window ``w`` of a banded causal pattern (``T`` for plain causal), or None if neither."""
    t = allowed.shape[-1]
    w = int(allowed[-1].sum())
    if w < 1:
        return None
    i = _rows(t).unsqueeze(1)
    j = torch.arange(t).unsqueeze(0)
    band = (j <= i) & (j > i - w)
    return w if torch.equal(allowed, band) else None
