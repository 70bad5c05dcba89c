"""``condfx::countdown_masked_ffn``: ``condfx::masked_ffn`` with the similarity policy decided inside.

``skip-ffn{policy=similarity}`` used to surround each masked FFN with about ten small ATen ops (the
execute mask from the countdown and the warm-up mask, the trigger from cos, the next countdown).
At batch 1 those ops cost more than a small FFN saves, so the policy emits this one op per layer.

Semantics (exactly the unfused graph of ``passes/skip_ffn_similarity.py``):
    execute = (countdown == 0) | warm                                    # (B, T) bool
    update, cos = condfx.masked_ffn(x, h_in, execute, weights..., kind, act, layout)
    trigger = execute & (cos >= threshold) & ~warm
    next = where(trigger, span, max(countdown - 1, 0))                   # (B, T) int64
  ``warm`` (B, T) bool may be None (no warm-up: all False). Returns (update (B, T, d) in x's dtype,
  next (B, T) int64, execute (B, T) bool); the mask is returned so that counting tools see which
  rows ran.

The eager implementation decides on the host when B·T = 1 (batch-1 decode: one ``item()`` instead
of ten tensor ops; a skipped row runs nothing but the zero update); otherwise it runs the vectorised
formula above through ``masked_ffn_reference``. Both paths give the same values (the same
``dense_ffn`` and ``row_cosine`` on the same rows). ``countdown_masked_ffn_eager`` is the op's body
without the custom-op dispatch (a Python custom op pays its dispatcher, schema and autograd wrappers
on every call, about as much as a skipped row costs): the torch runtime's decode graph calls it
directly (``runtime/session.grow_in_place``). The ONNX lowering
(``codegen/onnx/countdown_ffn.py``) emits the ``condfx::MaskedFFN`` node with the policy in
standard ops. Not differentiable (inference only; the policy's decisions have no gradient).
"""

from __future__ import annotations

import torch

from condfx.ops.masked_ffn import (
    check_masked_ffn_args,
    dense_ffn,
    masked_ffn_reference,
    row_cosine,
    tell_row_observers,
)


def check_countdown_args(x, countdown, warm, span: int) -> None:
    """Raises ValueError when the policy inputs do not fit ``x`` (B, T, d)."""
    bt = tuple(x.shape[:2])
    if tuple(countdown.shape) != bt or countdown.dtype != torch.int64:
        msg = (f"condfx.countdown_masked_ffn: countdown must be (B, T) int64 like x's {bt}; got "
               f"{tuple(countdown.shape)} {countdown.dtype}.")
        raise ValueError(msg)
    if warm is not None and (tuple(warm.shape) != bt or warm.dtype != torch.bool):
        msg = f"condfx.countdown_masked_ffn: warm must be None or (B, T) bool like x's {bt}; got {tuple(warm.shape)} {warm.dtype}."
        raise ValueError(msg)
    if span < 1:
        msg = f"condfx.countdown_masked_ffn: span must be >= 1; got {span}."
        raise ValueError(msg)


def _one_row(x, h_in, countdown, warm, weights, kind, act, layout, threshold, span):
    """B·T = 1: the decision on the host, the FFN only when the row executes; also returns whether
    it ran (a Python bool, for the row observers)."""
    left = int(countdown.item())
    is_warm = warm is not None and bool(warm.item())
    execute = left == 0 or is_warm
    nxt = max(left - 1, 0)
    if not execute:
        update = x.new_zeros(x.shape)
    else:
        update = dense_ffn(x, *weights, kind, act, layout)
        if update.dtype != x.dtype:
            update = update.to(x.dtype)
        if not is_warm and bool(row_cosine(h_in, h_in + update).ge(threshold)):  # float32, as unfused
            nxt = span
    shape = countdown.shape
    return (update, torch.full(shape, nxt, dtype=torch.int64, device=x.device),
            torch.full(shape, execute, dtype=torch.bool, device=x.device), execute)


