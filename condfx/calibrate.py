"""Calibration of ``skip-ffn`` (FFN-SkipLLM): pick threshold, span, cold regions and warm-up.

``calibrate_similarity`` runs the dense model once on calibration tokens, records cos(h_in, h_out)
per FFN layer and token at each FFN region's residual add, then searches thresholds (quantiles of
the observed cosines) x span 1-3 x cold regions 1-3 at each end x two warm-up lengths (5% and 10%
of the sequence), simulating the policy on the recorded cosines. It keeps the config whose
simulated skipped fraction (of all FFN blocks) is closest to ``target_skip``, preferring the highest
threshold among configs within 0.02 of the target, and finally measures the real fraction by
running the rewritten graph (after skipping, later cosines differ from the dense ones).

The result saves to / loads from JSON together with the model's identity, so a calibration made for
another model is rejected.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn

from condfx.capture import capture
from condfx.ops.masked_ffn import row_cosine
from condfx.passes.model_identity import check_identity, model_identity
from condfx.passes.pipeline import apply
from condfx.passes.skip_ffn import SkipFFNConfig, measure_skip_fraction
from condfx.patterns import find_regions

__all__ = ["SkipCalibration", "calibrate_similarity", "layer_cosines", "model_identity", "simulate_skip"]

_SPANS = (1, 2, 3)
_COLDS = (1, 2, 3)
_N_THRESHOLDS = 48
_CLOSE = 0.02


@dataclass(frozen=True)
class SkipCalibration:
    """A calibrated ``skip-ffn`` configuration and the model it belongs to.

    Attributes:
        threshold, span, cold_start, cold_end, warmup: the ``SkipFFNConfig`` fields.
        target_skip: the requested fraction of FFN blocks to skip.
        simulated_skip: fraction predicted from the dense cosines.
        measured_skip: fraction measured on the rewritten graph over the calibration tokens.
        profile: mean cos(h_in, h_out) per FFN layer on the calibration tokens.
        identity: n_layers, dim and the SHA256 of the model's weights (``model_identity``).
        profile_p50, profile_p90: median and 90th percentile of cos(h_in, h_out) per FFN layer
            (empty in files written before they existed).
    """

    threshold: float
    span: int
    cold_start: int
    cold_end: int
    warmup: int
    target_skip: float
    simulated_skip: float
    measured_skip: float
    profile: tuple[float, ...]
    identity: dict[str, Any]
    profile_p50: tuple[float, ...] = ()
    profile_p90: tuple[float, ...] = ()

    def is_cold(self, layer: int) -> bool:
        """True when FFN layer ``layer`` is in a cold region (never skipped)."""
        return layer < self.cold_start or layer >= len(self.profile) - self.cold_end

    def config(self) -> SkipFFNConfig:
        """The ``SkipFFNConfig`` of this calibration."""
        return SkipFFNConfig(threshold=self.threshold, span=self.span, cold_start=self.cold_start,
                             cold_end=self.cold_end, warmup=self.warmup)

    def spec(self) -> str:
        """The pipeline spec text, e.g. ``skip-ffn{threshold=0.93,span=2,...}``."""
        return (f"skip-ffn{{threshold={self.threshold!r},span={self.span},cold_start={self.cold_start},"
                f"cold_end={self.cold_end},warmup={self.warmup}}}")

    def save(self, path: str | os.PathLike) -> None:
        """Writes the calibration as JSON."""
        data = dataclasses.asdict(self)
        for key in ("profile", "profile_p50", "profile_p90"):
            data[key] = list(getattr(self, key))
        with open(path, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2)

    @classmethod
    def load(cls, path: str | os.PathLike, model_or_gm: nn.Module | None = None) -> SkipCalibration:
        """Reads a calibration; with ``model_or_gm`` checks that it was made for that model.

        Raises:
            ValueError: the file is for a different model (or is not a calibration file).
        """
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
            lists = {k: tuple(data[k]) for k in ("profile", "profile_p50", "profile_p90") if k in data}
            cal = cls(**{**data, **lists})
            cal.config()  # the options' own bounds (a NaN threshold is refused here)
        except (OSError, TypeError, KeyError, ValueError) as exc:
            msg = f"{path} is not a readable skip-ffn calibration file ({(str(exc) or type(exc).__name__).splitlines()[0]})."
            raise ValueError(msg) from None
        if model_or_gm is not None:
            mine = model_identity(_as_graph(model_or_gm))
            check_identity(cal.identity, mine, f"Calibration file {str(path)!r}", "recalibrate")
        return cal


def _as_graph(model_or_gm: nn.Module, ids: torch.Tensor | None = None) -> fx.GraphModule:
    if isinstance(model_or_gm, fx.GraphModule):
        return model_or_gm
    ids = torch.zeros(2, 8, dtype=torch.long) if ids is None else ids
    return capture(model_or_gm, (ids,))


def layer_cosines(gm: fx.GraphModule, ids: torch.Tensor) -> torch.Tensor:
    """cos(h_in, h_out) at every FFN region's residual add: (L, B, T) float32."""
    regions = find_regions(gm)
    adds = {r.node: r.stream for r in regions.residuals}
    wanted = [r.residual for r in regions.ffn if r.residual in adds]
    if not wanted or len(wanted) != len(regions.ffn):
        msg = "calibrate_similarity needs every FFN region to end in a residual add; some do not."
        raise ValueError(msg)
    found: dict[fx.Node, torch.Tensor] = {}

    class _Recorder(fx.Interpreter):
        def run_node(self, node):
            out = super().run_node(node)
            if node in wanted:
                found[node] = row_cosine(self.env[adds[node]], out)
            return out

    with torch.no_grad():
        _Recorder(gm).run(ids)
    return torch.stack([found[n] for n in wanted])


