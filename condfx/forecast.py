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
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import fx, nn

from condfx.passes.op_args import op_arg
from condfx.passes.skip_ffn import measure_skip_fraction
from condfx.passes.skip_ffn_forecast import FORECAST_PARAMS
from condfx.passes.skip_ffn_forecast import FORECAST_ROLE as _ROLE

__all__ = [
    "ForecastTraining", "fit_forecasters", "forecast_param_names", "save_state", "set_skip_fraction",
    "train_routers",
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
