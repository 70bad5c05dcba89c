"""``skip-ffn{policy=forecast}`` (Informed Routing): a learned router decides which rows execute;
a routed-out row gets a low-rank forecast of the FFN's update instead of nothing.

Rewrites (per rewritten FFN i):
    logit_i = router_i(x)  (Linear d→H, ReLU, Linear H→1; parameters skip_ffn_router_*)
    execute_i = (logit_i > 0) | warm
    update_i, _ = condfx.masked_ffn(x, h_in, execute_i, ...)
    g = float(execute_i)[..., None]
    h_out = h_in + g * update_i + (1 - g) * forecast_i(x)   (x A^T B^T + c, rank r; skip_ffn_forecast_*)
  The parameters sit next to the FFN module (``layers.3.feed_forward.skip_ffn_router_w1``);
  untrained (no ``state``) every row executes. ``condfx.forecast`` trains them and writes the state
  file (safetensors with the model identity: shapes and the SHA256 of the weights, checked here,
  with the list of its tensors; partial, non-finite or corrupt files are refused). The logit/execute/gate/FFN nodes are
  tagged ``node.meta[FORECAST_ROLE] = (role, index)`` for its training view.
"""

from __future__ import annotations

import operator
from typing import TYPE_CHECKING

import torch
from torch import fx, nn

from condfx.options import check_allocation
from condfx.passes.graph_builder import GraphBuilder
from condfx.passes.model_identity import check_identity, model_identity, read_state_file
from condfx.passes.skip_ffn_policy import FFNSite, call_masked_ffn
from condfx.patterns import _graph as g
from condfx.patterns import find_regions
from condfx.patterns.regions import FFNRegion

if TYPE_CHECKING:
    from condfx.passes.skip_ffn_config import SkipFFNConfig

aten = torch.ops.aten
FORECAST_PARAMS = ("router_w1", "router_b1", "router_w2", "router_b2", "forecast_a", "forecast_b",
                   "forecast_c")
FORECAST_ROLE = "condfx_forecast"  # node.meta key: (role, routed-layer index) for condfx.forecast


def _owner(region: FFNRegion) -> str:
    """Dotted path of the module holding the FFN (``layers.3.feed_forward``), "" for the root."""
    owner = region.down.weight.target.rsplit(".", 1)[0]  # e.g. layers.3.feed_forward.w2
    return owner.rsplit(".", 1)[0] if "." in owner else ""


def forecast_targets(region: FFNRegion) -> dict[str, str]:
    """Short parameter name → dotted target of one FFN's router and forecaster."""
    parent = _owner(region)
    return {p: f"{parent}.skip_ffn_{p}" if parent else f"skip_ffn_{p}" for p in FORECAST_PARAMS}


def _register_params(gm: fx.GraphModule, cfg: SkipFFNConfig, site: FFNSite) -> dict[str, str]:
    """Registers one FFN's router and forecaster next to its module; returns short name -> target.

    Untrained values: the router's output bias is +1 and its output weight 0 (every row executes),
    the forecaster is 0; the first router layer is random (seeded by the index) so training can start.
    """
    region, parent = site.region, _owner(site.region)
    module = gm.get_submodule(parent)
    ref = g.get_attr_value(gm, region.down.weight)
    d, h, r = region.dim, cfg.router_hidden, cfg.rank
    gen = torch.Generator().manual_seed(1000 + site.index)
    values = {
        "router_w1": torch.randn(h, d, generator=gen) / d**0.5, "router_b1": torch.zeros(h),
        "router_w2": torch.zeros(1, h), "router_b2": torch.ones(1),
        "forecast_a": torch.zeros(r, d), "forecast_b": torch.zeros(d, r), "forecast_c": torch.zeros(d),
    }
    for short, value in values.items():
        name = f"skip_ffn_{short}"
        if hasattr(module, name):
            msg = f"skip-ffn: {parent or 'the model'} already has an attribute {name!r}."
            raise ValueError(msg)
        module.register_parameter(name, nn.Parameter(value.to(ref.device, ref.dtype), requires_grad=False))
    return forecast_targets(region)


def load_state(gm: fx.GraphModule, path: str) -> dict[str, torch.Tensor]:
    """Reads a forecast-policy state file and checks it was made for this model's weights.

    Raises:
        ValueError: the file does not exist, is unreadable, partial or non-finite, or was made for
            other weights (``model_identity``: shapes and the SHA256 of every weight).
    """
    what = "skip-ffn state file"
    tensors, meta = read_state_file(path, what)
    check_identity(meta.get("identity"), model_identity(gm), f"{what} {path!r}", "retrain it")
    return tensors


