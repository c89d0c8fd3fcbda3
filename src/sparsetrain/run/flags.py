"""Method flags: the command-line flags and config-file keys of the options that the registered
methods declare (:mod:`sparsetrain.declare`), built from those declarations.

A flag reaches one option of every method that declares it (``--sparsity``: the unstructured
presets' ``sparsity``; ``--t1``: their ``start``). Its value is given in the flag's units: a flag
in epochs becomes round(value * steps per epoch) steps, then the flag's offset is added (``--pthres``
N is ``min_size`` N + 1). ``--method-arg KEY=VALUE`` sets any option in the method's own units.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ..declare import Axis, Flag, Option, declared
from ..methods import list_methods, method_spec


@dataclass(frozen=True)
class MethodFlag:
    """One flag: its key (``--key-with-dashes`` on the command line), the declaration it comes from
    (the option and its :class:`~sparsetrain.declare.Flag`: aliases, units), what it says in ``--help``,
    and the options it sets (method -> option name)."""

    key: str
    option: Option
    flag: Flag
    help: str
    takes: dict[str, str] = field(default_factory=dict)

    @property
    def aliases(self) -> tuple[str, ...]:
        return self.flag.aliases

    @property
    def epochs(self) -> bool:
        """Whether the flag counts epochs (the option: steps)."""
        return self.flag.epochs

    @property
    def offset(self) -> int:
        return self.flag.offset

    def to_option(self, value: Any, steps_per_epoch: int) -> Any:
        """The option's value for the flag's ``value``."""
        return self.flag.to_option(value, steps_per_epoch)

    @property
    def axis(self) -> Axis | None:
        """The grid axis of ``bench`` this flag's option is (None: not one)."""
        return self.option.axis

    @property
    def kind(self) -> type:
        """The type of the flag's value on the command line (object: a JSON value or a text)."""
        if self.epochs:
            return float
        return self.option.kind if self.option.kind in (bool, int, float, str) else object


def method_flags() -> dict[str, MethodFlag]:
    """Every flag of the registered methods, by key, in registration order. Two methods that
    declare one key must agree on its units."""
    flags: dict[str, MethodFlag] = {}
    for method in list_methods():
        for name, spec, _ in declared(method_spec(method).options):
            if spec.flag is None:
                continue
            key = spec.flag.name or name
            flag = flags.setdefault(key, MethodFlag(key, spec, spec.flag, spec.flag.help or spec.help))
            if (flag.epochs, flag.offset, flag.aliases) != (spec.flag.epochs, spec.flag.offset, spec.flag.aliases):
                first = next(iter(flag.takes))
                raise ValueError(f"flag --{key.replace('_', '-')} of method {method!r} differs from that of {first!r} "
                                 "in its units or aliases; allowed: one meaning per flag.")
            flag.takes[method] = name
    return flags


def flag_names(flags: Mapping[str, MethodFlag]) -> dict[str, str]:
    """Every key and alias (as config keys: with underscores) -> the flag's key."""
    return {name: key for key, flag in flags.items() for name in (key, *flag.aliases)}
