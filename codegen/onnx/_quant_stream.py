"""The ONNX function-body builder shared by the packed-cache lowerings (``kivi_cache_attention.py``,
``quantized_stream.py``): one stream step (unpack, dequantize, quantize whole chunks, pack, concat)
written once with ``onnx.helper`` so the K, V, X and latent streams share it. onnxscript functions
cannot call Python helpers, hence this small builder.
"""

from __future__ import annotations

import onnx
from onnx import TensorProto, helper

from condfx.ops.kv_quant import FLOAT16_MAX

FLOAT_ATTRS, INT_ATTRS = ("scale",), ("window", "bits", "group", "residual", "sink")


class Body:
    """Collects the nodes of a function body; every helper returns the name of its output."""

    def __init__(self):
        self.nodes: list[onnx.NodeProto] = []
        self._n = 0

    def __call__(self, op_type: str, *inputs: str, outputs: int = 1, **attrs):
        names = [f"t{self._n}_{i}" for i in range(outputs)]
        self._n += 1
        self.nodes.append(helper.make_node(op_type, list(inputs), names, **attrs))
        return names[0] if outputs == 1 else names

    def ints(self, *values: int) -> str:
        """A constant 1-D int64 tensor."""
        return self("Constant", value_ints=list(values))

    def scalar(self, value: float | int) -> str:
        kind = "value_float" if isinstance(value, float) else "value_int"
        return self("Constant", **{kind: value})

    def attr(self, name: str) -> str:
        """A scalar constant holding the function attribute ``name`` (int64 or float)."""
        kind = TensorProto.FLOAT if name in FLOAT_ATTRS else TensorProto.INT64
        key = "value_float" if kind == TensorProto.FLOAT else "value_int"
        attr_type = onnx.AttributeProto.FLOAT if kind == TensorProto.FLOAT else onnx.AttributeProto.INT
        node = helper.make_node("Constant", [], [f"attr_{name}"])
        node.attribute.append(helper.make_attribute_ref(key, attr_type, ref_attr_name=name))
        self.nodes.append(node)
        return f"attr_{name}"

    def dim(self, x: str, axis: int) -> str:
        """Size of ``x`` along ``axis`` as a 1-D int64 tensor of one element."""
        if axis == -1:
            return self("Shape", x, start=-1)
        return self("Shape", x, start=axis, end=axis + 1)

    def slice(self, x: str, start: str, end: str, axis: int) -> str:
        return self("Slice", x, start, end, self.ints(axis))


def _unpack(f: Body, codes: str, bits1: str, pow8: str, powb: str) -> str:
    """uint8 (..., N, C*bits/8) → float32 codes (..., N, C)."""
    packed = f("Unsqueeze", f("Cast", codes, to=TensorProto.INT32), f.ints(-1))  # (..., N, nb, 1)
    planes = f("Mod", f("Div", packed, pow8), f("Constant", value=helper.make_tensor("", TensorProto.INT32, [], [2])))
    lead = f("Shape", codes, start=0, end=-1)
    channels = f("Div", f("Mul", f.dim(codes, -1), f.ints(8)), bits1)
    planes = f("Reshape", planes, f("Concat", lead, channels, bits1, axis=0))  # (..., N, C, bits)
    return f("ReduceSum", f("Mul", f("Cast", planes, to=TensorProto.FLOAT), powb), f.ints(-1), keepdims=0)


def _pack(f: Body, codes: str, bits1: str, powb_i: str, pow8: str) -> str:
    """float32 codes (..., N, C) → uint8 (..., N, C*bits/8), little-endian bits."""
    c = f("Unsqueeze", f("Cast", codes, to=TensorProto.INT32), f.ints(-1))  # (..., N, C, 1)
    two = f("Constant", value=helper.make_tensor("", TensorProto.INT32, [], [2]))
    planes = f("Mod", f("Div", c, powb_i), two)  # (..., N, C, bits)
    lead = f("Shape", codes, start=0, end=-1)
    nbytes = f("Div", f("Mul", f.dim(codes, -1), bits1), f.ints(8))
    planes = f("Reshape", planes, f("Concat", lead, nbytes, f.ints(8), axis=0))  # (..., N, C*bits/8, 8)
    byte = f("ReduceSum", f("Mul", planes, pow8), f.ints(-1), keepdims=0)
    return f("Cast", byte, to=TensorProto.UINT8)


