"""Quantized per-layer caches: KIVI (packed K per channel, V per token) and XQuant (packed X or
SVD latents, K/V rematerialised on read), each with a full-precision residual window.

Storage (TECHNIQUES.md section 8, item 3): a ``QuantizedStream`` holds a stream (..., N, C) as
    packed codes (..., Nq, C * bits / 8) uint8, scale and zero (float16; (..., Nq, C / group) per
    token or (..., Nq / group, C) per channel), and the first ``sink`` tokens (the attention sink)
    followed by a tail, (..., N - Nq, C) in full precision: the four tensors of
    ``condfx/ops/quant_stream.py``, appended to and read with its ``stream_append`` / ``stream_read``,
with Nq = ``quantized_count(N, residual, chunk, sink)`` (``condfx.ops.kv_quant``): tokens leave the tail in
whole chunks once they are ``residual`` tokens old; chunk = group for per-channel streams (KIVI keys,
groups along tokens), 1 for per-token streams. This is the policy ``condfx::quantized_cache_attention``
simulates, so a teacher-forced forward of a ``quantize-kv`` graph sees what these caches return.
``nbytes()`` is the bytes of every tensor held: codes, scales, zero points, sink and tail.

    * ``GraphStreamCache`` (a ``LayerCache``): what the Session uses for ``quantize-kv`` layers
      (KIVI and XQuant). Their decode graph reads and updates the packed streams itself
      (``condfx::kivi_cache_attention`` / ``condfx::quantized_stream``), so the cache only carries
      the integer and float16 tensors between calls, in PyTorch and ONNX Runtime alike.
    * ``KIVICache`` (a ``LayerCache``): the same KIVI policy kept by Python code around a float
      decode graph: ``past()`` returns the dequantized K/V followed by the tail, ``update``
      quantizes what left the window (eager use and ``benchmarks/kv_quant_speed.py``).
    * ``XQuantCache``: one or two streams of X (MHA) or latents X·U (GQA); ``keys(positions)`` and
      ``values()`` rematerialise K = RoPE(X̂·B_k) at the absolute positions and V = X̂·B_v.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from condfx.ops.kivi_cache import kivi_attend
from condfx.ops.kv_quant import BITS, check_quant_args, to_float16
from condfx.ops.quant_stream import empty_stream, stream_append, stream_read
from condfx.runtime.caches import FullKVCache, LayerCache


class QuantizedStream:
    """A growing stream (..., N, C) kept as packed codes plus a full-precision tail.

    Args:
        lead: the leading dims, e.g. (B, Hkv) or (B,).
        channels: C.
        bits: 2, 3 or 4; 16 / 32 keep every token in float16 / float32 (nothing packed).
        group: values per scale/zero.
        dim: -1 per token (groups along C), -2 per channel (groups of ``group`` tokens).
        residual: tokens kept in the full-precision window, >= 0.
        dtype: dtype of the tail and of what ``read`` returns.
    """

    def __init__(self, lead, channels, bits, group, dim, residual, dtype=torch.float32, device="cpu",
                 sink=0):
        if bits in BITS:
            check_quant_args(bits, group, dim, channels, None)
        elif bits not in (16, 32):
            msg = f"QuantizedStream.bits must be one of {BITS + (16, 32)}; got {bits!r}."
            raise ValueError(msg)
        self.lead, self.channels, self.bits, self.group, self.dim = tuple(lead), channels, bits, group, dim
        self.residual, self.dtype, self.device = residual, dtype, torch.device(device)
        self.sink = sink
        self.chunk = group if dim == -2 else 1
        self.clear()

    def clear(self) -> None:
        """Drops every token."""
        fp_dtype = torch.float16 if self.bits == 16 else self.dtype
        self.codes, self.scale, self.zero, self.fp = empty_stream(
            self.lead, self.channels, self.bits, self.group, self.dim, fp_dtype, self.device)

    @property
    def quantized(self) -> int:
        """Tokens held as codes."""
        return int(self.codes.shape[-2])

    @property
    def head(self) -> torch.Tensor:
        """The first ``sink`` tokens, never quantized."""
        return self.fp[..., : self.sink, :]

    def __len__(self) -> int:
        return self.quantized + int(self.fp.shape[-2])

    def append(self, x: torch.Tensor) -> None:
        """Appends (..., T, C) tokens; quantizes the ones that left the residual window."""
        if self.bits not in BITS:
            self.fp = torch.cat([self.fp, x.to(self.fp.dtype)], -2)
            return
        quant = (self.bits, self.group, self.dim, self.residual, self.sink)
        self.codes, self.scale, self.zero, self.fp = stream_append(*self._tensors(), x, *quant)

    def read(self) -> torch.Tensor:
        """(..., N, C): the sink, the dequantized tokens, then the tail, in ``dtype``."""
        if self.bits not in BITS:
            return self.fp.to(self.dtype)
        return stream_read(*self._tensors(), self.bits, self.group, self.dim, self.sink).to(self.dtype)

    def _tensors(self) -> tuple[torch.Tensor, ...]:
        return self.codes, self.scale, self.zero, self.fp

    def select(self, index: torch.Tensor) -> None:
        """Keeps batch rows ``index`` (dim 0 of every tensor)."""
        index = index.to(self.device)
        self.codes, self.scale, self.zero, self.fp = (t.index_select(0, index) for t in self._tensors())
        self.lead = (int(index.numel()), *self.lead[1:])

    def nbytes(self) -> int:
        """Bytes of the codes, scales, zero points and the full-precision sink and tail tokens."""
        return sum(t.nbytes for t in self._tensors())


def _rows(v: torch.Tensor) -> torch.Tensor:
    """(B, Hkv, T, D) → (B, T, Hkv * D): a token's values side by side, as KIVI groups them."""
    return v.transpose(1, 2).flatten(2)


