"""``model_identity``: which model a calibration file or a trained state file was made for.

``skip-ffn`` checks a ``state`` file against it and records it in ``gm.meta["condfx_identity"]``;
``condfx.calibrate`` stores it in calibration files. It lives in the passes layer so that a pass
never imports the API layer to check a file.
"""

from __future__ import annotations

import hashlib
from typing import Any

from torch import fx

from condfx.patterns import _graph as g
from condfx.patterns import find_regions


def model_identity(gm: fx.GraphModule) -> dict[str, Any]:
    """n_layers (FFN regions), dim, and a sha256 of the FFN weights' shapes and first values.

    Args:
        gm: a graph in the canonical IR (before ``skip-ffn``: its FFN regions are hashed).

    Returns:
        ``{"n_layers": int, "dim": int, "hash": 16 hex digits}``.
    """
    ffn = find_regions(gm).ffn
    h = hashlib.sha256()
    for region in ffn:
        for ref in (region.up, region.gate, region.down):
            if ref is None:
                continue
            w = g.get_attr_value(gm, ref.weight)
            head = w.detach().reshape(-1)[:8].double().cpu().tolist()
            h.update(f"{tuple(w.shape)}:{[round(v, 5) for v in head]};".encode())
    dim = ffn[0].dim if ffn else 0
    return {"n_layers": len(ffn), "dim": dim, "hash": h.hexdigest()[:16]}
