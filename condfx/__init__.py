"""condfx: compiler-style graph transformations for transformer language models.

The public API is imported lazily so that ``import condfx`` stays cheap for the CLI.
"""

from __future__ import annotations

import importlib

# The stage folders (passes/, patterns/, codegen/, runtime/, models_zoo/) sit at the repository
# root; relative symlinks inside this package (condfx/passes -> ../passes, ...) make them
# condfx.passes etc. in a source checkout, and pyproject.toml's package-dir maps them into the
# wheel. Nothing edits __path__ at run time, so static tools (import-linter) read the same package.
# Functions that share their module's name are imported eagerly: importing the submodule later would
# otherwise rebind ``condfx.capture`` to the module.
from condfx.capture import CaptureError, capture  # noqa: E402
from condfx.train import train  # noqa: E402
from condfx.verify import verify  # noqa: E402
from condfx.version import __version__

_LAZY = {
    "apply": ("condfx.lifecycle", "apply"),  # the pipeline with the life-cycle table
    "export_model": ("condfx.export_bundle", "export_model"),
    "export": ("condfx.export_bundle", "export_model"),  # condfx.export(model, out_dir) = export_model
    "export_onnx": ("condfx.export_bundle", "export_onnx"),
}


def __getattr__(name: str):
    if name in _LAZY:
        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    msg = f"module 'condfx' has no attribute {name!r}"
    raise AttributeError(msg)


__all__ = [  # apply, export, export_model and export_onnx are resolved lazily by __getattr__
    "CaptureError", "__version__", "apply", "capture", "export", "export_model", "export_onnx", "train",
    "verify",
]
