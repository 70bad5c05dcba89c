"""``Session``: runs the decode form of a rewritten model and keeps its per-layer caches.

A session owns a *backend* (what runs the decode graph) and a ``CacheSet`` (what is carried between
calls). Every backend implements one call, the minimal interface the runtime needs::

    backend.layers                      -> tuple[CacheLayout, ...]   one per attention layer
    backend.run(input_ids, past)        -> (logits, present)
        input_ids (B, T) int64, past = [past_k_0, past_v_0, ...] each (B, Hkv, P, D);
        logits (B, T, V), present = [present_k_0, present_v_0, ...] each (B, Hkv, P + T, D).
        A layer has the tensors its layout names (``CacheLayout.io_names``; a quantized layer four
        per stream, its packed streams, read and updated by the graph itself). The session builds
        one cache per layout through ``runtime/cache_table.make_cache``.

``TorchBackend`` runs the ``add-kv-cache`` GraphModule, on a copy whose cache concatenations
``cat([past, new], 2)`` are ``caches.append_kv`` (growth in place into the caches' arenas; the
caller's graph, which the exporter and the ONNX backend read, keeps its ``cat``) and whose per-op
overhead ``runtime/runner_rewrites.py`` cuts (fused RMSNorm, folded RoPE rotation; the same logits). The ONNX slot (``backend="onnx"``) takes the
same decode-form graph exported to ONNX and runs it on ONNX Runtime; it lives in
``runtime/onnx_backend.py`` as ``OnnxBackend.from_graph(gm) -> OnnxBackend`` with the same two members;
``Session.from_onnx(folder)`` opens a folder written by ``condfx export``.
"""

from __future__ import annotations

import copy
import enum
from collections.abc import Sequence
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import fx, nn

import condfx.ops  # noqa: F401  (registers torch.ops.condfx.*)
from condfx.codegen.bundle import graph_vocab_size
from condfx.layouts import CacheLayout, decode_layouts, is_decode_form
from condfx.ops.countdown_ffn import countdown_masked_ffn_eager
from condfx.ops.masked_ffn import masked_ffn_eager
from condfx.runtime.cache_table import make_cache
from condfx.runtime.caches import CacheSet, FullKVCache, InterleavedKVCache, append_kv
from condfx.runtime.runner_rewrites import flat_module, slim_runner
from condfx.runtime.sampling import check_token_ids


class BackendKind(str, enum.Enum):
    """Which engine runs the decode graph."""

    TORCH = "torch"
    ONNX = "onnx"


class DecodeBackend(Protocol):
    """What a session needs from an engine (see the module docstring)."""

    layers: tuple[CacheLayout, ...]

    def run(
        self, input_ids: torch.Tensor, past: Sequence[torch.Tensor]
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Runs one prefill or decode call: logits (B, T, V) and the present K/V list."""
        ...


class TorchBackend:
    """Runs the decode-form GraphModule in PyTorch (eager, no grad).

    Args:
        gm: the output of ``add-kv-cache``.

    Raises:
        ValueError: ``gm`` is not in decode form.
    """

    def __init__(self, gm: fx.GraphModule):
        if not is_decode_form(gm):
            msg = "TorchBackend needs the decode form of a graph; apply 'add-kv-cache' to it first."
            raise ValueError(msg)
        self.gm = gm
        self.runner, self.in_place = grow_in_place(gm)
        self.layers: tuple[CacheLayout, ...] = decode_layouts(gm)
        self.vocab_size: int | None = graph_vocab_size(gm)
        params = list(gm.parameters()) + list(gm.buffers())
        self.device = params[0].device if params else torch.device("cpu")

    def run(
        self, input_ids: torch.Tensor, past: Sequence[torch.Tensor]
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        check_token_ids(input_ids, self.vocab_size, "TorchBackend.run")
        with torch.no_grad():
            out = self.runner(input_ids, *past)
        return out[0], list(out[1:])


def _is_past_cat(node: fx.Node) -> bool:
    """``aten.cat([past_input, new], 2)`` over 4-D tensors: the growth of a layer's K or V."""
    if node.op != "call_function" or node.target is not torch.ops.aten.cat.default or len(node.args) < 2:
        return False
    parts, dim = node.args[0], node.args[1]
    val = node.meta.get("val")
    rank = val.dim() if isinstance(val, torch.Tensor) else 0
    return (
        isinstance(parts, (list, tuple)) and len(parts) == 2
        and isinstance(parts[0], fx.Node) and parts[0].op == "placeholder"
        and rank == 4 and dim in (2, -2)
    )


def decode_attention(q, k, v, scale, window=0, softcap=0.0, alibi_slopes=None, sinks=None):
    """``condfx.attention`` for the torch runtime, without the custom-op dispatch (about a
    millisecond a call on CPU, a tenth of a SmolLM2 decode step over 30 layers).

    One query token with no window and no score option sees every key: SDPA without a mask, the
    same result as the op's all-true mask. Every other call runs the op's own implementation.
    """
    plain = window == 0 and not softcap and alibi_slopes is None and sinks is None
    if plain and q.shape[2] == 1:
        return F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=q.shape[1] != k.shape[1])
    return torch.ops.condfx.attention.default(q, k, v, scale, window, softcap, alibi_slopes, sinks)


