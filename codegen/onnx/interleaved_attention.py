"""ONNX lowering of ``torch.ops.condfx.interleaved_attention``: ``condfx::InterleavedAttention``.

Provenance: the function body is ``condfx.ops.interleaved_attention.interleaved_attention_reference``
decomposed into standard ONNX ops (opset 18): absolute indices from Range over the interleaved query
and key lengths (queries aligned to the end of the keys), RoPE positions (index, or index // P),
half-split rotation with Cos/Sin of positions * inv_freq, GQA by reshaping q to (B, Hkv, G, T*P, D),
the flat or token-level causal mask with the window, Where(-inf), Softmax, MatMul with v.

Node:  out = condfx::InterleavedAttention<scale: float, pseudo: int, window: int, token_causal: int,
           token_positions: int>(q (B, H, T*P, D), k (B, Hkv, S*P, D), v (B, Hkv, S*P, D),
           inv_freq (D/2,) float32) -> (B, H, T*P, D)

Supported: float32 / float16 / bfloat16 / float64 q, k, v (computed in float32); any B, H, Hkv, T, S,
D, all dynamic. The two flags are computed both ways and selected with Where (cheap index arithmetic).
Caveats: tested with ONNX Runtime 1.32 CPU. Differences from the reference: float32 throughout (the
reference uses float64 for float64 inputs); the (B, H, T*P, S*P) score block is materialised at once.
"""

from __future__ import annotations

from typing import TypeVar, Union

import onnx
import torch
from onnxscript import BFLOAT16, DOUBLE, FLOAT, FLOAT16, script
from onnxscript import opset18 as op
from onnxscript.values import Opset

from condfx.codegen.onnx._functions import DOMAIN, DOMAIN_VERSION, Lowering

OP_TYPE = "InterleavedAttention"
_CONDFX = Opset(DOMAIN, DOMAIN_VERSION)
_F32 = onnx.TensorProto.FLOAT
TFloat = TypeVar("TFloat", bound=Union[FLOAT, FLOAT16, BFLOAT16, DOUBLE])  # noqa: UP007


# onnxscript names the ONNX function after the Python function, hence the CamelCase name.
@script(_CONDFX, default_opset=op)
def InterleavedAttention(
    q: TFloat, k: TFloat, v: TFloat, inv_freq: FLOAT, scale: float, pseudo: int, window: int = 0,
    token_causal: int = 0, token_positions: int = 0,
) -> TFloat:
    qf = op.Cast(q, to=_F32)
    kf = op.Cast(k, to=_F32)
    vf = op.Cast(v, to=_F32)
    b = op.Shape(q, start=0, end=1)
    h = op.Shape(q, start=1, end=2)
    t = op.Shape(q, start=2, end=3)
    d = op.Shape(q, start=3, end=4)
    hkv = op.Shape(k, start=1, end=2)
    s = op.Shape(k, start=2, end=3)
    zero = op.Constant(value_int=0)
    one = op.Constant(value_int=1)
    p = op.Constant(value_int=pseudo)
    t_len = op.Squeeze(t)
    s_len = op.Squeeze(s)
    rows = op.Add(op.Range(zero, t_len, one), op.Sub(s_len, t_len))  # absolute query indices
    cols = op.Range(zero, s_len, one)  # key indices
    by_token = op.Equal(op.Constant(value_int=token_positions), one)
    # RoPE, half-split: (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin), written out for q and k
    # (one function per op keeps attach_functions simple)
    half = op.Shape(inv_freq)
    first = op.Constant(value_ints=[0])
    last = op.Constant(value_ints=[-1])
    end = op.Constant(value_ints=[2147483647])
    freq = op.Unsqueeze(inv_freq, first)  # (1, D/2)
    col = op.Constant(value_ints=[1])
    qa = op.Mul(op.Unsqueeze(op.Cast(op.Where(by_token, op.Div(rows, p), rows), to=_F32), col), freq)
    ka = op.Mul(op.Unsqueeze(op.Cast(op.Where(by_token, op.Div(cols, p), cols), to=_F32), col), freq)
    q1 = op.Slice(qf, first, half, last)
    q2 = op.Slice(qf, half, end, last)
    qr = op.Concat(op.Sub(op.Mul(q1, op.Cos(qa)), op.Mul(q2, op.Sin(qa))),
                   op.Add(op.Mul(q2, op.Cos(qa)), op.Mul(q1, op.Sin(qa))), axis=-1)
    k1 = op.Slice(kf, first, half, last)
    k2 = op.Slice(kf, half, end, last)
    kr = op.Concat(op.Sub(op.Mul(k1, op.Cos(ka)), op.Mul(k2, op.Sin(ka))),
                   op.Add(op.Mul(k2, op.Cos(ka)), op.Mul(k1, op.Sin(ka))), axis=-1)
    g = op.Div(h, hkv)
    qg = op.Reshape(qr, op.Concat(b, hkv, g, t, d, axis=0))  # (B, Hkv, G, T*P, D)
    head_axis = op.Constant(value_ints=[2])
    kt = op.Transpose(op.Unsqueeze(kr, head_axis), perm=[0, 1, 2, 4, 3])  # (B, Hkv, 1, D, S*P)
    vg = op.Unsqueeze(vf, head_axis)  # (B, Hkv, 1, S*P, D)
    scores = op.Mul(op.MatMul(qg, kt), op.Constant(value_float=scale))  # (B, Hkv, G, T*P, S*P)
    tc = op.Equal(op.Constant(value_int=token_causal), one)
    w_raw = op.Constant(value_int=window)
    a = op.Unsqueeze(op.Where(tc, op.Div(rows, p), rows), op.Constant(value_ints=[1]))  # (T*P, 1)
    j = op.Unsqueeze(op.Where(tc, op.Div(cols, p), cols), op.Constant(value_ints=[0]))  # (1, S*P)
    w = op.Where(tc, op.Div(w_raw, p), w_raw)
    in_window = op.Or(op.LessOrEqual(w, zero), op.Greater(j, op.Sub(a, w)))
    keep = op.And(op.LessOrEqual(j, a), in_window)  # (T*P, S*P)
    neg_inf = op.Constant(value_float=float("-inf"))
    probs = op.Softmax(op.Where(keep, scores, neg_inf), axis=-1)
    attn = op.Reshape(op.MatMul(probs, vg), op.Shape(q))  # (B, H, T*P, D)
    return op.CastLike(attn, q)


def interleaved_attention_function() -> onnx.FunctionProto:
    """The ``condfx::InterleavedAttention`` local function (opset 18 body)."""
    return InterleavedAttention.to_function_proto()


def emit_interleaved_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, inv_freq: torch.Tensor, scale: float,
    pseudo: int, window: int = 0, token_causal: bool = False, token_positions: bool = False,
) -> torch.Tensor:
    """Emits one ``condfx::InterleavedAttention`` node under ``torch.onnx.export``; runs the op otherwise."""
    if not torch.onnx.is_in_onnx_export():
        return torch.ops.condfx.interleaved_attention(
            q, k, v, inv_freq, scale, pseudo, window, token_causal, token_positions
        )
    attrs = {"scale": float(scale), "pseudo": int(pseudo), "window": int(window),
             "token_causal": int(bool(token_causal)), "token_positions": int(bool(token_positions))}
    return torch.onnx.ops.symbolic(
        f"{DOMAIN}::{OP_TYPE}", (q, k, v, inv_freq), attrs,
        dtype=q.dtype, shape=q.shape, version=DOMAIN_VERSION,
    )


LOWERING = Lowering(
    op_type=OP_TYPE, emit=emit_interleaved_attention, build_function=interleaved_attention_function
)
