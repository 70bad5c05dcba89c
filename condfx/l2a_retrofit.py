"""Oracle-supervised calibration of ``route-attention{form=select}`` (the L2A retrofit), no backprop.

Labels (the oracle). On calibration text, with every token routed (the original model), each
converted layer l computes both attention outputs of the same q/k/v for every token t: ``full``
(causal) and ``window``. The cost of letting t skip global attention in layer l is how much that
changes what the layer adds to the residual stream, i.e. the difference after the layer's output
projection P (found in the graph: the chain of reshapes from the select to the first linear):
    cost[l, t] = || P(full[l, t]) - P(window[l, t]) ||   (norm over the model width)
and, when the graph has no such chain, the difference before it (norm over heads x head dim).
Absolute, not relative to || full ||: a token whose attention output is large but barely changed
by the window is cheap, and one whose small output is changed and then amplified by P is not. On
SmolLM2-135M (window 128, 4 sinks, 2,048 tokens), skipping exactly 60% of the tokens in every
layer by this cost costs +6.4% perplexity; by the relative change before P, +13.0%.
Layer-local, not the change of the final logits: the layer-local cost of every (layer, token) pair
comes out of ONE forward pass per calibration sequence (both branches run anyway at insertion),
whereas the logit change of skipping one token in one layer needs a forward per (layer, token) pair,
or backprop through the model; neither fits a CPU budget of minutes (a first-order, backprop
estimate of the loss change was tried and picked worse tokens: +18.6% at the same skip). Tokens
within the first ``window`` positions cost exactly 0 (their window is their whole history).

Recall cost (``recall_costs``, opt-in: ``oracle_labels(recall=True)``, ``calibrate_select(recall=w)``).
The layer-local cost ranks tokens by how much their layer output moves; it cannot see which moves a
later retrieval depends on. The recall cost is the first-order change, were the token to skip in that
layer, of the log-likelihood of the tokens whose prediction needs context beyond the window, each
weighted by how much skipping everywhere raises its loss:
    recall[l, t] = | dJ/d full[l, t] . (full[l, t] - skip[l, t]) |,  J = sum_s w_s log p(x_{s+1} | x_<=s),
    w_s = max(0, NLL_s(no token routed) - NLL_s(original))
(one more forward and one backward of the all-routed model per row: a gradient used as a label, no
parameter trained through the model). The labels become cost + w x s_l x recall, s_l the ratio of the
layer's mean cost to its mean recall cost on the calibration rows. It reads the text's next tokens, so
an oracle ranking by it on the scored text sees more than a router could (perplexity: below the
original's); ``scored_until`` keeps an answer out of J. On SmolLM2 (window 128, full-rank correction,
20 essay passkey prompts of 1,024 tokens, 65% of the tokens past the window skipping in every layer of
every prompt by the oracle's own ranking, the key left out of J; scratch): the cost alone kept 8 of the
original's 12 keys, the recall cost alone 5, cost + recall at w = 1 all 12 (w = 3: 7). It does not carry
over to everything: on the MQAR model (benchmarks/l2a_mqar.py) w = 1 lowers the oracle from 96.6% to
83.2%. And the learned heads predict the mixed labels poorly from x_in (correlation 0.36 against 0.72):
on SmolLM2 at target 0.68 they keep 5 keys of 20 at +5.3% perplexity, against 3 at +3.8% without it.
Default off.

Window correction (``fit_corrections``, before the labels). A skipping token reads its window and
sinks only; what the keys outside would have added is partly predictable from what the token does
see. ``route-attention{form=select,correct=r}`` gives each layer a rank-r linear map from (attention
input, window output) to that difference, zero at insertion; ``fit_corrections`` fits it by ridge
least squares to full − window on the calibration text (all-routed model, tokens with keys outside
the window), the ridge picked per layer on held-out folds and the correction left at zero where none
helps there. The oracle cost below is then the change left *after* the correction, labelled with
cross-fitting (each calibration row by the corrections fitted without it), so that the thresholds are
set on costs the corrections will have on new text. On SmolLM2-135M (window 128, 4 sinks, every
layer skipping exactly 60% of the tokens chosen on the scored text, a scratch study), the oracle
router went from +5.6% perplexity to +1.1% with a full-rank correction (+1.5% at rank 128, +2.0% at
64, +2.5% at 32; from the attention input alone, full rank, +3.0%; a constant, the mean difference,
+6.5%), the learned router (open loop) from +8.4% to +2.5% (+3.4% at rank 128).

Router fit. Each layer's router head (``router_weight``, ``router_bias``) is fitted by ridge least
squares to the cost itself on its inference features (the attention input x_in, and with
``route-attention{router=window}`` the layer's window output beside it), over the tokens past the
window (the others carry no information: their cost is 0 by position, which the router does not
see). The head then predicts a token's cost. The ridge is chosen per layer on held-out rows
(``_choose_head_ridge``: fitted on the even rows, scored on the odd ones and back, by the true cost of
the skips each head picks): with the window output's 576 more features on SmolLM2 (WikiText, full-rank
correction, copy rows, target 0.68) the fixed ridge gave +6.1% perplexity at a scored minimum skip of
0.560 and the chosen ones +4.9% at 0.558; with x_in alone +3.7% and +3.8%, both at 0.61. Not its
log: a least-squares fit of log(cost + 1e-4) spends itself on the order of magnitude of the many
cheap tokens, while the decision turns on the expensive ones; on SmolLM2 (window 128, the heads' decisions taken at exactly 60% in every layer on
features of the all-routed model) fitting log cost costs +10.9% perplexity, fitting the cost +8.3%
(its square root +8.4%; a logistic or least-squares fit of the oracle's route/skip decision itself
+8.3% / +8.4%; the oracle +5.6%).

Thresholds (budget allocation). For a mean skip fraction ``skip`` and a per-layer floor ``floor``
(<= skip): every layer first skips its ``floor`` cheapest tokens by predicted cost; the remaining
(skip - floor) x layers x tokens skips go to the (layer, token) pairs with the lowest predicted cost
among the rest, across layers (the change of the residual stream is the common currency). Each layer's threshold is
then the predicted cost of its first routed token; a token routes (runs global attention) when its
predicted cost >= the threshold. With floor = skip every layer skips exactly ``skip``.

Closed loop (``rounds`` > 0). The heads are fitted on the features of the all-routed model (open
loop), but at inference a layer reads the stream its skipping predecessors left, whose statistics
differ: open-loop thresholds then skip a different fraction than allocated (on SmolLM2 more in the
late layers, less in some early ones). Each round runs the calibrated graph on the calibration text,
reads every layer's router scores there and allocates the thresholds again on them, so that the
allocation holds for the scores the routers will see.

Refits (``refits`` > 0). The rounds move the thresholds, but the heads still rank tokens by features
of the all-routed model; in the calibrated graph a layer's x_in has drifted, and on SmolLM2 (window
128, 60% in every layer) the decisions taken on the drifted features agree with those taken on the
open-loop ones for only 78-92% of the tokens: the same heads cost +10.9% perplexity when their
open-loop decisions are forced, +16.3% when they route on what they see. Each refit runs the
calibrated graph on the calibration text, reads every layer's x_in as it routes there, and fits the
heads again to the *same* oracle labels on the pooled features (open loop and every refit so far):
the router learns to predict the oracle's cost from the stream it will read. Then the threshold
rounds run again. With heads fitted to the log cost, one refit took SmolLM2 from +18.1% (mean skip
0.601) to +13.1% (0.579) and, at a target of 0.625, from +20.4% (0.632) to +15.4% (0.612); more
refits did not help (+13.3%, +13.8%).

Copy rows (``teach``). Natural text rarely makes a token recall something outside its window, so
the heads see few such tokens. ``copy_rows`` builds rows that repeat their first half (the copy
more than a window back); their oracle labels mark the copied tokens costly (on stories260K 1.3-1.8x
the cost of the same tokens the first time), and ``calibrate_select(teach=...)`` fits the heads to
those tokens too, while the thresholds are still allocated on the calibration rows alone (the copies
would otherwise make natural text skip more than the target). ``condfx.apply`` / ``optimize`` use
them with ``route-attention{copies=true}``. On SmolLM2 (window 128, full-rank correction, target
0.68, calibrated and scored on WikiText) they took the learned router from +5.0% to +3.7% perplexity
at the same skip (min 0.61, mean 0.66 on the scored text); passkey retrieval stayed at 0 of 10 (the
oracle router: 4 of 10, the original 5). Calibrated on the essays and scored on WikiText (window 256,
60% target, rank 0) they raised the loss from +0.05% to +0.7%: off by default.

The oracle router (``OracleRouter``: ``forced_routes`` + ``oracle_routes``) uses the labels themselves as decisions, with thresholds
allocated the same way on the true costs: the best any router of the same decision rule can do,
reported beside the learned one so that a miss says whether the method or the router is the limit.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx

from condfx.passes._insert import output_view
from condfx.patterns.routed import TAG, RoutedLayer, find_routed_layers

__all__ = ["STATE_NAMES", "Corrections", "OracleLabels", "OracleRouter", "SelectCalibration", "allocate", "calibrate_select",
           "copy_rows", "corrected_layers", "fit_corrections", "fit_head",
           "forced_routes", "oracle_costs", "oracle_labels", "oracle_routes", "recall_costs", "projection_chain", "routed_features", "router_scores",
           "select_layers", "set_forced_routes"]

_EPS = 1e-4  # floor of the cost inside the log: changes below it are all "free"
_CORRECTION = ("correct_down", "correct_up", "correct_bias")  # the window correction's parameters
# what calibration sets per select layer under ``<prefix>.l2a`` (the correction's only where there is one)
STATE_NAMES = ("router_weight", "router_bias", "threshold", *_CORRECTION)
_RIDGES = (1e-3, 1e-2, 1e-1, 1.0)  # the corrections' ridges tried, relative to the mean feature variance
_HEAD_RIDGES = (1e-3, 1e-2, 1e-1, 1.0, 10.0)  # the router heads' ridges tried, the same way
# the output projection ending a select layer's chain of reshapes (captured graphs are ATen-level)
_PROJECTIONS = frozenset({torch.ops.aten.linear.default, torch.ops.aten.mm.default, torch.ops.aten.addmm.default,
                          torch.ops.aten.matmul.default})


def select_layers(gm: fx.GraphModule) -> list[RoutedLayer]:
    """The select-form L2A layers of ``gm``; ValueError when there is none."""
    layers = [r for r in find_routed_layers(gm) if "window" in r.nodes and "input" in r.nodes]
    if not layers:
        msg = "the model has no route-attention{form=select} layer: apply it before calibrating."
        raise ValueError(msg)
    return layers


@dataclass
class OracleLabels:
    """Per converted layer: the oracle costs and the router features of the calibration tokens.

    Attributes:
        layers: the layer indices, in order.
        costs: per layer, (N,) float32 change of the layer's output when skipping (module docstring).
        features: per layer, (N, width) float32 router inputs (x_in, and the window output when the
            router reads it).
        positions: (N,) int64 position of each token in its sequence.
        recall: per layer, (N,) float32 recall costs (``recall_costs``) when asked for, else None.
    """

    layers: list[int]
    costs: list[torch.Tensor]
    features: list[torch.Tensor]
    positions: torch.Tensor
    recall: list[torch.Tensor] | None = None


@contextmanager
def _all_routed(layers: list[RoutedLayer], threshold: float = float("-inf")):
    """Every token of ``layers`` routes inside the block (the original model; with ``threshold`` +inf
    none does); their thresholds are restored after it, also when it fails."""
    saved = [r.state.threshold.detach().clone() for r in layers]
    with torch.no_grad():
        for r in layers:
            r.state.threshold.fill_(threshold)
    try:
        yield
    finally:
        with torch.no_grad():
            for r, t in zip(layers, saved, strict=True):
                r.state.threshold.copy_(t)


def corrected_layers(gm: fx.GraphModule) -> list[RoutedLayer]:
    """The select layers of ``gm`` with a window correction (``route-attention{correct=r}``, r > 0)."""
    return [r for r in select_layers(gm) if "corrected" in r.nodes]


def layer_costs(full: torch.Tensor, window: torch.Tensor) -> torch.Tensor:
    """(B, T) norm of the change ``full - window`` over every dimension after the first two."""
    return (full.float() - window.float()).flatten(2).norm(dim=-1)


def projection_chain(out: fx.Node, limit: int = 8) -> list[fx.Node] | None:
    """The nodes from a select layer's ``out`` (exclusive) to its output projection (inclusive), each
    the only user of the one before; None when the graph has no such chain within ``limit`` nodes."""
    chain, node = [], out
    for _ in range(limit):
        if len(node.users) != 1:
            return None
        node = next(iter(node.users))
        if node.op != "call_function":
            return None
        chain.append(node)
        if node.target in _PROJECTIONS:
            return chain
    return None


def _outside(chain: list[fx.Node], start: fx.Node) -> list[str]:
    """Names of the nodes the chain reads besides its own links (weights, sizes)."""
    links = {start.name, *(n.name for n in chain)}
    return list(dict.fromkeys(a.name for n in chain for a in n.all_input_nodes if a.name not in links))


def _replay(chain: list[fx.Node], start: fx.Node, value: torch.Tensor, env: dict) -> torch.Tensor:
    """The chain's output with ``value`` in place of ``start`` (``env``: the outside values by name)."""
    prev, cur = start.name, value
    for node in chain:
        def arg(a: fx.Node, prev=prev, cur=cur):
            return cur if a.name == prev else env[a.name]
        cur = node.target(*fx.node.map_arg(node.args, arg), **fx.node.map_arg(node.kwargs, arg))
        prev = node.name
    return cur


