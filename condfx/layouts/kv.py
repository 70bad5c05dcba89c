"""Float K/V cache layouts: every position, a sliding window, IHA's pseudo rows, float16 storage."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from condfx.layouts.base import CacheLayout


@dataclass(frozen=True)
class FullKVLayout(CacheLayout):
    """K and V of every position (``condfx.attention`` without a window, the global branch of an
    L2A ``condfx.routed_attention``)."""

    kind: ClassVar[str] = "full"


@dataclass(frozen=True)
class WindowKVLayout(CacheLayout):
    """The last ``window - 1`` positions of a sliding-window ``condfx.attention`` (also the layers
    ``prune-global`` left window-only): bounded memory, so its length is not the position.

    Attributes:
        window_size: the attention's window, >= 1.
    """

    kind: ClassVar[str] = "window"
    window_size: int = 1

    @property
    def window(self) -> int:
        return self.window_size

    @property
    def keeps_every_token(self) -> bool:
        return False

    def stored_tokens(self, tokens: int) -> int:
        return min(tokens, self.window_size - 1)


@dataclass(frozen=True)
class InterleavedKVLayout(CacheLayout):
    """IHA's pseudo-K/V (``condfx.interleaved_attention``): ``pseudo_rows`` rows per token, never
    trimmed (the op's RoPE positions are cache indices).

    Attributes:
        pseudo_rows: P, rows per token, >= 1.
    """

    kind: ClassVar[str] = "interleaved"
    pseudo_rows: int = 1

    @property
    def pseudo(self) -> int:
        return self.pseudo_rows


@dataclass(frozen=True)
class Float16KVLayout(CacheLayout):
    """K and V of every position stored as float16, handed to the graph in its dtype
    (``quantize-kv{method=kivi,bits=16}``)."""

    kind: ClassVar[str] = "float16"

    def storage_dtype(self) -> torch.dtype:
        return torch.float16
