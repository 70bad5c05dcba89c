"""Checks on the files a user brings, before and after transformers reads them.

Every refusal is a ``LoadError`` (a ``ValueError``) whose message is one sentence naming the file
or key and what is wrong, so the CLI prints it with exit status 2. The checks are cheap: headers,
JSON and shapes are read without loading tensors; finiteness is checked once the weights are in
memory.

Does not handle: pickle checkpoints (refused, never read), quantized safetensors (integer or
float8 tensors are refused: condfx loads floating-point weights only). Shard names in an index
must stay inside the folder (no ``..``, not absolute); symbolic links are followed, as in the
Hugging Face cache, whose snapshot files link to blobs outside the snapshot folder.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import torch
from torch import nn

FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")
_DTYPE_BYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2,
    "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8,
}
_MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit
# config.json sizes that must be positive integers when present (null means "not set").
_SIZE_KEYS = (
    "hidden_size", "n_embd", "d_model", "num_attention_heads", "n_head", "num_key_value_heads",
    "num_hidden_layers", "n_layer", "vocab_size", "intermediate_size", "head_dim",
    "max_position_embeddings", "n_positions",
)
_PICKLE_FILES = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.pt", "model.pth")
INDEX_FILE = "model.safetensors.index.json"


class LoadError(ValueError):
    """A model file or folder that condfx refuses; the message is one sentence naming it."""


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of a safetensors header: its dtype name (e.g. ``F32``) and shape."""

    dtype: str
    shape: tuple[int, ...]


def read_config_json(folder: Path) -> dict[str, Any]:
    """Read ``config.json`` of a Hugging Face folder and check its sizes.

    Raises:
        LoadError: empty, not JSON, not an object, no ``model_type``, a size that is not a
            positive integer, or heads that do not divide the hidden size.
    """
    path = folder / "config.json"
    text = path.read_text(encoding="utf-8", errors="replace")
    if not text.strip():
        msg = f"{path} is empty; it must hold the model's configuration as JSON."
        raise LoadError(msg)
    try:
        raw = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as err:  # RecursionError: nested too deeply
        msg = f"{path} is not valid JSON ({err})."
        raise LoadError(msg) from err
    if not isinstance(raw, dict):
        msg = f"{path} must hold a JSON object; it holds a {type(raw).__name__}."
        raise LoadError(msg)
    if not isinstance(raw.get("model_type"), str):
        msg = f"{path} has no model_type string, so no architecture can be chosen."
        raise LoadError(msg)
    for key in _SIZE_KEYS:
        value = raw.get(key)
        values = value if isinstance(value, list) else [value]  # a few models size per layer
        if value is not None and not all(type(v) is int and v > 0 for v in values):
            msg = f"{path} has {key} = {value!r}; it must be a positive integer."
            raise LoadError(msg)
    _check_heads(path, raw)
    return raw


def _check_heads(path: Path, raw: dict[str, Any]) -> None:
    hidden = _first(raw, ("hidden_size", "n_embd", "d_model"))
    heads = _first(raw, ("num_attention_heads", "n_head"))
    if hidden and heads and raw.get("head_dim") is None and hidden % heads:
        msg = (
            f"{path} has {heads} attention heads, which do not divide the hidden size {hidden} "
            "(and no head_dim is given)."
        )
        raise LoadError(msg)
    kv = raw.get("num_key_value_heads")
    if heads and isinstance(kv, int) and heads % kv:
        msg = f"{path} has {kv} key/value heads, which do not divide the {heads} attention heads."
        raise LoadError(msg)


def _first(raw: dict[str, Any], keys: tuple[str, ...]) -> int | None:
    return next((raw[k] for k in keys if isinstance(raw.get(k), int)), None)


def safetensors_files(folder: Path) -> list[Path]:
    """The safetensors files a folder's weights live in, every shard inside the folder.

    Raises:
        LoadError: pickle-only weights, no weights, or an index that is not JSON, names a shard
            outside the folder or a shard that does not exist.
    """
    index = folder / INDEX_FILE
    if index.is_file():
        return _shards_of_index(folder, index)
    single = folder / "model.safetensors"
    if single.is_file():
        return [single]
    pickles = [name for name in _PICKLE_FILES if (folder / name).is_file()]
    if pickles:
        msg = (
            f"Model folder {folder} holds pickle weights ({pickles[0]}), which condfx will not "
            "load; convert them to safetensors (model.safetensors)."
        )
        raise LoadError(msg)
    msg = f"Model folder {folder} has no model.safetensors and no {INDEX_FILE}."
    raise LoadError(msg)


def _shards_of_index(folder: Path, index: Path) -> list[Path]:
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8", errors="replace"))["weight_map"]
    except (json.JSONDecodeError, RecursionError, KeyError, TypeError) as err:
        msg = f"{index} is not a safetensors index (JSON with a weight_map object): {err}."
        raise LoadError(msg) from err
    if not isinstance(weight_map, dict):
        msg = f"{index} has a weight_map that is not a JSON object."
        raise LoadError(msg)
    shards = []
    for key, name in weight_map.items():
        shard = PurePosixPath(str(name))
        if shard.is_absolute() or ".." in shard.parts or "\\" in str(name):
            msg = f"{index} names shard {name!r} for {key}, which is outside the model folder."
            raise LoadError(msg)
        if not (folder / shard).is_file():
            msg = f"{index} names shard {name!r} for {key}, which does not exist."
            raise LoadError(msg)
        if folder / shard not in shards:
            shards.append(folder / shard)
    return shards


