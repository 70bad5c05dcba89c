"""ONNX lowering of ``torch.ops.condfx.kivi_cache_attention``: node ``condfx::KIVICacheAttention`` +
local function. The decode graph takes and returns the KIVI cache as integer tensors.

Provenance: the function body is ``condfx.ops.kivi_cache.kivi_cache_attention_reference`` in standard
ONNX ops (opset 18). Per stream (K per channel, V per token): Concat the stored full-precision tokens
with the new ones, Slice off the sink, unpack the uint8 codes bit by bit (integer Div / Mod by powers
of two, ReduceSum of the bit planes), dequantize with the float16 scale and zero, quantize the whole
chunks of the not-yet-quantized tokens (ReduceMin / ReduceMax per group, float16 rounding of scale and
zero, Round half to even, Clip) and pack them again; the attention is the reference's: scores
Where(read quantized, q K̂ᵀ, q Kᵀ), the end-aligned causal / window mask, Softmax, and the values mixed
the same way. The body is built with ``onnx.helper`` from small Python helpers (one per stream piece),
so the K and V streams share the code; ``bits``, ``group``, ``residual``, ``sink`` and ``window`` are
attributes the body reads through attribute references.

Node:  (out, k_codes', k_scale', k_zero', k_fp', v_codes', v_scale', v_zero', v_fp') =
       condfx::KIVICacheAttention<scale: float, window, bits, group, residual, sink: int>(
           q (B, H, T, D), k, v (B, Hkv, T, D),
           k_codes (B, Hkv, Nk, D*bits/8) uint8, k_scale, k_zero (B, Hkv, Nk/group, D) float16,
           k_fp (B, Hkv, Fk, D), v_codes (B, 1, Nv, Hkv*D*bits/8) uint8,
           v_scale, v_zero (B, 1, Nv, Hkv*D/group) float16, v_fp (B, 1, Fv, Hkv*D))

Supported: float32 q/k/v and full-precision tails; bits 2, 3, 4; every size dynamic. Differences from
the reference: the CPU op runs the attention as one SDPA call over the (K̂, V̂) and (K, V) copies;
the body computes the scores of both copies and selects, like ``quantized_cache_attention_reference``
(float32 rounding only). Tested with ONNX Runtime 1.32 CPU.
"""

from __future__ import annotations

import onnx
import torch
from onnx import TensorProto, helper

from condfx.codegen.onnx._functions import DOMAIN, DOMAIN_VERSION, MIN_OPSET, Lowering
from condfx.codegen.onnx._quant_stream import FLOAT_ATTRS, INT_ATTRS, Body, attributes, stream
from condfx.ops.quant_stream import STREAM_PARTS, updated_lengths

OP_TYPE = "KIVICacheAttention"
_INPUTS = ("q", "k", "v", "k_codes", "k_scale", "k_zero", "k_fp",
           "v_codes", "v_scale", "v_zero", "v_fp")
_OUTPUTS = ("out", "k_codes_out", "k_scale_out", "k_zero_out", "k_fp_out",
            "v_codes_out", "v_scale_out", "v_zero_out", "v_fp_out")


def _reads_hat(f: Body, a: dict, t: str, s: str, chunk1: str) -> str:
    """(T, S) bool: query row i (at position S - T + i) reads key j from the quantized copy."""
    zero, one = f.scalar(0), f.scalar(1)
    t0, s0 = f("Squeeze", t), f("Squeeze", s)
    n = f("Add", f("Range", zero, t0, one), f("Sub", s0, t0))  # (T,) tokens before row i
    over = f("Max", f("Sub", f("Sub", n, a["residual"]), a["sink"]), zero)
    chunk = f("Squeeze", chunk1)
    end = f("Add", f("Mul", f("Div", over, chunk), chunk), a["sink"])  # (T,)
    j = f("Unsqueeze", f("Range", zero, s0, one), f.ints(0))  # (1, S)
    return f("And", f("GreaterOrEqual", j, a["sink"]), f("Less", j, f("Unsqueeze", end, f.ints(1))))


