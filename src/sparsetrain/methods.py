"""Named presets: each method is a configuration of the one sparsification engine.

| preset      | operator | theta                          | rescale | scope  | cubic schedule   |
|-------------|----------|--------------------------------|---------|--------|------------------|
| feather     | p = 3    | 0.5 if s_f > 0.95 else 1.0     | no      | global | 0 -> 1/2         |
| st3         | p = 1    | 1.0                            | yes     | global | 5/160 -> 80/160  |
| st3-sigma   | p = 1    | 1.0                            | yes     | sigma  | 5/160 -> 80/160  |
| gmp         | p = inf  | 0.0                            | no      | global | 0 -> 1/2         |
| ste         | p = inf  | 1.0                            | no      | global | 0 -> 1/2         |

Feather: Glentis Georgoulakis et al., BMVC 2023. ST-3 and ST-3 sigma: Vanderschueren &
De Vleeschouwer, WACV 2023. GMP: Zhu & Gupta, 2017. ste is Feather's p = inf ablation.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, fields

from .operators import validate_p
from .schedules import SCHEDULES
from .selection import validate_scope


@dataclass(frozen=True)
class MethodConfig:
    """Every knob of the engine. ``start``/``end``: int steps or float fractions of training."""

    p: float
    theta: float
    scope: str = "global"
    rescale: bool = False
    schedule: str = "cubic"
    start: int | float = 0
    end: int | float = 0.5

    def __post_init__(self) -> None:
        object.__setattr__(self, "p", validate_p(self.p))
        if not 0.0 <= self.theta <= 1.0:
            raise ValueError(f"theta={self.theta!r} is out of range; allowed: a number in [0, 1].")
        validate_scope(self.scope)
        if self.schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {self.schedule!r}; known schedules: {', '.join(sorted(SCHEDULES))}.")


KNOBS = tuple(f.name for f in fields(MethodConfig))

_METHODS: dict[str, Callable[[float], MethodConfig]] = {}


def register_method(name: str) -> Callable[[Callable[[float], MethodConfig]], Callable[[float], MethodConfig]]:
    """Register a preset: a function from the final sparsity to a :class:`MethodConfig`."""

    def add(preset: Callable[[float], MethodConfig]) -> Callable[[float], MethodConfig]:
        if name in _METHODS:
            raise ValueError(f"method {name!r} is already registered.")
        _METHODS[name] = preset
        return preset

    return add


def list_methods() -> list[str]:
    """Names of the registered presets, sorted."""
    return sorted(_METHODS)


def method_config(name: str, sparsity: float) -> MethodConfig:
    """The configuration of preset ``name`` for final sparsity ``sparsity``."""
    if name not in _METHODS:
        raise ValueError(f"unknown method {name!r}; known methods: {', '.join(list_methods())}.")
    return _METHODS[name](sparsity)


@register_method("feather")
def feather(sparsity: float) -> MethodConfig:
    return MethodConfig(p=3.0, theta=0.5 if sparsity > 0.95 else 1.0)


@register_method("st3")
def st3(sparsity: float) -> MethodConfig:
    return MethodConfig(p=1.0, theta=1.0, rescale=True, start=5 / 160, end=80 / 160)


@register_method("st3-sigma")
def st3_sigma(sparsity: float) -> MethodConfig:
    return MethodConfig(p=1.0, theta=1.0, rescale=True, scope="sigma", start=5 / 160, end=80 / 160)


@register_method("gmp")
def gmp(sparsity: float) -> MethodConfig:
    return MethodConfig(p=math.inf, theta=0.0)


@register_method("ste")
def ste(sparsity: float) -> MethodConfig:
    return MethodConfig(p=math.inf, theta=1.0)
