"""``route-attention{form=select}``: the retrofit form of L2A, which starts as the original model.

Rewrites (per selected attention region; x_in = the tensor q/k/v are projected from, i.e. the
normed stream the attention reads):
    condfx.attention(q, k, v, scale, 0, opts)
        → win    = condfx.sink_window_attention(q, k, v, pos, 0, scale, sink, window)  # the same q/k/v:
                   the first ``sink`` tokens and the last ``window`` (itself included), zero RoPE
                   frequencies so nothing is re-rotated; with sink=0 or a score option (which the sink
                   op lacks): condfx.attention(q, k, v, scale, window, opts)
          f      = cat(x_in, win)                            # (B, T, d + H*D), heads flattened
          logit  = x_in @ w_r^T + b_r  (router=input, the default) or  f @ w_r^T + b_r  (router=window)
                                                             # (B, T); w_r and b_r (1,) zero
          route  = logit >= threshold                        # threshold buffer, -inf at insertion
          glob   = condfx.routed_attention(q, k, v, route, scale, opts)   # full causal, routed rows only
          fix    = win + (f @ D^T @ U^T + c) * (pos >= exact)   # the window correction
          where(route[:, None, :, None], glob, fix)          # before the output projection
  With ``router=window`` the router reads f: the token's input and what its window attention
  returned, so it can tell a query its window answered from one it did not (the paper's router, too,
  reads the stream after the local branch); by default it reads x_in alone (better on SmolLM2, see
  ``route_attention.RouteAttentionConfig.router``).
  The correction (``correct``, rank r; default 0: none) predicts, from the token's attention
  input and its window output, what the keys outside the window would have added: D (r, d + H*D),
  U (H*D, r) and c (H*D) are zero at insertion and fitted by least squares on calibration text
  (``condfx.l2a_retrofit.fit_corrections``). ``pos`` is the graph's position arange (the one RoPE or a
  position table reads, which ``add-kv-cache`` offsets in decode), ``exact`` = window (+ sink): a token
  whose whole history is in its window gets no correction. A graph without such an arange gets none.
  Nothing is copied: both branches read the layer's own q/k/v, and only the attention core changes,
  so post / sandwich norms, residual multipliers, parallel blocks and the score options (softcap,
  ALiBi, sinks: given to both ops) stay as the layer had them. At insertion every token routes
  (logit 0 >= -inf), so the rewritten model is the original up to float rounding. The router
  predicts a token's cost of skipping global attention; ``condfx.l2a_retrofit.calibrate_select``
  fits it to an oracle and sets ``threshold`` per layer for a target skip fraction.

State per layer under ``<prefix>.l2a``: ``router_weight`` (1, width of what it reads), ``router_bias`` (1,), buffers
``threshold`` (0-d), ``layer``, ``window``, ``route_stats`` (as the add form); the nodes are tagged
for ``condfx.patterns.routed.find_routed_layers`` with roles "route", "routed" (the global op),
"window" (the window op), "features" (f, when the router or the correction reads it), "corrected"
(window + correction, when there is one), "input" (x_in) and "out" (the ``where``). Parameters ``correct_down``, ``correct_up``,
``correct_bias`` hold the correction, buffer ``correct_from`` the first position it applies to.

Decode (``add-kv-cache``): the global op keeps the layer's full K/V cache and the window op its own
(their own decode rules): a ring of the last ``window - 1`` tokens, plus the first ``sink`` tokens when
it is the sink-window op, so a layer caches ``sink + window - 1`` tokens more than the original;
``condfx.routed_attention`` computes nothing for a batch row that does not route.

Does not handle: natively sliding layers (their attention is already local: skipped with a reason),
and what the add form does not (``route_attention.check_routable``).
"""

from __future__ import annotations

import torch
from torch import fx, nn

import condfx.ops  # noqa: F401  (registers torch.ops.condfx.*)
from condfx.passes.graph_builder import GraphBuilder
from condfx.passes.op_args import op_arg, set_op_args
from condfx.patterns.regions import AttentionRegion
from condfx.patterns.routed import TAG

aten = torch.ops.aten
ROUTED = torch.ops.condfx.routed_attention.default
SINK_WINDOW = torch.ops.condfx.sink_window_attention.default


def _tag(node: fx.Node, prefix: str, role: str) -> fx.Node:
    node.meta[TAG] = (prefix, role)
    return node


def select_state(gm: fx.GraphModule, prefix: str, region: AttentionRegion, features: fx.Node,
                 window: int) -> nn.Module:
    """Registers ``<prefix>.l2a``: a zero router on the width of what it reads and a -inf threshold
    (every token routes)."""
    val = features.meta["val"]
    d, dtype = int(val.shape[-1]), val.dtype
    state = nn.Module()
    state.register_parameter("router_weight", nn.Parameter(torch.zeros(1, d, dtype=dtype)))
    state.register_parameter("router_bias", nn.Parameter(torch.zeros(1, dtype=dtype)))
    state.register_buffer("threshold", torch.tensor(float("-inf"), dtype=dtype))
    state.register_buffer("layer", torch.tensor(region.layer, dtype=torch.int64))
    state.register_buffer("window", torch.tensor(window, dtype=torch.int64))
    state.register_buffer("route_stats", torch.zeros(2, dtype=torch.float64))
    gm.get_submodule(prefix).add_module("l2a", state)
    return state