def simulate_skip(cos: torch.Tensor, thresholds: torch.Tensor, span: int, cold_start: int,
                  cold_end: int, warmup: int) -> torch.Tensor:
    """Fraction of all FFN blocks the policy skips on fixed cosines ``cos`` (L, B, T), per threshold."""
    n_layers, b, t = cos.shape
    k = thresholds.numel()
    warm = (torch.arange(t) < warmup).expand(k, b, t)
    countdown = torch.zeros(k, b, t, dtype=torch.long)
    skipped = torch.zeros(k, dtype=torch.long)
    for layer in range(cold_start, n_layers - cold_end):
        execute = (countdown == 0) | warm
        skipped += (~execute).sum(dim=(1, 2))
        trigger = execute & ~warm & (cos[layer][None] >= thresholds[:, None, None])
        countdown = torch.where(trigger, span, (countdown - 1).clamp_min(0))
    return skipped.double() / (n_layers * b * t)


def _search(cos: torch.Tensor, target: float) -> tuple[tuple, float]:
    """((threshold, span, cold_start, cold_end, warmup), simulated fraction) nearest the target."""
    n_layers, _, t = cos.shape
    q = torch.linspace(0.0, 1.0, _N_THRESHOLDS, dtype=torch.float64)
    thresholds = torch.quantile(cos.double().flatten(), q).float().clamp(1e-6, 1.0).unique()
    best, best_key = None, None
    for warmup in sorted({max(1, round(0.05 * t)), max(1, round(0.1 * t))}):
        for cs in _COLDS:
            for ce in _COLDS:
                if cs + ce >= n_layers:
                    continue
                for span in _SPANS:
                    fracs = simulate_skip(cos, thresholds, span, cs, ce, warmup)
                    for thr, frac in zip(thresholds.tolist(), fracs.tolist(), strict=True):
                        err = abs(frac - target)
                        # within _CLOSE of the target: prefer the highest threshold (most saturated)
                        key = (0, -thr, err) if err <= _CLOSE else (1, err, -thr)
                        if best_key is None or key < best_key:
                            best_key, best = key, ((thr, span, cs, ce, warmup), frac)
    if best is None:
        msg = f"calibrate_similarity needs at least 3 FFN layers (cold regions of 1 each); got {n_layers}."
        raise ValueError(msg)
    return best


def calibrate_similarity(model_or_gm: nn.Module, token_ids: torch.Tensor, *, target_skip: float,
                         cosines: torch.Tensor | None = None) -> SkipCalibration:
    """Chooses a ``skip-ffn`` config that skips about ``target_skip`` of all FFN blocks.

    Args:
        model_or_gm: a causal LM (captured here) or a GraphModule from ``condfx.capture``.
        token_ids: (B, T) or (T,) int64 calibration tokens.
        target_skip: fraction of FFN blocks (all layers, all tokens) to skip, in (0, 1).
        cosines: ``layer_cosines(gm, token_ids)`` when already computed (saves one forward when
            calibrating several targets on the same tokens).

    Returns:
        The SkipCalibration (config, simulated and measured fractions, profile, model identity).

    Raises:
        ValueError: bad ``target_skip`` or tokens, or a model with fewer than 3 FFN layers.
    """
    if isinstance(target_skip, bool) or not isinstance(target_skip, (int, float)) or not 0 < target_skip < 1:
        msg = f"calibrate_similarity target_skip must be a number in (0, 1); got {target_skip!r}."
        raise ValueError(msg)
    if not isinstance(token_ids, torch.Tensor) or token_ids.dtype != torch.long or token_ids.dim() not in (1, 2):
        msg = "calibrate_similarity token_ids must be an int64 tensor of shape (B, T) or (T,)."
        raise ValueError(msg)
    ids = token_ids if token_ids.dim() == 2 else token_ids[None]
    gm = _as_graph(model_or_gm, ids)
    cos = layer_cosines(gm, ids) if cosines is None else cosines  # (L, B, T)
    (thr, span, cs, ce, warmup), simulated = _search(cos, float(target_skip))
    flat = cos.flatten(1).double()  # (L, B*T)
    p50, p90 = torch.quantile(flat, torch.tensor([0.5, 0.9], dtype=torch.float64), dim=1).tolist()
    cal = SkipCalibration(thr, span, cs, ce, warmup, float(target_skip), simulated, 0.0,
                          tuple(cos.mean(dim=(1, 2)).tolist()), model_identity(gm),
                          tuple(p50), tuple(p90))
    rewritten = apply(gm, cal.spec()).graph_module
    measured = measure_skip_fraction(rewritten, ids)["fraction_of_all_ffn"]
    return dataclasses.replace(cal, measured_skip=measured)
