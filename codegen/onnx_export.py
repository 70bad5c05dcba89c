"""Export a captured (and possibly rewritten) model to ONNX, with ``condfx``-domain custom ops.

``export_onnx`` takes a GraphModule from ``condfx.capture`` (after any passes) or any module, routes
every ``torch.ops.condfx.*`` node to its lowering (``condfx.codegen.onnx.LOWERINGS``: one
``condfx::<Op>`` node plus an ONNX local function holding the decomposed reference), exports with
``torch.onnx.export(dynamo=True)`` and dynamic batch / sequence, simplifies it
(``condfx.codegen.onnx_peephole``: fewer nodes per decode step on ONNX Runtime), checks the model with the ONNX
checker (full check, shape inference), saves it (external data beyond 2 GB of weights) and, when
asked, compares ONNX Runtime (CPU) with PyTorch on the example and on a second input of a
different batch size and length.

The prefill + decode bundle the runtime loads is written by ``condfx.codegen.bundle`` (which calls
``export_onnx`` twice); ``condfx.export(...)`` / ``condfx export`` (``condfx.export_bundle.export_model``)
captures a model and applies its passes first.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from torch import fx, nn

from condfx.capture import capture, is_captured

# Protobuf cannot serialise a message of 2 GiB or more; keep a margin for the graph itself.
EXTERNAL_DATA_THRESHOLD = (2 << 30) - (64 << 20)
_DYNAMIC_DIM_NAMES = ("batch", "seq")


class ExportError(RuntimeError):
    """torch.onnx.export, the ONNX checker or ONNX Runtime failed on an exported model."""


@dataclass(frozen=True)
class ExportResult:
    """What ``export_onnx`` wrote and how well ONNX Runtime agrees with PyTorch.

    Attributes:
        path: the ``.onnx`` file.
        max_abs_diff: the largest |ORT - PyTorch| over all outputs and verified inputs, or None
            when verification was off.
        diffs: the max abs difference per verified input, in order.
        verified_shapes: the input shapes ONNX Runtime ran, one tuple of shapes per input set.
        custom_ops: counts of ``condfx``-domain nodes in the graph,
            e.g. ``{"condfx::Attention": 2}``.
        opset: the standard ONNX opset of the model.
        external_data: whether the weights were written to ``<path>.data``.
    """

    path: Path
    max_abs_diff: float | None
    diffs: tuple[float, ...] = ()
    verified_shapes: tuple[tuple[tuple[int, ...], ...], ...] = ()
    custom_ops: dict[str, int] = field(default_factory=dict)
    opset: int = 18
    external_data: bool = False


def check_opset(opset: int) -> None:
    from condfx.codegen.onnx import MIN_OPSET

    latest = onnx.defs.onnx_opset_version()
    if not isinstance(opset, int) or isinstance(opset, bool) or not MIN_OPSET <= opset <= latest:
        msg = f"export_onnx: opset must be an int in [{MIN_OPSET}, {latest}]; got {opset!r}."
        raise ValueError(msg)


def check_writable(path: Path) -> None:
    """Creates ``path``'s folder if needed and proves it writable (os.access lies for root)."""
    folder = path.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".condfx-write-test-"):
            pass
    except OSError as exc:
        msg = f"export_onnx: output folder '{folder}' is not writable ({exc.strerror or exc})."
        raise ValueError(msg) from exc


def _as_inputs(example_inputs: Any) -> tuple[torch.Tensor, ...]:
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, Sequence) and all(
        isinstance(x, torch.Tensor) for x in example_inputs
    ):
        return tuple(example_inputs)
    got = type(example_inputs).__name__
    msg = f"export_onnx: example_inputs must be a tensor or a tuple of tensors; got {got}."
    raise TypeError(msg)


def cache_length_dims(gm: nn.Module) -> dict[str, str]:
    """``{past input name: name of its dynamic length (dim 2)}`` from a decode graph's cache layouts
    (``gm.meta["condfx_kv"]``; ``CacheLayout.length_dims``); empty for other modules."""
    from condfx.layouts import decode_layouts

    if not isinstance(gm, fx.GraphModule):
        return {}
    return {
        f"past_{name}": dim
        for layout in decode_layouts(gm)
        for name, dim in zip(layout.io_names(), layout.length_dims(), strict=True)
    }


