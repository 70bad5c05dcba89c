"""The ONNX bundle the runtime loads: prefill.onnx, decode.onnx and condfx_manifest.json.

``export_decode_graph`` writes it for a graph in decode form (``add-kv-cache`` output), exporting
both graphs with ``condfx.codegen.onnx_export.export_onnx``; ``condfx.export(...)`` /
``condfx export MODEL --passes SPEC -o DIR`` (``condfx.export_bundle.export_model``) captures a model
and applies its passes first. The runtime reads it back (``condfx.runtime.onnx_backend``).

    weights.data          the initializers of both graphs, each tensor once (``share_initializers``)
    prefill.onnx          input_ids (B, T) -> logits (B, T, V), the presents of every layer: the
                          decode graph with every past fixed to length 0
    decode.onnx           input_ids (B, T), the pasts of every layer -> logits, the presents
                          (names and shapes from each layer's cache layout, ``condfx.layouts``:
                          past_k_i / past_v_i (B, Hkv, P_i, D) for plain K/V caches)
    condfx_manifest.json  format and condfx version, model identity (info + weights hash), the cache
                          layouts (``layout.to_json()``), vocab, max_seq_len, passes, opset, IO
                          names, file hashes, the ORT vs PyTorch check, and ``manifest_sha256``:
                          one SHA256 per other top-level field (``manifest_hashes``), so an edit
                          is refused naming the field it changed

Dims batch, seq and the layouts' past lengths are dynamic, then ONNX Runtime is compared with
PyTorch on a prefill and on a decode step after it.
"""


from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import fx, nn

from condfx.codegen.onnx_export import ExportError, ExportResult, export_onnx
from condfx.codegen.shared_weights import share_initializers
from condfx.data import file_sha256
from condfx.model_io import weights_sha256
from condfx.version import __version__

MANIFEST_NAME = "condfx_manifest.json"
MANIFEST_FORMAT = "condfx-onnx"
MANIFEST_FORMAT_VERSION = 2  # 2: layers are cache layouts (condfx.layouts), with a kind
PREFILL_FILE, DECODE_FILE = "prefill.onnx", "decode.onnx"
MANIFEST_HASH_KEY = "manifest_sha256"  # {field: sha256 of its canonical JSON} for every other field
_EXAMPLE_PAST = 3  # past length of the decode example: 0 and 1 would be specialised by torch.export


@dataclass(frozen=True)
class ExportBundle:
    """What ``export_model`` wrote: the two graphs, their manifest and the ORT vs PyTorch check.

    Attributes:
        out_dir: the folder holding ``prefill.onnx``, ``decode.onnx`` and ``condfx_manifest.json``.
        prefill: the ExportResult of ``prefill.onnx`` (input_ids -> logits, presents).
        decode: the ExportResult of ``decode.onnx`` (input_ids, pasts -> logits, presents).
        manifest: the manifest as written.
        diffs: max |ORT - PyTorch| over logits and presents, ``{"prefill": .., "decode": ..}``;
            empty when verification was off.
        max_abs_diff: the largest of ``diffs``, or None.
    """

    out_dir: Path
    prefill: ExportResult
    decode: ExportResult
    manifest: dict[str, Any]
    diffs: dict[str, float] = field(default_factory=dict)
    max_abs_diff: float | None = None


class _Prefill(nn.Module):
    """The decode graph with every past fixed to length 0: ``forward(input_ids)``."""

    def __init__(self, decode: fx.GraphModule):
        super().__init__()
        self.decode = decode
        self.layers = tuple(decode.meta["condfx_kv"])

    def forward(self, input_ids: torch.Tensor):
        b = input_ids.shape[0]
        past = [t for s in self.layers for t in s.empty_past(b, input_ids.device)]  # length 0 each
        return self.decode(input_ids, *past)


def io_names(layers: Sequence[Any]) -> tuple[list[str], list[str]]:
    """ONNX names of the decode graph: ``(inputs, outputs)``; prefill takes ``inputs[:1]``."""
    past = [f"past_{n}" for s in layers for n in s.io_names()]
    present = [f"present_{n}" for s in layers for n in s.io_names()]
    return ["input_ids", *past], ["logits", *present]


