"""Checks on a GGUF file's metadata and tensor names, read with ``gguf.GGUFReader`` (no tensors).

A GGUF file describes its shape twice: in metadata (``<arch>.block_count``, head counts, sizes)
and in its tensors (``blk.<i>.<name>``). transformers builds the model from the metadata and
silently drops tensors it has no place for, so a file whose two descriptions disagree would load
as a partly random or truncated model; these checks refuse it first, with one sentence.

Does not handle: per-layer array metadata beyond "every entry non-negative, one positive".
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from .checks import LoadError

# Sizes that must be positive when present (arrays: per layer, zero allowed, one positive).
_SIZE_SUFFIXES = (
    "block_count", "context_length", "embedding_length", "feed_forward_length",
    "attention.head_count", "attention.head_count_kv", "attention.key_length",
    "attention.value_length", "vocab_size",
)
_BLOCK = re.compile(r"blk\.(\d+)\.")


def read_gguf(path: Path) -> Any:
    """Open ``path`` with ``gguf.GGUFReader`` (memory-mapped, tensors not read).

    Raises:
        LoadError: the file is not a readable GGUF file.
    """
    from gguf import GGUFReader

    try:
        return GGUFReader(str(path))
    except Exception as err:  # the reader raises ValueError, struct and numpy errors
        msg = f"{path} could not be read as a GGUF file: {err}"
        raise LoadError(msg) from err


def field_value(reader: Any, key: str) -> Any:
    """The value of metadata ``key`` (``None`` when absent): a scalar, string or list."""
    field = reader.fields.get(key)
    return None if field is None else field.contents()


def architecture(reader: Any, path: Path) -> str:
    """``general.architecture`` of the file.

    Raises:
        LoadError: the key is missing or not a string.
    """
    arch = field_value(reader, "general.architecture")
    if not isinstance(arch, str):
        msg = f"GGUF file {path} has no general.architecture key."
        raise LoadError(msg)
    return arch


def check_metadata(reader: Any, path: Path, arch: str) -> None:
    """Refuse non-positive sizes and heads that do not divide the embedding.

    Raises:
        LoadError: naming the key and its value.
    """
    values = {s: field_value(reader, f"{arch}.{s}") for s in _SIZE_SUFFIXES}
    for suffix, value in values.items():
        if value is None or _positive(value):
            continue
        msg = f"GGUF file {path.name} has {arch}.{suffix} = {value}; it must be positive."
        raise LoadError(msg)
    heads, kv = values["attention.head_count"], values["attention.head_count_kv"]
    width = values["embedding_length"]
    if _ints(heads, width) and values["attention.key_length"] is None and width % heads:
        msg = (
            f"GGUF file {path.name} has {heads} attention heads, which do not divide "
            f"{arch}.embedding_length {width}."
        )
        raise LoadError(msg)
    if _ints(heads, kv) and heads % kv:
        msg = f"GGUF file {path.name} has {kv} key/value heads, which do not divide {heads} heads."
        raise LoadError(msg)


def _positive(value: Any) -> bool:
    if isinstance(value, list):
        return all(isinstance(v, int) and v >= 0 for v in value) and max(value, default=0) > 0
    return isinstance(value, int) and value > 0


def _ints(*values: Any) -> bool:
    return all(isinstance(v, int) for v in values)


def check_tensors(reader: Any, path: Path, arch: str) -> None:
    """Refuse tensors whose layers disagree with ``block_count`` or whose names ``arch`` lacks.

    Raises:
        LoadError: naming the layers or the tensor.
    """
    blocks = field_value(reader, f"{arch}.block_count")
    names = [str(t.name) for t in reader.tensors]
    found = {int(m.group(1)) for m in map(_BLOCK.match, names) if m}
    if isinstance(blocks, int) and found != set(range(blocks)):
        have = f"blk.0 to blk.{max(found)}" if found else "none"
        gaps = sorted(set(range(max(found, default=-1) + 1)) - found)
        gap_text = f", missing {_layers(gaps)}" if gaps else ""
        msg = (
            f"GGUF file {path.name} has {arch}.block_count = {blocks} but tensors for "
            f"{len(found)} layer{'' if len(found) == 1 else 's'} ({have}{gap_text}); the metadata "
            "and the tensors disagree."
        )
        raise LoadError(msg)
    _check_tensor_types(reader, path)
    known = _known_names(arch, max(found, default=-1) + 1)
    if known is None:
        return
    for name in names:
        if name not in known and name.rsplit(".", 1)[0] not in known:
            msg = f"GGUF file {path.name} has tensor {name!r}, which is not a {arch} tensor name."
            raise LoadError(msg)


def _check_tensor_types(reader: Any, path: Path) -> None:
    """Refuse integer tensors: GGUF weights are float or block-quantized, never plain integers."""
    for tensor in reader.tensors:
        kind = tensor.tensor_type.name
        if kind in ("I8", "I16", "I32", "I64"):
            msg = (
                f"GGUF file {path.name} has tensor {tensor.name!r} of type {kind}; weights must "
                "be floating point or quantized."
            )
            raise LoadError(msg)


def _layers(ids: list[int]) -> str:
    shown = ", ".join(f"blk.{i}" for i in ids[:4])
    return shown + (f" and {len(ids) - 4} more" if len(ids) > 4 else "")


def _known_names(arch: str, n_blocks: int) -> set[str] | None:
    """Every tensor name gguf-py knows for ``arch`` (``None``: gguf-py does not know ``arch``)."""
    from gguf.constants import MODEL_ARCH_NAMES, MODEL_TENSORS, TENSOR_NAMES

    model_arch = next((k for k, v in MODEL_ARCH_NAMES.items() if v == arch), None)
    if model_arch is None:
        return None
    names = set()
    for tensor in MODEL_TENSORS[model_arch]:
        pattern = TENSOR_NAMES[tensor]
        if "{" in pattern.replace("{bid}", ""):  # other fields (e.g. per-expert ids): not ours
            continue
        if "{bid}" not in pattern:
            names.add(pattern)
            continue
        names.update(pattern.format(bid=i) for i in range(n_blocks))
    return names