def _router_input(node: fx.Node) -> fx.Node:
    """What the router whose "route" node is ``node`` reads: route = ge(squeeze(linear(features)))."""
    return node.args[0].args[0].args[0]


def _skip_role(layer: RoutedLayer) -> str:
    """The role of what a skipping token reads: the corrected window when the layer has a correction."""
    return "corrected" if "corrected" in layer.nodes else "window"


def _label_view(gm: fx.GraphModule, layers: list[RoutedLayer], raw: bool = False, detached: bool = False):
    """(view, chains, names): ``view(ids)`` returns (logits, per layer what the router reads (with
    ``raw``: what the correction reads), full per layer, what a skipping token reads per layer (the
    raw window output with ``raw``), then the value of every name in ``names``: what the chains read
    besides their links); ``chains[j]`` is None where layer j has no projection chain. With
    ``detached`` the window branches are cut from autograd (``recall_costs`` differentiates the
    all-routed model, where they add nothing to the output: cutting them saves their backward)."""
    chains = [projection_chain(r.nodes["out"]) for r in layers]
    names = list(dict.fromkeys(name for c, r in zip(chains, layers, strict=True) if c
                               for name in _outside(c, r.nodes["out"])))

    def outputs(graph: fx.Graph, output: fx.Node) -> tuple:
        by_tag = {n.meta.get(TAG): n for n in graph.nodes if TAG in n.meta}
        by_name = {n.name: n for n in graph.nodes}
        if detached:
            for r in layers:
                win = by_tag[(r.prefix, "window")]
                with graph.inserting_after(win):
                    cut = graph.call_function(torch.ops.aten.detach.default, (win,))
                win.replace_all_uses_with(cut, delete_user_cb=lambda user, cut=cut: user is not cut)
        logits = output.args[0]
        logits = logits[0] if isinstance(logits, (tuple, list)) else logits
        roles = [("routed",) * len(layers), ["window" if raw else _skip_role(r) for r in layers]]
        tagged = (by_tag[(r.prefix, role)] for group in roles for r, role in zip(layers, group, strict=True))
        reads = (by_tag[(r.prefix, "features")] if raw else _router_input(by_tag[(r.prefix, "route")])
                 for r in layers)
        return (logits, *reads, *tagged, *(by_name[name] for name in names))

    return output_view(gm, outputs), chains, names