def kivi_cache_attention_function() -> onnx.FunctionProto:
    """The ``condfx::KIVICacheAttention`` local function (opset 18 body)."""
    f = Body()
    a = attributes(f, (*FLOAT_ATTRS, *INT_ATTRS))
    b, hkv, t, d = (f.dim("k", i) for i in range(4))
    rows = f("Reshape", f("Transpose", "v", perm=[0, 2, 1, 3]), f("Concat", b, f.ints(1), t, f("Mul", hkv, d), axis=0))
    kf, kh, k_out = stream(f, [f"k_{p}" for p in STREAM_PARTS], "k", a, per_channel=True)
    vf, vh, v_out = stream(f, [f"v_{p}" for p in STREAM_PARTS], rows, a, per_channel=False)
    s = f.dim(kf, 2)
    heads = f("Concat", b, f.ints(-1), hkv, d, axis=0)

    def as_heads(x):  # (B, 1, S, Hkv*D) -> (B, Hkv, S, D)
        return f("Transpose", f("Reshape", x, heads), perm=[0, 2, 1, 3])

    h = f.dim("q", 1)
    qg = f("Reshape", f("Cast", "q", to=TensorProto.FLOAT), f("Concat", b, hkv, f("Div", h, hkv), t, d, axis=0))
    axis2 = f.ints(2)
    kt, kht = (f("Transpose", f("Unsqueeze", x, axis2), perm=[0, 1, 2, 4, 3]) for x in (kf, kh))
    use_k = _reads_hat(f, a, t, s, a["group1"])
    use_v = _reads_hat(f, a, t, s, f.ints(1))
    scores = f("Mul", f("Where", use_k, f("MatMul", qg, kht), f("MatMul", qg, kt)), a["scale"])
    zero, one = f.scalar(0), f.scalar(1)
    pos = f("Unsqueeze", f("Add", f("Range", zero, f("Squeeze", t), one), f("Sub", f("Squeeze", s), f("Squeeze", t))), f.ints(1))
    j = f("Unsqueeze", f("Range", zero, f("Squeeze", s), one), f.ints(0))
    in_window = f("Or", f("LessOrEqual", a["window"], zero), f("Greater", j, f("Sub", pos, a["window"])))
    keep = f("And", f("LessOrEqual", j, pos), in_window)
    probs = f("Softmax", f("Where", keep, scores, f.scalar(float("-inf"))), axis=-1)
    vg, vhg = (f("Unsqueeze", as_heads(x), axis2) for x in (vf, vh))
    zeros = f("Mul", probs, f.scalar(0.0))
    mixed = f("Add", f("MatMul", f("Where", use_v, probs, zeros), vhg),
              f("MatMul", f("Where", use_v, zeros, probs), vg))
    out = f("CastLike", f("Reshape", mixed, f("Shape", "q")), "q")
    results = [out, *k_out, *v_out]
    f.nodes += [helper.make_node("Identity", [r], [o]) for r, o in zip(results, _OUTPUTS, strict=True)]
    return helper.make_function(
        DOMAIN, OP_TYPE, list(_INPUTS), list(_OUTPUTS), f.nodes,
        [helper.make_opsetid("", MIN_OPSET)], attributes=[*FLOAT_ATTRS, *INT_ATTRS],
    )


def emit_kivi_cache_attention(q, k, v, k_codes, k_scale, k_zero, k_fp, v_codes, v_scale, v_zero, v_fp,
                              scale, window, bits, group, residual, sink):
    """Emits one ``condfx::KIVICacheAttention`` node under ``torch.onnx.export``; runs the op otherwise."""
    args = (q, k, v, k_codes, k_scale, k_zero, k_fp, v_codes, v_scale, v_zero, v_fp)
    if not torch.onnx.is_in_onnx_export():
        return torch.ops.condfx.kivi_cache_attention(*args, scale, window, bits, group, residual, sink)
    b, hkv, t, d = k.shape
    nqk, nfk = updated_lengths(k_codes.shape[2], k_fp.shape[2], t, residual, group, sink)
    nqv, nfv = updated_lengths(v_codes.shape[2], v_fp.shape[2], t, residual, 1, sink)
    c = hkv * d
    shapes = [q.shape,
              (b, hkv, nqk, d * bits // 8), (b, hkv, nqk // group, d), (b, hkv, nqk // group, d), (b, hkv, nfk, d),
              (b, 1, nqv, c * bits // 8), (b, 1, nqv, c // group), (b, 1, nqv, c // group), (b, 1, nfv, c)]
    half = torch.float16
    dtypes = [q.dtype, torch.uint8, half, half, k_fp.dtype, torch.uint8, half, half, v_fp.dtype]
    attrs = {"scale": float(scale), "window": int(window), "bits": int(bits), "group": int(group),
             "residual": int(residual), "sink": int(sink)}
    return tuple(torch.onnx.ops.symbolic_multi_out(
        f"{DOMAIN}::{OP_TYPE}", args, attrs, dtypes=dtypes, shapes=shapes, version=DOMAIN_VERSION,
    ))


LOWERING = Lowering(op_type=OP_TYPE, emit=emit_kivi_cache_attention,
                    build_function=kivi_cache_attention_function)
