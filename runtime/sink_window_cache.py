"""``SinkWindowCache``: the bounded cache of a ``sink-window`` layer (StreamingLLM).

It keeps the first ``sink`` positions (the attention sinks) and the last ``window - 1`` positions
in order, sinks first: what ``condfx.sink_window_attention`` reads besides the step's own tokens
(the op takes the first ``sink`` keys as the sinks and aligns the queries to the end of the rest).
Memory is bounded by sink + window - 1 positions however long the generation runs.
"""

from __future__ import annotations

import torch

from condfx.runtime.caches import FullKVCache


class SinkWindowCache(FullKVCache):
    """The first ``sink`` and the last ``window - 1`` positions of K and V (B, Hkv, <= sink + window - 1, D)."""

    def __init__(self, batch: int, n_kv_heads: int, head_dim: int, sink: int, window: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        for name, value, low in (("sink", sink, 0), ("window", window, 1)):
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                msg = f"SinkWindowCache.{name} must be an int >= {low}; got {value!r}."
                raise ValueError(msg)
        super().__init__(batch, n_kv_heads, head_dim, dtype, device)
        self.sink, self.window = sink, window

    @classmethod
    def from_layout(cls, layout, batch: int, device: torch.device | str = "cpu") -> SinkWindowCache:
        """The empty cache of a ``SinkWindowKVLayout``."""
        return cls(batch, layout.n_kv_heads, layout.head_dim, layout.sink, layout.window_size,
                   layout.dtype, device)

    def update(self, present_k: torch.Tensor, present_v: torch.Tensor) -> None:
        self.length += self._check(present_k, present_v)
        n, keep = int(present_k.shape[2]), self.window - 1
        if n <= self.sink + keep:
            self.k, self.v = present_k, present_v
            return
        # contiguous copies, so the dropped positions are really freed
        self.k = torch.cat([present_k[:, :, : self.sink], present_k[:, :, n - keep :]], 2)
        self.v = torch.cat([present_v[:, :, : self.sink], present_v[:, :, n - keep :]], 2)