def _dynamic_shapes(inputs: tuple[torch.Tensor, ...], names: Sequence[str], lengths: dict[str, str]) -> tuple:
    """Dynamic dims per input: (batch, seq) for ids-like inputs, (batch, past length) for caches.

    The first input gets ``batch`` / ``seq``, other inputs ``batch_<name>`` / ``seq_<name>``. A
    cache input (a name in ``lengths``, from the graph's cache layouts) gets dims 0 and 2:
    ``batch_<name>`` and its layout's length name (k and v of one layer share ``past_<i>``; each
    packed-stream tensor has its own; the heads and head size stay static). Names must differ per
    input otherwise: ONNX Runtime treats equal dim_params as equal sizes. Dimensions that
    torch.export proves equal are merged under one name by the exporter.
    """
    shapes = []
    for i, x in enumerate(inputs):
        name = names[i] if i < len(names) else str(i)
        suffix = "" if i == 0 else f"_{name}"
        if name in lengths and x.dim() == 4:
            shapes.append({0: "batch" + suffix, 2: lengths[name]})
        elif x.dim() >= 2:
            shapes.append({d: n + suffix for d, n in enumerate(_DYNAMIC_DIM_NAMES)})
        else:
            shapes.append(None)
    return tuple(shapes)


def _resized_inputs(inputs: tuple[torch.Tensor, ...], names: Sequence[str], lengths: dict[str, str]) -> tuple:
    """Like ``inputs`` with batch + 1 and length + 2 (values in the example's range), seeded.

    The length is dim 1, or dim 2 for a cache input (see ``_dynamic_shapes``).
    """
    gen = torch.Generator().manual_seed(0)
    out = []
    for i, x in enumerate(inputs):
        if x.dim() < 2:
            out.append(x)
            continue
        shape = [x.shape[0] + 1, *x.shape[1:]]
        past = i < len(names) and names[i] in lengths and x.dim() == 4
        shape[2 if past else 1] += 2
        if x.dtype.is_floating_point:
            out.append(torch.randn(shape, generator=gen).to(x.dtype))
        elif x.numel() == 0:  # no values to take the range of (a dropped stream's codes: no columns)
            out.append(torch.zeros(shape, dtype=x.dtype))
        else:
            lo, hi = int(x.min()), int(x.max())
            out.append(torch.randint(lo, hi + 1, shape, generator=gen, dtype=x.dtype))
    return tuple(out)


def _to_graph_module(gm_or_module: nn.Module, inputs: tuple, dynamic: bool) -> fx.GraphModule:
    if not isinstance(gm_or_module, nn.Module):
        got = type(gm_or_module).__name__
        msg = f"export_onnx needs a torch.nn.Module or a GraphModule; got {got}."
        raise TypeError(msg)
    if is_captured(gm_or_module):
        return gm_or_module
    return capture(gm_or_module, inputs, dynamic=dynamic)


def _torch_export(
    gm: fx.GraphModule, inputs: tuple, opset: int, dynamic: bool, names, lengths: dict[str, str]
) -> onnx.ModelProto:
    input_names, output_names = names
    try:
        with warnings.catch_warnings():
            # torch 2.13's exporter trips pytree / deprecation warnings on export GraphModules.
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            # An export GraphModule reports training mode; its ATen graph has no train branches.
            warnings.filterwarnings(
                "ignore", message="Exporting a model while it is in training mode"
            )
            # Dims proven equal (batch of two inputs) keep one name; the exporter says so loudly.
            warnings.filterwarnings("ignore", message=".*The axis name: .* will not be used")
            program = torch.onnx.export(
                gm,
                inputs,
                dynamo=True,
                dynamic_shapes=_dynamic_shapes(inputs, input_names, lengths) if dynamic else None,
                input_names=list(input_names),
                output_names=list(output_names),
                opset_version=opset,
                verbose=False,
            )
        return program.model_proto
    except Exception as exc:  # the exporter raises many exception types
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        msg = f"torch.onnx.export failed for {type(gm).__name__}: {first}"
        raise ExportError(msg) from exc


def _weight_bytes(model: onnx.ModelProto) -> int:
    return sum(
        len(t.raw_data) or onnx.numpy_helper.to_array(t).nbytes for t in model.graph.initializer
    )


def _save_and_check(model: onnx.ModelProto, path: Path, external_data: bool) -> None:
    data_file = path.with_name(path.name + ".data")
    if data_file.exists():
        data_file.unlink()  # save_model appends to an existing data file
    onnx.save_model(
        model,
        str(path),
        save_as_external_data=external_data,
        all_tensors_to_one_file=True,
        location=data_file.name,
    )
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        msg = f"The exported model '{path}' failed the ONNX checker: {exc}"
        raise ExportError(msg) from exc


