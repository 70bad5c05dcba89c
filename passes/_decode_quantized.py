"""The decode form of ``quantize-kv`` layers, for ``add-kv-cache``: each layer's graph reads and
updates its own packed cache (``condfx/ops/quant_stream.py``), so PyTorch and ONNX Runtime carry the
same integer tensors and any split into steps equals the teacher-forced forward.

    KIVI: ``quantized_cache_attention`` → ``kivi_cache_attention`` over the K and V streams.
    XQuant (X or SVD latents) and XQuant-CL (deltas): each fake-quantize node → ``quantized_stream``,
    and the layer's k/v path copied over every cached token, fed the stream's outputs.

The recognisers read the graph ``quantize-kv`` writes (``passes/quantize_kv.py``): KIVI's k̂ is
fake_group_quantize of the op's own k; XQuant's k̂ / v̂ are the k/v path re-run on fake-quantized X or
latents; XQuant-CL's on a_i = add(a_{i-1}, fq(r_i - a_{i-1})).
"""

from __future__ import annotations

import operator

import torch
from torch import fx

from condfx.ops.kv_quant import BITS, DROPPED
from condfx.ops.quant_stream import StreamSpec
from condfx.passes.quantize_kv import is_quantized_cache_attention
from condfx.patterns import _graph as g


def kivi_streams(node: fx.Node) -> tuple[StreamSpec, ...]:
    """The K and V streams when ``node`` is a KIVI ``quantized_cache_attention``, else ().

    KIVI's keys are ``fake_group_quantize(k, bits, group, -2[, sink])`` of the op's own k (per channel,
    after RoPE); XQuant's come from a rematerialised path instead.
    """
    if not is_quantized_cache_attention(node):
        return ()
    k_hat = node.args[3]
    if not (_is_fq(k_hat) and k_hat.args[0] is node.args[1]):
        return ()
    bits, group, _, *sink = (int(a) for a in k_hat.args[1:])
    if bits not in BITS or _values_fq_args(node.args[4]) != k_hat.args[1:3]:
        return ()  # 16 bits: a float16 cache, nothing packed; K and V quantized alike only
    q = (bits, group)
    rest = (int(node.args[7]), sink[0] if sink else 0)  # residual, sink
    _, hkv, _, d = node.args[1].meta["val"].shape
    return (StreamSpec("k", int(hkv), int(d), *q, -2, *rest),
            StreamSpec("v", 1, int(hkv * d), *q, -1, *rest))


def _values_fq_args(v_hat) -> tuple | None:
    """(bits, group) of the fake-quantize node KIVI's v̂ = permute(unflatten(fq(rows of v))) reads."""
    n = v_hat
    for _ in range(4):  # a few view ops up from v̂
        if not isinstance(n, fx.Node) or _is_fq(n):
            break
        n = n.args[0] if n.args else None
    return tuple(n.args[1:3]) if _is_fq(n) else None


def _is_fq(n) -> bool:
    return isinstance(n, fx.Node) and n.target is torch.ops.condfx.fake_group_quantize.default


def _cl_accumulation(n: fx.Node) -> bool:
    """Is ``n`` XQuant-CL's a_i = a_{i-1} + fq(r_i - a_{i-1}) (``quantize-kv`` writes add(a, q))?"""
    return n.target is torch.ops.aten.add.Tensor and len(n.args) == 2 and _is_fq(n.args[1]) \
        and isinstance(n.args[0], fx.Node) and (_is_fq(n.args[0]) or _cl_accumulation(n.args[0]))


