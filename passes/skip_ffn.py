"""Skip saturated FFN blocks per token (FFN-SkipLLM): ``condfx.masked_ffn`` plus an in-graph policy.

Rewrites (FFN regions in graph order, n = their number; layers ``cold_start <= i < n - cold_end``):
    h_out = h_in + down(act(...x...))
        → execute_i = (countdown == 0) | (position < warmup)                      # (B, T) bool
          update_i, cos_i = condfx.masked_ffn(x, h_in, execute_i, weights..., kind, act, layout)
          h_out = h_in + update_i
          countdown = where(execute_i & ~warm & (cos_i >= threshold), span, max(countdown - 1, 0))
  The countdown (B, T) int64 starts at 0 and flows from layer to layer as tensor data; once an
  executed FFN's cos(h_in, h_out) reaches ``threshold`` the next ``span`` FFNs of that token are
  skipped. Cold layers keep their original FFN. Lossy (``exact = False``), except that a config
  under which no row ever skips reproduces the original outputs.

``policy=forecast`` (Informed Routing) rewrites each non-cold FFN instead to
          logit_i = router_i(x)  (Linear d→H, ReLU, Linear H→1; parameters skip_ffn_router_*)
          execute_i = (logit_i > 0) | (position < warmup)
          update_i, _ = condfx.masked_ffn(x, h_in, execute_i, ...)
          g = float(execute_i)[..., None]
          h_out = h_in + g * update_i + (1 - g) * forecast_i(x)   (x A^T B^T + c, rank r; skip_ffn_forecast_*)
  so a routed-out row gets the low-rank forecast of the FFN's update instead of nothing. The new
  parameters sit next to the FFN module (e.g. ``layers.3.feed_forward.skip_ffn_router_w1``); untrained
  (no ``state``) every row executes. ``condfx.forecast`` fits and trains them and writes the
  ``state`` file (safetensors with the model identity, checked here). The logit/execute/gate/FFN nodes
  are tagged in ``node.meta["condfx_forecast"]`` for its training view.

Positions: the policy reads the model's own position ``arange`` (the one feeding RoPE or the
  position embedding, found with ``add_kv_cache.find_position_aranges``), so when ``add-kv-cache``
  runs afterwards it offsets that arange by the cache length and warm-up counts absolute positions.
  In a graph already in decode form the offset arange (any start) that feeds the positions is used.

Prefill and decoding: the policy is applied to every token at position >= warmup, in prefill too.
  Each token's decision depends only on its own row (h_in, cos and the countdown are per row), so a
  full-sequence forward gives the same logits as token-by-token decoding; for teacher-forced
  "decode-mode" evaluation run the graph on the full sequence.

Cost: which FFNs run is decided at run time, so the report's FFN FLOPs/token estimate is the dense
  one (an upper bound); measure the skipped fraction with ``measure_skip_fraction``.

Requires: the canonical IR and FFN regions whose residual add was found; runs before or after
  ``fuse-attention`` and before ``add-kv-cache``.

Does not handle: fused gate/up projections (one weight split in two), projections whose weight is
  not a plain ``get_attr``, FFNs without a residual add; each is skipped with a reason.
"""

from __future__ import annotations

import operator
from collections import Counter
from dataclasses import dataclass
from enum import Enum
from typing import ClassVar

import torch
from torch import fx, nn

import condfx.ops  # noqa: F401  (registers torch.ops.condfx.*)
from condfx.passes._insert import remove_dead_calls
from condfx.passes.add_kv_cache import find_position_aranges, is_decode_form
from condfx.passes.base import GraphSnapshot, Pass, PassResult
from condfx.passes.report import estimate_cost
from condfx.patterns import find_regions
from condfx.patterns.regions import FFNKind, FFNRegion, ResidualAdd

MASKED_FFN = torch.ops.condfx.masked_ffn.default
aten = torch.ops.aten
_COPIED_META = ("nn_module_stack", "stack_trace", "source_fn_stack", "from_node")


class SkipPolicy(Enum):
    """How the execute mask is decided: FFN-SkipLLM similarity, or Informed Routing's router + forecast."""

    SIMILARITY = "similarity"
    FORECAST = "forecast"


