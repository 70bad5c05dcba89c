"""Shared fixtures of the runtime tests: models, their decode graphs and sessions, built once."""

from __future__ import annotations

import atexit
import functools
import shutil
import tempfile
from pathlib import Path

import torch

import condfx
from condfx import models_zoo
from tests._data import require_data

STORIES = "stories260K"


def load_model(name: str):
    """(model, tokenizer) for a zoo name or ``"stories260K"`` (the data file; fails in CI if missing)."""
    if name == STORIES:
        from condfx.models_zoo import load_llama2c

        return load_llama2c(require_data("stories260K.bin"), require_data("tok512.bin"))
    return models_zoo.load(name)


@functools.cache
def decode_graph(name: str):
    """(model, PipelineResult of 'fuse-attention, add-kv-cache') for ``name``, built once per run."""
    model, _ = load_model(name)
    gm = condfx.capture(model, (torch.zeros(2, 8, dtype=torch.long),))
    return model, condfx.apply(gm, "fuse-attention, add-kv-cache")


@functools.cache
def stories_bundle() -> Path:
    """The ONNX bundle of stories260K ('fuse-attention'), exported and checked against PyTorch once
    per run; shared by the runtime and hostile tests, which copy it before changing anything."""
    from condfx.export_bundle import export_decode_graph, model_identity

    model, result = decode_graph(STORIES)
    root = Path(tempfile.mkdtemp(prefix="condfx-stories-onnx-"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    bundle = export_decode_graph(
        result.graph_module, root, identity=model_identity(model, STORIES), passes="fuse-attention"
    )
    assert bundle.max_abs_diff <= 1e-4
    return root


def empty_past(gm, batch: int) -> list[torch.Tensor]:
    """Zero-length past tensors for every layer of a decode graph."""
    return [
        torch.zeros(batch, s.n_kv_heads, 0, s.head_dim, dtype=s.dtype)
        for s in gm.meta["condfx_kv"]
        for _ in (0, 1)
    ]


def logits_of(out) -> torch.Tensor:
    """Logits from a model output (tensor or Hugging Face ModelOutput)."""
    return out.logits if hasattr(out, "logits") else out
