"""Training of ``skip-ffn{policy=forecast}`` (Informed Routing, TECHNIQUES.md section 4).

A graph rewritten with ``policy=forecast`` carries, per routed FFN, a router (d → H → ReLU → 1 logit,
read from the normalised FFN input) and a low-rank forecaster of the FFN's residual update
(x → x A^T B^T + c, rank r). At inference a row executes when its logit is > 0; a routed-out row
gets the forecast instead of the FFN's update. Training is two stages:

1. ``fit_forecasters``: closed-form reduced-rank least squares of the FFN's update f(x) on its input x,
   on activations collected from the model with every FFN executed (detached inputs, as the paper's
   LFF fit). The paper fits Linear(d→r) → SiLU → Linear(r→d) with SmoothL1 by SGD; this fit is the
   linear bottleneck under the squared loss (SmoothL1's quadratic branch), solved exactly: ridge OLS,
   then projection of the fitted values onto their top-r right singular vectors.
2. ``train_routers``: the routers alone, through ``condfx.train`` on ``ForecastTraining`` (a view that
   runs every FFN densely and replaces each execute decision by a hard Gumbel-sigmoid sample with a
   straight-through gradient, temperature annealed 5 → 1), with loss
   LM cross-entropy + 8·|(1 − s_routed) − mean execute rate| + 0.1·R, R = mean over routed-out rows of
   (1 − cos(h, h + f(x))) (recoverability). A one-logit sigmoid router equals the paper's two-logit
   softmax (the logit difference); its Gumbel sample is logistic noise.

``set_skip_fraction`` then shifts every router's output bias by one common amount so that the
measured fraction of all FFN blocks skipped on calibration tokens hits a target (bisection), and
``save_state`` / the pass option ``state=FILE`` carry the learned tensors with the model's identity.

The oracle (issue 16: is the method or the router the limit?), without backprop through the model:
``oracle_labels`` measures per routed FFN and token what taking the forecast costs (``OracleLabels``:
a layer-local squared error, scaled per layer by a measured NLL sensitivity); ``allocate`` spends a
target skip fraction where that is cheapest, one budget across layers; ``OraclePolicy`` uses the costs
directly as decisions (benchmark only: it computes every FFN to decide). ``teach_routers``
(``skip-ffn{policy=forecast,teacher=oracle}`` in the life cycle) fits each router to the labels
(``fit_routers_to_oracle``), cuts each layer at the allocation's share (``set_layer_biases``) and
finishes with ``set_skip_fraction``; its state is an ordinary forecast state file.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import fx, nn

from condfx.passes.op_args import op_arg
from condfx.passes.skip_ffn import measure_skip_fraction
from condfx.passes.skip_ffn_forecast import FORECAST_PARAMS
from condfx.passes.skip_ffn_forecast import FORECAST_ROLE as _ROLE

__all__ = [
    "Allocation", "ForecastTraining", "OracleLabels", "OraclePolicy", "allocate", "fit_forecasters",
    "fit_routers_to_oracle", "forecast_param_names", "oracle_labels", "save_state", "set_layer_biases",
    "set_skip_fraction", "teach_routers", "train_routers",
]


def forecast_param_names(gm: fx.GraphModule) -> list[str]:
    """Names of the routers' and forecasters' parameters in a ``policy=forecast`` graph."""
    tails = tuple(f"skip_ffn_{p}" for p in FORECAST_PARAMS)
    names = [n for n, _ in gm.named_parameters() if n.rsplit(".", 1)[-1] in tails]
    if not names:
        msg = "this graph has no skip-ffn forecast parameters; apply 'skip-ffn{policy=forecast}' first."
        raise ValueError(msg)
    return names


def _routed(gm: fx.GraphModule) -> dict[int, dict[str, fx.Node]]:
    """{routed index: {role: node}} from the tags the pass left in node.meta."""
    out: dict[int, dict[str, fx.Node]] = {}
    for node in gm.graph.nodes:
        if _ROLE in node.meta:
            role, i = node.meta[_ROLE]
            out.setdefault(i, {})[role] = node
    if not out:
        msg = "this graph has no skip-ffn forecast nodes; apply 'skip-ffn{policy=forecast}' first."
        raise ValueError(msg)
    return out


def _params_of(gm: fx.GraphModule, ffn_node: fx.Node) -> dict[str, torch.Tensor]:
    """The learned parameters of the routed FFN whose masked_ffn node is ``ffn_node``."""
    owner = op_arg(ffn_node, "w_down").target.rsplit(".", 1)[0]
    parent = owner.rsplit(".", 1)[0] if "." in owner else ""
    module = gm.get_submodule(parent)
    return {p: getattr(module, f"skip_ffn_{p}") for p in FORECAST_PARAMS}


class ForecastTraining(nn.Module):
    """Training view of a ``policy=forecast`` graph: forward(ids) → logits, gates and cosines recorded.

    Every FFN runs on every row; each routed FFN's execute gate is a hard Gumbel-sigmoid sample of its
    router logit at ``temperature`` with a straight-through gradient (no warm-up in training). After a
    forward, ``gates`` (per routed FFN, (B, T) float in {0, 1}, differentiable) and ``cosines``
    (cos(h, h + f(x)), (B, T)) hold that forward's values.
    """

    def __init__(self, gm: fx.GraphModule, temperature: float = 5.0):
        super().__init__()
        self.gm, self.temperature = gm, temperature
        self.roles = _routed(gm)
        self.gates: list[torch.Tensor] = []
        self.cosines: list[torch.Tensor] = []

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        view, by_node = self, {n: (role, i) for i, d in self.roles.items() for role, n in d.items()}
        self.gates, self.cosines = [], []
        logits: dict[int, torch.Tensor] = {}  # the Interpreter frees values after their last use

        class _Interp(fx.Interpreter):
            def run_node(self, node):
                tag = by_node.get(node)
                if tag is None:
                    return super().run_node(node)
                role, i = tag
                if role == "logit":
                    logits[i] = super().run_node(node)
                    return logits[i]
                if role == "execute":
                    val = super().run_node(node)
                    return torch.ones_like(val)
                if role == "gate":
                    logit = logits.pop(i)
                    u = torch.rand_like(logit).clamp(1e-6, 1 - 1e-6)
                    soft = torch.sigmoid((logit + torch.log(u) - torch.log1p(-u)) / view.temperature)
                    gate = (soft > 0.5).to(soft.dtype) + soft - soft.detach()  # straight-through
                    view.gates.append(gate)
                    return gate.unsqueeze(-1)
                out = super().run_node(node)  # the masked FFN, on every row here
                view.cosines.append(out[1])
                return out

        out = _Interp(self.gm).run(ids)
        return out[0] if isinstance(out, (tuple, list)) else out


def routing_loss(view: ForecastTraining, skip_routed: float, sparsity_weight: float = 8.0,
                 recover_weight: float = 0.1) -> torch.Tensor:
    """8·|(1 − s) − mean execute rate| + 0.1·mean over routed-out rows of (1 − cos(h, h + f(x)))."""
    gates = torch.stack(view.gates)  # (L, B, T)
    cos = torch.stack(view.cosines).detach()  # (L, B, T)
    sparsity = (1.0 - skip_routed - gates.mean()).abs()
    out = 1.0 - gates
    recover = (out * (1.0 - cos)).sum() / out.detach().sum().clamp_min(1.0)
    return sparsity_weight * sparsity + recover_weight * recover


def fit_forecasters(gm: fx.GraphModule, ids: torch.Tensor, *, ridge: float = 1e-3) -> dict[int, float]:
    """Stage 1: closed-form rank-r fit of every routed FFN's update on its input (module docstring).

    Args:
        gm: a ``policy=forecast`` graph (changed in place: the forecasters' parameters).
        ids: (B, T) int64 training tokens.
        ridge: ridge strength relative to the mean input variance.

    Returns:
        {routed index: fraction of the update's variance the forecast explains on ``ids``}.
    """
    roles = _routed(gm)
    ffn_nodes = {d["ffn"]: i for i, d in roles.items()}
    seen: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    class _Collect(fx.Interpreter):
        def run_node(self, node):
            tag = node.meta.get(_ROLE)
            if tag is not None and tag[0] == "execute":
                return torch.ones_like(super().run_node(node))
            out = super().run_node(node)
            if node in ffn_nodes:
                x = self.env[node.args[0]]
                seen[ffn_nodes[node]] = (x.reshape(-1, x.shape[-1]).double(), out[0].reshape(-1, x.shape[-1]).double())
            return out

    with torch.no_grad():
        _Collect(gm).run(ids)
    explained = {}
    for i, (x, y) in seen.items():
        p = _params_of(gm, roles[i]["ffn"])
        r = p["forecast_a"].shape[0]
        mx, my = x.mean(0), y.mean(0)
        xc, yc = x - mx, y - my
        gram = xc.T @ xc
        lam = ridge * gram.diagonal().mean().clamp_min(1e-12)
        w = torch.linalg.solve(gram + lam * torch.eye(gram.shape[0], dtype=gram.dtype), xc.T @ yc)  # (d, d)
        _, _, vh = torch.linalg.svd(xc @ w, full_matrices=False)
        v = vh[:r].T  # (d, r)
        a = (w @ v).T  # (r, d): x -> low
        c = my - (mx @ w @ v) @ v.T
        with torch.no_grad():
            p["forecast_a"].copy_(a)
            p["forecast_b"].copy_(v)
            p["forecast_c"].copy_(c)
        pred = x @ a.T @ v.T + c
        explained[i] = float(1 - ((y - pred) ** 2).sum() / ((yc**2).sum().clamp_min(1e-30)))
    return explained


def train_routers(gm: fx.GraphModule, ids: torch.Tensor, *, target_skip: float, steps: int = 100,
                  seq_len: int = 128, batch_size: int = 2, lr: float = 2e-3, seed: int = 0,
                  log_every: int = 0, save_to: str | Path | None = None, forecasters: bool = False):
    """Stage 2: trains the routers (and, with ``forecasters``, the forecasters) with ``condfx.train``.

    Returns ``condfx.train``'s TrainResult.

    Args:
        gm: a ``policy=forecast`` graph whose forecasters are fitted (changed in place).
        ids: (1, N) or (N,) int64 training tokens; windows of ``seq_len + 1`` are drawn at random.
        target_skip: fraction of *all* FFN blocks to route out (cold layers count as executed), in (0, 1).
        steps, seq_len, batch_size, lr, seed, log_every, save_to: the training recipe (``condfx.train``).
        forecasters: also train the forecasters end to end (the paper keeps them from stage 1).

    Raises:
        ValueError: a target outside (0, 1), or one the routed layers cannot reach.
    """
    from condfx.train import train

    if isinstance(target_skip, bool) or not isinstance(target_skip, (int, float)) or not 0 < target_skip < 1:
        msg = f"train_routers target_skip must be a number in (0, 1); got {target_skip!r}."
        raise ValueError(msg)
    stream = ids.reshape(-1)
    if stream.numel() < seq_len + 2:
        msg = f"train_routers needs more than seq_len + 1 = {seq_len + 1} tokens; got {stream.numel()}."
        raise ValueError(msg)
    view = ForecastTraining(gm)
    skip_routed = _routed_target(gm, target_skip)
    names = [n for n in forecast_param_names(gm) if forecasters or ".skip_ffn_router_" in f".{n}"]

    def data(step, generator):
        starts = torch.randint(0, stream.numel() - seq_len - 1, (batch_size,), generator=generator)
        win = torch.stack([stream[s : s + seq_len + 1] for s in starts.tolist()])
        return win[:, :-1], win[:, 1:]

    def anneal(step, loss, model):
        view.temperature = 5.0 - 4.0 * min(1.0, (step + 1) / max(1, steps - 1))

    trainable = {f"gm.{n}" for n in names}
    return train(view, data, steps=steps, lr=lr, batch_size=batch_size, trainable=lambda n: n in trainable,
                 extra_loss=lambda m, batch, logits: routing_loss(view, skip_routed), schedule="constant",
                 seed=seed, progress=False, log_every=log_every, callback=anneal, save_to=save_to)


def _routed_target(gm: fx.GraphModule, target_skip: float) -> float:
    from condfx.patterns import find_regions

    routed = len(_routed(gm))
    total = routed + len(find_regions(gm).ffn)  # cold FFN regions are left as they were
    skip_routed = target_skip * total / routed
    if skip_routed >= 1:
        msg = (f"target_skip {target_skip} of all {total} FFN layers needs more than every row of the "
               f"{routed} routed layers; lower it or make the cold regions smaller.")
        raise ValueError(msg)
    return skip_routed


def _shift_biases(gm: fx.GraphModule, delta: float) -> None:
    with torch.no_grad():
        for d in _routed(gm).values():
            _params_of(gm, d["ffn"])["router_b2"].sub_(delta)


def _router_logits(gm: fx.GraphModule, ids: torch.Tensor) -> torch.Tensor:
    """Every routed FFN's router logit on ``ids`` under the current policy, flattened (L*B*T,)."""
    roles = _routed(gm)
    logit_nodes = {d["logit"] for d in roles.values()}
    found: list[torch.Tensor] = []

    class _Record(fx.Interpreter):
        def run_node(self, node):
            out = super().run_node(node)
            if node in logit_nodes:
                found.append(out.reshape(-1))
            return out

    with torch.no_grad():
        _Record(gm).run(ids)
    return torch.cat(found)


def set_skip_fraction(gm: fx.GraphModule, ids: torch.Tensor, target_skip: float, *, iters: int = 6,
                      tolerance: float = 0.005) -> float:
    """Shifts all router output biases by one amount so ``ids`` skip ~``target_skip`` of all FFN blocks.

    Fixed-point iteration: run the graph, take the shift that would route out the wanted share of
    the recorded logits, apply it, repeat (later layers' logits move with earlier decisions) until the
    measured fraction is within ``tolerance`` or ``iters`` runs were made; the best shift is kept.

    Returns:
        The measured fraction of all FFN blocks skipped on ``ids`` after the shift.
    """
    skip_routed = _routed_target(gm, target_skip)  # validates
    total_shift, best = 0.0, None
    for _ in range(iters):
        logits = _router_logits(gm, ids).double()
        frac = measure_skip_fraction(gm, ids)["fraction_of_all_ffn"]
        if best is None or abs(frac - target_skip) < abs(best[1] - target_skip):
            best = (total_shift, frac)
        if abs(frac - target_skip) <= tolerance:
            break
        # rows with logit <= q are routed out after subtracting q from the bias
        q = float(torch.quantile(logits, skip_routed))
        q = q + 1e-6 if q >= 0 else q - 1e-6
        _shift_biases(gm, q)
        total_shift += q
    _shift_biases(gm, best[0] - total_shift)
    return best[1]


def save_state(gm: fx.GraphModule, path: str | Path, identity: dict | None = None) -> list[str]:
    """Writes the routers and forecasters of ``gm`` to safetensors with the model's identity.

    Args:
        gm: a ``policy=forecast`` graph.
        path: the file to write.
        identity: ``condfx.calibrate.model_identity`` of the graph before ``skip-ffn`` (shapes and
            the SHA256 of its weights: what the pass checks on load); default
            ``gm.meta["condfx_identity"]``, which the pass records.

    Returns:
        The tensor names written.
    """
    from safetensors.torch import save_file

    identity = identity or gm.meta.get("condfx_identity")
    if identity is None:
        msg = "save_state needs the model identity (condfx.calibrate.model_identity of the original graph)."
        raise ValueError(msg)
    params = dict(gm.named_parameters())
    names = forecast_param_names(gm)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    metadata = {"identity": json.dumps(identity), "tensors": json.dumps(names),
                "format": "condfx-skip-ffn-forecast-2"}
    save_file({n: params[n].detach().cpu().contiguous() for n in names}, str(path), metadata=metadata)
    return names


# ------------------------------------------------------------------------ the oracle and its pupil
# Issue 16: is the method or the router the limit? The oracle knows each FFN's true update before
# deciding; its labels give (1) the oracle policy, the best any router of that information can do,
# and (2) the targets the routers are fitted to ("teacher=oracle"), without backprop through the model.

ORACLE_MIN_TOKENS = 64
"""Fewest calibration tokens (at positions >= warm-up) the oracle's labels and fits accept."""


@dataclass(frozen=True)
class OracleLabels:
    """What skipping each (routed FFN, token) costs on calibration text, and what its router sees.

    The label is layer-local: ``cost[l, n] = ||f - g||^2 / ||h + f||^2``, the squared error the
    forecast g leaves in the residual stream after the FFN (h: stream before it, f: the FFN's update),
    relative to the stream's size; ``drop`` is the same with nothing in place of f (``||f||^2 / ...``).
    Why local and squared: a per-token logit-level label would need one forward per (layer, token),
    or backprop through the model; the local one costs one dense forward. A layer-local error is not
    comparable across layers (later layers pass less of it to the logits), so each layer also gets a
    logit-level ``sensitivity``: the rise of the mean next-token NLL when *all* its scored rows take
    the forecast, per unit of their summed cost (one forward per layer). Squared, because that rise
    is, to second order, the sum of the rows' squared perturbations (first-order terms of random
    sign cancel over many tokens), so ``sensitivity[l] * cost[l, n]`` is one token's share of it and
    rows of all layers can be ranked on one scale (``allocate``).

    Attributes:
        cost: (L, N) float64 over the L routed FFNs and N = B*T calibration rows.
        drop: (L, N) float64.
        features: (L, N, d) float32: each router's input (the normalised FFN input) on the dense stream.
        scored: (N,) bool: rows the policy may route out (positions >= warm-up).
        sensitivity: (L,) float64, > 0.
        dense_nll: mean next-token NLL of the graph with every FFN executed.
    """

    cost: torch.Tensor
    drop: torch.Tensor
    features: torch.Tensor
    scored: torch.Tensor
    sensitivity: torch.Tensor
    dense_nll: float


@dataclass(frozen=True)
class Allocation:
    """Where a target skip fraction is spent: per routed FFN, the share of scored rows routed out and
    the largest local cost routed out (``OracleLabels.cost``'s scale)."""

    target: float
    fractions: torch.Tensor  # (L,) float64 in [0, 1]
    thresholds: torch.Tensor  # (L,) float64


def _forecast_of(gm: fx.GraphModule, ffn_node: fx.Node, x: torch.Tensor) -> torch.Tensor:
    p = _params_of(gm, ffn_node)
    return nn.functional.linear(nn.functional.linear(x, p["forecast_a"]), p["forecast_b"], p["forecast_c"])


def _local_cost(h: torch.Tensor, f: torch.Tensor, g: torch.Tensor | None) -> torch.Tensor:
    """||f - g||^2 / ||h + f||^2 per row (g None: the update dropped), float64."""
    h, f = h.double(), f.double()
    err = f if g is None else f - g.double()
    return (err * err).sum(-1) / ((h + f) ** 2).sum(-1).clamp_min(1e-30)


class _Routed(fx.Interpreter):
    """Runs a ``policy=forecast`` graph with the execute decisions of ``decide`` instead of its routers.

    ``decide(i, x, h, f, warm) -> execute (B, T) bool`` sees the routed FFN's input x, the stream h,
    the FFN's update f computed on every row, and the graph's warm-up mask; ``seen(i, x, h, f, warm)``,
    when given, is called first. Records the rows each routed FFN skipped in ``skipped``.
    """

    def __init__(self, gm: fx.GraphModule, decide, seen=None):
        super().__init__(gm)
        self.decide, self.seen = decide, seen
        self.by_node = {n: (role, i) for i, d in _routed(gm).items() for role, n in d.items()}
        self.warm: dict[int, torch.Tensor] = {}
        self.decided: dict[int, torch.Tensor] = {}
        self.skipped = 0

    def run_node(self, node):
        tag = self.by_node.get(node)
        if tag is None:
            return super().run_node(node)
        role, i = tag
        if role == "execute":
            val = super().run_node(node)
            warm = node.args[1] if node.target is torch.ops.aten.bitwise_or.Tensor else None
            self.warm[i] = self.env[warm] if warm is not None else torch.zeros_like(val)
            return torch.ones_like(val)
        if role == "ffn":
            out = super().run_node(node)  # every row executed
            x, h, f = self.env[node.args[0]], self.env[node.args[1]], out[0]
            if self.seen is not None:
                self.seen(i, x, h, f, self.warm[i])
            execute = self.decide(i, x, h, f, self.warm[i]) | self.warm[i]
            self.decided[i] = execute
            self.skipped += int((~execute).sum())
            return (f * execute.unsqueeze(-1).to(f.dtype), out[1])
        if role == "gate":
            return self.decided[i].to(self.env[node.args[0]].dtype).unsqueeze(-1)
        return super().run_node(node)


def _nll(logits: torch.Tensor, ids: torch.Tensor) -> float:
    return float(nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).double(), ids[:, 1:].flatten()))