@dataclass(frozen=True)
class SkipFFNConfig:
    """Options of ``skip-ffn``.

    Attributes:
        policy: the decision rule ("similarity": FFN-SkipLLM).
        threshold: cos(h_in, h_out) at or above which the next ``span`` FFNs are skipped, in (0, 1].
        span: FFNs skipped after a saturated one, >= 1.
        cold_start: first FFN layers never skipped, >= 0.
        cold_end: last FFN layers never skipped, >= 0.
        warmup: tokens at positions < warmup always run every FFN, >= 0.
        rank: forecast policy: rank of each FFN's low-rank forecaster, >= 1.
        router_hidden: forecast policy: hidden width of each FFN's router MLP, >= 1.
        state: forecast policy: safetensors file of trained routers and forecasters
            (``condfx.forecast.save_state``); None gives the untrained state, under which every
            row executes and the rewritten graph reproduces the original outputs.
    """

    policy: SkipPolicy = SkipPolicy.SIMILARITY
    threshold: float = 0.9
    span: int = 1
    cold_start: int = 1
    cold_end: int = 1
    warmup: int = 0
    rank: int = 32
    router_hidden: int = 64
    state: str | None = None

    def __post_init__(self):
        bad = f"SkipFFNConfig.policy must be 'similarity' or 'forecast'; got {self.policy!r}."
        if isinstance(self.policy, str):
            try:
                object.__setattr__(self, "policy", SkipPolicy(self.policy))
            except ValueError:
                raise ValueError(bad) from None
        if not isinstance(self.policy, SkipPolicy):
            raise ValueError(bad)
        if self.state is not None and not isinstance(self.state, str):
            msg = f"SkipFFNConfig.state must be a safetensors file path or None; got {self.state!r}."
            raise ValueError(msg)
        t = self.threshold
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0.0 < t <= 1.0:
            msg = f"SkipFFNConfig.threshold must be a number in (0, 1]; got {t!r}."
            raise ValueError(msg)
        object.__setattr__(self, "threshold", float(t))
        for name, low in (("span", 1), ("cold_start", 0), ("cold_end", 0), ("warmup", 0), ("rank", 1),
                          ("router_hidden", 1)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                msg = f"SkipFFNConfig.{name} must be an int >= {low}; got {v!r}."
                raise ValueError(msg)


def is_masked_ffn(node: fx.Node) -> bool:
    """True when ``node`` is a ``condfx.masked_ffn`` call."""
    return node.op == "call_function" and node.target is MASKED_FFN


def _act_name(region: FFNRegion) -> str:
    act = region.act
    if act.op == "call_function" and act.target is aten.silu.default:
        return "silu"
    if act.op == "call_function" and act.target is aten.gelu.default:
        return "gelu_tanh" if act.kwargs.get("approximate", "none") == "tanh" else "gelu"
    if region.kind is FFNKind.SWIGLU and act.target is aten.mul.Tensor:
        return "silu"  # x * sigmoid(x)
    return "gelu_tanh"  # the explicit tanh formula (HF "gelu_new")


def _unsupported(region: FFNRegion, residuals: dict[fx.Node, ResidualAdd]) -> str | None:
    """The skip reason for ``region``, or None when it can be rewritten."""
    if region.residual is None or region.residual not in residuals:
        return "no residual add"
    refs = [r for r in (region.up, region.gate, region.down) if r is not None]
    if any(r.out_slice is not None for r in refs):
        return "fused gate/up projection"
    if any(r.weight is None or r.weight.op != "get_attr" for r in refs):
        return "weight is not a get_attr"
    if any(b is not None and b.op != "get_attr" for b in (r.bias for r in refs)):
        return "bias is not a get_attr"
    if len({r.weight_layout for r in refs}) != 1:
        return "mixed weight layouts"
    return None


class _Builder:
    """Inserts nodes before an anchor and gives each its FakeTensor value."""

    def __init__(self, graph: fx.Graph, meta_from: fx.Node):
        self.graph, self.meta_from = graph, meta_from

    def __call__(self, target, *args, **kwargs) -> fx.Node:
        node = self.graph.call_function(target, args, kwargs)
        fake = lambda a: a.meta["val"] if isinstance(a, fx.Node) else a  # noqa: E731
        vals = fx.node.map_aggregate(args, fake)
        kvals = fx.node.map_aggregate(kwargs, fake)
        mode = self.meta_from.meta["val"].fake_mode
        with mode:
            node.meta["val"] = target(*vals, **kvals)
        for key in _COPIED_META:
            if key in self.meta_from.meta:
                node.meta[key] = self.meta_from.meta[key]
        return node


def _position_node(gm: fx.GraphModule) -> fx.Node | None:
    """The model's token-position arange (offset by the cache length in decode form), or None."""
    ids = next(n for n in gm.graph.nodes if n.op == "placeholder")
    if not is_decode_form(gm):
        found = find_position_aranges(gm, ids)
        return found[0] if found else None
    from condfx.passes.add_kv_cache import _reaches_position_use

    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target is aten.arange.start and _reaches_position_use(node):
            return node
    return None


def _controller_start(b: _Builder, region: FFNRegion, pos: fx.Node | None, warmup: int):
    """(countdown zeros (B, T) int64, warm (B, T) bool or None) built from the first region's input."""
    row = b(aten.select.int, region.x_in, -1, 0)  # (B, T)
    countdown = b(aten.zeros_like.default, row, dtype=torch.int64)
    if warmup == 0:
        return countdown, None
    if pos is None:
        t = b(aten.sym_size.int, region.x_in, 1)
        pos = b(aten.arange.default, t, device=region.x_in.meta["val"].device)
    warm = b(aten.lt.Scalar, pos, warmup)  # (T,)
    zeros_b = b(aten.zeros_like.default, row, dtype=torch.bool)
    return countdown, b(aten.bitwise_or.Tensor, zeros_b, warm)  # (B, T)


def _rewrite_region(b: _Builder, region: FFNRegion, res: ResidualAdd, countdown, warm, cfg) -> fx.Node:
    """Inserts the masked FFN and the countdown update; returns the new countdown."""
    execute = b(aten.eq.Scalar, countdown, 0)  # (B, T)
    if warm is not None:
        execute = b(aten.bitwise_or.Tensor, execute, warm)
    gate = region.gate
    args = (
        region.x_in, res.stream, execute, region.up.weight, region.up.bias,
        gate.weight if gate else None, gate.bias if gate else None,
        region.down.weight, region.down.bias,
        region.kind.value, _act_name(region), region.up.weight_layout,
    )
    fused = b(MASKED_FFN, *args)
    update = b(operator.getitem, fused, 0)  # (B, T, d)
    cos = b(operator.getitem, fused, 1)  # (B, T)
    res.node.replace_input_with(res.branch, update)
    trigger = b(aten.logical_and.default, execute, b(aten.ge.Scalar, cos, cfg.threshold))
    if warm is not None:
        trigger = b(aten.logical_and.default, trigger, b(aten.logical_not.default, warm))
    left = b(aten.clamp_min.default, b(aten.sub.Tensor, countdown, 1), 0)
    return b(aten.where.ScalarSelf, trigger, cfg.span, left)


FORECAST_PARAMS = ("router_w1", "router_b1", "router_w2", "router_b2", "forecast_a", "forecast_b",
                   "forecast_c")
_ROLE = "condfx_forecast"  # node.meta key: (role, routed-layer index) for condfx.forecast's training view


def _forecast_params(gm: fx.GraphModule, region: FFNRegion, cfg: SkipFFNConfig, index: int) -> dict[str, str]:
    """Registers one FFN's router and forecaster next to its module; returns short name -> target.

    Untrained values: the router's output bias is +1 and its output weight 0 (every row executes),
    the forecaster is 0; the first router layer is random (seeded by ``index``) so training can start.
    """
    owner = region.down.weight.target.rsplit(".", 1)[0]  # e.g. layers.3.feed_forward.w2
    parent = owner.rsplit(".", 1)[0] if "." in owner else ""
    module = gm.get_submodule(parent)
    ref = _fetch_attr(gm, region.down.weight.target)
    d, h, r = region.dim, cfg.router_hidden, cfg.rank
    g = torch.Generator().manual_seed(1000 + index)
    values = {
        "router_w1": torch.randn(h, d, generator=g) / d**0.5, "router_b1": torch.zeros(h),
        "router_w2": torch.zeros(1, h), "router_b2": torch.ones(1),
        "forecast_a": torch.zeros(r, d), "forecast_b": torch.zeros(d, r), "forecast_c": torch.zeros(d),
    }
    targets = {}
    for short, value in values.items():
        name = f"skip_ffn_{short}"
        if hasattr(module, name):
            msg = f"skip-ffn: {parent or 'the model'} already has an attribute {name!r}."
            raise ValueError(msg)
        module.register_parameter(name, nn.Parameter(value.to(ref.device, ref.dtype), requires_grad=False))
        targets[short] = f"{parent}.{name}" if parent else name
    return targets


def _fetch_attr(gm: fx.GraphModule, target: str) -> torch.Tensor:
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _get_attr(b: _Builder, gm: fx.GraphModule, target: str) -> fx.Node:
    node = b.graph.get_attr(target)
    mode = b.meta_from.meta["val"].fake_mode
    node.meta["val"] = mode.from_tensor(_fetch_attr(gm, target), static_shapes=True)
    return node


def _rewrite_region_forecast(b: _Builder, gm, region: FFNRegion, res: ResidualAdd, warm, params, index):
    """Router → execute mask → masked FFN; routed-out rows get the low-rank forecast of the update."""
    p = {k: _get_attr(b, gm, v) for k, v in params.items()}
    x = region.x_in
    hidden = b(aten.relu.default, b(aten.linear.default, x, p["router_w1"], p["router_b1"]))  # (B, T, H)
    logit = b(aten.squeeze.dim, b(aten.linear.default, hidden, p["router_w2"], p["router_b2"]), -1)  # (B, T)
    execute = b(aten.gt.Scalar, logit, 0.0)  # (B, T) bool
    if warm is not None:
        execute = b(aten.bitwise_or.Tensor, execute, warm)
    gate = region.gate
    args = (
        x, res.stream, execute, region.up.weight, region.up.bias,
        gate.weight if gate else None, gate.bias if gate else None,
        region.down.weight, region.down.bias,
        region.kind.value, _act_name(region), region.up.weight_layout,
    )
    fused = b(MASKED_FFN, *args)
    update = b(operator.getitem, fused, 0)  # (B, T, d): 0 on routed-out rows
    low = b(aten.linear.default, x, p["forecast_a"])  # (B, T, r)
    guess = b(aten.linear.default, low, p["forecast_b"], p["forecast_c"])  # (B, T, d)
    dtype = update.meta["val"].dtype
    g = b(aten.unsqueeze.default, b(aten._to_copy.default, execute, dtype=dtype), -1)  # (B, T, 1)
    blended = b(aten.add.Tensor, b(aten.mul.Tensor, update, g), b(aten.mul.Tensor, guess, b(aten.rsub.Scalar, g, 1)))
    res.node.replace_input_with(res.branch, blended)
    for node, role in ((logit, "logit"), (execute, "execute"), (g, "gate"), (fused, "ffn")):
        node.meta[_ROLE] = (role, index)


def _load_state(gm: fx.GraphModule, path: str) -> dict[str, torch.Tensor]:
    """Reads a forecast-policy state file and checks it was made for this model."""
    import json
    import os

    from safetensors import safe_open

    from condfx.calibrate import model_identity

    if not os.path.isfile(path):
        msg = f"skip-ffn state file {path!r} does not exist."
        raise ValueError(msg)
    with safe_open(path, framework="pt") as f:
        meta = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    theirs = json.loads(meta.get("identity", "{}"))
    mine = model_identity(gm)
    if theirs != mine:
        msg = (
            f"skip-ffn state file {path} was made for a different model (n_layers {theirs.get('n_layers')}, "
            f"dim {theirs.get('dim')}, hash {theirs.get('hash')}) than this one (n_layers "
            f"{mine['n_layers']}, dim {mine['dim']}, hash {mine['hash']}); retrain for this model."
        )
        raise ValueError(msg)
    return tensors


def _copy_state(gm: fx.GraphModule, state: dict[str, torch.Tensor], added: list[str], path) -> None:
    if set(state) != set(added):
        msg = (
            f"skip-ffn state file {path} holds {len(state)} tensors but this rewrite has {len(added)} "
            "learned parameters (different cold regions, rank or router_hidden?); use the options it was trained with."
        )
        raise ValueError(msg)
    with torch.no_grad():
        for name in added:
            param = _fetch_attr(gm, name)
            if param.shape != state[name].shape:
                msg = (f"skip-ffn state file {path}: {name} has shape {tuple(state[name].shape)}, the rewrite "
                       f"needs {tuple(param.shape)} (different rank or router_hidden?).")
                raise ValueError(msg)
            param.copy_(state[name])


class SkipFFN(Pass):
    """``skip-ffn``: FFN regions outside the cold layers → ``condfx.masked_ffn`` with a skip policy."""

    name: ClassVar[str] = "skip-ffn"
    config_class: ClassVar[type] = SkipFFNConfig
    matches: ClassVar[str] = "FFN region"
    exact: ClassVar[bool] = False

    def __call__(self, gm: fx.GraphModule) -> PassResult:
        snapshot = GraphSnapshot.take(gm)
        cfg = self.config
        regions = find_regions(gm)
        ffn = regions.ffn
        existing = [n for n in gm.graph.nodes if is_masked_ffn(n)]
        skipped = [("already rewritten", f"node {n.name}") for n in existing]
        n = len(ffn) + len(existing)
        if ffn and not existing and cfg.cold_start + cfg.cold_end >= n:
            msg = (
                f"skip-ffn cold_start={cfg.cold_start} + cold_end={cfg.cold_end} leave none of the "
                f"{n} FFN layers to skip; they must add up to less than {n}."
            )
            raise ValueError(msg)
        residuals = {r.node: r for r in regions.residuals}
        todo = []
        for i, region in enumerate(ffn if not existing else []):
            reason = _unsupported(region, residuals)
            if i < cfg.cold_start or i >= n - cfg.cold_end:
                reason = "cold region"
            if reason:
                skipped.append((reason, f"layer {region.layer}"))
            else:
                todo.append(region)
        if todo:
            self._rewrite(gm, todo, residuals)
            gm.meta["condfx_ffn_layers"] = (n, len(todo))  # (all FFN layers, masked ones): runtime counting
        report = snapshot.report(
            gm, self.name, matched=n, rewritten=len(todo), skipped=tuple(skipped),
            near_misses=tuple(str(f) for f in regions.failures if f.kind in ("", "ffn")),
            cost_before=estimate_cost(regions.attention, ffn),
            cost_after=estimate_cost(regions.attention, ffn),  # decided at run time: see docstring
        )
        return PassResult(gm, bool(todo), report)

    def _rewrite(self, gm: fx.GraphModule, todo: list[FFNRegion], residuals) -> None:
        cfg, graph = self.config, gm.graph
        forecast = cfg.policy is SkipPolicy.FORECAST
        state = _load_state(gm, cfg.state) if forecast and cfg.state else None
        if forecast:
            from condfx.calibrate import model_identity

            gm.meta["condfx_identity"] = model_identity(gm)  # what condfx.forecast.save_state records
        pos = _position_node(gm) if cfg.warmup else None
        first = residuals[todo[0].residual]
        with graph.inserting_before(first.node):
            countdown, warm = _controller_start(_Builder(graph, first.node), todo[0], pos, cfg.warmup)
        added: list[str] = []
        for i, region in enumerate(todo):
            res = residuals[region.residual]
            with graph.inserting_before(res.node):
                b = _Builder(graph, res.node)
                if forecast:
                    params = _forecast_params(gm, region, cfg, i)
                    added += params.values()
                    _rewrite_region_forecast(b, gm, region, res, warm, params, i)
                else:
                    countdown = _rewrite_region(b, region, res, countdown, warm, cfg)
        if state is not None:
            _copy_state(gm, state, added, cfg.state)
        remove_dead_calls(graph)
        graph.lint()
        gm.recompile()


def measure_skip_fraction(gm: fx.GraphModule, *inputs: torch.Tensor) -> dict:
    """Runs ``gm`` on ``inputs`` and counts the rows each ``condfx.masked_ffn`` node skipped.

    Args:
        gm: a module rewritten by ``skip-ffn``.
        *inputs: its inputs (e.g. input_ids (B, T)).

    Returns:
        {"per_node": {node name: skipped fraction}, "skipped_rows", "rows" (over masked FFNs),
        "fraction" (skipped / rows of the masked FFNs), "ffn_layers" (all FFN layers, cold ones
        included), "fraction_of_all_ffn" (skipped rows / (rows per layer x all FFN layers))}.
    """
    counts: Counter = Counter()
    totals: Counter = Counter()

    class _Counting(fx.Interpreter):
        def run_node(self, node):
            out = super().run_node(node)
            if is_masked_ffn(node):
                execute = self.env[node.args[2]]
                counts[node.name] += int((~execute).sum())
                totals[node.name] += execute.numel()
            return out

    with torch.no_grad():
        _Counting(gm).run(*inputs)
    rows, skipped = sum(totals.values()), sum(counts.values())
    cold = sum(1 for _ in find_regions(gm).ffn)  # the untouched (cold) FFN regions
    layers = cold + len(totals)
    per_layer_rows = rows / len(totals) if totals else 0
    return {
        "per_node": {k: counts[k] / totals[k] for k in totals},
        "skipped_rows": skipped,
        "rows": rows,
        "fraction": skipped / rows if rows else 0.0,
        "ffn_layers": layers,
        "fraction_of_all_ffn": skipped / (per_layer_rows * layers) if layers and rows else 0.0,
    }
