"""The options of ``skip-ffn``: ``SkipPolicy`` and ``SkipFFNConfig`` (re-exported by
``passes/skip_ffn.py``). They sit in their own module so that the policy strategies
(``skip_ffn_similarity``, ``skip_ffn_forecast``) can name them without importing the pass."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


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
