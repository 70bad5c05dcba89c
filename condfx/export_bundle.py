"""``condfx.export(...)`` / ``condfx export MODEL --passes SPEC -o DIR``: a model to its ONNX bundle.

``export_model`` loads (a spec) or takes a model, captures it, records calibration statistics when
asked, applies the passes and ``add-kv-cache``, and writes the bundle with
``condfx.codegen.bundle.export_decode_graph`` (the files are described there). The exporter's other
names are re-exported here, so ``condfx.export_bundle`` is the one module users import them from.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from condfx.codegen.bundle import (
    DECODE_FILE,
    MANIFEST_FORMAT,
    MANIFEST_FORMAT_VERSION,
    MANIFEST_NAME,
    PREFILL_FILE,
    ExportBundle,
    export_decode_graph,
    io_names,
    model_identity,
    weights_sha256,
)
from condfx.codegen.onnx_export import (
    ExportError,
    ExportResult,
    check_opset,
    check_writable,
    export_onnx,
)
from condfx.data import file_sha256


def export_model(
    model_or_spec: nn.Module | str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    passes: str = "fuse-attention",
    verify: bool = True,
    opset: int = 18,
    progress: Any = None,
    kv_calibration: Any = None,
) -> ExportBundle:
    """Captures a model, applies ``passes`` + ``add-kv-cache`` and writes its ONNX bundle.

    This is ``condfx export MODEL --passes SPEC -o DIR`` from Python; ``condfx.export(...)`` is this
    function.

    Args:
        model_or_spec: a causal LM taking ids (B, T), or what ``condfx.models_zoo.load`` takes
            (a zoo name, a llama2.c ``.bin``, a ``.gguf`` file, a Hugging Face folder).
        out_dir: the folder for ``prefill.onnx``, ``decode.onnx`` and ``condfx_manifest.json``.
        passes: the pipeline run before ``add-kv-cache``; it must fuse attention.
        verify: compare ONNX Runtime with PyTorch (prefill, then a decode step) after writing.
        opset: the standard ONNX opset, 18 or later (23: RMSNorm and attention with its cache as
            single standard nodes, faster on ONNX Runtime 1.22+; ``condfx.codegen.onnx_peephole``).
        progress: called with a short message before each stage (e.g. ``print``), or None.
        kv_calibration: for ``quantize-kv{latent=klt}``'s statistics (``condfx.kv_calibrate.
            record_kv_stats`` on the captured graph): batches of input ids (B, T), or a text file
            (its first 4,096 tokens, with the tokenizer of a model given as a spec), or None.

    Returns:
        The ExportBundle (``bundle.max_abs_diff`` is the ORT vs PyTorch check).

    Raises:
        TypeError: the model is neither a module nor a spec.
        ValueError: a bad spec, pass spec, opset or output folder.
        PassError: a pass failed (e.g. attention was not fused).
        ExportError: torch.onnx.export, the ONNX checker or ONNX Runtime failed.
    """
    import condfx

    say = progress or (lambda _msg: None)
    check_opset(opset)
    spec, tokenizer = None, None
    if isinstance(model_or_spec, (str, os.PathLike)):
        from condfx.models_zoo import load

        spec = str(model_or_spec)
        say(f"loading {spec}")
        model_or_spec, tokenizer = load(spec)
    if not isinstance(model_or_spec, nn.Module):
        got = type(model_or_spec).__name__
        msg = f"export_model needs a torch.nn.Module or a model spec string; got {got}."
        raise TypeError(msg)
    check_writable(Path(out_dir) / MANIFEST_NAME)
    say("capturing and applying passes")
    gm = condfx.capture(model_or_spec, (torch.zeros(2, 8, dtype=torch.long),))
    if kv_calibration is not None:
        from condfx.kv_calibrate import record_kv_stats, text_batches

        if isinstance(kv_calibration, (str, os.PathLike)):
            if tokenizer is None:
                msg = ("export_model: kv_calibration as a text file needs the model as a spec (for its "
                       "tokenizer); with a module, pass batches of input ids.")
                raise ValueError(msg)
            kv_calibration = text_batches(kv_calibration, tokenizer)
        say("recording q/k/v statistics for quantize-kv")
        record_kv_stats(gm, kv_calibration)
    fused = condfx.apply(gm, passes)
    decode = condfx.apply(fused.graph_module, "add-kv-cache").graph_module
    say(f"exporting {PREFILL_FILE} and {DECODE_FILE}" + (" and verifying" if verify else ""))
    identity = model_identity(model_or_spec, spec)
    return export_decode_graph(
        decode, out_dir, identity=identity, passes=passes, verify=verify, opset=opset
    )


__all__ = [
    "DECODE_FILE", "MANIFEST_FORMAT", "MANIFEST_FORMAT_VERSION", "MANIFEST_NAME", "PREFILL_FILE",
    "ExportBundle", "ExportError", "ExportResult", "export_decode_graph", "export_model", "export_onnx",
    "file_sha256", "io_names", "model_identity", "weights_sha256",
]
