"""``model_identity``: which model a calibration or state file was made for.

``model_identity(gm)`` is the shapes plus a SHA256 of every weight (``condfx.model_io.
weights_sha256``, the hash the ONNX bundle's manifest carries). ``skip-ffn`` checks a ``state``
file against it and records it in ``gm.meta["condfx_identity"]``; ``condfx.calibrate`` stores it in
calibration files. It lives in the passes layer (it finds the FFN regions) so that a pass never
imports the API layer to check a file; the file reading and the comparison it uses
(``read_state_file``, ``check_identity``, ``weights_identity``) live in ``condfx.model_io``, below
everything, and are re-exported here.
"""

from __future__ import annotations

from typing import Any

from torch import fx

from condfx.model_io import check_identity, read_state_file, weights_identity, weights_sha256
from condfx.patterns import find_regions

__all__ = ["check_identity", "model_identity", "read_state_file", "weights_identity"]


def model_identity(gm: fx.GraphModule) -> dict[str, Any]:
    """n_layers (FFN regions), dim, and the SHA256 of all of ``gm``'s weights.

    Args:
        gm: a graph in the canonical IR (before ``skip-ffn``: what a state file is made for).

    Returns:
        ``{"n_layers": int, "dim": int, "weights_sha256": 64 hex digits}``.
    """
    ffn = find_regions(gm).ffn
    return {"n_layers": len(ffn), "dim": ffn[0].dim if ffn else 0, "weights_sha256": weights_sha256(gm)}


