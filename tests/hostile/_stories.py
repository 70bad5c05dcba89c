"""stories260K captured once per test session for the hostile option, state-file and verification
tests (deep-copy before changing it)."""

from __future__ import annotations

import copy
import functools
import warnings

import torch

import condfx
from tests._data import require_data


@functools.cache
def _captured():
    from condfx.models_zoo import load

    model, _ = load(str(require_data("stories260K.bin")))
    return model.eval(), condfx.capture(model.eval(), (torch.zeros(1, 8, dtype=torch.long),))


def stories_model():
    """The loaded stories260K model (shared: do not change it)."""
    return _captured()[0]


def stories_graph():
    """A private deep copy of the captured stories260K graph."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return copy.deepcopy(_captured()[1])
