"""The knobs of the unstructured engine (:class:`MethodConfig`) and the table of presets: each a
function from the final sparsity to a configuration (registered in :mod:`.presets`)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ...declare import Declared, Flag, option
from ...nm import NMPattern, as_pattern, validate_nm
from ...schedules import SCHEDULES, validate_sparsity
from ...selection import SCOPES

RESCALE_EPS = 1e-6
DEFAULT_SPARSITY = 0.9
ENGINE_SCOPES = (*SCOPES, "nm")
PER_LAYER = ("layer", "erk")  # scopes with a threshold per layer
SR_STE_DECAY = 2e-4  # lambda_w of Zhou et al. (2021)


@dataclass(frozen=True)
class MethodConfig(Declared):
    """Every knob of the engine. ``nm``: the N:M pattern ("N:M", (n, m) or an
    :class:`~sparsetrain.nm.NMPattern`, kept as the latter); the scope is "nm" exactly when it is set
    (a scope given beside it must be "global", the default, or "nm")."""

    p: float = option(help="exponent of the operator P_p (1: soft threshold, inf: hard threshold)", low=1.0,
                      infinite=True)
    theta: float = option(help="scale of the straight-through gradient of the pruned weights", low=0.0, high=1.0)
    scope: str = option("global", "where one threshold applies", kind=str, choices=ENGINE_SCOPES)
    rescale: bool = option(False, "ST-3's per-output-channel rescale of the kept weights", kind=bool)
    schedule: str = option("cubic", "the sparsity schedule s(t)", kind=str, choices=lambda: sorted(SCHEDULES))
    start: int | float = option(0, "first step of the schedule", unit="steps",
                                flag=Flag("t1", epochs=True, help="epoch at which pruning starts"))
    end: int | float = option(0.5, "last step of the schedule's ramp", unit="steps", flag=Flag(epochs=True))
    fix_at: int | float | None = option(None, "first step of the fixed-mask phase (None: none)", unit="steps",
                                        optional=True, flag=Flag(epochs=True))
    nm: NMPattern | None = option(None, "the N:M pattern (None: unstructured)", kind=object, parse=as_pattern,
                                  plain=str, optional=True)
    decay: float = option(0.0, "SR-STE's lambda_w: lambda_w * (1 - E) * w added to the pruned weights' gradient",
                          low=0.0)
    update_every: int = option(1, "optimizer steps between threshold updates", kind=int, low=1)

    def check(self) -> None:
        if self.nm is not None:
            if self.scope not in ("global", "nm"):
                raise ValueError(f"nm={str(self.nm)!r} applies to scope 'nm' only; allowed: leave nm unset for scope "
                                 f"{self.scope!r}.")
            object.__setattr__(self, "scope", "nm")
        elif self.scope == "nm":
            raise ValueError("scope='nm' needs a pattern; allowed: nm='N:M' (e.g. '2:4').")


KNOBS = tuple(f.name for f in dataclasses.fields(MethodConfig))
LEGACY_NM_KNOBS = ("n", "m")  # the pattern as two knobs, as earlier versions took it (and saved states record it)
NM_KNOBS = ("nm", "scope")  # set by the N:M presets' nm option

PRESETS: dict[str, Callable[[float], MethodConfig]] = {}


def nm_presets() -> list[str]:
    """The presets of scope "nm"."""
    return [name for name, preset in PRESETS.items() if preset(DEFAULT_SPARSITY).scope == "nm"]


def method_config(name: str, sparsity: float) -> MethodConfig:
    """The configuration of preset ``name`` for final sparsity ``sparsity``."""
    if name not in PRESETS:
        raise ValueError(f"unknown method {name!r}; known methods: {', '.join(PRESETS)}.")
    return PRESETS[name](sparsity)


def resolve_config(name: str, sparsity: float | None, knobs: dict[str, Any]) -> tuple[MethodConfig, float]:
    """Preset ``name`` with ``knobs`` applied, and its final sparsity: ``sparsity`` (None: 0.9),
    or for an N:M pattern 1 - N/M (a ``sparsity`` given must equal it). ``knobs`` may give the
    pattern as ``n`` and ``m`` (:func:`nm_knobs`)."""
    knobs = nm_knobs(method_config(name, DEFAULT_SPARSITY), knobs)
    probe = dataclasses.replace(method_config(name, DEFAULT_SPARSITY), **knobs)
    if knobs.get("scope", "nm") != "nm" and probe.nm is not None:  # "global" beside a pattern
        raise ValueError(f"scope={knobs['scope']!r} is not allowed with the {probe.nm} pattern of {name!r}; allowed: "
                         "leave scope unset, or nm=None.")
    if probe.nm is not None:
        n, m = probe.nm
        pattern = 1.0 - n / m
        if sparsity is not None and not math.isclose(sparsity, pattern):
            raise ValueError(f"sparsity={sparsity!r} does not match the {probe.nm} pattern; "
                             f"allowed: {pattern:g} (1 - N/M) or no sparsity.")
        sparsity = pattern
    elif sparsity is None:
        sparsity = DEFAULT_SPARSITY
    sparsity = validate_sparsity(sparsity)
    return dataclasses.replace(method_config(name, sparsity), **knobs), sparsity


def nm_knobs(preset: MethodConfig, knobs: dict[str, Any]) -> dict[str, Any]:
    """``knobs`` with the legacy ``n``/``m`` turned into ``nm`` (the one not given is the preset's;
    both None: no pattern). They set a pattern only where the scope is "nm": the preset's, or a
    ``scope="nm"`` given beside them."""
    if not any(k in knobs for k in LEGACY_NM_KNOBS):
        return knobs
    knobs = dict(knobs)
    old = preset.nm or (None, None)
    n, m = knobs.pop("n", old[0]), knobs.pop("m", old[1])
    if "nm" in knobs:
        raise ValueError(f"nm={knobs['nm']!r} and n={n!r}, m={m!r} give the pattern twice; allowed: nm='N:M' alone.")
    scope = knobs.get("scope", preset.scope)
    if scope == "nm":
        knobs["nm"] = validate_nm(n, m)
    elif n is not None or m is not None:
        raise ValueError(f"n={n!r}, m={m!r} apply to scope 'nm' only; allowed: leave them unset for scope {scope!r}.")
    else:
        knobs["nm"] = None
    return knobs


def unsaved_knobs(config: MethodConfig) -> tuple[str, ...]:
    """Knobs a saved state does not record: the schedule's bounds (recorded as steps) and
    ``update_every`` at its default (so states saved before the option existed still load)."""
    return ("start", "end", "fix_at") + (("update_every",) if config.update_every == 1 else ())
