"""``condfx::masked_ffn``: an FFN that runs only on the rows an execute mask selects.

Semantics (the contract every lowering must match):
    x (B, T, d) the FFN input (usually the normalised residual stream), h_in (B, T, d) the residual
    stream entering the FFN block, execute (B, T) bool (True = execute, the project's one mask
    convention), weights as stored by the model:
        kind "swiglu":   f(x) = down(act(gate(x)) * up(x))      (act "silu": SwiGLU, "gelu*": GeGLU)
        kind "gelu-mlp": f(x) = down(act(up(x)))                (GPT-2: up and down carry biases)
    where ``p(x) = x @ W.T + b`` for layout "out_in" (nn.Linear) and ``x @ W + b`` for "in_out"
    (GPT-2 Conv1D); every bias is optional. Outputs:
        update (B, T, d), x's dtype: f(x) on executed rows, exactly 0 on skipped rows, so
            ``h_in + update`` leaves the residual stream of a skipped row unchanged;
        cos (B, T) float32: cos(h_in, h_in + update) per row, computed in float32. Skipped rows get
            exactly 1.0 (their output stream equals their input stream), never NaN; an executed row
            whose h_in or h_out is all zeros gets 0.0 (norms are clamped at 1e-12).

The reference gathers the executed rows, runs the projections on those rows only and scatters the
result into a zero tensor; it never computes all rows and masks. Two host-side fast paths: no
executed row returns zeros and ones without running anything (outside autograd), and all rows
executed runs the FFN directly without the gather/scatter.

This module holds the eager reference, the fake implementation and autograd (through the
reference). The ONNX lowering lives in ``codegen/onnx/masked_ffn.py``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

KINDS = ("swiglu", "gelu-mlp")
ACTS = ("silu", "gelu", "gelu_tanh")
LAYOUTS = ("out_in", "in_out")
_EPS = 1e-12


def check_masked_ffn_args(x, h_in, execute, w_gate, kind: str, act: str, layout: str) -> None:
    """Raises ValueError when the arguments do not form a valid ``condfx::masked_ffn`` call."""
    if kind not in KINDS:
        msg = f"condfx.masked_ffn: kind must be one of {KINDS}; got {kind!r}."
        raise ValueError(msg)
    if act not in ACTS:
        msg = f"condfx.masked_ffn: act must be one of {ACTS}; got {act!r}."
        raise ValueError(msg)
    if layout not in LAYOUTS:
        msg = f"condfx.masked_ffn: layout must be one of {LAYOUTS}; got {layout!r}."
        raise ValueError(msg)
    if (w_gate is None) != (kind == "gelu-mlp"):
        msg = "condfx.masked_ffn: w_gate is required for kind 'swiglu' and must be None for 'gelu-mlp'."
        raise ValueError(msg)
    if x.dim() != 3 or h_in.dim() != 3 or execute.dim() != 2:
        msg = (
            "condfx.masked_ffn: x and h_in must be (B, T, d) and execute (B, T); got shapes "
            f"{tuple(x.shape)}, {tuple(h_in.shape)}, {tuple(execute.shape)}."
        )
        raise ValueError(msg)
    if execute.dtype != torch.bool:
        msg_0 = f"condfx.masked_ffn: execute must be a bool tensor (True = execute); got {execute.dtype}."
        raise ValueError(msg_0)


def _proj(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, layout: str) -> torch.Tensor:
    if layout == "out_in":
        return F.linear(x, w, b)
    y = x @ w
    return y if b is None else y + b


def _act(x: torch.Tensor, act: str) -> torch.Tensor:
    if act == "silu":
        return F.silu(x)
    return F.gelu(x, approximate="tanh" if act == "gelu_tanh" else "none")


def dense_ffn(x, w_up, b_up, w_gate, b_gate, w_down, b_down, kind: str, act: str, layout: str):
    """The FFN f(x) on every row of ``x`` (..., d); the formula the masked op restricts to rows."""
    if kind == "swiglu":
        h = _act(_proj(x, w_gate, b_gate, layout), act) * _proj(x, w_up, b_up, layout)
    else:
        h = _act(_proj(x, w_up, b_up, layout), act)
    return _proj(h, w_down, b_down, layout)


def row_cosine(h_in: torch.Tensor, h_out: torch.Tensor) -> torch.Tensor:
    """cos(h_in, h_out) over the last dim in float32, norms clamped at 1e-12: (B, T)."""
    a = h_in if h_in.dtype == torch.float32 else h_in.float()  # no cast to dispatch in float32 models
    b = h_out if h_out.dtype == torch.float32 else h_out.float()
    dot = (a * b).sum(-1)
    norms = a.norm(dim=-1).clamp_min(_EPS) * b.norm(dim=-1).clamp_min(_EPS)
    return dot / norms


def masked_ffn_reference(
    x, h_in, execute, w_up, b_up, w_gate, b_gate, w_down, b_down,
    kind: str = "swiglu", act: str = "silu", layout: str = "out_in",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eager reference of ``condfx::masked_ffn`` (semantics in the module docstring).

    Args:
        x: (B, T, d) FFN input.
        h_in: (B, T, d) residual stream entering the block.
        execute: (B, T) bool, True = run the FFN on that row.
        w_up, b_up, w_gate, b_gate, w_down, b_down: the projections (biases and, for
            "gelu-mlp", the gate may be None).
        kind: "swiglu" or "gelu-mlp".
        act: "silu", "gelu" or "gelu_tanh".
        layout: "out_in" (nn.Linear) or "in_out" (Conv1D).

    Returns:
        (update (B, T, d) in x's dtype, cos (B, T) float32).
    """
    check_masked_ffn_args(x, h_in, execute, w_gate, kind, act, layout)
    b, t, d = x.shape
    rows = execute.reshape(-1).nonzero().squeeze(1)  # (N,)
    n = rows.numel()
    if n == 0 and not torch.is_grad_enabled():  # host-side fast path: nothing runs (batch-1 decode)
        return x.new_zeros(x.shape), torch.ones(b, t, dtype=torch.float32, device=x.device)
    if n == b * t:  # every row runs: no gather/scatter
        update = dense_ffn(x, w_up, b_up, w_gate, b_gate, w_down, b_down, kind, act, layout).to(x.dtype)
    else:
        picked = x.reshape(b * t, d).index_select(0, rows)  # (N, d)
        out = dense_ffn(picked, w_up, b_up, w_gate, b_gate, w_down, b_down, kind, act, layout)
        update = x.new_zeros(b * t, out.shape[-1]).index_copy(0, rows, out.to(x.dtype))
        update = update.reshape(b, t, -1)  # (B, T, d)
    cos = torch.where(execute, row_cosine(h_in, h_in + update), 1.0)  # (B, T)
    return update, cos


