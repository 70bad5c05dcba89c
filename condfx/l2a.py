"""The L2A training recipe and routing statistics for graphs rewritten by ``route-attention``.

Recipe (TECHNIQUES.md 1.1-1.2, released L2A code): trainable attention (both branches), norms and
router; MLPs, embeddings and head frozen. Loss = next-token cross-entropy
+ lambda(step) * mean over layers of mean over tokens of sigma(logit / temperature)^2, with lambda 0
during warm-up and ramped linearly to ``lam`` at the last step. On about ``dense_fraction`` of the
steps the global branch runs for every query (the ``l2a.dense`` buffers), so tokens switched off
still get a router gradient. The released code sums sigma^2 over the (128K) tokens of a sequence
and uses lambda = 1e-8; here the penalty is a per-token mean, so lambda does not depend on T.

Beyond the paper: ``target_fraction`` adapts lambda multiplicatively each step so that the routed
fraction approaches the target; ``teacher`` adds a KL distillation term against the original model.

Routing statistics: ``record_route_stats`` runs a calibration pass and stores, per layer, the number
of routed and total queries in the ``l2a.route_stats`` buffers that ``prune-global`` reads.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

import torch
import torch.nn.functional as F
from torch import fx, nn

from condfx.options import BIG_INT, SEED, Float, Int, check_options
from condfx.passes._insert import output_view
from condfx.patterns import find_regions
from condfx.patterns.routed import TAG, find_routed_layers

__all__ = [
    "L2ARecipe",
    "L2ATrainResult",
    "l2a_trainable",
    "l2a_view",
    "record_route_stats",
    "route_fractions",
    "save_l2a_state",
    "train_l2a",
    "window_only",
]


def _layers_or_raise(gm: fx.GraphModule):
    layers = find_routed_layers(gm)
    if not layers:
        msg = "the model has no L2A layer: apply 'route-attention{window=...}' first."
        raise ValueError(msg)
    return layers


def l2a_view(gm: fx.GraphModule, *roles: str) -> fx.GraphModule:
    """A module sharing ``gm``'s parameters that returns (logits, then for each role in ``roles`` the
    node of that role of every L2A layer, in layer order)."""
    layers = _layers_or_raise(gm)

    def outputs(graph: fx.Graph, output: fx.Node) -> tuple:
        by_tag = {n.meta.get(TAG): n for n in graph.nodes if TAG in n.meta}
        logits = output.args[0]
        logits = logits[0] if isinstance(logits, (tuple, list)) else logits
        return (logits, *(by_tag[(layer.prefix, role)] for role in roles for layer in layers))

    return output_view(gm, outputs)


def window_only(gm: fx.GraphModule, window: int) -> fx.GraphModule:
    """A copy of ``gm`` with every attention core fused and restricted to a ``window``-token window
    (the untrained window-only baseline of L2A)."""
    from condfx.passes import apply

    out = apply(gm, "fuse-attention").graph_module
    for node in out.graph.nodes:
        if node.target is torch.ops.condfx.attention.default:
            node.args = (*node.args[:4], window)
    out.recompile()
    return out


def route_fractions(gm: fx.GraphModule, input_ids: torch.Tensor) -> list[float]:
    """Fraction of the queries of ``input_ids`` each L2A layer routes to global attention."""
    with torch.no_grad():
        out = l2a_view(gm, "route")(input_ids)
    return [float(r.float().mean()) for r in out[1:]]


def record_route_stats(gm: fx.GraphModule, batches: Iterable[torch.Tensor]) -> dict[int, float]:
    """Runs ``gm`` on ``batches`` of input ids and stores the routed/total counts per layer.

    The counts go to the ``l2a.route_stats`` buffers (replacing earlier ones), which ``prune-global``
    reads. Returns {layer index: routed fraction}.
    """
    layers = _layers_or_raise(gm)
    view = l2a_view(gm, "route")
    counts = torch.zeros(len(layers), 2, dtype=torch.float64)
    with torch.no_grad():
        for ids in batches:
            for i, route in enumerate(view(ids)[1:]):
                counts[i] += torch.tensor([float(route.sum()), float(route.numel())], dtype=torch.float64)
    if counts[:, 1].sum() == 0:
        msg = "record_route_stats got no tokens: pass at least one non-empty batch of input ids."
        raise ValueError(msg)
    for layer, c in zip(layers, counts, strict=True):
        layer.state.route_stats.copy_(c)
    return {layer.layer: layer.routed_fraction for layer in layers}


def l2a_trainable(gm: fx.GraphModule) -> set[str]:
    """Parameter names the recipe trains: attention projections and QK-norms, every norm, L2A state."""
    regions = find_regions(gm)
    names = set()
    for r in regions.attention:
        refs = (r.q_proj, r.k_proj, r.v_proj, r.o_proj, r.q_norm, r.k_norm)
        for ref in refs:
            for attr in ("weight", "bias"):
                node = getattr(ref, attr, None) if ref is not None else None
                if isinstance(node, fx.Node) and node.op == "get_attr":
                    names.add(str(node.target))
    for norm in regions.norms:
        for node in (norm.weight, norm.bias):
            if isinstance(node, fx.Node) and node.op == "get_attr":
                names.add(str(node.target))
    params = dict(gm.named_parameters())
    names |= {n for n in params if ".l2a." in n}
    return {n for n in names if n in params}


_RECIPE_BOUNDS = MappingProxyType({
    "steps": Int(1, BIG_INT), "lr": Float(0.0, 10.0, low_open=True), "warmup": Int(0, BIG_INT),
    "lam": Float(0.0, 1e6), "dense_fraction": Float(0.0, 1.0), "adapt_rate": Float(0.0, 10.0),
    "distill": Float(0.0, 1e6), "router_warmup": Int(0, BIG_INT), "seed": SEED,
})
"""Bounds of ``L2ARecipe`` (``target_fraction`` and ``warmup < steps`` are checked after them)."""


@dataclass(frozen=True)
class L2ARecipe:
    """Settings of ``train_l2a``.

    Attributes:
        steps: optimizer steps.
        lr: peak learning rate (AdamW, cosine to 10 %).
        warmup: linear warm-up steps; lambda stays 0 during them.
        lam: the sparsity weight lambda reached at the last step (per-token mean of sigma^2).
        dense_fraction: probability that a step runs the global branch for every query.
        target_fraction: when set, lambda adapts so the routed fraction approaches this value.
        adapt_rate: multiplicative lambda step in target mode (lambda *= exp(rate * (frac - target))).
        distill: weight of the KL term against ``teacher`` (0 disables it).
        router_warmup: steps during which the routers stay frozen (every token routed), so the
            global branch adapts before the routers decide (not in the paper; 0 disables it).
        seed: seeds the data and the dense-step coin.
    """

    steps: int = 300
    lr: float = 1e-3
    warmup: int = 30
    lam: float = 0.05
    dense_fraction: float = 0.1
    target_fraction: float | None = None
    adapt_rate: float = 0.05
    distill: float = 0.0
    router_warmup: int = 0
    seed: int = 0

    def __post_init__(self):
        check_options(self, _RECIPE_BOUNDS)
        if not self.warmup < self.steps:
            msg = f"L2ARecipe.warmup must be in [0, steps={self.steps}); got {self.warmup!r}."
            raise ValueError(msg)
        t = self.target_fraction
        if t is not None and not 0 < t < 1:
            msg = f"L2ARecipe.target_fraction must be in (0, 1) or None; got {t!r}."
            raise ValueError(msg)


@dataclass(frozen=True)
class L2ATrainResult:
    """What ``train_l2a`` did: per-step losses, per-step routed fraction per layer, final lambda."""

    losses: list[float]
    fractions: list[list[float]]
    lam: float
    seconds: float
    trainable_params: list[str]


class _TrainView(nn.Module):
    """Wraps the routed view for ``condfx.train``: returns logits, keeps probs and routes aside.

    Parameters are reported under ``gm``'s own names (the view shares them), so the trained set
    can be saved and loaded into ``gm`` with ``condfx.train.load_trained``.
    """

    def __init__(self, gm: fx.GraphModule):
        super().__init__()
        self.__dict__["gm"] = gm
        self.__dict__["view"] = l2a_view(gm, "prob", "route")
        self.probs: list[torch.Tensor] = []
        self.routes: list[torch.Tensor] = []

    def named_parameters(self, *args, **kwargs):
        return self.gm.named_parameters(*args, **kwargs)

    def parameters(self, recurse: bool = True):
        return self.gm.parameters(recurse)

    def buffers(self, recurse: bool = True):
        return self.gm.buffers(recurse)

    def forward(self, input_ids):
        out = self.view(input_ids)
        n = (len(out) - 1) // 2
        self.probs, self.routes = list(out[1 : 1 + n]), list(out[1 + n :])
        return out[0]


def _check_lengths(input_ids: torch.Tensor, layers) -> None:
    window = max(int(x.state.window) for x in layers)
    if input_ids.shape[1] <= window:
        msg = (
            f"training sequences of {input_ids.shape[1]} tokens are not longer than the L2A window "
            f"{window}, so no token could need global attention; use sequences longer than the window."
        )
        raise ValueError(msg)


class _OutOfTime(Exception):
    """Raised after a step once ``train_l2a``'s time budget is spent; ends training there."""


