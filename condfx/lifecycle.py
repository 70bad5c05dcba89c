"""The pass life cycle's table: what each lossy pass needs and the stages that give it.

One row per pass name (``CALIBRATORS``). The pipeline (``passes.pipeline.apply``) runs the rows'
stages itself when given calibration batches; this module sits above the passes because the
stages are the existing calibrations, which live in the API layer and stay the implementation:

| pass | need | stage | implementation |
|---|---|---|---|
| ``skip-ffn`` (similarity) | calibration | before: threshold, span, cold regions, warm-up | ``calibrate.calibrate_similarity`` |
| ``skip-ffn{policy=forecast}`` | training | after: forecasters, routers, bias shift | ``forecast`` |
| ``skip-ffn{policy=forecast,teacher=oracle}`` | training | after: forecasters, oracle labels, router fit, per-layer cuts | ``forecast.teach_routers`` |
| ``quantize-kv{latent=klt}`` | calibration | before: q/k/v second moments | ``kv_calibrate.record_kv_stats`` |
| ``prune-global`` | calibration | before: routed fraction per L2A layer | ``l2a.record_route_stats`` |
| ``route-attention`` | training | after: routers and attention (L2A recipe) | ``l2a.train_l2a`` |
| ``route-attention{form=select}`` | calibration | after: window corrections, oracle-taught routers, thresholds | ``l2a_retrofit.calibrate_select`` |
| ``interleave-heads`` | training | none here (``eval.tasks`` trains it) | |

``apply`` is ``condfx.apply``: the pipeline with this table. ``save_state`` writes a result's learned
tensors to safetensors with the original model's identity; ``load_state`` refuses a file made for
another model and re-applies the pipeline it records with those tensors, without calibration text.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import Any

import torch
from torch import fx

from condfx.model_io import check_identity, read_state_file
from condfx.passes.base import Budget, Calibrator, Need, Pass, Progress
from condfx.passes.model_identity import model_identity
from condfx.passes.pipeline import PipelineResult
from condfx.passes.pipeline import apply as _pipeline_apply

__all__ = ["CALIBRATORS", "apply", "load_state", "save_state"]

_FORMAT = "condfx-life-cycle-1"


def _stream(batches: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.cat([b.reshape(-1) for b in batches])[None]


def _rows(batches: Sequence[torch.Tensor]) -> torch.Tensor:
    """The batches as one (B, T) tensor (all have the budget's length)."""
    return torch.cat(list(batches), dim=0)


# ------------------------------------------------------------------------------------- skip-ffn
def _skip_need(cfg) -> Need:
    return Need.TRAINING if cfg.policy.value == "forecast" else Need.CALIBRATION


def _skip_before(gm: fx.GraphModule, p: Pass, batches, budget: Budget, progress: Progress):
    from condfx.calibrate import calibrate_similarity

    if p.config.policy.value == "forecast":
        return p, {}, ""
    progress("skip-ffn: similarity", 0, 1)
    cal = calibrate_similarity(gm, _rows(batches), target_skip=budget.skip_target)
    progress("skip-ffn: similarity", 1, 1)
    cfg = dataclasses.replace(p.config, threshold=cal.threshold, span=cal.span, cold_start=cal.cold_start,
                              cold_end=cal.cold_end, warmup=cal.warmup)
    note = (f"threshold {cal.threshold:.4f}, span {cal.span}, cold {cal.cold_start}+{cal.cold_end}, warm-up "
            f"{cal.warmup} for target skip {budget.skip_target:.2f}; measured {cal.measured_skip:.3f} on "
            "the calibration text")
    return type(p)(cfg), {"skip_ffn.profile": torch.tensor(cal.profile)}, note


def _skip_after(gm: fx.GraphModule, p: Pass, batches, budget: Budget, progress: Progress):
    from condfx.forecast import (
        fit_forecasters,
        forecast_param_names,
        set_skip_fraction,
        train_routers,
    )

    if p.config.policy.value != "forecast":
        return {}, ""
    if p.config.teacher.value == "oracle":
        return _skip_oracle(gm, batches, budget, progress)
    ids = _stream(batches)
    progress("skip-ffn: forecasters", 0, budget.steps)
    fit_forecasters(gm, ids)
    seq = min(128, ids.shape[1] // 2)
    train_routers(gm, ids, target_skip=budget.skip_target, steps=budget.steps, seq_len=seq)
    measured = set_skip_fraction(gm, _rows(batches), budget.skip_target)
    progress("skip-ffn: forecasters", budget.steps, budget.steps)
    params = dict(gm.named_parameters())
    state = {n: params[n] for n in forecast_param_names(gm)}
    return state, f"routers trained {budget.steps} steps; measured skip {measured:.3f} on the calibration text"


def _skip_oracle(gm: fx.GraphModule, batches, budget: Budget, progress: Progress):
    """``skip-ffn{policy=forecast,teacher=oracle}``: routers fitted to the oracle's skip costs."""
    from condfx.forecast import forecast_param_names, teach_routers

    out = teach_routers(gm, _rows(batches), budget.skip_target, progress=progress)
    params = dict(gm.named_parameters())
    state = {n: params[n] for n in forecast_param_names(gm)}
    rho = sum(out["spearman"].values()) / max(len(out["spearman"]), 1)
    return state, (f"routers fitted to the oracle (held-out rank correlation {rho:.2f}); measured skip "
                   f"{out['measured']:.3f} on the calibration text")


def _skip_tokens(cfg, budget: Budget) -> int:
    if cfg.policy.value != "forecast":
        return 16
    if cfg.teacher.value == "oracle":
        from condfx.forecast import ORACLE_MIN_TOKENS

        return max(ORACLE_MIN_TOKENS, 2 * cfg.rank)
    return 2 * budget.seq_len


# ---------------------------------------------------------------------------------- quantize-kv
def _kv_need(cfg) -> Need:
    return Need.CALIBRATION if getattr(cfg.latent, "value", None) == "klt" else Need.NONE


def _kv_before(gm: fx.GraphModule, p: Pass, batches, budget: Budget, progress: Progress):
    from condfx.kv_calibrate import META_KEY, record_kv_stats

    progress("quantize-kv: KV statistics", 0, len(batches))
    tokens = record_kv_stats(gm, batches)
    progress("quantize-kv: KV statistics", len(batches), len(batches))
    state = {}
    for layer, s in gm.meta[META_KEY].items():
        state.update({f"kv_stats.{layer}.k": s.k, f"kv_stats.{layer}.v": s.v, f"kv_stats.{layer}.q": s.q})
    n = next(iter(tokens.values()), 0)
    return p, state, f"q/k/v second moments of {len(tokens)} layers over {n} tokens"


# ------------------------------------------------------------------------------- prune-global
def _prune_before(gm: fx.GraphModule, p: Pass, batches, budget: Budget, progress: Progress):
    from condfx.l2a import record_route_stats
    from condfx.patterns.routed import find_routed_layers

    progress("prune-global: route statistics", 0, len(batches))
    fractions = record_route_stats(gm, batches)
    progress("prune-global: route statistics", len(batches), len(batches))
    state = {f"{x.prefix}.l2a.route_stats": x.state.route_stats for x in find_routed_layers(gm)}
    shown = ", ".join(f"{k}: {v:.3f}" for k, v in sorted(fractions.items()))
    return p, state, f"routed fraction per L2A layer ({shown})"


# ------------------------------------------------------------------------------ route-attention
def _is_select(cfg) -> bool:
    return getattr(cfg.form, "value", cfg.form) == "select"


def _route_tokens(cfg, budget: Budget) -> int:
    if _is_select(cfg):
        return cfg.window + 1
    return max(budget.seq_len, cfg.window + 2) * 2


def _select_after(gm: fx.GraphModule, p: Pass, batches, budget: Budget, progress: Progress):
    """The window corrections and the oracle labels on the calibration text in rows of the model's
    context (``context``, else at least 4 windows), then the routers' fit and thresholds
    (``l2a_retrofit.fit_corrections``, ``oracle_labels``, with ``copies`` also on ``copy_rows`` to
    teach the heads, ``calibrate_select``)."""
    from condfx.l2a_retrofit import (
        STATE_NAMES,
        calibrate_select,
        check_calibration_rows,
        copy_rows,
        corrected_layers,
        fit_corrections,
        oracle_labels,
        select_layers,
    )

    cfg = p.config
    stream = _stream(batches).reshape(-1)
    length = min(stream.numel(), cfg.context or max(budget.seq_len, 4 * cfg.window))
    rows = [stream[i : i + length][None] for i in range(0, stream.numel() - length + 1, length)]
    check_calibration_rows(rows, cfg.window)
    skip = cfg.skip if cfg.skip is not None else 1.0 - budget.route_target
    first, stage, corrections = "route-attention: window corrections", "route-attention: oracle labels", None
    if corrected_layers(gm):  # correct=0 (the default) has nothing to fit: no stage that never moves
        progress(first, 0, len(rows))
        corrections = fit_corrections(gm, rows, progress=lambda done, total: progress(first, done, total))
    progress(stage, 0, len(rows))
    labels = oracle_labels(gm, rows, lambda done, total: progress(stage, done, total), corrections)
    copies, teach = (copy_rows(rows, cfg.window) if cfg.copies else []), None
    if copies:  # rows repeating their first half: the heads also learn what a token recalling far context is
        again = "route-attention: oracle labels (copy rows)"
        progress(again, 0, len(copies))
        teach = oracle_labels(gm, copies, lambda done, total: progress(again, done, total))
    cal = calibrate_select(gm, rows, skip=skip, floor=cfg.floor, labels=labels, teach=teach)
    named = {**dict(gm.named_parameters()), **dict(gm.named_buffers())}
    state = {f"{r.prefix}.l2a.{n}": named[f"{r.prefix}.l2a.{n}"]
             for r in select_layers(gm) for n in STATE_NAMES if f"{r.prefix}.l2a.{n}" in named}
    return state, cal.summary()


def _route_after(gm: fx.GraphModule, p: Pass, batches, budget: Budget, progress: Progress):
    from condfx.l2a import L2ARecipe, l2a_trainable, route_fractions, train_l2a

    if _is_select(p.config):
        return _select_after(gm, p, batches, budget, progress)
    stream = _stream(batches).reshape(-1)
    seq = min(stream.numel() - 2, max(budget.seq_len, p.config.window + 1))
    if seq <= p.config.window:
        msg = (f"route-attention{{window={p.config.window}}} trains on sequences longer than its window; "
               f"the calibration text gives {stream.numel()} tokens: give at least {p.config.window + 3}.")
        raise ValueError(msg)

    def data(step, generator):
        starts = torch.randint(0, stream.numel() - seq - 1, (2,), generator=generator).tolist()
        win = torch.stack([stream[s : s + seq + 1] for s in starts])
        return win[:, :-1], win[:, 1:]

    recipe = L2ARecipe(steps=budget.steps, warmup=min(30, budget.steps // 10),
                       target_fraction=budget.route_target)
    out = train_l2a(gm, data, recipe, progress=False, seconds=budget.seconds,
                    on_step=lambda done, total: progress("route-attention: L2A training", done, total))
    fr = route_fractions(gm, stream[: seq + 1][None])
    params = dict(gm.named_parameters())
    state = {n: params[n] for n in sorted(l2a_trainable(gm))}
    note = (f"L2A trained {len(out.losses)} steps in {out.seconds:.1f} s (loss {out.losses[-1]:.3f}); "
            f"global fraction per layer {', '.join(f'{f:.2f}' for f in fr)}")
    return state, note


_UNCALIBRATED_SKIP = ("skip-ffn ran without calibration text, so its threshold (the default threshold 0.9 unless "
                      "the spec sets one; policy=forecast: untrained routers) was not chosen for this model "
                      "(give --calib to pick it for a target skip): the skipped fraction and the quality cost "
                      "are whatever it gives.")

CALIBRATORS: Mapping[str, Calibrator] = MappingProxyType({
    "skip-ffn": Calibrator(
        need=_skip_need, before=_skip_before, after=_skip_after,
        without=_UNCALIBRATED_SKIP,
        min_tokens=_skip_tokens,
    ),
    "quantize-kv": Calibrator(
        need=_kv_need, before=_kv_before,
        without=("quantize-kv{latent=klt} has no KV statistics without calibration text, so the "
                 "pass cannot choose its bases."),
        min_tokens=lambda cfg, budget: budget.seq_len,
    ),
    "prune-global": Calibrator(
        need=lambda cfg: Need.CALIBRATION, before=_prune_before,
        without=("prune-global read the routing statistics already in the graph (none were recorded "
                 "here without calibration text), so which layers lose their global branch was not "
                 "measured on this text."),
        min_tokens=lambda cfg, budget: budget.seq_len,
    ),
    "route-attention": Calibrator(
        need=lambda cfg: Need.CALIBRATION if _is_select(cfg) else Need.TRAINING, after=_route_after,
        without=("route-attention ran with untrained routers (every query routed to global attention), "
                 "so it saves no compute (form=add: and its quality is the untrained one's): give --calib "
                 "to train (form=add) or calibrate (form=select) the routers."),
        min_tokens=_route_tokens,
    ),
    "interleave-heads": Calibrator(
        need=lambda cfg: Need.TRAINING,
        without=("interleave-heads starts from mixes that reproduce the original heads; condfx.eval.tasks "
                 "trains them, which this pipeline does not run."),
    ),
})
"""Pass name -> its life-cycle row. A pass not listed needs nothing."""


def needs(p: Pass) -> Need:
    """What ``p`` (configured) needs to be faithful."""
    row = CALIBRATORS.get(p.name)
    return row.need(p.config) if row is not None else type(p).needs


def min_calibration_tokens(passes: Sequence[Pass], budget: Budget) -> tuple[int, str | None]:
    """(calibration tokens the pipeline needs, the pass that needs the most; None when none do)."""
    best, who = 0, None
    for p in passes:
        row = CALIBRATORS.get(p.name)
        if row is None or row.need(p.config) is Need.NONE or (row.before is None and row.after is None):
            continue
        n = row.min_tokens(p.config, budget)
        if n > best:
            best, who = n, p.name
    return best, who


def apply(gm: fx.GraphModule, spec: Any, *, calib: Sequence[torch.Tensor] | None = None,
          budget: Budget | None = None, progress: Progress | None = None, **options: Any) -> PipelineResult:
    """``passes.pipeline.apply`` with the life-cycle table: passes that need calibration or training
    get it from ``calib`` (token batches, ``passes.base.calibration_batches``) under ``budget``.

    Raises:
        ValueError: ``calib`` has fewer tokens than a pass needs (the message names it and the count).
        PassError, TypeError: as ``passes.pipeline.apply``.
    """
    if calib is not None:
        from condfx.passes.spec import build_passes

        budget = budget or Budget()
        need, who = min_calibration_tokens(build_passes(spec, options.get("registry")), budget)
        have = sum(int(b.numel()) for b in calib)
        if have < need:
            msg = f"the calibration text gives {have} tokens; {who} needs at least {need}."
            raise ValueError(msg)
    return _pipeline_apply(gm, spec, calib=calib, budget=budget, calibrators=CALIBRATORS,
                           progress=progress, **options)


def save_state(result: PipelineResult, original: fx.GraphModule, path: str | os.PathLike) -> list[str]:
    """Writes ``result``'s learned tensors, the spec as it ran and ``original``'s identity (safetensors).

    Returns:
        The tensor names written (an empty file records a pipeline that learned nothing).
    """
    from safetensors.torch import save_file

    state = {k: v.detach().cpu().contiguous() for k, v in result.state.items()}
    meta = {"identity": json.dumps(model_identity(original)), "tensors": json.dumps(sorted(state)),
            "spec": result.spec, "format": _FORMAT}
    save_file(state, str(path), metadata=meta)
    return sorted(state)


def _put(gm: fx.GraphModule, name: str, value: torch.Tensor) -> None:
    """Copies ``value`` into ``gm``'s parameter or buffer ``name`` (or its KV statistics)."""
    if name.startswith("kv_stats."):
        from condfx.kv_calibrate import META_KEY, LayerKVStats, projection_sha256
        from condfx.patterns import find_regions

        _, layer, which = name.split(".")
        stats = gm.meta.setdefault(META_KEY, {})
        region = next(r for r in find_regions(gm).attention if r.layer == int(layer))
        old = stats.get(int(layer)) or LayerKVStats(value, value, value, 0, projection_sha256(gm, region))
        stats[int(layer)] = dataclasses.replace(old, **{which: value})
        return
    if name == "skip_ffn.profile":
        return  # a record of what calibration saw; the calibrated config is in the spec
    target = dict(gm.named_parameters()).get(name)
    if target is None:
        target = dict(gm.named_buffers()).get(name)
    if target is None or target.shape != value.shape:
        msg = f"the state tensor {name!r} has no place of its shape in the rewritten graph."
        raise ValueError(msg)
    with torch.no_grad():
        target.copy_(value)


def load_state(path: str | os.PathLike, gm: fx.GraphModule, **options: Any) -> PipelineResult:
    """Re-applies the pipeline recorded in a ``save_state`` file to ``gm`` with its learned tensors.

    Raises:
        ValueError: one sentence: the file is unreadable, altered, or made for another model.
    """
    what = "life-cycle state file"
    tensors, meta = read_state_file(path, what)
    if meta.get("format") != _FORMAT or "spec" not in meta:
        msg = f"{what} {str(path)!r} was not written by condfx.lifecycle.save_state."
        raise ValueError(msg)
    check_identity(meta.get("identity"), model_identity(gm), f"{what} {str(path)!r}", "recalibrate")
    staged: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        index, stage, name = key.split(".", 2)
        staged.setdefault((int(index), stage), {})[name] = value
    rows = {}
    for name, row in CALIBRATORS.items():
        rows[name] = dataclasses.replace(row, before=_replay("before", staged), after=_replay("after", staged))
    spec = str(meta["spec"])
    counter = iter(range(1 << 30))
    return _pipeline_apply(gm, spec, calib=[torch.zeros(1, 1, dtype=torch.long)],
                           calibrators=_Indexed(rows, counter), **options)


class _Indexed(Mapping):
    """The replay table: rows whose stages learn their pass's position from the order of lookups."""

    def __init__(self, rows: Mapping[str, Calibrator], counter):
        self.rows, self.counter = rows, counter

    def __getitem__(self, name: str) -> Calibrator:
        return self.rows[name]

    def get(self, name, default=None):
        index = next(self.counter)  # the pipeline looks each pass up once, in order
        row = self.rows.get(name)
        if row is None:
            return default
        return dataclasses.replace(row, before=_bind(row.before, index), after=_bind(row.after, index))

    def __iter__(self):
        return iter(self.rows)

    def __len__(self) -> int:
        return len(self.rows)


def _bind(stage, index: int):
    if stage is None:
        return None
    return lambda gm, p, batches, budget, progress: stage(gm, p, index)


def _replay(stage: str, staged: dict):
    def run(gm: fx.GraphModule, p: Pass, index: int):
        state = staged.get((index, stage), {})
        for name, value in state.items():
            _put(gm, name, value)
        note = f"loaded {len(state)} tensors" if state else ""
        return (p, state, note) if stage == "before" else (state, note)

    return run
