"""The options of ``skip-ffn``: ``SkipPolicy`` and ``SkipFFNConfig`` (re-exported by
``passes/skip_ffn.py``). They sit in their own module so that the policy strategies
(``skip_ffn_similarity``, ``skip_ffn_forecast``) can name them without importing the pass."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from types import MappingProxyType

from condfx.options import BIG_INT, Float, Int, OneOf, check_options


class SkipPolicy(Enum):
    """How the execute mask is decided: FFN-SkipLLM similarity, or Informed Routing's router + forecast."""

    SIMILARITY = "similarity"
    FORECAST = "forecast"


class SkipTeacher(Enum):
    """What teaches the forecast policy's routers when the life cycle calibrates it (``condfx.lifecycle``):
    the paper's LM-loss training, or fits to the oracle's per-token skip costs (``condfx.forecast.teach_routers``)."""

    LM = "lm"
    ORACLE = "oracle"


MAX_RANK = 65536
"""Largest ``rank`` and ``router_hidden`` accepted at construction; when the pass runs, ``rank`` must
also be at most the model width and the new tensors must fit in memory (``check_allocation``)."""

_SKIP_FFN_BOUNDS = MappingProxyType({
    "policy": OneOf(SkipPolicy), "threshold": Float(0.0, 1.0, low_open=True), "span": Int(1, BIG_INT),
    "cold_start": Int(0, BIG_INT), "cold_end": Int(0, BIG_INT), "warmup": Int(0, BIG_INT),
    "rank": Int(1, MAX_RANK), "router_hidden": Int(1, MAX_RANK), "teacher": OneOf(SkipTeacher),
})


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
        teacher: forecast policy: what trains the routers under ``--calib`` ("lm": LM loss and
            Gumbel gates; "oracle": fits to the oracle's skip costs, per-layer cuts from its budget).
            The rewrite itself does not read it.
        state: forecast policy only (refused with ``similarity``): safetensors file of trained routers and forecasters
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
    teacher: SkipTeacher = SkipTeacher.LM
    state: str | None = None

    def __post_init__(self):
        check_options(self, _SKIP_FFN_BOUNDS)
        if self.state is not None and not isinstance(self.state, str):
            msg = f"SkipFFNConfig.state must be a safetensors file path or None; got {self.state!r}."
            raise ValueError(msg)
        self._refuse_other_policy_options()
        if self.state is not None and self.policy is not SkipPolicy.FORECAST:
            msg = (
                f"SkipFFNConfig.state is read by policy=forecast only (trained routers); got "
                f"policy={self.policy.value} with state={self.state!r}: drop state, or use policy=forecast."
            )
            raise ValueError(msg)

    def _refuse_other_policy_options(self) -> None:
        """Refuses an option the chosen policy never reads (it would be ignored without a word).

        Only values other than the default are seen: a dataclass cannot tell a default from the
        same value written out.
        """
        unread = {SkipPolicy.SIMILARITY: ("rank", "router_hidden", "teacher"), SkipPolicy.FORECAST: ("threshold", "span")}
        defaults = SkipFFNConfig.__dataclass_fields__
        for name in unread[self.policy]:
            value = getattr(self, name)
            if value != defaults[name].default:
                shown = value.value if isinstance(value, Enum) else repr(value)
                msg = (f"SkipFFNConfig.{name} is not read by policy={self.policy.value}; got "
                       f"{name}={shown}: drop it, or choose the other policy.")
                raise ValueError(msg)