def _sink_window(b: GraphBuilder, q: fx.Node, k: fx.Node, v: fx.Node, scale: float, prefix: str, window: int,
                 sink: int) -> fx.Node:
    """The window branch that also reads the first ``sink`` tokens at their own positions:
    ``condfx.sink_window_attention`` with zero RoPE frequencies (its StreamingLLM re-rotation of the
    sink scores becomes the identity), so q and k keep the positions the layer gave them."""
    val = q.meta["val"]
    freq = b.constant(prefix, "l2a_sink_inv_freq", torch.zeros(int(val.shape[-1]) // 2, dtype=torch.float32))
    t = b.call(aten.sym_size.int, q, 2)
    # (T,): the op's positions only turn the zero frequencies, so their values are never read; a
    # constant fill (not an arange) is what add-kv-cache leaves alone
    positions = b.call(aten.zeros.default, [t], dtype=torch.long, device=val.device)
    return b.call(SINK_WINDOW, q, k, v, positions, freq, scale, sink, window)


def _window_features(b: GraphBuilder, prefix: str, x_in: fx.Node, win: fx.Node) -> fx.Node:
    """cat(x_in, the window output with its heads flattened): (B, T, d + H*D), tagged "features"."""
    flat = b.call(aten.flatten.using_ints, b.call(aten.transpose.int, win, 1, 2), 2)  # (B, T, H*D)
    feats = b.call(aten.cat.default, [b.call(aten.to.dtype, x_in, win.meta["val"].dtype), flat], -1)
    return _tag(feats, prefix, "features")


def _corrected(b: GraphBuilder, gm: fx.GraphModule, prefix: str, feats: fx.Node, win: fx.Node,
               position: fx.Node | None, exact: int, rank: int) -> fx.Node:
    """``win`` plus the zero-initialised low-rank correction of the window branch (module docstring)
    read from ``feats`` (``_window_features``), applied at positions >= ``exact`` (below, the window
    branch is already the full attention); ``win`` itself when ``rank`` is 0 or the graph has no
    position arange to mask it with."""
    if rank <= 0 or position is None:
        return win
    wv = win.meta["val"]
    heads, dim = int(wv.shape[1]), int(wv.shape[3])
    width = int(feats.meta["val"].shape[-1])
    rank = min(rank, heads * dim)
    state = gm.get_submodule(f"{prefix}.l2a")
    state.register_parameter("correct_down", nn.Parameter(torch.zeros(rank, width, dtype=wv.dtype)))
    state.register_parameter("correct_up", nn.Parameter(torch.zeros(heads * dim, rank, dtype=wv.dtype)))
    state.register_parameter("correct_bias", nn.Parameter(torch.zeros(heads * dim, dtype=wv.dtype)))
    state.register_buffer("correct_from", torch.tensor(exact, dtype=torch.int64))
    at = f"{prefix}.l2a"
    low = b.call(aten.linear.default, feats, b.get_attr(f"{at}.correct_down"))
    corr = b.call(aten.linear.default, low, b.get_attr(f"{at}.correct_up"), b.get_attr(f"{at}.correct_bias"))
    corr = b.call(aten.transpose.int, b.call(aten.unflatten.int, corr, -1, [heads, dim]), 1, 2)  # (B, H, T, D)
    outside = b.call(aten.ge.Scalar, position, exact)  # (T,): tokens with keys outside the window
    mask = b.call(aten.unsqueeze.default, b.call(aten.to.dtype, outside, wv.dtype), -1)  # (T, 1)
    return _tag(b.call(aten.add.Tensor, win, b.call(aten.mul.Tensor, corr, mask)), prefix, "corrected")


def select_replacement(gm: fx.GraphModule, region: AttentionRegion, prefix: str, x_in: fx.Node, window: int,
                       sink: int = 0, position: fx.Node | None = None, rank: int = 0,
                       reads_window: bool = True) -> None:
    """Replaces the fused core of ``region`` by where(route, global, window + correction) (module
    docstring). ``position``: the graph's position arange (T,), None for no correction;
    ``reads_window``: the router reads the window output beside x_in."""
    core = region.core
    users = list(core.users)
    b = GraphBuilder(gm, core.next, like=core)
    at = f"{prefix}.l2a"
    opts = {name: op_arg(core, name) for name in ("softcap", "alibi_slopes", "sinks")}
    opts = {k: v for k, v in opts.items() if v not in (None, 0.0)}
    q, k, v = (op_arg(core, n) for n in ("q", "k", "v"))
    scale = float(op_arg(core, "scale"))
    # the sink op has no score options: a softcap / ALiBi / sinks-logit layer keeps the plain window
    win = _sink_window(b, q, k, v, scale, prefix, window, sink) if sink and not opts else core
    if win is core:
        set_op_args(core, window=window)
    both = _window_features(b, prefix, x_in, win) if reads_window or rank > 0 else None
    reads = both if reads_window else x_in
    select_state(gm, prefix, region, reads, window)
    logit = b.call(aten.linear.default, reads, b.get_attr(f"{at}.router_weight"), b.get_attr(f"{at}.router_bias"))
    logit = b.call(aten.squeeze.dim, logit, -1)  # (B, T)
    route = _tag(b.call(aten.ge.Tensor, logit, b.get_attr(f"{at}.threshold")), prefix, "route")
    glob = _tag(b.call(ROUTED, q, k, v, route, scale, **opts), prefix, "routed")
    skipped = _corrected(b, gm, prefix, both, win, position, window + (sink if win is not core else 0), rank)
    cond = b.call(aten.unsqueeze.default, b.call(aten.unsqueeze.default, route, 1), -1)  # (B, 1, T, 1)
    out = _tag(b.call(aten.where.self, cond, glob, skipped), prefix, "out")
    for user in users:
        user.replace_input_with(core, out)
    _tag(win, prefix, "window")
    if x_in.meta.get(TAG) is None:  # a tensor two layers share keeps its first tag
        _tag(x_in, prefix, "input")