def _grouped_shape(f: Body, x: str, group1: str, per_channel: bool) -> str:
    """Shape (..., N, C/g, g) (per token) or (..., N/g, g, C) (per channel) of ``x`` (..., N, C)."""
    if per_channel:
        groups = f("Div", f.dim(x, -2), group1)
        return f("Concat", f("Shape", x, start=0, end=-2), groups, group1, f.dim(x, -1), axis=0)
    groups = f("Div", f.dim(x, -1), group1)
    return f("Concat", f("Shape", x, start=0, end=-1), groups, group1, axis=0)


def _dequantize(f: Body, codes: str, scale: str, zero: str, group1: str, per_channel: bool) -> str:
    """float32 codes (..., N, C) and float16 stats → float32 values (..., N, C)."""
    g = f("Reshape", codes, _grouped_shape(f, codes, group1, per_channel))
    axis = f.ints(-2 if per_channel else -1)
    s = f("Unsqueeze", f("Cast", scale, to=TensorProto.FLOAT), axis)
    z = f("Unsqueeze", f("Cast", zero, to=TensorProto.FLOAT), axis)
    return f("Reshape", f("Add", f("Mul", g, s), z), f("Shape", codes))


def _saturate(f: Body, x: str) -> str:
    """float32 x clamped to float16's finite range (``condfx.ops.kv_quant.saturate``)."""
    return f("Clip", x, f.scalar(-FLOAT16_MAX), f.scalar(FLOAT16_MAX))


def _half(f: Body, x: str) -> str:
    """float32 x as float16, saturating instead of overflowing (``condfx.ops.kv_quant.to_float16``)."""
    return f("Cast", _saturate(f, x), to=TensorProto.FLOAT16)


def _quantize(f: Body, x: str, group1: str, levels: str, per_channel: bool):
    """float32 x (..., N, C), N whole chunks → (float32 codes, scale fp16, zero fp16)."""
    g = f("Reshape", _saturate(f, x), _grouped_shape(f, x, group1, per_channel))
    axis = f.ints(-2 if per_channel else -1)
    lo, hi = f("ReduceMin", g, axis, keepdims=1), f("ReduceMax", g, axis, keepdims=1)
    zero16 = f("Cast", lo, to=TensorProto.FLOAT16)
    scale16 = f("Cast", _saturate(f, f("Div", f("Sub", hi, lo), levels)), to=TensorProto.FLOAT16)
    s, z = f("Cast", scale16, to=TensorProto.FLOAT), f("Cast", zero16, to=TensorProto.FLOAT)
    denom = f("Where", f("Greater", s, f.scalar(0.0)), s, f.scalar(1.0))
    codes = f("Clip", f("Round", f("Div", f("Sub", g, z), denom)), f.scalar(0.0), levels)
    return f("Reshape", codes, f("Shape", x)), f("Squeeze", scale16, axis), f("Squeeze", zero16, axis)


def _split_step(f: Body, fp: str, new: str, a: dict) -> tuple[str, str, str]:
    """(head, rest, big): the stream's full-precision tokens plus the step's (as float32, whatever the
    model's dtype), split at the sink."""
    allf = f("Concat", f("Cast", fp, to=TensorProto.FLOAT), f("Cast", new, to=TensorProto.FLOAT), axis=-2)
    big = f.ints(1 << 62)
    return f.slice(allf, f.ints(0), a["sink1"], -2), f.slice(allf, a["sink1"], big, -2), big


def _floor_to(f: Body, n: str, chunk1: str) -> str:
    return f("Mul", f("Div", n, chunk1), chunk1)


def _packed_after(f: Body, head: str, codes: str, rest: str, a: dict, chunk1: str) -> str:
    """quantized_count of the stream once the step is appended (1-D int64)."""
    total = f("Add", f("Add", f.dim(head, -2), f.dim(codes, -2)), f.dim(rest, -2))
    over = f("Max", f("Sub", f("Sub", total, a["residual1"]), a["sink1"]), f.ints(0))
    return _floor_to(f, over, chunk1)


