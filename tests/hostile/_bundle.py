"""One tiny ONNX bundle per test run, shared by the hostile bundle and runtime tests.

``condfx export llama-tiny`` (2 layers, 2 KV heads, head dim 16, vocab 256), written once into a
temporary folder without the ORT vs PyTorch check (tests/test_export_decode.py covers that); tests
copy it before they damage it.
"""

from __future__ import annotations

import atexit
import functools
import shutil
import tempfile
from pathlib import Path

MODEL = "llama-tiny"


@functools.cache
def tiny_bundle() -> Path:
    """The folder of ``export_model("llama-tiny")``; never modify it, copy it."""
    from condfx.export_bundle import export_model

    root = Path(tempfile.mkdtemp(prefix="condfx-hostile-bundle-"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    export_model(MODEL, root / "bundle", verify=False)
    return root / "bundle"


def copy_bundle(dest: Path) -> Path:
    """A fresh copy of the tiny bundle at ``dest``."""
    shutil.copytree(tiny_bundle(), dest)
    return dest
