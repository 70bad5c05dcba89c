"""ONNX lowering of ``torch.ops.condfx.sink_window_attention``: node ``condfx::SinkWindowAttention``
plus its local function.

Provenance: the function body is ``condfx.ops.sink_window.sink_window_attention_reference``
decomposed into standard ONNX ops (opset 18): GQA by reshaping q to (B, Hkv, G, T, D) against k/v
unsqueezed to (B, Hkv, 1, S, D); the query rotated back by d = max(0, position - sink - window + 1)
(cos / sin of d * inv_freq, half-split layout) scores the sink keys, q itself the others (both
score blocks are computed and the sink columns taken from the first); the end-aligned mask keeps
sink keys j <= pos and window keys pos - window < j <= pos; Softmax; MatMul with v.

Node:  out = condfx::SinkWindowAttention<scale: float, sink: int, window: int>(
           q (B, H, T, D), k (B, Hkv, S, D), v (B, Hkv, S, D), positions (T,) int64,
           inv_freq (D / 2,) float32) -> (B, H, T, D)

Supported: float32 inputs (the decode graphs condfx exports); any B, H, Hkv (H % Hkv == 0),
T <= S, D, all dynamic. Tested with ONNX Runtime 1.32 CPU.

Differences from the reference: the CPU op attends in query blocks reading only visible keys; this
body materialises the (B, H, T, S) score block twice (plain and rotated queries).
"""

from __future__ import annotations

import onnx
import torch
from onnxscript import FLOAT, INT64, script
from onnxscript import opset18 as op
from onnxscript.values import Opset

from condfx.codegen.onnx._functions import DOMAIN, DOMAIN_VERSION, Lowering

OP_TYPE = "SinkWindowAttention"
_CONDFX = Opset(DOMAIN, DOMAIN_VERSION)
_F32 = onnx.TensorProto.FLOAT


@script(_CONDFX, default_opset=op)
def SinkWindowAttention(q: FLOAT, k: FLOAT, v: FLOAT, positions: INT64, inv_freq: FLOAT, scale: float,
                        sink: int, window: int) -> FLOAT:
    b = op.Shape(q, start=0, end=1)
    h = op.Shape(q, start=1, end=2)
    t = op.Shape(q, start=2, end=3)
    d = op.Shape(q, start=3, end=4)
    hkv = op.Shape(k, start=1, end=2)
    s = op.Shape(k, start=2, end=3)
    qg = op.Reshape(q, op.Concat(b, hkv, op.Div(h, hkv), t, d, axis=0))  # (B, Hkv, G, T, D)
    head_axis = op.Constant(value_ints=[2])
    kt = op.Transpose(op.Unsqueeze(k, head_axis), perm=[0, 1, 2, 4, 3])  # (B, Hkv, 1, D, S)
    vg = op.Unsqueeze(v, head_axis)  # (B, Hkv, 1, S, D)
    # the sinks' query: rotated back by the shift from text position to cache position
    zero_f = op.Constant(value_float=0.0)
    sink_c = op.Constant(value_int=sink)
    window_c = op.Constant(value_int=window)
    lag = op.Cast(op.Sub(op.Add(sink_c, window_c), op.Constant(value_int=1)), to=_F32)
    shift = op.Max(op.Sub(op.Cast(positions, to=_F32), lag), zero_f)  # (T,)
    angle = op.Mul(op.Unsqueeze(shift, op.Constant(value_ints=[1])),
                   op.Unsqueeze(inv_freq, op.Constant(value_ints=[0])))  # (T, D/2)
    angle = op.Concat(angle, angle, axis=-1)  # (T, D)
    half = op.Div(d, op.Constant(value_ints=[2]))
    x1 = op.Slice(qg, op.Constant(value_ints=[0]), half, op.Constant(value_ints=[-1]))
    x2 = op.Slice(qg, half, d, op.Constant(value_ints=[-1]))
    rotated = op.Concat(op.Neg(x2), x1, axis=-1)
    q_back = op.Sub(op.Mul(qg, op.Cos(angle)), op.Mul(rotated, op.Sin(angle)))
    scale_c = op.Constant(value_float=scale)
    plain = op.Mul(op.MatMul(qg, kt), scale_c)  # (B, Hkv, G, T, S)
    back = op.Mul(op.MatMul(q_back, kt), scale_c)
    zero = op.Constant(value_int=0)
    one = op.Constant(value_int=1)
    t_len = op.Squeeze(t)
    s_len = op.Squeeze(s)
    rows = op.Add(op.Range(zero, t_len, one), op.Sub(s_len, t_len))  # query i at S - T + i
    pos = op.Unsqueeze(rows, op.Constant(value_ints=[1]))  # (T, 1)
    j = op.Unsqueeze(op.Range(zero, s_len, one), op.Constant(value_ints=[0]))  # (1, S)
    is_sink = op.Less(j, sink_c)  # (1, S)
    in_window = op.Greater(j, op.Sub(pos, window_c))
    keep = op.And(op.LessOrEqual(j, pos), op.Or(is_sink, in_window))  # (T, S)
    scores = op.Where(is_sink, back, plain)
    probs = op.Softmax(op.Where(keep, scores, op.Constant(value_float=float("-inf"))), axis=-1)
    return op.Reshape(op.MatMul(probs, vg), op.Shape(q))  # (B, H, T, D)


def sink_window_function() -> onnx.FunctionProto:
    """The ``condfx::SinkWindowAttention`` local function (opset 18 body)."""
    return SinkWindowAttention.to_function_proto()


def emit_sink_window(q, k, v, positions, inv_freq, scale: float, sink: int, window: int) -> torch.Tensor:
    """Emits one ``condfx::SinkWindowAttention`` node under ``torch.onnx.export``; runs the op otherwise."""
    if not torch.onnx.is_in_onnx_export():
        return torch.ops.condfx.sink_window_attention(q, k, v, positions, inv_freq, scale, sink, window)
    return torch.onnx.ops.symbolic(
        f"{DOMAIN}::{OP_TYPE}",
        (q, k, v, positions, inv_freq),
        {"scale": float(scale), "sink": int(sink), "window": int(window)},
        dtype=q.dtype,
        shape=q.shape,
        version=DOMAIN_VERSION,
    )


LOWERING = Lowering(op_type=OP_TYPE, emit=emit_sink_window, build_function=sink_window_function)
