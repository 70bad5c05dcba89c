"""condfx.ops: the custom-op contract (``torch.ops.condfx.*``).

Importing this package registers every op. One module per op family (``condfx.ops.attention``
registers ``condfx::attention`` and ``condfx::attention_backward``); each holds the eager reference,
the fake implementation and the autograd formula. Backend lowerings live in ``codegen/``. Call the
ops as ``torch.ops.condfx.<name>``; the op objects are not re-exported here, so that
``condfx.ops.attention`` stays the module.
"""

from condfx.ops.attention import (
    attention_backward_reference,
    attention_reference,
    check_attention_shapes,
)
from condfx.ops.countdown_ffn import countdown_masked_ffn_reference
from condfx.ops.interleaved_attention import interleaved_attention_reference
from condfx.ops.kivi_cache import kivi_cache_attention_reference
from condfx.ops.kv_quant import (
    dequantize_reference,
    fake_quantize_reference,
    quantize_reference,
    quantized_cache_attention_reference,
)
from condfx.ops.masked_ffn import masked_ffn_reference
from condfx.ops.quant_stream import stream_step
from condfx.ops.routed_attention import routed_attention_reference
from condfx.ops.sink_window import sink_window_attention_reference

__all__ = [
    "attention_backward_reference",
    "attention_reference",
    "check_attention_shapes",
    "countdown_masked_ffn_reference",
    "dequantize_reference",
    "fake_quantize_reference",
    "interleaved_attention_reference",
    "kivi_cache_attention_reference",
    "masked_ffn_reference",
    "quantize_reference",
    "quantized_cache_attention_reference",
    "routed_attention_reference",
    "sink_window_attention_reference",
    "stream_step",
]
