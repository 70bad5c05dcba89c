"""The packed quantized-stream layout of ``quantize-kv`` layers (``condfx/ops/quant_stream.py``)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from condfx.layouts.base import CacheLayout
from condfx.ops.kv_quant import quantized_count
from condfx.ops.quant_stream import STREAM_PARTS, StreamSpec, stream_dtypes, stream_shapes


@dataclass(frozen=True)
class StreamsLayout(CacheLayout):
    """A quantized layer's cache: four tensors per stream (packed codes, float16 scale and zero,
    full-precision sink + recent tokens), read and updated by the decode graph itself. KIVI's K and
    V, XQuant's X, SVD latents or KLT runs.

    Attributes:
        stream_specs: the streams, in graph order; the first one's codes + fp give the length.
        window_size: the attention's sliding window (0: full); the streams keep every token unless
            ``ring``.
        ring: a KIVI ring (a windowed ``kivi_cache_attention`` layer without sink): the runtime drops
            whole leading groups of packed tokens the window can no longer see (``stored_tokens``),
            so the cache stays bounded; its length is then not the position.
    """

    kind: ClassVar[str] = "streams"
    stream_specs: tuple[StreamSpec, ...] = ()
    window_size: int = 0
    ring: bool = False

    @property
    def window(self) -> int:
        return self.window_size

    @property
    def streams(self) -> tuple[StreamSpec, ...]:
        return self.stream_specs

    @property
    def keeps_every_token(self) -> bool:
        return not self.ring

    def dropped_tokens(self, tokens: int) -> int:
        """Leading tokens a ring has dropped after ``tokens`` tokens: whole groups of the first
        stream's packed tokens, while window - 1 tokens stay (0 for a stream that is not a ring)."""
        if not self.ring:
            return 0
        first = self.stream_specs[0]
        packed = quantized_count(tokens, first.residual, first.group, first.sink)
        return min(packed, max(0, tokens - (self.window_size - 1))) // first.group * first.group

    def stored_tokens(self, tokens: int) -> int:
        return tokens - self.dropped_tokens(tokens)

    def io_names(self) -> list[str]:
        return [f"{st.name}_{self.layer}_{p}" for st in self.stream_specs for p in STREAM_PARTS]

    def length_inputs(self) -> tuple[int, ...]:
        return (0, 3)  # the first stream's packed codes and full-precision tokens

    def length_dims(self) -> list[str]:
        return [f"past_{n}" for n in self.io_names()]  # every stream tensor has its own length

    def empty_past(self, batch: int, device=None, length: int = 0) -> list[torch.Tensor]:
        return [t for st in self.stream_specs for t in st.empty(batch, self.dtype, device, length)]

    def nbytes(self, tokens: int, batch: int = 1) -> int:
        tokens, total = self.stored_tokens(tokens), 0
        for st in self.stream_specs:
            chunk = st.group if st.dim == -2 else 1
            nq = quantized_count(tokens, st.residual, chunk, st.sink)
            shapes = stream_shapes((batch, st.heads), st.channels, st.bits, st.group, st.dim, nq, tokens - nq)
            for shape, dt in zip(shapes, stream_dtypes(self.dtype, st.bits), strict=True):
                total += math.prod(shape) * torch.empty((), dtype=dt).element_size()
        return total

    def to_json(self) -> dict[str, Any]:
        out = super().to_json()
        out["stream_specs"] = [dataclasses.asdict(st) for st in self.stream_specs]
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> StreamsLayout:
        specs = tuple(StreamSpec(**st) for st in data.get("stream_specs", ()))
        return super().from_json({**data, "stream_specs": specs})
