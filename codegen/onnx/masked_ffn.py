"""ONNX lowering of ``torch.ops.condfx.masked_ffn``: node ``condfx::MaskedFFN`` + local function.

Provenance: the function body is ``condfx.ops.masked_ffn.masked_ffn_reference`` decomposed into
standard ONNX ops (opset 18): the executed rows are found with NonZero over the flattened mask,
gathered (Gather), run through the projections (MatMul with transposed weights + Add), and written
into a zero (B*T, d) tensor with ScatterND; cos(h_in, h_in + update) is computed per row in float32
and set to 1.0 on skipped rows (Where).

Node:  update, cos = condfx::MaskedFFN<gated: int, act: int>(
           x (B, T, d), h_in (B, T, d), execute (B, T) bool, w_up (F, d), b_up (F,),
           w_gate (F, d), b_gate (F,), w_down (d, F), b_down (d,)) -> (B, T, d), (B, T) float32
  gated 1 = SwiGLU/GeGLU (act(gate x) * up x), 0 = GELU MLP (act(up x)); act 0 silu, 1 gelu (erf),
  2 gelu (tanh).

The emitter normalises the op's options so the node has one fixed signature: weights in "in_out"
layout are transposed to (out, in) with a Transpose node, missing biases become zero constants,
and for "gelu-mlp" the up projection is passed again as the (unused) gate.

Supported: float32 inputs (the body computes in float32 and casts the update back); any B, T, d,
F, all dynamic. Differences from the reference: for "gelu-mlp" the body still multiplies by a
constant 1 in place of the up branch of the gated form, and every activation variant is computed
and one selected with Where (tiny at these sizes; a fused kernel would not). Tested with ONNX
Runtime 1.32 CPU.
"""

from __future__ import annotations

import math

import onnx
import torch
from onnxscript import BOOL, FLOAT, script
from onnxscript import opset18 as op
from onnxscript.values import Opset

from condfx.codegen.onnx._functions import DOMAIN, DOMAIN_VERSION, Lowering

OP_TYPE = "MaskedFFN"
_CONDFX = Opset(DOMAIN, DOMAIN_VERSION)
_F32 = onnx.TensorProto.FLOAT
_ACTS = {"silu": 0, "gelu": 1, "gelu_tanh": 2}
_C = math.sqrt(2.0 / math.pi)


