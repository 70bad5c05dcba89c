"""The base of every cache layout: what one attention layer's decode-form cache looks like.

A layout is data: the tensors the decode graph takes as ``past_<name>`` and returns as
``present_<name>`` (``io_names``), their empty values (``empty_past``), which of their dims are
dynamic (``length_dims``), how many tokens they hold (``length_inputs`` / ``rows_per_token``), the
exact bytes a cache of this layout holds after a number of tokens (``nbytes``), and its JSON form
(the bundle manifest's ``layers`` entries). Passes write layouts into ``gm.meta["condfx_kv"]``; the
runtime builds one cache per layout through its table (``condfx.runtime.cache_table``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from condfx.ops.quant_stream import StreamSpec


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.float32`` → ``"float32"`` (the manifest's spelling)."""
    return str(dtype).removeprefix("torch.")


def dtype_of(name: str) -> torch.dtype:
    """``"float32"`` → ``torch.float32``; ValueError for a name that is not a torch dtype."""
    value = getattr(torch, str(name), None)
    if not isinstance(value, torch.dtype):
        msg = f"cache layout dtype must name a torch dtype (e.g. 'float32'); got {name!r}."
        raise ValueError(msg)
    return value


@dataclass(frozen=True)
class CacheLayout:
    """One layer's cache in the decode form: plain K and V (B, Hkv, P, D), one past length.

    Subclasses add their own fields and override what differs. Every layout answers ``window``
    (0 unless it keeps a sliding window), ``streams`` (() unless quantized) and ``pseudo`` (1 unless
    it keeps several rows per token), so code reading ``gm.meta["condfx_kv"]`` needs no type test.

    Attributes:
        layer: index of the cached attention op in graph order.
        n_kv_heads: key/value heads (dim 1 of past/present).
        head_dim: dim 3 of past/present.
        dtype: dtype of the graph's k/v.
    """

    kind: ClassVar[str] = ""
    layer: int
    n_kv_heads: int
    head_dim: int
    dtype: torch.dtype

    @property
    def window(self) -> int:
        """The sliding window the cache keeps, 0 when it keeps every position."""
        return 0

    @property
    def streams(self) -> tuple[StreamSpec, ...]:
        """The packed quantized streams of the cache; () for plain tensors."""
        return ()

    @property
    def pseudo(self) -> int:
        """Cache rows per token (IHA's pseudo-tokens); 1 otherwise."""
        return 1

    @property
    def keeps_every_token(self) -> bool:
        """True when the cache's length is the number of tokens seen (a position source)."""
        return True

    @property
    def rows_per_token(self) -> int:
        """Rows along dim 2 of the length inputs per token."""
        return self.pseudo

    def io_names(self) -> list[str]:
        """Names of the layer's cache tensors after ``past_`` / ``present_``, in graph order."""
        return [f"k_{self.layer}", f"v_{self.layer}"]

    def length_inputs(self) -> tuple[int, ...]:
        """Indices (into ``io_names``) of the tensors whose dim-2 sizes add up to the rows held."""
        return (0,)

    def length_dims(self) -> list[str]:
        """The name of dim 2 (the dynamic length) of each cache tensor; equal names are one size."""
        return [f"past_{self.layer}"] * 2

    def empty_past(self, batch: int, device=None, length: int = 0) -> list[torch.Tensor]:
        """The layer's decode-graph inputs for an empty cache (``length`` > 0: example sizes)."""
        shape = (batch, self.n_kv_heads, length * self.rows_per_token, self.head_dim)  # (B, Hkv, P, D)
        return [torch.zeros(shape, dtype=self.dtype, device=device) for _ in range(2)]

    def stored_tokens(self, tokens: int) -> int:
        """Tokens the cache holds after ``tokens`` tokens were processed."""
        return tokens

    def storage_dtype(self) -> torch.dtype:
        """dtype the cache keeps its K and V in."""
        return self.dtype

    def nbytes(self, tokens: int, batch: int = 1) -> int:
        """Exact bytes the cache holds after ``tokens`` tokens (what ``LayerCache.nbytes`` reports)."""
        rows = self.stored_tokens(tokens) * self.rows_per_token
        item = torch.empty((), dtype=self.storage_dtype()).element_size()
        return 2 * batch * self.n_kv_heads * rows * self.head_dim * item

    def to_json(self) -> dict[str, Any]:
        """The manifest entry: ``kind`` plus every field (dtype as its name)."""
        out: dict[str, Any] = {"kind": self.kind}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = dtype_name(value) if isinstance(value, torch.dtype) else value
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> CacheLayout:
        """The layout of a manifest entry written by ``to_json`` (``kind`` already matched)."""
        names = {f.name for f in dataclasses.fields(cls)}
        fields = {k: v for k, v in data.items() if k in names}
        fields["dtype"] = dtype_of(fields["dtype"])
        return cls(**fields)
