"""How condfx calls a user's model: logits from any output convention, its device, eval mode,
and the identity of its weights in the files made for it.

``weights_sha256`` hashes the weights (the ONNX bundle's manifest and every state file store it);
``check_identity`` compares a stored identity with a model's; ``read_state_file`` reads a
safetensors state file and refuses a missing, corrupt, partial or non-finite one with one sentence
naming the file. Files written before identities carried the weights hash are refused with a
sentence saying to recalibrate or retrain: accepting them would keep the silent path this hash
closes (a same-shaped model with other weights).

A leaf module (torch only): ``condfx.train``, ``condfx.verify`` and ``condfx.eval`` all call models
through it, so none of them has to import another for these four helpers (``condfx.eval.tasks``
trains through ``condfx.train``, so ``condfx.train`` importing ``condfx.eval`` was a cycle).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Collection, Iterator, Mapping
from typing import Any

import torch
from torch import nn

__all__ = [
    "check_identity", "eval_mode", "logits_of", "model_device", "model_logits", "read_state_file",
    "weights_identity", "weights_sha256",
]


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


def weights_identity(model: nn.Module, exclude: Collection[str] = ()) -> dict[str, Any]:
    """The SHA256 of ``model``'s weights other than ``exclude`` (the ones a state file carries)."""
    kept = [n for n in model.state_dict() if n not in exclude]
    return {"tensors": len(kept), "weights_sha256": weights_sha256(model, exclude)}


def _short(identity: Mapping[str, Any]) -> str:
    parts = [f"{k} {identity[k]}" for k in ("n_layers", "dim", "tensors") if k in identity]
    return ", ".join([*parts, f"weights sha256 {str(identity.get('weights_sha256'))[:12]}"])


def check_identity(theirs: Any, mine: Mapping[str, Any], what: str, remedy: str) -> None:
    """Refuses a file whose stored identity is not ``mine``.

    Args:
        theirs: the identity the file stores (any JSON value; None when it has none).
        mine: the identity of the model it is loaded into.
        what: the file, as the message names it (e.g. ``"skip-ffn state file 'a.safetensors'"``).
        remedy: what to do, e.g. ``"retrain it"``.

    Raises:
        ValueError: one sentence naming the file, both identities (or the missing hash) and the remedy.
    """
    if not isinstance(theirs, Mapping) or "weights_sha256" not in theirs:
        msg = (
            f"{what} was made for a different model or by an older condfx: it carries no weights "
            f"hash; {remedy} for this model."
        )
        raise ValueError(msg)
    if dict(theirs) != dict(mine):
        msg = (
            f"{what} was made for a different model ({_short(theirs)}) than this one "
            f"({_short(mine)}); {remedy} for this model."
        )
        raise ValueError(msg)


def _open(path: str | os.PathLike, what: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import SafetensorError, safe_open

    if not os.path.isfile(path):
        msg = f"{what} {str(path)!r} does not exist."
        raise ValueError(msg)
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    except (SafetensorError, OSError, RuntimeError, ValueError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        msg = f"{what} {str(path)!r} is not a readable safetensors file ({first})."
        raise ValueError(msg) from None
    return tensors, meta


def read_state_file(
    path: str | os.PathLike, what: str, expected: Collection[str] | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Reads a safetensors state file, refusing what would load silently wrong.

    Args:
        path: the file.
        what: how messages name it, e.g. ``"skip-ffn state file"``.
        expected: the tensor names it must hold exactly; None takes the list the file's metadata
            records under ``"tensors"`` (written by condfx since identities carry the weights hash),
            when there is one.

    Returns:
        (name -> tensor, metadata with JSON values decoded where they parse).

    Raises:
        ValueError: one sentence naming the file: missing, unreadable or corrupt, tensors missing
            or extra, or a tensor with NaN or infinite values.
    """
    tensors, raw = _open(path, what)
    meta: dict[str, Any] = {}
    for key, value in raw.items():
        try:
            meta[key] = json.loads(value)
        except ValueError:
            meta[key] = value
    want = expected if expected is not None else meta.get("tensors")
    if isinstance(want, (list, tuple, set, frozenset)):
        missing, extra = sorted(set(want) - set(tensors)), sorted(set(tensors) - set(want))
        if missing or extra:
            msg = (
                f"{what} {str(path)!r} is incomplete or altered: missing {missing[:3] or 'none'}, "
                f"unexpected {extra[:3] or 'none'} ({len(tensors)} of {len(want)} tensors)."
            )
            raise ValueError(msg)
    for name, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            msg = f"{what} {str(path)!r} holds NaN or infinite values in {name!r}; it cannot be loaded."
            raise ValueError(msg)
    return tensors, meta
