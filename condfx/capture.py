"""Capture a PyTorch model as condfx's canonical IR.

The canonical IR is an ATen-level ``torch.fx.GraphModule`` from ``torch.export.export(strict=False)``:
every node carries FakeTensor metadata in ``node.meta["val"]`` and its module provenance in
``node.meta["nn_module_stack"]``; parameters are ``get_attr`` nodes with their original dotted names;
batch and sequence dimensions are symbolic. Models whose forward returns a Hugging Face ``ModelOutput``
are wrapped so that the graph returns the logits tensor.

Parameters are shared, not copied: the GraphModule's parameters and buffers are the caller's model's
own tensors (``gm.get_parameter(name) is`` the model's), so a capture costs no weight memory.
``condfx.apply`` never writes to them: it runs the passes on a private deep copy of the graph
(passes/README.md, rule 8; tests/hostile/test_runtime.py checks the model's weights hash across a
pipeline of every kind of pass). Code that edits a captured graph's weights in place edits the model
too: ``copy.deepcopy(model)`` first.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import fx, nn

# Nodes that only assert metadata; they keep dead values alive and carry no semantics.
_NOISE_TARGETS = (torch.ops.aten._assert_tensor_metadata.default,)


class CaptureError(RuntimeError):
    """torch.export could not capture the model; the message names the module and source line."""


class _LogitsOnly(nn.Module):
    """Wraps a model whose forward returns a ModelOutput so the captured graph returns logits."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        out = self.model(input_ids=input_ids, use_cache=False)
        return out.logits if hasattr(out, "logits") else out[0]


def _needs_wrapper(model: nn.Module) -> bool:
    params = inspect.signature(model.forward).parameters
    return "use_cache" in params and "input_ids" in params


def _as_tuple(example_inputs: Any) -> tuple:
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, Sequence):
        return tuple(example_inputs)
    msg = f"example_inputs must be a tensor or a tuple of tensors; got {type(example_inputs).__name__}."
    raise TypeError(msg)


def _dynamic_shapes(inputs: tuple, dynamic: bool):
    if not dynamic:
        return None
    auto = torch.export.Dim.AUTO
    return tuple({0: auto, 1: auto} if isinstance(x, torch.Tensor) and x.dim() >= 2 else None for x in inputs)


class _ModuleTracker:
    """Records which submodules are being executed, so an export failure can name the innermost one."""

    def __init__(self, model: nn.Module):
        self.names = {id(m): n or "<root>" for n, m in model.named_modules()}
        self.stack: list[nn.Module] = []
        self.failed_in: nn.Module | None = None
        self._handles = []
        for m in model.modules():
            self._handles.append(m.register_forward_pre_hook(self._enter))
            self._handles.append(m.register_forward_hook(self._exit))

    def _enter(self, module, args):
        self.stack.append(module)

    def _exit(self, module, args, out):
        if self.stack and self.stack[-1] is module:
            self.stack.pop()

    def close(self) -> None:
        self.failed_in = self.stack[-1] if self.stack else None
        for h in self._handles:
            h.remove()

    def blame(self, exc: BaseException) -> str:
        """Names the innermost running module and the user source line named in ``exc``, if any."""
        torch_dir = str(Path(torch.__file__).parent)
        lines = [
            (f, int(n))
            for f, n in re.findall(r'File "([^"]+)", line (\d+)', str(exc))
            if not f.startswith(torch_dir)
        ]
        module = self.failed_in
        if module is None:
            return f"at {lines[-1][0]}:{lines[-1][1]}" if lines else "outside any submodule"
        where = f"in module '{self.names[id(module)]}' ({type(module).__name__})"
        if lines:
            return f"{where} at {lines[-1][0]}:{lines[-1][1]}"
        try:
            src, first = inspect.getsourcelines(type(module).forward)
            return f"{where}, whose forward starts at {inspect.getsourcefile(type(module))}:{first}"
        except (OSError, TypeError):
            return where


def _normalise(gm: fx.GraphModule) -> fx.GraphModule:
    for node in list(gm.graph.nodes):
        if node.op == "call_function" and node.target in _NOISE_TARGETS:
            gm.graph.erase_node(node)
    gm.graph.lint()
    gm.recompile()
    return gm


def capture(
    model: nn.Module,
    example_inputs: Any,
    *,
    dynamic: bool = True,
) -> fx.GraphModule:
    """Captures ``model`` as condfx's canonical ATen-level GraphModule.

    Args:
        model: any ``nn.Module`` whose forward takes token ids (B, T) and returns logits, a Hugging Face
            causal LM (its ``ModelOutput`` is reduced to logits), or a ``torch.fx.GraphModule`` from
            ``torch.fx.symbolic_trace`` (it is normalised to the same IR).
        example_inputs: a tensor or a tuple of tensors for one call. Use a batch size different from the
            sequence length so the two dimensions stay distinct symbols.
        dynamic: make dimensions 0 and 1 of every input of rank >= 2 dynamic (batch and sequence).

    Returns:
        The GraphModule. ``gm.meta["condfx"]`` records how it was captured. It shares its parameters
        and buffers with ``model`` (no copy): editing them in place edits ``model``.

    Raises:
        TypeError: ``model`` is not an ``nn.Module`` or the inputs are not tensors.
        CaptureError: torch.export failed; the message names the module and source line.
    """
    if not isinstance(model, nn.Module):
        msg = f"capture() needs a torch.nn.Module; got {type(model).__name__}."
        raise TypeError(msg)
    inputs = _as_tuple(example_inputs)
    traced = _needs_wrapper(model)
    root = _LogitsOnly(model) if traced else model
    tracker = _ModuleTracker(root)
    try:
        with torch.no_grad():
            ep = torch.export.export(
                root, inputs, dynamic_shapes=_dynamic_shapes(inputs, dynamic), strict=False
            )
    except Exception as exc:  # torch.export raises many exception types
        tracker.close()
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        msg = f"Could not capture {type(model).__name__}: {first} ({tracker.blame(exc)})."
        raise CaptureError(msg) from exc
    tracker.close()
    gm = _normalise(ep.module())
    gm.meta["condfx"] = {
        "source": type(model).__name__,
        "wrapped_model_output": traced,
        "example_shapes": [tuple(x.shape) for x in inputs if isinstance(x, torch.Tensor)],
        "dynamic": dynamic,
    }
    return gm


def is_captured(gm: nn.Module) -> bool:
    """True when ``gm`` is a GraphModule in the canonical IR (FakeTensor metadata present)."""
    if not isinstance(gm, fx.GraphModule):
        return False
    return all("val" in n.meta for n in gm.graph.nodes if n.op == "placeholder")
