"""``condfx::routed_attention``: causal attention computed only for the queries a route mask selects.

Semantics (the contract every lowering must match):
    q (B, H, T, D), k (B, Hkv, S, D), v (B, Hkv, S, D), route (B, T) bool (True = this query runs
    global attention, the project's one mask convention), H % Hkv == 0, T <= S.
    As in ``condfx::attention`` the query block is aligned to the end of the keys: query i sits at
    absolute position ``pos = S - T + i`` and attends to every key ``j <= pos`` (no window).
    out[b, :, i] = softmax(q k^T * scale + causal) v  where route[b, i], exactly 0 elsewhere.
    Query head h reads key/value head ``h // (H // Hkv)`` (GQA); repeated heads are never materialised.
    The score options of ``condfx::attention`` (``_scores.py``; defaults off) act the same way here:
    ``softcap`` (c * tanh(s / c)), ``alibi_slopes`` (H slopes: + m_h * (j - pos)) and ``sinks`` ((H,)
    logits: an extra softmax column with no value), so a global branch copied from a Gemma2, Bloom or
    GPT-OSS layer scores its keys as the layer did.

This is L2A's "Q-sparse" global attention (TECHNIQUES.md section 1.4): queries are sparse, keys and
values stay full-length and dense, because a routed token must see the whole history.

The CPU implementation compacts the routed queries of each batch row (``nonzero`` + gather, in
position order), attends with those rows only in blocks of compact queries, each block reading keys
only up to its last query's position, and scatters the result into a zero tensor. It never builds
the dense (T, S) score matrix and masks it away: the work is about N x S / 2 for N routed queries.

This module holds the eager reference (which is also the CPU implementation), the fake
implementation and autograd (backward re-runs the reference under autograd on the compacted rows).
The ONNX lowering lives in ``codegen/onnx/routed_attention.py``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from condfx.ops import _flash_cpu
from condfx.ops._masks import visible
from condfx.ops._recompute import grads_by_recompute
from condfx.ops._scores import has_options, scores_block, softmax_with_sinks
from condfx.ops.attention import check_attention_shapes

# Compact queries per SDPA call; each call reads keys up to its last query's position.
_QUERY_BLOCK = 256


def check_route(q: torch.Tensor, route: torch.Tensor) -> None:
    """Raises ValueError when ``route`` is not a (B, T) bool mask matching q (B, H, T, D)."""
    if route.dtype != torch.bool:
        msg = f"condfx.routed_attention: route must be a bool tensor (True = attend); got {route.dtype}."
        raise ValueError(msg)
    if route.dim() != 2:
        msg = f"condfx.routed_attention: route must be 2-D (B, T); got shape {tuple(route.shape)}."
        raise ValueError(msg)
    dims = (route.shape[0], route.shape[1], q.shape[0], q.shape[2])
    if all(isinstance(d, int) for d in dims) and (dims[0], dims[1]) != (dims[2], dims[3]):
        msg = (
            f"condfx.routed_attention: route shape {tuple(route.shape)} must be (B, T) = "
            f"({q.shape[0]}, {q.shape[2]})."
        )
        raise ValueError(msg)


def _attend_rows_scored(qb, kb, vb, pos, scale, softcap, alibi_slopes, sinks):
    """``_attend_rows`` with score options: explicit scores in float32 (float64 for float64 inputs)."""
    _, h, n, d = qb.shape
    hkv = kb.shape[1]
    acc = torch.float64 if qb.dtype == torch.float64 else torch.float32
    outs = []
    for n0 in range(0, n, _QUERY_BLOCK):
        p = pos[n0 : n0 + _QUERY_BLOCK]  # (c,)
        s_used = int(p[-1]) + 1
        qg = qb[:, :, n0 : n0 + _QUERY_BLOCK].reshape(1, hkv, h // hkv, -1, d).to(acc)  # (1, Hkv, G, c, D)
        kg = kb[:, :, :s_used].unsqueeze(2).to(acc)  # (1, Hkv, 1, S', D)
        u = (qg @ kg.transpose(-1, -2)) * scale  # (1, Hkv, G, c, S')
        keep = visible(p, torch.arange(s_used, device=qb.device))  # (c, S')
        probs = softmax_with_sinks(scores_block(u, keep, p, softcap, alibi_slopes)[0], sinks)[0]
        out = probs @ vb[:, :, :s_used].unsqueeze(2).to(acc)  # (1, Hkv, G, c, D)
        outs.append(out.reshape(1, h, -1, d))
    return torch.cat(outs, dim=2)  # (1, H, N, D)


def _attend_rows(qb, kb, vb, pos, scale, softcap=0.0, alibi_slopes=None, sinks=None):
    """Attention for compact queries qb (1, H, N, D) at absolute positions pos (N,), sorted."""
    if has_options(softcap, alibi_slopes, sinks):
        return _attend_rows_scored(qb, kb, vb, pos, scale, softcap, alibi_slopes, sinks)
    gqa = qb.shape[1] != kb.shape[1]
    fast = _flash_cpu.usable(qb, kb, vb)
    outs = []
    for n0 in range(0, qb.shape[2], _QUERY_BLOCK):
        p = pos[n0 : n0 + _QUERY_BLOCK]  # (c,)
        if fast:
            outs.append(_flash_cpu.routed_rows(qb[:, :, n0 : n0 + _QUERY_BLOCK], kb, vb, p, scale))
            continue
        s_used = int(p[-1]) + 1  # keys beyond the block's last query are never visible
        keep = visible(p, torch.arange(s_used, device=qb.device))  # (c, S')
        outs.append(
            F.scaled_dot_product_attention(
                qb[:, :, n0 : n0 + _QUERY_BLOCK], kb[:, :, :s_used], vb[:, :, :s_used],
                attn_mask=keep, scale=scale, enable_gqa=gqa,
            )
        )  # (1, H, c, D)
    return torch.cat(outs, dim=2)  # (1, H, N, D)


def routed_attention_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, route: torch.Tensor, scale: float,
    softcap: float = 0.0, alibi_slopes: Sequence[float] | None = None, sinks: torch.Tensor | None = None,
) -> torch.Tensor:
    """Eager reference of ``condfx::routed_attention`` (semantics in the module docstring).

    Differentiable by ordinary autograd (gather, SDPA, index_copy).

    Args:
        q: (B, H, T, D) queries.
        k: (B, Hkv, S, D) keys, before any head repetition.
        v: (B, Hkv, S, D) values.
        route: (B, T) bool, True where the query attends.
        scale: multiplier of q @ k^T.
        softcap: 0 for none, else c in ``c * tanh(scores / c)``.
        alibi_slopes: None, or one ALiBi slope per query head.
        sinks: None, or (H,) sink logits.

    Returns:
        (B, H, T, D): attention output on routed rows, exactly 0 on the others.

    Raises:
        ValueError: the shapes or the mask are inconsistent.
    """
    check_attention_shapes(q, k, v, 0, softcap, alibi_slopes, sinks)
    check_route(q, route)
    b, h, t, d = q.shape
    offset = k.shape[2] - t
    rows = []
    for i in range(b):
        idx = route[i].nonzero().squeeze(1)  # (N,) routed query rows, in position order
        zero = q.new_zeros(h, t, d)
        if idx.numel() == 0:
            rows.append(zero)
            continue
        qb = q[i : i + 1].index_select(2, idx)  # (1, H, N, D)
        ob = _attend_rows(qb, k[i : i + 1], v[i : i + 1], idx + offset, scale,
                          softcap, alibi_slopes, sinks)  # (1, H, N, D)
        rows.append(zero.index_copy(1, idx, ob[0].to(q.dtype)))  # (H, T, D)
    return torch.stack(rows)  # (B, H, T, D)


@torch.library.custom_op("condfx::routed_attention", mutates_args=())
def routed_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, route: torch.Tensor, scale: float,
    softcap: float = 0.0, alibi_slopes: list[float] | None = None, sinks: torch.Tensor | None = None,
) -> torch.Tensor:
    """``torch.ops.condfx.routed_attention``: see the module docstring."""
    with torch.no_grad():
        return routed_attention_reference(q, k, v, route, scale, softcap, alibi_slopes, sinks).contiguous()


@routed_attention.register_fake
def _routed_attention_fake(q, k, v, route, scale, softcap=0.0, alibi_slopes=None, sinks=None):
    check_attention_shapes(q, k, v, 0, softcap, alibi_slopes, sinks)
    check_route(q, route)
    return q.new_empty(q.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, route, scale, softcap, alibi_slopes, sinks = inputs
    ctx.save_for_backward(q, k, v, route, sinks)
    ctx.options = (scale, softcap, alibi_slopes)


def _backward(ctx, grad):
    q, k, v, route, sinks = ctx.saved_tensors
    scale, softcap, alibi_slopes = ctx.options

    def eager(q, k, v, z):
        return routed_attention_reference(q, k, v, route, scale, softcap, alibi_slopes, z)

    dq, dk, dv, dz = grads_by_recompute(eager, (q, k, v, sinks), grad)
    return dq, dk, dv, None, None, None, None, dz


routed_attention.register_autograd(_backward, setup_context=_setup_context)


def is_routed_attention(node) -> bool:
    """True when the fx node ``node`` is a ``condfx.routed_attention`` call."""
    return getattr(node, "op", None) == "call_function" and (
        node.target is torch.ops.condfx.routed_attention.default
    )
