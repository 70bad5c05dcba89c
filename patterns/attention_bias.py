"""Additive score biases of eager attention: a causal / windowed mask plus ALiBi, found by evaluation.

The eager finder (``attention.py``) records every tensor added to the scores with the factor the
scores are multiplied by after it (``(q k^T + alibi) * c`` adds ``c * alibi``) and the rank of the
scores where it is added (3: Bloom's (B*H, T, S), 4: (B, H, T, S)). Terms that are not pure masks are
summed here at a few (B, T) probes into one (B, H, T, T) bias; its very negative entries are masked
positions, the rest must be ``m_h * (j - i) + c(b, h, i)`` on the visible keys. ``c`` is constant per
query row, which softmax ignores, so Bloom's ``m * j``, MPT's ``m * (j - (S - 1))`` and Falcon's
double-counted bias (eager adds it to the scores and to the mask) all reduce to per-head slopes ``m``.

Does not handle: biases that are not linear in the key position (T5-style buckets: "not ALiBi"),
slopes that differ by batch; a bias that also carries the mask is probed at T <= 33, so a window longer
than that is not told from causal.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx

from condfx.ops._masks import causal_window_mask
from condfx.patterns.mask import PROBE_SIZES, MaskAnalyzer, MaskInfo, window_of
from condfx.patterns.regions import MatchFailure

ALIBI = "scores carry an additive position bias (ALiBi)"
_VERY_NEGATIVE = -1e4
_BIAS_PROBES = ((1, 5), (2, 9), (1, 33))


@dataclass(frozen=True)
class BiasTerm:
    """One tensor added to the scores: ``node`` times ``factor``, at scores of rank ``rank`` (3 or 4)."""

    node: fx.Node
    factor: float
    rank: int


def _fail(node: fx.Node, detail: str) -> MatchFailure:
    return MatchFailure(ALIBI, node, detail, "attention")


def _total(terms: list[BiasTerm], masks: MaskAnalyzer, b: int, t: int, h: int) -> torch.Tensor | MatchFailure:
    """The summed bias (B, H, T, T) in float64 at probe (b, t)."""
    total = torch.zeros(b, h, t, t, dtype=torch.float64)
    for term in terms:
        value = masks.evaluate(term.node, b, t)
        if isinstance(value, MatchFailure):
            return value
        if not isinstance(value, torch.Tensor) or not value.is_floating_point():
            return _fail(term.node, "bias is not a float tensor")
        value = value.double() * term.factor
        try:
            if term.rank == 3:
                value = torch.broadcast_to(value, (b * h, t, t)).reshape(b, h, t, t)
            total = total + torch.broadcast_to(value, (b, h, t, t))
        except RuntimeError as exc:
            return _fail(term.node, f"bias does not broadcast to the scores: {exc}"[:160])
    return total


def _slopes(total: torch.Tensor, keep: torch.Tensor, node: fx.Node) -> torch.Tensor | MatchFailure:
    """Per-head slopes (H,) of ``total`` on the visible entries ``keep`` (T, T), or why it is not ALiBi."""
    t = total.shape[-1]
    diag = torch.diagonal(total, dim1=-2, dim2=-1).unsqueeze(-1)  # (B, H, T, 1): bias at j = i
    rel = total - diag  # m_h * (j - i) where visible
    dist = (torch.arange(t).unsqueeze(0) - torch.arange(t).unsqueeze(1)).double()  # (T, T): j - i
    if t < 2 or not bool(keep[-1, -2]):
        return torch.zeros(total.shape[1], dtype=torch.float64)  # one visible key per row: no slope
    slopes = -rel[0, :, -1, -2]  # (H,) from the last row's previous key
    want = slopes.view(1, -1, 1, 1) * dist
    tol = 1e-5 * (1 + total.masked_fill(~keep, 0).abs().amax())
    if not bool(((rel - want).abs() <= tol).masked_fill(~keep, True).all()):
        return _fail(node, "the bias is not linear in the key position per head")
    return slopes


def score_bias(terms: list[BiasTerm], masks: MaskAnalyzer, heads: int,
               pure: MaskInfo | None) -> tuple[MaskInfo, tuple[float, ...] | None] | MatchFailure:
    """(what the masks allow, per-head ALiBi slopes or None) for additive ``terms`` of one core.

    Args:
        terms: the score terms that are not pure masks (each failed ``MaskAnalyzer`` with "finite non-zero").
        masks: the graph's mask analyzer (evaluates the terms).
        heads: query heads H.
        pure: what the core's pure masks allow, or None when it has none (the terms carry the mask).

    Returns:
        (MaskInfo, slopes): slopes None when the bias is constant per query row; or a MatchFailure.
    """
    static = masks.probe_sizes(terms[0].node) != PROBE_SIZES
    probes = masks.probe_sizes(terms[0].node) if static else _BIAS_PROBES
    found, window = None, None
    for b, t in probes:
        total = _total(terms, masks, b, t, heads)
        if isinstance(total, MatchFailure):
            return total
        keep = (total > _VERY_NEGATIVE).all(dim=(0, 1))  # (T, T)
        if not bool((keep == (total > _VERY_NEGATIVE)).all()):
            return _fail(terms[0].node, "the masked positions differ across batch or heads")
        if pure is not None:
            keep = keep & causal_window_mask(t, t, pure.window or 0)
        w = window_of(keep)
        if w is None:
            return _fail(terms[0].node, f"the bias's mask is not causal at (B, T) = ({b}, {t})")
        window = w if w < t else window
        slopes = _slopes(total, keep, terms[0].node)
        if isinstance(slopes, MatchFailure):
            return slopes
        if found is not None and not torch.allclose(found, slopes, rtol=1e-5, atol=1e-7):
            return _fail(terms[0].node, "the slopes change with the sequence length")
        found = slopes
    info = pure if pure is not None else MaskInfo(True, window)
    return info, (tuple(float(m) for m in found) if bool((found != 0).any()) else None)
