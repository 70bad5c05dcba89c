"""ONNX lowering of ``torch.ops.condfx.routed_attention``: node ``condfx::RoutedAttention`` + function.

Provenance: the function body is ``condfx.ops.routed_attention.routed_attention_reference``
decomposed into standard ONNX ops (opset 18) as gather, attention, scatter: the routed rows are
found with NonZero over the flattened (B*T) route mask, their queries gathered from q viewed as
(B*T, H, D), each routed row attends to the keys of its own batch row (Gather of k/v by the row's
batch index) with the end-aligned causal mask of its position, and the outputs are written into a
zero (B*T, H, D) tensor with ScatterND. GQA by reshaping the queries to (N, Hkv, G, 1, D).

Node:  out = condfx::RoutedAttention<scale: float>(q (B, H, T, D), k (B, Hkv, S, D),
                                                   v (B, Hkv, S, D), route (B, T) bool) -> (B, H, T, D)

With a score option set (softcap, alibi_slopes, sinks; ``condfx/ops/_scores.py``) the node is instead
       out = condfx::RoutedAttentionScored<scale: float, softcap: float>(q, k, v, route,
                 slopes (H,) float32 (zeros: no ALiBi), sinks (H,) float32 (-inf: no sinks)) -> (B, H, T, D)
whose body adds c * tanh(s / c) (c > 0), + slope_h * (j - pos) and a sink column in the softmax that is
sliced off before the product with v, as ``condfx::AttentionScored`` does.

Supported: float32 inputs; any B, H, Hkv (H % Hkv == 0), T <= S, D, all dynamic; no routed row
gives all zeros. Differences from the reference: the body gathers a (N, Hkv, S, D) copy of the
keys and values (N routed rows), so its memory is N x S; the CPU op attends in blocks instead.
Tested with ONNX Runtime 1.32 CPU.
"""

from __future__ import annotations

import onnx
import torch
from onnxscript import BOOL, FLOAT, script
from onnxscript import opset18 as op
from onnxscript.values import Opset

from condfx.codegen.onnx._functions import DOMAIN, DOMAIN_VERSION, Lowering

OP_TYPE = "RoutedAttention"
SCORED_OP_TYPE = "RoutedAttentionScored"
_CONDFX = Opset(DOMAIN, DOMAIN_VERSION)
_F32 = onnx.TensorProto.FLOAT


@script(_CONDFX, default_opset=op)
def RoutedAttention(q: FLOAT, k: FLOAT, v: FLOAT, route: BOOL, scale: float) -> FLOAT:
    b = op.Shape(q, start=0, end=1)
    h = op.Shape(q, start=1, end=2)
    t = op.Shape(q, start=2, end=3)
    d = op.Shape(q, start=3, end=4)
    hkv = op.Shape(k, start=1, end=2)
    s = op.Shape(k, start=2, end=3)
    g = op.Div(h, hkv)
    one1 = op.Constant(value_ints=[1])
    flat_q = op.Reshape(op.Transpose(q, perm=[0, 2, 1, 3]), op.Concat(op.Mul(b, t), h, d, axis=0))  # (BT, H, D)
    rows = op.NonZero(op.Reshape(route, op.Constant(value_ints=[-1])))  # (1, N)
    idx = op.Squeeze(rows, op.Constant(value_ints=[0]))  # (N,)
    t_len = op.Squeeze(t)
    batch_of = op.Div(idx, t_len)  # (N,)
    pos = op.Add(op.Mod(idx, t_len), op.Sub(op.Squeeze(s), t_len))  # (N,) absolute positions
    n = op.Shape(idx)
    qs = op.Reshape(op.Gather(flat_q, idx, axis=0), op.Concat(n, hkv, g, one1, d, axis=0))  # (N, Hkv, G, 1, D)
    head_axis = op.Constant(value_ints=[2])
    ks = op.Unsqueeze(op.Gather(k, batch_of, axis=0), head_axis)  # (N, Hkv, 1, S, D)
    vs = op.Unsqueeze(op.Gather(v, batch_of, axis=0), head_axis)  # (N, Hkv, 1, S, D)
    scores = op.Mul(op.MatMul(qs, op.Transpose(ks, perm=[0, 1, 2, 4, 3])), op.Constant(value_float=scale))
    j = op.Range(op.Constant(value_int=0), op.Squeeze(s), op.Constant(value_int=1))  # (S,)
    keep = op.LessOrEqual(op.Unsqueeze(j, op.Constant(value_ints=[0])),
                          op.Unsqueeze(pos, op.Constant(value_ints=[1])))  # (N, S)
    keep = op.Unsqueeze(keep, op.Constant(value_ints=[1, 2, 3]))  # (N, 1, 1, 1, S)
    probs = op.Softmax(op.Where(keep, scores, op.Constant(value_float=float("-inf"))), axis=-1)
    attn = op.Reshape(op.MatMul(probs, vs), op.Concat(n, h, d, axis=0))  # (N, H, D)
    zeros = op.Mul(flat_q, op.Constant(value_float=0.0))  # (BT, H, D)
    full = op.ScatterND(zeros, op.Unsqueeze(idx, op.Constant(value_ints=[1])), attn)  # (BT, H, D)
    out = op.Transpose(op.Reshape(full, op.Concat(b, t, h, d, axis=0)), perm=[0, 2, 1, 3])  # (B, H, T, D)
    return out


