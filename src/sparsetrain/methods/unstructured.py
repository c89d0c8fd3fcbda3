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
``optimizer.step()``, advances t and recomputes T from the updated weights. With
``update_every=k`` it does so only when t is a multiple of k (for s(t)); in between T, the ties and
the rescales stay as they are, and ``finalize()`` recomputes them from the final weights first.
When the model's forward starts, every forward weight is computed at once (the layers then find
theirs ready); a layer called on its own computes its weight as it reads it.

N:M scope (``scope="nm"``, ``n``, ``m``): the threshold is per group of M consecutive weights
along the input dimension (:mod:`sparsetrain.nm`; dimension 0 of a weight stored (in, out), such as
transformers' Conv1D: :func:`sparsetrain.prunable.out_in`); at s(t) each group prunes k = round(s(t) * M)
weights, so the final sparsity is 1 - N/M and a schedule is a path M:M -> ... -> N:M. Layers whose
input dimension is not a multiple of M stay dense (``dense_layers``). ``decay`` adds SR-STE's
lambda_w * (1 - E) * w to the pruned weights' gradient.

ST-3's rescale is per output channel, dimension 1 of a weight stored (in, out).

Fixed-mask phase (``fix_at``, ST-3's last 10 of 170 epochs): when t reaches ``fix_at`` the
thresholds are recomputed for s(t), the forward weights a * P_p(w; T) are written into the
weights, and from then on each layer computes with w * M, M the frozen mask of the kept
weights: no shift, no rescale, gradient only on the kept weights, thresholds no longer move.

A weight shared by several layers (one Parameter in two modules) is one weight: counted
once, thresholded once, finalized once.

Weights sharded by FSDP2 (``fully_shard`` after ``create()``, seen at ``bind()``) are selected over
every rank's shards (:mod:`.sharding`); under ``torch.compile`` the forward reads T and the pruned
ties as fixed-shape tensors (:class:`SparseWeight`), so changing them recompiles nothing.

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
SR-STE: Zhou et al., ICLR 2021 (lambda_w = 2e-4). The N:M presets take ``nm="N:M"`` (2:4 by
default) instead of a sparsity.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.utils import parametrize

from ..messages import shown
from ..nm import GroupSelector, has_groups, parse_nm, select_groups, validate_nm
from ..operators import (
    Threshold,
    kept_mask,
    sparsify_ste,
    threshold_operator,
    validate_p,
)
from ..prunable import (
    PRUNABLE_TYPES,
    LayerType,
    choose_layers,
    out_in,
    stores_transposed,
    validate_types,
)
from ..schedules import (
    SCHEDULES,
    Schedule,
    make_schedule,
    resolve_step,
    validate_sparsity,
    validate_total_steps,
)
from ..selection import SCOPES, Selection, layer_sigma, layer_sparsities, prune_count, select
from ..sharded_selection import select_sharded
from .protocol import Method, check_finite
from .registry import Context, MethodSpec, register_method
from .sharding import (
    any_rank,
    channel_sums,
    first_row,
    global_ties,
    is_sharded,
    local_shard,
    shard_group,
    total,
    unparametrize,
)

RESCALE_EPS = 1e-6
DEFAULT_SPARSITY = 0.9
ENGINE_SCOPES = (*SCOPES, "nm")
PER_LAYER = ("layer", "erk")  # scopes with a threshold per layer
SR_STE_DECAY = 2e-4  # lambda_w of Zhou et al. (2021)


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
    n: int | None = None
    m: int | None = None
    decay: float = 0.0
    update_every: int = 1

    def __post_init__(self) -> None:
        object.__setattr__(self, "p", validate_p(self.p))
        if isinstance(self.update_every, bool) or not isinstance(self.update_every, int) or self.update_every < 1:
            raise ValueError(f"update_every={self.update_every!r} is not allowed; allowed: an int >= 1 (optimizer steps).")
        if isinstance(self.theta, bool) or not isinstance(self.theta, (int, float)) or not 0.0 <= self.theta <= 1.0:
            raise ValueError(f"theta={self.theta!r} is out of range; allowed: a number in [0, 1].")
        if self.scope not in ENGINE_SCOPES:
            raise ValueError(f"unknown scope {self.scope!r}; known scopes: {', '.join(ENGINE_SCOPES)}.")
        if self.scope == "nm":
            validate_nm(self.n, self.m)
        elif self.n is not None or self.m is not None:
            raise ValueError(f"n={self.n!r}, m={self.m!r} apply to scope 'nm' only; allowed: leave them unset for scope {self.scope!r}.")
        if isinstance(self.decay, bool) or not isinstance(self.decay, (int, float)) or not 0.0 <= self.decay < math.inf:
            raise ValueError(f"decay={self.decay!r} is not allowed; allowed: a finite number >= 0.")
        if not isinstance(self.rescale, bool):
            raise ValueError(f"rescale={self.rescale!r} is not allowed; allowed: true or false.")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {self.schedule!r}; known schedules: {', '.join(sorted(SCHEDULES))}.")
        for name in ("start", "end", "fix_at"):
            if getattr(self, name) is not None:
                resolve_step(getattr(self, name), 1, name)


KNOBS = tuple(f.name for f in dataclasses.fields(MethodConfig))
_NM_KNOBS = ("n", "m", "scope")  # set by the N:M presets' nm option

_PRESETS: dict[str, Callable[[float], MethodConfig]] = {}


@dataclass(frozen=True)
class _PresetOptions:
    """Options shared by every preset: any knob of :class:`MethodConfig` (None: the preset's
    value) and the layer filters (glob patterns on module names, minimum size, and the layer
    types: classes or class names; None: :data:`~sparsetrain.prunable.PRUNABLE_TYPES`)."""

    p: float | None = None
    theta: float | None = None
    rescale: bool | None = None
    schedule: str | None = None
    start: int | float | None = None
    end: int | float | None = None
    fix_at: int | float | None = None
    decay: float | None = None
    update_every: int | None = None
    exclude: tuple[str, ...] | None = None
    min_size: int = 0
    types: tuple[LayerType, ...] | None = None

    def __post_init__(self) -> None:
        MethodConfig(**{"p": 1.0, "theta": 1.0, **self.knobs()})  # validates every knob given
        if self.exclude is not None:
            if not isinstance(self.exclude, (list, tuple)) or not all(isinstance(e, str) for e in self.exclude):
                raise ValueError(f"exclude={self.exclude!r} is not allowed; allowed: a list of glob patterns.")
            object.__setattr__(self, "exclude", tuple(self.exclude))
        if self.types is not None:
            object.__setattr__(self, "types", validate_types(self.types))
        if isinstance(self.min_size, bool) or not isinstance(self.min_size, int) or self.min_size < 0:
            raise ValueError(f"min_size={self.min_size!r} is not allowed; allowed: an int >= 0.")

    def knobs(self) -> dict[str, Any]:
        """The knobs that override the preset."""
        return {k: v for k in KNOBS if (v := getattr(self, k, None)) is not None}

    def engine_args(self) -> dict[str, Any]:
        """The keyword arguments of :class:`Sparsifier` beyond the model, method and length."""
        types = {} if self.types is None else {"types": self.types}
        return {"exclude": self.exclude, "min_size": self.min_size, **types, **self.knobs()}


@dataclass(frozen=True)
class UnstructuredOptions(_PresetOptions):
    """Options of the unstructured presets: the final sparsity, the threshold scope and the shared ones."""

    sparsity: float = DEFAULT_SPARSITY
    scope: str | None = None

    def __post_init__(self) -> None:
        validate_sparsity(self.sparsity)
        if self.scope == "nm":
            raise ValueError(f"scope='nm' is not allowed here; allowed: {', '.join(SCOPES)} "
                             f"(N:M sparsity is the presets {', '.join(nm_presets())}, with nm='N:M').")
        super().__post_init__()

    def engine_args(self) -> dict[str, Any]:
        return {"sparsity": self.sparsity, **super().engine_args()}


@dataclass(frozen=True)
class NMOptions(_PresetOptions):
    """Options of the N:M presets: the pattern ``nm`` ("N:M") and the shared ones."""

    nm: str = "2:4"

    def __post_init__(self) -> None:
        parse_nm(self.nm)
        super().__post_init__()

    def engine_args(self) -> dict[str, Any]:
        n, m = parse_nm(self.nm)
        return {"n": n, "m": m, **super().engine_args()}


def register_preset(
    name: str, summary: str, recipe: str = "feather"
) -> Callable[[Callable[[float], MethodConfig]], Callable[[float], MethodConfig]]:
    """Register a preset: a function from the final sparsity to a :class:`MethodConfig`; it
    becomes a method of the registry (``create(model, name, sparsity=...)``, or ``nm="N:M"`` for
    a preset of scope "nm") trained by its paper's ``recipe``."""

    def add(preset: Callable[[float], MethodConfig]) -> Callable[[float], MethodConfig]:
        def build(model: nn.Module, options: _PresetOptions, context: Context) -> Sparsifier:
            return Sparsifier(model, name, total_steps=context.total_steps, **options.engine_args())

        shown = dataclasses.asdict(preset(DEFAULT_SPARSITY))
        nm = shown["scope"] == "nm"
        if nm:
            shown = {k: v for k, v in shown.items() if k not in _NM_KNOBS}
        register_method(MethodSpec(name, NMOptions if nm else UnstructuredOptions, build, summary,
                                   target="nm" if nm else "sparsity", recipe=recipe, shown_defaults=shown))
        _PRESETS[name] = preset
        return preset

    return add


def nm_presets() -> list[str]:
    """The presets of scope "nm"."""
    return [name for name, preset in _PRESETS.items() if preset(DEFAULT_SPARSITY).scope == "nm"]


def method_config(name: str, sparsity: float) -> MethodConfig:
    """The configuration of preset ``name`` for final sparsity ``sparsity``."""
    if name not in _PRESETS:
        raise ValueError(f"unknown method {name!r}; known methods: {', '.join(_PRESETS)}.")
    return _PRESETS[name](sparsity)


def resolve_config(name: str, sparsity: float | None, knobs: dict[str, Any]) -> tuple[MethodConfig, float]:
    """Preset ``name`` with ``knobs`` applied, and its final sparsity: ``sparsity`` (None: 0.9),
    or for scope "nm" 1 - N/M (a ``sparsity`` given must equal it)."""
    probe = dataclasses.replace(method_config(name, DEFAULT_SPARSITY), **knobs)
    if probe.scope == "nm":
        pattern = 1.0 - probe.n / probe.m
        if sparsity is not None and not math.isclose(sparsity, pattern):
            raise ValueError(f"sparsity={sparsity!r} does not match the {probe.n}:{probe.m} pattern; "
                             f"allowed: {pattern:g} (1 - N/M) or no sparsity.")
        sparsity = pattern
    elif sparsity is None:
        sparsity = DEFAULT_SPARSITY
    sparsity = validate_sparsity(sparsity)
    return dataclasses.replace(method_config(name, sparsity), **knobs), sparsity


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
    return dataclasses.replace(feather(sparsity), scope="nm", n=2, m=4)


@register_preset("st3-nm", "ST-3's soft threshold, rescale and fixed-mask phase with an N:M threshold per group",
                 recipe="st3")
def st3_nm(sparsity: float) -> MethodConfig:
    return dataclasses.replace(st3(sparsity), scope="nm", n=2, m=4)


@register_preset("sr-ste", "N:M mask from the start, straight-through with sparse-refined decay (ICLR 2021)")
def sr_ste(sparsity: float) -> MethodConfig:
    return MethodConfig(p=math.inf, theta=1.0, scope="nm", n=2, m=4, schedule="constant", decay=SR_STE_DECAY)


class SparseWeight(nn.Module):
    """The parametrization of one weight: w -> a * P_p(w * n; T) / n with the scaled STE
    (``ties``: extra entries pruned, see :mod:`sparsetrain.selection`; T a number, or a tensor
    shaped like w for N:M groups).

    Under ``torch.compile`` the forward reads only tensors that keep their shapes from step to
    step, so a new threshold, target or tie never recompiles the graph: T as a tensor (``limit``),
    and the pruned ties as the first ``tie_count`` entries (flat index) whose |w * n| equals
    ``tie_value``."""

    def __init__(self, p: float, theta: float, norm: float, decay: float = 0.0) -> None:
        super().__init__()
        self.p, self.theta, self.norm, self.decay = p, theta, norm, decay
        self.threshold: Threshold = 0.0
        self.register_buffer("rescale", None, persistent=False)
        self.register_buffer("ties", None, persistent=False)
        self.register_buffer("mask", None, persistent=False)  # the kept weights, once fixed
        self.limit = torch.zeros(())  # T as a tensor; not a buffer, which DDP would broadcast at every forward
        self.register_buffer("tie_value", torch.zeros(()), persistent=False)
        self.register_buffer("tie_count", torch.zeros((), dtype=torch.long), persistent=False)
        # Under FSDP2 (see :mod:`.sharding`), set by the Sparsifier: the forward works on the unsharded weight.
        self.sharded = False
        self.groups: tuple[int, int] | None = None  # N:M: (k, m), the groups selected inside the forward
        self.transposed = False  # the weight is stored (in, out)
        self.rescaled = False  # ST-3's rescale, computed inside the forward
        self.frozen = False  # the fixed-mask phase: the pruned weights are kept at exact zeros
        self.shard_mask: Tensor | None = None  # then the kept entries of this rank's shard
        self._prepared: tuple[int, Tensor] | None = None  # (version of w, forward weight)
        self._scratch: Tensor | None = None  # |w * n|, reused from step to step
        self._scratch_version: int | None = None  # the version of w it holds, until a forward spends it

    def normalised(self, w: Tensor) -> Tensor:
        """w * n, the magnitudes the threshold is compared against (w itself when n = 1)."""
        return w if self.norm == 1.0 else w * self.norm

    @torch.no_grad()
    def choose(self, threshold: Threshold, ties: Tensor | None, w: Tensor, span: tuple[float, int] | None = None) -> None:
        """Set T and the pruned ties for weight ``w``, with their tensor forms for compiled graphs
        (``span``: the tie value and count of a sharded weight, which its local ties cannot tell)."""
        self.threshold, self.ties = threshold, ties
        if isinstance(threshold, Tensor):
            self.limit = threshold
        else:
            if self.limit.shape != () or self.limit.dtype != w.dtype or self.limit.device != w.device:
                self.limit = torch.zeros((), dtype=w.dtype, device=w.device)
            self.limit.fill_(threshold)
        if self.tie_value.dtype != w.dtype or self.tie_value.device != w.device:
            self.tie_value = torch.zeros((), dtype=w.dtype, device=w.device)
            self.tie_count = torch.zeros((), dtype=torch.long, device=w.device)
        if span is not None:
            self.tie_value.fill_(span[0])
            self.tie_count.fill_(span[1])
            return
        if ties is None:
            self.tie_count.zero_()
            return
        positions = ties.reshape(-1).nonzero()  # the first entries equal to the tie value, in flat order
        self.tie_value.copy_(self.normalised(w).abs().reshape(-1)[positions[0, 0]])
        self.tie_count.fill_(int(positions[-1, 0]) + 1)

    @torch.no_grad()
    def magnitude(self, w: Tensor) -> Tensor:
        """|w * n|, written into a buffer kept from step to step (no fresh tensor as large as w at
        every step); the next forward weight computed from this version of w reuses it as scratch."""
        if not _fits(self._scratch, w):
            self._scratch = torch.empty_like(w)
        if self.norm == 1.0:
            torch.abs(w, out=self._scratch)
        else:
            torch.mul(w, self.norm, out=self._scratch).abs_()
        self._scratch_version = w._version
        return self._scratch

    def _spend_magnitude(self, w: Tensor) -> Tensor | None:
        """The buffer of :meth:`magnitude` if it holds this version of w (it may then be overwritten)."""
        fresh = self._scratch_version == w._version and _fits(self._scratch, w)
        self._scratch_version = None
        return self._scratch if fresh else None

    def prepare(self, w: Tensor) -> None:
        """Compute the forward weight of ``w`` now: :meth:`forward` returns it while ``w`` is not
        changed in place, until :meth:`release`."""
        self._prepared = None
        self._prepared = (w._version, self.forward(w))

    def release(self) -> None:
        """Forget the prepared forward weight."""
        self._prepared = None

    def forward(self, w: Tensor) -> Tensor:
        if self.mask is not None:
            return w * self.mask
        # the decay acts on w * n, so lambda / n^2 gives lambda * (1 - E) * w on w
        decay = self.decay / self.norm**2
        if self.sharded:
            return self._forward_unsharded(w, decay)
        if torch.compiler.is_compiling():
            scaled = self.normalised(w)
            index = torch.arange(scaled.numel(), device=scaled.device).view(scaled.shape)
            ties = (scaled.abs() == self.tie_value) & (index < self.tie_count)
            out = sparsify_ste(scaled, self.limit, self.p, self.theta, self.rescale, ties, decay)
        elif self._prepared is not None and self._prepared[0] == w._version:
            return self._prepared[1]
        else:
            out = sparsify_ste(self.normalised(w), self.threshold, self.p, self.theta, self.rescale, self.ties,
                               decay, self._spend_magnitude(w))
        return out if self.norm == 1.0 else out / self.norm

    def _forward_unsharded(self, w: Tensor, decay: float) -> Tensor:
        """The forward of an FSDP2-sharded weight, on its unsharded value inside the layer's forward:
        the N:M groups, the pruned ties and ST-3's rescale are computed here from w itself."""
        if self.frozen:
            return w * (w != 0)
        scaled = self.normalised(w)
        with torch.no_grad():
            magnitude = scaled.abs()
            if self.groups is not None:
                k, m = self.groups
                chosen = select_groups([out_in(magnitude, self.transposed)], k, m)
                threshold, ties = (_stored(value[0], self.transposed) for value in (chosen.thresholds, chosen.ties))
            else:
                threshold, ties = self.threshold, None
                if int(self.tie_count):
                    index = torch.arange(w.numel(), device=w.device).view(w.shape)
                    ties = (magnitude == self.tie_value) & (index < self.tie_count)
            rescale = None
            if self.rescaled:
                kept = kept_mask(scaled, threshold, ties, magnitude)
                plain = magnitude if self.norm == 1.0 else w.abs()
                rescale = out_in(st3_rescale(out_in(plain, self.transposed), out_in(kept, self.transposed)), self.transposed)
        out = sparsify_ste(scaled, threshold, self.p, self.theta, rescale, ties, decay, magnitude)
        return out if self.norm == 1.0 else out / self.norm

    def zeros(self, w: Tensor) -> int:
        """How many entries of the forward weight are pruned: |w * n| <= T, or a pruned tie; once
        fixed, outside the mask."""
        if self.mask is not None:
            return int((~self.mask).sum())
        return int((~kept_mask(self.normalised(w), self.threshold, self.ties)).sum())


def _weight_of(module: nn.Module) -> Tensor:
    """The dense weight w of a layer: the original under its parametrization, once removed the weight."""
    return module.parametrizations["weight"].original if parametrize.is_parametrized(module, "weight") else module.weight


def _fits(buffer: Tensor | None, w: Tensor) -> bool:
    """Whether ``buffer`` can hold a tensor like ``w``: same shape, dtype and device."""
    return buffer is not None and buffer.shape == w.shape and buffer.dtype == w.dtype and buffer.device == w.device


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

    ``method`` names a preset (``feather``, ``st3``, ``st3-sigma``, ``gmp``, ``ste``,
    ``feather-nm``, ``st3-nm``, ``sr-ste``); any of its knobs (``p``, ``theta``, ``scope``,
    ``rescale``, ``schedule``, ``start``, ``end``, ``fix_at``, ``n``, ``m``, ``decay``,
    ``update_every``) can be
    overridden by keyword. ``sparsity`` None means 0.9, or 1 - N/M for scope "nm".
    ``start``/``end`` are int steps or float fractions of ``total_steps``; ``schedule`` may also
    be a ready schedule object. Layers are chosen by :func:`~sparsetrain.prunable.choose_layers`
    from ``types`` (classes or class names), ``exclude`` (glob patterns on module names; None: the
    default exclusions, e.g. a ViT's patch embedding, a language model's tied head) and
    ``min_size`` (entries); ``excluded`` lists the layers left dense and why.
    """

    def __init__(
        self,
        model: nn.Module,
        method: str = "feather",
        sparsity: float | None = None,
        total_steps: int = 1,
        *,
        types: Sequence[LayerType] = PRUNABLE_TYPES,
        exclude: Sequence[str] | None = None,
        min_size: int = 0,
        **knobs: Any,
    ) -> None:
        super().__init__()
        validate_total_steps(total_steps)
        schedule = None if isinstance(knobs.get("schedule", ""), str) else knobs.pop("schedule")
        unknown = sorted(set(knobs) - set(KNOBS))
        if unknown:
            raise ValueError(f"unknown option {unknown[0]!r}; allowed options: {', '.join(KNOBS)}.")
        self.config, sparsity = resolve_config(method, sparsity, knobs)
        self._groups = GroupSelector(self.config.m) if self.config.scope == "nm" else None
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
        types = validate_types(types)
        choice = choose_layers(model, types, exclude, min_size)
        layers = choice.layers
        if not layers:
            kinds = "/".join(t if isinstance(t, str) else t.__name__ for t in types)
            dense = shown([name for name, _ in choice.dense])
            raise ValueError(f"model {type(model).__name__} has no prunable layer; allowed: a model with at least one "
                             f"{kinds} layer of at least {min_size} weights not left dense (left dense: {dense}).")
        if any(parametrize.is_parametrized(module, "weight") for _, module in layers):
            raise ValueError("the model's weights are already parametrized; allowed: a model not yet attached to a method.")
        sharded = [name for name, module in layers if is_sharded(module.weight)]
        if sharded:
            raise ValueError(f"layer {sharded[0]!r} is already sharded by fully_shard; allowed: create() first, then "
                             "fully_shard, then the optimizer, then bind().")
        self.model = model
        self.excluded: list[tuple[str, str]] = list(choice.dense)
        self._modules = [module for _, module in layers]
        # One entry per distinct weight: a Parameter shared by several layers is one weight.
        first: dict[int, int] = {}
        self._owner: list[int] = []  # for each layer, the index of its weight
        self.names: list[str] = []
        self._holders: list[nn.Module] = []  # for each weight, the first layer holding it
        self._transposed: list[bool] = []  # stored (in, out): N:M groups and rescale read it transposed
        for name, module in layers:
            key = id(module.weight)
            if key not in first:
                first[key] = len(self._holders)
                self.names.append(name)
                self._holders.append(module)
                self._transposed.append(stores_transposed(module))
            self._owner.append(first[key])
        # each distinct weight as its layer holds it; read again at bind(), as fully_shard replaces them
        self._weights: list[Tensor] = [module.weight for module in self._holders]
        self._params: list[SparseWeight] = []
        for w in self._weights:
            norm = 1.0 / layer_sigma(w.shape) if self.config.scope == "sigma" else 1.0
            self._params.append(SparseWeight(self.config.p, self.config.theta, norm, self.config.decay))
        for module, owner in zip(self._modules, self._owner):
            parametrize.register_parametrization(module, "weight", self._params[owner])
        self._hooks = [model.register_forward_pre_hook(self._prepare),
                       model.register_forward_hook(self._release, always_call=True)]
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
        """s(t_u): the sparsity the current thresholds were chosen for, t_u the last multiple of
        ``update_every`` up to t (t itself by default)."""
        return self.schedule.sparsity_at(self._step - self._step % self.config.update_every)

    @property
    def threshold(self) -> float:
        """The current shared threshold T (in normalised units for the sigma scope)."""
        if not self._shared_threshold:
            raise ValueError(f"scope={self.config.scope!r} has a threshold per layer or group; "
                             "allowed: read Sparsifier.thresholds instead.")
        return self._params[0].threshold

    @property
    def _shared_threshold(self) -> bool:
        return self.config.scope in ("global", "sigma")

    @property
    def thresholds(self) -> dict[str, Threshold]:
        """Each prunable weight's threshold, by the name of the first layer holding it (for
        scope "nm" a tensor shaped like the weight: its group's threshold at every entry)."""
        return {name: param.threshold for name, param in zip(self.names, self._params)}

    @property
    def dense_layers(self) -> list[str]:
        """For scope "nm", the prunable weights left dense: no groups of M along their input dimension."""
        if self.config.scope != "nm":
            return []
        return [name for name, w, transposed in zip(self.names, self._weights, self._transposed)
                if not has_groups(out_in(w, transposed).shape, self.config.m)]

    def dense_weights(self) -> list[Tensor]:
        """The trained dense weights w, one per distinct prunable weight, in order."""
        return list(self._weights)

    def sparsity(self) -> float:
        """Fraction of zeros among the prunable weights as the forward pass uses them (after
        ``finalize()``, in the baked weights)."""
        return sum(zeros for _, _, zeros in self.layer_stats()) / self.numel()

    def numel(self) -> int:
        """N, the number of prunable weights (a shared weight counted once)."""
        return sum(w.numel() for w in self._weights)

    def layer_stats(self) -> list[tuple[str, int, int]]:
        """(name, size, zeros in the forward weight) of each distinct prunable weight; after
        ``finalize()``, the zeros of the baked weight."""
        weights = self._weights
        group = shard_group(weights, self.names)
        with torch.no_grad():
            if group is not None:
                zeros = total([self._local_zeros(p, local_shard(w), t) for p, w, t in
                               zip(self._params, weights, self._transposed)], group)
                return [(n, w.numel(), z) for n, w, z in zip(self.names, weights, zeros)]
            if self._finalized:
                return [(n, w.numel(), int((w == 0).sum())) for n, w in zip(self.names, weights)]
            return [(n, w.numel(), p.zeros(w)) for n, p, w in zip(self.names, self._params, weights)]

    def _local_zeros(self, param: SparseWeight, shard: Tensor, transposed: bool) -> int:
        """Entries of this rank's shard that the forward prunes (sharded weights)."""
        if self._finalized or param.frozen:
            return int((shard == 0).sum())
        if param.groups is not None:
            threshold, ties = self._local_groups(param, shard, transposed)
            return int((~kept_mask(shard, threshold, ties)).sum())
        return int((~kept_mask(param.normalised(shard), param.threshold, param.ties)).sum())

    def metrics(self) -> dict[str, float]:
        values = {"sparsity": self.sparsity()}
        if self._shared_threshold:
            values["threshold"] = self.threshold
        return values

    # -- the forward pass --------------------------------------------------------------

    def _prepare(self, model: nn.Module, args: Any) -> None:
        """Before the model's forward: every forward weight computed at once, one after another.
        The layers then find theirs ready (computed lazily inside the forward, between the
        convolutions, the same work took several times as long on CPU). Not in a compiled graph,
        where the compiler fuses each layer's work."""
        if torch.compiler.is_compiling() or self._params[0].sharded:
            return
        if is_sharded(_weight_of(self._holders[0])):
            raise RuntimeError("the model was sharded by fully_shard after create(), but bind() has not seen it; "
                               "allowed: bind(optimizer) after fully_shard and before the first forward.")
        for param, w in zip(self._params, self._weights):
            param.prepare(w)

    def _release(self, model: nn.Module, args: Any, output: Any) -> None:
        """After the model's forward, even one that raised: the prepared weights are dropped (the
        graph keeps what the backward needs)."""
        if torch.compiler.is_compiling() or self._params[0].sharded:
            return
        for param in self._params:
            param.release()

    # -- changing the state ------------------------------------------------------------

    def bind(self, optimizer: torch.optim.Optimizer) -> None:
        """Remember the optimizer; if FSDP2 has sharded the weights since ``create()``, take over
        the sharded weights: thresholds selected again across the shards (the same values)."""
        super().bind(optimizer)
        self._weights = weights = [_weight_of(module) for module in self._holders]
        group = shard_group(weights, self.names)
        if group is not None and not self.fixed:
            self._reselect_sharded(self.target, weights, group)

    @property
    def fixed(self) -> bool:
        """Whether the fixed-mask phase has begun."""
        return self._params[0].mask is not None or self._params[0].frozen

    def step(self) -> bool:
        """Advance t by one and recompute thresholds (and rescales) from the current weights when t
        is a multiple of ``update_every``; at ``fix_at`` recompute them, write the forward weights
        into the weights and freeze the masks."""
        self._check_attached()
        self._step += 1
        if self.fixed:
            self._zero_pruned_shards()
            return False
        if self.fix_step is not None and self._step >= self.fix_step:
            self._reselect(self.schedule.sparsity_at(self._step))
            self._fix()
        elif self._step % self.config.update_every == 0:
            self.refresh()
        return False

    @torch.no_grad()
    def _zero_pruned_shards(self) -> None:
        """Sharded weights in the fixed-mask phase: the optimizer's momentum may have moved pruned
        entries; they are set back to 0 (the forward reads the mask off the zeros)."""
        for param, w in zip(self._params, self._weights):
            if param.shard_mask is not None:
                local_shard(w).mul_(param.shard_mask)

    def _fix(self) -> None:
        """w <- a * P_p(w; T) and M <- 1[w kept], for good."""
        group = shard_group(self._weights, self.names)
        if group is not None:
            self._bake_shards(group)
            for param, w in zip(self._params, self._weights):
                param.frozen, param.shard_mask = True, local_shard(w) != 0
            return
        with torch.no_grad():
            for param, w in zip(self._params, self._weights):
                value = param(w)
                w.copy_(value)
                param.mask = value != 0

    def refresh(self) -> None:
        """Recompute thresholds (and rescales) for :attr:`target` from the current weights, t
        unchanged (nothing once the masks are fixed)."""
        self._check_attached()
        if not self.fixed:
            self._reselect(self.target)

    def _reselect(self, sparsity: float) -> None:
        """Thresholds, ties and rescales that make the current weights exactly ``sparsity`` sparse."""
        weights = self._weights
        group = shard_group(weights, self.names)
        if group is not None:
            self._reselect_sharded(sparsity, weights, group)
            return
        with torch.no_grad():
            magnitudes = [param.magnitude(w) for param, w in zip(self._params, self._weights)]
            check_finite(magnitudes, self.names, "layer", "weight", self._step)
            selection = _same_on_every_rank(self._select(magnitudes, sparsity), magnitudes)
            for param, w, mag, threshold, ties, transposed in zip(
                self._params, self._weights, magnitudes, selection.thresholds, selection.ties, self._transposed
            ):
                param.choose(threshold, ties, w)
                if self.config.rescale:  # on |w|: the sigma scale cancels in the ratio r_c
                    kept = kept_mask(mag, threshold, ties)
                    magnitude = w.abs() if param.norm != 1.0 else mag
                    rescale = st3_rescale(out_in(magnitude, transposed), out_in(kept, transposed))
                    param.rescale = out_in(rescale, transposed)  # per output channel, in w's layout

    @torch.no_grad()
    def _reselect_sharded(self, sparsity: float, weights: Sequence[Tensor], group: dist.ProcessGroup) -> None:
        """:meth:`_reselect` for weights sharded by FSDP2: the threshold of the scope selected over every
        rank's shards, equal on every rank; N:M groups and ST-3's rescale are left to the forward."""
        config = self.config
        if config.update_every > 1 and (config.scope == "nm" or config.rescale):
            raise ValueError(f"update_every={config.update_every} with {self.name!r} under FSDP is not supported; "
                             "allowed: update_every=1 (its N:M groups and rescale are computed in every forward).")
        shards = [local_shard(w) for w in weights]
        for param, transposed in zip(self._params, self._transposed):
            param.sharded, param.transposed, param.rescaled = True, transposed, config.rescale
        if config.scope == "nm":
            for name, w, transposed in zip(self.names, weights, self._transposed):
                rows = -(-w.shape[0] // w.device_mesh.size())
                if transposed and has_groups(out_in(w, True).shape, config.m) and rows % config.m:
                    raise ValueError(f"layer {name!r} (stored (in, out)) has {rows} input rows per shard, so groups of "
                                     f"{config.m} straddle the shards; allowed: a rank count that splits its "
                                     f"{w.shape[0]} rows into multiples of {config.m}.")
            for param, shard in zip(self._params, shards):
                param.groups = (prune_count(sparsity, config.m), config.m)
                param.choose(0.0, None, shard)  # no threshold tensor as large as the weight kept
            return
        magnitudes = [param.normalised(shard).abs() for param, shard in zip(self._params, shards)]
        broken = [not bool(torch.isfinite(m).all()) for m in magnitudes]
        try:
            if config.scope in PER_LAYER:
                shares = layer_sparsities([tuple(w.shape) for w in weights], sparsity, config.scope)
                parts = [select_sharded([m], share, group) for m, share in zip(magnitudes, shares)]
                chosen = Selection([p.thresholds[0] for p in parts], [p.ties[0] for p in parts])
            else:
                chosen = select_sharded(magnitudes, sparsity, group)
        except ValueError:  # a NaN on some rank: every rank is here
            self._check_finite_shards(any_rank(broken, group))
            raise
        spans, broken = self._spans(magnitudes, chosen.ties, weights, group, broken)
        self._check_finite_shards(broken)
        for param, shard, threshold, ties, span in zip(self._params, shards, chosen.thresholds, chosen.ties, spans):
            param.choose(threshold, ties, shard, span)

    def _check_finite_shards(self, broken: Sequence[bool]) -> None:
        """FloatingPointError naming the first layer with a NaN or infinite weight on some rank."""
        if any(broken):
            raise FloatingPointError(f"layer {self.names[list(broken).index(True)]!r} has a NaN or infinite weight at "
                                     f"step {self._step}; allowed: finite weights (lower the learning rate or clip gradients).")

    def _spans(self, magnitudes: Sequence[Tensor], ties: Sequence[Tensor | None], weights: Sequence[Tensor],
               group: dist.ProcessGroup, flags: Sequence[bool] = ()) -> tuple[list[tuple[float, int]], list[bool]]:
        """Each weight's (tie value, end of its pruned ties in the full weight) from the local tie masks
        (one tie value for a shared threshold, one per layer for scopes "layer" and "erk"), and each of
        ``flags`` set on some rank, in the same collective."""
        if self.config.scope in PER_LAYER:
            spans = [global_ties([m], [t], [w], group) for m, t, w in zip(magnitudes, ties, weights)]
            return [(value, ends[0]) for value, ends, _ in spans], any_rank(flags, group) if flags else []
        value, ends, flags = global_ties(magnitudes, ties, weights, group, flags)
        return [(value, end) for end in ends], flags

    def _local_groups(self, param: SparseWeight, shard: Tensor, transposed: bool) -> tuple[Threshold, Tensor | None]:
        """The N:M thresholds and ties of this rank's shard (its groups lie within it)."""
        chosen = select_groups([out_in(shard.abs(), transposed)], *param.groups)
        return _stored(chosen.thresholds[0], transposed), _stored(chosen.ties[0], transposed)

    @torch.no_grad()
    def _bake_shards(self, group: dist.ProcessGroup) -> None:
        """Write a * P_p(w; T) into every rank's shard of every weight (sharded weights)."""
        for param, w, transposed in zip(self._params, self._weights, self._transposed):
            shard = local_shard(w)
            if param.groups is not None:
                threshold, ties = self._local_groups(param, shard, transposed)
            else:
                threshold, ties = param.threshold, param.ties
            scaled = param.normalised(shard)
            value = threshold_operator(scaled, threshold, param.p)
            if ties is not None:
                value = value * ~ties
            if param.rescaled:
                value = value * self._shard_rescale(w, shard, kept_mask(scaled, threshold, ties), transposed, group)
            shard.copy_(value if param.norm == 1.0 else value / param.norm)

    @staticmethod
    def _shard_rescale(w: Tensor, shard: Tensor, kept: Tensor, transposed: bool, group: dist.ProcessGroup) -> Tensor:
        """ST-3's a_c (:func:`st3_rescale`) of the full weight's output channels, shaped to broadcast
        over this rank's shard."""
        magnitude = shard.abs()
        per_channel = w.numel() // (w.shape[1] if transposed else w.shape[0])
        kept_sum = channel_sums(magnitude * kept, w, transposed, group) / per_channel
        all_sum = channel_sums(magnitude, w, transposed, group) / per_channel
        rescale = 1.01 / ((kept_sum + RESCALE_EPS) / (all_sum + RESCALE_EPS) + 0.01)
        if transposed:
            return rescale.view(1, -1)
        start = first_row(w)
        return rescale[start : start + shard.shape[0]].view(-1, *([1] * (shard.dim() - 1)))

    def _select(self, magnitudes: Sequence[Tensor], sparsity: float) -> Selection:
        """Thresholds and tie masks for ``sparsity``: one selection over the scope, or one per N:M group
        (groups along the input dimension: a weight stored (in, out) is selected in its (out, in)
        view, and its thresholds and ties are stored back in its own layout)."""
        if self.config.scope != "nm":
            return select(magnitudes, sparsity, self.config.scope)
        views = [out_in(mag, transposed) for mag, transposed in zip(magnitudes, self._transposed)]
        selection = self._groups.select(views, prune_count(sparsity, self.config.m))
        return Selection(
            [_stored(t, transposed) for t, transposed in zip(selection.thresholds, self._transposed)],
            [_stored(t, transposed) for t, transposed in zip(selection.ties, self._transposed)],
        )

    def finalize(self) -> nn.Module:
        """Bake a * P_p(w; T) into plain weights, remove the parametrizations, return the model.

        A shared weight is baked once (by its first layer); its other layers get it back as is.
        Thresholds left from an earlier step (``update_every`` > 1) are first recomputed for s(t).
        """
        self._check_attached()
        if not self.fixed and self._step % self.config.update_every:
            self._reselect(self.schedule.sparsity_at(self._step))
        for hook in self._hooks:
            hook.remove()
        group = shard_group(self._weights, self.names)
        if group is not None:
            if not self.fixed:
                self._bake_shards(group)
            for module in self._modules:
                unparametrize(self.model, module)
            self._finalized = True
            return self.model
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
        mid-schedule, with the settings they belong to. Under FSDP the same on every rank, whatever
        their number (for ``torch.distributed.checkpoint``): the ties as ``{"value", "end"}`` (the
        tie value and the end of the pruned ties in the full weight's flat order), no rescales or
        masks (the forward computes the rescale; the fixed phase keeps the pruned weights at 0)."""
        sharded = self._params[0].sharded
        return {
            "method": self.name,
            "settings": self._settings(),
            "step": self._step,
            "layers": list(self.names),
            "thresholds": [_copy(param.threshold) for param in self._params],
            "ties": [_span_of(param) if sharded else None if param.ties is None else param.ties.clone()
                     for param in self._params],
            "rescale": [None if sharded or param.rescale is None else param.rescale.clone() for param in self._params],
            "masks": [None if sharded or param.mask is None else param.mask.clone() for param in self._params],
        }

    def _check_model(self, state: Mapping[str, Any]) -> None:
        if list(state["layers"]) != self.names:
            raise ValueError(f"this state is for layers {list(state['layers'])[:3]}...; allowed: a state of "
                             f"method {self.name!r} on the same layers.")

    def _settings(self) -> dict[str, Any]:
        """What a saved state must agree on: the target, the schedule's steps and every knob."""
        return {"sparsity": self.schedule.final, "total_steps": self.total_steps, "fix_step": self.fix_step,
                **{k: v for k, v in dataclasses.asdict(self.config).items() if k not in _unsaved_knobs(self.config)},
                "start": self.schedule.start if hasattr(self.schedule, "start") else None,
                "end": self.schedule.end if hasattr(self.schedule, "end") else None}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a state saved by :meth:`state_dict` on the same model and method; a state that
        does not fit (not a mapping: TypeError; other method, layers, settings, shapes, a missing
        entry, a non-finite threshold: ValueError) is refused naming what differs."""
        self._check_attached()
        self._check_state(state)
        thresholds = [t if isinstance(t, Tensor) else float(t) for t in state["thresholds"]]
        if not all(bool(torch.isfinite(torch.as_tensor(t)).all()) for t in thresholds):
            raise ValueError("the saved state holds a NaN or infinite threshold; allowed: finite thresholds.")
        for key in ("thresholds", "ties", "rescale", "masks"):
            for name, w, value in zip(self.names, self._weights, state[key]):
                if isinstance(value, Tensor) and key != "rescale" and value.shape != w.shape:
                    raise ValueError(f"the saved {key} of layer {name!r} has shape {tuple(value.shape)}; "
                                     f"allowed: the weight's {tuple(w.shape)}.")
        self._step = int(state["step"])
        weights = self._weights
        group = shard_group(weights, self.names)
        if group is not None:
            self._load_sharded(thresholds, state["ties"], weights, group)
            return
        fixed = self.fix_step is not None and self._step >= self.fix_step
        for param, w, threshold, ties, rescale, mask in zip(
            self._params, weights, thresholds, state["ties"], state["rescale"], state["masks"]
        ):
            if isinstance(ties, Mapping):  # saved under FSDP
                ties = _span_mask(param.magnitude(w), ties["value"], ties["end"], 0)
            param.choose(threshold.to(w.device, w.dtype) if isinstance(threshold, Tensor) else threshold,
                         None if ties is None else ties.to(w.device).bool(), w)
            param.rescale = None if rescale is None else rescale.to(w.device)
            param.mask = None if mask is None else mask.to(w.device).bool()
            if fixed and param.mask is None:  # saved under FSDP: the pruned weights are zeros
                param.mask = w != 0
        if self.config.rescale and not fixed and self._params[0].rescale is None:
            self._rescale_all()

    @torch.no_grad()
    def _rescale_all(self) -> None:
        """ST-3's rescale of every weight from its current thresholds and ties."""
        for param, w, transposed in zip(self._params, self._weights, self._transposed):
            kept = kept_mask(param.normalised(w), param.threshold, param.ties)
            param.rescale = out_in(st3_rescale(out_in(w.abs(), transposed), out_in(kept, transposed)), transposed)

    @torch.no_grad()
    def _load_sharded(self, thresholds: Sequence[Threshold], ties: Sequence[Any], weights: Sequence[Tensor],
                      group: dist.ProcessGroup) -> None:
        """:meth:`load_state_dict` on sharded weights (from a state saved under FSDP on any number of
        ranks, or without FSDP)."""
        shards = [local_shard(w) for w in weights]
        for param, transposed in zip(self._params, self._transposed):
            param.sharded, param.transposed, param.rescaled = True, transposed, self.config.rescale
        if self.fix_step is not None and self._step >= self.fix_step:
            for param, shard in zip(self._params, shards):
                param.frozen, param.shard_mask = True, shard != 0
            return
        if self.config.scope == "nm":
            self._reselect_sharded(self.target, weights, group)  # the groups follow the weights
            return
        local: list[Tensor | None] = []
        for param, w, shard, saved in zip(self._params, weights, shards, ties):
            start = first_row(w) * (w.numel() // max(w.shape[0], 1))
            if isinstance(saved, Mapping):
                local.append(_span_mask(param.normalised(shard).abs(), saved["value"], saved["end"], start))
            elif saved is not None:  # a full mask, saved without FSDP
                rows = saved.reshape(-1)[start : start + shard.numel()].view(shard.shape).to(shard.device).bool()
                local.append(rows if rows.any() else None)
            else:
                local.append(None)
        magnitudes = [param.normalised(shard).abs() for param, shard in zip(self._params, shards)]
        for param, shard, threshold, mask, span in zip(self._params, shards, thresholds, local,
                                                       self._spans(magnitudes, local, weights, group)[0]):
            param.choose(threshold, mask, shard, span)


def _unsaved_knobs(config: MethodConfig) -> tuple[str, ...]:
    """Knobs a saved state does not record: the schedule's bounds (recorded as steps) and
    ``update_every`` at its default (so states saved before the option existed still load)."""
    return ("start", "end", "fix_at") + (("update_every",) if config.update_every == 1 else ())


def _stored(value: Any, transposed: bool) -> Any:
    """A threshold or tie tensor of a weight's (out, in) view in the weight's own layout
    (contiguous, as broadcasts and checkpoints need); numbers and None as they are."""
    return out_in(value, transposed).contiguous() if isinstance(value, Tensor) and transposed else value


def _span_of(param: SparseWeight) -> dict[str, float | int] | None:
    """The pruned ties of a sharded weight as saved: the tie value and their end in flat order."""
    return None if int(param.tie_count) == 0 else {"value": float(param.tie_value), "end": int(param.tie_count)}


def _span_mask(magnitude: Tensor, value: float, end: int, start: int) -> Tensor | None:
    """The entries of ``magnitude`` (flat positions ``start``... of a full weight) equal to ``value``
    before position ``end``; None if there are none."""
    index = torch.arange(start, start + magnitude.numel(), device=magnitude.device).view(magnitude.shape)
    mask = (magnitude == value) & (index < end)
    return mask if bool(mask.any()) else None


def _copy(threshold: Threshold) -> Threshold:
    return threshold.clone() if isinstance(threshold, Tensor) else threshold


def _same_on_every_rank(selection: Selection, magnitudes: Sequence[Tensor]) -> Selection:
    """Under torch.distributed, every rank takes rank 0's thresholds and tie masks, so all masks
    agree (per-group threshold tensors are broadcast whole; every rank holds one for the same layers)."""
    if not (dist.is_available() and dist.is_initialized()):
        return selection
    device = torch.device("cuda") if dist.get_backend() == "nccl" else torch.device("cpu")
    has_ties = [float(t is not None) for t in selection.ties]
    numbers = [0.0 if isinstance(t, Tensor) else t for t in selection.thresholds]
    values = torch.tensor(numbers + has_ties, dtype=torch.float64, device=device)
    dist.broadcast(values, src=0)
    count = len(selection.thresholds)
    thresholds: list[Threshold] = []
    for number, local in zip(values[:count].tolist(), selection.thresholds):
        if isinstance(local, Tensor):
            dist.broadcast(local, src=0)
            thresholds.append(local)
        else:
            thresholds.append(number)
    ties: list[Tensor | None] = []
    for flag, local, mag in zip(values[count:].tolist(), selection.ties, magnitudes):
        if not flag:
            ties.append(None)
            continue
        buffer = (local if local is not None else torch.zeros_like(mag, dtype=torch.bool)).to(torch.uint8)
        dist.broadcast(buffer, src=0)
        ties.append(buffer.bool())
    return Selection(thresholds, ties)
