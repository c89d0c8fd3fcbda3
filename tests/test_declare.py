"""Declared options: one style of message, bounds, units, choices, parsing, and flags in epochs."""

import math
from dataclasses import dataclass

import pytest

from sparsetrain.declare import Axis, Declared, Flag, Option, declared, option


@dataclass(frozen=True)
class Toy(Declared):
    rate: float = option(0.5, "a rate", low=0.0, high=1.0, high_open=True)
    count: int = option(3, "a count", kind=int, low=1)
    p: float = option(3.0, "an exponent", low=1.0, infinite=True)
    every: int | float = option(0.25, "a period", kind=float, unit="steps", low=1, flag=Flag(epochs=True))
    start: int | float = option(0, "a start", kind=float, unit="steps")
    scope: str = option("global", "a scope", kind=str, choices=("global", "layer"))
    on: bool = option(False, "a switch", kind=bool)
    names: tuple | None = option(None, "patterns", kind=tuple, optional=True)
    pair: tuple | None = option(None, "a pair", kind=object, optional=True, parse=lambda v: tuple(int(x) for x in v.split(":")),
                                plain=lambda v: f"{v[0]}:{v[1]}")
    size: float = option(0.9, "a size", axis=Axis("sizes", "z", (0.9,)))

    def check(self) -> None:
        if self.start and self.every and isinstance(self.start, int) and isinstance(self.every, int) and self.start > self.every:
            raise ValueError(f"start={self.start} and every={self.every} are not allowed; allowed: start <= every.")


@pytest.mark.parametrize(("name", "value", "allowed"), [
    ("rate", 1.0, "a number in [0, 1)"),
    ("rate", True, "a number in [0, 1)"),
    ("rate", math.nan, "a number in [0, 1)"),
    ("count", 0, "an int >= 1"),
    ("count", 2.0, "an int >= 1"),
    ("count", 2**31, "an int >= 1"),
    ("p", 0.5, "a number >= 1 or inf"),
    ("p", -math.inf, "a number >= 1 or inf"),
    ("every", 0, "an int number of steps >= 1 or a float fraction of training in (0, 1]"),
    ("every", 0.0, "an int number of steps >= 1 or a float fraction of training in (0, 1]"),
    ("start", 1.5, "an int number of steps >= 0 or a float fraction of training in [0, 1]"),
    ("on", 1, "true or false"),
    ("names", "a*", "a list of str, or None"),
])
def test_a_value_out_of_bounds_is_refused_in_one_style(name, value, allowed):
    with pytest.raises(ValueError) as error:
        Toy(**{name: value})
    assert str(error.value).endswith(f"is not allowed; allowed: {allowed}.")
    assert str(error.value).startswith(f"{name}=")


def test_choices_name_the_known_values():
    with pytest.raises(ValueError, match=r"^unknown scope 'local'; known scopes: global, layer\.$"):
        Toy(scope="local")


def test_values_are_parsed_once_and_shown_plainly():
    toy = Toy(p=math.inf, every=4, start=0.5, names=["a*", "b"], pair="2:4")
    assert (toy.p, toy.every, toy.start, toy.names, toy.pair) == (math.inf, 4, 0.5, ("a*", "b"), (2, 4))
    pair = dict((n, s) for n, s, _ in declared(Toy))["pair"]
    assert pair.shown_value(toy.pair) == "2:4" and toy.values()["pair"] == (2, 4) and pair.shown_value(None) is None


def test_rules_between_options_run_after_each_option():
    with pytest.raises(ValueError, match="allowed: start <= every"):
        Toy(start=5, every=4)


def test_declared_lists_every_option_in_order_with_its_default():
    names = [name for name, _, _ in declared(Toy)]
    assert names == ["rate", "count", "p", "every", "start", "scope", "on", "names", "pair", "size"]
    spec = dict((n, s) for n, s, _ in declared(Toy))
    assert spec["size"].axis == Axis("sizes", "z", (0.9,)) and spec["rate"].axis is None


def test_a_flag_in_epochs_becomes_steps():
    assert Flag(epochs=True).to_option(2.5, 40) == 100
    assert Flag(offset=1).to_option(0, 40) == 1
    assert Flag().to_option(None, 40) is None


def test_an_unknown_unit_is_refused():
    with pytest.raises(ValueError, match="unit='days' is not allowed"):
        Option("x", unit="days")
