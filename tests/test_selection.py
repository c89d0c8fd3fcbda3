"""Exact thresholds: the k-th smallest magnitude over one or many tensors."""

import pytest
import torch

from sparsetrain.selection import (
    _bracketed_kth,
    sample_stride,
    kth_smallest,
    layer_sigma,
    magnitude_threshold,
    prune_count,
    select_thresholds,
)


def reference_kth(values, k):
    return torch.cat([v.reshape(-1) for v in values]).sort().values[k - 1].item()


@pytest.mark.parametrize("sizes", [[10], [3, 7, 1], [300_000, 5, 123_457]])
@pytest.mark.parametrize("fraction", [0.0, 0.01, 0.5, 0.9, 0.99, 1.0])
def test_kth_smallest_is_exact(sizes, fraction):
    gen = torch.Generator().manual_seed(len(sizes))
    values = [torch.randn(n, generator=gen).abs() for n in sizes]
    n = sum(sizes)
    k = max(1, round(fraction * n))
    assert kth_smallest(values, k) == reference_kth(values, k)


def test_bracket_finds_random_data_without_fallback():
    gen = torch.Generator().manual_seed(0)
    values = [torch.rand(400_000, generator=gen), torch.rand(200_000, generator=gen)]
    k = 450_000
    assert _bracketed_kth([v.reshape(-1) for v in values], k, 600_000) == reference_kth(values, k)


def test_adversarial_layout_falls_back_to_exact_answer():
    # The strided sample only ever sees 1.0, so the bracket misses; the answer must stay exact.
    n = 600_000
    stride = sample_stride(n)
    values = torch.linspace(0.0, 0.5, n)
    values[stride // 2 :: stride] = 1.0
    k = 100_000
    assert _bracketed_kth([values], k, n) is None
    assert kth_smallest([values], k) == reference_kth([values], k)


def test_ties_give_the_tied_value():
    assert kth_smallest([torch.tensor([0.5, 0.5, 0.5, 1.0])], 2) == 0.5


def test_k_out_of_range_is_rejected():
    with pytest.raises(ValueError, match="k=5 is out of range"):
        kth_smallest([torch.ones(4)], 5)


def test_prune_count_and_zero_threshold():
    assert prune_count(0.9, 1000) == 900
    assert prune_count(0.99, 1234) == round(0.99 * 1234)
    assert magnitude_threshold([torch.ones(10)], 0.01) == 0.0  # round(0.1) = 0 weights pruned


def test_scopes():
    a = torch.tensor([1.0, 2.0, 3.0, 4.0])
    b = torch.tensor([10.0, 20.0, 30.0, 40.0])
    assert select_thresholds([a, b], 0.5, "global") == [4.0, 4.0]
    assert select_thresholds([a, b], 0.5, "layer") == [2.0, 20.0]
    assert select_thresholds([a, b], 0.5, "sigma") == [4.0, 4.0]  # the caller normalises


def test_layer_sigma():
    assert layer_sigma((64, 32, 3, 3)) == pytest.approx(1 / 102**0.5)