def _logits(out) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


def _check_target(name: str, target) -> float:
    if isinstance(target, bool) or not isinstance(target, (int, float)) or not 0 < target < 1:
        msg = f"{name} target_skip must be a number in (0, 1); got {target!r}."
        raise ValueError(msg)
    return float(target)


def _check_ids(name: str, ids) -> torch.Tensor:
    if not isinstance(ids, torch.Tensor) or ids.dtype != torch.long or ids.dim() not in (1, 2):
        msg = f"{name} needs calibration tokens as an int64 tensor of shape (B, T) or (T,)."
        raise ValueError(msg)
    ids = ids if ids.dim() == 2 else ids[None]
    if ids.numel() < ORACLE_MIN_TOKENS or ids.shape[1] < 2:
        msg = (f"{name} needs at least {ORACLE_MIN_TOKENS} calibration tokens in rows of 2 or more; "
               f"got {ids.shape[0]} x {ids.shape[1]}.")
        raise ValueError(msg)
    return ids


def oracle_labels(gm: fx.GraphModule, ids: torch.Tensor, progress=None) -> OracleLabels:
    """Measures ``OracleLabels`` on ``ids`` (B, T): one dense forward, then one per routed FFN.

    Args:
        gm: a ``policy=forecast`` graph whose forecasters are fitted (``fit_forecasters``).
        ids: (B, T) int64 calibration tokens (at least ``ORACLE_MIN_TOKENS``).
        progress: optional ``progress(stage, done, total)``.

    Raises:
        ValueError: too few tokens, or no scored row (warm-up covers every position).
    """
    ids = _check_ids("oracle_labels", ids)
    n_routed = len(_routed(gm))
    progress = progress or (lambda *_: None)
    cost, drop, feats, warm = [None] * n_routed, [None] * n_routed, [None] * n_routed, [None] * n_routed

    def seen(i, x, h, f, w):
        g = _forecast_of(gm, _routed(gm)[i]["ffn"], x)
        cost[i], drop[i] = _local_cost(h, f, g).reshape(-1), _local_cost(h, f, None).reshape(-1)
        feats[i], warm[i] = x.detach().reshape(-1, x.shape[-1]).float(), w.reshape(-1)

    with torch.no_grad():
        dense = _nll(_logits(_Routed(gm, lambda i, x, h, f, w: torch.ones_like(w), seen).run(ids)), ids)
        progress("skip-ffn: oracle labels", 1, n_routed + 1)
        scored = ~warm[0]
        if not bool(scored.any()):
            msg = "oracle_labels found no token past the warm-up; give longer calibration rows or a shorter warmup."
            raise ValueError(msg)
        cost_t = torch.stack(cost)
        sens = []
        for layer in range(n_routed):
            out = _Routed(gm, lambda i, x, h, f, w, layer=layer: torch.ones_like(w) if i != layer else w).run(ids)
            rise = _nll(_logits(out), ids) - dense
            sens.append(max(rise, 1e-6 * max(dense, 1e-3)) / float(cost_t[layer][scored].sum().clamp_min(1e-30)))
            progress("skip-ffn: oracle labels", layer + 2, n_routed + 1)
    return OracleLabels(cost_t, torch.stack(drop), torch.stack(feats), scored,
                        torch.tensor(sens, dtype=torch.float64), dense)


