"""Typed per-layer caches for the decode form of a graph (``add-kv-cache``).

The decode graph takes ``past_k_i, past_v_i`` (B, Hkv, P, D) and returns ``present_k_i, present_v_i``
(B, Hkv, P + T, D) = the past concatenated with the new keys and values. A layer cache decides what
it keeps of ``present`` and what it hands back as the next ``past``:

    past() -> (k, v)           what the graph reads next step
    update(present_k, present_v)   what the graph returned (past + new), kept by the cache's policy
    append(k, v) -> (k_all, v_all) the eager form for code that is not a graph: new keys in, all out

Kinds (TECHNIQUES.md section 8, item 3, "runtime state schema"):
    * ``FullKVCache`` (here): everything, fp32/fp16 as the graph produces it.
    * ``SlidingWindowCache`` (here): the last ``window - 1`` positions, in order, for layers whose
      ``condfx.attention`` has ``window > 0``. The op aligns queries to the end of the keys, so the
      kept keys must stay in position order; trimming by slicing keeps them so (a ring buffer with a
      rotating start would need a gather first). Memory is bounded by the window.
    * ``PositionCache`` (here): no keys or values, only the token count (an empty (B, 0, P, 0)
      tensor), for graphs whose every layer keeps a bounded cache (``condfx.layouts.PositionLayout``).
    * ``GraphStreamCache`` (``runtime/quant_caches.py``; KIVI and XQuant): the packed codes, float16
      scales and zero points and full-precision tail of each stream, which the decode graph reads
      and updates itself; ``KIVICache`` / ``XQuantCache`` there keep the same policies eagerly.
  Growth in place (``grow_in_place``, which the torch Session sets): ``FullKVCache`` (and
  ``InterleavedKVCache``) keep K and V in *arenas*, buffers
  (B, Hkv, capacity, D) of which ``past()`` is the valid prefix (a view, no copy). The torch
  Session's decode graph appends through ``append_kv`` instead of ``cat``: when the past is the
  prefix of an arena with room it writes the new positions into the arena and returns the longer
  prefix, so a decode step copies T positions, not P + T. Capacity grows by doubling (at least
  ``MIN_CAPACITY``, at most ``capacity_limit``: the Session's ``max_seq_len``), so the copies of a
  whole generation are O(length) and at most half an arena is spare. Any other past (a reordered cache, an ONNX tensor, a caller's own) is concatenated as before.
  Every cache reports ``nbytes()``: the bytes of every tensor it holds, metadata included, equal to
  its layout's ``nbytes(length)``. Which cache a layer gets is ``runtime/cache_table.py``'s table
  ``{layout class: cache class}``; each cache class builds itself with ``from_layout``.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from typing import Any

import torch

MIN_CAPACITY = 256
_ARENA_FLAG = "_condfx_kv_arena"


def _arena_of(past: torch.Tensor) -> torch.Tensor | None:
    """The arena whose valid prefix ``past`` is, or None when ``past`` is any other tensor."""
    base = past._base
    if base is None or not getattr(base, _ARENA_FLAG, False):
        return None
    same = (
        past.data_ptr() == base.data_ptr()
        and past.stride() == base.stride()
        and past.shape[:2] == base.shape[:2]
        and past.shape[3:] == base.shape[3:]
    )
    return base if same else None


def to_arena(x: torch.Tensor, limit: int | None = None) -> torch.Tensor:
    """``x`` (B, H, N, D) copied into a fresh arena with room to grow (up to ``limit`` positions when
    given, e.g. the model's context); returns its valid prefix."""
    n = int(x.shape[2])
    capacity = max(MIN_CAPACITY, 1 << max(n - 1, 0).bit_length())  # the power of two >= n
    capacity = capacity if limit is None else max(n, min(capacity, limit))
    arena = x.new_empty((*x.shape[:2], capacity, *x.shape[3:]))
    setattr(arena, _ARENA_FLAG, True)
    arena[:, :, :n].copy_(x)
    return arena[:, :, :n]


def is_arena_prefix(x: torch.Tensor) -> bool:
    """Whether ``x`` is the valid prefix of an arena (``append_kv`` can grow it in place)."""
    return _arena_of(x) is not None


def append_kv(past: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    """``cat([past, new], 2)``, written in place when ``past`` is the valid prefix of an arena with
    room for ``new``; then the result is the arena's longer prefix and ``past`` is left unchanged."""
    arena = _arena_of(past)
    p, t = int(past.shape[2]), int(new.shape[2])
    fits = (
        arena is not None
        and p + t <= arena.shape[2]
        and new.dtype == arena.dtype
        and new.shape[:2] == past.shape[:2]
        and new.shape[3:] == past.shape[3:]
    )
    if not fits:
        return torch.cat([past, new], 2)
    arena[:, :, p : p + t].copy_(new)
    return arena[:, :, : p + t]


class LayerCache(abc.ABC):
    """The state one attention layer carries between decode steps.

    Attributes:
        io_tensors: tensors the layer has among the decode graph's pasts (and presents): 2 (K, V)
            here; a cache whose graph reads a packed form (``GraphStreamCache``: 4 per stream) overrides it.
        length: positions processed so far (the absolute position of the next token), which can be
            larger than the number of positions stored (``stored``) for bounded caches.
    """

    io_tensors: int = 2

    def __init__(
        self,
        batch: int,
        n_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
    ):
        self.batch, self.n_kv_heads, self.head_dim = batch, n_kv_heads, head_dim
        self.dtype, self.device = dtype, torch.device(device)
        self.length = 0

    def _empty(self) -> torch.Tensor:
        shape = (self.batch, self.n_kv_heads, 0, self.head_dim)  # (B, Hkv, 0, D)
        return torch.zeros(shape, dtype=self.dtype, device=self.device)

    @abc.abstractmethod
    def past(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The keys and values (B, Hkv, P, D) the decode graph reads next."""

    @abc.abstractmethod
    def update(self, present_k: torch.Tensor, present_v: torch.Tensor) -> None:
        """Takes the graph's present (past + T new positions) and keeps what the policy says."""

    @abc.abstractmethod
    def nbytes(self) -> int:
        """Bytes of every tensor the cache holds."""

    @property
    def stored(self) -> int:
        """Positions held (dim 2 of ``past()``)."""
        return int(self.past()[0].shape[2])

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Appends new keys/values (B, Hkv, T, D); returns past + new, as attention should read them."""
        pk, pv = self.past()
        k_all, v_all = torch.cat([pk, k], 2), torch.cat([pv, v], 2)  # (B, Hkv, P + T, D)
        self.update(k_all, v_all)
        return k_all, v_all

    def reset(self, batch: int | None = None) -> None:
        """Empties the cache, optionally for a new batch size."""
        self.batch = self.batch if batch is None else batch
        self.length = 0
        self._set(self._empty(), self._empty())

    def reorder(self, index: torch.Tensor) -> None:
        """Keeps batch rows ``index`` (in that order): beam reordering or dropping finished rows."""
        k, v = self.past()
        index = index.to(k.device)
        self.batch = int(index.numel())
        self._set(k.index_select(0, index), v.index_select(0, index))

    @abc.abstractmethod
    def _set(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Replaces the stored tensors (used by reset and reorder)."""

    def _check(self, present_k: torch.Tensor, present_v: torch.Tensor) -> int:
        """Validates a present against the cache; returns the number of new positions."""
        new = int(present_k.shape[2]) - self.stored
        ok = (
            present_k.shape == present_v.shape
            and tuple(present_k.shape[:2]) == (self.batch, self.n_kv_heads)
            and present_k.shape[3] == self.head_dim
            and new >= 0
        )
        if not ok:
            msg = (
                f"{type(self).__name__}.update: present must be (B={self.batch}, "
                f"Hkv={self.n_kv_heads}, >= {self.stored}, D={self.head_dim}) for k and v; got "
                f"{tuple(present_k.shape)} and {tuple(present_v.shape)}."
            )
            raise ValueError(msg)
        return new


class FullKVCache(LayerCache):
    """Every position's K and V. With ``grow_in_place`` (the torch Session sets it when its decode
    graph appends through ``append_kv``) they live in arenas (see the module docstring): ``update``
    keeps a present that is already an arena prefix without copying and copies any other present
    (a prefill through ``cat``, an arena that was full) into a new arena. Without it (the default,
    and the ONNX Runtime backend, whose presents are fresh contiguous arrays) ``update`` keeps the
    present as it is."""

    grow_in_place: bool = False
    capacity_limit: int | None = None  # the most positions an arena reserves (the Session's max_seq_len)

    def __init__(
        self,
        batch: int,
        n_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ):
        super().__init__(batch, n_kv_heads, head_dim, dtype, device)
        self.k, self.v = self._empty(), self._empty()

    @classmethod
    def from_layout(cls, layout, batch: int, device: torch.device | str = "cpu") -> FullKVCache:
        """The empty cache of a ``condfx.layouts`` layout (``cache_table.make_cache`` calls this)."""
        return cls(batch, layout.n_kv_heads, layout.head_dim, layout.dtype, device)

    def past(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.k, self.v

    def update(self, present_k: torch.Tensor, present_v: torch.Tensor) -> None:
        self.length += self._check(present_k, present_v)
        self._keep(present_k, present_v)

    def _keep(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Stores k and v: as they are, or as arena prefixes when the cache grows in place (no copy
        when they already are)."""
        if not self.grow_in_place:
            self.k, self.v = k, v
            return
        self.k = k if is_arena_prefix(k) else to_arena(k, self.capacity_limit)
        self.v = v if is_arena_prefix(v) else to_arena(v, self.capacity_limit)

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        k_all, v_all = append_kv(self.k, k), append_kv(self.v, v)  # (B, Hkv, P + T, D)
        self.update(k_all, v_all)
        return k_all, v_all

    def reserved_nbytes(self) -> int:
        """Bytes of the arenas (stored positions plus the room to grow)."""
        return sum(t._base.nbytes if is_arena_prefix(t) else t.nbytes for t in (self.k, self.v))

    def _set(self, k: torch.Tensor, v: torch.Tensor) -> None:
        self.k, self.v = k, v

    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes


class SlidingWindowCache(FullKVCache):
    """The last ``window - 1`` positions in order: all a ``window``-wide attention reads besides
    the new token itself, so the memory is bounded by the window, not the sequence."""

    def __init__(
        self,
        batch: int,
        n_kv_heads: int,
        head_dim: int,
        window: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ):
        if not isinstance(window, int) or isinstance(window, bool) or window < 1:
            msg = f"SlidingWindowCache.window must be a positive int; got {window!r}."
            raise ValueError(msg)
        super().__init__(batch, n_kv_heads, head_dim, dtype, device)
        self.window = window

    @classmethod
    def from_layout(cls, layout, batch: int, device: torch.device | str = "cpu") -> SlidingWindowCache:
        return cls(batch, layout.n_kv_heads, layout.head_dim, layout.window, layout.dtype, device)

    def update(self, present_k: torch.Tensor, present_v: torch.Tensor) -> None:
        self.length += self._check(present_k, present_v)
        keep = self.window - 1
        start = max(0, int(present_k.shape[2]) - keep)
        # contiguous copies, so the dropped positions are really freed
        self.k = present_k[:, :, start:].contiguous()  # (B, Hkv, <= W - 1, D)
        self.v = present_v[:, :, start:].contiguous()


class InterleavedKVCache(FullKVCache):
    """The pseudo-K/V of an IHA layer (``condfx.interleaved_attention``): ``pseudo`` rows per token,
    so P times the bytes of a full KV cache. Never trimmed: the op takes RoPE positions from the row
    index. ``length`` counts tokens, not rows."""

    def __init__(
        self,
        batch: int,
        n_kv_heads: int,
        head_dim: int,
        pseudo: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ):
        if not isinstance(pseudo, int) or isinstance(pseudo, bool) or pseudo < 1:
            msg = f"InterleavedKVCache.pseudo must be a positive int; got {pseudo!r}."
            raise ValueError(msg)
        super().__init__(batch, n_kv_heads, head_dim, dtype, device)
        self.pseudo = pseudo

    @classmethod
    def from_layout(cls, layout, batch: int, device: torch.device | str = "cpu") -> InterleavedKVCache:
        return cls(batch, layout.n_kv_heads, layout.head_dim, layout.pseudo, layout.dtype, device)

    def update(self, present_k: torch.Tensor, present_v: torch.Tensor) -> None:
        new = self._check(present_k, present_v)
        if new % self.pseudo:
            msg = f"InterleavedKVCache.update: {new} new rows are not a multiple of pseudo={self.pseudo}."
            raise ValueError(msg)
        self.length += new // self.pseudo
        self._keep(present_k, present_v)


class PositionCache(LayerCache):
    """The token count of a graph whose every attention layer keeps a bounded cache
    (``condfx.layouts.PositionLayout``): one empty (B, 0, P, 0) tensor whose dim 2 is the position.
    It holds no bytes."""

    io_tensors: int = 1

    def __init__(self, batch: int, device: torch.device | str = "cpu"):
        super().__init__(batch, 0, 0, torch.float32, device)
        self.position = self._empty()

    @classmethod
    def from_layout(cls, layout, batch: int, device: torch.device | str = "cpu") -> PositionCache:
        """The empty position cache (``cache_table.make_cache`` calls this)."""
        return cls(batch, device)

    def past(self) -> tuple[torch.Tensor]:
        return (self.position,)

    def update(self, present: torch.Tensor) -> None:
        new = int(present.shape[2]) - self.stored
        if tuple(present.shape) != (self.batch, 0, self.stored + new, 0) or new < 0:
            msg = (f"PositionCache.update: present must be (B={self.batch}, 0, >= {self.stored}, 0); "
                   f"got {tuple(present.shape)}.")
            raise ValueError(msg)
        self.length += new
        self.position = present

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Not an attention layer: there are no keys or values to append."""
        msg = "PositionCache holds no keys or values; append them to an attention layer's cache."
        raise TypeError(msg)

    def reset(self, batch: int | None = None) -> None:
        self.batch = self.batch if batch is None else batch
        self.length = 0
        self.position = self._empty()

    def reorder(self, index: torch.Tensor) -> None:
        index = index.to(self.position.device)
        self.batch = int(index.numel())
        self.position = self.position.index_select(0, index)

    def _set(self, k: torch.Tensor, v: torch.Tensor) -> None:
        self.position = k

    def nbytes(self) -> int:
        return 0


def row_index(index: Any, batch: int, who: str) -> torch.Tensor:
    """``index`` as a (B',) int64 tensor of rows in ``[0, batch)``; ValueError (naming ``who``) otherwise."""
    if isinstance(index, (list, tuple)) and all(isinstance(i, int) and not isinstance(i, bool) for i in index):
        rows = list(index)
    elif isinstance(index, torch.Tensor) and index.dim() == 1 and index.dtype in (torch.int64, torch.int32):
        rows = index.tolist()
    else:
        got = f"shape {tuple(index.shape)} {index.dtype}" if isinstance(index, torch.Tensor) else repr(index)
        msg = f"{who} needs a non-empty 1-D integer index of rows; got {got}."
        raise ValueError(msg)
    if not rows:
        msg = f"{who} needs a non-empty 1-D integer index of rows; got no rows."
        raise ValueError(msg)
    bad = next((r for r in rows if not 0 <= r < batch), None)
    if bad is not None:
        msg = f"{who}: row {bad} is outside the batch of {batch} rows [0, {batch - 1}]."
        raise ValueError(msg)
    return torch.tensor(rows, dtype=torch.long)


class CacheSet:
    """One cache per attention layer, in graph order, plus byte accounting.

    Args:
        caches: the per-layer caches.
    """

    def __init__(self, caches: Sequence[LayerCache]):
        self.caches = list(caches)

    def __len__(self) -> int:
        return len(self.caches)

    def __getitem__(self, i: int) -> LayerCache:
        return self.caches[i]

    @property
    def length(self) -> int:
        """Positions processed so far (every layer sees the same tokens)."""
        return self.caches[0].length if self.caches else 0

    def past(self) -> list[torch.Tensor]:
        """The flat decode-graph inputs: past_k_0, past_v_0, past_k_1, ..."""
        return [t for c in self.caches for t in c.past()]

    def update(self, presents: Sequence[torch.Tensor]) -> None:
        """Takes the flat decode-graph outputs after the logits: present_k_0, present_v_0, ..."""
        want = sum(c.io_tensors for c in self.caches)
        if len(presents) != want:
            msg = f"CacheSet.update needs {want} present tensors; got {len(presents)}."
            raise ValueError(msg)
        start = 0
        for cache in self.caches:
            cache.update(*presents[start : start + cache.io_tensors])
            start += cache.io_tensors

    def reset(self, batch: int | None = None) -> None:
        """Empties every cache, optionally for a new batch size."""
        for cache in self.caches:
            cache.reset(batch)

    def reorder(self, index: torch.Tensor | Sequence[int], *, who: str = "CacheSet.reorder") -> None:
        """Keeps batch rows ``index`` in every cache, in that order.

        The index is checked before any cache changes (``row_index``; its errors name ``who``), so a
        bad one leaves every layer as it was rather than some reordered and some not.
        """
        index = row_index(index, self.caches[0].batch if self.caches else 0, who)
        for cache in self.caches:
            cache.reorder(index)

    def nbytes(self) -> int:
        """Total bytes held by every layer."""
        return sum(self.nbytes_per_layer())

    def nbytes_per_layer(self) -> list[int]:
        """Bytes held by each layer, in layer order."""
        return [c.nbytes() for c in self.caches]

    def table(self) -> str:
        """A markdown table: layer, cache kind, positions stored / seen, bytes."""
        lines = ["| layer | cache | stored | seen | bytes |", "|---|---|---:|---:|---:|"]
        for i, c in enumerate(self.caches):
            lines.append(f"| {i} | {type(c).__name__} | {c.stored} | {c.length} | {c.nbytes()} |")
        lines.append(f"| total | | | | {self.nbytes()} |")
        return "\n".join(lines)