@script(_CONDFX, default_opset=op)
def RoutedAttentionScored(q: FLOAT, k: FLOAT, v: FLOAT, route: BOOL, slopes: FLOAT, sinks: FLOAT, scale: float,
                          softcap: float = 0.0) -> FLOAT:
    b = op.Shape(q, start=0, end=1)
    h = op.Shape(q, start=1, end=2)
    t = op.Shape(q, start=2, end=3)
    d = op.Shape(q, start=3, end=4)
    hkv = op.Shape(k, start=1, end=2)
    s = op.Shape(k, start=2, end=3)
    g = op.Div(h, hkv)
    one1 = op.Constant(value_ints=[1])
    flat_q = op.Reshape(op.Transpose(q, perm=[0, 2, 1, 3]), op.Concat(op.Mul(b, t), h, d, axis=0))  # (BT, H, D)
    rows = op.NonZero(op.Reshape(route, op.Constant(value_ints=[-1])))  # (1, N)
    idx = op.Squeeze(rows, op.Constant(value_ints=[0]))  # (N,)
    t_len = op.Squeeze(t)
    batch_of = op.Div(idx, t_len)  # (N,)
    pos = op.Add(op.Mod(idx, t_len), op.Sub(op.Squeeze(s), t_len))  # (N,) absolute positions
    n = op.Shape(idx)
    qs = op.Reshape(op.Gather(flat_q, idx, axis=0), op.Concat(n, hkv, g, one1, d, axis=0))  # (N, Hkv, G, 1, D)
    head_axis = op.Constant(value_ints=[2])
    ks = op.Unsqueeze(op.Gather(k, batch_of, axis=0), head_axis)  # (N, Hkv, 1, S, D)
    vs = op.Unsqueeze(op.Gather(v, batch_of, axis=0), head_axis)  # (N, Hkv, 1, S, D)
    scores = op.Mul(op.MatMul(qs, op.Transpose(ks, perm=[0, 1, 2, 4, 3])), op.Constant(value_float=scale))
    cap = op.Constant(value_float=softcap)
    capped = op.Greater(cap, op.Constant(value_float=0.0))
    divisor = op.Where(capped, cap, op.Constant(value_float=1.0))
    scores = op.Where(capped, op.Mul(op.Tanh(op.Div(scores, divisor)), divisor), scores)  # (N, Hkv, G, 1, S)
    j = op.Range(op.Constant(value_int=0), op.Squeeze(s), op.Constant(value_int=1))  # (S,)
    rel = op.Sub(op.Unsqueeze(j, op.Constant(value_ints=[0])), op.Unsqueeze(pos, op.Constant(value_ints=[1])))  # (N, S)
    rel5 = op.Unsqueeze(op.Cast(rel, to=_F32), op.Constant(value_ints=[1, 2, 3]))  # (N, 1, 1, 1, S)
    slope = op.Reshape(slopes, op.Concat(one1, hkv, g, one1, one1, axis=0))  # (1, Hkv, G, 1, 1)
    scores = op.Add(scores, op.Mul(slope, rel5))  # + slope_h (j - pos)
    keep = op.LessOrEqual(rel5, op.Constant(value_float=0.0))  # (N, 1, 1, 1, S)
    masked = op.Where(keep, scores, op.Constant(value_float=float("-inf")))
    z = op.Reshape(sinks, op.Concat(one1, hkv, g, one1, one1, axis=0))
    z = op.Expand(z, op.Concat(n, hkv, g, one1, one1, axis=0))  # (N, Hkv, G, 1, 1)
    probs = op.Softmax(op.Concat(masked, z, axis=-1), axis=-1)  # (N, Hkv, G, 1, S + 1)
    probs = op.Slice(probs, op.Constant(value_ints=[0]), op.Constant(value_ints=[-1]), op.Constant(value_ints=[-1]))
    attn = op.Reshape(op.MatMul(probs, vs), op.Concat(n, h, d, axis=0))  # (N, H, D)
    zeros = op.Mul(flat_q, op.Constant(value_float=0.0))  # (BT, H, D)
    full = op.ScatterND(zeros, op.Unsqueeze(idx, op.Constant(value_ints=[1])), attn)  # (BT, H, D)
    out = op.Transpose(op.Reshape(full, op.Concat(b, t, h, d, axis=0)), perm=[0, 2, 1, 3])  # (B, H, T, D)
    return out


