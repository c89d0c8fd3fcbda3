"""Operator values and straight-through gradients against hand-computed tensors."""

import math

import numpy as np
import pytest
import torch

from sparsetrain.operators import sparsify_ste, threshold_operator, validate_p

W = torch.tensor([-2.0, -0.5, 0.25, 1.0, 3.0])
T = 1.0  # |w| <= T is pruned: -0.5, 0.25 and 1.0 (a tie with T is pruned)
UPSTREAM = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])

EXPECTED = {
    1.0: [-1.0, 0.0, 0.0, 0.0, 2.0],
    3.0: [-(7.0 ** (1 / 3)), 0.0, 0.0, 0.0, 26.0 ** (1 / 3)],  # sign * (|w|^3 - 1)^(1/3)
    math.inf: [-2.0, 0.0, 0.0, 0.0, 3.0],
}


@pytest.mark.parametrize("p", sorted(EXPECTED))
def test_operator_values(p):
    out = threshold_operator(W, T, p)
    torch.testing.assert_close(out, torch.tensor(EXPECTED[p]), rtol=1e-6, atol=0)


@pytest.mark.parametrize("p", [*sorted(EXPECTED), 2.5])
@pytest.mark.parametrize("threshold", [T, torch.full_like(W, T)])
def test_operator_leaves_its_input_and_threshold_unchanged(p, threshold):
    w, before = W.clone(), threshold.clone() if isinstance(threshold, torch.Tensor) else threshold
    threshold_operator(w, threshold, p)  # it works in place on its own temporaries only
    assert torch.equal(w, W)
    assert torch.equal(torch.as_tensor(threshold), torch.as_tensor(before))


@pytest.mark.parametrize("p", sorted(EXPECTED))
def test_zero_threshold_is_identity(p):
    assert torch.equal(threshold_operator(W, 0.0, p), W)


@pytest.mark.parametrize("p", sorted(EXPECTED))
@pytest.mark.parametrize("theta", [0.0, 0.5, 1.0])
def test_straight_through_gradient_is_scaled_on_pruned_weights(p, theta):
    w = W.clone().requires_grad_(True)
    out = sparsify_ste(w, T, p, theta)
    (out * UPSTREAM).sum().backward()
    expected = torch.tensor([1.0, 2.0 * theta, 3.0 * theta, 4.0 * theta, 5.0])
    torch.testing.assert_close(w.grad, expected, rtol=0, atol=0)
    torch.testing.assert_close(out.detach(), torch.tensor(EXPECTED[p]), rtol=1e-6, atol=0)


def test_rescale_multiplies_forward_and_gradient_stays_straight_through():
    w = torch.tensor([[2.0, -0.5], [0.25, -3.0]], requires_grad=True)
    rescale = torch.tensor([[2.0], [0.5]])
    out = sparsify_ste(w, T, 1.0, 0.5, rescale)
    torch.testing.assert_close(out.detach(), torch.tensor([[2.0, 0.0], [0.0, -1.0]]))
    out.sum().backward()
    torch.testing.assert_close(w.grad, torch.tensor([[1.0, 0.5], [0.5, 1.0]]))


def test_p3_keeps_every_weight_above_threshold_nonzero():
    threshold = 0.3
    above = torch.nextafter(torch.full((1000,), threshold), torch.tensor(1.0))
    above = above * (1 + torch.arange(1000) * 1e-7)
    assert bool((threshold_operator(above, threshold, 3.0) > 0).all())


@pytest.mark.parametrize("bad", [0.5, 0.0, -1.0, float("nan")])
def test_invalid_p_is_rejected(bad):
    with pytest.raises(ValueError, match=r"p=.* allowed: a number >= 1 or inf"):
        validate_p(bad)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_p3_in_16_bits_keeps_every_weight_above_threshold_nonzero(dtype):
    gen = torch.Generator().manual_seed(0)
    w = (torch.randn(100_000, generator=gen) * 1e-2).to(dtype)
    threshold = w.abs().float().kthvalue(90_000).values.item()  # a magnitude of the weights, as the engine picks
    out = threshold_operator(w, threshold, 3.0)
    assert out.dtype == dtype
    assert int((out == 0).sum()) == int((w.abs() <= threshold).sum())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_p3_with_one_threshold_agrees_with_a_threshold_per_entry(dtype):
    # one T takes the signed soft threshold and the odd cube root; T per entry, |w| and then the sign
    w = torch.randn(10_000, generator=torch.Generator().manual_seed(0), dtype=dtype) * 0.1
    w[:4] = torch.tensor([0.08, -0.08, 0.0, -0.0], dtype=dtype)
    threshold = 0.08
    above = torch.nextafter(torch.full((4,), threshold, dtype=dtype), torch.tensor(1.0, dtype=dtype))
    w[4:8], w[8:12] = above, -above
    one, each = threshold_operator(w, threshold, 3.0), threshold_operator(w, torch.full_like(w, threshold), 3.0)
    assert torch.equal(one == 0, w.abs() <= threshold)
    assert torch.equal(one.sign(), torch.where(w.abs() > threshold, w.sign(), 0))
    torch.testing.assert_close(one, each, rtol=4 * torch.finfo(dtype).eps, atol=0)


