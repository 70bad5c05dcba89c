"""ONNX lowering of ``torch.ops.condfx.attention``: node ``condfx::Attention`` + local function.

Provenance: the function body is ``condfx.ops.attention.attention_reference`` decomposed into
standard ONNX ops (opset 18): GQA by reshaping q to (B, Hkv, G, T, D) against k/v unsqueezed to
(B, Hkv, 1, S, D) (repeated heads are never materialised), scores = q k^T * scale, the end-aligned
causal / sliding-window mask built from Range over T and S, Where(-inf), Softmax, MatMul with v.

Node:  out = condfx::Attention<scale: float, window: int = 0>(q (B, H, T, D), k (B, Hkv, S, D),
                                                             v (B, Hkv, S, D)) -> (B, H, T, D)
With a score option set (softcap, alibi_slopes, sinks; ``condfx/ops/_scores.py``) the node is instead
       out = condfx::AttentionScored<scale: float, window: int, softcap: float>(q, k, v,
                 slopes (H,) float32 (zeros: no ALiBi), sinks (H,) (-inf: no sinks)) -> (B, H, T, D)
whose body adds c * tanh(s / c) (c > 0), + slope_h * (j - pos), and a sink column in the softmax that
is sliced off before the product with v.

Supported: float32 / float16 / bfloat16 / float64 inputs; any B, H, Hkv (H % Hkv == 0), T <= S, D,
all dynamic (sizes come from Shape, never from the exported example); window 0 (causal) or > 0.

Caveats: tested with ONNX Runtime 1.32 CPU and the onnx 1.23 checker / shape inference. The body is
written against opset 18 and retargeted to the model's opset on attach (``_functions``): every op it
uses keeps its semantics through opset 23. Shape inference gives the output rank and dtype; the
symbolic dims come from the exporter's value_info (or ``data_prop=True``).

Differences from the reference: scores and softmax always run in float32 (the reference uses
float64 for float64 inputs); the reference's query chunking (a memory bound) is not reproduced, so
the (B, H, T, S) score block is materialised at once.
"""

from __future__ import annotations

from typing import TypeVar, Union

import onnx
import torch
from onnxscript import BFLOAT16, DOUBLE, FLOAT, FLOAT16, script
from onnxscript import opset18 as op
from onnxscript.values import Opset

from condfx.codegen.onnx._functions import DOMAIN, DOMAIN_VERSION, Lowering

OP_TYPE = "Attention"
SCORED_OP_TYPE = "AttentionScored"
_CONDFX = Opset(DOMAIN, DOMAIN_VERSION)
_F32 = onnx.TensorProto.FLOAT
# onnxscript reads the annotation; it wants typing.Union here.
TFloat = TypeVar("TFloat", bound=Union[FLOAT, FLOAT16, BFLOAT16, DOUBLE])  # noqa: UP007


# onnxscript names the ONNX function after the Python function, hence the CamelCase name.
@script(_CONDFX, default_opset=op)
def Attention(q: TFloat, k: TFloat, v: TFloat, scale: float, window: int = 0) -> TFloat:
    qf = op.Cast(q, to=_F32)
    kf = op.Cast(k, to=_F32)
    vf = op.Cast(v, to=_F32)
    b = op.Shape(q, start=0, end=1)
    h = op.Shape(q, start=1, end=2)
    t = op.Shape(q, start=2, end=3)
    d = op.Shape(q, start=3, end=4)
    hkv = op.Shape(k, start=1, end=2)
    s = op.Shape(k, start=2, end=3)
    g = op.Div(h, hkv)
    qg = op.Reshape(qf, op.Concat(b, hkv, g, t, d, axis=0))  # (B, Hkv, G, T, D)
    head_axis = op.Constant(value_ints=[2])
    kt = op.Transpose(op.Unsqueeze(kf, head_axis), perm=[0, 1, 2, 4, 3])  # (B, Hkv, 1, D, S)
    vg = op.Unsqueeze(vf, head_axis)  # (B, Hkv, 1, S, D)
    scores = op.Mul(op.MatMul(qg, kt), op.Constant(value_float=scale))  # (B, Hkv, G, T, S)
    zero = op.Constant(value_int=0)
    one = op.Constant(value_int=1)
    t_len = op.Squeeze(t)
    s_len = op.Squeeze(s)
    # query i sits at absolute position S - T + i (queries aligned to the end of the keys)
    rows = op.Add(op.Range(zero, t_len, one), op.Sub(s_len, t_len))
    pos = op.Unsqueeze(rows, op.Constant(value_ints=[1]))  # (T, 1)
    j = op.Unsqueeze(op.Range(zero, s_len, one), op.Constant(value_ints=[0]))  # (1, S)
    w = op.Constant(value_int=window)
    in_window = op.Or(op.LessOrEqual(w, zero), op.Greater(j, op.Sub(pos, w)))  # (T, S)
    keep = op.And(op.LessOrEqual(j, pos), in_window)  # (T, S)
    neg_inf = op.Constant(value_float=float("-inf"))
    probs = op.Softmax(op.Where(keep, scores, neg_inf), axis=-1)  # (B, Hkv, G, T, S)
    attn = op.Reshape(op.MatMul(probs, vg), op.Shape(q))  # (B, H, T, D)
    out = op.CastLike(attn, q)
    return out