def allocate(gm: fx.GraphModule, labels: OracleLabels, target_skip: float) -> Allocation:
    """Spends ``target_skip`` (a fraction of *all* FFN blocks, cold layers and warm rows counted)
    where the oracle says it is cheapest: the scored (layer, row) pairs of smallest
    ``sensitivity[l] * cost[l, n]``, one budget across layers.

    Raises:
        ValueError: a target outside (0, 1), or more than the routed layers' scored rows hold.
    """
    target = _check_target("allocate", target_skip)
    n_routed, n_rows = labels.cost.shape
    skip_routed = _routed_target(gm, target)  # fraction of the routed layers' rows
    want = round(skip_routed * n_routed * n_rows)
    scaled = (labels.cost * labels.sensitivity[:, None])[:, labels.scored]  # (L, S)
    if want > scaled.numel():
        msg = (f"target_skip {target} needs {want} routed-out rows but only {scaled.numel()} rows are past "
               "the warm-up in the routed layers; lower it or shorten the warm-up.")
        raise ValueError(msg)
    if want == 0:
        return Allocation(target, torch.zeros(n_routed, dtype=torch.float64),
                          torch.full((n_routed,), -1.0, dtype=torch.float64))
    cut = float(scaled.flatten().kthvalue(want).values)
    chosen = scaled <= cut
    fractions = chosen.double().mean(1)
    thresholds = torch.where(chosen.any(1), cut / labels.sensitivity, torch.full_like(labels.sensitivity, -1.0))
    return Allocation(target, fractions, thresholds)


