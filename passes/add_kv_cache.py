"""Turn a fused graph into its KV-cache decode form: past K/V in, present K/V out, positions offset.

Rewrites (for the i-th ``condfx.attention`` node, in graph order):
    forward(input_ids) -> logits
        → forward(input_ids, past_k_0, past_v_0, ...) -> (logits, present_k_0, present_v_0, ...)
    condfx.attention(q, k, v, s, w)
        → condfx.attention(q, cat([past_k_i, k], 2), cat([past_v_i, v], 2), s, w);
          present_k_i, present_v_i = the two cats                     # (B, Hkv, P + T, D)
    ``quantize-kv`` layers: the graph reads and updates its packed integer cache itself, four tensors
    per stream (``past_<s>_i_codes`` uint8, ``_scale`` / ``_zero`` float16, ``_fp`` the full-precision
    sink + residual tokens; ``condfx/ops/quant_stream.py``), so PyTorch and ONNX Runtime carry the
    same tensors and any split into steps equals the teacher-forced forward:
      KIVI (k̂ = fake_group_quantize(k) per channel):
        condfx.quantized_cache_attention(q, k, v, k̂, v̂, ...)
        → condfx.kivi_cache_attention(q, k, v, <K stream>, <V stream>, ...)[0]; presents: the
          eight updated stream tensors
      XQuant (k̂, v̂ = the k/v path re-run on fake_group_quantize(X) or of the SVD latents):
        each fq(X) → condfx.quantized_stream(<stream>, X) (streams ``x``, or ``k`` and ``v``);
        the k/v path from it is copied twice over the N cached tokens, fed the stream's ``full`` and
        ``hat`` outputs (RoPE positions re-derived as arange(N)), and attention reads
        (k, v, k̂, v̂) = (path(full), path(hat)); presents: the updated stream tensors
      XQuant-CL (k̂_i = path(a_i), a_i = a_{i-1} + fq(r_i - a_{i-1})): the same with stream ``x``
        holding the deltas; a_i over all N tokens (a_{i-1} + hat) is built layer by layer and
        (k, v) = path(a_{i-1} + full) = path(r_i) for the full-precision tokens
    arange(T) feeding RoPE cos/sin or a position embedding
        → arange(P, P + T), P = past_k_j.shape[2] of the first layer without a window (a
          quantized layer: the codes' plus the fp tokens of its first stream)
  Exact: the decode form with P = 0 is the original function, and prefill(ids[:n]) followed by
  decode steps over ids[n:] reproduces the full forward (the op aligns queries to the end of the keys).
  The rewritten graph is re-exported (``torch.export``; dims batch, seq and one past length
  P_i >= 0 per layer, shared by its k and v (one length per stream tensor for quantized layers);
  example P = 3), so every node gets fresh FakeTensor
  metadata. ``gm.meta["condfx_kv"]`` lists the layers' ``KVLayerSpec``s for the runtime.
  Position sources are checked: every tensor whose shape depends on T but not on the tokens must
  come from an offset arange, else the pass fails (e.g. a RoPE table sliced to T).

Requires: every attention core is ``condfx.attention`` (must run after ``fuse-attention``); the
  graph's only input is ``input_ids`` (B, T) (or embeddings (B, T, C)) with symbolic B and T; its
  first output is the logits. Must run last: passes after it would see two extra inputs per layer
  and a tuple output.

Does not handle: position ids passed as graph inputs (they are not offset), graphs in which every
  layer has a sliding window (P would be the trimmed cache length, not the position; the pass fails),
  padded batches (the op has no padding mask).
"""

from __future__ import annotations

import dataclasses
import operator
import re
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import fx

import condfx.ops  # noqa: F401  (registers torch.ops.condfx.*)
from condfx.ops.quant_stream import STREAM_PARTS, StreamSpec
from condfx.ops.routed_attention import is_routed_attention
from condfx.passes._decode_quantized import kivi_streams, rewire_kivi, rewire_xquant, xquant_streams
from condfx.passes._insert import remove_dead_calls
from condfx.passes.base import GraphSnapshot, Pass, PassError, PassReport, PassResult
from condfx.passes.fuse_attention import is_fused_attention
from condfx.passes.interleave_heads import is_interleaved_attention
from condfx.passes.quantize_kv import is_quantized_cache_attention
from condfx.patterns import find_regions

