"""A bundle checked against itself: its manifest against its hashes, its own lists and its graphs.

``condfx export`` writes a manifest (``condfx.codegen.bundle``) that the runtime trusts for how it
feeds the graphs: which name each cache tensor goes to, each layer's cache layout, the vocabulary
and the context. Opening a bundle (``OnnxBackend.from_dir``) checks, each failure one ValueError
naming the folder and the field:

    manifest_hashes(manifest)   every top-level field has the SHA256 the exporter wrote
                                (``manifest_sha256``); an edit names the field it changed
    check_manifest(...)         each ``layers[i]`` is layer i and round-trips through its layout
                                (no field its kind does not have, e.g. a ``window_size`` added to a
                                full layer); ``files.*.inputs/outputs`` are the names the layouts
                                give, in order; vocab_size and max_seq_len are positive ints and
                                max_seq_len equals the model identity's
    check_graphs(...)           the ONNX Runtime sessions' inputs and outputs are those names, in
                                that order, with the rank, dtype and every static dim the layouts
                                state (heads, head dim, stream widths; batch and lengths are
                                dynamic), ``input_ids`` (B, T) int64 and logits (B, T, vocab_size)

Independent of the hash, the structural checks catch swapped past / present names, reordered or
missing layers and wrong heads or head dims; what the graphs' I/O cannot show (a layout's window,
a ``max_seq_len`` edited together with the model identity) only the hash catches.

Does not handle: proving the graphs compute what the layouts say (that is ``condfx export``'s ORT
vs PyTorch check, recorded in the manifest's ``max_abs_diff``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from condfx.codegen.bundle import MANIFEST_HASH_KEY, io_names, manifest_hashes
from condfx.layouts import CacheLayout

# ONNX Runtime's type strings of the dtypes a bundle's inputs and outputs use.
_ORT_TYPES = {
    torch.float32: "tensor(float)",
    torch.float16: "tensor(float16)",
    torch.bfloat16: "tensor(bfloat16)",
    torch.float64: "tensor(double)",
    torch.uint8: "tensor(uint8)",
    torch.int64: "tensor(int64)",
}
_FLOAT_TYPES = ("tensor(float)", "tensor(float16)", "tensor(bfloat16)", "tensor(double)")


def _fail(folder: Path, what: str) -> ValueError:
    return ValueError(f"ONNX folder '{folder}' {what}; write it again with 'condfx export'.")


def check_hashes(folder: Path, manifest: dict[str, Any]) -> None:
    """ValueError naming the first field whose SHA256 differs from ``manifest_sha256``'s."""
    saved = manifest.get(MANIFEST_HASH_KEY)
    if not isinstance(saved, dict):
        raise _fail(folder, f"has a manifest without '{MANIFEST_HASH_KEY}' (written before manifests "
                            "were hashed, or the field was removed), so its fields cannot be trusted")
    now = manifest_hashes(manifest)
    for key in sorted(set(now) | set(saved)):
        if now.get(key) != saved.get(key):
            state = "was added" if key not in saved else "was removed" if key not in now else "was edited"
            raise _fail(folder, f"has a manifest whose field '{key}' {state} after export "
                                f"(its '{MANIFEST_HASH_KEY}' does not match)")


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _check_layers(folder: Path, manifest: dict[str, Any], layouts: tuple[CacheLayout, ...]) -> None:
    for i, (entry, layout) in enumerate(zip(manifest["layers"], layouts, strict=True)):
        if layout.layer != i:
            raise _fail(folder, f"has a manifest whose field 'layers[{i}]' is layer {layout.layer}, "
                                f"not {i} (layers must be listed in graph order)")
        extra = sorted(set(entry) - set(layout.to_json()))
        if extra:
            raise _fail(folder, f"has a manifest whose field 'layers[{i}]' has '{extra[0]}', which a "
                                f"'{layout.kind}' cache layout does not have")
        try:  # sizes that are not positive ints (e.g. "n_kv_heads": "2" or -1) fail here
            valid = layout.to_json() == entry and len(layout.empty_past(1, None, 1)) > 0
        except (TypeError, ValueError, RuntimeError):
            valid = False
        if not valid:
            raise _fail(folder, f"has a manifest whose field 'layers[{i}]' is not a valid "
                                f"'{layout.kind}' cache layout ({entry})")


def _check_names(folder: Path, field: str, got: Any, want: list[str]) -> None:
    if not isinstance(got, list) or not all(isinstance(n, str) for n in got):
        raise _fail(folder, f"has a manifest whose field '{field}' is not a list of names")
    for i, (g, w) in enumerate(zip(got, want, strict=False)):
        if g != w:
            raise _fail(folder, f"has a manifest whose field '{field}' lists '{g}' at position {i} "
                                f"where its layers give '{w}'")
    if len(got) != len(want):
        raise _fail(folder, f"has a manifest whose field '{field}' lists {len(got)} names where its "
                            f"layers give {len(want)}")