def stream(f: Body, parts: list[str], new: str, a: dict, per_channel: bool) -> tuple[str, str, list[str]]:
    """(full, hat, [codes', scale', zero', fp']) of the stream whose four tensors are named ``parts``
    and whose step adds ``new``; see ``condfx.ops.quant_stream.stream_step``."""
    codes, scale, zero, fp = parts
    chunk1 = a["group1"] if per_channel else f.ints(1)
    head, rest, big = _split_step(f, fp, new, a)
    deq = _dequantize(f, _unpack(f, codes, a["bits1"], a["pow8"], a["powb"]), scale, zero,
                      a["group1"], per_channel)
    whole = _floor_to(f, f.dim(rest, -2), chunk1)
    q_codes, q_scale, q_zero = _quantize(f, f.slice(rest, f.ints(0), whole, -2), a["group1"],
                                         a["levels"], per_channel)
    rest_hat = f("Concat", _dequantize(f, q_codes, q_scale, q_zero, a["group1"], per_channel),
                 f.slice(rest, whole, big, -2), axis=-2)
    move = f("Sub", _packed_after(f, head, codes, rest, a, chunk1), f.dim(codes, -2))
    rows = f("Div", move, a["group1"]) if per_channel else move
    packed = _pack(f, f.slice(q_codes, f.ints(0), move, -2), a["bits1"], a["powb_i"], a["pow8"])
    updated = [
        f("Concat", codes, packed, axis=-2),
        f("Concat", scale, f.slice(q_scale, f.ints(0), rows, -2), axis=-2),
        f("Concat", zero, f.slice(q_zero, f.ints(0), rows, -2), axis=-2),
        f("CastLike", f("Concat", head, f.slice(rest, move, big, -2), axis=-2), fp),
    ]
    return f("Concat", head, deq, rest, axis=-2), f("Concat", head, deq, rest_hat, axis=-2), updated


def dropped_stream(f: Body, parts: list[str], new: str, a: dict, per_channel: bool) -> tuple[str, str, list[str]]:
    """``stream`` for a dropped stream (bits 0): codes, scale and zero have no columns, quantized
    tokens read 0; only the tokens kept in full precision are stored."""
    codes, _, _, fp = parts
    chunk1 = a["group1"] if per_channel else f.ints(1)
    head, rest, big = _split_step(f, fp, new, a)
    lead, width, none = f("Shape", codes, start=0, end=2), f.dim(fp, -1), f.ints(0)

    def zeros(n: str, cols: str, dtype: int) -> str:
        value = helper.make_tensor("", dtype, [1], [0])
        return f("ConstantOfShape", f("Concat", lead, n, cols, axis=0), value=value)

    deq = zeros(f.dim(codes, -2), width, TensorProto.FLOAT)
    whole = _floor_to(f, f.dim(rest, -2), chunk1)
    rest_hat = f("Concat", zeros(whole, width, TensorProto.FLOAT), f.slice(rest, whole, big, -2), axis=-2)
    nq = _packed_after(f, head, codes, rest, a, chunk1)
    rows = f("Div", nq, a["group1"]) if per_channel else nq
    updated = [zeros(nq, none, TensorProto.UINT8), zeros(rows, none, TensorProto.FLOAT16),
               zeros(rows, none, TensorProto.FLOAT16),
               f("CastLike", f("Concat", head, f.slice(rest, f("Sub", nq, f.dim(codes, -2)), big, -2), axis=-2), fp)]
    return f("Concat", head, deq, rest, axis=-2), f("Concat", head, deq, rest_hat, axis=-2), updated


def half_stream(f: Body, parts: list[str], new: str, a: dict, per_channel: bool) -> tuple[str, str, list[str]]:
    """``stream`` for a float16 stream (bits 16): codes hold the quantized tokens as float16 values,
    scale and zero have no columns; quantizing is a cast to float16."""
    codes, _, _, fp = parts
    chunk1 = a["group1"] if per_channel else f.ints(1)
    head, rest, big = _split_step(f, fp, new, a)
    lead, none = f("Shape", codes, start=0, end=2), f.ints(0)
    deq = f("Cast", codes, to=TensorProto.FLOAT)
    whole = _floor_to(f, f.dim(rest, -2), chunk1)
    rounded = f("Cast", _half(f, f.slice(rest, f.ints(0), whole, -2)), to=TensorProto.FLOAT)
    rest_hat = f("Concat", rounded, f.slice(rest, whole, big, -2), axis=-2)
    nq = _packed_after(f, head, codes, rest, a, chunk1)
    move = f("Sub", nq, f.dim(codes, -2))
    rows = f("Div", nq, a["group1"]) if per_channel else nq
    stats = f("ConstantOfShape", f("Concat", lead, rows, none, axis=0),
              value=helper.make_tensor("", TensorProto.FLOAT16, [1], [0]))
    packed = _half(f, f.slice(rest, f.ints(0), move, -2))
    updated = [f("Concat", codes, packed, axis=-2), stats, f("Identity", stats),
               f("CastLike", f("Concat", head, f.slice(rest, move, big, -2), axis=-2), fp)]
    return f("Concat", head, deq, rest, axis=-2), f("Concat", head, deq, rest_hat, axis=-2), updated


