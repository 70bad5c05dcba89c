"""The runtime's one table from cache layout to cache class, and ``make_cache``.

``condfx.layouts`` says what a layer's decode-form cache looks like; this table says which
``LayerCache`` keeps it between calls. The torch ``Session`` and the ONNX Runtime backend both build
their caches here, from the same layouts (``gm.meta["condfx_kv"]`` or the bundle manifest), so the
two hold the same tensors and report the same bytes. A new cache kind is one line here.
"""

from __future__ import annotations

from types import MappingProxyType

import torch

from condfx.layouts import (
    CacheLayout,
    Float16KVLayout,
    FullKVLayout,
    InterleavedKVLayout,
    PositionLayout,
    StreamsLayout,
    WindowKVLayout,
)
from condfx.layouts.sink_window import SinkWindowKVLayout
from condfx.runtime.caches import (
    FullKVCache,
    InterleavedKVCache,
    LayerCache,
    PositionCache,
    SlidingWindowCache,
)
from condfx.runtime.quant_caches import Float16KVCache, GraphStreamCache
from condfx.runtime.sink_window_cache import SinkWindowCache

CACHES = MappingProxyType({
    FullKVLayout: FullKVCache,
    WindowKVLayout: SlidingWindowCache,
    InterleavedKVLayout: InterleavedKVCache,
    Float16KVLayout: Float16KVCache,
    StreamsLayout: GraphStreamCache,
    SinkWindowKVLayout: SinkWindowCache,
    PositionLayout: PositionCache,
})


def make_cache(layout: CacheLayout, batch: int, device: torch.device | str = "cpu") -> LayerCache:
    """The empty cache of one layer, chosen by the layout's class through ``CACHES``.

    Raises:
        ValueError: a layout class without a cache in the table.
    """
    cls = CACHES.get(type(layout))
    if cls is None:
        known = ", ".join(sorted(c.__name__ for c in CACHES))
        msg = f"no runtime cache for layout {type(layout).__name__} (kind {layout.kind!r}); known: {known}."
        raise ValueError(msg)
    return cls.from_layout(layout, batch, device)
