"""One copy of the weights for several ONNX files: ``share_initializers``.

A bundle's ``prefill.onnx`` and ``decode.onnx`` are two graphs over the same parameters; saved on
their own, each holds every weight, so the bundle is twice the model. ``share_initializers``
moves the initializers of both into one external data file (``weights.data``): a tensor whose
dtype, shape and bytes are equal in both files (or twice in one) is written once, and every
initializer that uses it points at the same offset. ONNX Runtime resolves the offsets relative to
each model's folder, so the files must stay side by side.

Small tensors (under ``MIN_SHARED_BYTES``) stay inside their model, where ONNX Runtime expects
scalars and shapes. Large tensors start on a page boundary, so they can be memory-mapped.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import onnx
from onnx import external_data_helper, numpy_helper

SHARED_DATA_FILE = "weights.data"
MIN_SHARED_BYTES = 1024  # smaller initializers stay inline
_PAGE = 4096  # large tensors start on a page boundary (memory-mappable)
_SMALL_ALIGN = 64


@dataclass(frozen=True)
class SharedWeights:
    """What ``share_initializers`` wrote.

    Attributes:
        data_file: the shared external data file.
        tensors: initializers moved out of the models, over all models.
        unique: distinct tensors written (``tensors - unique`` were shared).
        bytes_written: size of the data file.
        bytes_referenced: bytes the moved initializers would take written once per use.
    """

    data_file: Path
    tensors: int
    unique: int
    bytes_written: int
    bytes_referenced: int


def _align(offset: int, nbytes: int) -> int:
    step = _PAGE if nbytes >= 16 * _PAGE else _SMALL_ALIGN
    return -(-offset // step) * step


def _move_out(tensor: onnx.TensorProto, location: str, offset: int, length: int) -> None:
    """Points ``tensor`` at ``length`` bytes at ``offset`` of ``location``, dropping its inline data."""
    for name in ("float_data", "int32_data", "int64_data", "double_data", "uint64_data", "string_data"):
        tensor.ClearField(name)  # float16 / bfloat16 tensors may hold their values in int32_data
    tensor.raw_data = b"\0"  # onnx's helper wants a raw_data field to replace
    external_data_helper.set_external_data(tensor, location, offset=offset, length=length)
    tensor.ClearField("raw_data")
    tensor.data_location = onnx.TensorProto.EXTERNAL


def share_initializers(paths: Sequence[str | Path], data_name: str = SHARED_DATA_FILE) -> SharedWeights:
    """Rewrites the ONNX files ``paths`` (one folder) so that their initializers share one data file.

    Args:
        paths: ONNX files in one folder; each may hold its weights inline or in its own external
            data file (removed once the shared file is written).
        data_name: the shared data file's name, beside the models.

    Returns:
        The SharedWeights summary.

    Raises:
        ValueError: the files are not in one folder.
    """
    paths = [Path(p) for p in paths]
    folders = {p.parent.resolve() for p in paths}
    if len(folders) != 1:
        msg = f"share_initializers needs ONNX files in one folder, got {len(folders)} folders."
        raise ValueError(msg)
    folder = folders.pop()
    models = [onnx.load(str(p), load_external_data=True) for p in paths]
    old_data = {folder / e.value for m in models for t in m.graph.initializer
                for e in t.external_data if e.key == "location"}
    data_path = folder / data_name
    written: dict[tuple, tuple[int, int]] = {}
    offset = referenced = moved = 0
    with open(data_path, "wb") as data:
        for model in models:
            for tensor in model.graph.initializer:
                raw = numpy_helper.to_array(tensor).tobytes()
                if len(raw) < MIN_SHARED_BYTES:
                    continue
                key = (tensor.data_type, tuple(tensor.dims), hashlib.sha256(raw).digest())
                if key not in written:
                    start = _align(offset, len(raw))
                    data.write(b"\0" * (start - offset))
                    data.write(raw)
                    written[key] = (start, len(raw))
                    offset = start + len(raw)
                _move_out(tensor, data_name, *written[key])
                referenced += len(raw)
                moved += 1
    for model, path in zip(models, paths, strict=True):
        onnx.save_model(model, str(path))
    for stale in old_data - {data_path}:
        stale.unlink(missing_ok=True)
    return SharedWeights(data_path, moved, len(written), offset, referenced)