class OraclePolicy(nn.Module):
    """The oracle as a policy (benchmark only; it computes every FFN to decide): ``forward(ids)`` →
    logits of ``gm`` where routed FFN l's row takes the forecast when its local cost on the *current*
    stream is at most ``allocation.thresholds[l]``; ``skipped`` and ``rows`` count its decisions."""

    def __init__(self, gm: fx.GraphModule, allocation: Allocation):
        super().__init__()
        self.gm, self.allocation = gm, allocation
        self.skipped = self.rows = 0

    def _decide(self, i, x, h, f, warm):
        cost = _local_cost(h, f, _forecast_of(self.gm, _routed(self.gm)[i]["ffn"], x))
        return cost > float(self.allocation.thresholds[i])

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        run = _Routed(self.gm, self._decide)
        with torch.no_grad():
            out = _logits(run.run(ids))
        self.skipped += run.skipped
        self.rows += ids.numel()
        return out


def fit_routers_to_oracle(gm: fx.GraphModule, labels: OracleLabels, *, steps: int = 300, lr: float = 3e-3,
                          holdout: float = 0.2, seed: int = 0, progress=None) -> dict[int, float]:
    """Fits each router (its own d → H → ReLU → 1 MLP on its inference-time input) to the oracle.

    The router regresses the standardised log local cost of its scored rows (squared loss, Adam,
    full batch): a ranking surrogate that serves every target at once, since ``set_layer_biases``
    then only moves the cut. The first (1 - holdout) of the rows train; the rest measure the fit.

    Returns:
        {routed index: Spearman rank correlation of the router's output with the cost on the held-out rows}.
    """
    progress = progress or (lambda *_: None)
    scored = labels.scored.nonzero().squeeze(1)
    n_fit = max(2, int(len(scored) * (1 - holdout)))
    fit_rows, held = scored[:n_fit], scored[n_fit:]
    roles, quality = _routed(gm), {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: extra threads only spin on a shared machine
    try:
        for i in range(len(roles)):
            quality.update(_fit_one_router(gm, labels, i, roles[i]["ffn"], fit_rows, held, steps, lr, seed))
            progress("skip-ffn: routers fitted to the oracle", i + 1, len(roles))
    finally:
        torch.set_num_threads(threads)
    return quality


def _fit_one_router(gm, labels, i, ffn_node, fit_rows, held, steps, lr, seed) -> dict[int, float]:
    """Fits routed FFN ``i``'s router (``fit_routers_to_oracle``); returns {i: held-out Spearman}."""
    p = _params_of(gm, ffn_node)
    y = labels.cost[i].clamp_min(1e-12).log()
    mu, sd = y[fit_rows].mean(), y[fit_rows].std().clamp_min(1e-6)
    target = ((y[fit_rows] - mu) / sd).float()
    gen = torch.Generator().manual_seed(seed + i)
    w1 = p["router_w1"].detach().float().clone().requires_grad_(True)
    b1 = torch.zeros(p["router_b1"].shape).requires_grad_(True)
    w2 = (torch.randn(p["router_w2"].shape, generator=gen) * 0.01).requires_grad_(True)
    b2 = torch.zeros(1, requires_grad=True)
    opt = torch.optim.Adam([w1, b1, w2, b2], lr=lr)
    x_fit = labels.features[i][fit_rows]

    def head(x):
        return nn.functional.linear(torch.relu(nn.functional.linear(x, w1, b1)), w2, b2).squeeze(-1)

    for _ in range(steps):
        loss = ((head(x_fit) - target) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        for name, value in (("router_w1", w1), ("router_b1", b1), ("router_w2", w2), ("router_b2", b2)):
            p[name].copy_(value.to(p[name].dtype))
        if len(held) < 2:
            return {}
        return {i: _spearman(head(labels.features[i][held]).double(), y[held])}


def _spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ra, rb = a.argsort().argsort().double(), b.argsort().argsort().double()
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / ((ra * ra).sum() * (rb * rb).sum()).sqrt().clamp_min(1e-30))


def _router_outputs(gm: fx.GraphModule, labels: OracleLabels, i: int) -> torch.Tensor:
    p = _params_of(gm, _routed(gm)[i]["ffn"])
    x = labels.features[i][labels.scored].to(p["router_w1"].dtype)
    hidden = torch.relu(nn.functional.linear(x, p["router_w1"], p["router_b1"]))
    return nn.functional.linear(hidden, p["router_w2"], p["router_b2"]).squeeze(-1).double()


def set_layer_biases(gm: fx.GraphModule, labels: OracleLabels, allocation: Allocation) -> None:
    """Per routed FFN, shifts the router's output bias so that the share ``allocation.fractions[l]``
    of the calibration rows (dense stream) has logit <= 0, i.e. is routed out."""
    with torch.no_grad():
        for i, d in _routed(gm).items():
            logits = _router_outputs(gm, labels, i)
            k = round(float(allocation.fractions[i]) * logits.numel())
            if k == 0:
                cut = float(logits.min()) - 1.0
            else:
                ordered = logits.sort().values
                above = float(ordered[k]) if k < logits.numel() else float(ordered[-1]) + 1.0
                cut = 0.5 * (float(ordered[k - 1]) + above)
            _params_of(gm, d["ffn"])["router_b2"].sub_(cut)


def teach_routers(gm: fx.GraphModule, ids: torch.Tensor, target_skip: float, *, steps: int = 300,
                  progress=None) -> dict:
    """``teacher=oracle``: fits the forecasters, measures the oracle's labels, fits the routers to them,
    sets each layer's cut by the oracle's budget allocation, then one common shift so that ``ids``
    skip ``target_skip`` of all FFN blocks under the routers themselves (``set_skip_fraction``).

    Args:
        gm: a ``policy=forecast`` graph (changed in place).
        ids: (B, T) int64 calibration tokens, at least ``ORACLE_MIN_TOKENS``.
        target_skip: fraction of all FFN blocks to skip, in (0, 1).
        steps: Adam steps of each router's fit.
        progress: optional ``progress(stage, done, total)``.

    Returns:
        {"measured": skip fraction on ``ids``, "explained": the forecasters' R^2 per layer,
        "spearman": held-out rank correlation per layer, "fractions": the allocation per layer}.

    Raises:
        ValueError: one sentence: a target outside (0, 1), too few tokens, or an unreachable target.
    """
    target = _check_target("teach_routers", target_skip)
    ids = _check_ids("teach_routers", ids)
    _routed_target(gm, target)
    explained = fit_forecasters(gm, ids)
    labels = oracle_labels(gm, ids, progress)
    allocation = allocate(gm, labels, target)
    spearman = fit_routers_to_oracle(gm, labels, steps=steps, progress=progress)
    set_layer_biases(gm, labels, allocation)
    measured = set_skip_fraction(gm, ids, target)
    return {"measured": measured, "explained": explained, "spearman": spearman,
            "fractions": allocation.fractions.tolist()}
