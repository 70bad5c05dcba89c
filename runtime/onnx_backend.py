"""``OnnxBackend``: runs an exported prefill/decode pair on ONNX Runtime behind ``DecodeBackend``.

A folder written by ``condfx export`` / ``condfx.export(...)`` (``condfx.codegen.bundle``) holds ``prefill.onnx``
(input_ids -> logits, presents), ``decode.onnx`` (input_ids, past_k_0, past_v_0, ... -> logits,
present_k_0, present_v_0, ...) and ``condfx_manifest.json`` (model identity, the layers' cache
layouts (``condfx.layouts``, read back through ``layout_from_json``), IO names, file hashes, format
and condfx version, ``manifest_sha256``). ``OnnxBackend.from_dir`` checks the manifest against its
hashes and itself before it loads anything, and the graphs' inputs and outputs against the manifest
after (``condfx.runtime.bundle_check``); ``OnnxBackend.from_graph`` exports a decode-form graph to a
temporary folder first.

``run(input_ids, past)`` takes and returns torch tensors like ``TorchBackend`` (the session's caches
are torch); they cross to ONNX Runtime as numpy arrays without copies on CPU. A call whose pasts
are all empty runs ``prefill.onnx``, any other call ``decode.onnx``. Token ids outside
``[0, vocab_size)`` are refused (ONNX Runtime's Gather would wrap -1 to the last row).

Providers: CPU by default; CUDA first (CPU as fallback) when ONNX Runtime has the CUDA provider.

Does not handle: IO binding (on CUDA every call copies the caches to and from the device).
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import fx, nn

from condfx.codegen.bundle import (
    MANIFEST_FORMAT,
    MANIFEST_FORMAT_VERSION,
    MANIFEST_NAME,
    export_decode_graph,
    model_identity,
)
from condfx.data import file_sha256
from condfx.layouts import CacheLayout, layout_from_json
from condfx.runtime.bundle_check import (
    check_graphs,
    check_hashes,
    check_manifest,
    check_model_limit,
)
from condfx.runtime.sampling import check_token_ids
from condfx.version import __version__

_CPU, _CUDA = "CPUExecutionProvider", "CUDAExecutionProvider"


def default_providers() -> list[str]:
    """CUDA then CPU when ONNX Runtime has the CUDA provider, else CPU only."""
    import onnxruntime as ort

    return [_CUDA, _CPU] if _CUDA in ort.get_available_providers() else [_CPU]


def _fail(folder: Path, what: str) -> ValueError:
    return ValueError(f"ONNX folder '{folder}' {what}; write it again with 'condfx export'.")


def read_manifest(folder: str | Path) -> dict[str, Any]:
    """Reads and checks ``condfx_manifest.json`` of an export folder.

    Raises:
        FileNotFoundError: the folder or its manifest does not exist.
        ValueError: the manifest is not JSON, from another format or condfx version, edited after
            export (``manifest_sha256``), or disagrees with itself (``bundle_check.check_manifest``).
    """

    folder = Path(folder)
    path = folder / MANIFEST_NAME
    if not folder.is_dir():
        msg = f"ONNX folder '{folder}' does not exist; write it with 'condfx export MODEL -o {folder}'."
        raise FileNotFoundError(msg)
    if not path.is_file():
        msg = f"ONNX folder '{folder}' has no {MANIFEST_NAME}; write it with 'condfx export'."
        raise FileNotFoundError(msg)
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise _fail(folder, f"has a {MANIFEST_NAME} that is not valid JSON ({exc})") from None
    if not isinstance(manifest, dict):
        raise _fail(folder, f"has a {MANIFEST_NAME} that is not a JSON object")
    fmt = (manifest.get("format"), manifest.get("format_version"))
    if fmt == (MANIFEST_FORMAT, 1):
        raise _fail(folder, "was written by an older condfx (manifest format 1, before cache layouts)")
    if fmt != (MANIFEST_FORMAT, MANIFEST_FORMAT_VERSION):
        want = f"{MANIFEST_FORMAT} {MANIFEST_FORMAT_VERSION}"
        raise _fail(folder, f"has format {fmt[0]} {fmt[1]}, but this condfx reads {want}")
    _check_types(folder, manifest)
    try:  # a kind this condfx does not know names the kind and the version that wrote it
        found = layouts(manifest)
    except ValueError as exc:
        raise _fail(folder, f"lists a layer this condfx cannot read: {str(exc).rstrip('.')}") from None
    if manifest.get("condfx_version") != __version__:
        got, want = manifest.get("condfx_version"), __version__
        raise _fail(folder, f"was written by condfx {got}, but this is condfx {want}")
    check_hashes(folder, manifest)
    check_manifest(folder, manifest, found)
    return manifest


_FIELD_TYPES = {"files": dict, "layers": list, "model": dict}


def _check_types(folder: Path, manifest: Any) -> None:
    """The fields the reader indexes have the JSON types it indexes them as."""
    for key, kind in _FIELD_TYPES.items():
        value = manifest.get(key)
        if value is None:
            raise _fail(folder, f"has a {MANIFEST_NAME} without '{key}'")
        if not isinstance(value, kind):
            raise _fail(folder, f"has a {MANIFEST_NAME} whose field '{key}' is a JSON "
                                f"{type(value).__name__}, not a {kind.__name__}")
    for i, entry in enumerate(manifest["layers"]):
        if not isinstance(entry, dict):
            raise _fail(folder, f"has a {MANIFEST_NAME} whose field 'layers[{i}]' is not an object")
    for kind in ("prefill", "decode"):
        entry = manifest["files"].get(kind)
        if not isinstance(entry, dict) or not isinstance(entry.get("path"), str) or not entry["path"]:
            raise _fail(folder, f"has a manifest that lists no {kind} file")
        if Path(entry["path"]).name != entry["path"]:
            raise _fail(folder, f"has a manifest whose field 'files.{kind}.path' is "
                                f"'{entry['path']}', not a file name inside the folder")


def check_files(folder: Path, manifest: dict[str, Any], hashes: bool = True) -> dict[str, Path]:
    """Paths of the prefill and decode files; each (and its external data) must exist and match."""
    paths = {}
    for kind in ("prefill", "decode"):
        entry = manifest["files"].get(kind)
        if not isinstance(entry, dict) or not entry.get("path"):
            raise _fail(folder, f"has a manifest that lists no {kind} file")
        for key, hash_key in (("path", "sha256"), ("external_data", "external_data_sha256")):
            name = entry.get(key)
            if name is None:
                continue
            if not isinstance(name, str) or Path(name).name != name:
                raise _fail(folder, f"has a manifest whose field 'files.{kind}.{key}' is not a file name")
            path = folder / name
            if not path.is_file():
                msg = f"ONNX folder '{folder}' is missing {name}; write it again with 'condfx export'."
                raise FileNotFoundError(msg)
            if hashes and file_sha256(path) != entry.get(hash_key):
                raise _fail(folder, f"has a {name} that differs from the one its manifest lists")
        paths[kind] = folder / entry["path"]
    return paths


def check_model(folder: Path, manifest: dict[str, Any], identity: dict[str, Any]) -> None:
    """ValueError when the folder was exported from another model than ``identity`` describes."""
    saved = manifest.get("model", {})
    if saved.get("name") != identity.get("name"):
        what = f"was exported from model '{saved.get('name')}', not '{identity.get('name')}'"
        raise _fail(folder, what)
    if saved.get("weights_sha256") != identity.get("weights_sha256"):
        what = f"was exported from other weights of model '{saved.get('name')}'"
        raise _fail(folder, what)


def layouts(manifest: dict[str, Any]) -> tuple[CacheLayout, ...]:
    """The cache layouts of a manifest's ``layers`` (``condfx.layouts.layout_from_json``)."""
    version = manifest.get("condfx_version")
    return tuple(layout_from_json(entry, written_by=version) for entry in manifest["layers"])