def _costs(chain: list[fx.Node] | None, start: fx.Node, full: torch.Tensor, win: torch.Tensor,
           env: dict) -> torch.Tensor:
    """(B, T) cost of one layer's tokens: the change after the projection chain, or before it
    (module docstring). ``full``, ``win``: (B, H, T, D)."""
    if chain is not None:
        a, b = _replay(chain, start, full, env), _replay(chain, start, win, env)
        if a.shape[:2] == (full.shape[0], full.shape[2]):  # (B, T, ...): the tokens where expected
            return layer_costs(a, b)
    return layer_costs(full.transpose(1, 2), win.transpose(1, 2))


def oracle_labels(gm: fx.GraphModule, batches: Sequence[torch.Tensor],
                  progress: Callable[[int, int], None] | None = None,
                  corrections: Corrections | None = None, recall: bool = False,
                  scored_until: int | None = None) -> OracleLabels:
    """Runs ``gm`` with every token routed on ``batches`` (B, T) and returns the oracle labels.

    With ``corrections`` (``fit_corrections`` on the same ``batches``), each row is labelled with the
    window corrections fitted without its fold (cross-fitting), and the final ones are set again
    afterwards. With ``recall`` the labels also hold the recall costs (``recall_costs``; one more
    forward and one backward per row; with ``scored_until``, the recall objective leaves out the
    predictions of the tokens from that position on, e.g. an answer the labels must not see). The
    graph's thresholds are restored afterwards.
    """
    layers = select_layers(gm)
    n = len(layers)
    view, chains, names = _label_view(gm, layers, detached=recall)
    costs, feats, pos, recalls = [[] for _ in layers], [[] for _ in layers], [], [[] for _ in layers]
    index = 0
    try:
        with _all_routed(layers), torch.no_grad():
            for i, ids in enumerate(batches):
                for row in ids:
                    if corrections is not None:
                        corrections.use(layers, _fold_of(index, corrections.folds))
                    index += 1
                    if recall:
                        out, rec = _recall_row(view, layers, row[None], scored_until)
                        for j, r in enumerate(rec):
                            recalls[j].append(r)
                    else:
                        out = view(row[None])
                    env = dict(zip(names, out[1 + 3 * n :], strict=True))
                    for j, r in enumerate(layers):
                        x, full, win = out[1 + j], out[1 + n + j], out[1 + 2 * n + j]
                        costs[j].append(_costs(chains[j], r.nodes["out"], full, win, env)[0])
                        feats[j].append(x[0].float().reshape(x.shape[1], -1))
                    pos.append(torch.arange(row.numel()))
                if progress is not None:
                    progress(i + 1, len(batches))
    finally:
        if corrections is not None:
            corrections.use(layers, None)
    return OracleLabels([r.layer for r in layers], [torch.cat(c) for c in costs],
                        [torch.cat(f) for f in feats], torch.cat(pos),
                        [torch.cat(r) for r in recalls] if recall else None)