@script(_CONDFX, default_opset=op)
def AttentionScored(q: TFloat, k: TFloat, v: TFloat, slopes: FLOAT, sinks: TFloat, scale: float, window: int = 0,
                    softcap: float = 0.0) -> TFloat:
    vf = op.Cast(v, to=_F32)
    b = op.Shape(q, start=0, end=1)
    h = op.Shape(q, start=1, end=2)
    t = op.Shape(q, start=2, end=3)
    d = op.Shape(q, start=3, end=4)
    hkv = op.Shape(k, start=1, end=2)
    s = op.Shape(k, start=2, end=3)
    g = op.Div(h, hkv)
    one_dim = op.Constant(value_ints=[1])
    qg = op.Reshape(op.Cast(q, to=_F32), op.Concat(b, hkv, g, t, d, axis=0))  # (B, Hkv, G, T, D)
    head_axis = op.Constant(value_ints=[2])
    kt = op.Transpose(op.Unsqueeze(op.Cast(k, to=_F32), head_axis), perm=[0, 1, 2, 4, 3])  # (B, Hkv, 1, D, S)
    vg = op.Unsqueeze(vf, head_axis)  # (B, Hkv, 1, S, D)
    scores = op.Mul(op.MatMul(qg, kt), op.Constant(value_float=scale))  # (B, Hkv, G, T, S)
    cap = op.Constant(value_float=softcap)
    capped = op.Greater(cap, op.Constant(value_float=0.0))
    divisor = op.Where(capped, cap, op.Constant(value_float=1.0))
    scores = op.Where(capped, op.Mul(op.Tanh(op.Div(scores, divisor)), divisor), scores)
    zero = op.Constant(value_int=0)
    one = op.Constant(value_int=1)
    t_len = op.Squeeze(t)
    s_len = op.Squeeze(s)
    rows = op.Add(op.Range(zero, t_len, one), op.Sub(s_len, t_len))
    pos = op.Unsqueeze(rows, op.Constant(value_ints=[1]))  # (T, 1)
    j = op.Unsqueeze(op.Range(zero, s_len, one), op.Constant(value_ints=[0]))  # (1, S)
    slope = op.Reshape(slopes, op.Concat(hkv, g, one_dim, one_dim, axis=0))  # (Hkv, G, 1, 1)
    scores = op.Add(scores, op.Mul(slope, op.Cast(op.Sub(j, pos), to=_F32)))  # + slope_h (j - pos)
    w = op.Constant(value_int=window)
    in_window = op.Or(op.LessOrEqual(w, zero), op.Greater(j, op.Sub(pos, w)))  # (T, S)
    keep = op.And(op.LessOrEqual(j, pos), in_window)  # (T, S)
    masked = op.Where(keep, scores, op.Constant(value_float=float("-inf")))
    z = op.Reshape(op.Cast(sinks, to=_F32), op.Concat(one_dim, hkv, g, one_dim, one_dim, axis=0))
    z = op.Expand(z, op.Concat(b, hkv, g, t, one_dim, axis=0))  # (B, Hkv, G, T, 1)
    probs = op.Softmax(op.Concat(masked, z, axis=-1), axis=-1)  # (B, Hkv, G, T, S + 1)
    probs = op.Slice(probs, op.Constant(value_ints=[0]), op.Constant(value_ints=[-1]), op.Constant(value_ints=[-1]))
    attn = op.Reshape(op.MatMul(probs, vg), op.Shape(q))  # (B, H, T, D)
    out = op.CastLike(attn, q)
    return out


def attention_function() -> onnx.FunctionProto:
    """The ``condfx::Attention`` local function: opset 18 body, attributes ``scale``, ``window``."""
    return Attention.to_function_proto()


def attention_functions() -> list[onnx.FunctionProto]:
    """Both local functions: ``condfx::Attention`` and ``condfx::AttentionScored`` (score options)."""
    return [Attention.to_function_proto(), AttentionScored.to_function_proto()]


def emit_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    window: int = 0,
    softcap: float = 0.0,
    alibi_slopes: list[float] | None = None,
    sinks: torch.Tensor | None = None,
) -> torch.Tensor:
    """Emits one ``condfx::Attention`` node (``AttentionScored`` with a score option) under
    ``torch.onnx.export``; runs the op otherwise.

    Args:
        q: (B, H, T, D) queries.
        k: (B, Hkv, S, D) keys.
        v: (B, Hkv, S, D) values.
        scale: multiplier of q @ k^T (an ONNX float attribute).
        window: sliding-window size, 0 for full causal attention (an ONNX int attribute).
        softcap: 0 or the logit softcap (an ONNX float attribute of ``AttentionScored``).
        alibi_slopes: None or H slopes (a float32 constant input).
        sinks: None or (H,) sink logits (an input; -inf when absent).

    Returns:
        (B, H, T, D) attention output with q's dtype.
    """
    if not torch.onnx.is_in_onnx_export():
        return torch.ops.condfx.attention(q, k, v, scale, window, softcap, alibi_slopes, sinks)
    if softcap or alibi_slopes is not None or sinks is not None:
        h = q.shape[1]
        slopes = torch.tensor(list(alibi_slopes) if alibi_slopes is not None else [0.0] * h, dtype=torch.float32)
        z = sinks.to(q.dtype) if sinks is not None else torch.full((h,), float("-inf"), dtype=q.dtype)
        return torch.onnx.ops.symbolic(
            f"{DOMAIN}::{SCORED_OP_TYPE}",
            (q, k, v, slopes, z),
            {"scale": float(scale), "window": int(window), "softcap": float(softcap)},
            dtype=q.dtype,
            shape=q.shape,
            version=DOMAIN_VERSION,
        )
    return torch.onnx.ops.symbolic(
        f"{DOMAIN}::{OP_TYPE}",
        (q, k, v),
        {"scale": float(scale), "window": int(window)},
        dtype=q.dtype,
        shape=q.shape,
        version=DOMAIN_VERSION,
    )


LOWERING = Lowering(op_type=OP_TYPE, emit=emit_attention, build_function=attention_functions)
