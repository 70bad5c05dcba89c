"""The position layout: no keys or values, only the number of tokens seen, for graphs whose every
attention layer keeps a bounded cache (all sliding-window models: Mistral v0.1, Phi-3 with a window,
Starcoder2).

``add-kv-cache`` reads the absolute position P of the first new token from the cache length of a
layer that keeps every token. When no layer does, it adds this layout after the attention layers:
one empty tensor (B, 0, P, 0) in and (B, 0, P + T, 0) out, whose dim 2 counts the tokens seen. It
holds no bytes; the runtime keeps it like any other cache (``runtime/caches.PositionCache``), and the
bundle manifest lists it among the ``layers`` like any other layout (kind ``"position"``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from condfx.layouts.base import CacheLayout


@dataclass(frozen=True)
class PositionLayout(CacheLayout):
    """An empty (B, 0, P, 0) tensor whose length is the position: ``past_position`` / ``present_position``.

    Attributes:
        layer: index after the last attention layer (it is no attention layer).
        n_kv_heads: 0 (dim 1 of the tensor).
        head_dim: 0 (dim 3 of the tensor).
        dtype: dtype of the empty tensor (float32).
    """

    kind: ClassVar[str] = "position"
    n_kv_heads: int = 0
    head_dim: int = 0
    dtype: torch.dtype = torch.float32

    def io_names(self) -> list[str]:
        return ["position"]

    def length_dims(self) -> list[str]:
        return ["past_position"]

    def empty_past(self, batch: int, device=None, length: int = 0) -> list[torch.Tensor]:
        return [torch.zeros((batch, 0, length, 0), dtype=self.dtype, device=device)]

    def nbytes(self, tokens: int, batch: int = 1) -> int:
        return 0