_OBSERVERS: list = []  # callables (executed rows, all rows) called by every eager masked_ffn run


def add_row_observer(fn) -> None:
    """Calls ``fn(executed_rows, rows)`` after every eager ``condfx.masked_ffn`` run (until removed)."""
    _OBSERVERS.append(fn)


def remove_row_observer(fn) -> None:
    """Undoes ``add_row_observer(fn)``."""
    _OBSERVERS.remove(fn)


def tell_row_observers(execute: torch.Tensor | bool) -> None:
    """Calls every row observer with (executed rows, rows) of ``execute``: a bool tensor, or a
    Python bool for one row; nothing to compute when no observer is registered."""
    if not _OBSERVERS:
        return
    if isinstance(execute, bool):
        executed, rows = int(execute), 1
    else:
        executed, rows = int(execute.sum()), execute.numel()
    for fn in tuple(_OBSERVERS):
        fn(executed, rows)


def masked_ffn_eager(
    x, h_in, execute, w_up, b_up, w_gate, b_gate, w_down, b_down,
    kind: str = "swiglu", act: str = "silu", layout: str = "out_in",
) -> tuple[torch.Tensor, torch.Tensor]:
    """The op's eager body (no grad, row observers told), callable without the custom-op dispatch
    (the torch runtime's decode graph calls it directly: ``runtime/session.grow_in_place``)."""
    with torch.no_grad():
        update, cos = masked_ffn_reference(
            x, h_in, execute, w_up, b_up, w_gate, b_gate, w_down, b_down, kind, act, layout
        )
    tell_row_observers(execute)
    return update.contiguous(), cos.contiguous()


@torch.library.custom_op("condfx::masked_ffn", mutates_args=())
def masked_ffn(
    x: torch.Tensor,
    h_in: torch.Tensor,
    execute: torch.Tensor,
    w_up: torch.Tensor,
    b_up: torch.Tensor | None,
    w_gate: torch.Tensor | None,
    b_gate: torch.Tensor | None,
    w_down: torch.Tensor,
    b_down: torch.Tensor | None,
    kind: str = "swiglu",
    act: str = "silu",
    layout: str = "out_in",
) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch.ops.condfx.masked_ffn``: see the module docstring. Runs ``masked_ffn_reference``."""
    return masked_ffn_eager(x, h_in, execute, w_up, b_up, w_gate, b_gate, w_down, b_down, kind, act, layout)


@masked_ffn.register_fake
def _masked_ffn_fake(x, h_in, execute, w_up, b_up, w_gate, b_gate, w_down, b_down,
                     kind="swiglu", act="silu", layout="out_in"):
    check_masked_ffn_args(x, h_in, execute, w_gate, kind, act, layout)
    return x.new_empty(x.shape), x.new_empty(x.shape[:2], dtype=torch.float32)


_DIFF = ("x", "h_in", "w_up", "b_up", "w_gate", "b_gate", "w_down", "b_down")


def _setup_context(ctx, inputs, output):
    ctx.inputs = inputs  # tensors and options; the backward re-runs the reference under autograd


def _backward(ctx, grad_update, grad_cos):
    x, h_in, execute, w_up, b_up, w_gate, b_gate, w_down, b_down, kind, act, layout = ctx.inputs
    with torch.enable_grad():
        leaves = {}
        for name, t in zip(_DIFF, (x, h_in, w_up, b_up, w_gate, b_gate, w_down, b_down), strict=True):
            leaves[name] = None if t is None else t.detach().requires_grad_(True)
        update, cos = masked_ffn_reference(
            leaves["x"], leaves["h_in"], execute, leaves["w_up"], leaves["b_up"], leaves["w_gate"],
            leaves["b_gate"], leaves["w_down"], leaves["b_down"], kind, act, layout,
        )
        wanted = [v for v in leaves.values() if v is not None]
        grads = torch.autograd.grad((update, cos), wanted, (grad_update, grad_cos), allow_unused=True)
    it = iter(grads)
    g = {k: (None if v is None else next(it)) for k, v in leaves.items()}
    return (g["x"], g["h_in"], None, g["w_up"], g["b_up"], g["w_gate"], g["b_gate"], g["w_down"],
            g["b_down"], None, None, None)


masked_ffn.register_autograd(_backward, setup_context=_setup_context)