class KIVICache(LayerCache):
    """KIVI: keys quantized per channel (groups of ``group`` tokens), values per token (groups of
    ``group`` of the token's Hkv * D values), the most recent tokens in full precision. Keys are stored after RoPE, as
    the decode graph returns them."""

    def __init__(self, batch, n_kv_heads, head_dim, bits, group, residual, dtype=torch.float32,
                 device="cpu", sink=0):
        super().__init__(batch, n_kv_heads, head_dim, dtype, device)
        self.bits, self.group, self.residual, self.sink = bits, group, residual, sink
        self._set(self._empty(), self._empty())

    def _streams(self, batch: int):
        h, d, q = self.n_kv_heads, self.head_dim, (self.bits, self.group)
        k = QuantizedStream((batch, h), d, *q, -2, self.residual, self.dtype, self.device, self.sink)
        v = QuantizedStream((batch,), h * d, *q, -1, self.residual, self.dtype, self.device, self.sink)
        return k, v

    def past(self) -> tuple[torch.Tensor, torch.Tensor]:
        v = self.v.read()  # (B, P, Hkv * D)
        v = v.unflatten(2, (self.n_kv_heads, self.head_dim)).transpose(1, 2)  # (B, Hkv, P, D)
        return self.k.read(), v

    @property
    def stored(self) -> int:
        return len(self.k)

    def update(self, present_k: torch.Tensor, present_v: torch.Tensor) -> None:
        new = self._check(present_k, present_v)
        self.length += new
        self.k.append(present_k[:, :, present_k.shape[2] - new :])
        self.v.append(_rows(present_v[:, :, present_v.shape[2] - new :]))

    def reorder(self, index: torch.Tensor) -> None:
        self.batch = int(index.numel())
        self.k.select(index)
        self.v.select(index)

    def attend(self, q: torch.Tensor, scale: float) -> torch.Tensor:
        """Attention of one query token (B, H, 1, D) over the cache, read from the packed codes
        (``kivi_attend``) when it can be: 2 or 4 bits, no sink, value groups within a head; else
        through ``past()`` and SDPA. Returns (B, H, 1, D) in the cache's dtype."""
        fused = (
            q.shape[2] == 1 and self.sink == 0 and self.bits in (2, 4)
            and self.head_dim % self.group == 0 and self.group % (8 // self.bits) == 0
        )
        if not fused:
            k, v = self.past()
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=True)
        out = kivi_attend(q, *self.k._tensors(), *self.v._tensors(), scale, self.bits, self.group)
        return out.to(self.dtype)

    def _set(self, k: torch.Tensor, v: torch.Tensor) -> None:
        self.k, self.v = self._streams(int(k.shape[0]))
        self.k.append(k)
        self.v.append(_rows(v))

    def nbytes(self) -> int:
        return self.k.nbytes() + self.v.nbytes()


