"""Bounds on user options: the one validator of every config dataclass, and a memory guard.

A config lists its bounds in one table, ``{field name: bound}``, and checks them in
``__post_init__`` with ``check_options(self, BOUNDS)``. A bound refuses what it does not allow with
one sentence naming the option, the value and what is allowed, and returns the normalised value
(an int given for a float field becomes a float, a string an Enum member)::

    _BOUNDS = MappingProxyType({"P": Int(1, 64), "init_noise": Float(0.0, 10.0), "seed": SEED})

    def __post_init__(self):
        check_options(self, _BOUNDS)

Every float bound refuses NaN and infinities; every int bound has an upper limit, so no option can
ask for an unbounded amount of anything. Options that size new tensors (pseudo-heads, forecaster
ranks) are checked again when the model's dimensions are known, with ``check_allocation``: the
bytes they would allocate against the memory available.

It sits in the lowest layer so that pass configs, the runtime's ``SamplingConfig`` and the API
layer's recipes share it.
"""

from __future__ import annotations

import enum
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

__all__ = [
    "BIG_INT", "SEED", "Bool", "Float", "Int", "OneOf", "Optional", "available_memory_bytes",
    "check_allocation", "check_options",
]

BIG_INT = 2**31 - 1
"""Upper limit of counts of tokens, layers and steps: far above any real model, far below overflow."""


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _refuse(name: str, allowed: str, value: Any) -> ValueError:
    return ValueError(f"{name} must be {allowed}; got {value!r}.")


@dataclass(frozen=True)
class Int:
    """An int in [low, high]; a refusal names the bound the value broke (``an int >= 1`` for 0)."""

    low: int = 0
    high: int = BIG_INT

    def check(self, name: str, value: Any) -> int:
        """Returns ``value``, or raises ValueError naming ``name``."""
        if _is_int(value) and self.low <= value <= self.high:
            return value
        if _is_int(value) and value > self.high:
            raise _refuse(name, f"an int in [{self.low}, {self.high}]", value)
        raise _refuse(name, f"an int >= {self.low}", value)  # below the range, or not an int


SEED = Int(0, 2**63 - 1)
"""A generator seed: what ``torch.Generator.manual_seed`` takes without overflowing."""


@dataclass(frozen=True)
class Float:
    """A finite float between ``low`` and ``high``, each end included unless marked open.

    A refusal names the bound the value broke: a finite value below the range gets ``a number >= 0``
    (``> 0`` for an open end), anything else (above, NaN, infinite, not a number) the whole range
    ``a number in [0, 1000]``; ``full_range`` names the whole range always. ``noun`` starts the
    text ("a number"; "" gives "in (0, 1]").
    """

    low: float
    high: float
    low_open: bool = False
    high_open: bool = False
    noun: str = "a number"
    full_range: bool = False

    def describe(self, value: Any = None) -> str:
        """What is allowed, phrased for ``value`` (see the class docstring)."""
        finite = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        if finite and not self.full_range and (value <= self.low if self.low_open else value < self.low):
            return f"{self.noun} {'>' if self.low_open else '>='} {self.low:g}".lstrip()
        left, right = "(" if self.low_open else "[", ")" if self.high_open else "]"
        return f"{self.noun} in {left}{self.low:g}, {self.high:g}{right}".lstrip()

    def check(self, name: str, value: Any) -> float:
        """Returns ``value`` as a float, or raises ValueError naming ``name``."""
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        if ok:
            above = value > self.low if self.low_open else value >= self.low
            below = value < self.high if self.high_open else value <= self.high
            ok = above and below
        if not ok:
            raise _refuse(name, self.describe(value), value)
        return float(value)


@dataclass(frozen=True)
class Bool:
    """True or False (not 0/1: a number where a switch belongs is usually a mistake)."""

    def check(self, name: str, value: Any) -> bool:
        """Returns ``value``, or raises ValueError naming ``name``."""
        if not isinstance(value, bool):
            raise _refuse(name, "a bool", value)
        return value


@dataclass(frozen=True)
class OneOf:
    """A member of an Enum, given as the member or its value."""

    cls: type[enum.Enum]

    def check(self, name: str, value: Any) -> enum.Enum:
        """Returns the member, or raises ValueError naming ``name`` and the allowed values."""
        if isinstance(value, self.cls):
            return value
        try:
            return self.cls(value)
        except ValueError:
            allowed = "one of {" + ", ".join(str(m.value) for m in self.cls) + "}"
            raise _refuse(name, allowed, value) from None


@dataclass(frozen=True)
class Optional:
    """None, or what ``inner`` allows."""

    inner: Int | Float | Bool | OneOf

    def check(self, name: str, value: Any) -> Any:
        """Returns None or the inner bound's value."""
        if value is None:
            return None
        try:
            return self.inner.check(name, value)
        except ValueError as exc:
            msg = str(exc).replace(" must be ", " must be None or ", 1)
            raise ValueError(msg) from None


def check_options(config: Any, bounds: Mapping[str, Any], owner: str | None = None) -> None:
    """Checks every field of ``config`` named in ``bounds`` and stores its normalised value.

    Args:
        config: a (frozen) dataclass instance, from its ``__post_init__``.
        bounds: field name -> bound (``Int``, ``Float``, ``Bool``, ``OneOf``, ``Optional``).
        owner: how a field is named in messages, before the field name; default
            ``"<ClassName>."`` (e.g. ``"InterleaveHeadsConfig.P"``).

    Raises:
        ValueError: one sentence naming the first field out of bounds, its value and what is allowed.
    """
    prefix = f"{type(config).__name__}." if owner is None else owner
    for field, bound in bounds.items():
        value = bound.check(f"{prefix}{field}", getattr(config, field))
        object.__setattr__(config, field, value)


def available_memory_bytes() -> int | None:
    """The memory the OS can give this process now (``MemAvailable``), or None when unknown."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def check_allocation(what: str, nbytes: int, limit: int | None = None) -> None:
    """Refuses an option whose new tensors would not fit in memory.

    Args:
        what: the option and its value, e.g. ``"skip-ffn rank=100000"``.
        nbytes: the bytes its new tensors would take.
        limit: the bound; default half the available memory (the model itself, its copy in the
            pipeline and the activations need the rest).

    Raises:
        ValueError: one sentence with the estimate and the bound.
    """
    why = "the stated cap"
    if limit is None:
        free = available_memory_bytes()
        if free is None:
            return
        limit, why = free // 2, "half the available memory"
    if nbytes > limit:
        msg = (
            f"{what} would allocate {nbytes / 2**30:.3g} GiB of new tensors, more than the "
            f"{limit / 2**30:.3g} GiB allowed ({why}); choose a smaller value."
        )
        raise ValueError(msg)
