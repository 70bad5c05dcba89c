"""condfx.codegen.onnx: ONNX lowerings of the ``torch.ops.condfx.*`` custom ops.

One module per op family (``attention.py``, later routed attention, masked FFN, quantized caches),
each holding the same two pieces: the ONNX local function whose body is the op's reference in
standard ops, and the torch-side emitter that produces the ``condfx``-domain node during
``torch.onnx.export``. ``LOWERINGS`` is the one explicit table from op overload to ``Lowering``;
``condfx.codegen.onnx_export.export_onnx`` uses it. Importing this package registers nothing anywhere.
"""

from __future__ import annotations

import torch

import condfx.ops  # noqa: F401  (defines torch.ops.condfx.*)
from condfx.codegen.onnx import attention as _attention
from condfx.codegen.onnx import countdown_ffn as _countdown_ffn
from condfx.codegen.onnx import interleaved_attention as _interleaved_attention
from condfx.codegen.onnx import kivi_cache_attention as _kivi_cache_attention
from condfx.codegen.onnx import masked_ffn as _masked_ffn
from condfx.codegen.onnx import quantized_cache_attention as _quantized_cache_attention
from condfx.codegen.onnx import quantized_stream as _quantized_stream
from condfx.codegen.onnx import routed_attention as _routed_attention
from condfx.codegen.onnx import sink_window as _sink_window
from condfx.codegen.onnx._functions import (
    DOMAIN,
    DOMAIN_VERSION,
    MIN_OPSET,
    Lowering,
    attach_functions,
    lower_custom_ops,
    used_custom_nodes,
)

LOWERINGS: dict[torch._ops.OpOverload, Lowering] = {
    torch.ops.condfx.attention.default: _attention.LOWERING,
    torch.ops.condfx.masked_ffn.default: _masked_ffn.LOWERING,
    torch.ops.condfx.countdown_masked_ffn.default: _countdown_ffn.LOWERING,
    torch.ops.condfx.interleaved_attention.default: _interleaved_attention.LOWERING,
    torch.ops.condfx.routed_attention.default: _routed_attention.LOWERING,
    torch.ops.condfx.kivi_cache_attention.default: _kivi_cache_attention.LOWERING,
    torch.ops.condfx.quantized_stream.default: _quantized_stream.LOWERING,
    torch.ops.condfx.quantized_cache_attention.default: _quantized_cache_attention.LOWERING,
    torch.ops.condfx.sink_window_attention.default: _sink_window.LOWERING,
}

__all__ = [
    "DOMAIN",
    "DOMAIN_VERSION",
    "LOWERINGS",
    "MIN_OPSET",
    "Lowering",
    "attach_functions",
    "lower_custom_ops",
    "used_custom_nodes",
]