class XQuantCache:
    """XQuant storage for one layer: the quantized X (or latents X·U_k, X·U_v) of every token.

    Args:
        batch: B.
        streams: ``{"k": C_k, "v": C_v}`` for SVD latents, or ``{"x": d}`` when X itself is cached
            (K and V then both read it).
        bits, group, residual: the quantization (per token, groups along the channels).
        up: ``{"k": B_k, "v": B_v}`` (C, Hkv * D) matrices that rematerialise K and V from the
            stream (for ``"x"``: W_k.T and W_v.T).
        rope: ``rope(k, positions) -> k`` applied to (B, Hkv, N, D) keys; None for no RoPE.
        n_kv_heads, head_dim: the K/V head layout.
    """

    def __init__(self, batch, streams: dict[str, int], bits, group, residual, up, n_kv_heads,
                 head_dim, rope: Callable | None = None, dtype=torch.float32, device="cpu"):
        self.streams = {
            name: QuantizedStream((batch,), c, bits, group, -1, residual, dtype, device)
            for name, c in streams.items()
        }
        self.up, self.rope = up, rope
        self.n_kv_heads, self.head_dim = n_kv_heads, head_dim

    def __len__(self) -> int:
        return len(next(iter(self.streams.values())))

    def append(self, **tokens: torch.Tensor) -> None:
        """Appends (B, T, C) rows to each stream (``x=`` or ``k=`` and ``v=``)."""
        if set(tokens) != set(self.streams):
            msg = f"XQuantCache.append needs streams {sorted(self.streams)}; got {sorted(tokens)}."
            raise ValueError(msg)
        for name, x in tokens.items():
            self.streams[name].append(x)

    def _remat(self, which: str) -> torch.Tensor:
        stream = self.streams.get(which) or self.streams["x"]
        y = stream.read() @ self.up[which].to(stream.dtype)  # (B, N, Hkv * D)
        b, n = y.shape[:2]
        return y.reshape(b, n, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, N, D)

    def keys(self) -> torch.Tensor:
        """K (B, Hkv, N, D) rematerialised and rotated at positions 0..N-1 (the cache is pre-RoPE)."""
        k = self._remat("k")
        return k if self.rope is None else self.rope(k, torch.arange(k.shape[2], device=k.device))

    def values(self) -> torch.Tensor:
        """V (B, Hkv, N, D) rematerialised."""
        return self._remat("v")

    def nbytes(self) -> int:
        """Bytes of every stream (codes, scales, zero points, tail)."""
        return sum(s.nbytes() for s in self.streams.values())


