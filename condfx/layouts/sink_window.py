"""Cache layout of ``condfx.sink_window_attention`` (``sink-window``, StreamingLLM)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from condfx.layouts.base import CacheLayout


@dataclass(frozen=True)
class SinkWindowKVLayout(CacheLayout):
    """K and V of the first ``sink`` positions followed by the last ``window_size - 1``: at most
    sink + window - 1 positions however long the sequence, so its length is not the position.

    Attributes:
        sink: the attention-sink positions kept at the start, >= 0.
        window_size: the attention's window (the step's own token included), >= 1.
    """

    kind: ClassVar[str] = "sink-window"
    sink: int = 0
    window_size: int = 1

    @property
    def window(self) -> int:
        return self.window_size

    @property
    def keeps_every_token(self) -> bool:
        return False

    def stored_tokens(self, tokens: int) -> int:
        return min(tokens, self.sink + self.window_size - 1)
