"""The pass registry: one explicit, read-only mapping from kebab-case name to pass class.

Adding a pass is one line in ``PASSES``. There are no decorators and no import-time registration;
tests that need extra passes build their own mapping and hand it to ``pipeline.apply(registry=...)``.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from types import MappingProxyType

from condfx.passes.add_kv_cache import AddKVCache
from condfx.passes.base import Pass
from condfx.passes.fold_interleave import FoldInterleave
from condfx.passes.fuse_attention import FuseAttention
from condfx.passes.interleave_heads import InterleaveHeads
from condfx.passes.prune_global import PruneGlobal
from condfx.passes.quantize_kv import QuantizeKV
from condfx.passes.route_attention import RouteAttention
from condfx.passes.sink_window import SinkWindow
from condfx.passes.skip_ffn import SkipFFN

PASSES: Mapping[str, type[Pass]] = MappingProxyType(
    {
        FuseAttention.name: FuseAttention,
        AddKVCache.name: AddKVCache,
        SkipFFN.name: SkipFFN,
        InterleaveHeads.name: InterleaveHeads,
        FoldInterleave.name: FoldInterleave,
        QuantizeKV.name: QuantizeKV,
        RouteAttention.name: RouteAttention,
        PruneGlobal.name: PruneGlobal,
        SinkWindow.name: SinkWindow,
    }
)


def get_pass_class(name: str, registry: Mapping[str, type[Pass]] | None = None) -> type[Pass]:
    """Looks up a pass class by name.

    Args:
        name: the kebab-case pass name, e.g. ``"fuse-attention"``.
        registry: the mapping to search; defaults to ``PASSES``.

    Returns:
        The pass class.

    Raises:
        ValueError: no pass has that name; the message lists the known passes and the closest match.
    """
    registry = PASSES if registry is None else registry
    if name in registry:
        return registry[name]
    close = difflib.get_close_matches(name, list(registry), n=1)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    msg = f"Unknown pass '{name}'; known passes: {', '.join(sorted(registry))}.{hint}"
    raise ValueError(msg)