def _drop_ring(layout, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """A ring's tensors without the leading packed groups its window no longer sees
    (``StreamsLayout.ring``; the same count as ``StreamsLayout.dropped_tokens``); others as they are."""
    if not getattr(layout, "ring", False):
        return tensors
    first = layout.streams[0]
    held = int(tensors[0].shape[2]) + int(tensors[3].shape[2])
    drop = min(int(tensors[0].shape[2]), max(0, held - (layout.window - 1))) // first.group * first.group
    if drop == 0:
        return tensors
    out = []
    for i, st in enumerate(layout.streams):
        codes, scale, zero, fp = tensors[4 * i : 4 * i + 4]
        rows = drop if st.dim == -1 else drop // st.group
        out += [codes[:, :, drop:].clone(), scale[:, :, rows:].clone(), zero[:, :, rows:].clone(), fp]
    return out


class GraphStreamCache(LayerCache):
    """The cache of a quantized layer in decode form: the stream tensors its graph reads and returns
    (per stream: packed uint8 codes, float16 scale and zero point, full-precision sink + recent
    tokens; ``condfx/ops/quant_stream.py``): KIVI's K and V, XQuant's X or SVD latents.

    The graph quantizes what leaves the residual window itself, so the cache only carries the
    tensors between calls, in PyTorch or ONNX Runtime alike. ``nbytes()`` counts all of them.
    """

    def __init__(self, layout, batch: int, device="cpu"):
        if not layout.streams:
            msg = f"GraphStreamCache needs a layout with quantized streams; layer {layout.layer} has none."
            raise ValueError(msg)
        super().__init__(batch, layout.n_kv_heads, layout.head_dim, layout.dtype, device)
        self.layout = layout
        self.io_tensors = 4 * len(layout.streams)
        self.tensors = layout.empty_past(batch, self.device)

    @classmethod
    def from_layout(cls, layout, batch: int, device="cpu") -> GraphStreamCache:
        """The empty cache of a ``condfx.layouts.StreamsLayout``."""
        return cls(layout, batch, device)

    def past(self) -> tuple[torch.Tensor, ...]:
        return tuple(self.tensors)

    @property
    def stored(self) -> int:
        return int(self.tensors[0].shape[2]) + int(self.tensors[3].shape[2])

    def update(self, *present: torch.Tensor) -> None:
        if len(present) != self.io_tensors:
            msg = f"GraphStreamCache.update needs {self.io_tensors} tensors; got {len(present)}."
            raise ValueError(msg)
        codes, fp = present[0], present[3]
        total = int(codes.shape[2]) + int(fp.shape[2])
        if int(codes.shape[0]) != self.batch or total < self.stored:
            msg = (f"GraphStreamCache.update: the K stream must keep batch {self.batch} and at least "
                   f"{self.stored} tokens; got batch {int(codes.shape[0])} with {total}.")
            raise ValueError(msg)
        self.length += total - self.stored
        self.tensors = _drop_ring(self.layout, list(present))

    def append(self, k: torch.Tensor, v: torch.Tensor):
        msg = "GraphStreamCache is read and written by the decode graph; use the Session, not append()."
        raise NotImplementedError(msg)

    def reset(self, batch: int | None = None) -> None:
        self.batch = self.batch if batch is None else batch
        self.length = 0
        self.tensors = self.layout.empty_past(self.batch, self.device)

    def reorder(self, index: torch.Tensor) -> None:
        index = index.to(self.device)
        self.batch = int(index.numel())
        self.tensors = [t.index_select(0, index) for t in self.tensors]

    def _set(self, k, v) -> None:  # reset and reorder are overridden; nothing calls this
        raise NotImplementedError

    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)


class Float16KVCache(FullKVCache):
    """K and V stored as float16 and handed back in the graph's dtype: the cache of
    ``quantize-kv{method=kivi,bits=16}`` (each token reads the float16-rounded K/V of the tokens
    before it, its own and the residual window's in full precision)."""

    def past(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.k.to(self.dtype), self.v.to(self.dtype)

    def update(self, present_k: torch.Tensor, present_v: torch.Tensor) -> None:
        self.length += self._check(present_k, present_v)
        self.k, self.v = to_float16(present_k), to_float16(present_v)

    def _set(self, k: torch.Tensor, v: torch.Tensor) -> None:
        self.k, self.v = to_float16(k), to_float16(v)