def read_safetensors_header(path: Path) -> dict[str, TensorEntry]:
    """Read and check a safetensors header without loading the tensors.

    Returns:
        Tensor name -> ``TensorEntry``, in header order.

    Raises:
        LoadError: a truncated file, a header that is not JSON or not a safetensors header,
            offsets that disagree with the shapes, or a tensor that is not floating point.
    """
    size = path.stat().st_size
    with path.open("rb") as f:
        prefix = f.read(8)
        n = int.from_bytes(prefix, "little") if len(prefix) == 8 else -1
        if n < 0 or n > min(size - 8, _MAX_HEADER_BYTES):
            msg = f"{path} is not a safetensors file or is truncated: its header length is invalid."
            raise LoadError(msg)
        blob = f.read(n)
    try:
        header = json.loads(blob.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
        msg = f"{path} has a corrupt safetensors header (not JSON: {err})."
        raise LoadError(msg) from err
    if not isinstance(header, dict):
        msg = f"{path} has a corrupt safetensors header (not a JSON object)."
        raise LoadError(msg)
    entries, end = {}, 0
    for name, spec in header.items():
        if name == "__metadata__":
            continue
        entries[name], stop = _header_entry(path, name, spec)
        end = max(end, stop)
    if 8 + n + end != size:
        state = "truncated" if 8 + n + end > size else "longer than its header describes"
        msg = f"{path} is {state}: its header describes {8 + n + end} bytes, the file has {size}."
        raise LoadError(msg)
    return entries


def _header_entry(path: Path, name: str, spec: Any) -> tuple[TensorEntry, int]:
    try:
        dtype, shape, (start, stop) = spec["dtype"], spec["shape"], spec["data_offsets"]
        shape = tuple(int(d) for d in shape)
        start, stop = int(start), int(stop)
    except (KeyError, TypeError, ValueError) as err:
        msg = f"{path} has a corrupt safetensors header: the entry of {name!r} is malformed."
        raise LoadError(msg) from err
    if dtype not in _DTYPE_BYTES:
        msg = f"{path} has tensor {name!r} of unknown dtype {dtype!r}."
        raise LoadError(msg)
    if dtype not in FLOAT_DTYPES:
        msg = (
            f"{path} has tensor {name!r} of dtype {dtype}; condfx loads floating-point weights "
            f"only ({', '.join(FLOAT_DTYPES)})."
        )
        raise LoadError(msg)
    nbytes = math.prod(shape) * _DTYPE_BYTES[dtype]
    if min(shape, default=0) < 0 or start < 0 or stop - start != nbytes:
        msg = (
            f"{path} has a corrupt safetensors header: {name!r} has offsets that disagree with "
            f"its shape {list(shape)}."
        )
        raise LoadError(msg)
    return TensorEntry(dtype, shape), stop


def check_loading_info(info: dict[str, Any], where: str) -> None:
    """Refuse a transformers load that left keys missing, unexpected or of the wrong shape.

    Args:
        info: the ``loading_info`` dict of ``from_pretrained(..., output_loading_info=True)``.
        where: the file or folder, for the message.
    """
    missing = sorted(info.get("missing_keys") or ())
    if missing:
        msg = f"{where} is missing weights the model needs: {_some(missing)}."
        raise LoadError(msg)
    unexpected = sorted(info.get("unexpected_keys") or ())
    if unexpected:
        msg = f"{where} has tensors the model does not have: {_some(unexpected)}."
        raise LoadError(msg)
    mismatched = sorted(info.get("mismatched_keys") or ())
    if mismatched:
        shown = "; ".join(
            f"{k} is {list(a)}, the config implies {list(b)}" for k, a, b in mismatched[:3]
        )
        more = f" (and {len(mismatched) - 3} more)" if len(mismatched) > 3 else ""
        msg = f"{where} has tensors of the wrong shape: {shown}{more}."
        raise LoadError(msg)


def _some(names: list[str]) -> str:
    more = f" and {len(names) - 4} more" if len(names) > 4 else ""
    return ", ".join(names[:4]) + more


def check_finite(model: nn.Module, where: str) -> None:
    """Refuse a model whose parameters are not floating point or hold NaN or infinity.

    Raises:
        LoadError: naming the first such parameter.
    """
    for name, p in model.named_parameters():
        if not p.is_floating_point():
            msg = f"{where} gives weight {name} of dtype {p.dtype}; weights must be floating point."
            raise LoadError(msg)
        if not bool(torch.isfinite(p).all()):
            msg = f"{where} has NaN or infinite values in weight {name}."
            raise LoadError(msg)