class _Controller:
    """Per-step state of the recipe: dense coin, lambda, fractions, progress display."""

    def __init__(self, gm, layers, recipe: L2ARecipe, progress: bool, seconds: float | None = None,
                 on_step: Callable[[int, int], None] | None = None):
        self.gm, self.layers, self.r = gm, layers, recipe
        self.coin = torch.Generator().manual_seed(recipe.seed + 1)
        self.lam = recipe.lam if recipe.target_fraction is not None else 0.0
        self.fractions: list[list[float]] = []
        self.losses: list[float] = []
        self.deadline = None if seconds is None else time.perf_counter() + seconds
        self.on_step = on_step
        self.show = progress and sys.stderr.isatty()
        self.bar = None

    def lam_at(self, step: int) -> float:
        r = self.r
        if step < r.warmup:
            return 0.0
        if r.target_fraction is not None:
            return self.lam
        return r.lam * (step - r.warmup + 1) / max(1, r.steps - r.warmup)

    def before_step(self, step: int) -> None:
        dense = bool(torch.rand((), generator=self.coin) < self.r.dense_fraction)
        for layer in self.layers:
            layer.state.dense.fill_(dense)
            # AdamW skips a parameter without a gradient: a frozen router keeps its zero weights
            layer.state.router_weight.requires_grad_(step >= self.r.router_warmup)

    def after_step(self, step: int, loss: float, model: _TrainView) -> None:
        fr = [float(r.float().mean()) for r in model.routes]
        self.fractions.append(fr)
        self.losses.append(loss)
        r = self.r
        if r.target_fraction is not None and step >= r.warmup:
            mean = sum(fr) / len(fr)
            self.lam = min(1e4, max(1e-6, self.lam * math.exp(r.adapt_rate * (mean - r.target_fraction) * 10)))
        self._display(step, loss, fr)
        if self.on_step is not None:
            self.on_step(step + 1, r.steps)
        if self.deadline is not None and time.perf_counter() > self.deadline and step + 1 < r.steps:
            raise _OutOfTime

    def _display(self, step: int, loss: float, fr: list[float]) -> None:
        if not self.show:
            return
        from rich.progress import BarColumn, Progress, TextColumn

        if self.bar is None:
            self.bar = Progress(TextColumn("L2A"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                                TextColumn("{task.fields[info]}"))
            self.task = self.bar.add_task("l2a", total=self.r.steps, info="")
            self.bar.start()
        info = f"loss {loss:.3f} global " + " ".join(f"{f:.0%}" for f in fr)
        self.bar.update(self.task, advance=1, info=info)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
        for layer in self.layers:
            layer.state.dense.fill_(False)


def train_l2a(
    gm: fx.GraphModule,
    data: Callable[[int, torch.Generator], tuple[torch.Tensor, torch.Tensor]],
    recipe: L2ARecipe = L2ARecipe(),
    *,
    teacher: nn.Module | None = None,
    progress: bool = True,
    save_to: str | Path | None = None,
    seconds: float | None = None,
    on_step: Callable[[int, int], None] | None = None,
) -> L2ATrainResult:
    """Trains an L2A model (``route-attention`` output) in place with the recipe above.

    Args:
        gm: the rewritten graph module.
        data: ``data(step, generator) -> (input_ids (B, T), targets (B, T))``, targets pre-shifted
            (-100 ignored); T must exceed the L2A window.
        recipe: the settings.
        teacher: the original model, for ``recipe.distill > 0``.
        progress: show a progress bar with the routed fraction per layer (on a terminal).
        save_to: write the trained parameters to this safetensors file (load them back with
            ``condfx.train.load_trained``).
        seconds: stop after the first step that ends past this many seconds (the time budget);
            the result then holds fewer than ``recipe.steps`` losses.
        on_step: called as ``on_step(steps done, recipe.steps)`` after every step (progress).

    Returns:
        An :class:`L2ATrainResult`.

    Raises:
        ValueError: the model has no L2A layer, the sequences are not longer than the window, or
            distillation was asked for without a teacher.
    """
    from condfx.train import train

    layers = _layers_or_raise(gm)
    if recipe.distill > 0 and teacher is None:
        msg = "L2ARecipe.distill > 0 needs a teacher model (the original)."
        raise ValueError(msg)
    model = _TrainView(gm)
    ctl = _Controller(gm, layers, recipe, progress, seconds, on_step)
    started = time.perf_counter()
    names = sorted(l2a_trainable(gm))

    def batches(step, generator):
        ids, targets = data(step, generator)
        if step == 0:
            _check_lengths(ids, layers)
        ctl.before_step(step)
        return ids, targets

    def penalty(m, batch, logits):
        sq = torch.stack([p.float().pow(2).mean() for p in m.probs]).mean()
        loss = ctl.lam_at(len(ctl.fractions)) * sq
        if recipe.distill > 0:
            with torch.no_grad():
                ref = teacher(batch[0]).float().log_softmax(-1)
            kl = F.kl_div(logits.float().log_softmax(-1), ref, log_target=True, reduction="batchmean")
            loss = loss + recipe.distill * kl / logits.shape[1]
        return loss

    try:
        train(
            model, batches, steps=recipe.steps, lr=recipe.lr, warmup=recipe.warmup,
            trainable=lambda n: n in names, extra_loss=penalty, seed=recipe.seed, progress=False,
            callback=ctl.after_step,
        )
    except _OutOfTime:
        pass  # the time budget ended training after a whole step; the parameters are consistent
    finally:
        ctl.close()
    if save_to is not None:
        save_l2a_state(gm, save_to, names)
    lam = ctl.lam_at(len(ctl.losses) - 1)
    return L2ATrainResult(ctl.losses, ctl.fractions, lam, time.perf_counter() - started, names)


def save_l2a_state(gm: fx.GraphModule, path: str | Path, names: Iterable[str] | None = None) -> Path:
    """Writes ``gm``'s trained L2A parameters (default: ``l2a_trainable``) to a safetensors file,
    with the identity of the other weights (``condfx.train.save_trained``; checked on load)."""
    from condfx.train import save_trained

    names = sorted(names) if names is not None else sorted(l2a_trainable(gm))
    return save_trained(gm, names, path)