def routed_attention_function() -> onnx.FunctionProto:
    """The ``condfx::RoutedAttention`` local function: opset 18 body, attribute ``scale``."""
    return RoutedAttention.to_function_proto()


def routed_attention_functions() -> list[onnx.FunctionProto]:
    """Both local functions: ``condfx::RoutedAttention`` and ``condfx::RoutedAttentionScored``."""
    return [RoutedAttention.to_function_proto(), RoutedAttentionScored.to_function_proto()]


def emit_routed_attention(q, k, v, route, scale: float, softcap: float = 0.0,
                          alibi_slopes: list[float] | None = None, sinks: torch.Tensor | None = None) -> torch.Tensor:
    """Emits one ``condfx::RoutedAttention`` node (``RoutedAttentionScored`` with a score option)
    under ``torch.onnx.export``; runs the op otherwise.

    Args: those of ``torch.ops.condfx.routed_attention``; the slopes become a float32 constant input,
        absent sinks a -inf input.

    Returns:
        (B, H, T, D) with q's dtype.
    """
    if not torch.onnx.is_in_onnx_export():
        return torch.ops.condfx.routed_attention(q, k, v, route, scale, softcap, alibi_slopes, sinks)
    if softcap or alibi_slopes is not None or sinks is not None:
        h = q.shape[1]
        slopes = torch.tensor(list(alibi_slopes) if alibi_slopes is not None else [0.0] * h, dtype=torch.float32)
        z = sinks.to(torch.float32) if sinks is not None else torch.full((h,), float("-inf"), dtype=torch.float32)
        return torch.onnx.ops.symbolic(
            f"{DOMAIN}::{SCORED_OP_TYPE}",
            (q, k, v, route, slopes, z),
            {"scale": float(scale), "softcap": float(softcap)},
            dtype=q.dtype,
            shape=q.shape,
            version=DOMAIN_VERSION,
        )
    return torch.onnx.ops.symbolic(
        f"{DOMAIN}::{OP_TYPE}",
        (q, k, v, route),
        {"scale": float(scale)},
        dtype=q.dtype,
        shape=q.shape,
        version=DOMAIN_VERSION,
    )


LOWERING = Lowering(op_type=OP_TYPE, emit=emit_routed_attention, build_function=routed_attention_functions)