def xquant_streams(node: fx.Node):
    """(streams, fake-quantize nodes, CL accumulation) of an XQuant ``quantized_cache_attention``.

    XQuant's k̂ and v̂ are the layer's own k/v path re-run on ``fake_group_quantize`` of X (one node
    both read: stream ``x``) or of the SVD latents X·U_k, X·U_v (streams ``k``, ``v``). XQuant-CL's
    re-run the path on a_i = a_{i-1} + fq(r_i - a_{i-1}): one stream ``x`` of the deltas, and the
    accumulation node a_i is returned (None otherwise; the first CL layer's a_0 is fq(r_0) itself).
    KIVI, bits 16 / 32 and anything unrecognised give ((), [], None).
    """
    if not is_quantized_cache_attention(node) or kivi_streams(node):
        return (), [], None
    found, accs = [], set()
    for hat in node.args[3:5]:
        seen, stack, hits = set(), [hat], []
        while stack:
            n = stack.pop()
            if n in seen or not isinstance(n, fx.Node):
                continue
            seen.add(n)
            if _cl_accumulation(n):  # stop: the layer's own quantized input (CL: added to a_{i-1})
                hits.append(n.args[1])
                accs.add(n)
                continue
            if _is_fq(n):
                hits.append(n)
                continue
            stack.extend(n.all_input_nodes)
        found.append(hits)
    hits = [q for h in found for q in h]
    if not all(found) or any(q.args[0].meta["val"].dim() != 3 or int(q.args[1]) not in (*BITS, DROPPED)
                             for q in hits):
        return (), [], None
    residual = int(node.args[7])
    def spec(name, q):  # noqa: E306
        bits, group, dim, *sink = (int(a) for a in q.args[1:])
        channels = int(q.args[0].meta["val"].shape[-1])
        return StreamSpec(name, 1, channels, bits, group, dim, residual, sink[0] if sink else 0)
    acc = accs.pop() if len(accs) == 1 else None
    if found[0] == found[1] and len(found[0]) == 1:
        return (spec("x", hits[0]),), hits[:1], acc
    if len(found[0]) == len(found[1]) == 1:
        return (spec("k", hits[0]), spec("v", hits[1])), hits, None
    # latent=klt: one stream per run of equal bits, in the order quantize-kv wrote them
    order = g.node_order(node.graph.owning_module)
    named = [(f"{w}{i}", q) for w, h in zip("kv", found, strict=True)
             for i, q in enumerate(sorted(h, key=order.__getitem__))]
    return tuple(spec(name, q) for name, q in named), [q for _, q in named], None


def _clone_for_all_tokens(graph, root: fx.Node, env: dict, length: fx.Node, ids: fx.Node) -> fx.Node:
    """A copy of ``root`` computed over every cached token: the nodes between the keys in ``env``
    (fake-quantize nodes → stream outputs) and ``root`` are copied with those replaced, and the
    sequence length T with ``length`` (N); the rest (weights, inv_freq, ...) is shared. Copying
    the T-sized nodes re-derives RoPE's positions as arange(N): the stream's tokens start at 0."""
    seq = str(ids.meta["val"].shape[1])
    memo = dict(env)

    def depends(n) -> bool:
        if n in memo:
            return memo[n] is not n
        val = n.meta.get("val")
        if isinstance(val, torch.SymInt) and str(val) == seq:
            memo[n] = length
            return True
        hit = any(depends(a) for a in n.all_input_nodes)
        memo[n] = None if hit else n  # None: to copy
        return hit

    def copy(n):
        if not isinstance(n, fx.Node):
            return n
        if not depends(n):
            return n
        if memo.get(n) is None:
            memo[n] = graph.node_copy(n, copy)
        return memo[n]

    return copy(root)