def new_tensor_bytes(gm: fx.GraphModule, cfg: SkipFFNConfig) -> tuple[int, int]:
    """(bytes of the routers and forecasters the pass would add, the model width d)."""
    ffn = find_regions(gm).ffn
    if not ffn:
        return 0, 0
    d, h, r = ffn[0].dim, cfg.router_hidden, cfg.rank
    ref = g.get_attr_value(gm, ffn[0].down.weight) if ffn[0].down.weight is not None else None
    itemsize = ref.element_size() if isinstance(ref, torch.Tensor) else 4
    per_layer = h * d + 2 * h + 1 + 2 * r * d + d
    return len(ffn) * per_layer * itemsize, d


def _copy_state(gm: fx.GraphModule, state: dict[str, torch.Tensor], added: list[str], path) -> None:
    if set(state) != set(added):
        msg = (
            f"skip-ffn state file {path} holds {len(state)} tensors but this rewrite has {len(added)} "
            "learned parameters (different cold regions, rank or router_hidden?); use the options it was trained with."
        )
        raise ValueError(msg)
    with torch.no_grad():
        for name in added:
            param = gm.get_parameter(name)
            if param.shape != state[name].shape:
                msg = (f"skip-ffn state file {path}: {name} has shape {tuple(state[name].shape)}, the rewrite "
                       f"needs {tuple(param.shape)} (different rank or router_hidden?).")
                raise ValueError(msg)
            param.copy_(state[name])


class ForecastPolicy:
    """Router → execute mask → masked FFN, routed-out rows blended with the forecast; no carry."""

    def prepare(self, gm: fx.GraphModule, cfg: SkipFFNConfig) -> dict[str, torch.Tensor] | None:
        """Loads and checks the ``state`` file (None without one) and records the model identity
        in ``gm.meta["condfx_identity"]`` (what ``condfx.forecast.save_state`` writes)."""
        nbytes, d = new_tensor_bytes(gm, cfg)
        if d and cfg.rank > d:
            msg = (f"skip-ffn rank={cfg.rank} exceeds the model width {d}: a low-rank forecaster "
                   f"of a {d}-wide update has rank at most {d}.")
            raise ValueError(msg)
        check_allocation(f"skip-ffn rank={cfg.rank}, router_hidden={cfg.router_hidden}", nbytes)
        state = load_state(gm, cfg.state) if cfg.state else None
        gm.meta["condfx_identity"] = model_identity(gm)
        return state

    def start(self, b: GraphBuilder, row: fx.Node, cfg: SkipFFNConfig) -> None:
        """Nothing runs before the first FFN."""
        return None

    def rewrite(self, b: GraphBuilder, site: FFNSite, cfg: SkipFFNConfig, carry: None) -> None:
        """Inserts the router, the masked FFN and the forecast blend for one FFN."""
        p = {k: b.get_attr(v) for k, v in _register_params(b.gm, cfg, site).items()}
        x = site.region.x_in
        hidden = b.call(aten.relu.default, b.call(aten.linear.default, x, p["router_w1"], p["router_b1"]))  # (B, T, H)
        logit = b.call(aten.squeeze.dim, b.call(aten.linear.default, hidden, p["router_w2"], p["router_b2"]), -1)  # (B, T)
        execute = b.call(aten.gt.Scalar, logit, 0.0)  # (B, T) bool
        if site.warm is not None:
            execute = b.call(aten.bitwise_or.Tensor, execute, site.warm)
        fused = call_masked_ffn(b, site, execute)
        update = b.call(operator.getitem, fused, 0)  # (B, T, d): 0 on routed-out rows
        low = b.call(aten.linear.default, x, p["forecast_a"])  # (B, T, r)
        guess = b.call(aten.linear.default, low, p["forecast_b"], p["forecast_c"])  # (B, T, d)
        dtype = update.meta["val"].dtype
        gate = b.call(aten.unsqueeze.default, b.call(aten._to_copy.default, execute, dtype=dtype), -1)  # (B, T, 1)
        kept = b.call(aten.mul.Tensor, update, gate)
        blended = b.call(aten.add.Tensor, kept, b.call(aten.mul.Tensor, guess, b.call(aten.rsub.Scalar, gate, 1)))
        site.residual.node.replace_input_with(site.residual.branch, blended)
        for node, role in ((logit, "logit"), (execute, "execute"), (gate, "gate"), (fused, "ffn")):
            node.meta[FORECAST_ROLE] = (role, site.index)

    def finish(self, gm: fx.GraphModule, cfg: SkipFFNConfig, sites: list[FFNSite],
               context: dict[str, torch.Tensor] | None) -> None:
        """Copies the loaded state into the new parameters."""
        if context is None:
            return
        added = [t for site in sites for t in forecast_targets(site.region).values()]
        _copy_state(gm, context, added, cfg.state)
