"""The ``torch.compile`` backend: ``torch.compile(model, backend="condfx", options={"passes": SPEC})``.

Dynamo hands the backend one FX graph per compiled region (a graph break gives several). For each
graph the backend:

1. retraces it to ATen *before* autograd with the tracer ``torch.export`` uses for its training IR
   (``make_fx(pre_dispatch=True)``, node metadata preserved) under the backend's FakeTensorMode
   (Dynamo's ShapeEnv). ``aot_export_module(pre_dispatch=True)`` was tried first: it functionalizes,
   which decomposes ``aten.reshape`` into ``aten.view`` of the *original* attention output's strides,
   and that view fails once the core is replaced;
2. turns the parameter and buffer placeholders into ``get_attr`` nodes named by their original
   dotted names (``layers.0.attention.wq.weight``), holding the very same tensors;
3. runs the requested passes on that graph, aggregating their reports over graphs;
4. turns the ``get_attr`` nodes back into the original placeholders, so the rewritten graph takes
   exactly the inputs Dynamo's graph took, and hands it to Inductor (``compile_fx``), or returns it
   to run eagerly (``inductor=False``).

Why this route (the least special-casing): pre-dispatch tracing keeps ``aten.scaled_dot_product_attention``
and ``aten.linear`` intact, and with step 2 the graph *is* condfx's canonical IR (the one
``condfx.capture`` gets from ``torch.export``, which uses the same tracer), so every pass and region
finder runs unchanged: no decomposed SDPA variants (``_scaled_dot_product_flash_attention_for_cpu``,
...) and no placeholder weights to teach the patterns, and passes that read weight values or add
parameters work as they do on captured graphs. Rewriting before autograd also keeps training right:
Inductor's own AOTAutograd differentiates through ``condfx.attention`` (it has autograd), whereas
rewriting only the forward half of an already-partitioned joint graph would leave the backward
reading the original ops' saved tensors.

Options:
    passes: the pipeline spec (text, spec-file path or list), validated with the pipeline's parser
        before anything is traced; a bad spec raises ValueError (Dynamo wraps it in
        ``BackendCompilerFailed``; ``compile_model`` raises it at ``torch.compile`` time instead).
    inductor: compile the rewritten graph with Inductor (default True) or run it eagerly.
    report: a ``CompileReport`` that collects one entry per compiled graph. When absent, the
        backend stores a fresh one under ``options["report"]``; ``report_of(compiled)`` finds it.

A pass that matches nothing in one graph is not an error (another graph may match). When a graph that
ends its frame has been compiled (Dynamo's compile reason is not a graph break) and a requested pass
has rewritten nothing in any graph so far, a ``UserWarning`` names it; ``report.unmatched_passes``
always has the up-to-date answer. Caveat: when Dynamo gives up on a frame and compiles its callees
one by one (a graph break inside a loop), an early callee graph can trigger the warning too soon,
and a block graph reused for every layer counts its rewrites once.

Does not handle: graphs that mutate their inputs (e.g. in-place KV-cache updates; they are compiled
unchanged and the report says so), and reports across ``torch._dynamo.reset()``: a report keeps
accumulating, and a recompilation (new shapes) adds another entry.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn

from condfx.passes.base import Pass, PassReport
from condfx.passes.pipeline import build_passes, run_pass

_OPTION_NAMES = ("passes", "inductor", "report")
_NOISE_TARGETS = (torch.ops.aten._assert_tensor_metadata.default,)


@dataclass(frozen=True)
class GraphReport:
    """What the passes did to one graph Dynamo compiled.

    Attributes:
        index: position in compile order (0-based).
        compile_id: Dynamo's compile id (``"frame/compile"``), "" when unknown.
        reports: one PassReport per requested pass (empty when the graph was not rewritten).
        graph_break: True when Dynamo compiled this graph because of a graph break.
        not_rewritten: why the passes did not run on this graph ("" when they did).
    """

    index: int
    compile_id: str
    reports: tuple[PassReport, ...]
    graph_break: bool
    not_rewritten: str = ""

    def rewritten(self, pass_name: str | None = None) -> int:
        """Regions rewritten in this graph, by ``pass_name`` or by all passes."""
        return sum(r.rewritten for r in self.reports if pass_name in (None, r.pass_name))


class CompileReport:
    """Collects the pass reports of every graph compiled with one set of backend options.

    Attributes:
        graphs: one GraphReport per compiled graph, in compile order (recompilations included).
        requested: the names of the requested passes, in pipeline order.
    """

    def __init__(self) -> None:
        self.graphs: list[GraphReport] = []
        self.requested: tuple[str, ...] = ()
        self._warned: set[str] = set()

    def rewritten(self, pass_name: str | None = None) -> int:
        """Regions rewritten over all graphs, by ``pass_name`` or by all passes."""
        return sum(g.rewritten(pass_name) for g in self.graphs)

    @property
    def unmatched_passes(self) -> tuple[str, ...]:
        """Requested passes that have rewritten nothing in any graph compiled so far."""
        return tuple(p for p in self.requested if self.rewritten(p) == 0)

    def add(self, graph: GraphReport) -> None:
        """Appends one graph's report."""
        self.graphs.append(graph)

    def warn_unmatched(self) -> tuple[str, ...]:
        """Warns once per pass that has rewritten nothing in any graph; returns those passes."""
        unmatched = self.unmatched_passes
        for name in unmatched:
            if name in self._warned:
                continue
            self._warned.add(name)
            skips = sorted({s for g in self.graphs for r in g.reports if r.pass_name == name
                            for s, _ in r.skipped})
            why = f" (skipped: {', '.join(skips)})" if skips else ""
            msg = (f"condfx pass '{name}' rewrote nothing in any of the {len(self.graphs)} compiled "
                   f"graph(s){why}; the model runs without it.")
            warnings.warn(msg, UserWarning, stacklevel=2)
        return unmatched

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict: per graph, the pass reports."""
        graphs = [
            {"index": g.index, "compile_id": g.compile_id, "graph_break": g.graph_break,
             "not_rewritten": g.not_rewritten, "passes": [r.to_dict() for r in g.reports]}
            for g in self.graphs
        ]
        return {"requested": list(self.requested), "unmatched_passes": list(self.unmatched_passes),
                "graphs": graphs}

    def to_markdown(self) -> str:
        """A summary table (rewrites per graph and pass) followed by nothing else."""
        head = ["graph", "compile id", *self.requested]
        lines = ["## condfx compile report", "", "| " + " | ".join(head) + " |",
                 "|" + "---|" * len(head)]
        for g in self.graphs:
            cells = [str(g.rewritten(p)) if not g.not_rewritten else g.not_rewritten
                     for p in self.requested]
            lines.append("| " + " | ".join([str(g.index), g.compile_id or "-", *cells]) + " |")
        total = [str(self.rewritten(p)) for p in self.requested]
        lines.append("| " + " | ".join(["total", "", *total]) + " |")
        if self.unmatched_passes:
            lines += ["", f"Unmatched passes: {', '.join(self.unmatched_passes)}"]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.to_markdown()

    def __repr__(self) -> str:
        return f"CompileReport(graphs={len(self.graphs)}, rewritten={self.rewritten()})"


@dataclass(frozen=True)
class BackendOptions:
    """The backend's options, validated.

    Attributes:
        passes: the configured passes, in order.
        inductor: compile the rewritten graphs with Inductor.
        report: where per-graph reports go.
    """

    passes: tuple[Pass, ...]
    inductor: bool
    report: CompileReport

    @classmethod
    def parse(cls, options: Mapping[str, Any] | None) -> BackendOptions:
        """Validates ``options`` (the dict given to ``torch.compile``).

        Raises:
            ValueError: a missing or malformed ``passes`` spec, or an unknown option.
            TypeError: ``inductor`` is not a bool or ``report`` is not a CompileReport.
        """
        options = {} if options is None else options
        if not isinstance(options, Mapping):
            msg = f"condfx backend options must be a dict; got {type(options).__name__}."
            raise TypeError(msg)
        unknown = sorted(set(options) - set(_OPTION_NAMES))
        if unknown:
            msg = f"condfx backend has no option {unknown[0]!r}; allowed options: {', '.join(_OPTION_NAMES)}."
            raise ValueError(msg)
        if not options.get("passes"):
            msg = "condfx backend needs options={'passes': SPEC}, e.g. 'fuse-attention'; got none."
            raise ValueError(msg)
        passes = tuple(build_passes(options["passes"]))
        inductor = options.get("inductor", True)
        if not isinstance(inductor, bool):
            msg = f"condfx backend option 'inductor' must be a bool; got {inductor!r}."
            raise TypeError(msg)
        report = options.get("report")
        if report is not None and not isinstance(report, CompileReport):
            msg = f"condfx backend option 'report' must be a CompileReport; got {type(report).__name__}."
            raise TypeError(msg)
        return cls(passes, inductor, report if report is not None else CompileReport())


# ---- tracing to the canonical IR and back ----


def _fake_inputs(gm: fx.GraphModule, example_inputs: Sequence[Any]):
    """(fake mode, the inputs as fakes of the backend's FakeTensorMode), in placeholder order."""
    from torch._guards import detect_fake_mode

    fake_mode = detect_fake_mode(example_inputs)
    if fake_mode is None:  # called outside torch.compile (tests, a GraphModule from elsewhere)
        fake_mode = torch._subclasses.FakeTensorMode(allow_non_fake_inputs=True)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    fakes = []
    for node, real in zip(placeholders, example_inputs, strict=True):
        if isinstance(real, torch.Tensor):
            fakes.append(real if isinstance(real, torch._subclasses.FakeTensor) else fake_mode.from_tensor(real))
        else:  # SymInt inputs of dynamic graphs: Dynamo's own symbols
            fakes.append(node.meta.get("example_value", real))
    return fake_mode, fakes


def _trace_aten(gm: fx.GraphModule, example_inputs: Sequence[Any]) -> fx.GraphModule:
    """Dynamo's graph retraced to pre-dispatch ATen: the tracer and IR of ``torch.export``."""
    from torch.fx import traceback as fx_traceback
    from torch.fx.experimental.proxy_tensor import make_fx

    fake_mode, fakes = _fake_inputs(gm, example_inputs)

    def run(*args):
        return fx.Interpreter(gm).run(*args)

    # preserve_node_meta carries nn_module_stack / stack_trace from Dynamo's nodes to the ATen nodes.
    with fx_traceback.preserve_node_meta(), fake_mode:
        aten_gm = make_fx(run, pre_dispatch=True)(*fakes)
    for node in list(aten_gm.graph.nodes):
        if node.op != "call_function":
            continue
        if node.target in _NOISE_TARGETS and not node.users:
            aten_gm.graph.erase_node(node)
        elif "val" not in node.meta and not node.users:
            node.meta["val"] = None  # e.g. torch._C._set_grad_enabled: returns None (as torch.export does)
    aten_gm.graph.lint()
    aten_gm.recompile()
    return aten_gm


def _base_of(node: Any) -> Any:
    """The tensor ``node`` aliases, walking back through view ops (whose first argument is aliased)."""
    while isinstance(node, fx.Node) and node.op == "call_function" and node.args:
        schema = getattr(node.target, "_schema", None)
        info = schema.arguments[0].alias_info if schema is not None and schema.arguments else None
        if info is None or info.is_write:
            return node
        node = node.args[0]
    return node


def _mutates_inputs(aten_gm: fx.GraphModule) -> bool:
    """True when an in-place op writes to a graph input or a view of one (e.g. a KV-cache update)."""
    for node in aten_gm.graph.nodes:
        schema = getattr(node.target, "_schema", None)
        if node.op != "call_function" or schema is None or not schema.is_mutable:
            continue
        written = [a for a, s in zip(node.args, schema.arguments, strict=False) if s.alias_info and s.alias_info.is_write]
        if any(getattr(_base_of(a), "op", None) == "placeholder" for a in written):
            return True
    return False


def _state_names(gm: fx.GraphModule, example_inputs: Sequence[Any]) -> list[str | None]:
    """Per Dynamo placeholder: the original dotted name of the parameter / buffer it is, or None."""
    fqns = gm.meta.get("dynamo_flat_name_to_original_fqn", {})
    names = []
    for node, real in zip((n for n in gm.graph.nodes if n.op == "placeholder"), example_inputs, strict=True):
        fqn = fqns.get(str(node.target)) or fqns.get(node.name)
        names.append(fqn if fqn and isinstance(real, torch.Tensor) else None)
    return names


def _set_attr(root: nn.Module, fqn: str, tensor: torch.Tensor) -> None:
    *path, leaf = fqn.split(".")
    mod = root
    for part in path:
        if not hasattr(mod, part):
            mod.add_module(part, nn.Module())
        mod = getattr(mod, part)
    if isinstance(tensor, nn.Parameter):
        mod.register_parameter(leaf, tensor)
    else:
        mod.register_buffer(leaf, tensor)


def _lift_state(aten_gm: fx.GraphModule, names, example_inputs) -> dict[str, fx.Node]:
    """Reroutes parameter/buffer placeholders through get_attr nodes; returns fqn -> placeholder."""
    placeholders = [n for n in aten_gm.graph.nodes if n.op == "placeholder"]
    lifted = {}
    for node, fqn, real in zip(placeholders, names, example_inputs, strict=True):
        if fqn is None or fqn in lifted or not node.users:
            continue
        _set_attr(aten_gm, fqn, real)
        with aten_gm.graph.inserting_after(placeholders[-1]):
            attr = aten_gm.graph.get_attr(fqn)
        attr.meta.update(node.meta)
        node.replace_all_uses_with(attr)
        lifted[fqn] = node
    aten_gm.graph.lint()
    aten_gm.recompile()
    return lifted


def _lower_state(aten_gm: fx.GraphModule, lifted: Mapping[str, fx.Node]) -> None:
    """Turns the get_attr nodes of ``_lift_state`` back into their placeholders; drops the attributes."""
    for node in list(aten_gm.graph.nodes):
        if node.op == "get_attr" and node.target in lifted:
            node.replace_all_uses_with(lifted[node.target])
            aten_gm.graph.erase_node(node)
    for fqn in lifted:
        owner, _, leaf = fqn.rpartition(".")
        mod = aten_gm.get_submodule(owner) if owner else aten_gm
        delattr(mod, leaf)
    aten_gm.delete_all_unused_submodules()
    aten_gm.graph.lint()
    aten_gm.recompile()


def _run_passes(passes: Sequence[Pass], gm: fx.GraphModule) -> tuple[PassReport, ...]:
    """Runs each pass with its invariant hooks; a pass matching nothing is reported, not raised."""
    reports = []
    for i, p in enumerate(passes):
        result = run_pass(p, gm, tuple(q.name for q in passes[:i]))
        gm = result.graph_module
        reports.append(result.report)
    return tuple(reports)


def _rewrite(gm: fx.GraphModule, example_inputs, opts: BackendOptions) -> tuple[fx.GraphModule, GraphReport]:
    """The rewritten graph (same inputs and outputs as ``gm``) and its report."""
    reason = getattr(gm, "compile_subgraph_reason", None)
    compile_id = str(gm.meta.get("dynamo_compile_id") or "")
    graph_break = bool(getattr(reason, "graph_break", False))
    index = len(opts.report.graphs)
    aten_gm = _trace_aten(gm, example_inputs)
    if _mutates_inputs(aten_gm):
        skipped = GraphReport(index, compile_id, (), graph_break, "graph mutates its inputs")
        return gm, skipped
    lifted = _lift_state(aten_gm, _state_names(gm, example_inputs), example_inputs)
    reports = _run_passes(opts.passes, aten_gm)
    _lower_state(aten_gm, lifted)
    return aten_gm, GraphReport(index, compile_id, reports, graph_break)


def condfx_backend(gm: fx.GraphModule, example_inputs: Sequence[Any], options: Mapping[str, Any] | None = None) -> Callable:
    """The Dynamo backend (entry point ``torch_dynamo_backends: condfx``).

    Args:
        gm: the FX graph Dynamo captured (one per compiled region).
        example_inputs: its inputs (parameters and buffers included).
        options: ``{"passes": SPEC, "inductor": bool, "report": CompileReport}`` (module docstring).

    Returns:
        A callable with ``gm``'s signature: the rewritten graph, compiled by Inductor or not.

    Raises:
        ValueError, TypeError: bad options, before anything is traced.
        PassError: a pass failed or broke a graph invariant.
    """
    opts = BackendOptions.parse(options)
    if isinstance(options, dict) and options.get("report") is None:
        options["report"] = opts.report  # so report_of(compiled) can find it; documented above
    opts.report.requested = tuple(p.name for p in opts.passes)
    rewritten, graph_report = _rewrite(gm, example_inputs, opts)
    opts.report.add(graph_report)
    if not graph_report.graph_break:
        opts.report.warn_unmatched()
    if not opts.inductor:
        return rewritten
    from torch._inductor.compile_fx import compile_fx

    return compile_fx(rewritten, list(example_inputs))


def compile_model(model: Callable, passes: Any, *, inductor: bool = True,
                  report: CompileReport | None = None, **compile_kwargs: Any) -> Callable:
    """``torch.compile(model, backend="condfx", ...)`` with the options validated right away.

    Args:
        model: the module or function to compile.
        passes: the pipeline spec.
        inductor: compile the rewritten graphs with Inductor.
        report: the CompileReport to fill; a fresh one when None (``report_of`` finds it).
        **compile_kwargs: passed to ``torch.compile`` (``dynamic``, ``fullgraph``, ...).

    Returns:
        The compiled model.

    Raises:
        ValueError, TypeError: bad options, at once.
    """
    options = {"passes": passes, "inductor": inductor, "report": report or CompileReport()}
    BackendOptions.parse(options)
    return torch.compile(model, backend=condfx_backend, options=options, **compile_kwargs)


def report_of(compiled: Any) -> CompileReport:
    """The CompileReport of a model compiled with ``backend="condfx"``.

    Reads the options ``torch.compile`` keeps on its backend wrapper (checked on torch 2.13).

    Raises:
        ValueError: ``compiled`` was not compiled with the condfx backend.
    """
    obj = getattr(getattr(compiled, "dynamo_ctx", None), "callback", None)
    if obj is None:
        obj = getattr(compiled, "_torchdynamo_orig_callable", None)
    for _ in range(8):
        options = (getattr(obj, "kwargs", None) or {}).get("options")
        if isinstance(options, Mapping) and isinstance(options.get("report"), CompileReport):
            return options["report"]
        obj = getattr(obj, "_torchdynamo_orig_backend", None) or getattr(obj, "__wrapped__", None)
        if obj is None:
            break
    msg = (f"{type(compiled).__name__} carries no condfx compile report: compile it with "
           "torch.compile(..., backend='condfx', options={'passes': ...}) and run it first.")
    raise ValueError(msg)


__all__ = ["BackendOptions", "CompileReport", "GraphReport", "compile_model", "condfx_backend", "report_of"]
