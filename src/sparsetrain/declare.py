"""Declared options: each option of a method stated once, as a dataclass field whose metadata holds
an :class:`Option` (its kind, bounds or choices, unit, help, command-line flag and aliases, and
whether ``bench`` varies it), checked in one style:

    NAME=VALUE is not allowed; allowed: WHAT IS ALLOWED.
    unknown NAME VALUE; known NAMEs: CHOICES.

An options class derives from :class:`Declared` and declares its fields with :func:`option`; every
value is checked (and parsed, where the option says how) when the class is built, then the rules
between options (:meth:`Declared.check`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from .messages import shown

OPTION = "sparsetrain.option"  # the key of an Option in a dataclass field's metadata
UNITS = ("steps", "fraction")
MAX_INT = 2**31 - 1  # what a C int holds


@dataclass(frozen=True)
class Flag:
    """How the command line and a config file set an option: the key (None: the option's name; on
    the command line ``--key-with-dashes``) and its aliases; ``epochs``: the flag counts epochs and
    the option steps, option = round(value * steps per epoch); ``offset`` added to the value after
    that (e.g. ``--pthres`` = ``min_size`` - 1); ``help`` (None: the option's)."""

    name: str | None = None
    aliases: tuple[str, ...] = ()
    epochs: bool = False
    offset: int = 0
    help: str | None = None

    def to_option(self, value: Any, steps_per_epoch: int) -> Any:
        """The option's value from the flag's."""
        if value is None:
            return None
        if self.epochs:
            value = round(value * steps_per_epoch)
        return value + self.offset if self.offset else value


@dataclass(frozen=True)
class Axis:
    """The option is a grid axis of ``bench``: its values come from ``--FLAG`` (comma-separated),
    ``short`` names the value in cell names (feather-s0.9-seed0), ``default`` the values by default."""

    flag: str
    short: str
    default: tuple[Any, ...]


@dataclass(frozen=True)
class Option:
    """What one option accepts and how it is reached.

    ``kind``: bool, int, float (any finite number; +inf too if ``infinite``), str, tuple (a list of
    ``item``), or object (whatever ``parse`` accepts). ``low``/``high`` bound numbers (open ends with
    ``low_open``/``high_open``). ``unit`` "steps": an int number of steps >= ``low`` (default 0) or a
    float fraction of training in [0, 1] ((0, 1] when ``low`` >= 1); "fraction": a float in the bounds.
    ``choices``: the allowed texts (or a function giving them). ``optional``: None allowed (the
    method's own value). ``parse`` turns a value into the option's type (raising ValueError);
    ``plain`` turns it back into what JSON and the command line show. ``allowed`` replaces the
    generated "allowed: ..." text. ``flag`` None: reached through ``--method-arg`` only."""

    help: str
    kind: type = float
    item: type = str
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    infinite: bool = False
    unit: str | None = None
    choices: Sequence[str] | Callable[[], Sequence[str]] | None = None
    optional: bool = False
    parse: Callable[[Any], Any] | None = None
    plain: Callable[[Any], Any] | None = None
    allowed: str | None = None
    flag: Flag | None = Flag()
    axis: Axis | None = None

    def __post_init__(self) -> None:
        if self.unit is not None and self.unit not in UNITS:
            raise ValueError(f"unit={self.unit!r} is not allowed; allowed: {', '.join(UNITS)} or None.")

    def known(self) -> list[str]:
        """The allowed texts of an option with choices."""
        return list(self.choices() if callable(self.choices) else self.choices or ())

    def check(self, name: str, value: Any) -> Any:
        """``value`` as the option holds it; ValueError in the one style when it is not allowed."""
        if value is None and self.optional:
            return None
        if self.parse is not None and value is not None:
            return self.parse(value)
        if self.choices is not None:
            if not isinstance(value, str) or value not in self.known():
                raise ValueError(f"unknown {name} {shown(value)}; known {name}s: {', '.join(self.known())}.")
            return value
        if not self._fits(value):
            raise ValueError(f"{name}={shown(value)} is not allowed; allowed: {self.allowed_text()}.")
        if self.kind is tuple:
            return tuple(value)
        return float(value) if self.kind is float and self.unit != "steps" else value

    def _fits(self, value: Any) -> bool:
        if self.kind is bool or self.kind is str:
            return isinstance(value, self.kind)
        if self.kind is tuple:
            return isinstance(value, (list, tuple)) and all(isinstance(v, self.item) for v in value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        if self.unit == "steps":
            return self._in_steps(value)
        if self.kind is int:
            return isinstance(value, int) and self._in_bounds(value) and value <= MAX_INT
        if math.isnan(value) or math.isinf(value) and not (self.infinite and value > 0):
            return False
        return self._in_bounds(value)

    def _in_steps(self, value: int | float) -> bool:
        low = 0 if self.low is None else self.low
        if isinstance(value, int):
            return low <= value <= MAX_INT
        return (0.0 < value if low >= 1 else 0.0 <= value) and value <= 1.0

    def _in_bounds(self, value: float) -> bool:
        above = self.low is None or (value > self.low if self.low_open else value >= self.low)
        below = self.high is None or (value < self.high if self.high_open else value <= self.high)
        return above and below

    def allowed_text(self) -> str:
        """What the option accepts, in words."""
        if self.allowed is not None:
            return self.allowed
        if self.choices is not None:
            text = ", ".join(self.known())
        elif self.kind is bool:
            text = "true or false"
        elif self.kind is str:
            text = "a text"
        elif self.kind is tuple:
            text = f"a list of {self.item.__name__}"
        elif self.unit == "steps":
            low = 0 if self.low is None else self.low
            text = (f"an int number of steps >= {low:g} or a float fraction of training in "
                    f"{'(0, 1]' if low >= 1 else '[0, 1]'}")
        else:
            text = f"{'an int' if self.kind is int else 'a number'}{self._bounds_text()}"
        return f"{text}, or None" if self.optional else text

    def _bounds_text(self) -> str:
        if self.low is not None and self.high is not None:
            return f" in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"
        if self.low is not None:
            return f" {'>' if self.low_open else '>='} {self.low:g}" + (" or inf" if self.infinite else "")
        if self.high is not None:
            return f" {'<' if self.high_open else '<='} {self.high:g}"
        return ""

    def shown_value(self, value: Any) -> Any:
        """``value`` as JSON and the command line show it."""
        return self.plain(value) if self.plain is not None and value is not None else value


def option(default: Any = dataclasses.MISSING, help: str = "", **spec: Any) -> Any:
    """A dataclass field declaring an option (``spec``: the fields of :class:`Option`)."""
    return field(default=default, metadata={OPTION: Option(help, **spec)})


def overriding(cls: type, name: str) -> Any:
    """A dataclass field declaring option ``name`` of the options class ``cls`` again, optional,
    with default None: an override of ``cls``'s value (its help, bounds and flag kept)."""
    spec = next(spec for field_name, spec, _ in declared(cls) if field_name == name)
    return field(default=None, metadata={OPTION: dataclasses.replace(spec, optional=True)})


def declared(cls: type) -> list[tuple[str, Option, Any]]:
    """(name, option, default) of every declared field of the options class ``cls``, in order."""
    return [(f.name, f.metadata[OPTION], f.default) for f in dataclasses.fields(cls) if OPTION in f.metadata]


@dataclass(frozen=True)
class Declared:
    """Base of an options class: every field declared with :func:`option` is checked (and parsed)
    when the instance is built, then :meth:`check` applies the rules between options."""

    def __post_init__(self) -> None:
        for name, spec, _ in declared(type(self)):
            object.__setattr__(self, name, spec.check(name, getattr(self, name)))
        self.check()

    def check(self) -> None:
        """Rules between options (none by default)."""

    def values(self) -> dict[str, Any]:
        """{name: value} of every field, as held (no copy)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
