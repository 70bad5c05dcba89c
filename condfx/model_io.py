"""How condfx calls a user's model: logits from any output convention, its device, eval mode,
and the hash of its weights (``weights_sha256``: the identity of bundles and state files).

A leaf module (torch only): ``condfx.train``, ``condfx.verify`` and ``condfx.eval`` all call models
through it, so none of them has to import another for these four helpers (``condfx.eval.tasks``
trains through ``condfx.train``, so ``condfx.train`` importing ``condfx.eval`` was a cycle).
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Collection, Iterator

import torch
from torch import nn

__all__ = ["eval_mode", "logits_of", "model_device", "model_logits", "weights_sha256"]


def model_logits(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """Runs ``model`` and returns its logits, accepting the output conventions found in the wild.

    Args:
        model: a module whose forward takes ``input_ids`` (B, T).
        input_ids: token ids, shape (B, T).

    Returns:
        The logits, shape (B, T, V).

    Raises:
        TypeError: if the output is neither a tensor, an object with ``.logits``, nor a tuple or
            list whose first element is a tensor.
    """
    return logits_of(model(input_ids))


def logits_of(out) -> torch.Tensor:
    """The logits in a model's output: the tensor itself, ``out.logits``, or the first of a tuple.

    Raises:
        TypeError: for anything else.
    """
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "logits"):
        return out.logits
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    msg = f"model output must be logits (B, T, V), an object with .logits, or a tuple; got {type(out).__name__}"
    raise TypeError(msg)


def model_device(model: nn.Module) -> torch.device:
    """Returns the device of the model's first parameter or buffer (CPU when it has none)."""
    for tensor in (*model.parameters(), *model.buffers()):
        return tensor.device
    return torch.device("cpu")


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Puts ``model`` in eval mode for the block and restores its training flag afterwards.

    Graph modules from ``torch.export`` refuse ``.eval()``; they are run as they are.
    """
    was_training = model.training
    try:
        model.eval()
    except (NotImplementedError, RuntimeError):
        was_training = None
    try:
        yield
    finally:
        if was_training:
            model.train()


def weights_sha256(model: nn.Module, exclude: Collection[str] = ()) -> str:
    """Hex SHA256 over a module's state_dict (names and raw bytes, in key order).

    The identity of what a bundle or a state file was made for: the ONNX bundle's manifest, the
    skip-ffn forecast state, trained-parameter files and calibrations all store it.

    Args:
        model: any module (a captured GraphModule included).
        exclude: state_dict names left out (e.g. the trained parameters a state file carries).
    """
    digest = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        if name in exclude:
            continue
        digest.update(name.encode())
        digest.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()