def model_identity(model: nn.Module, spec: str | None = None) -> dict[str, Any]:
    """What identifies the exported model: ``model.info`` fields, the spec and a weights hash."""
    info = getattr(model, "info", None)
    ident = dataclasses.asdict(info) if dataclasses.is_dataclass(info) else {}
    ident.setdefault("name", spec or type(model).__name__)
    return {**ident, "spec": spec, "weights_sha256": weights_sha256(model)}


def _files_entry(result: ExportResult, inputs: list[str], outputs: list[str], data: Path | None) -> dict:
    return {
        "path": result.path.name,
        "sha256": file_sha256(result.path),
        "external_data": data.name if data else None,
        "external_data_sha256": file_sha256(data) if data else None,
        "inputs": inputs,
        "outputs": outputs,
    }


def _manifest(gm, identity, passes, prefill, decode, diffs, data: Path | None) -> dict[str, Any]:
    layers = gm.meta["condfx_kv"]
    inputs, outputs = io_names(layers)
    return {
        "format": MANIFEST_FORMAT,
        "format_version": MANIFEST_FORMAT_VERSION,
        "condfx_version": __version__,
        "opset": decode.opset,
        "model": identity,
        "vocab_size": _vocab(gm),
        "max_seq_len": identity.get("max_seq_len"),
        "passes": passes,
        "layers": [layout.to_json() for layout in layers],  # condfx.layouts, by kind
        "files": {
            "prefill": _files_entry(prefill, inputs[:1], outputs, data),
            "decode": _files_entry(decode, inputs, outputs, data),
        },
        "max_abs_diff": diffs,
    }


def manifest_hashes(manifest: dict[str, Any]) -> dict[str, str]:
    """SHA256 of each top-level field's canonical JSON (sorted keys, no spaces), the hash field aside.

    Per field, so that the reader names the field that was edited. It guards against careless or
    accidental edits, not against someone who rewrites the hashes too: the runtime also checks the
    manifest against the graphs themselves (``condfx.runtime.bundle_check``).
    """
    out = {}
    for key in sorted(manifest):
        if key != MANIFEST_HASH_KEY:
            text = json.dumps(manifest[key], sort_keys=True, separators=(",", ":"))
            out[key] = hashlib.sha256(text.encode()).hexdigest()
    return out


def _device(gm: fx.GraphModule) -> torch.device:
    weights = [*gm.parameters(), *gm.buffers()]
    return weights[0].device if weights else torch.device("cpu")


def _vocab(gm: fx.GraphModule) -> int:
    """Dim -1 of the decode graph's first output, the logits."""
    output = next(n for n in gm.graph.nodes if n.op == "output")
    return int(output.args[0][0].meta["val"].shape[-1])


def graph_vocab_size(gm: fx.GraphModule) -> int | None:
    """The vocabulary of a decode-form graph (its logits' last dim), None when not recorded."""
    try:
        return _vocab(gm)
    except (StopIteration, KeyError, IndexError, TypeError, AttributeError):
        return None


def _max_diff(got: list[np.ndarray], want: Sequence[torch.Tensor]) -> float:
    """Largest |ORT - PyTorch| over the floating outputs (logits, full-precision and float16 cache
    tensors). Packed integer codes are left out: a rounding tie may flip one code (more often in
    float16 models), which moves its packed byte by up to 192 but a read value by one step; the logits
    of the step that reads the cache carry that effect."""
    return max(
        (float(np.max(np.abs(g.astype(np.float64) - w.detach().double().numpy()), initial=0.0))
         for g, w in zip(got, want, strict=True) if w.is_floating_point()),
        default=0.0,
    )


