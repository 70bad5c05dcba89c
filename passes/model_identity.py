"""Which weights a calibration or state file was made for, and how such files are read safely.

``model_identity(gm)`` is the shapes plus a SHA256 of every weight (``condfx.model_io.
weights_sha256``, the hash the ONNX bundle's manifest carries). ``skip-ffn`` checks a ``state``
file against it and records it in ``gm.meta["condfx_identity"]``; ``condfx.calibrate`` stores it in
calibration files; ``condfx.train`` and ``condfx.l2a`` store the hash of the weights they did not
train. ``check_identity`` compares a stored identity with the model's; ``read_state_file`` reads a
safetensors state file and refuses a missing, corrupt, partial or non-finite one with one sentence
naming the file. It lives in the passes layer so that a pass never imports the API layer to check
a file.

Files written before identities carried the weights hash (they held 16 hex digits over the first
values of each FFN weight) are refused with a sentence saying to recalibrate or retrain: accepting
them would keep the silent path this hash closes (a same-shaped model with other weights).
"""

from __future__ import annotations

import json
import os
from collections.abc import Collection, Mapping
from typing import Any

import torch
from torch import fx, nn

from condfx.model_io import weights_sha256
from condfx.patterns import find_regions

__all__ = ["check_identity", "model_identity", "read_state_file", "weights_identity"]


def model_identity(gm: fx.GraphModule) -> dict[str, Any]:
    """n_layers (FFN regions), dim, and the SHA256 of all of ``gm``'s weights.

    Args:
        gm: a graph in the canonical IR (before ``skip-ffn``: what a state file is made for).

    Returns:
        ``{"n_layers": int, "dim": int, "weights_sha256": 64 hex digits}``.
    """
    ffn = find_regions(gm).ffn
    return {"n_layers": len(ffn), "dim": ffn[0].dim if ffn else 0, "weights_sha256": weights_sha256(gm)}


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