def _max_abs_diff(session, reference: nn.Module, inputs: tuple) -> float:
    feeds = {i.name: x.numpy() for i, x in zip(session.get_inputs(), inputs, strict=True)}
    got = session.run(None, feeds)
    with torch.no_grad():
        want = torch.utils._pytree.tree_leaves(reference(*inputs))
    if len(got) != len(want):
        msg = f"ONNX Runtime returned {len(got)} outputs but PyTorch {len(want)}."
        raise ExportError(msg)
    return max(
        float(np.max(np.abs(g.astype(np.float64) - w.detach().double().numpy()), initial=0.0))
        for g, w in zip(got, want, strict=True)
    )


def _verify(path: Path, reference: nn.Module, input_sets: list[tuple]) -> tuple[float, ...]:
    import onnxruntime as ort

    try:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return tuple(_max_abs_diff(session, reference, inputs) for inputs in input_sets)
    except ExportError:
        raise
    except Exception as exc:  # ORT raises its own exception hierarchy
        msg = f"ONNX Runtime could not run '{path}': {str(exc).strip().splitlines()[0]}"
        raise ExportError(msg) from exc


def export_onnx(
    gm_or_module: nn.Module,
    example_inputs: Any,
    path: str | os.PathLike,
    *,
    dynamic: bool = True,
    input_names: Sequence[str] = ("input_ids",),
    output_names: Sequence[str] = ("logits",),
    verify: bool = True,
    opset: int = 18,
    external_data: bool | None = None,
) -> ExportResult:
    """Exports a captured/rewritten GraphModule or any module to ONNX with condfx custom ops.

    Args:
        gm_or_module: a GraphModule from ``condfx.capture`` (possibly rewritten by passes, with
            ``torch.ops.condfx.*`` nodes) or any module, which is captured first.
        example_inputs: a tensor or a tuple of tensors for one call; use batch != length.
        path: the ``.onnx`` file to write; its folder is created if missing.
        dynamic: make dimensions 0 and 1 (``batch``, ``seq``) of every input of rank >= 2
            dynamic; for a cache input of a decode graph (named by its cache layouts,
            ``gm.meta["condfx_kv"]``), dimensions 0 and 2 (batch and the layout's past length).
        input_names: ONNX names of the inputs, in order.
        output_names: ONNX names of the outputs, in order.
        verify: run ONNX Runtime (CPU) on the example and, when ``dynamic``, on a second input with
            batch + 1 and length + 2, and report the max abs difference from PyTorch.
        opset: the standard ONNX opset, 18 or later; from 23 a cache Concat pair and the
            ``condfx::Attention`` after it become one standard ``Attention`` node (``onnx_peephole``).
        external_data: write weights to ``<path>.data``; None decides by size (beyond ~2 GB).

    Returns:
        The ExportResult.

    Raises:
        TypeError: the model or inputs have the wrong type.
        ValueError: bad opset, an output folder that is not writable, or a ``condfx`` op without
            an ONNX lowering (the message lists the ops that have one).
        ExportError: torch.onnx.export, the ONNX checker or ONNX Runtime failed.
    """
    from condfx.codegen.onnx import LOWERINGS, attach_functions, lower_custom_ops, used_custom_nodes
    from condfx.codegen.onnx_peephole import simplify

    check_opset(opset)
    path = Path(path)
    check_writable(path)
    inputs = _as_inputs(example_inputs)
    gm = _to_graph_module(gm_or_module, inputs, dynamic)
    lengths = cache_length_dims(gm)
    lowered, _ = lower_custom_ops(gm, LOWERINGS)
    model = _torch_export(lowered, inputs, opset, dynamic, (input_names, output_names), lengths)
    simplify(model)  # before attaching: a condfx node the peephole replaced needs no function
    attach_functions(model, LOWERINGS.values())
    large = (
        _weight_bytes(model) > EXTERNAL_DATA_THRESHOLD if external_data is None else external_data
    )
    _save_and_check(model, path, large)
    custom_ops = used_custom_nodes(model)
    if not verify:
        return ExportResult(path, None, custom_ops=custom_ops, opset=opset, external_data=large)
    input_sets = [inputs, _resized_inputs(inputs, input_names, lengths)] if dynamic else [inputs]
    diffs = _verify(path, gm, input_sets)
    shapes = tuple(tuple(tuple(x.shape) for x in s) for s in input_sets)
    return ExportResult(path, max(diffs), diffs, shapes, custom_ops, opset, large)
