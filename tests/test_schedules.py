"""Schedule shapes at hand-computed points."""

import pytest

from sparsetrain.schedules import Constant, Cubic, Linear, make_schedule, resolve_step, validate_sparsity


def test_cubic_shape():
    s = Cubic(0.8, start=10, end=20)
    assert s.sparsity_at(0) == 0.0
    assert s.sparsity_at(10) == 0.0
    assert s.sparsity_at(15) == pytest.approx(0.8 - 0.8 * 0.5**3)  # 0.7
    assert s.sparsity_at(20) == 0.8
    assert s.sparsity_at(10_000) == 0.8
    values = [s.sparsity_at(t) for t in range(30)]
    assert values == sorted(values)


def test_linear_shape():
    s = Linear(0.8, start=10, end=20)
    assert [s.sparsity_at(t) for t in (9, 10, 15, 20, 25)] == pytest.approx([0.0, 0.0, 0.4, 0.8, 0.8])


def test_constant_and_zero_length_ramp():
    assert Constant(0.5).sparsity_at(0) == 0.5
    jump = Cubic(0.5, start=3, end=3)
    assert [jump.sparsity_at(t) for t in (2, 3, 4)] == [0.0, 0.5, 0.5]


def test_resolve_step_takes_ints_as_steps_and_floats_as_fractions():
    assert resolve_step(7, 100, "start") == 7
    assert resolve_step(0.5, 101, "end") == 50
    assert resolve_step(5 / 160, 1600, "start") == 50
    for bad in (1.5, -0.1, -3, "5", True):
        with pytest.raises(ValueError, match="start="):
            resolve_step(bad, 100, "start")


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5, float("nan"), "0.5"])
def test_sparsity_out_of_range_is_rejected(bad):
    with pytest.raises(ValueError, match=r"sparsity=.* allowed: a number in \[0, 1\)"):
        validate_sparsity(bad)


def test_bad_schedules_are_rejected():
    with pytest.raises(ValueError, match="known schedules: constant, cubic, linear"):
        make_schedule("exponential", 0.5)
    with pytest.raises(ValueError, match="out of order"):
        Cubic(0.5, start=10, end=5)
