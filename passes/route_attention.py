"""Turn attention layers into L2A layers: sliding-window attention for every token plus a learned
router that sends only some tokens to global attention (TECHNIQUES.md section 1).

Two forms (option ``form``):
  ``add`` (default): the paper's additive form below, the recipe for training from scratch
    (``condfx.l2a.train_l2a``); not exact at insertion.
  ``select``: the retrofit form (``passes/route_attention_select.py``): each token's attention output
    is the full-causal or the window attention of the layer's own q/k/v, chosen by a router on the
    attention input; exact at insertion (every token routes), calibrated by an oracle without
    backpropagation (``condfx.l2a_retrofit``; ``skip`` and ``floor`` are its targets).

The add form rewrites (per selected attention region; x = the block's input stream, n = its input norm):
    x + c * post(o(attn(q(n(x)), k(n(x)), v(n(x)))))
        → h = x + c * post(o(condfx.attention(q, k, v, scale, window, opts)))   # window branch, base weights
          s = n'(h)                                                  # new norm, init from n
          logit = r(s) @ w_r^T                                       # w_r (1, d) zero-initialised
          route = logit >= 0                                         # (B, T) bool, inference rule
          gate = p + detach(float(route) - p),  p = sigmoid(logit / temperature)
          h + gate * c * post'(o'(condfx.routed_attention(q'(s), k'(s), v'(s), route | dense, scale, opts)))
  ``post`` (a post / sandwich norm: Gemma2/3, OLMo2/3, Exaone4) and ``c`` (a residual multiplier:
  Granite) are absent in most models; the global branch copies whatever the layer applies between its
  output projection and the residual add. ``opts`` are the core's score options (softcap, ALiBi slopes,
  sinks), given to both attention ops. A layer without an input norm (OLMo2) has s = h, and the router
  reads r(s) = s * rsqrt(mean(s²) + 1e-6); with one, r is the identity. A natively sliding layer keeps
  the smaller of its window and ``window`` in the window branch.
  Parallel blocks (GPT-J, GPT-NeoX: x + attn(n(x)) + mlp(n2(x)), whose attention residual add takes
  the MLP output): h = x + attn branch is built beside the block, and the gated global output joins
  the attention branch, so the MLP still reads x:  x + (attn + gate * global'(n'(h))) + mlp.
  q'/k'/v'/o' (with their QK-norms and biases), post', sinks' and n' are copies of the base weights, so
  the global branch starts as the base attention. ``gate`` is the hard 0/1 decision in the forward pass
  and carries the tempered sigmoid's gradient backward (straight-through). ``dense`` is a bool buffer
  the trainer sets on the dense-global steps. Not exact: at initialisation every logit is 0, every
  token is routed, and the layer computes attention twice; pair it with ``condfx.l2a.train_l2a``.

New state per layer, under ``<prefix>.l2a`` (prefix = the module owning the q projection, else the
  o projection): the
  copied weights, ``router_weight``, buffers ``layer``, ``dense``, ``route_stats``; nodes are tagged
  for ``condfx.patterns.routed.find_routed_layers``.

Requires: the canonical IR; attention regions with an output projection read from a ``get_attr``
  weight, a residual add, and q/k/v projected from one tensor. Fuses the selected regions first
  (``fuse-attention``). Must run before ``add-kv-cache``.

Does not handle: regions without an output projection or residual add (Falcon's matmul projections:
  the region finder leaves ``out`` unset), a residual stream that is not an ancestor of the q/k/v
  input: skipped with a reason; non-causal attention. Sinks that are not a parameter read directly
  are shared with the window branch, not copied. Paper: Choudhary et al., "Learning When to Attend", 2026.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from enum import Enum
from types import MappingProxyType
from typing import ClassVar

import torch
from torch import fx, nn

import condfx.ops  # noqa: F401  (registers torch.ops.condfx.*)
from condfx.options import BIG_INT, Bool, Float, Int, OneOf, Optional, check_options
from condfx.passes._insert import remove_dead_calls
from condfx.passes.base import GraphSnapshot, Pass, PassResult, layer_indices, select_layers
from condfx.passes.fuse_attention import FuseAttention, FuseAttentionConfig, is_fused_attention
from condfx.passes.graph_builder import GraphBuilder
from condfx.passes.op_args import op_arg, set_op_args
from condfx.passes.report import estimate_cost
from condfx.passes.route_attention_select import select_replacement
from condfx.passes.route_attention_stream import attention_add, block_stream, qkv_input
from condfx.patterns import _graph as g
from condfx.patterns import find_regions
from condfx.patterns._graph import get_attr_value
from condfx.patterns.regions import AttentionRegion, ResidualAdd
from condfx.patterns.routed import TAG

aten = torch.ops.aten
ROUTED = torch.ops.condfx.routed_attention.default


class RouterReads(Enum):
    """form=select: what the router reads. ``input``: the attention input x_in (the layer's normed
    stream); ``window``: x_in and the layer's own window-attention output (what the paper's router reads:
    the stream after the local branch)."""

    INPUT = "input"
    WINDOW = "window"


class RouteForm(Enum):
    """``add``: the paper's window + copied global branch (train it); ``select``: full or window
    attention of the same weights per token (exact at insertion, calibrated)."""

    ADD = "add"
    SELECT = "select"


_FRACTION = Float(0.0, 1.0, low_open=True, high_open=True)
_BOUNDS = MappingProxyType({
    "window": Int(1, BIG_INT), "temperature": Float(0.0, 1e3, low_open=True),
    "context": Optional(Int(1, BIG_INT)), "form": OneOf(RouteForm),
    "skip": Optional(_FRACTION), "floor": Optional(_FRACTION), "sink": Optional(Int(0, BIG_INT)),
    "correct": Optional(Int(0, BIG_INT)), "copies": Optional(Bool()), "router": Optional(OneOf(RouterReads)),
})
SELECT_SINK = 4  # form=select's default: the first tokens every window query keeps reading
SELECT_CORRECT = 0  # form=select's default rank of the window correction: off
SELECT_ROUTER = RouterReads.INPUT  # form=select's default router features


@dataclass(frozen=True)
class RouteAttentionConfig:
    """Options of ``route-attention``.

    Attributes:
        window: sliding-window size of the local branch (keys j with pos - window < j <= pos), >= 1.
        layers: layer indices to convert; None converts every attention region.
        temperature: router temperature of the sigmoid whose gradient trains the router, in (0, 1000].
        context: the model's context length when known; the window must be smaller than it.
        form: "add" (the paper's additive form, trained) or "select" (the retrofit form, calibrated).
        skip: form=select: the mean fraction of tokens that skip global attention after calibration,
            in (0, 1); None leaves every token routed.
        floor: form=select: the least fraction every converted layer skips, in (0, 1), at most
            ``skip``; None means ``skip`` (every layer skips the target).
        sink: form=select: the first tokens every window-branch query also reads (attention sinks,
            at their own positions), >= 0; None means 4. Small models park attention on the first
            tokens: on SmolLM2 a 128-token window without them costs +58% perplexity, with 4 +2.5%.
        correct: form=select: the rank of the fitted correction of the window branch (what the keys
            outside the window would have added, predicted from the attention input and the window
            output), >= 0; None means 0 (none). On SmolLM2 calibrated and scored on WikiText (window
            128, every layer skipping 60%) rank 128 takes the oracle router from +5.6% perplexity to
            +1.5%; calibrated on the essays and scored on WikiText (the ``stack`` recipe) it raised the
            routing loss from +0.05% to +0.9%: a correction fitted on one kind of text may not transfer.
        copies: form=select: also fit the router heads to calibration rows that repeat their first
            half (``condfx.l2a_retrofit.copy_rows``); None means False. On SmolLM2 calibrated and
            scored on WikiText it lowered the loss at the same skip (+5.0% → +3.7%); calibrated on
            the essays and scored on WikiText it raised it (+0.05% → +0.7% at 60% skipping).
        router: form=select: what the router reads, "input" (the attention input) or "window" (the
            attention input and the layer's window output: whether the window answered the query,
            which the input alone cannot say); None means "input". On an MQAR model (2 layers, window
            4) "window" keeps 73% of the accuracy at 60% skipped per layer where "input" keeps 22%; on
            SmolLM2 (WikiText, window 128) "input" is the better: +3.8% perplexity at 61% skipped in
            every layer against +4.9% at 56%.
    """

    window: int = 512
    layers: tuple[int, ...] | None = None
    temperature: float = 0.1
    context: int | None = None
    form: RouteForm = RouteForm.ADD
    skip: float | None = None
    floor: float | None = None
    sink: int | None = None
    correct: int | None = None
    copies: bool | None = None
    router: RouterReads | None = None

    def __post_init__(self):
        check_options(self, _BOUNDS)
        object.__setattr__(self, "layers", layer_indices(self.layers, "RouteAttentionConfig.layers"))
        w, c = self.window, self.context
        if c is not None and w >= c:
            msg = f"RouteAttentionConfig.window={w} must be smaller than the context length {c}."
            raise ValueError(msg)
        select_only = {"skip": self.skip, "floor": self.floor, "sink": self.sink, "correct": self.correct,
                       "copies": self.copies, "router": self.router}
        if self.form is RouteForm.ADD and any(v is not None for v in select_only.values()):
            given = ", ".join(f"{k}={v}" for k, v in select_only.items() if v is not None)
            msg = ("RouteAttentionConfig.skip, .floor, .sink, .correct, .copies and .router are read by form=select "
                   f"only; got form=add with {given}: drop them, or use form=select.")
            raise ValueError(msg)
        if self.skip is not None and self.floor is not None and self.floor > self.skip:
            msg = f"RouteAttentionConfig.floor={self.floor} must be at most skip={self.skip}."
            raise ValueError(msg)


def owner_prefix(region: AttentionRegion) -> str | None:
    """Dotted path of the module owning the q projection weight (``layers.0.attention``), or the
    output projection's when the q projection was not found (fused or QK-normed projections)."""
    proj = region.q_proj or region.o_proj
    w = proj.weight if proj is not None else None
    if w is None or w.op != "get_attr" or str(w.target).count(".") < 2:
        return None
    return str(w.target).rsplit(".", 2)[0]


def check_routable(gm: fx.GraphModule, region: AttentionRegion, add: ResidualAdd | None = None) -> str | None:
    """The skip reason for ``region``, or None when it can be converted.

    ``add`` is the region's residual add as ``find_regions`` records it (stream and branch operands).
    """
    if not region.causal:
        return "non-causal attention"
    if region.out is None or region.residual is None or add is None:
        return "no output projection or residual add"
    if qkv_input(region) is None:
        return "no q/k/v input"
    if block_stream(region, add) is None:
        return "the residual stream the attention reads was not found"
    prefix = owner_prefix(region)
    if prefix is None:
        return "q projection weight is not a get_attr"
    if hasattr(gm.get_submodule(prefix), "l2a"):
        return "already routed"
    return None


def _select_skip_reason(region: AttentionRegion) -> str | None:
    if region.window:
        return f"natively sliding layer (window {region.window}): its attention is already local"
    return None


def _tag(node: fx.Node, prefix: str, role: str) -> fx.Node:
    """Marks ``node`` for ``condfx.patterns.routed.find_routed_layers``."""
    node.meta[TAG] = (prefix, role)
    return node


def _copy_between(b: GraphBuilder, sources: dict, outputs: list, state: nn.Module, prefix: str,
                  role: str) -> list[fx.Node]:
    """Copies the nodes between ``sources`` and ``outputs`` (sources replaced by their values);
    parameters they read are cloned into ``state`` as ``<role>_<name>``. Returns the outputs' copies."""
    between = _between(list(sources), outputs)
    env = dict(sources)
    for node in b.graph.nodes:  # graph order
        if node not in between:
            continue
        for inp in node.all_input_nodes:
            if inp in env or inp.op != "get_attr":
                continue
            tensor = get_attr_value(b.gm, inp)
            if isinstance(tensor, nn.Parameter):
                name = f"{role}_{'_'.join(inp.target.split('.')[-2:])}"
                state.register_parameter(name, nn.Parameter(tensor.detach().clone()))
                env[inp] = b.get_attr(f"{prefix}.l2a.{name}")
        env[node] = b.copy(node, env)
    return [env[o] for o in outputs]


def _between(sources: list[fx.Node], outputs: list[fx.Node]) -> set[fx.Node]:
    """call_function nodes that depend on a source and feed an output (outputs included)."""
    down, stack = set(), list(sources)
    while stack:
        for user in stack.pop().users:
            if user not in down:
                down.add(user)
                stack.append(user)
    up, stack = set(), list(outputs)
    while stack:
        node = stack.pop()
        if node in up or node not in down:
            continue
        up.add(node)
        stack.extend(node.all_input_nodes)
    return {n for n in up if n.op == "call_function"}


def _state(gm: fx.GraphModule, prefix: str, region: AttentionRegion, window: int) -> nn.Module:
    state = nn.Module()
    d = region.out.meta["val"].shape[-1]
    dtype = region.out.meta["val"].dtype
    state.register_parameter("router_weight", nn.Parameter(torch.zeros(1, int(d), dtype=dtype)))
    state.register_buffer("layer", torch.tensor(region.layer, dtype=torch.int64))
    state.register_buffer("window", torch.tensor(window, dtype=torch.int64))
    state.register_buffer("dense", torch.tensor(False))
    state.register_buffer("route_stats", torch.zeros(2, dtype=torch.float64))
    gm.get_submodule(prefix).add_module("l2a", state)
    return state


def _rms(b: GraphBuilder, x: fx.Node, eps: float = 1e-6) -> fx.Node:
    """x * rsqrt(mean(x², -1) + eps): the router's input where the layer has no input norm."""
    ms = b.call(aten.mean.dim, b.call(aten.mul.Tensor, x, x), [-1], True)
    return b.call(aten.mul.Tensor, x, b.call(aten.rsqrt.default, b.call(aten.add.Tensor, ms, eps)))


def _global_options(b: GraphBuilder, core: fx.Node, state: nn.Module, prefix: str) -> dict:
    """The window core's score options for the routed op; a sinks parameter is copied as ``global_sinks``."""
    opts = {name: op_arg(core, name) for name in ("softcap", "alibi_slopes", "sinks")}
    sinks = opts["sinks"]
    if isinstance(sinks, fx.Node) and sinks.op == "get_attr":
        tensor = get_attr_value(b.gm, sinks)
        if isinstance(tensor, nn.Parameter):
            state.register_parameter("global_sinks", nn.Parameter(tensor.detach().clone()))
            opts["sinks"] = b.get_attr(f"{prefix}.l2a.global_sinks")
    return {k: v for k, v in opts.items() if v not in (None, 0.0)}


def route_attention_replacement(gm: fx.GraphModule, region: AttentionRegion, add: ResidualAdd,
                                cfg: RouteAttentionConfig) -> None:
    """Inserts the router and the global branch at ``region``'s residual add (module docstring)."""
    prefix = owner_prefix(region)
    window = min(cfg.window, region.window or cfg.window)  # a natively sliding layer keeps its own
    state = _state(gm, prefix, region, window)
    x, parallel = block_stream(region, add)
    x_in = qkv_input(region)
    res = region.residual
    set_op_args(region.core, window=window)  # the window branch
    # sequential: h = res, the global output is added after it; parallel: h = x + branch is built
    # beside res, and the gated global output joins the branch operand of res.
    b = GraphBuilder(gm, res if parallel else res.next, like=res)
    h = b.call(aten.add.Tensor, x, add.branch) if parallel else res
    (s,) = _copy_between(b, {x: h}, [x_in], state, prefix, "norm")
    reads_stream = g.skip_identity(x_in) is g.skip_identity(x)
    logit = b.call(aten.linear.default, _rms(b, s) if reads_stream else s, b.get_attr(f"{prefix}.l2a.router_weight"))
    logit = b.call(aten.squeeze.dim, logit, -1)
    prob = _tag(b.call(aten.sigmoid.default, b.call(aten.div.Tensor, logit, cfg.temperature)), prefix, "prob")
    route = _tag(b.call(aten.ge.Scalar, logit, 0.0), prefix, "route")
    hard = b.call(aten.to.dtype, route, logit.meta["val"].dtype)
    gate = b.call(aten.add.Tensor, prob, b.call(aten.detach.default, b.call(aten.sub.Tensor, hard, prob)))
    attend = b.call(aten.logical_or.default, route, b.get_attr(f"{prefix}.l2a.dense"))
    q, k, v = _copy_between(b, {x_in: s}, [region.q, region.k, region.v], state, prefix, "global")
    opts = _global_options(b, region.core, state, prefix)
    core = _tag(b.call(ROUTED, q, k, v, attend, float(region.scale), **opts), prefix, "routed")
    (o,) = _copy_between(b, {region.core: core}, [add.branch], state, prefix, "global")  # o', post', c
    gated = b.call(aten.mul.Tensor, o, b.call(aten.unsqueeze.default, b.call(aten.to.dtype, gate, o.meta["val"].dtype), -1))
    if parallel:
        out = _tag(b.call(aten.add.Tensor, add.branch, gated), prefix, "out")
        res.replace_input_with(add.branch, out)
        return
    out = _tag(b.call(aten.add.Tensor, res, gated), prefix, "out")
    created = set(b.created)
    res.replace_all_uses_with(out, delete_user_cb=lambda user: user not in created)


def _position_arange(gm: fx.GraphModule) -> fx.Node | None:
    """The graph's first position ``arange(T)`` (feeding RoPE or a position table), or None."""
    from condfx.passes.decode.positions import find_position_aranges

    inputs = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(inputs) != 1 or inputs[0].meta.get("val") is None or inputs[0].meta["val"].dim() < 2:
        return None
    found = find_position_aranges(gm, inputs[0])
    return found[0] if found else None


class RouteAttention(Pass):
    """``route-attention``: attention regions → window branch + router + routed global branch (form=select:
    each token takes the full or the window attention of the same q/k/v)."""

    name: ClassVar[str] = "route-attention"
    config_class: ClassVar[type] = RouteAttentionConfig
    matches: ClassVar[str] = "attention region"
    exact: ClassVar[bool] = False

    def requires(self, gm: fx.GraphModule) -> None:
        """The shared invariants and the order rules (``passes/decode_rules.ORDER_RULES``)."""
        from condfx.passes.decode_rules import check_order

        super().requires(gm)
        check_order(gm, self.name)

    def __call__(self, gm: fx.GraphModule) -> PassResult:
        snapshot = GraphSnapshot.take(gm)
        cfg = self.config
        before = find_regions(gm)
        chosen = select_layers(self.name, cfg.layers, (r.layer for r in before.attention))
        wanted = [r for r in before.attention if r.layer in chosen]
        skipped, todo = [], []
        for region in wanted:
            reason = check_routable(gm, region, attention_add(region, before.residuals))
            if reason is None and cfg.form is RouteForm.SELECT:
                reason = _select_skip_reason(region)
            (skipped.append((reason, f"layer {region.layer}")) if reason else todo.append(region.layer))
        if todo:
            FuseAttention(FuseAttentionConfig(layers=tuple(todo)))(gm)
            fused = find_regions(gm)
            position = _position_arange(gm) if cfg.form is RouteForm.SELECT else None
            for region in fused.attention:
                if not (region.layer in todo and is_fused_attention(region.core)):
                    continue
                if cfg.form is RouteForm.SELECT:
                    sink = SELECT_SINK if cfg.sink is None else cfg.sink
                    rank = SELECT_CORRECT if cfg.correct is None else cfg.correct
                    reads = (SELECT_ROUTER if cfg.router is None else cfg.router) is RouterReads.WINDOW
                    select_replacement(gm, region, owner_prefix(region), qkv_input(region), cfg.window, sink,
                                       position, rank, reads_window=reads)
                else:
                    route_attention_replacement(gm, region, attention_add(region, fused.residuals), cfg)
            remove_dead_calls(gm.graph)
            gm.graph.lint()
            gm.recompile()
        after = find_regions(gm).attention
        globals_ = [dataclasses.replace(r, window=None) for r in after if r.layer in todo]
        report = snapshot.report(
            gm, self.name, matched=len(wanted), rewritten=len(todo), skipped=tuple(skipped),
            near_misses=tuple(str(f) for f in before.failures if f.kind in ("", "attention")),
            cost_before=estimate_cost(before.attention, before.ffn),
            cost_after=estimate_cost(after + globals_, before.ffn),  # global branch counted dense
        )
        return PassResult(gm, bool(todo), report)