def _open(folder: Path, path: Path, options: Any, providers: list[str]) -> Any:
    """An ONNX Runtime session of ``path``; one ValueError when ONNX Runtime cannot load it."""
    import onnxruntime as ort

    try:
        return ort.InferenceSession(str(path), options, providers=providers)
    except Exception as exc:  # ORT raises its own hierarchy (InvalidProtobuf, Fail, ...)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise _fail(folder, f"has a {path.name} that ONNX Runtime cannot load ({first})") from None


class OnnxBackend:
    """Runs ``prefill.onnx`` / ``decode.onnx`` on ONNX Runtime (see the module docstring).

    Args:
        prefill: the ONNX Runtime session of ``prefill.onnx``.
        decode: the ONNX Runtime session of ``decode.onnx``.
        manifest: the folder's manifest (layers, IO names, max_seq_len).

    Attributes:
        layers: one ``CacheLayout`` per attention layer (the session builds its caches from them).
        max_seq_len: the model's context from the manifest, or None.
        device: where returned tensors live (always CPU).
    """

    def __init__(self, prefill: Any, decode: Any, manifest: dict[str, Any]):
        self.prefill_session, self.decode_session = prefill, decode
        self.manifest = manifest
        self.layers = layouts(manifest)
        self.max_seq_len: int | None = manifest.get("max_seq_len")
        self.vocab_size: int | None = manifest.get("vocab_size")
        self.device = torch.device("cpu")
        self._inputs = list(manifest["files"]["decode"]["inputs"])
        self._outputs = list(manifest["files"]["decode"]["outputs"])

    @classmethod
    def from_dir(
        cls,
        folder: str | Path,
        *,
        model: nn.Module | None = None,
        providers: Sequence[str] | None = None,
        threads: int | None = None,
        check_hashes: bool = True,
    ) -> OnnxBackend:
        """Opens an export folder after checking its manifest and files.

        Args:
            folder: the folder ``condfx export`` wrote.
            model: when given, the folder must have been exported from this model (name and
                weights hash are compared).
            providers: ONNX Runtime providers; default ``default_providers()``.
            threads: intra-op threads of ONNX Runtime; None for its default.
            check_hashes: compare the files' SHA256 with the manifest.

        Raises:
            FileNotFoundError: the folder, its manifest or one of its files is missing.
            ValueError: another model, format or condfx version, a file or manifest field that
                changed, a graph ONNX Runtime cannot load, or graphs whose inputs and outputs
                disagree with the manifest (``condfx.runtime.bundle_check``).
        """
        import onnxruntime as ort

        folder = Path(folder)
        manifest = read_manifest(folder)
        paths = check_files(folder, manifest, hashes=check_hashes)
        if model is not None:
            check_model(folder, manifest, model_identity(model))
            check_model_limit(folder, manifest, model)
        options = ort.SessionOptions()
        if threads is not None:
            options.intra_op_num_threads = threads
        chosen = list(providers or default_providers())
        prefill, decode = (_open(folder, paths[k], options, chosen) for k in ("prefill", "decode"))
        check_graphs(folder, manifest, layouts(manifest), prefill, decode)
        return cls(prefill, decode, manifest)

    @classmethod
    def from_graph(cls, gm: fx.GraphModule, **kwargs: Any) -> OnnxBackend:
        """Exports a decode-form graph (``add-kv-cache`` output) to a temporary folder and opens it.

        ONNX Runtime holds the models in memory once loaded, so the folder is removed afterwards.
        ``kwargs`` go to ``from_dir`` (providers, threads).
        """
        with tempfile.TemporaryDirectory(prefix="condfx-onnx-") as tmp:
            export_decode_graph(gm, tmp, verify=False)
            return cls.from_dir(tmp, **kwargs)

    def run(
        self, input_ids: torch.Tensor, past: Sequence[torch.Tensor]
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Runs one prefill or decode call (see ``DecodeBackend``).

        Args:
            input_ids: (B, T) int64 ids.
            past: ``[past_k_0, past_v_0, ...]``, each (B, Hkv, P_i, D).

        Returns:
            logits (B, T, V) and ``[present_k_0, present_v_0, ...]``, each (B, Hkv, P_i + T, D).
        """
        check_token_ids(input_ids, self.vocab_size, "OnnxBackend.run")
        ids = input_ids.detach().cpu().numpy()
        if all(p.shape[2] == 0 for p in past):
            outs = self.prefill_session.run(self._outputs, {self._inputs[0]: ids})
        else:
            arrays = [np.ascontiguousarray(p.detach().cpu().numpy()) for p in past]
            feeds = dict(zip(self._inputs, [ids, *arrays], strict=True))
            outs = self.decode_session.run(self._outputs, feeds)
        tensors = [torch.from_numpy(o) for o in outs]
        return tensors[0], tensors[1:]