def rewire_xquant(graph, node, spec, streams: list[fx.Node], ids: fx.Node,
                   acc_all: dict, found: tuple, deferred: list) -> list[fx.Node]:
    """Feeds an XQuant layer's attention from its packed streams; returns the streams' presents.

    Each fake-quantize node fq(X) becomes ``condfx.quantized_stream`` over the cached tokens plus
    X; the k/v path from it (projection or latent up-projection, QK-norm, RoPE) is copied twice over
    all N cached tokens, fed the stream's ``full`` and ``hat`` outputs: attention reads (k, v) =
    full, (k̂, v̂) = hat, as in the teacher-forced graph. The step's own tokens then read fq(X) from
    ``hat`` too (its last T rows: the sink is counted from the first cached token, not the step's).
    XQuant-CL: the stream holds the deltas r_i - a_{i-1}; ``acc_all`` maps each accumulation
    a_i of the teacher-forced graph to a_i over all N tokens (a_{i-1} + hat), which the next
    layer's copies read; ``full`` gives a_{i-1} + deltas = r_i for the full-precision tokens.
    ``found``: ``(fqs, a_i, a_{i-1})`` read before any layer was rewired; ``deferred`` collects
    (fq, rows) for the caller to switch once every layer is rewired.
    """
    fqs, acc, prev = found
    presents, outs, align = [], {}, None
    for st, fq, past in zip(spec.streams, fqs, [streams[i : i + 4] for i in range(0, len(streams), 4)],
                            strict=True):
        with graph.inserting_before(fq.next):  # right after fq, in order: later layers read it
            new = graph.call_function(torch.ops.aten.unsqueeze.default, (fq.args[0], 1))
            args = (*past, new, st.bits, st.group, st.dim, st.residual, st.sink, align)
            step = graph.call_function(torch.ops.condfx.quantized_stream.default, args)
            items = [graph.call_function(operator.getitem, (step, i)) for i in range(6)]
            full, hat = (graph.call_function(torch.ops.aten.squeeze.dim, (x, 1)) for x in items[:2])
            n = graph.call_function(torch.ops.aten.sym_size.int, (hat, 1))
            t = graph.call_function(torch.ops.aten.sym_size.int, (fq.args[0], 1))
            start = graph.call_function(operator.sub, (n, t))
            rows = graph.call_function(torch.ops.aten.slice.Tensor, (hat, 1, start, n))
        align = items[0] if align is None else align
        outs[fq] = (full, hat, rows)
        presents += items[2:]
    earlier = {prev: acc_all[prev]} if prev is not None else {}  # CL: a_{i-1} over all tokens
    full_env = {fq: full for fq, (full, _, _) in outs.items()} | earlier
    hat_env = {fq: hat for fq, (_, hat, _) in outs.items()} | earlier
    with graph.inserting_before(node):
        n_all = graph.call_function(torch.ops.aten.sym_size.int, (align, 2))
        k, v, k_hat, v_hat = (_clone_for_all_tokens(graph, h, env, n_all, ids)
                              for env in (full_env, hat_env) for h in node.args[3:5])
        if len(fqs) == 1:  # X or CL deltas: the accumulation over all tokens, for a next CL layer
            acc_all[fqs[0]] = hat_env[fqs[0]]
            if acc is not None:
                acc_all[acc] = _clone_for_all_tokens(graph, acc, hat_env, n_all, ids)
    node.args = (node.args[0], k, v, k_hat, v_hat, *node.args[5:])
    # the new-token reads of fq switch to the stream's rows once every layer is rewired
    deferred.extend((fq, rows) for fq, (_, _, rows) in outs.items())
    return presents


def rewire_kivi(graph: fx.Graph, node: fx.Node, spec, streams: list[fx.Node]) -> list[fx.Node]:
    """Replaces a KIVI ``quantized_cache_attention`` by ``kivi_cache_attention``; returns its 8 presents."""
    st = spec.streams[0]
    bits, group, residual, sink = st.bits, st.group, st.residual, st.sink
    q, k, v, _, _, scale, window = node.args[:7]
    args = (q, k, v, *streams, scale, window, bits, group, residual, sink)
    with graph.inserting_before(node):
        step = graph.call_function(torch.ops.condfx.kivi_cache_attention.default, args)
        outs = [graph.call_function(operator.getitem, (step, i)) for i in range(9)]
    node.replace_all_uses_with(outs[0])
    graph.erase_node(node)
    return outs[1:]