def check_manifest(folder: Path, manifest: dict[str, Any], layouts: tuple[CacheLayout, ...]) -> None:
    """ValueError when the manifest disagrees with itself (see the module docstring)."""
    _check_layers(folder, manifest, layouts)
    inputs, outputs = io_names(layouts)
    for kind, want_in in (("prefill", inputs[:1]), ("decode", inputs)):
        entry = manifest["files"][kind]
        _check_names(folder, f"files.{kind}.inputs", entry.get("inputs"), want_in)
        _check_names(folder, f"files.{kind}.outputs", entry.get("outputs"), outputs)
    if not _positive_int(manifest.get("vocab_size")):
        raise _fail(folder, f"has a manifest whose field 'vocab_size' is {manifest.get('vocab_size')!r}, "
                            "not a positive int")
    limit, model_limit = manifest.get("max_seq_len"), manifest["model"].get("max_seq_len")
    if limit is not None and not _positive_int(limit):
        raise _fail(folder, f"has a manifest whose field 'max_seq_len' is {limit!r}, not a positive int")
    if model_limit is not None and limit != model_limit:
        raise _fail(folder, f"has a manifest whose field 'max_seq_len' is {limit}, but its model "
                            f"'{manifest['model'].get('name')}' has a context of {model_limit}")


def check_model_limit(folder: Path, manifest: dict[str, Any], model: Any) -> None:
    """ValueError when ``max_seq_len`` differs from the context of the model the caller gave."""
    want = getattr(getattr(model, "info", None), "max_seq_len", None)
    got = manifest.get("max_seq_len")
    if want is not None and got != want:
        raise _fail(folder, f"has a manifest whose field 'max_seq_len' is {got}, but the model "
                            f"has a context of {want}")


def _stated_dims(layout: CacheLayout) -> list[tuple[list[int | None], torch.dtype]]:
    """(shape, dtype) per cache tensor; a dim is None where it varies with batch or length."""
    a = layout.empty_past(1, None, 1)
    b = layout.empty_past(2, None, 5)
    return [
        ([x if x == y else None for x, y in zip(ta.shape, tb.shape, strict=True)], ta.dtype)
        for ta, tb in zip(a, b, strict=True)
    ]


def _check_tensor(folder: Path, graph: str, arg: Any, dims: list, dtype: torch.dtype) -> None:
    """One graph input or output against the rank, dtype and static dims the manifest states."""
    where = f"{graph}'s {arg.name}"
    if arg.type != _ORT_TYPES.get(dtype, dtype):
        raise _fail(folder, f"has {where} of type {arg.type}, but its manifest states {dtype}")
    if len(arg.shape) != len(dims):
        raise _fail(folder, f"has {where} of rank {len(arg.shape)}, but its manifest states rank {len(dims)}")
    for d, (g, w) in enumerate(zip(arg.shape, dims, strict=True)):
        if isinstance(g, int) and w is not None and g != w:
            raise _fail(folder, f"has {where} of size {g} in dim {d}, but its manifest states {w}")


def _check_session(folder, kind, graph, session, names_in, names_out, layouts, vocab) -> None:
    """Names in order, then each tensor's type and shape; ``names_in[1:]`` are the pasts."""
    got_in = [a.name for a in session.get_inputs()]
    got_out = [a.name for a in session.get_outputs()]
    for field, got, want in (("inputs", got_in, names_in), ("outputs", got_out, names_out)):
        if got != want:
            at = next((i for i, (g, w) in enumerate(zip(got, want, strict=False)) if g != w),
                      min(len(got), len(want)))
            g, w = (got[at] if at < len(got) else "nothing"), (want[at] if at < len(want) else "nothing")
            raise _fail(folder, f"has a {graph} whose {field} have '{g}' at position {at} where its "
                                f"manifest's field 'files.{kind}.{field}' has '{w}'")
    stated = [s for layout in layouts for s in _stated_dims(layout)]
    ids, logits = session.get_inputs()[0], session.get_outputs()[0]
    _check_tensor(folder, graph, ids, [None, None], torch.int64)
    if logits.type not in _FLOAT_TYPES:
        raise _fail(folder, f"has {graph}'s logits of type {logits.type}, not a float type")
    _check_tensor(folder, graph, logits, [None, None, vocab], _dtype_of_ort(logits.type))
    for arg, (dims, dtype) in zip(session.get_outputs()[1:], stated, strict=True):
        _check_tensor(folder, graph, arg, dims, dtype)
    pasts = session.get_inputs()[1:]  # none in prefill.onnx
    for arg, (dims, dtype) in zip(pasts, stated if pasts else [], strict=True):
        _check_tensor(folder, graph, arg, dims, dtype)


def _dtype_of_ort(name: str) -> torch.dtype:
    return next(d for d, n in _ORT_TYPES.items() if n == name)


def check_graphs(folder: Path, manifest: dict[str, Any], layouts: tuple[CacheLayout, ...],
                 prefill: Any, decode: Any) -> None:
    """ValueError when an ONNX Runtime session's I/O disagrees with the manifest (module docstring)."""
    files, vocab = manifest["files"], manifest["vocab_size"]
    for kind, session in (("prefill", prefill), ("decode", decode)):
        entry = files[kind]
        _check_session(folder, kind, entry["path"], session, entry["inputs"], entry["outputs"],
                       layouts, vocab)
