"""ONNX lowering of ``torch.ops.condfx.countdown_masked_ffn``: one ``condfx::MaskedFFN`` node plus the
similarity policy in standard ops.

Provenance: ``condfx.ops.countdown_ffn`` (semantics there). Under ``torch.onnx.export`` the emitter
traces the policy's formula (Equal, Or, GreaterOrEqual, And, Not, Sub, Max, Where) around
``masked_ffn.emit_masked_ffn``, so the exported graph is the unfused one and reuses the
``condfx::MaskedFFN`` local function; ONNX Runtime inlines local functions, so one fused ONNX node
would not run faster. The host-side batch-1 fast path of the eager op has no ONNX counterpart.

Supported: what ``condfx::MaskedFFN`` supports (float32, any B, T, d, F). Tested with ONNX Runtime
1.32 CPU.
"""

from __future__ import annotations

import torch

from condfx.codegen.onnx._functions import Lowering
from condfx.codegen.onnx.masked_ffn import OP_TYPE, emit_masked_ffn, masked_ffn_function


def emit_countdown_ffn(x, h_in, countdown, warm, w_up, b_up, w_gate, b_gate, w_down, b_down,
                       kind="swiglu", act="silu", layout="out_in", threshold=0.9, span=1):
    """Emits ``condfx::MaskedFFN`` and the policy under ``torch.onnx.export``; runs the op otherwise.

    Returns:
        (update (B, T, d), next countdown (B, T) int64, execute (B, T) bool).
    """
    if not torch.onnx.is_in_onnx_export():
        return torch.ops.condfx.countdown_masked_ffn(x, h_in, countdown, warm, w_up, b_up, w_gate, b_gate,
                                                     w_down, b_down, kind, act, layout, threshold, span)
    execute = countdown == 0
    if warm is not None:
        execute = execute | warm
    update, cos = emit_masked_ffn(x, h_in, execute, w_up, b_up, w_gate, b_gate, w_down, b_down,
                                  kind, act, layout)
    trigger = execute & (cos >= threshold)
    if warm is not None:
        trigger = trigger & ~warm
    nxt = torch.where(trigger, torch.full_like(countdown, span), (countdown - 1).clamp_min(0))
    return update, nxt, execute


LOWERING = Lowering(op_type=OP_TYPE, emit=emit_countdown_ffn, build_function=masked_ffn_function)
