"""Cache layout of ``condfx.sink_window_attention`` (``sink-window``, StreamingLLM)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from condfx.layouts.base import dtype_of
from condfx.layouts.kv import WindowKVLayout


@dataclass(frozen=True)
class SinkWindowKVLayout(WindowKVLayout):
    """A sliding window that also keeps the first ``sink`` positions: at most sink + window - 1
    positions however long the sequence, so its length is not the position.

    Attributes:
        window_size: the attention's window (the step's own token included), >= 1.
        sink: the attention-sink positions kept at the start, >= 0.
        ring_dtype: the dtype the cache stores its positions in ("float16" when ``quantize-kv``
            rounded the op's k/v through float16), handed to the graph as ``dtype``; "" is ``dtype``.
    """

    kind: ClassVar[str] = "sink-window"
    sink: int = 0
    ring_dtype: str = ""

    def storage_dtype(self) -> torch.dtype:
        return dtype_of(self.ring_dtype) if self.ring_dtype else self.dtype

    def stored_tokens(self, tokens: int) -> int:
        return min(tokens, self.sink + self.window_size - 1)
