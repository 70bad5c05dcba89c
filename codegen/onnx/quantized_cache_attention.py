"""ONNX lowering of ``torch.ops.condfx.quantized_cache_attention``: node ``condfx::QuantizedCacheAttention``
+ local function (XQuant layers in decode form read (k, v) and (k̂, v̂) rematerialised from their
packed streams, ``condfx::QuantizedStream*``, and attend through this node).

Provenance: the body is ``condfx.ops.kv_quant.quantized_cache_attention_reference`` in standard ONNX
ops (opset 18), written by ``_quant_stream.attend`` (shared with ``KIVICacheAttention``).

Node:  out = condfx::QuantizedCacheAttention<scale: float, window, residual, k_chunk, v_chunk, sink: int>(
           q (B, H, T, D), k, v, k_hat, v_hat (B, Hkv, S, D)) -> (B, H, T, D)
Supported: float32, every size dynamic. Differences from the reference: float32 scores for every
input dtype; the CPU op runs one SDPA call over the key copies instead. Tested with ONNX Runtime 1.32 CPU.
"""

from __future__ import annotations

import onnx
import torch
from onnx import helper

from condfx.codegen.onnx._functions import DOMAIN, DOMAIN_VERSION, MIN_OPSET, Lowering
from condfx.codegen.onnx._quant_stream import Body, attend, attributes

OP_TYPE = "QuantizedCacheAttention"
_INPUTS = ("q", "k", "v", "k_hat", "v_hat")
_ATTRS = ("scale", "window", "residual", "k_chunk", "v_chunk", "sink")


def quantized_cache_attention_function() -> onnx.FunctionProto:
    """The ``condfx::QuantizedCacheAttention`` local function (opset 18 body)."""
    f = Body()
    a = attributes(f, _ATTRS)
    out = attend(f, a, "q", "k", "v", "k_hat", "v_hat", a["k_chunk1"], a["v_chunk1"])
    f.nodes.append(helper.make_node("Identity", [out], ["out"]))
    return helper.make_function(DOMAIN, OP_TYPE, list(_INPUTS), ["out"], f.nodes,
                                [helper.make_opsetid("", MIN_OPSET)], attributes=list(_ATTRS))


def emit_quantized_cache_attention(q, k, v, k_hat, v_hat, scale, window, residual, k_chunk, v_chunk, sink=0):
    """Emits one ``condfx::QuantizedCacheAttention`` node under ``torch.onnx.export``; runs the op otherwise."""
    if not torch.onnx.is_in_onnx_export():
        return torch.ops.condfx.quantized_cache_attention(q, k, v, k_hat, v_hat, scale, window, residual,
                                                          k_chunk, v_chunk, sink)
    attrs = {"scale": float(scale), "window": int(window), "residual": int(residual),
             "k_chunk": int(k_chunk), "v_chunk": int(v_chunk), "sink": int(sink)}
    return torch.onnx.ops.symbolic(f"{DOMAIN}::{OP_TYPE}", (q, k, v, k_hat, v_hat), attrs,
                                   dtype=q.dtype, shape=q.shape, version=DOMAIN_VERSION)


LOWERING = Lowering(op_type=OP_TYPE, emit=emit_quantized_cache_attention,
                    build_function=quantized_cache_attention_function)
