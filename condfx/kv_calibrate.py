"""Calibration of ``quantize-kv{latent=klt}``: second moments of each attention layer's q, k and v.

``record_kv_stats(gm, batches)`` runs the captured graph on calibration token batches and stores,
per attention layer, E[k kᵀ] and E[v vᵀ] (the k_proj / v_proj outputs, before RoPE, bias included)
and, per KV head, E[q qᵀ] summed over the query heads that read it (q_proj output, before RoPE) in
``gm.meta["condfx_kv_stats"]``. The first ``skip`` positions of every batch row (the attention sink,
kept in full precision by ``sink``) are left out: their activations are orders of magnitude larger
and would dominate the moments.

Each layer's statistics carry the SHA256 of its q/k/v/o projection weights (``projection_sha256``);
``quantize-kv`` refuses statistics recorded on other weights. ``check_kv_calibration_used`` refuses
calibration text handed to a pipeline without ``latent=klt`` (it would be recorded and ignored).

``quantize-kv`` turns them into one basis per stream (``klt_basis``): the Karhunen-Loève transform of
the keys in a query-weighted space (an error in a key channel costs what the queries put on it) and of
the values in the space the output projection weighs them by, with coefficients ordered by variance,
and spends the stream's bits where the variance is (``allocate_bits``). Those maths live in
``condfx/passes/kv_quant/klt_math.py`` (re-exported here), below both this module and the pass.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

import torch
from torch import fx

from condfx.passes._insert import output_view
from condfx.passes.kv_quant.klt_math import (  # noqa: F401  (re-exported: the KLT maths live there)
    DROP_PENALTY,
    META_KEY,
    LayerKVStats,
    allocate_bits,
    klt_basis,
    output_weights,
    projection_sha256,
    query_weights,
)
from condfx.patterns import find_regions
from condfx.patterns.regions import AttentionRegion

__all__ = [
    "DROP_PENALTY", "META_KEY", "LayerKVStats", "allocate_bits", "check_kv_calibration_used",
    "klt_basis", "output_weights", "projection_sha256", "query_weights", "record_kv_stats",
    "text_batches",
]


def _usable(region: AttentionRegion) -> bool:
    projs = (region.q_proj, region.k_proj, region.v_proj)
    return all(p is not None and p.out_slice is None and p.node.meta["val"].dim() == 3 for p in projs)


def record_kv_stats(gm: fx.GraphModule, batches: Iterable[torch.Tensor], skip: int = 4) -> dict[int, int]:
    """Runs ``gm`` on ``batches`` of input ids (B, T) and stores every attention layer's q/k/v second
    moments in ``gm.meta["condfx_kv_stats"]`` (replacing earlier ones), leaving out the first ``skip``
    positions of each row. Returns {layer: calibration tokens}."""
    regions = [r for r in find_regions(gm).attention if _usable(r)]
    if not regions:
        msg = "record_kv_stats found no attention layer with separate q/k/v projections to calibrate."
        raise ValueError(msg)
    names = [p.node.name for r in regions for p in (r.q_proj, r.k_proj, r.v_proj)]

    def outputs(graph: fx.Graph, _output: fx.Node) -> list[fx.Node]:
        by_name = {n.name: n for n in graph.nodes}
        return [by_name[name] for name in names]

    view = output_view(gm, outputs)
    sums: list[list[torch.Tensor | float]] = [[0.0, 0.0, 0.0] for _ in regions]
    tokens = 0
    with torch.no_grad():
        for ids in batches:
            outs = view(ids)
            rows = int(ids.shape[0]) * max(0, int(ids.shape[1]) - skip)
            if rows == 0:
                continue
            tokens += rows
            for i, r in enumerate(regions):
                q, k, v = (o[:, skip:].double().reshape(rows, -1) for o in outs[3 * i : 3 * i + 3])
                hkv, hd = r.num_kv_heads, r.head_dim
                qh = q.reshape(rows, hkv, r.num_heads // hkv, hd)  # query heads grouped by KV head
                sums[i][0] += torch.einsum("nhgd,nhge->hde", qh, qh)
                sums[i][1] += k.T @ k
                sums[i][2] += v.T @ v
    if tokens == 0:
        msg = f"record_kv_stats got no tokens after the first {skip} of each row: pass longer batches."
        raise ValueError(msg)
    stats = {r.layer: LayerKVStats(k=s[1] / tokens, v=s[2] / tokens, q=s[0] / tokens, tokens=tokens,
                                   weights_sha256=projection_sha256(gm, r))
             for r, s in zip(regions, sums, strict=True)}
    bad = [layer for layer, s in stats.items() if not all(bool(torch.isfinite(m).all()) for m in (s.k, s.v, s.q))]
    if bad:
        msg = (f"record_kv_stats got NaN or infinite q/k/v moments in layers {bad[:5]}: the model's "
               "activations overflow on the calibration text; check its weights and dtype.")
        raise ValueError(msg)
    gm.meta[META_KEY] = stats
    return {layer: s.tokens for layer, s in stats.items()}


def text_batches(path, tokenizer, tokens: int = 4096, length: int = 512) -> list[torch.Tensor]:
    """Calibration batches from a text file: its first ``tokens`` tokens as (1, ``length``) id tensors.

    Raises:
        ValueError: one sentence: the path is not a readable UTF-8 text file, or too short.
    """
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read(tokens * 16)
    except (OSError, UnicodeDecodeError) as exc:
        why = "a folder" if os.path.isdir(path) else type(exc).__name__
        msg = f"calibration text {str(path)!r} is not a readable UTF-8 text file ({why})."
        raise ValueError(msg) from None
    ids = tokenizer.encode(text, bos=True, eos=False)[:tokens]
    if len(ids) < length:
        msg = f"calibration text {path} gives {len(ids)} tokens; at least {length} are needed."
        raise ValueError(msg)
    return [torch.tensor([ids[i : i + length]]) for i in range(0, len(ids) - length + 1, length)]


def check_kv_calibration_used(passes: str) -> None:
    """Refuses KV calibration for a pipeline in which no ``quantize-kv{latent=klt}`` would read it.

    Args:
        passes: the pipeline spec (text or spec file) the calibration is meant for.

    Raises:
        ValueError: one sentence: the calibration would be recorded and then ignored.
    """
    from condfx.passes.kv_quant.config import LatentKind
    from condfx.passes.spec import build_passes

    if any(getattr(p.config, "latent", None) is LatentKind.KLT for p in build_passes(passes)):
        return
    msg = (f"--kv-calib (KV calibration) is only read by quantize-kv{{latent=klt}}, which the "
           f"passes {passes!r} do not contain; drop it or add latent=klt.")
    raise ValueError(msg)