@pytest.mark.parametrize("root", ["numpy", "newton", "pow"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_p3_is_the_same_through_every_cube_root(monkeypatch, root, dtype):
    # numpy's cbrt (where it is vectorized), Newton's steps (float32 elsewhere) or torch's pow: the same
    # zeros and signs, values within a few ulps
    import sparsetrain.operators as operators

    monkeypatch.setattr(operators, "NUMPY_CBRT_VECTORIZED", root == "numpy")
    if root == "pow":
        monkeypatch.setattr(operators, "cube_root_", lambda *args: pytest.fail("cube_root_ taken where pow was asked"))
        monkeypatch.setattr(operators, "_newton_cbrt", lambda x, p: False)
    newton_calls = []
    newton = operators.cube_root_
    if root == "newton":
        monkeypatch.setattr(operators, "cube_root_", lambda x, scratch=None: newton_calls.append(x.dtype) or newton(x, scratch))
    w = torch.randn(10_000, generator=torch.Generator().manual_seed(1), dtype=dtype) * 0.1
    threshold = 0.08
    w[:4] = torch.nextafter(torch.full((4,), threshold, dtype=dtype), torch.tensor(1.0, dtype=dtype)) * torch.tensor(
        [1.0, -1.0, 1.0, -1.0], dtype=dtype)
    out = threshold_operator(w, threshold, 3.0)
    wide = w.double()
    expected = wide.sign() * (wide.abs() ** 3 - threshold**3).clamp_min(0) ** (1 / 3)  # in float64
    assert torch.equal(out == 0, w.abs() <= threshold) and torch.equal(out.sign(), expected.sign().to(dtype))
    if dtype == torch.float32:  # against float64, away from T (where |w|^3 - T^3 loses digits)
        kept = w.abs() > 1.5 * threshold
        torch.testing.assert_close(out[kept], expected[kept].float(), rtol=4 * torch.finfo(dtype).eps, atol=0)
    torch.testing.assert_close(threshold_operator(W.to(dtype), T, 3.0), torch.tensor(EXPECTED[3.0], dtype=dtype),
                               rtol=4 * torch.finfo(dtype).eps, atol=0)
    assert bool(newton_calls) == (root == "newton" and dtype == torch.float32)  # Newton's steps take float32 only


def test_the_cube_root_by_newton_steps_is_within_about_two_ulps_and_zero_only_at_zero():
    from sparsetrain.operators import cube_root_

    exponents = torch.rand(1_000_000, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 72 - 36
    x = torch.cat([(10.0**exponents).float(), torch.tensor([0.0, 1.0, 8.0, 1e-36, 1e-40, 1e-45])])
    out = cube_root_(x.clone())
    exact = torch.from_numpy(np.cbrt(x.double().numpy()))
    assert torch.equal(out == 0, x == 0) and bool(torch.isfinite(out).all())
    normal = x >= 1e-36  # below, the first guess is taken of 1e-36: the root is too large, but not zero
    errors = (out.double() - exact).abs()[normal & (x > 0)] / exact[normal & (x > 0)] / torch.finfo(torch.float32).eps
    assert float(errors.max()) <= 2.2
    assert out[-6:-3].tolist() == [0.0, 1.0, 2.0]  # exact cubes


def test_tie_numbers_mark_the_first_count_entries_equal_to_the_value_as_numbers():
    from sparsetrain.operators import tie_numbers

    magnitude = torch.tensor([[0.5, 0.25, 0.5, 0.75], [0.5, 0.0, 0.5, 0.25]])
    value = torch.tensor(0.5)
    for count, expected in ((0, []), (1, [0]), (3, [0, 2]), (5, [0, 2, 4]), (8, [0, 2, 4, 6]), (100, [0, 2, 4, 6])):
        numbers = tie_numbers(magnitude, value, torch.tensor(count))
        assert numbers.dtype == magnitude.dtype and numbers.shape == magnitude.shape
        assert numbers.flatten().nonzero().flatten().tolist() == expected and set(numbers.unique().tolist()) <= {0.0, 1.0}


@pytest.mark.parametrize("p", [1.0, 3.0, math.inf])
def test_the_traced_operator_takes_its_masks_as_numbers_and_prunes_what_the_eager_one_does(p):
    # while torch.compile traces, 1 - E comes from min(sign(T - |w|) + 1, 1) and the ties are numbers
    gen = torch.Generator().manual_seed(0)
    w = ((torch.randn(64, 32, generator=gen) * 8).round() / 16).requires_grad_()  # many entries at T exactly
    threshold = torch.tensor(0.25)
    ties = torch.zeros(64, 32, dtype=torch.bool)
    ties[::3, ::5] = True
    eager = sparsify_ste(w, threshold, p, 0.5, None, ties, 1e-3)
    traced = torch.compile(lambda v: sparsify_ste(v, threshold, p, 0.5, None, ties.to(v.dtype), 1e-3), backend="eager")(w)
    assert torch.equal(traced == 0, eager == 0)
    torch.testing.assert_close(traced, eager, rtol=4 * torch.finfo(torch.float32).eps, atol=0)  # p = 3: pow traced
    grad = torch.randn(64, 32, generator=gen)
    (expected,) = torch.autograd.grad(eager, w, grad)
    (got,) = torch.autograd.grad(traced, w, grad)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
