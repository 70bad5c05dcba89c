"""Captured graphs shared by the IHA tests (interleave-heads, fold-interleave, runtime): one capture
per model per test session; callers get private copies."""

from __future__ import annotations

import copy
import functools
import warnings

import torch

import condfx
from tests._data import require_data


@functools.cache
def _captured(name: str):
    from condfx.models_zoo import load

    model, _ = load(require_data("stories260K.bin") if name == "stories260K" else name)
    ids = torch.randint(3, 60, (2, 12), generator=torch.Generator().manual_seed(0))
    return condfx.capture(model, (ids,)), ids


def captured(name: str = "llama-tiny"):
    """(private copy of the captured graph of zoo model ``name`` or "stories260K", ids (2, 12))."""
    gm, ids = _captured(name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # pytree deprecation inside deepcopy
        return copy.deepcopy(gm), ids
