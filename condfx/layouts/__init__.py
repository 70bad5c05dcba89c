"""Cache layouts as data: one frozen dataclass per kind of decode-form cache, and their table.

Layer order: ``condfx.ops`` ← ``condfx.layouts`` ← patterns ← passes ← codegen / runtime ← API. A pass
(``add-kv-cache``, through each op's decode rule) writes one layout per cached attention layer into
``gm.meta["condfx_kv"]``; the exporter serialises them (``to_json``) as the bundle manifest's
``layers``; the torch and ONNX Runtime sessions both build their caches from them through
``condfx.runtime.cache_table.CACHES``. A new kind of cache is one new dataclass plus one line in
``LAYOUTS`` (and one line in the runtime's table).
"""

from __future__ import annotations

from types import MappingProxyType
from typing import Any

from torch import fx

from condfx.layouts.base import CacheLayout, dtype_name, dtype_of
from condfx.layouts.kv import Float16KVLayout, FullKVLayout, InterleavedKVLayout, WindowKVLayout
from condfx.layouts.position import PositionLayout
from condfx.layouts.sink_window import SinkWindowKVLayout
from condfx.layouts.streams import StreamsLayout
from condfx.ops.quant_stream import StreamSpec

LAYOUTS = MappingProxyType({
    FullKVLayout.kind: FullKVLayout,
    WindowKVLayout.kind: WindowKVLayout,
    InterleavedKVLayout.kind: InterleavedKVLayout,
    Float16KVLayout.kind: Float16KVLayout,
    StreamsLayout.kind: StreamsLayout,
    SinkWindowKVLayout.kind: SinkWindowKVLayout,
    PositionLayout.kind: PositionLayout,
})

META_KEY = "condfx_kv"


def layout_from_json(data: dict[str, Any], written_by: str | None = None) -> CacheLayout:
    """The layout of one manifest ``layers`` entry, through ``LAYOUTS``.

    Args:
        data: the entry (``CacheLayout.to_json``).
        written_by: the condfx version that wrote the manifest (for the error message).

    Raises:
        ValueError: an unknown kind (a bundle from a newer condfx) or a malformed entry.
    """
    kind = data.get("kind") if isinstance(data, dict) else None
    cls = LAYOUTS.get(kind)
    if cls is None:
        known = ", ".join(LAYOUTS)
        msg = (f"cache layout kind {kind!r} (written by condfx {written_by or 'unknown'}) is not one "
               f"this condfx knows ({known}); open the bundle with that condfx or export it again.")
        raise ValueError(msg)
    try:
        return cls.from_json(data)
    except (TypeError, KeyError) as exc:
        msg = f"cache layout entry {data!r} of kind {kind!r} is malformed ({exc})."
        raise ValueError(msg) from None


def decode_layouts(gm: fx.GraphModule) -> tuple[CacheLayout, ...]:
    """The layouts ``add-kv-cache`` recorded on ``gm`` (``gm.meta["condfx_kv"]``); () when none."""
    return tuple(gm.meta.get(META_KEY, ()))


def is_decode_form(gm: fx.GraphModule) -> bool:
    """True when ``gm`` is a decode-form graph: it has layouts and takes their first past input."""
    layouts = decode_layouts(gm)
    if not layouts:
        return False
    first = f"past_{layouts[0].io_names()[0]}"
    return any(n.op == "placeholder" and n.name == first for n in gm.graph.nodes)


__all__ = [
    "LAYOUTS", "META_KEY", "CacheLayout", "Float16KVLayout", "FullKVLayout", "InterleavedKVLayout",
    "PositionLayout", "StreamSpec", "StreamsLayout", "WindowKVLayout", "decode_layouts", "dtype_name", "dtype_of",
    "is_decode_form", "layout_from_json",
]