_ARANGES = (torch.ops.aten.arange.default, torch.ops.aten.arange.start)
_EMBEDDING = torch.ops.aten.embedding.default
_ROPE_TRIG = (torch.ops.aten.cos.default, torch.ops.aten.sin.default)
_SEARCH_DEPTH = 12  # nodes walked from an arange to its cos/sin or embedding user
_EXAMPLE_B, _EXAMPLE_T, _EXAMPLE_P = 2, 5, 3
_KEPT_META = ("nn_module_stack", "stack_trace", "source_fn_stack", "from_node")


@dataclass(frozen=True)
class AddKVCacheConfig:
    """Options of ``add-kv-cache`` (none yet; the cache policy lives in the runtime)."""


@dataclass(frozen=True)
class KVLayerSpec:
    """What the runtime needs to build one layer's cache.

    Attributes:
        layer: index of the attention node in graph order.
        n_kv_heads: key/value heads (dim 1 of past/present).
        head_dim: dim 3 of past/present.
        window: the attention's sliding window, 0 for full causal attention.
        dtype: dtype of k/v.
        pseudo: P of an IHA layer (``condfx.interleaved_attention``): its cache holds P
            pseudo-K/V rows per token, never trimmed (the op's RoPE positions are cache indices).
        streams: a quantized layer's cache streams (``condfx/ops/quant_stream.py``): KIVI's K and V
            (``condfx.kivi_cache_attention``), XQuant's X or SVD latents; four tensors each (codes,
            scale, zero, fp), read and updated by the decode graph itself. Empty: plain K and V.
    """

    layer: int
    n_kv_heads: int
    head_dim: int
    window: int
    dtype: torch.dtype
    pseudo: int = 1
    streams: tuple[StreamSpec, ...] = ()

    def io_names(self) -> list[str]:
        """Names of the layer's cache tensors after ``past_`` / ``present_``, in graph order."""
        if not self.streams:
            return [f"{x}_{self.layer}" for x in "kv"]
        return [f"{st.name}_{self.layer}_{p}" for st in self.streams for p in STREAM_PARTS]

    def empty_past(self, batch: int, device=None, length: int = 0) -> list[torch.Tensor]:
        """The layer's decode-graph inputs for an empty cache (``length`` > 0: example sizes)."""
        if self.streams:
            return [t for st in self.streams for t in st.empty(batch, self.dtype, device, length)]
        shape = (batch, self.n_kv_heads, length * self.pseudo, self.head_dim)
        return [torch.zeros(shape, dtype=self.dtype, device=device) for _ in "kv"]


@dataclass(frozen=True)
class KVCacheReport(PassReport):
    """The PassReport of ``add-kv-cache`` plus the position nodes it offset.

    Attributes:
        positions: names of the ``arange(T)`` nodes (before the pass) now starting at P.
    """

    positions: tuple[str, ...] = ()

    def to_markdown(self) -> str:
        """The base report plus one line naming the offset position nodes."""
        offset = ", ".join(self.positions) or "none"
        return f"{super().to_markdown()}\n- positions offset by the cache length: {offset}"


_FIRST_PAST = re.compile(r"past_(k|x|k0)_0(_codes)?")


def is_decode_form(gm: fx.GraphModule) -> bool:
    """True when ``gm`` already has the first-layer cache input this pass adds (``past_k_0``, or a
    quantized layer's first stream, ``past_k_0_codes`` / ``past_x_0_codes`` / ``past_k0_0_codes``)."""
    return any(n.op == "placeholder" and _FIRST_PAST.fullmatch(n.name) for n in gm.graph.nodes)


def _reaches_position_use(node: fx.Node) -> bool:
    """True when ``node`` flows (within a few ops) into RoPE cos/sin or an embedding's indices."""
    frontier, seen = [node], {node}
    for _ in range(_SEARCH_DEPTH):
        nxt = []
        for n in frontier:
            for user in n.users:
                if user.op == "call_function" and user.target in _ROPE_TRIG:
                    return True
                if user.op == "call_function" and user.target is _EMBEDDING and user.args[1] is n:
                    return True
                if user not in seen:
                    seen.add(user)
                    nxt.append(user)
        frontier = nxt
    return False


def find_position_aranges(gm: fx.GraphModule, ids: fx.Node) -> list[fx.Node]:
    """The ``arange(T)`` nodes, T = ``input_ids.shape[1]``, that feed RoPE or position embeddings."""
    seq = ids.meta["val"].shape[1]
    found = []
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target not in _ARANGES:
            continue
        val = node.meta.get("val")
        starts_at_zero = node.target is _ARANGES[0] or node.args[0] == 0
        if val is None or val.dim() != 1 or not starts_at_zero or len(node.args) > 2:
            continue
        if str(val.shape[0]) == str(seq) and _reaches_position_use(node):
            found.append(node)
    return found