def _recall_row(view: fx.GraphModule, layers: list[RoutedLayer], x: torch.Tensor,
                scored_until: int | None = None) -> tuple[tuple, list[torch.Tensor]]:
    """The label view's outputs on ``x`` (1, T) (detached) and, per layer, the recall cost (T,) of its
    tokens (``recall_costs``; the objective scores the tokens before ``scored_until``); called with
    every token routed."""
    n = len(layers)
    with _all_routed(layers, float("inf")), torch.no_grad():
        skipped = view(x)[0]
    with torch.enable_grad():
        out = view(x)
        logp = out[0][0, :-1].float().log_softmax(-1).gather(-1, x[0, 1:, None])[:, 0]
        nll = F.cross_entropy(skipped[0, :-1].float(), x[0, 1:], reduction="none")
        weight = (nll + logp.detach()).clamp(min=0)  # how much skipping everywhere costs each prediction
        if scored_until is not None:
            weight[max(scored_until - 1, 0) :] = 0.0
        fulls = out[1 + n : 1 + 2 * n]
        grads = torch.autograd.grad((weight * logp).sum(), fulls)
    out = tuple(o.detach() if isinstance(o, torch.Tensor) else o for o in out)
    deltas = (out[1 + n + j] - out[1 + 2 * n + j] for j in range(n))
    return out, [(g.float() * d.float()).sum((1, 3))[0].abs() for g, d in zip(grads, deltas, strict=True)]


def recall_costs(gm: fx.GraphModule, batches: Sequence[torch.Tensor],
                 progress: Callable[[int, int], None] | None = None) -> list[torch.Tensor]:
    """Per select layer, (N,) float32 over the tokens of ``batches`` (in ``oracle_labels``' order): what
    letting the token skip global attention in that layer would cost the tokens that need context
    beyond their window, to first order (module docstring, "Recall cost"):
        recall[l, t] = | dJ/d full[l, t] . (full[l, t] - skip[l, t]) |,   J = sum_s w_s log p(x_{s+1} | x_<=s)
    with w_s = max(0, NLL of token s+1 with every layer skipping - its NLL in the original model).
    One forward with no token routed and one forward and backward of the all-routed model per row;
    no parameter is changed. The thresholds are restored afterwards."""
    return oracle_labels(gm, batches, progress, recall=True).recall


