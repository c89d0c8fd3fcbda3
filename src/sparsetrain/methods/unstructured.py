"""Unstructured (weight-level) methods: one engine, the :class:`Sparsifier`, and its presets.

Each prunable weight w keeps training densely; the forward pass sees

    w~ = a * P_p(w * n; T) / n

where n = 1 / sigma_l (1 outside the sigma scope), a is the ST-3 per-output-channel rescale
(1 when disabled) and the gradient reaches w straight through, scaled by theta on pruned
weights (see :mod:`sparsetrain.operators`). T is chosen by :func:`sparsetrain.selection.select`
so that exactly round(s(t) * N) weights are pruned; when magnitudes tie at T, a mask of the
tied weights pruned (first in layer order, then flat index) completes the count.

Threshold timing: the forward pass of step t uses the threshold that makes the weights as
they stand before step t exactly s(t) sparse. ``step()``, called right after
``optimizer.step()``, advances t and recomputes T from the updated weights.

Fixed-mask phase (``fix_at``, ST-3's last 10 of 170 epochs): when t reaches ``fix_at`` the
thresholds are recomputed for s(t), the forward weights a * P_p(w; T) are written into the
weights, and from then on each layer computes with w * M, M the frozen mask of the kept
weights: no shift, no rescale, gradient only on the kept weights, thresholds no longer move.

A weight shared by several layers (one Parameter in two modules) is one weight: counted
once, thresholded once, finalized once.

| preset      | operator | theta                          | rescale | scope  | cubic schedule   |
|-------------|----------|--------------------------------|---------|--------|------------------|
| feather     | p = 3    | 0.5 if s_f > 0.95 else 1.0     | no      | global | 0 -> 1/2         |
| st3         | p = 1    | 1.0                            | yes     | global | 5/170 -> 80/170, fixed mask from 160/170 |
| st3-sigma   | p = 1    | 1.0                            | yes     | sigma  | 5/170 -> 80/170, fixed mask from 160/170 |
| gmp         | p = inf  | 0.0                            | no      | global | 0 -> 1/2         |
| ste         | p = inf  | 1.0                            | no      | global | 0 -> 1/2         |

Feather: Glentis Georgoulakis et al., BMVC 2023. ST-3 and ST-3 sigma: Vanderschueren &
De Vleeschouwer, WACV 2023. GMP: Zhu & Gupta, 2017. ste is Feather's p = inf ablation.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.utils import parametrize

from ..operators import sparsify_ste, validate_p
from ..prunable import PRUNABLE_TYPES, default_exclude, find_prunable
from ..schedules import (
    SCHEDULES,
    Schedule,
    make_schedule,
    resolve_step,
    validate_sparsity,
    validate_total_steps,
)
from ..selection import Selection, layer_sigma, select, validate_scope
from .protocol import Method
from .registry import Context, MethodSpec, register_method

RESCALE_EPS = 1e-6


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
    fix_at: int | float | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "p", validate_p(self.p))
        if isinstance(self.theta, bool) or not isinstance(self.theta, (int, float)) or not 0.0 <= self.theta <= 1.0:
            raise ValueError(f"theta={self.theta!r} is out of range; allowed: a number in [0, 1].")
        validate_scope(self.scope)
        if not isinstance(self.rescale, bool):
            raise ValueError(f"rescale={self.rescale!r} is not allowed; allowed: true or false.")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {self.schedule!r}; known schedules: {', '.join(sorted(SCHEDULES))}.")
        for name in ("start", "end", "fix_at"):
            if getattr(self, name) is not None:
                resolve_step(getattr(self, name), 1, name)


KNOBS = tuple(f.name for f in dataclasses.fields(MethodConfig))

_PRESETS: dict[str, Callable[[float], MethodConfig]] = {}


@dataclass(frozen=True)
class UnstructuredOptions:
    """Options of every preset: the final sparsity, any knob of :class:`MethodConfig` (None:
    the preset's value) and the layer filters (glob patterns on module names, minimum size)."""

    sparsity: float = 0.9
    p: float | None = None
    theta: float | None = None
    scope: str | None = None
    rescale: bool | None = None
    schedule: str | None = None
    start: int | float | None = None
    end: int | float | None = None
    fix_at: int | float | None = None
    exclude: tuple[str, ...] | None = None
    min_size: int = 0

    def __post_init__(self) -> None:
        validate_sparsity(self.sparsity)
        knobs = {k: v for k in KNOBS if (v := getattr(self, k)) is not None}
        MethodConfig(**{"p": 1.0, "theta": 1.0, **knobs})  # validates every knob given
        if self.exclude is not None:
            if isinstance(self.exclude, str) or not all(isinstance(e, str) for e in self.exclude):
                raise ValueError(f"exclude={self.exclude!r} is not allowed; allowed: a list of glob patterns.")
            object.__setattr__(self, "exclude", tuple(self.exclude))
        if isinstance(self.min_size, bool) or not isinstance(self.min_size, int) or self.min_size < 0:
            raise ValueError(f"min_size={self.min_size!r} is not allowed; allowed: an int >= 0.")

    def knobs(self) -> dict[str, Any]:
        """The knobs that override the preset."""
        return {k: v for k in KNOBS if (v := getattr(self, k)) is not None}


def register_preset(
    name: str, summary: str, recipe: str = "feather"
) -> Callable[[Callable[[float], MethodConfig]], Callable[[float], MethodConfig]]:
    """Register a preset: a function from the final sparsity to a :class:`MethodConfig`; it
    becomes a method of the registry (``create(model, name, sparsity=...)``) trained by its
    paper's ``recipe``."""

    def add(preset: Callable[[float], MethodConfig]) -> Callable[[float], MethodConfig]:
        def build(model: nn.Module, options: UnstructuredOptions, context: Context) -> Sparsifier:
            return Sparsifier(model, name, options.sparsity, context.total_steps,
                              exclude=options.exclude, min_size=options.min_size, **options.knobs())

        shown = dataclasses.asdict(preset(UnstructuredOptions.sparsity))
        register_method(MethodSpec(name, UnstructuredOptions, build, summary, target="sparsity", recipe=recipe,
                                   shown_defaults=shown))
        _PRESETS[name] = preset
        return preset

    return add


def method_config(name: str, sparsity: float) -> MethodConfig:
    """The configuration of preset ``name`` for final sparsity ``sparsity``."""
    if name not in _PRESETS:
        raise ValueError(f"unknown method {name!r}; known methods: {', '.join(_PRESETS)}.")
    return _PRESETS[name](sparsity)


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


class SparseWeight(nn.Module):
    """The parametrization of one weight: w -> a * P_p(w * n; T) / n with the scaled STE
    (``ties``: extra entries pruned, see :mod:`sparsetrain.selection`)."""

    def __init__(self, p: float, theta: float, norm: float) -> None:
        super().__init__()
        self.p, self.theta, self.norm = p, theta, norm
        self.threshold = 0.0
        self.register_buffer("rescale", None, persistent=False)
        self.register_buffer("ties", None, persistent=False)
        self.register_buffer("mask", None, persistent=False)  # the kept weights, once fixed

    def normalised(self, w: Tensor) -> Tensor:
        """w * n, the magnitudes the threshold is compared against (w itself when n = 1)."""
        return w if self.norm == 1.0 else w * self.norm

    def forward(self, w: Tensor) -> Tensor:
        if self.mask is not None:
            return w * self.mask
        out = sparsify_ste(self.normalised(w), self.threshold, self.p, self.theta, self.rescale, self.ties)
        return out if self.norm == 1.0 else out / self.norm

    def zeros(self, w: Tensor) -> int:
        """How many entries of the forward weight are pruned: |w * n| <= T, or a pruned tie; once
        fixed, outside the mask."""
        if self.mask is not None:
            return int((~self.mask).sum())
        pruned = self.normalised(w).abs() <= self.threshold
        return int((pruned | self.ties).sum() if self.ties is not None else pruned.sum())


def st3_rescale(magnitude: Tensor, kept: Tensor) -> Tensor:
    """ST-3 per-output-channel rescale a_c = 1.01 / (r_c + 0.01) of a weight's magnitudes |w|,
    shaped to broadcast over w.

    r_c = (mean_k |w_ck| M_ck + 1e-6) / (mean_k |w_ck| + 1e-6), k running over the other dims.
    """
    flat = magnitude.flatten(1)
    ratio = ((flat * kept.flatten(1)).mean(1) + RESCALE_EPS) / (flat.mean(1) + RESCALE_EPS)
    return (1.01 / (ratio + 0.01)).view(-1, *([1] * (magnitude.dim() - 1)))


class Sparsifier(Method):
    """Makes a model sparse during training with one of the unstructured presets.

    ``method`` names a preset (``feather``, ``st3``, ``st3-sigma``, ``gmp``, ``ste``); any of
    its knobs (``p``, ``theta``, ``scope``, ``rescale``, ``schedule``, ``start``, ``end``) can
    be overridden by keyword. ``start``/``end`` are int steps or float fractions of
    ``total_steps``; ``schedule`` may also be a ready schedule object. Layers are chosen by
    ``types``, ``exclude`` (glob patterns on module names; None: what the model's modules declare
    in ``default_exclude``, e.g. a ViT's patch embedding and head; see
    :func:`~sparsetrain.prunable.default_exclude`) and ``min_size`` (entries).
    """

    def __init__(
        self,
        model: nn.Module,
        method: str = "feather",
        sparsity: float = 0.9,
        total_steps: int = 1,
        *,
        types: Sequence[type[nn.Module]] = PRUNABLE_TYPES,
        exclude: Sequence[str] | None = None,
        min_size: int = 0,
        **knobs: Any,
    ) -> None:
        super().__init__()
        sparsity = validate_sparsity(sparsity)
        validate_total_steps(total_steps)
        schedule = None if isinstance(knobs.get("schedule", ""), str) else knobs.pop("schedule")
        unknown = sorted(set(knobs) - set(KNOBS))
        if unknown:
            raise ValueError(f"unknown option {unknown[0]!r}; allowed options: {', '.join(KNOBS)}.")
        self.config: MethodConfig = dataclasses.replace(method_config(method, sparsity), **knobs)
        self.name = method
        self.total_steps = total_steps
        self.schedule: Schedule = schedule or make_schedule(
            self.config.schedule,
            sparsity,
            resolve_step(self.config.start, total_steps, "start"),
            resolve_step(self.config.end, total_steps, "end"),
        )
        self.fix_step = None if self.config.fix_at is None else resolve_step(self.config.fix_at, total_steps, "fix_at")
        if not math.isclose(self.schedule.final, sparsity):
            raise ValueError(
                f"the schedule's final sparsity {self.schedule.final} differs from sparsity={sparsity}; allowed: equal values."
            )
        if exclude is None:
            exclude = default_exclude(model)
        layers = find_prunable(model, types, exclude, min_size)
        if not layers:
            raise ValueError(
                f"model {type(model).__name__} has no prunable layer; allowed: a model with at least one "
                f"{'/'.join(t.__name__ for t in types)} layer of at least {min_size} weights not excluded by {list(exclude)}."
            )
        if any(parametrize.is_parametrized(module, "weight") for _, module in layers):
            raise ValueError("the model's weights are already parametrized; allowed: a model not yet attached to a method.")
        chosen = {id(module) for _, module in layers}
        pruned_weights = {id(module.weight) for _, module in layers}
        for name, module in model.named_modules(remove_duplicate=False):
            if id(module) not in chosen and id(getattr(module, "weight", None)) in pruned_weights:
                raise ValueError(
                    f"layer {name!r} shares a weight with a prunable layer but is not prunable itself (its type, "
                    "name pattern or size); allowed: every layer of a shared weight pruned, or none."
                )
        self.model = model
        self._modules = [module for _, module in layers]
        # One entry per distinct weight: a Parameter shared by several layers is one weight.
        first: dict[int, int] = {}
        self._owner: list[int] = []  # for each layer, the index of its weight
        self.names: list[str] = []
        self._weights: list[Tensor] = []
        for name, module in layers:
            key = id(module.weight)
            if key not in first:
                first[key] = len(self._weights)
                self.names.append(name)
                self._weights.append(module.weight)
            self._owner.append(first[key])
        self._params: list[SparseWeight] = []
        for w in self._weights:
            norm = 1.0 / layer_sigma(w.shape) if self.config.scope == "sigma" else 1.0
            self._params.append(SparseWeight(self.config.p, self.config.theta, norm))
        for module, owner in zip(self._modules, self._owner):
            parametrize.register_parametrization(module, "weight", self._params[owner])
        self._step = 0
        self.refresh()

    # -- reading the state -------------------------------------------------------------

    @property
    def method(self) -> str:
        """The preset's name."""
        return self.name

    @property
    def step_count(self) -> int:
        """How many times ``step()`` has been called (t)."""
        return self._step

    @property
    def target(self) -> float:
        """s(t): the sparsity the current thresholds were chosen for."""
        return self.schedule.sparsity_at(self._step)

    @property
    def threshold(self) -> float:
        """The current shared threshold T (in normalised units for the sigma scope)."""
        if self.config.scope == "layer":
            raise ValueError("scope='layer' has one threshold per layer; allowed: read Sparsifier.thresholds instead.")
        return self._params[0].threshold

    @property
    def thresholds(self) -> dict[str, float]:
        """Each prunable weight's threshold, by the name of the first layer holding it."""
        return {name: param.threshold for name, param in zip(self.names, self._params)}

    def dense_weights(self) -> list[Tensor]:
        """The trained dense weights w, one per distinct prunable weight, in order."""
        return list(self._weights)

    def sparsity(self) -> float:
        """Fraction of zeros among the prunable weights as the forward pass uses them."""
        return sum(zeros for _, _, zeros in self.layer_stats()) / self.numel()

    def numel(self) -> int:
        """N, the number of prunable weights (a shared weight counted once)."""
        return sum(w.numel() for w in self._weights)

    def layer_stats(self) -> list[tuple[str, int, int]]:
        """(name, size, zeros in the forward weight) of each distinct prunable weight."""
        self._check_attached()
        with torch.no_grad():
            return [(n, w.numel(), p.zeros(w)) for n, p, w in zip(self.names, self._params, self._weights)]

    def metrics(self) -> dict[str, float]:
        values = {"sparsity": self.sparsity()}
        if self.config.scope != "layer":
            values["threshold"] = self.threshold
        return values

    # -- changing the state ------------------------------------------------------------

    @property
    def fixed(self) -> bool:
        """Whether the fixed-mask phase has begun."""
        return self._params[0].mask is not None

    def step(self) -> bool:
        """Advance t by one and recompute thresholds (and rescales) from the current weights; at
        ``fix_at`` write the forward weights into the weights and freeze the masks."""
        self._check_attached()
        self._step += 1
        if self.fixed:
            return False
        self.refresh()
        if self.fix_step is not None and self._step >= self.fix_step:
            self._fix()
        return False

    def _fix(self) -> None:
        """w <- a * P_p(w; T) and M <- 1[w kept], for good."""
        with torch.no_grad():
            for param, w in zip(self._params, self._weights):
                value = param(w)
                w.copy_(value)
                param.mask = value != 0

    def refresh(self) -> None:
        """Recompute thresholds (and rescales) for s(t) from the current weights, t unchanged
        (nothing once the masks are fixed)."""
        self._check_attached()
        if self.fixed:
            return
        with torch.no_grad():
            magnitudes = [param.normalised(w).abs() for param, w in zip(self._params, self._weights)]
            self._check_finite(magnitudes)
            selection = _same_on_every_rank(select(magnitudes, self.target, self.config.scope), magnitudes)
            for param, w, mag, threshold, ties in zip(
                self._params, self._weights, magnitudes, selection.thresholds, selection.ties
            ):
                param.threshold = threshold
                param.ties = ties
                if self.config.rescale:  # on |w|: the sigma scale cancels in the ratio r_c
                    kept = mag > threshold
                    param.rescale = st3_rescale(w.abs() if param.norm != 1.0 else mag, kept if ties is None else kept & ~ties)

    def _check_finite(self, magnitudes: Sequence[Tensor]) -> None:
        peaks = torch.stack(torch._foreach_max(magnitudes))
        if not bool(torch.isfinite(peaks).all()):
            name = self.names[int((~torch.isfinite(peaks)).nonzero()[0])]
            raise FloatingPointError(
                f"layer {name!r} has a NaN or infinite weight at step {self._step}; "
                "allowed: finite weights (lower the learning rate or clip gradients)."
            )

    def finalize(self) -> nn.Module:
        """Bake a * P_p(w; T) into plain weights, remove the parametrizations, return the model.

        A shared weight is baked once (by its first layer); its other layers get it back as is.
        """
        self._check_attached()
        baked: set[int] = set()
        with torch.no_grad():
            for module, owner in zip(self._modules, self._owner):
                parametrize.remove_parametrizations(module, "weight", leave_parametrized=owner not in baked)
                baked.add(owner)
        self._finalized = True
        return self.model

    # -- checkpointing -----------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Step, thresholds, tie masks, rescales and fixed masks: everything needed to resume
        mid-schedule, with the settings they belong to."""
        return {
            "method": self.name,
            "settings": self._settings(),
            "step": self._step,
            "layers": list(self.names),
            "thresholds": [param.threshold for param in self._params],
            "ties": [None if param.ties is None else param.ties.clone() for param in self._params],
            "rescale": [None if param.rescale is None else param.rescale.clone() for param in self._params],
            "masks": [None if param.mask is None else param.mask.clone() for param in self._params],
        }

    def _settings(self) -> dict[str, Any]:
        """What a saved state must agree on: the target, the schedule's steps and every knob."""
        return {"sparsity": self.schedule.final, "total_steps": self.total_steps, "fix_step": self.fix_step,
                **{k: v for k, v in dataclasses.asdict(self.config).items() if k not in ("start", "end", "fix_at")},
                "start": self.schedule.start if hasattr(self.schedule, "start") else None,
                "end": self.schedule.end if hasattr(self.schedule, "end") else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a state saved by :meth:`state_dict` on the same model and method; a state that
        does not fit (other method, layers, settings, shapes; a missing entry; a non-finite
        threshold) is a ValueError naming what differs."""
        self._check_attached()
        expected = set(self.state_dict())
        if isinstance(state, dict) and set(state) == expected - {"settings"}:
            state = {**state, "settings": self._settings()}  # written before the settings were recorded
        if not isinstance(state, dict) or set(state) != expected:
            keys = sorted(state) if isinstance(state, dict) else type(state).__name__
            raise ValueError(f"this state has keys {keys}; allowed: a {self.name} state with {sorted(expected)}.")
        if state["method"] != self.name or list(state["layers"]) != self.names:
            raise ValueError(
                f"this state is for method {state['method']!r} on layers {list(state['layers'])[:3]}...; "
                f"allowed: a state of method {self.name!r} on the same layers."
            )
        for key, value in self._settings().items():
            saved = state["settings"].get(key) if isinstance(state["settings"], dict) else None
            if saved != value:
                raise ValueError(f"the saved state has {key}={saved!r} but this {self.name} has {key}={value!r}; "
                                 "allowed: the settings of the run being resumed.")
        thresholds = [float(t) for t in state["thresholds"]]
        if not all(math.isfinite(t) for t in thresholds):
            raise ValueError("the saved state holds a NaN or infinite threshold; allowed: finite thresholds.")
        for key in ("ties", "rescale", "masks"):
            for name, w, value in zip(self.names, self._weights, state[key]):
                if value is not None and key != "rescale" and value.shape != w.shape:
                    raise ValueError(f"the saved {key} of layer {name!r} has shape {tuple(value.shape)}; "
                                     f"allowed: the weight's {tuple(w.shape)}.")
        self._step = int(state["step"])
        for param, w, threshold, ties, rescale, mask in zip(
            self._params, self._weights, thresholds, state["ties"], state["rescale"], state["masks"]
        ):
            param.threshold = threshold
            param.ties = None if ties is None else ties.to(w.device).bool()
            param.rescale = None if rescale is None else rescale.to(w.device)
            param.mask = None if mask is None else mask.to(w.device).bool()


def _same_on_every_rank(selection: Selection, magnitudes: Sequence[Tensor]) -> Selection:
    """Under torch.distributed, every rank takes rank 0's thresholds and tie masks, so all masks agree."""
    if not (dist.is_available() and dist.is_initialized()):
        return selection
    device = torch.device("cuda") if dist.get_backend() == "nccl" else torch.device("cpu")
    has_ties = [float(t is not None) for t in selection.ties]
    values = torch.tensor(selection.thresholds + has_ties, dtype=torch.float64, device=device)
    dist.broadcast(values, src=0)
    count = len(selection.thresholds)
    ties: list[Tensor | None] = []
    for flag, local, mag in zip(values[count:].tolist(), selection.ties, magnitudes):
        if not flag:
            ties.append(None)
            continue
        buffer = (local if local is not None else torch.zeros_like(mag, dtype=torch.bool)).to(torch.uint8)
        dist.broadcast(buffer, src=0)
        ties.append(buffer.bool())
    return Selection(values[:count].tolist(), ties)