def _check_fused(gm: fx.GraphModule, name: str) -> list[fx.Node]:
    """The fused attention nodes in graph order; PassError when any core is not fused."""
    unfused = [r for r in find_regions(gm).attention if not is_fused_attention(r.core)]
    if unfused:
        reason = (
            f"add-kv-cache needs every attention core fused into condfx.attention; layer "
            f"{unfused[0].layer} is not: run fuse-attention first (e.g. 'fuse-attention, add-kv-cache')"
        )
        raise PassError(name, reason, node=unfused[0].core)
    attn = [n for n in gm.graph.nodes if is_cached_attention(n)]
    if not attn:
        reason = "add-kv-cache found no condfx.attention node: run fuse-attention first"
        raise PassError(name, reason)
    return attn


def is_cached_attention(node: fx.Node) -> bool:
    """Is ``node`` an attention op whose keys and values the decode form caches?

    ``condfx.attention`` (windowed or not), IHA's ``condfx.interleaved_attention``, ``quantize-kv``'s
    ``condfx.quantized_cache_attention`` and L2A's ``condfx.routed_attention`` (the routed global branch
    reads, and so caches, every key like a full-attention layer).
    """
    return (
        is_fused_attention(node)
        or is_interleaved_attention(node)
        or is_quantized_cache_attention(node)
        or is_routed_attention(node)
    )


# index of the sliding-window argument of the cached attention ops that have one
_WINDOW_ARG = {
    torch.ops.condfx.attention.default: 4,
    torch.ops.condfx.quantized_cache_attention.default: 6,
}


def _window_of(node: fx.Node) -> int:
    """The node's sliding window, 0 for full causal attention (and for ops without a window)."""
    index = _WINDOW_ARG.get(node.target) if node.op == "call_function" else None
    return int(node.args[index]) if index is not None and len(node.args) > index else 0


def _symbols(value) -> set:
    if not isinstance(value, torch.Tensor):
        return set()
    return {s for d in value.shape if isinstance(d, torch.SymInt) for s in d.node.expr.free_symbols}


def position_roots(gm: fx.GraphModule, ids: fx.Node) -> list[fx.Node]:
    """Tensors whose shape depends on T but whose values do not depend on the tokens.

    These are the position sources of the graph (``arange(T)``, a RoPE table sliced to T, ...),
    taken at their roots: nodes none of whose inputs is already such a tensor.
    """
    seq = _symbols(ids.meta["val"]) & set(ids.meta["val"].shape[1].node.expr.free_symbols)
    tokens, positional, roots = {ids}, set(), []
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        # shapes (SymInts from sym_size) carry T, not token values
        inputs = [
            a for a in node.all_input_nodes if not isinstance(a.meta.get("val"), torch.SymInt)
        ]
        if any(a in tokens for a in inputs):
            tokens.add(node)
        elif seq & _symbols(node.meta.get("val")):
            positional.add(node)
            if not any(a in positional for a in inputs):
                roots.append(node)
    return roots


def _check_positions(gm: fx.GraphModule, ids: fx.Node, aranges: list[fx.Node], name: str) -> None:
    """PassError when a position source is not one of the aranges the pass offsets."""
    for root in position_roots(gm, ids):
        if root not in aranges:
            reason = (
                f"position-dependent value '{root.name}' is not an arange(T) feeding RoPE cos/sin "
                "or a position embedding, so the pass cannot offset it by the cache length"
            )
            raise PassError(name, reason, node=root)


def _layer_specs(attn: list[fx.Node]) -> list[KVLayerSpec]:
    specs = []
    for i, node in enumerate(attn):
        k = node.args[1].meta["val"]
        if is_interleaved_attention(node):  # full cache: positions are cache indices
            specs.append(KVLayerSpec(i, int(k.shape[1]), int(k.shape[3]), 0, k.dtype, int(node.args[5])))
            continue
        window = _window_of(node)
        streams = kivi_streams(node) or xquant_streams(node)[0]
        specs.append(KVLayerSpec(i, int(k.shape[1]), int(k.shape[3]), window, k.dtype, streams=streams))
    return specs


