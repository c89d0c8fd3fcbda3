"""Sparsity schedules: immutable values whose ``sparsity_at(step)`` is a pure function.

Steps count optimizer steps from 0. ``start`` (t1) and ``end`` (t2) are step numbers;
:func:`resolve_step` turns a fraction of training (a float) into one.

    constant: s(t) = s_f
    linear:   s(t) = s_f * clip((t - t1) / (t2 - t1), 0, 1)
    cubic:    s(t) = s_f - s_f * (1 - clip((t - t1) / (t2 - t1), 0, 1))^3   (Zhu & Gupta, 2017)

Before t1 the sparsity is 0, from t2 on it is s_f.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol


class Schedule(Protocol):
    """Anything with a final sparsity and a pure ``sparsity_at(step)``."""

    final: float

    def sparsity_at(self, step: int) -> float: ...


def validate_sparsity(sparsity: float) -> float:
    """Return ``sparsity`` as a float after checking it lies in [0, 1)."""
    if not isinstance(sparsity, (int, float)) or not 0.0 <= float(sparsity) < 1.0:
        raise ValueError(f"sparsity={sparsity!r} is out of range; allowed: a number in [0, 1).")
    return float(sparsity)


def validate_total_steps(total_steps: int) -> int:
    """Return ``total_steps`` after checking it is an int > 0 (the length of training in optimizer steps)."""
    if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps <= 0:
        raise ValueError(f"total_steps={total_steps!r} is not allowed; allowed: an int > 0.")
    return total_steps


def resolve_step(value: int | float, total_steps: int, name: str) -> int:
    """An int is a step number; a float in [0, 1] is a fraction of ``total_steps`` (floored)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name}={value!r} is not a step; allowed: an int step or a float fraction in [0, 1].")
    if isinstance(value, float):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{name}={value!r} is not a fraction of training; allowed: a float in [0, 1].")
        return math.floor(value * total_steps)
    if value < 0:
        raise ValueError(f"{name}={value!r} is negative; allowed: a step number >= 0.")
    return value


@dataclass(frozen=True)
class Constant:
    """s(t) = s_f from the first step."""

    final: float

    def __post_init__(self) -> None:
        validate_sparsity(self.final)

    def sparsity_at(self, step: int) -> float:
        return self.final


@dataclass(frozen=True)
class _Ramp:
    """Shared validation and progress for schedules that ramp from 0 at t1 to s_f at t2."""

    final: float
    start: int
    end: int

    def __post_init__(self) -> None:
        validate_sparsity(self.final)
        if not 0 <= self.start <= self.end:
            raise ValueError(
                f"schedule start={self.start} and end={self.end} are out of order; allowed: 0 <= start <= end."
            )

    def progress(self, step: int) -> float:
        """(t - t1) / (t2 - t1) clipped to [0, 1]; a zero-length ramp jumps at t1."""
        if step < self.start:
            return 0.0
        if step >= self.end:
            return 1.0
        return (step - self.start) / (self.end - self.start)


@dataclass(frozen=True)
class Linear(_Ramp):
    """s(t) rises linearly from 0 at t1 to s_f at t2."""

    def sparsity_at(self, step: int) -> float:
        return self.final * self.progress(step)


@dataclass(frozen=True)
class Cubic(_Ramp):
    """The cubic schedule of Zhu & Gupta (2017): fast pruning early, slow near s_f."""

    def sparsity_at(self, step: int) -> float:
        return self.final - self.final * (1.0 - self.progress(step)) ** 3


SCHEDULES: dict[str, type] = {"constant": Constant, "linear": Linear, "cubic": Cubic}


def make_schedule(kind: str, final: float, start: int = 0, end: int = 0) -> Schedule:
    """Build a schedule by name; ``start`` and ``end`` are step numbers (ignored by constant)."""
    if kind not in SCHEDULES:
        raise ValueError(f"unknown schedule {kind!r}; known schedules: {', '.join(sorted(SCHEDULES))}.")
    if kind == "constant":
        return Constant(final)
    return SCHEDULES[kind](final, start, end)