def _verify_bundle(gm: fx.GraphModule, out_dir: Path) -> dict[str, float]:
    """ORT vs PyTorch on a prefill (B=2, T=7) and a two-token decode step after it."""
    import onnxruntime as ort

    layers = gm.meta["condfx_kv"]
    inputs, _ = io_names(layers)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, _vocab(gm), (2, 7), generator=gen)  # (B, T) prompt
    nxt = torch.randint(0, _vocab(gm), (2, 2), generator=gen)  # (B, 2) next tokens
    device = _device(gm)
    empty = [t for s in layers for t in s.empty_past(2)]
    with torch.no_grad():
        first = [t.cpu() for t in gm(ids.to(device), *(e.to(device) for e in empty))]
        second = [t.cpu() for t in gm(nxt.to(device), *(t.to(device) for t in first[1:]))]
    cpu = ["CPUExecutionProvider"]
    try:
        pre = ort.InferenceSession(str(out_dir / PREFILL_FILE), providers=cpu)
        dec = ort.InferenceSession(str(out_dir / DECODE_FILE), providers=cpu)
        got_pre = pre.run(None, {"input_ids": ids.numpy()})
        feeds = dict(zip(inputs, [nxt.numpy(), *(t.numpy() for t in first[1:])], strict=True))
        got_dec = dec.run(None, feeds)
    except Exception as exc:  # ORT raises its own exception hierarchy
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        msg = f"ONNX Runtime could not run the export in '{out_dir}': {reason}"
        if "NOT_IMPLEMENTED" in reason and first[0].dtype == torch.bfloat16:
            msg += " (its CPU provider has no bfloat16 kernel for this op: export the model in float32 or float16)"
        raise ExportError(msg) from exc
    return {"prefill": _max_diff(got_pre, first), "decode": _max_diff(got_dec, second)}


def _example(shape_of: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random values of the shape and dtype of ``shape_of`` (codes in the uint8 range)."""
    if shape_of.dtype == torch.uint8:
        return torch.randint(0, 256, shape_of.shape, generator=gen, dtype=torch.uint8)
    return torch.randn(shape_of.shape, generator=gen).to(shape_of.dtype)


def export_decode_graph(
    gm: fx.GraphModule,
    out_dir: str | os.PathLike,
    *,
    identity: dict[str, Any] | None = None,
    passes: str = "",
    verify: bool = True,
    opset: int = 18,
) -> ExportBundle:
    """Writes ``prefill.onnx``, ``decode.onnx`` and the manifest for a decode-form graph.

    Args:
        gm: the output of ``add-kv-cache`` (``gm.meta["condfx_kv"]`` set).
        out_dir: the folder to write; created if missing.
        identity: the model's identity for the manifest (``model_identity``); None for a bare graph.
        passes: the pass spec that produced ``gm`` (recorded in the manifest).
        verify: compare ONNX Runtime with PyTorch on a prefill and a decode step after it.
        opset: the standard ONNX opset.

    Returns:
        The ExportBundle.

    Raises:
        ValueError: ``gm`` is not in decode form, or the folder is not writable.
        ExportError: torch.onnx.export, the ONNX checker or ONNX Runtime failed.
    """
    if not isinstance(gm, fx.GraphModule) or "condfx_kv" not in gm.meta:
        msg = "export_decode_graph needs the decode form of a graph; apply 'add-kv-cache' first."
        raise ValueError(msg)
    out = Path(out_dir)
    layers = gm.meta["condfx_kv"]
    inputs, outputs = io_names(layers)
    device = _device(gm)  # examples live beside the weights
    ids = torch.zeros(2, 5, dtype=torch.long, device=device)
    gen = torch.Generator().manual_seed(0)
    past = [  # (B, Hkv, P, D) per layer, k and v (KIVI: eight stream tensors)
        _example(t, gen).to(device) for s in layers for t in s.empty_past(2, None, _EXAMPLE_PAST)
    ]
    common = dict(output_names=outputs, verify=False, opset=opset)
    prefill = export_onnx(_Prefill(gm), ids, out / PREFILL_FILE, input_names=inputs[:1], **common)
    decode = export_onnx(gm, (ids, *past), out / DECODE_FILE, input_names=inputs, **common)
    shared = share_initializers([prefill.path, decode.path])  # one copy of the weights for both
    prefill, decode = (dataclasses.replace(r, external_data=True) for r in (prefill, decode))
    diffs = _verify_bundle(gm, out) if verify else {}
    identity = identity or {"name": "graph", "spec": None, "weights_sha256": weights_sha256(gm)}
    manifest = _manifest(gm, identity, passes, prefill, decode, diffs, shared.data_file)
    manifest[MANIFEST_HASH_KEY] = manifest_hashes(manifest)
    (out / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")
    worst = max(diffs.values()) if diffs else None
    return ExportBundle(out, prefill, decode, manifest, diffs, worst)