@script(_CONDFX, default_opset=op)
def MaskedFFN(
    x: FLOAT, h_in: FLOAT, execute: BOOL, w_up: FLOAT, b_up: FLOAT, w_gate: FLOAT, b_gate: FLOAT,
    w_down: FLOAT, b_down: FLOAT, gated: int = 1, act: int = 0,
):
    d = op.Shape(x, start=2, end=3)
    flat = op.Reshape(op.Cast(x, to=_F32), op.Concat(op.Constant(value_ints=[-1]), d, axis=0))  # (BT, d)
    rows = op.NonZero(op.Reshape(execute, op.Constant(value_ints=[-1])))  # (1, N)
    idx = op.Transpose(rows, perm=[1, 0])  # (N, 1)
    xs = op.Gather(flat, op.Squeeze(rows, op.Constant(value_ints=[0])), axis=0)  # (N, d)
    up = op.Add(op.MatMul(xs, op.Transpose(w_up, perm=[1, 0])), b_up)  # (N, F)
    pre = op.Add(op.MatMul(xs, op.Transpose(w_gate, perm=[1, 0])), b_gate)  # (N, F)
    pre = op.Where(op.Equal(op.Constant(value_int=gated), op.Constant(value_int=1)), pre, up)
    half = op.Constant(value_float=0.5)
    one = op.Constant(value_float=1.0)
    silu = op.Mul(pre, op.Sigmoid(pre))
    gelu = op.Mul(op.Mul(half, pre), op.Add(one, op.Erf(op.Div(pre, op.Constant(value_float=1.4142135623730951)))))
    cube = op.Mul(op.Mul(pre, pre), pre)
    inner = op.Mul(op.Constant(value_float=_C), op.Add(pre, op.Mul(op.Constant(value_float=0.044715), cube)))
    gelu_t = op.Mul(op.Mul(half, pre), op.Add(one, op.Tanh(inner)))
    a = op.Constant(value_int=act)
    activated = op.Where(op.Equal(a, op.Constant(value_int=0)), silu,
                         op.Where(op.Equal(a, op.Constant(value_int=1)), gelu, gelu_t))
    h = op.Where(op.Equal(op.Constant(value_int=gated), op.Constant(value_int=1)), op.Mul(activated, up), activated)
    out = op.Add(op.MatMul(h, op.Transpose(w_down, perm=[1, 0])), b_down)  # (N, d)
    full = op.ScatterND(op.Mul(flat, op.Constant(value_float=0.0)), idx, out)  # (BT, d)
    update = op.CastLike(op.Reshape(full, op.Shape(x)), x)  # (B, T, d)
    hi = op.Cast(h_in, to=_F32)
    ho = op.Add(hi, op.Cast(update, to=_F32))
    axes = op.Constant(value_ints=[-1])
    dot = op.ReduceSum(op.Mul(hi, ho), axes, keepdims=0)
    eps = op.Constant(value_float=1e-12)
    n_in = op.Max(op.Sqrt(op.ReduceSum(op.Mul(hi, hi), axes, keepdims=0)), eps)
    n_out = op.Max(op.Sqrt(op.ReduceSum(op.Mul(ho, ho), axes, keepdims=0)), eps)
    cos = op.Where(execute, op.Div(dot, op.Mul(n_in, n_out)), one)  # (B, T)
    return update, cos


def masked_ffn_function() -> onnx.FunctionProto:
    """The ``condfx::MaskedFFN`` local function: opset 18 body, attributes ``gated``, ``act``."""
    return MaskedFFN.to_function_proto()


def _out_in(w: torch.Tensor, layout: str) -> torch.Tensor:
    return w.transpose(0, 1) if layout == "in_out" else w


def emit_masked_ffn(x, h_in, execute, w_up, b_up, w_gate, b_gate, w_down, b_down,
                    kind="swiglu", act="silu", layout="out_in"):
    """Emits one ``condfx::MaskedFFN`` node under ``torch.onnx.export``; runs the op otherwise.

    Args: those of ``torch.ops.condfx.masked_ffn``.

    Returns:
        (update (B, T, d), cos (B, T) float32).
    """
    if not torch.onnx.is_in_onnx_export():
        return torch.ops.condfx.masked_ffn(x, h_in, execute, w_up, b_up, w_gate, b_gate, w_down,
                                           b_down, kind, act, layout)
    w_up, w_down = _out_in(w_up, layout), _out_in(w_down, layout)
    gated = kind == "swiglu"
    w_gate = _out_in(w_gate, layout) if gated else w_up
    zeros = lambda n: torch.zeros(n, dtype=x.dtype, device=x.device)  # noqa: E731
    b_up = zeros(w_up.shape[0]) if b_up is None else b_up
    b_gate = (zeros(w_gate.shape[0]) if b_gate is None else b_gate) if gated else b_up
    b_down = zeros(w_down.shape[0]) if b_down is None else b_down
    return torch.onnx.ops.symbolic_multi_out(
        f"{DOMAIN}::{OP_TYPE}",
        (x, h_in, execute, w_up, b_up, w_gate, b_gate, w_down, b_down),
        {"gated": int(gated), "act": _ACTS[act]},
        dtypes=(x.dtype, torch.float32),
        shapes=(x.shape, x.shape[:2]),
        version=DOMAIN_VERSION,
    )


LOWERING = Lowering(op_type=OP_TYPE, emit=emit_masked_ffn, build_function=masked_ffn_function)
