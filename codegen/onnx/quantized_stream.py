"""ONNX lowering of ``torch.ops.condfx.quantized_stream``: nodes ``condfx::QuantizedStreamToken`` and
``condfx::QuantizedStreamChannel`` (groups per token / per channel) + their local functions.

Provenance: the bodies are ``condfx.ops.quant_stream.stream_step`` in standard ONNX ops (opset 18),
built by ``_quant_stream.stream`` (the same code as the KIVI lowering's two streams). The grouping
axis decides the reshapes of the body, so each ``dim`` gets its own function; ``bits``, ``group``,
``residual`` and ``sink`` are attributes read through attribute references.

Node:  (full, hat, codes', scale', zero', fp') = condfx::QuantizedStream{Token,Channel}
           <bits, group, residual, sink: int>(codes (B, H, Nq, C*bits/8) uint8, scale, zero float16,
                                              fp (B, H, F, C), new (B, H, T, C))
Bits 0 (a dropped stream, ``quantize-kv{latent=klt}``) is ``condfx::QuantizedStreamDropped{Token,Channel}``
<group, residual, sink>: no codes, its quantized tokens read 0. Bits 16 (a float16 stream) is
``condfx::QuantizedStreamHalf{Token,Channel}`` <group, residual, sink>: codes are float16 values.
Supported: float32 streams, bits 0, 2, 3, 4, 16, every size dynamic. Tested with ONNX Runtime 1.32 CPU.
"""

from __future__ import annotations

import onnx
import torch
from onnx import helper

from condfx.codegen.onnx._functions import DOMAIN, DOMAIN_VERSION, MIN_OPSET, Lowering
from condfx.codegen.onnx._quant_stream import Body, attributes, dropped_stream, half_stream, stream
from condfx.ops.kv_quant import DROPPED
from condfx.ops.quant_stream import HALF, STREAM_PARTS, stream_dtypes, stream_shapes

OP_TYPE = "QuantizedStream"
_INPUTS = (*STREAM_PARTS, "new")
_OUTPUTS = ("full", "hat", *(f"{p}_out" for p in STREAM_PARTS))
_ATTRS = ("bits", "group", "residual", "sink")


_KINDS = {DROPPED: ("Dropped", dropped_stream), HALF: ("Half", half_stream)}  # else packed codes


def _op_type(dim: int, bits: int = 2) -> str:
    return OP_TYPE + _KINDS.get(bits, ("", None))[0] + ("Channel" if dim == -2 else "Token")


def _attrs(bits: int) -> tuple[str, ...]:
    return _ATTRS[1:] if bits in _KINDS else _ATTRS


def _function(dim: int, bits: int = 2) -> onnx.FunctionProto:
    f = Body()
    a = attributes(f, _attrs(bits))
    build = _KINDS.get(bits, ("", stream))[1]
    full, hat, updated = build(f, list(STREAM_PARTS), "new", a, per_channel=dim == -2)
    results = [f("CastLike", full, "fp"), f("CastLike", hat, "fp"), *updated]  # float32 inside
    f.nodes += [helper.make_node("Identity", [r], [o]) for r, o in zip(results, _OUTPUTS, strict=True)]
    return helper.make_function(DOMAIN, _op_type(dim, bits), list(_INPUTS), list(_OUTPUTS), f.nodes,
                                [helper.make_opsetid("", MIN_OPSET)], attributes=list(_attrs(bits)))


def quantized_stream_functions() -> list[onnx.FunctionProto]:
    """The ``condfx::QuantizedStream*`` local functions: per token, per channel, and their dropped
    (bits 0) and float16 (bits 16) forms."""
    return [_function(dim, bits) for bits in (2, DROPPED, HALF) for dim in (-1, -2)]


def emit_quantized_stream(codes, scale, zero, fp, new, bits, group, dim, residual, sink, align=None):
    """Emits one ``condfx::QuantizedStream{Token,Channel}`` node under ``torch.onnx.export``; runs
    the op otherwise. ``align`` only sizes the traced outputs (the node does not take it)."""
    args = (codes, scale, zero, fp, new)
    if not torch.onnx.is_in_onnx_export():
        return torch.ops.condfx.quantized_stream(*args, bits, group, dim, residual, sink, align)
    from condfx.ops.quant_stream import updated_lengths

    b, h, t, c = new.shape
    nq, nf = updated_lengths(codes.shape[2], fp.shape[2], t, residual, group if dim == -2 else 1, sink)
    n = codes.shape[2] + fp.shape[2] + t if align is None else align.shape[2]
    shapes = [(b, h, n, c), (b, h, n, c), *stream_shapes((b, h), c, bits, group, dim, nq, nf)]
    dtypes = [fp.dtype, fp.dtype, *stream_dtypes(fp.dtype, bits)]
    attrs = {"bits": int(bits), "group": int(group), "residual": int(residual), "sink": int(sink)}
    attrs = {k: attrs[k] for k in _attrs(bits)}
    return tuple(torch.onnx.ops.symbolic_multi_out(
        f"{DOMAIN}::{_op_type(dim, bits)}", args, attrs, dtypes=dtypes, shapes=shapes, version=DOMAIN_VERSION,
    ))


LOWERING = Lowering(op_type=OP_TYPE, emit=emit_quantized_stream, build_function=quantized_stream_functions)
