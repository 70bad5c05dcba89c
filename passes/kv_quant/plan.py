"""The typed plan ``quantize-kv`` attaches to each ``condfx.quantized_cache_attention`` it creates.

``node.meta["condfx_kv_plan"]`` is a ``QuantizedKVPlan``: what the layer quantizes and how its decode
form (``passes/decode/quantized.py``) reads and updates the cache. The decode rule reads this plan;
it never re-recognises the graph. Node references are names (``fx.Node.name``): plans survive the
pipeline's deep copies, nodes do not.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import torch
from torch import fx

from condfx.ops.kv_quant import BITS
from condfx.ops.quant_stream import STREAM_BITS, StreamSpec
from condfx.passes.kv_quant.config import KVQuantMethod, QuantizeKVConfig
from condfx.passes.op_args import op_arg

PLAN_KEY = "condfx_kv_plan"


class DecodeForm(enum.Enum):
    """How ``add-kv-cache`` lowers the layer.

    KIVI: ``condfx.kivi_cache_attention`` over packed K and V streams (plain KIVI, equal bits).
    STREAMS: each planned fake-quantize node becomes a ``condfx.quantized_stream`` and the path from
        it to k̂ / v̂ is re-run over every cached token (XQuant X / SVD / KLT / CL, rotated or
        split-bit KIVI; 16 bits is a float16 stream).
    FLOAT16: a float16 K/V cache (KIVI with 16 bits, no rotation).
    NONE: no decode form (``reason`` says why); add-kv-cache refuses the layer.
    """

    KIVI = "kivi"
    STREAMS = "streams"
    FLOAT16 = "float16"
    NONE = "none"


@dataclass(frozen=True)
class StreamPlan:
    """One packed stream: its spec and the fake-quantize node whose input it caches.

    Attributes:
        spec: the stream (``condfx/ops/quant_stream.py``).
        fq: name of the ``condfx.fake_group_quantize`` node (its input is the stream's tokens).
    """

    spec: StreamSpec
    fq: str


@dataclass(frozen=True)
class QuantizedKVPlan:
    """What ``quantize-kv`` did to one attention layer.

    Attributes:
        layer: the attention region's layer index.
        method: ``kivi``, ``xquant`` or ``xquant-cl``.
        k_bits, v_bits: bits of the K and V streams (X: both the same).
        group, residual, sink: the quantization groups, full-precision window and attention sink.
        rotate: streams quantized in a Hadamard basis.
        form: the decode form (``DecodeForm``).
        streams: the packed streams, in the order their cache tensors appear.
        accumulation: XQuant-CL: name of a_i = a_{i-1} + fq(r_i - a_{i-1}) (None for the first
            layer, whose a_0 is fq(r_0) itself, and for other methods).
        previous: XQuant-CL: name of a_{i-1}, None for the first layer.
        reason: why there is no decode form (``DecodeForm.NONE``).
    """

    layer: int
    method: str
    k_bits: int
    v_bits: int
    group: int
    residual: int
    sink: int
    rotate: bool
    form: DecodeForm
    streams: tuple[StreamPlan, ...] = ()
    accumulation: str | None = None
    previous: str | None = None
    reason: str = ""


def stream_plans(fqs: list[fx.Node], residual: int, one_stream: bool) -> tuple[StreamPlan, ...]:
    """One stream per fake-quantize node the layer got, K streams (per channel, dim -2) first: ``x``
    when the layer caches one stream (X, CL deltas), ``k`` / ``v`` for one node each, else
    ``k0, k1, ..`` / ``v0, ..`` (latent=klt's runs)."""
    keys = [q for q in fqs if op_arg(q, "dim") == -2] if not one_stream else []
    values = [q for q in fqs if q not in keys]
    if one_stream:
        named = [("x", q) for q in fqs]
    elif len(keys) == len(values) == 1:
        named = [("k", keys[0]), ("v", values[0])]
    else:
        named = [(f"{w}{i}", q) for w, side in (("k", keys), ("v", values)) for i, q in enumerate(side)]
    plans = []
    for name, q in named:
        x = op_arg(q, "x").meta["val"]  # (B, T, C), or (B, Hkv, T, D) for KIVI's keys
        heads = int(x.shape[1]) if x.dim() == 4 else 1
        bits, group, dim, sink = (int(op_arg(q, a)) for a in ("bits", "group", "dim", "sink"))
        spec = StreamSpec(name, heads, int(x.shape[-1]), bits, group, dim, residual, sink)
        plans.append(StreamPlan(spec, q.name))
    return tuple(plans)


def _form(cfg: QuantizeKVConfig, bits: tuple[int, int], streams, one_stream: bool) -> tuple[DecodeForm, str]:
    kb, vb = bits
    kivi = cfg.method is KVQuantMethod.KIVI
    if kivi and kb == vb and kb in BITS and not cfg.rotate:
        return DecodeForm.KIVI, ""
    if kivi and kb == vb == 16 and not cfg.rotate:
        return DecodeForm.FLOAT16, ""
    if any(s.spec.bits not in STREAM_BITS for s in streams):
        return DecodeForm.NONE, "an unquantized (32-bit) stream beside quantized ones has no packed form"
    sides = {s.spec.name[0] for s in streams}
    if not (one_stream and len(streams) == 1) and sides != {"k", "v"}:
        return DecodeForm.NONE, "one of K and V is not quantized, so it has no stream to decode from"
    return DecodeForm.STREAMS, ""


def make_plan(cfg: QuantizeKVConfig, layer: int, bits: tuple[int, int], fqs: list[fx.Node],
              accumulators: tuple[fx.Node | None, fx.Node | None], one_stream: bool) -> QuantizedKVPlan:
    """The typed plan of one quantized layer for ``add-kv-cache``.

    Args:
        cfg: the pass's options.
        layer: the region's layer index.
        bits: (K bits, V bits) of the layer.
        fqs: the fake-quantize nodes the layer's strategy created, in graph order.
        accumulators: XQuant-CL's (a_{i-1}, a_i) around this layer (None where there is none).
        one_stream: the layer caches one stream read by both K and V (X, CL).
    """
    streams = stream_plans(fqs, cfg.residual, one_stream)
    form, reason = _form(cfg, bits, streams, one_stream)
    prev, acc = accumulators if cfg.method is KVQuantMethod.XQUANT_CL else (None, None)
    accumulation = acc.name if acc is not None and acc.target is torch.ops.aten.add.Tensor else None
    return QuantizedKVPlan(
        layer, cfg.method.value, bits[0], bits[1], cfg.group, cfg.residual, cfg.sink, cfg.rotate, form,
        streams, accumulation, prev.name if prev is not None else None, reason)
