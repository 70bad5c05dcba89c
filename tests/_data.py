"""Shared test helper for the reference data files (see condfx/data.py).

In CI (env ``CI=true``) a missing or wrong data file fails the test with a clear message; elsewhere
the test is skipped.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from condfx.data import DataFileError, data_file

# data/README.md: stories260K, greedy from BOS + "Zoo" (llama2.c `-n 60`: 60 steps, 57 new tokens).
STORIES_ZOO_REFERENCE = (
    "Zoo was a little girl named Lily. She loved to play outside in the park. One day, she saw a big, "
    "red ball. She wanted to play with it, but she didn't want to play with"
)


def require_data(name: str) -> Path:
    """Return the checked path of data file ``name``, or fail (CI) / skip (elsewhere) the test.

    Args:
        name: file name inside the data folder, e.g. ``"stories260K.bin"``.

    Returns:
        The path of the file, its SHA256 verified.
    """
    try:
        return data_file(name)
    except (FileNotFoundError, DataFileError) as err:
        msg = f"data file {name!r} unavailable: {err}"
        if os.environ.get("CI") == "true":
            pytest.fail(msg, pytrace=False)
        pytest.skip(msg)