def countdown_masked_ffn_reference(
    x, h_in, countdown, warm, w_up, b_up, w_gate, b_gate, w_down, b_down,
    kind: str = "swiglu", act: str = "silu", layout: str = "out_in",
    threshold: float = 0.9, span: int = 1,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Eager reference of ``condfx::countdown_masked_ffn`` (semantics in the module docstring).

    Args:
        x, h_in: (B, T, d) FFN input and the residual stream entering the block.
        countdown: (B, T) int64, FFNs still to skip for each row.
        warm: (B, T) bool, True for rows that always execute and never trigger (warm-up), or None.
        w_up, b_up, w_gate, b_gate, w_down, b_down, kind, act, layout: as ``condfx::masked_ffn``.
        threshold: cos(h_in, h_out) at or above which an executed row skips the next ``span`` FFNs.
        span: FFNs skipped after a trigger (>= 1).

    Returns:
        (update (B, T, d), next countdown (B, T) int64, execute (B, T) bool).
    """
    check_countdown_args(x, countdown, warm, span)
    weights = (w_up, b_up, w_gate, b_gate, w_down, b_down)
    if countdown.numel() == 1 and not torch.is_grad_enabled():
        check_masked_ffn_args(x, h_in, countdown.eq(0), w_gate, kind, act, layout)
        return _one_row(x, h_in, countdown, warm, weights, kind, act, layout, threshold, span)[:3]
    execute = countdown.eq(0)
    if warm is not None:
        execute = execute | warm
    update, cos = masked_ffn_reference(x, h_in, execute, *weights, kind, act, layout)
    trigger = execute & cos.ge(threshold)
    if warm is not None:
        trigger = trigger & ~warm
    nxt = torch.where(trigger, span, (countdown - 1).clamp_min(0))
    return update, nxt, execute


def countdown_masked_ffn_eager(
    x, h_in, countdown, warm, w_up, b_up, w_gate, b_gate, w_down, b_down,
    kind: str = "swiglu", act: str = "silu", layout: str = "out_in",
    threshold: float = 0.9, span: int = 1,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The op's eager body (no grad, row observers told), callable without the custom-op dispatch.

    At B·T = 1 it skips the argument checks: the graphs that call it were checked by the op's fake
    implementation when the pass inserted it, and the shapes of a decode step do not change.
    """
    with torch.no_grad():
        if countdown.numel() == 1:
            weights = (w_up, b_up, w_gate, b_gate, w_down, b_down)
            update, nxt, execute, ran = _one_row(x, h_in, countdown, warm, weights, kind, act, layout,
                                                 threshold, span)
            tell_row_observers(ran)
            return update, nxt, execute
        update, nxt, execute = countdown_masked_ffn_reference(
            x, h_in, countdown, warm, w_up, b_up, w_gate, b_gate, w_down, b_down, kind, act, layout,
            threshold, span,
        )
    tell_row_observers(execute)
    return update.contiguous(), nxt.contiguous(), execute.contiguous()


@torch.library.custom_op("condfx::countdown_masked_ffn", mutates_args=())
def countdown_masked_ffn(
    x: torch.Tensor,
    h_in: torch.Tensor,
    countdown: torch.Tensor,
    warm: torch.Tensor | None,
    w_up: torch.Tensor,
    b_up: torch.Tensor | None,
    w_gate: torch.Tensor | None,
    b_gate: torch.Tensor | None,
    w_down: torch.Tensor,
    b_down: torch.Tensor | None,
    kind: str = "swiglu",
    act: str = "silu",
    layout: str = "out_in",
    threshold: float = 0.9,
    span: int = 1,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``torch.ops.condfx.countdown_masked_ffn``: see the module docstring."""
    check_countdown_args(x, countdown, warm, span)
    check_masked_ffn_args(x, h_in, countdown.new_empty(countdown.shape, dtype=torch.bool), w_gate, kind, act, layout)
    return countdown_masked_ffn_eager(x, h_in, countdown, warm, w_up, b_up, w_gate, b_gate, w_down, b_down,
                                      kind, act, layout, threshold, span)


@countdown_masked_ffn.register_fake
def _countdown_fake(x, h_in, countdown, warm, w_up, b_up, w_gate, b_gate, w_down, b_down,
                    kind="swiglu", act="silu", layout="out_in", threshold=0.9, span=1):
    check_countdown_args(x, countdown, warm, span)
    check_masked_ffn_args(x, h_in, countdown.new_empty(countdown.shape, dtype=torch.bool), w_gate, kind, act, layout)
    return (x.new_empty(x.shape), countdown.new_empty(countdown.shape),
            countdown.new_empty(countdown.shape, dtype=torch.bool))
