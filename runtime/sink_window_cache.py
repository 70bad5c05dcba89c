"""``SinkWindowCache``: the bounded cache of a ``sink-window`` layer (StreamingLLM).

It keeps the first ``sink`` positions (the attention sinks) and the last ``window - 1`` positions
in order, sinks first: what ``condfx.sink_window_attention`` reads besides the step's own tokens
(the op takes the first ``sink`` keys as the sinks and aligns the queries to the end of the rest).
Memory is bounded by sink + window - 1 positions however long the generation runs. With a
``storage`` dtype (the layout's ``ring_dtype``: float16 after ``quantize-kv``) the positions are kept
in it and handed to the graph in ``dtype``; the graph rounded them through that dtype itself, so
the round trip changes no value.
"""

from __future__ import annotations

import torch

from condfx.runtime.caches import FullKVCache


class SinkWindowCache(FullKVCache):
    """The first ``sink`` and the last ``window - 1`` positions of K and V (B, Hkv, <= sink + window - 1, D)."""

    def __init__(self, batch: int, n_kv_heads: int, head_dim: int, sink: int, window: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                 storage: torch.dtype | None = None):
        for name, value, low in (("sink", sink, 0), ("window", window, 1)):
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                msg = f"SinkWindowCache.{name} must be an int >= {low}; got {value!r}."
                raise ValueError(msg)
        self.storage = dtype if storage is None else storage
        super().__init__(batch, n_kv_heads, head_dim, dtype, device)
        self.sink, self.window = sink, window

    @classmethod
    def from_layout(cls, layout, batch: int, device: torch.device | str = "cpu") -> SinkWindowCache:
        """The empty cache of a ``SinkWindowKVLayout``."""
        return cls(batch, layout.n_kv_heads, layout.head_dim, layout.sink, layout.window_size,
                   layout.dtype, device, layout.storage_dtype())

    def past(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.k.to(self.dtype), self.v.to(self.dtype)

    def update(self, present_k: torch.Tensor, present_v: torch.Tensor) -> None:
        self.length += self._check(present_k, present_v)
        n, keep = int(present_k.shape[2]), self.window - 1
        if n <= self.sink + keep:
            self._set(present_k, present_v)
            return
        # contiguous copies, so the dropped positions are really freed
        self._set(torch.cat([present_k[:, :, : self.sink], present_k[:, :, n - keep :]], 2),
                  torch.cat([present_v[:, :, : self.sink], present_v[:, :, n - keep :]], 2))

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pk, pv = self.past()
        k_all, v_all = torch.cat([pk, k], 2), torch.cat([pv, v], 2)  # (B, Hkv, P + T, D)
        self.update(k_all, v_all)
        return k_all, v_all

    def _set(self, k: torch.Tensor, v: torch.Tensor) -> None:
        self.k, self.v = k.to(self.storage), v.to(self.storage)

    def reserved_nbytes(self) -> int:
        return self.nbytes()
