"""The unstructured presets: named configurations of the :class:`~.engine.Sparsifier`, their options,
and :func:`register_preset` to add one.

| preset      | operator | theta                          | rescale | scope  | cubic schedule   |
|-------------|----------|--------------------------------|---------|--------|------------------|
| feather     | p = 3    | 0.5 if s_f > 0.95 else 1.0     | no      | global | 0 -> 1/2         |
| st3         | p = 1    | 1.0                            | yes     | global | 5/170 -> 80/170, fixed mask from 160/170 |
| st3-sigma   | p = 1    | 1.0                            | yes     | sigma  | 5/170 -> 80/170, fixed mask from 160/170 |
| gmp         | p = inf  | 0.0                            | no      | global | 0 -> 1/2         |
| ste         | p = inf  | 1.0                            | no      | global | 0 -> 1/2         |
| feather-nm  | p = 3    | Feather's rule                 | no      | nm     | 0 -> 1/2         |
| st3-nm      | p = 1    | 1.0                            | yes     | nm     | as st3, fixed mask from 160/170 |
| sr-ste      | p = inf  | 1.0, decay 2e-4                | no      | nm     | N:M from the start |

Feather: Glentis Georgoulakis et al., BMVC 2023. ST-3 and ST-3 sigma: Vanderschueren &
De Vleeschouwer, WACV 2023. GMP: Zhu & Gupta, 2017. ste is Feather's p = inf ablation.
SR-STE: Zhou et al., ICLR 2021 (lambda_w = 2e-4). The N:M presets take ``nm`` ("N:M", (n, m) or an
:class:`~sparsetrain.nm.NMPattern`; 2:4 by default) instead of a sparsity.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from ...declare import Axis, Declared, Flag, option, overriding
from ...nm import NMPattern, as_pattern
from ...prunable import LayerType, validate_types
from ...selection import SCOPES
from ..registry import Context, MethodSpec, register_method
from .config import DEFAULT_SPARSITY, ENGINE_SCOPES, KNOBS, NM_KNOBS, PRESETS, SR_STE_DECAY, MethodConfig, nm_presets
from .engine import Sparsifier


@dataclass(frozen=True)
class _PresetOptions(Declared):
    """Options shared by every preset: a knob of :class:`MethodConfig` overrides the preset's value
    (None: the preset's); the layer filters choose the prunable layers."""

    p: float | None = overriding(MethodConfig, "p")
    theta: float | None = overriding(MethodConfig, "theta")
    rescale: bool | None = overriding(MethodConfig, "rescale")
    schedule: str | None = overriding(MethodConfig, "schedule")
    start: int | float | None = overriding(MethodConfig, "start")
    end: int | float | None = overriding(MethodConfig, "end")
    fix_at: int | float | None = overriding(MethodConfig, "fix_at")
    decay: float | None = overriding(MethodConfig, "decay")
    update_every: int | None = overriding(MethodConfig, "update_every")
    exclude: tuple[str, ...] | None = option(None, "glob patterns of layer names left dense (None: the default "
                                             "exclusions)", kind=tuple, optional=True, allowed="a list of glob patterns")
    min_size: int = option(0, "layers with fewer weights stay dense", kind=int, low=0,
                           flag=Flag("pthres", offset=1, help="leave layers with at most this many weights dense"))
    types: tuple[LayerType, ...] | None = option(None, "the prunable layer classes or class names (None: Linear, "
                                                 "Conv1d/2d/3d, Conv1D)", kind=object, parse=validate_types,
                                                 optional=True, flag=None)

    def knobs(self) -> dict[str, Any]:
        """The knobs that override the preset."""
        return {k: v for k in KNOBS if (v := getattr(self, k, None)) is not None}

    def engine_args(self) -> dict[str, Any]:
        """The keyword arguments of :class:`Sparsifier` beyond the model, method and length."""
        types = {} if self.types is None else {"types": self.types}
        return {"exclude": self.exclude, "min_size": self.min_size, **types, **self.knobs()}

    def pattern(self) -> NMPattern | None:
        """The N:M pattern the method leaves in the weights (None: unstructured)."""
        return None


@dataclass(frozen=True)
class UnstructuredOptions(_PresetOptions):
    """Options of the unstructured presets: the final sparsity, the threshold scope and the shared ones."""

    sparsity: float = option(DEFAULT_SPARSITY, "final sparsity of the prunable weights", low=0.0, high=1.0,
                             high_open=True, flag=Flag(aliases=("ptarget",)),
                             axis=Axis("sparsities", "s", (0.9, 0.95, 0.98, 0.99)))
    scope: str | None = option(None, "where one threshold applies (None: the preset's)", kind=str,
                               choices=ENGINE_SCOPES, optional=True)

    def check(self) -> None:
        if self.scope == "nm":
            raise ValueError(f"scope='nm' is not allowed here; allowed: {', '.join(SCOPES)} "
                             f"(N:M sparsity is the presets {', '.join(nm_presets())}, with nm='N:M').")

    def engine_args(self) -> dict[str, Any]:
        return {"sparsity": self.sparsity, **super().engine_args()}

    def target_sparsity(self) -> float:
        """The final sparsity of the prunable weights."""
        return self.sparsity


@dataclass(frozen=True)
class NMOptions(_PresetOptions):
    """Options of the N:M presets: the pattern ``nm`` and the shared ones."""

    nm: NMPattern | str = option("2:4", "the N:M pattern: N of every M consecutive input weights kept", kind=object,
                                 parse=as_pattern, plain=str, axis=Axis("nm", "nm", ("2:4",)))

    def pattern(self) -> NMPattern:
        return self.nm

    def target_sparsity(self) -> float:
        """The final sparsity of the prunable weights: 1 - N/M."""
        return 1 - self.nm.n / self.nm.m


def register_preset(
    name: str, summary: str, recipe: str = "feather"
) -> Callable[[Callable[[float], MethodConfig]], Callable[[float], MethodConfig]]:
    """Register a preset: a function from the final sparsity to a :class:`MethodConfig`; it
    becomes a method of the registry (``create(model, name, sparsity=...)``, or ``nm="N:M"`` for
    a preset of scope "nm") trained by its paper's ``recipe``."""

    def add(preset: Callable[[float], MethodConfig]) -> Callable[[float], MethodConfig]:
        def build(model: nn.Module, options: _PresetOptions, context: Context) -> Sparsifier:
            return Sparsifier(model, name, total_steps=context.total_steps, **options.engine_args())

        config = preset(DEFAULT_SPARSITY)
        nm = config.nm is not None
        # the preset's knobs, less those its options set otherwise (the N:M presets' nm sets the pattern and scope)
        shown = {k: getattr(config, k) for k in KNOBS if k not in (NM_KNOBS if nm else ("nm",))}
        register_method(MethodSpec(name, NMOptions if nm else UnstructuredOptions, build, summary,
                                   recipe=recipe, shown_defaults=shown))
        PRESETS[name] = preset
        return preset

    return add


@register_preset("feather", "straight-through, p = 3 operator, gradient scaling, one global threshold (BMVC 2023)")
def feather(sparsity: float) -> MethodConfig:
    return MethodConfig(p=3.0, theta=0.5 if sparsity > 0.95 else 1.0)


@register_preset("st3", "straight-through soft thresholding with per-channel rescale (WACV 2023)", recipe="st3")
def st3(sparsity: float) -> MethodConfig:
    return MethodConfig(p=1.0, theta=1.0, rescale=True, start=5 / 170, end=80 / 170, fix_at=160 / 170)


@register_preset("st3-sigma", "ST-3 with the global threshold on sigma-normalised weights (WACV 2023)", recipe="st3")
def st3_sigma(sparsity: float) -> MethodConfig:
    return MethodConfig(p=1.0, theta=1.0, rescale=True, scope="sigma", start=5 / 170, end=80 / 170, fix_at=160 / 170)


@register_preset("gmp", "gradual magnitude pruning: hard threshold, no gradient to pruned weights (Zhu & Gupta 2017)")
def gmp(sparsity: float) -> MethodConfig:
    return MethodConfig(p=math.inf, theta=0.0)


@register_preset("ste", "hard threshold with a plain straight-through estimator (Feather's p = inf ablation)")
def ste(sparsity: float) -> MethodConfig:
    return MethodConfig(p=math.inf, theta=1.0)


@register_preset("feather-nm", "Feather's p = 3 operator and gradient scaling with an N:M threshold per group")
def feather_nm(sparsity: float) -> MethodConfig:
    return dataclasses.replace(feather(sparsity), nm=NMPattern(2, 4))


@register_preset("st3-nm", "ST-3's soft threshold, rescale and fixed-mask phase with an N:M threshold per group",
                 recipe="st3")
def st3_nm(sparsity: float) -> MethodConfig:
    return dataclasses.replace(st3(sparsity), nm=NMPattern(2, 4))


@register_preset("sr-ste", "N:M mask from the start, straight-through with sparse-refined decay (ICLR 2021)")
def sr_ste(sparsity: float) -> MethodConfig:
    return MethodConfig(p=math.inf, theta=1.0, nm=NMPattern(2, 4), schedule="constant", decay=SR_STE_DECAY)