def attributes(f: Body, names) -> dict:
    """Constants of the function attributes ``names`` (scalars, and 1-D as ``<name>1``) plus the
    bit tables derived from ``bits`` when it is one of them."""
    a = {name: f.attr(name) for name in names}
    for name in names:
        a[f"{name}1"] = f("Reshape", a[name], f.ints(1))
    if "bits" not in a:
        return a
    bits_f = f("Cast", a["bits"], to=TensorProto.FLOAT)
    a["levels"] = f("Sub", f("Pow", f.scalar(2.0), bits_f), f.scalar(1.0))
    powers = f("Pow", f.scalar(2.0), f("Cast", f("Range", f.scalar(0), a["bits"], f.scalar(1)), to=TensorProto.FLOAT))
    a["powb"], a["powb_i"] = powers, f("Cast", powers, to=TensorProto.INT32)
    a["pow8"] = f("Constant", value=helper.make_tensor("", TensorProto.INT32, [8], [1 << i for i in range(8)]))
    return a


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


def attend(f: Body, a: dict, q: str, k: str, v: str, k_hat: str, v_hat: str, k_chunk1: str,
           v_chunk1: str) -> str:
    """``condfx::quantized_cache_attention`` over (B, Hkv, S, D) k, v, k̂, v̂: scores Where(read
    quantized, q k̂ᵀ, q kᵀ), the end-aligned causal / window mask, Softmax, values mixed alike."""
    b, hkv, t, d, h = f.dim(k, 0), f.dim(k, 1), f.dim(q, 2), f.dim(k, 3), f.dim(q, 1)
    s = f.dim(k, 2)
    qg = f("Reshape", f("Cast", q, to=TensorProto.FLOAT), f("Concat", b, hkv, f("Div", h, hkv), t, d, axis=0))
    axis2 = f.ints(2)
    kt, kht = (f("Transpose", f("Unsqueeze", f("Cast", x, to=TensorProto.FLOAT), axis2), perm=[0, 1, 2, 4, 3])
               for x in (k, k_hat))
    use_k = _reads_hat(f, a, t, s, k_chunk1)
    use_v = _reads_hat(f, a, t, s, v_chunk1)
    scores = f("Mul", f("Where", use_k, f("MatMul", qg, kht), f("MatMul", qg, kt)), a["scale"])
    zero, one = f.scalar(0), f.scalar(1)
    t0, s0 = f("Squeeze", t), f("Squeeze", s)
    pos = f("Unsqueeze", f("Add", f("Range", zero, t0, one), f("Sub", s0, t0)), f.ints(1))  # (T, 1)
    j = f("Unsqueeze", f("Range", zero, s0, one), f.ints(0))  # (1, S)
    in_window = f("Or", f("LessOrEqual", a["window"], zero), f("Greater", j, f("Sub", pos, a["window"])))
    keep = f("And", f("LessOrEqual", j, pos), in_window)
    probs = f("Softmax", f("Where", keep, scores, f.scalar(float("-inf"))), axis=-1)
    vg, vhg = (f("Unsqueeze", f("Cast", x, to=TensorProto.FLOAT), axis2) for x in (v, v_hat))
    zeros = f("Mul", probs, f.scalar(0.0))
    mixed = f("Add", f("MatMul", f("Where", use_v, probs, zeros), vhg),
              f("MatMul", f("Where", use_v, zeros, probs), vg))
    return f("CastLike", f("Reshape", mixed, f("Shape", q)), q)