class _Moments:
    """Running sums for a least-squares fit of y (m,) on f (p,) with a bias, in float64."""

    def __init__(self, p: int, m: int):
        self.ff = torch.zeros(p, p, dtype=torch.float64)
        self.fy = torch.zeros(p, m, dtype=torch.float64)
        self.f = torch.zeros(p, dtype=torch.float64)
        self.y = torch.zeros(m, dtype=torch.float64)
        self.yy = 0.0
        self.n = 0

    def add(self, f: torch.Tensor, y: torch.Tensor) -> None:
        f, y = f.double(), y.double()
        self.ff += f.T @ f
        self.fy += f.T @ y
        self.f += f.sum(0)
        self.y += y.sum(0)
        self.yy += float((y * y).sum())
        self.n += f.shape[0]

    @staticmethod
    def pooled(parts: list[_Moments]) -> _Moments:
        """The sums of ``parts`` together."""
        out = _Moments(*parts[0].fy.shape)
        for m in parts:
            out.ff += m.ff
            out.fy += m.fy
            out.f += m.f
            out.y += m.y
            out.yy += m.yy
            out.n += m.n
        return out

    def error(self, down: torch.Tensor, up: torch.Tensor, bias: torch.Tensor) -> float:
        """Sum over the rows of || y − (f @ down^T @ up^T + bias) ||², from the sums alone."""
        w = down.T @ up.T  # (p, m)
        fit = float((w * (self.ff @ w)).sum()) + 2 * float(bias @ (w.T @ self.f)) + self.n * float(bias @ bias)
        return self.yy - 2 * float((w * self.fy).sum()) - 2 * float(bias @ self.y) + fit

    def _centred(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(mean of f, mean of y, covariance of f, cross-covariance of f and y)."""
        n = max(self.n, 1)
        mf, my = self.f / n, self.y / n
        return mf, my, self.ff / n - torch.outer(mf, mf), self.fy / n - torch.outer(mf, my)

    def ridge(self, ridges: Sequence[float]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per ridge (relative to the mean variance of f), (A (p, m), b (m,)): the ridge least-squares
        fit y ≈ f @ A + b."""
        mf, my, cov, cross = self._centred()
        eye = torch.eye(cov.shape[0], dtype=cov.dtype)
        fits = []
        for ridge in ridges:
            lam = ridge * float(cov.diagonal().mean()) + 1e-12
            a = torch.linalg.solve(cov + lam * eye, cross)
            fits.append((a, my - mf @ a))
        return fits

    def reduced_rank(self, rank: int, ridge: float = 1e-2) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(down (r, p), up (m, r), bias (m,)): the ridge fit y ≈ f @ A + b with A cut to the rank-r
        subspace of its fitted values (reduced-rank regression: A → A V V^T, V the top-r
        eigenvectors of the fitted values' covariance A^T C A)."""
        mf, my, cov, _ = self._centred()
        a = self.ridge((ridge,))[0][0]
        v = torch.linalg.eigh(a.T @ cov @ a).eigenvectors[:, -rank:]  # ascending order: the top r last
        down = (a @ v).T
        return down, v, my - mf @ (a @ v) @ v.T


@dataclass(frozen=True)
class Corrections:
    """What ``fit_corrections`` fitted: per fold, the corrections fitted without that fold's rows.

    Attributes:
        layers: the prefixes of the corrected layers, in order.
        folds: how many folds the calibration rows were dealt into (``_fold_of``); 1 means
            no cross-fitting (a single row).
        held_out: per fold, per layer, the (down, up, bias) fitted on the other folds' rows.
        final: per layer, the (down, up, bias) fitted on every row (set in the graph).
    """

    layers: tuple[str, ...]
    folds: int
    held_out: tuple[tuple[tuple[torch.Tensor, ...], ...], ...]
    final: tuple[tuple[torch.Tensor, ...], ...]

    def use(self, layers: list[RoutedLayer], fold: int | None) -> None:
        """Sets the corrections fitted without ``fold``'s rows (None: the final ones) in ``layers``
        (the graph's select layers, or those with a correction)."""
        chosen = self.final if fold is None or self.folds < 2 else self.held_out[fold]
        by_prefix = {r.prefix: r for r in layers}
        with torch.no_grad():
            for prefix, params in zip(self.layers, chosen, strict=True):
                state = by_prefix[prefix].state
                for name, value in zip(_CORRECTION, params, strict=True):
                    getattr(state, name).copy_(value.to(getattr(state, name).dtype))


def _fold_of(row: int, folds: int) -> int:
    """The cross-fitting fold of calibration row ``row`` (counted over all batches) among ``folds``."""
    return row % folds


def _choose_ridge(folds: list[_Moments | None], rank: int) -> float | None:
    """The ridge of ``_RIDGES`` with the least error on held-out folds (each fold scored by the fit on
    the others), or None when none beats no correction there; 1e-2 without two folds to compare."""
    folds = [m for m in folds if m is not None]
    if len(folds) < 2:
        return 1e-2
    errors = {ridge: 0.0 for ridge in _RIDGES}
    for k, held in enumerate(folds):
        rest = _Moments.pooled([m for i, m in enumerate(folds) if i != k])
        for ridge in _RIDGES:
            errors[ridge] += held.error(*rest.reduced_rank(rank, ridge))
    best = min(errors, key=errors.get)
    return best if errors[best] < sum(m.yy for m in folds) else None


def fit_corrections(gm: fx.GraphModule, batches: Sequence[torch.Tensor],
                    progress: Callable[[int, int], None] | None = None, folds: int = 2) -> Corrections | None:
    """Fits every select layer's window correction (``route-attention{form=select,correct=r}``) by
    least squares on ``batches`` (B, T), sets it in ``gm`` and returns it (None: no layer has one).

    With every token routed, each layer's target is the difference full − window of its attention
    output (B, H, T, D) at the tokens the correction applies to (position >= ``correct_from``); the
    features are the attention input and the window output, as the graph gives them to the correction.
    The fit is ridge least squares cut to the correction's rank (``_Moments.reduced_rank``), the
    ridge chosen per layer on held-out folds; a layer where no ridge beats no correction on held-out
    rows keeps a zero correction.
    Cross-fitting: the rows are dealt into ``folds`` folds and each fold also gets the corrections
    fitted without its rows, which ``oracle_labels(corrections=...)`` uses to label that fold: a
    correction scored on the rows it was fitted to looks better than it will on new text (on
    stories260K, 4 rows of 128 tokens, the oracle thresholds set on in-sample labels then skipped
    16-45% of held-out tokens instead of 60%). The corrections are zeroed before the pass (the window
    output is then the raw window attention) and the thresholds restored after it.
    """
    layers = corrected_layers(gm)
    if not layers:
        return None
    rows = sum(int(ids.shape[0]) for ids in batches)
    folds = max(1, min(folds, rows))
    with torch.no_grad():
        for r in layers:
            for name in _CORRECTION:
                getattr(r.state, name).zero_()
    view, _, _ = _label_view(gm, layers, raw=True)
    n = len(layers)
    moments: list[list[_Moments | None]] = [[None] * n for _ in range(folds)]  # fold → layer
    row = 0
    with _all_routed(layers), torch.no_grad():
        for i, ids in enumerate(batches):
            for one in ids:
                out = view(one[None])
                pos = torch.arange(one.numel())
                for j, r in enumerate(layers):
                    x, full, win = out[1 + j][0], out[1 + n + j][0], out[1 + 2 * n + j][0]
                    at = pos >= int(r.state.correct_from)
                    f = x.reshape(one.numel(), -1)[at]  # (attention input, window output) per token
                    y = (full - win).transpose(0, 1).flatten(1)[at]
                    m = moments[_fold_of(row, folds)]
                    if m[j] is None:
                        m[j] = _Moments(f.shape[1], y.shape[1])
                    m[j].add(f, y)
                row += 1
            if progress is not None:
                progress(i + 1, len(batches))
    shapes = [tuple(getattr(r.state, name).shape for name in _CORRECTION) for r in layers]
    ridges = [_choose_ridge([m[j] for m in moments], shapes[j][0][0]) for j in range(n)]

    def fit(chosen: list[int]) -> tuple[tuple[torch.Tensor, ...], ...]:
        out = []
        for j, ridge in enumerate(ridges):
            parts = [moments[k][j] for k in chosen if moments[k][j] is not None]
            if ridge is None or not parts:  # no correction helps this layer on held-out rows
                out.append(tuple(torch.zeros(shape, dtype=torch.float64) for shape in shapes[j]))
            else:
                out.append(_Moments.pooled(parts).reduced_rank(shapes[j][0][0], ridge))
        return tuple(out)

    final = fit(list(range(folds)))
    held = tuple(fit([k for k in range(folds) if k != f]) for f in range(folds)) if folds > 1 else ()
    fitted = Corrections(tuple(r.prefix for r in layers), folds, held, final)
    fitted.use(layers, None)
    return fitted


def fit_head(features: torch.Tensor, target: torch.Tensor, ridge: float = 1e-3) -> tuple[torch.Tensor, float]:
    """(w (d,), b): ridge least squares of ``target`` (N,) on ``features`` (N, d) with a bias."""
    return _ridge_heads(features, target, (ridge,))[0]


def _ridge_heads(features: torch.Tensor, target: torch.Tensor,
                 ridges: Sequence[float]) -> list[tuple[torch.Tensor, float]]:
    """``fit_head`` at each of ``ridges`` (relative to the mean feature variance), one Gram matrix."""
    sums = _Moments(features.shape[1], 1)
    sums.add(features, target.reshape(-1, 1))
    return [(a[:, 0], float(b[0])) for a, b in sums.ridge(ridges)]


def _choose_head_ridge(x: torch.Tensor, y: torch.Tensor, rows: torch.Tensor, skip: float,
                       extra: Sequence[tuple[torch.Tensor, torch.Tensor]] = ()) -> float:
    """The ridge of ``_HEAD_RIDGES`` whose head, fitted on half of the calibration rows (even / odd,
    plus ``extra`` pairs), picks the cheapest skips on the other half: the least true cost of the
    ``skip`` fraction of held-out tokens it predicts cheapest, both halves summed. ``x`` (N, d),
    ``y`` (N,) a layer's tokens past the window, ``rows`` (N,) their row. 1e-3 without two rows."""
    half = rows % 2 == 0
    if bool(half.all()) or not bool(half.any()):
        return 1e-3
    spent = dict.fromkeys(_HEAD_RIDGES, 0.0)
    for fit_on in (half, ~half):
        fx_ = torch.cat([x[fit_on], *(f for f, _ in extra)])
        fy = torch.cat([y[fit_on], *(t for _, t in extra)])
        held_x, held_y = x[~fit_on].double(), y[~fit_on].double()
        count = int(math.floor(skip * len(held_y)))
        for ridge, (w, b) in zip(_HEAD_RIDGES, _ridge_heads(fx_, fy, _HEAD_RIDGES), strict=True):
            spent[ridge] += float(held_y[(held_x @ w + b).argsort()[:count]].sum())
    return min(spent, key=spent.get)


def allocate(scores: list[torch.Tensor], skip: float, floor: float) -> list[float]:
    """Per-layer thresholds: skip a layer's token when its score < the layer's threshold.

    Every layer skips at least ``floor`` of its tokens (its lowest scores; a group of tied scores
    that straddles the floor skips whole); the rest of the budget ``skip`` x all tokens goes to the
    lowest remaining scores across layers.
    """
    if not 0.0 < floor <= skip < 1.0:
        msg = f"the skip targets must satisfy 0 < floor <= skip < 1; got floor={floor}, skip={skip}."
        raise ValueError(msg)
    ordered = [s.double().sort().values for s in scores]
    floors = [int(math.floor(floor * len(s))) for s in ordered]
    counts = list(floors)
    extra = int(round(skip * sum(len(s) for s in ordered))) - sum(counts)
    if extra > 0:
        rest = torch.cat([s[c:] for s, c in zip(ordered, counts, strict=True)])
        owner = torch.cat([torch.full((len(s) - c,), j) for j, (s, c) in enumerate(zip(ordered, counts, strict=True))])
        chosen = owner[rest.argsort()[:extra]]
        for j in range(len(ordered)):
            counts[j] += int((chosen == j).sum())
    return [_threshold_at(s, c, f) for s, c, f in zip(ordered, counts, floors, strict=True)]


def _threshold_at(ordered: torch.Tensor, count: int, least: int = 0) -> float:
    """The threshold that skips (score < threshold) the number of ``ordered`` scores nearest to
    ``count``, and at least ``least`` of them: tied scores skip or route together (the same token in a
    layer that reads only its embedding scores the same every time), so the tie group at the
    ``count``-th score goes to the side nearer the count (to skipping when both are as near), and to
    skipping when routing it would leave fewer than ``least`` skipped (the floor is a promise)."""
    if count >= len(ordered):
        return math.inf
    at = ordered[count]
    below = int(torch.searchsorted(ordered, at, right=False))  # skipped with the threshold at ``at``
    above = int(torch.searchsorted(ordered, at, right=True))  # skipped with the tie group too
    if above - count <= count - below or below < least:
        return float(ordered[above]) if above < len(ordered) else math.inf
    return float(at)


@dataclass(frozen=True)
class SelectCalibration:
    """What ``calibrate_select`` did.

    Attributes:
        layers: converted layer indices.
        thresholds: per layer, the router threshold (predicted cost) set in the graph.
        oracle_thresholds: per layer, the threshold on the true log cost the oracle router uses.
        skip: per layer, the fraction of calibration tokens the learned router skips.
        oracle_skip: per layer, the same for the oracle router.
        correlation: per layer, the Pearson correlation of predicted and true cost
            (tokens past the window; after a refit, on the features the calibrated graph reads).
        tokens: calibration tokens per layer.
        ridges: per layer, the ridge of its head, chosen on held-out rows (``_choose_head_ridge``).
    """

    layers: tuple[int, ...]
    thresholds: tuple[float, ...]
    oracle_thresholds: tuple[float, ...]
    skip: tuple[float, ...]
    oracle_skip: tuple[float, ...]
    correlation: tuple[float, ...]
    tokens: int
    ridges: tuple[float, ...] = ()

    def summary(self) -> str:
        """One line: the skip fractions and the fit quality."""
        lo, mean = min(self.skip), sum(self.skip) / len(self.skip)
        corr = sum(self.correlation) / len(self.correlation)
        return (f"oracle-taught routers on {self.tokens} tokens: calibration skip min {lo:.3f} mean {mean:.3f} "
                f"over {len(self.layers)} layers; mean correlation of predicted and true cost {corr:.2f}")


def copy_rows(batches: Sequence[torch.Tensor], window: int) -> list[torch.Tensor]:
    """Rows that repeat their first half: (B, T) → (B, 2·(T // 2)), the copy at distance T // 2 (more
    than ``window``, else no row). A token of the copy predicts its next token best by reading the
    same place one half earlier, outside its window: the oracle marks such tokens costly, and heads
    fitted to them learn what a token that recalls far context looks like, which natural text shows
    rarely (module docstring)."""
    return [torch.cat([ids[:, : ids.shape[1] // 2]] * 2, 1) for ids in batches if ids.shape[1] // 2 > window]


def check_calibration_rows(batches: Sequence[torch.Tensor], window: int) -> None:
    """ValueError when the calibration sequences are not longer than the window."""
    length = max((int(b.shape[-1]) for b in batches), default=0)
    if length <= window:
        msg = (f"route-attention{{form=select}} calibrates on sequences longer than its window {window}; "
               f"the calibration batches hold {length} tokens per sequence: give longer ones.")
        raise ValueError(msg)


def _tagged_view(gm: fx.GraphModule, layers: list[RoutedLayer], role: str,
                 pick: Callable[[fx.Node], fx.Node] | None = None) -> fx.GraphModule:
    """A view of ``gm`` returning, per layer, its node tagged ``role`` (or ``pick`` of it)."""
    def outputs(graph: fx.Graph, output: fx.Node) -> tuple:
        by_tag = {n.meta.get(TAG): n for n in graph.nodes if TAG in n.meta}
        nodes = (by_tag[(r.prefix, role)] for r in layers)
        return tuple(n if pick is None else pick(n) for n in nodes)

    return output_view(gm, outputs)


def routed_features(gm: fx.GraphModule, batches: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Per select layer, the router features ((N, width) float32: x_in, and the window output when
    the router reads it) of the tokens of ``batches`` in ``gm`` as it routes now (closed loop)."""
    layers = select_layers(gm)
    view = _tagged_view(gm, layers, "route", _router_input)
    feats = [[] for _ in layers]
    with torch.no_grad():
        for ids in batches:
            for j, x in enumerate(view(ids)):
                feats[j].append(x.float().reshape(x.shape[0] * x.shape[1], -1))
    return [torch.cat(f) for f in feats]


def router_scores(gm: fx.GraphModule, batches: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Per select layer, the router scores (predicted costs, (N,) float64) of the tokens of
    ``batches`` in ``gm`` as it routes now (closed loop)."""
    layers = select_layers(gm)
    view = _tagged_view(gm, layers, "route", lambda node: node.args[0])
    scores = [[] for _ in layers]
    with torch.no_grad():
        for ids in batches:
            for j, s in enumerate(view(ids)):
                scores[j].append(s.double().reshape(-1))
    return [torch.cat(s) for s in scores]


def calibrate_select(gm: fx.GraphModule, batches: Sequence[torch.Tensor], skip: float, floor: float | None = None,
                     progress: Callable[[int, int], None] | None = None,
                     labels: OracleLabels | None = None, rounds: int = 2, refits: int = 1,
                     teach: OracleLabels | None = None, recall: float = 0.0) -> SelectCalibration:
    """Fits every select-form router of ``gm`` to the oracle and sets its threshold (module docstring).

    Args:
        gm: a graph rewritten by ``route-attention{form=select}`` (changed in place: router heads,
            thresholds, ``oracle_threshold`` buffers).
        batches: calibration token ids, (B, T) each, T > window.
        skip: the mean fraction of tokens that skip global attention, in (0, 1).
        floor: the least fraction every layer skips; None means ``skip``.
        progress: ``progress(done, total)`` over the batches.
        labels: labels already computed on ``batches`` (``oracle_labels``), to share them; the caller
            has then fitted the window corrections (``fit_corrections``) and given them to
            ``oracle_labels``. Without labels, the corrections are fitted here first, then the
            labels computed.
        rounds: closed-loop threshold rounds (module docstring), one forward per batch each.
        refits: closed-loop refits of the heads (module docstring), each one forward per batch and
            then ``rounds`` threshold rounds again.
        teach: labels of further rows (``oracle_labels`` on ``copy_rows(batches, window)``) whose
            tokens the heads are also fitted to but that set no threshold (module docstring).
        recall: weight of the recall cost in the labels (module docstring, "Recall cost"): each
            layer's cost becomes cost + recall * s * recall_cost, s scaling the layer's mean recall cost
            to its mean cost; ``labels`` and ``teach`` must then hold recall costs. 0: the cost alone.

    Raises:
        ValueError: a target outside (0, 1), sequences not longer than the window, no select layer,
            a negative recall weight or labels without the recall costs it needs.
    """
    if not 0.0 < skip < 1.0 or (floor is not None and not 0.0 < floor <= skip):
        msg = f"the skip target must be in (0, 1) and the floor in (0, skip]; got skip={skip}, floor={floor}."
        raise ValueError(msg)
    if rounds < 0 or refits < 0 or recall < 0:
        msg = f"rounds, refits and recall must be >= 0; got rounds={rounds}, refits={refits}, recall={recall}."
        raise ValueError(msg)
    if recall and any(lab is not None and lab.recall is None for lab in (labels, teach)):
        msg = "calibrate_select(recall > 0) needs labels with recall costs: oracle_labels(..., recall=True)."
        raise ValueError(msg)
    layers = select_layers(gm)
    window = int(layers[0].state.window)
    check_calibration_rows(batches, window)
    if labels is None:
        labels = oracle_labels(gm, batches, progress, fit_corrections(gm, batches), recall=recall > 0)
    past = labels.positions >= window
    weights = _recall_weights(labels, past, recall)
    _set_recall_weights(layers, weights)
    costs = _with_recall(labels, weights)
    logs = [torch.log(cost + _EPS) for cost in costs]  # the oracle's scores
    # per layer, the (features, costs) pairs the heads are fitted to so far
    pooled = [[(x[past], y[past])] for x, y in zip(labels.features, costs, strict=True)]
    if teach is not None:
        at = teach.positions >= window
        for p, x, y in zip(pooled, teach.features, _with_recall(teach, weights), strict=True):
            p.append((x[at], y[at]))
    rows = (labels.positions == 0).cumsum(0)[past]  # each token's calibration row
    ridges = [_choose_head_ridge(x[past], y[past], rows, skip, p[1:])
              for x, y, p in zip(labels.features, costs, pooled, strict=True)]
    preds, corr = _fit_heads(layers, pooled, costs, past, labels.features, ridges)
    fl = skip if floor is None else floor
    thr = allocate(preds, skip, fl)
    othr = allocate(logs, skip, fl)
    with torch.no_grad():
        _set_thresholds(layers, thr)
        for r, o in zip(layers, othr, strict=True):
            _set_oracle_threshold(r, o)
        for refit in range(refits + 1):
            if refit:  # the heads again, on the stream the calibrated graph reads
                closed = routed_features(gm, batches)
                for p, x, y in zip(pooled, closed, costs, strict=True):
                    p.append((x[past], y[past]))
                preds, corr = _fit_heads(layers, pooled, costs, past, closed, ridges)
                _set_thresholds(layers, thr := allocate(preds, skip, fl))
            for _ in range(rounds):
                preds = router_scores(gm, batches)
                _set_thresholds(layers, thr := allocate(preds, skip, fl))
    return SelectCalibration(
        tuple(labels.layers), tuple(thr), tuple(othr),
        tuple(float((p < t).double().mean()) for p, t in zip(preds, thr, strict=True)),
        tuple(float((y < t).double().mean()) for y, t in zip(logs, othr, strict=True)),
        tuple(corr), int(labels.positions.numel()), tuple(ridges))


def _recall_weights(labels: OracleLabels, past: torch.Tensor, recall: float) -> list[float]:
    """Per layer, the weight of the recall cost in the labels: ``recall`` times the ratio of the
    layer's mean cost to its mean recall cost past the window (0 everywhere when ``recall`` is 0)."""
    if not recall:
        return [0.0] * len(labels.costs)
    return [recall * float(c[past].double().mean()) / max(float(r[past].double().mean()), 1e-30)
            for c, r in zip(labels.costs, labels.recall, strict=True)]


def _with_recall(labels: OracleLabels, weights: list[float]) -> list[torch.Tensor]:
    """Per layer, (N,) float64: the cost plus its weight times the recall cost."""
    if not any(weights):
        return [c.double() for c in labels.costs]
    return [c.double() + w * r.double() for c, r, w in zip(labels.costs, labels.recall, weights, strict=True)]


def _set_recall_weights(layers: list[RoutedLayer], weights: list[float]) -> None:
    """Records each layer's recall weight (buffer ``recall_weight``, made when first non-zero) for the
    oracle router."""
    for r, w in zip(layers, weights, strict=True):
        if not hasattr(r.state, "recall_weight"):
            if not w:
                continue
            r.state.register_buffer("recall_weight", torch.tensor(0.0, dtype=torch.float64))
        r.state.recall_weight.fill_(w)


def _fit_heads(layers: list[RoutedLayer], pooled: list[list[tuple[torch.Tensor, torch.Tensor]]],
               costs: list[torch.Tensor], past: torch.Tensor,
               seen: list[torch.Tensor], ridges: list[float]) -> tuple[list[torch.Tensor], list[float]]:
    """Fits every layer's head to the pooled (features, costs) pairs of its tokens at its ridge.
    Returns the heads' scores on ``seen`` (all calibration tokens) and their correlation with
    ``costs`` past the window."""
    preds, corr = [], []
    for r, pairs, y, x, ridge in zip(layers, pooled, costs, seen, ridges, strict=True):
        w, b = fit_head(torch.cat([f for f, _ in pairs]), torch.cat([t for _, t in pairs]), ridge)
        with torch.no_grad():
            r.state.router_weight.copy_(w[None].to(r.state.router_weight.dtype))
            r.state.router_bias.fill_(b)
        pred = x.double() @ w + b
        preds.append(pred)
        corr.append(float(torch.corrcoef(torch.stack([pred[past], y[past]]))[0, 1]))
    return preds, corr


def _set_thresholds(layers: list[RoutedLayer], thresholds: list[float]) -> None:
    with torch.no_grad():
        for r, t in zip(layers, thresholds, strict=True):
            r.state.threshold.fill_(t)


def _set_oracle_threshold(layer: RoutedLayer, value: float) -> None:
    state = layer.state
    if not hasattr(state, "oracle_threshold"):
        state.register_buffer("oracle_threshold", torch.tensor(0.0, dtype=torch.float64))
    state.oracle_threshold.fill_(value)


# ---------------------------------------------------------------------------------- oracle router
def forced_routes(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy of ``gm`` whose select layers read their route mask from a ``forced_route`` buffer
    ((B, T) bool, set by ``set_forced_routes`` before each call) instead of their router."""
    out = copy.deepcopy(gm)
    for r in select_layers(out):
        node = r.nodes["route"]
        r.state.register_buffer("forced_route", torch.ones(1, 1, dtype=torch.bool))
        with out.graph.inserting_before(node):
            forced = out.graph.get_attr(f"{r.prefix}.l2a.forced_route")
        forced.meta[TAG] = node.meta[TAG]
        node.replace_all_uses_with(forced)
        out.graph.erase_node(node)
    out.graph.eliminate_dead_code()
    out.recompile()
    return out


def set_forced_routes(gm: fx.GraphModule, routes: Sequence[torch.Tensor]) -> None:
    """Sets the ``forced_route`` buffers of a ``forced_routes`` graph (one (B, T) bool per layer)."""
    for r, route in zip(select_layers(gm), routes, strict=True):
        r.state.forced_route = route.bool()


class OracleRouter(torch.nn.Module):
    """The oracle router as a model: each call routes ``ids`` by their own true costs
    (``oracle_routes``) through a ``forced_routes`` copy of ``gm`` (``forced``, made when not given).
    With ``skip``, each layer skips exactly that fraction of each sequence's tokens past the window,
    its cheapest, instead of comparing with the calibrated thresholds (which skip more or less on text
    unlike the calibration text). ``scored_until``: see ``oracle_routes`` (set it before a call whose
    last tokens are an answer the oracle must not see). ``routes`` holds the route masks per layer of
    the last call ((B, T) bool), ``fractions`` their routed fractions."""

    def __init__(self, gm: fx.GraphModule, forced: fx.GraphModule | None = None, skip: float | None = None,
                 scored_until: int | None = None):
        super().__init__()
        if skip is not None and not 0.0 < skip < 1.0:
            msg = f"the oracle router's skip must be in (0, 1); got {skip}."
            raise ValueError(msg)
        self.gm, self.forced, self.skip = gm, forced_routes(gm) if forced is None else forced, skip
        self.scored_until = scored_until
        self.routes: list[torch.Tensor] = []
        self.fractions: list[float] = []

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        self.routes = routes = oracle_routes(self.gm, ids, self.skip, self.scored_until)
        set_forced_routes(self.forced, routes)
        self.fractions = [float(r.double().mean()) for r in routes]
        return self.forced(ids)


def _recall_weights_of(layers: list[RoutedLayer]) -> list[float]:
    return [float(getattr(r.state, "recall_weight", 0.0)) for r in layers]


def oracle_costs(gm: fx.GraphModule, labels: OracleLabels) -> list[torch.Tensor]:
    """Per select layer of ``gm``, (N,) float64: what its oracle router ranks the tokens of ``labels``
    by: the cost, plus the recall cost at the weight ``calibrate_select(recall=...)`` set."""
    weights = _recall_weights_of(select_layers(gm))
    if any(weights) and labels.recall is None:
        msg = "the oracle of this graph ranks by the recall cost too: label with oracle_labels(..., recall=True)."
        raise ValueError(msg)
    return _with_recall(labels, weights)


def oracle_routes(gm: fx.GraphModule, ids: torch.Tensor, skip: float | None = None,
                  scored_until: int | None = None) -> list[torch.Tensor]:
    """The oracle router's decisions on ``ids`` (B, T): route where the true log cost (the all-routed
    model's, open loop; with the recall cost at the weights ``calibrate_select(recall=...)`` set) >=
    the layer's ``oracle_threshold`` set by ``calibrate_select``; with ``skip``, route all but the
    ``skip`` cheapest fraction of each row's tokens past the window (those before it route: their
    window is their whole history). ``scored_until``: the recall cost, when the labels hold it, scores
    only the predictions of the tokens before that position (``oracle_labels``)."""
    layers = select_layers(gm)
    labels = oracle_labels(gm, [ids], recall=any(_recall_weights_of(layers)), scored_until=scored_until)
    t = ids.shape[-1]
    window = int(layers[0].state.window)
    routes = []
    for r, cost in zip(layers, oracle_costs(gm, labels), strict=True):
        y = torch.log(cost.double() + _EPS).reshape(-1, t)
        if skip is None:
            routes.append(y >= float(r.state.oracle_threshold))
            continue
        route = torch.ones_like(y, dtype=torch.bool)
        past = y[:, window:]
        cheapest = past.argsort(dim=-1)[:, : round(skip * past.shape[-1])]
        route[:, window:] = torch.ones_like(past, dtype=torch.bool).scatter(-1, cheapest, False)
        routes.append(route)
    return routes
