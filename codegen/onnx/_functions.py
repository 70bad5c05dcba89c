"""Shared machinery for ONNX lowerings of ``torch.ops.condfx.*``: the ``Lowering`` record, the FX
rewrite that routes each custom op to its ONNX node, and attaching the ONNX local functions.

How a condfx op reaches ONNX (DESIGN.md "Custom ops are the contract"):
    1. ``lower_custom_ops`` copies the graph and retargets every ``condfx`` node to its lowering's
       ``emit``, which calls ``torch.onnx.ops.symbolic("condfx::<OpType>", ...)`` during export.
       ``torch.onnx.export(dynamo=True)`` turns that into one ``condfx``-domain node.
    2. ``attach_functions`` appends the op's ``FunctionProto`` (its body: the reference decomposed
       into standard ops) to the exported ModelProto, so stock ONNX Runtime and ONNX shape inference
       see through the node.

Why not ``custom_translation_table`` with an onnxscript function (which the exporter would attach
by itself): torch 2.13's ``torch.onnx.export`` always runs onnxscript's version converter (even at
the target opset), and that pass inlines every model-local function, so the ``condfx::*`` nodes
vanish from the saved model (checked 2025-11 with torch 2.13 / onnxscript 0.7.2). Nodes emitted by
``torch.onnx.ops.symbolic`` carry no function, survive the converter, and get theirs attached after.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import onnx
import torch
from torch import fx

DOMAIN = "condfx"
DOMAIN_VERSION = 1
# Lowest standard opset a function body may be retargeted to; bodies are written against opset 18.
MIN_OPSET = 18


@dataclass(frozen=True)
class Lowering:
    """How one ``torch.ops.condfx.*`` overload becomes ONNX.

    Attributes:
        op_type: the ONNX node type in the ``condfx`` domain, e.g. ``"Attention"``.
        emit: torch-side emitter with the op's signature; under ``torch.onnx.export`` it calls
            ``torch.onnx.ops.symbolic`` (elsewhere it runs the op itself).
        build_function: returns the ONNX local function (``FunctionProto``, domain ``condfx``,
            name ``op_type``) whose body computes the op in standard ops at opset ``MIN_OPSET``;
            or a list of functions when ``emit`` picks one of several node types by an argument
            (``condfx::quantized_stream``: per token or per channel).
        domain: ONNX domain of the node and function.
        version: version of ``domain`` the model imports.
    """

    op_type: str
    emit: Callable[..., torch.Tensor]
    build_function: Callable[[], onnx.FunctionProto]
    domain: str = DOMAIN
    version: int = DOMAIN_VERSION

    @property
    def qualified_name(self) -> str:
        """``"condfx::Attention"``."""
        return f"{self.domain}::{self.op_type}"


def is_condfx_op(node: fx.Node) -> bool:
    """True for a ``call_function`` node whose target is a ``torch.ops.condfx.*`` overload."""
    target = node.target
    return (
        node.op == "call_function"
        and isinstance(target, torch._ops.OpOverload)
        and target.namespace == DOMAIN
    )


def _copy_graph_module(gm: fx.GraphModule) -> fx.GraphModule:
    """A new GraphModule over a copy of ``gm.graph`` that shares ``gm``'s parameters and buffers."""
    graph = fx.Graph()
    with warnings.catch_warnings():
        # deepcopy of export's pytree specs trips a LeafSpec FutureWarning (torch 2.13); harmless.
        warnings.simplefilter("ignore", FutureWarning)
        graph._codegen = copy.deepcopy(gm.graph._codegen)  # keeps the pytree in/out specs
    result, old_output = graph.graph_copy(gm.graph, {}, return_output_node=True)
    graph.output(result, type_expr=old_output.type).meta.update(old_output.meta)
    new = fx.GraphModule(gm, graph, class_name=type(gm).__name__)
    new.meta.update(gm.meta)
    return new