def _add_past_inputs(graph: fx.Graph, ids: fx.Node, specs: list[KVLayerSpec]) -> list[list[fx.Node]]:
    pasts, last = [], ids
    for spec in specs:
        layer = []
        for name in spec.io_names():
            with graph.inserting_after(last):
                last = graph.placeholder(f"past_{name}")
            layer.append(last)
        pasts.append(layer)
    return pasts


def _rewire_attention(graph: fx.Graph, attn, pasts, specs, ids) -> list[fx.Node]:
    """Feeds cat([past, new], 2) to every attention node; returns the presents, k then v per layer."""
    presents, acc_all, found, deferred = [], {}, {}, []
    for node in attn:  # before any rewiring: the CL accumulations still read the fake-quantize nodes
        _, fqs, acc = xquant_streams(node)
        found[node] = (fqs, acc, acc.args[0] if acc is not None else None)
    for node, past, spec in zip(attn, pasts, specs, strict=True):
        if spec.streams and found[node][0]:  # XQuant: its fake-quantize nodes were found
            presents += rewire_xquant(graph, node, spec, past, ids, acc_all, found[node], deferred)
            continue
        if spec.streams:  # KIVI
            presents += rewire_kivi(graph, node, spec, past)
            continue
        pk, pv = past
        with graph.inserting_before(node):
            k_all = graph.call_function(torch.ops.aten.cat.default, ([pk, node.args[1]], 2))
            v_all = graph.call_function(torch.ops.aten.cat.default, ([pv, node.args[2]], 2))
        node.args = (node.args[0], k_all, v_all, *node.args[3:])
        if is_quantized_cache_attention(node):  # the cache already holds the past as read
            with graph.inserting_before(node):
                kh = graph.call_function(torch.ops.aten.cat.default, ([pk, node.args[3]], 2))
                vh = graph.call_function(torch.ops.aten.cat.default, ([pv, node.args[4]], 2))
            node.args = (*node.args[:3], kh, vh, *node.args[5:])
        presents += [k_all, v_all]
    for fq, rows in deferred:
        fq.replace_all_uses_with(rows)
    return presents


def _offset_positions(
    graph: fx.Graph, aranges, ids: fx.Node, past: list[fx.Node], pseudo: int = 1
) -> None:
    """arange(T) → arange(P, P + T); P and T are read from the inputs right before the arange.

    ``past`` is the position source's cache: [past_k] (P = its dim 2), or a KIVI K stream whose
    packed codes and full-precision tokens together hold the P positions.
    """
    for node in aranges:
        with graph.inserting_before(node):
            p = graph.call_function(torch.ops.aten.sym_size.int, (past[0], 2))
            for extra in past[1:]:
                size = graph.call_function(torch.ops.aten.sym_size.int, (extra, 2))
                p = graph.call_function(operator.add, (p, size))
            if pseudo > 1:  # an IHA layer's cache holds ``pseudo`` rows per token
                p = graph.call_function(operator.floordiv, (p, pseudo))
            t = graph.call_function(torch.ops.aten.sym_size.int, (ids, 1))
            end = graph.call_function(operator.add, (p, t))
            new = graph.call_function(torch.ops.aten.arange.start, (p, end), dict(node.kwargs))
        node.replace_all_uses_with(new)
        graph.erase_node(node)


def _reexport(
    gm: fx.GraphModule, ids_val: torch.Tensor, specs: list[KVLayerSpec], old_meta: dict
) -> fx.GraphModule:
    """Runs torch.export on the rewritten module to give every node fresh FakeTensor metadata."""
    dim = torch.export.Dim
    batch, seq = dim("batch", min=1), dim("seq", min=1)
    shape = (_EXAMPLE_B, _EXAMPLE_T, *(int(d) for d in ids_val.shape[2:]))
    device = ids_val.device  # the model's device: examples must live beside its weights
    ids = torch.zeros(shape, dtype=ids_val.dtype, device=device)  # (B, T) ids or (B, T, C)
    past, dyn = [], [{0: batch, 1: seq}]
    for s in specs:
        past += s.empty_past(_EXAMPLE_B, device, _EXAMPLE_P)
        if not s.streams:  # one length per layer: a sliding-window layer keeps fewer positions
            dyn += [{0: batch, 2: dim(f"past_{s.layer}", min=0)}] * 2
        else:  # each stream tensor has its own length (packed tokens, their groups, fp tokens)
            dyn += [{0: batch, 2: dim(f"past_{n}", min=0)} for n in s.io_names()]
    with torch.no_grad():
        ep = torch.export.export(gm, (ids, *past), dynamic_shapes=tuple(dyn), strict=False)
    out = ep.module()
    for node in out.graph.nodes:
        for key, value in old_meta.get(node.name, {}).items():
            node.meta.setdefault(key, value)
    out.meta.update(gm.meta)
    return out


