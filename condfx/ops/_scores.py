"""Score options of ``condfx::attention`` (one definition for the reference, backward and checks).

All three act on the scaled scores ``u = q k^T * scale`` of one block of query rows, in order:
    softcap c > 0:    s = c * tanh(u / c)                    (Gemma2's logit softcapping)
    alibi_slopes m:   s += m[h] * (j - pos_i)                 (ALiBi; pos_i = S - T + i, so <= 0 where visible)
    sinks z:          softmax over [s_i0 .. s_i(S-1), z[h]]   (GPT-OSS: the sink column takes probability
                                                              mass and carries no value; it is dropped after)
The ALiBi form differs from the ``m * j`` that Bloom, MPT and Falcon add by ``m * pos_i``, a constant per
query row, so softmax gives the same probabilities; relative to the row it also stays exact when a
decode cache is trimmed to a window.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def has_options(softcap: float, alibi_slopes: Sequence[float] | None, sinks: torch.Tensor | None) -> bool:
    """Whether any score option is set (0 / None mean off)."""
    return bool(softcap) or alibi_slopes is not None or sinks is not None


def check_options(h, softcap: float, alibi_slopes: Sequence[float] | None, sinks: torch.Tensor | None) -> None:
    """Raises ValueError when an option does not fit ``h`` query heads (``h`` may be symbolic: skipped).

    Raises:
        ValueError: a negative softcap, or slopes / sinks whose length is not the query head count.
    """
    if softcap < 0:
        msg = f"condfx.attention: softcap must be >= 0 (0 = none); got {softcap}."
        raise ValueError(msg)
    if not isinstance(h, int):
        return
    if alibi_slopes is not None and len(alibi_slopes) != h:
        msg = f"condfx.attention: alibi_slopes needs one slope per query head ({h}); got {len(alibi_slopes)}."
        raise ValueError(msg)
    if sinks is not None and tuple(sinks.shape) != (h,):
        msg = f"condfx.attention: sinks must have shape ({h},), one logit per query head; got {tuple(sinks.shape)}."
        raise ValueError(msg)


def scores_block(u: torch.Tensor, keep: torch.Tensor, pos: torch.Tensor, softcap: float,
                 alibi_slopes: Sequence[float] | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(masked scores, d s / d u or None) for scaled scores ``u`` (B, Hkv, G, c, S).

    Args:
        u: scaled scores, heads split as (Hkv, G) (query head h = hkv * G + g).
        keep: (c, S) visibility of the block's rows.
        pos: (c,) absolute positions of the block's rows.
        softcap: 0 for none.
        alibi_slopes: None, or H slopes.
    """
    s, dsdu = u, None
    if softcap:
        th = torch.tanh(u / softcap)
        s, dsdu = th * softcap, 1 - th * th
    if alibi_slopes is not None:
        hkv, g = u.shape[1], u.shape[2]
        m = torch.tensor(list(alibi_slopes), dtype=u.dtype, device=u.device).reshape(hkv, g, 1, 1)
        j = torch.arange(u.shape[-1], device=u.device)
        s = s + m * (j.unsqueeze(0) - pos.unsqueeze(1)).to(u.dtype)  # (Hkv, G, c, S)
    return s.masked_fill(~keep, float("-inf")), dsdu


def softmax_with_sinks(s: torch.Tensor, sinks: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(probabilities over the keys, sink probability (B, Hkv, G, c, 1) or None) for scores (B, Hkv, G, c, S)."""
    if sinks is None:
        return torch.softmax(s, dim=-1), None
    hkv, g = s.shape[1], s.shape[2]
    z = sinks.to(s.dtype).reshape(1, hkv, g, 1, 1).expand(*s.shape[:-1], 1)
    p = torch.softmax(torch.cat([s, z], dim=-1), dim=-1)
    return p[..., :-1], p[..., -1:]