def lower_custom_ops(
    gm: fx.GraphModule, lowerings: Mapping[torch._ops.OpOverload, Lowering]
) -> tuple[fx.GraphModule, dict[str, int]]:
    """Returns a copy of ``gm`` whose ``condfx`` op nodes call their lowering's ``emit``.

    ``gm`` itself is not modified; the copy shares its parameters.

    Args:
        gm: a GraphModule, possibly containing ``torch.ops.condfx.*`` nodes.
        lowerings: the table from op overload to Lowering (``codegen.onnx.LOWERINGS``).

    Returns:
        (the lowered copy, counts of emitted nodes keyed by ``"condfx::OpType"``).

    Raises:
        ValueError: a ``condfx`` op has no lowering; the message names it and lists those that do.
    """
    used = {str(n.target) for n in gm.graph.nodes if is_condfx_op(n)}
    missing = sorted(used - set(map(str, lowerings)))
    if missing:
        known = ", ".join(sorted(map(str, lowerings))) or "none"
        msg = f"No ONNX lowering for {', '.join(missing)}; ops with lowerings: {known}."
        raise ValueError(msg)
    lowered = _copy_graph_module(gm)
    counts: dict[str, int] = {}
    for node in lowered.graph.nodes:
        if not is_condfx_op(node):
            continue
        lowering = lowerings[node.target]
        node.target = lowering.emit
        counts[lowering.qualified_name] = counts.get(lowering.qualified_name, 0) + 1
    lowered.recompile()
    return lowered, counts


def retarget_function(function: onnx.FunctionProto, opset: int) -> onnx.FunctionProto:
    """A copy of ``function`` importing standard opset ``opset`` (the checker wants the model's).

    Only valid for bodies whose ops keep their semantics from ``MIN_OPSET`` to ``opset``; the
    condfx bodies use such ops only (their newer versions add types, not behaviour).
    """
    if opset < MIN_OPSET:
        msg = f"ONNX opset must be >= {MIN_OPSET} for condfx functions; got {opset}."
        raise ValueError(msg)
    out = onnx.FunctionProto()
    out.CopyFrom(function)
    for imp in out.opset_import:
        if imp.domain in ("", "ai.onnx"):
            imp.version = opset
    return out


def _model_opset(model: onnx.ModelProto, domain: str) -> int | None:
    for imp in model.opset_import:
        if imp.domain == domain or (domain == "" and imp.domain == "ai.onnx"):
            return imp.version
    return None


def used_custom_nodes(model: onnx.ModelProto, domain: str = DOMAIN) -> dict[str, int]:
    """Counts of ``domain`` nodes in the main graph of ``model``, keyed by ``"domain::OpType"``."""
    counts: dict[str, int] = {}
    for node in model.graph.node:
        if node.domain == domain:
            key = f"{domain}::{node.op_type}"
            counts[key] = counts.get(key, 0) + 1
    return counts


def attach_functions(model: onnx.ModelProto, lowerings: Iterable[Lowering]) -> list[str]:
    """Appends the local function of every lowering whose node ``model`` uses, in place.

    Also adds the lowering's domain to ``model.opset_import``. Functions already present are kept.

    Args:
        model: an exported ModelProto.
        lowerings: candidate lowerings; only those with a node in the main graph are attached.

    Returns:
        The qualified names of the functions attached.

    Raises:
        ValueError: the model's standard opset is below ``MIN_OPSET``.
    """
    used = used_custom_nodes(model)
    present = {(f.domain, f.name) for f in model.functions}
    opset = _model_opset(model, "") or MIN_OPSET
    attached = []
    for lowering in lowerings:
        if not any(name.startswith(lowering.qualified_name) for name in used):
            continue
        built = lowering.build_function()
        for function in built if isinstance(built, (list, tuple)) else [built]:
            name = f"{function.domain}::{function.name}"
            if name in used and (function.domain, function.name) not in present:
                model.functions.append(retarget_function(function, opset))
                present.add((function.domain, function.name))
                attached.append(name)
        if _model_opset(model, lowering.domain) is None:
            model.opset_import.append(onnx.helper.make_opsetid(lowering.domain, lowering.version))
    return attached
