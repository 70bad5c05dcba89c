"""The causal / sliding-window visibility masks of the torch references (one definition).

Queries are aligned to the end of the keys: with T queries and S >= T keys, query row i sits at
absolute position i + (S - T), and key j is visible to it iff j <= i + (S - T) and, with a window
w > 0, j > i + (S - T) - w. ``True`` = visible (the bool-mask convention of DESIGN.md).
"""

from __future__ import annotations

import torch


def visible(pos: torch.Tensor, keys: torch.Tensor, window: int = 0) -> torch.Tensor:
    """(N, K) bool: True where a query at absolute position ``pos[n]`` may read the key at ``keys[k]``.

    Args:
        pos: (N,) int absolute query positions.
        keys: (K,) int absolute key positions.
        window: 0 for plain causal, else the sliding-window size (keys pos - window < j <= pos).
    """
    j = keys.unsqueeze(0)  # (1, K)
    p = pos.unsqueeze(1)  # (N, 1)
    keep = j <= p
    if window > 0:
        keep = keep & (j > p - window)
    return keep


def causal_window_mask(t: int, s: int, window: int = 0, device=None, rows: tuple[int, int] | None = None) -> torch.Tensor:
    """(T, S) end-aligned causal (window > 0: sliding-window) mask; with ``rows=(t0, t1)`` only
    query rows t0..t1-1, shape (t1 - t0, S).

    Args:
        t: number of queries T.
        s: number of keys S (>= T; the queries are its last T positions).
        window: 0 for plain causal, else the sliding-window size.
        device: where to build the mask.
        rows: optional (t0, t1) slice of query rows (chunked references).
    """
    t0, t1 = rows if rows is not None else (0, t)
    pos = torch.arange(t0, t1, device=device) + (s - t)  # (c,) absolute query positions
    return visible(pos, torch.arange(s, device=device), window)