def _position_source(specs: list[KVLayerSpec], name: str) -> int:
    full = [s.layer for s in specs if s.window == 0]
    if not full:
        reason = (
            "every attention layer has a sliding window, so no cache length gives the position "
            "the position aranges need"
        )
        raise PassError(name, reason)
    return full[0]


def _as_kv_report(base: PassReport, positions: tuple[str, ...] = ()) -> KVCacheReport:
    fields = {f.name: getattr(base, f.name) for f in dataclasses.fields(base)}
    return KVCacheReport(**fields, positions=positions)


def _graph_input(gm: fx.GraphModule, name: str) -> fx.Node:
    """The graph's one input, (B, T) ids or (B, T, C) embeddings with a symbolic T."""
    inputs = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(inputs) != 1:
        reason = f"add-kv-cache needs one graph input (input_ids); got {len(inputs)}"
        raise PassError(name, reason)
    val = inputs[0].meta["val"]
    if val.dim() < 2 or not isinstance(val.shape[1], torch.SymInt):
        reason = "input_ids needs a symbolic sequence dimension 1; capture with dynamic=True"
        raise PassError(name, reason, node=inputs[0])
    return inputs[0]


def _rewrite(gm, ids, attn, aranges, specs, name) -> None:
    """The fx surgery: past inputs, cats, offset positions, (logits, presents...) output."""
    graph = gm.graph
    for node in [n for n in graph.nodes if n.op == "call_module" and n.target == "_guards_fn"]:
        graph.erase_node(node)  # export's shape guards for the old signature; re-export adds new
    pasts = _add_past_inputs(graph, ids, specs)
    presents = _rewire_attention(graph, attn, pasts, specs, ids)
    if aranges:
        source = _position_source(specs, name)
        # a quantized layer's first stream holds its tokens as codes (0) and full precision (3)
        length = [pasts[source][0], pasts[source][3]] if specs[source].streams else pasts[source][:1]
        _offset_positions(graph, aranges, ids, length, specs[source].pseudo)
    output = next(n for n in graph.nodes if n.op == "output")
    logits = output.args[0]
    logits = logits[0] if isinstance(logits, (tuple, list)) else logits
    output.args = ((logits, *presents),)
    # KIVI layers leave their fake-quantize nodes unused
    remove_dead_calls(graph)
    graph._codegen = fx.graph.CodeGen()  # plain positional inputs and a tuple output
    graph.lint()
    gm.recompile()


class AddKVCache(Pass):
    """``add-kv-cache``: the fused graph → its decode form with past/present K/V.

    The input module's graph is rewritten in place and then re-exported; the returned module is
    the re-exported one (the pipeline hands the pass a private copy, so a failure leaves the
    caller's module untouched).
    """

    name: ClassVar[str] = "add-kv-cache"
    config_class: ClassVar[type] = AddKVCacheConfig
    matches: ClassVar[str] = "condfx.attention node"

    def __call__(self, gm: fx.GraphModule) -> PassResult:
        snapshot = GraphSnapshot.take(gm)
        if is_decode_form(gm):
            n = sum(1 for node in gm.graph.nodes if is_cached_attention(node))
            skipped = (("already in decode form", "graph has past_k_0"),)
            base = snapshot.report(gm, self.name, matched=n, skipped=skipped)
            return PassResult(gm, False, _as_kv_report(base))
        attn = _check_fused(gm, self.name)
        ids = _graph_input(gm, self.name)
        aranges = find_position_aranges(gm, ids)
        _check_positions(gm, ids, aranges, self.name)
        specs = _layer_specs(attn)
        old_meta = {
            n.name: {k: n.meta[k] for k in _KEPT_META if k in n.meta} for n in gm.graph.nodes
        }
        positions = tuple(n.name for n in aranges)
        _rewrite(gm, ids, attn, aranges, specs, self.name)
        new = _reexport(gm, ids.meta["val"], specs, old_meta)
        new.meta["condfx_kv"] = tuple(specs)
        base = snapshot.report(new, self.name, matched=len(attn), rewritten=len(attn))
        return PassResult(new, True, _as_kv_report(base, positions))