_DIRECT = {  # custom ops the torch runtime calls without their dispatch: op overload → plain function
    torch.ops.condfx.attention.default: decode_attention,
    torch.ops.condfx.countdown_masked_ffn.default: countdown_masked_ffn_eager,
    torch.ops.condfx.masked_ffn.default: masked_ffn_eager,
}


def _no_op_input(node: fx.Node) -> fx.Node | None:
    """The input a node passes through unchanged at run time (a same-dtype ``to`` without copy or
    memory format), or None."""
    if node.op != "call_function" or node.target is not torch.ops.aten.to.dtype or len(node.args) != 2:
        return None
    src, dtype = node.args
    val = src.meta.get("val") if isinstance(src, fx.Node) else None
    extra = {k: v for k, v in node.kwargs.items() if v not in (False, None)}
    return src if isinstance(val, torch.Tensor) and val.dtype == dtype and not extra else None


def grow_in_place(gm: fx.GraphModule, *, slim: bool = True) -> tuple[fx.GraphModule, int]:
    """A copy of a decode-form graph whose past concatenations call ``append_kv`` and whose
    ``condfx.attention``, ``condfx.countdown_masked_ffn`` and ``condfx.masked_ffn`` calls skip the
    custom-op dispatch (``decode_attention`` and the ops' ``*_eager`` bodies: the same values, row
    observers told). Run-time no-ops are dropped from the copy: ``_assert_tensor_metadata`` checks
    (the graph's metadata was checked when the passes ran) and casts to the dtype a tensor already has.
    With ``slim``, ``runner_rewrites.slim_runner`` then cuts the per-op overhead (fused RMSNorm, folded
    RoPE rotation, shared duplicates, lighter op bindings) and ``flat_module`` puts the weights at
    the top level of the runner, the logits unchanged.

    The copy shares the parameters (no weight is copied); ``gm`` is not changed.

    Args:
        gm: the ``add-kv-cache`` output.
        slim: apply ``runner_rewrites`` (False keeps the node-for-node copy, for comparisons).

    Returns:
        The graph to run, and how many concatenations it appends in place.
    """
    graph = copy.deepcopy(gm.graph)
    count = 0
    for node in list(graph.nodes):
        if _is_past_cat(node):
            node.target, node.args, node.kwargs = append_kv, tuple(node.args[0]), {}
            count += 1
        elif node.op == "call_function" and node.target in _DIRECT:
            node.target = _DIRECT[node.target]
        elif node.target is torch.ops.aten._assert_tensor_metadata.default and not node.users:
            graph.erase_node(node)
        elif (src := _no_op_input(node)) is not None:
            node.replace_all_uses_with(src)
            graph.erase_node(node)
    if slim:
        slim_runner(graph)
        return flat_module(gm, graph), count
    runner = fx.GraphModule(gm, graph)
    runner.meta.update(gm.meta)
    return runner, count


def _onnx_backend(gm: fx.GraphModule) -> DecodeBackend:
    from condfx.runtime.onnx_backend import OnnxBackend

    try:
        import onnxruntime  # noqa: F401  (the one optional import of this backend)
    except ImportError:
        msg = "Session backend 'onnx' needs the onnxruntime package (pip install onnxruntime); use 'torch'."
        raise ValueError(msg) from None
    return OnnxBackend.from_graph(gm)


def _check_passes(passes: Any) -> Any:
    if isinstance(passes, str):
        return passes
    if isinstance(passes, Sequence):
        return list(passes)
    msg = f"Session passes must be a spec string or a list of passes; got {type(passes).__name__}."
    raise TypeError(msg)


class Session:
    """Runs a model's decode graph with caches: ``prefill(ids)`` then ``step(ids)`` per token.

    Args:
        backend: a ``DecodeBackend`` (``TorchBackend``, or the ONNX one).
        max_seq_len: longest sequence allowed (prompt + generated); None for no limit.
        reports: the pass reports of the graph, for display.
    """

    def __init__(
        self, backend: DecodeBackend, *, max_seq_len: int | None = None, reports: tuple = ()
    ):
        self.backend = backend
        self.max_seq_len = max_seq_len
        self.reports = tuple(reports)
        self.device = getattr(backend, "device", torch.device("cpu"))
        self.caches = CacheSet([make_cache(layout, 1, self.device) for layout in backend.layers])
        if getattr(backend, "in_place", 0):  # the graph appends through append_kv: caches keep arenas
            for cache in self.caches:
                if type(cache) in (FullKVCache, InterleavedKVCache):
                    cache.grow_in_place, cache.capacity_limit = True, max_seq_len
        self._started = False

    @classmethod
    def from_model(
        cls,
        model: nn.Module,
        *,
        passes: Any = "fuse-attention",
        example_len: int = 8,
        backend: BackendKind | str = BackendKind.TORCH,
    ) -> Session:
        """Captures ``model``, applies ``passes`` then ``add-kv-cache``, and opens a session.

        Args:
            model: a causal LM taking ids (B, T) (zoo, Hugging Face, or own).
            passes: the pipeline spec run before ``add-kv-cache``; it must fuse attention.
            example_len: sequence length of the capture example (batch is 2, or 3 when this is 2).
            backend: ``"torch"`` or ``"onnx"``.

        Returns:
            The session; ``max_seq_len`` comes from ``model.info`` when the model has one.

        Raises:
            ValueError: a bad backend name, spec or example length.
            PassError: a pass failed (e.g. attention was not fused).
        """
        from condfx.capture import capture
        from condfx.passes.pipeline import apply

        kind = _backend_kind(backend)
        if not isinstance(example_len, int) or isinstance(example_len, bool) or example_len < 1:
            msg = f"Session.from_model example_len must be a positive int; got {example_len!r}."
            raise ValueError(msg)
        batch = 3 if example_len == 2 else 2
        weights = [*model.parameters(), *model.buffers()]
        device = weights[0].device if weights else torch.device("cpu")
        ids = torch.zeros(batch, example_len, dtype=torch.long, device=device)
        gm = capture(model, (ids,))
        fused = apply(gm, _check_passes(passes))
        decode = apply(fused.graph_module, "add-kv-cache")
        engine = TorchBackend(decode.graph_module) if kind is BackendKind.TORCH else None
        engine = engine or _onnx_backend(decode.graph_module)
        info = getattr(model, "info", None)
        limit = getattr(info, "max_seq_len", None)
        return cls(engine, max_seq_len=limit, reports=fused.reports + decode.reports)

    @classmethod
    def from_graph(cls, gm: fx.GraphModule, *, max_seq_len: int | None = None) -> Session:
        """Opens a torch session on a graph already in decode form (``add-kv-cache`` output)."""
        return cls(TorchBackend(gm), max_seq_len=max_seq_len)

    @classmethod
    def from_onnx(cls, folder: Any, *, model: nn.Module | None = None, **options: Any) -> Session:
        """Opens a session on a folder written by ``condfx export`` (ONNX Runtime backend).

        Args:
            folder: the export folder (``prefill.onnx``, ``decode.onnx``, ``condfx_manifest.json``).
            model: when given, the folder must have been exported from this model.
            **options: ``OnnxBackend.from_dir`` options (providers, threads, check_hashes).

        Returns:
            The session; ``max_seq_len`` comes from the manifest.

        Raises:
            FileNotFoundError: the folder, its manifest or one of its files is missing.
            ValueError: the folder is from another model, format or condfx version.
        """
        from condfx.runtime.onnx_backend import OnnxBackend

        backend = OnnxBackend.from_dir(folder, model=model, **options)
        return cls(backend, max_seq_len=backend.max_seq_len)

    @property
    def vocab_size(self) -> int | None:
        """The backend's vocabulary (token ids are in ``[0, vocab_size)``), None when unknown."""
        return getattr(self.backend, "vocab_size", None)

    @property
    def position(self) -> int:
        """Tokens processed since the last prefill (the position of the next token)."""
        return self.caches.length

    def _check_ids(self, ids: torch.Tensor, where: str) -> torch.Tensor:
        if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.dtype != torch.long:
            got = tuple(ids.shape) if isinstance(ids, torch.Tensor) else type(ids).__name__
            msg = f"Session.{where} needs int64 token ids of shape (B, T); got {got}."
            raise ValueError(msg)
        if ids.shape[1] == 0:
            msg = f"Session.{where} needs at least one token per row; got shape {tuple(ids.shape)}."
            raise ValueError(msg)
        end = self.position + ids.shape[1] if where == "step" else ids.shape[1]
        if self.max_seq_len is not None and end > self.max_seq_len:
            msg = (
                f"Session.{where}: the sequence would reach {end} tokens, more than the model's "
                f"context of {self.max_seq_len}."
            )
            raise ValueError(msg)
        check_token_ids(ids, self.vocab_size, f"Session.{where}")
        return ids.to(self.device)

    def prefill(self, ids: torch.Tensor) -> torch.Tensor:
        """Empties the caches and runs the prompt.

        Args:
            ids: (B, T) int64 prompts, all of length T (the op has no padding mask).

        Returns:
            logits (B, T, V).

        Raises:
            ValueError: bad ids, or T beyond ``max_seq_len``.
        """
        ids = self._check_ids(ids, "prefill")
        self.caches.reset(ids.shape[0])
        self._started = True
        return self._run(ids)

    def step(self, ids: torch.Tensor) -> torch.Tensor:
        """Runs new tokens (usually one per row) after the cached ones.

        Args:
            ids: (B, T) int64, B equal to the prefill's batch.

        Returns:
            logits (B, T, V) for the new positions.

        Raises:
            ValueError: no prefill yet, a batch mismatch, bad ids, or the context is exceeded.
        """
        if not self._started:
            msg = "Session.step called before Session.prefill; run the prompt with prefill first."
            raise ValueError(msg)
        ids = self._check_ids(ids, "step")
        if ids.shape[0] != self.caches[0].batch:
            msg = f"Session.step: batch {ids.shape[0]} differs from the prefill batch {self.caches[0].batch}."
            raise ValueError(msg)
        return self._run(ids)

    def reorder(self, index: Any) -> None:
        """Keeps batch rows ``index`` of every cache, in that order (beam reordering, dropping rows).

        The index is checked before any cache changes, so a bad one leaves the session as it was.

        Args:
            index: (B',) int64 row indices into the current batch, or a list of ints; B' >= 1.

        Raises:
            ValueError: no prefill yet, or an index that is not a non-empty 1-D integer tensor or
                list with every value in ``[0, batch)``.
        """
        if not self._started:
            msg = "Session.reorder called before Session.prefill; there are no rows to reorder."
            raise ValueError(msg)
        self.caches.reorder(index, who="Session.reorder")

    def _run(self, ids: torch.Tensor) -> torch.Tensor:
        logits, present = self.backend.run(ids, self.caches.past())
        self.caches.update(present)
        return logits

    def cache_bytes(self) -> int:
        """Bytes held by every layer cache right now."""
        return self.caches.nbytes()

    def count_ffn_skips(self):
        """A context manager counting the FFN rows ``skip-ffn`` skips in this session's calls.

        ``with session.count_ffn_skips() as c: ...`` then ``c.fraction_of_all_ffn`` (see
        ``runtime/ffn_skips.py``). Raises ValueError for a graph without ``skip-ffn`` or an ONNX backend.
        """
        from condfx.runtime.ffn_skips import FFNSkipCounter

        gm = getattr(self.backend, "gm", None)
        layers = None if gm is None else gm.meta.get("condfx_ffn_layers")
        if layers is None:
            msg = "Session.count_ffn_skips needs the PyTorch backend running a graph rewritten by skip-ffn."
            raise ValueError(msg)
        return FFNSkipCounter(ffn_layers=layers[0], masked_layers=layers[1])


def _backend_kind(value: BackendKind | str) -> BackendKind:
    try:
        return BackendKind(value)
    except ValueError:
        allowed = ", ".join(k.value for k in BackendKind)
        msg = f"Session backend must be one of {{{allowed}}}; got {value!r}."
        raise ValueError(msg) from None
