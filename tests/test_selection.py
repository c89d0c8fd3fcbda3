"""Exact selection: the k-th smallest magnitude, and exactly k pruned even when magnitudes tie."""

import pytest
import torch

from sparsetrain import selection as sel
from sparsetrain.selection import (
    _NUMPY,
    _TORCH,
    Selection,
    _bracketed,
    _split_numpy,
    erk_counts,
    kth_smallest,
    layer_sigma,
    prune_count,
    sample_stride,
    select,
)

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


def reference_kth(values, k):
    return torch.cat([v.reshape(-1) for v in values]).sort().values[k - 1].item()


def pruned_masks(magnitudes, selection):
    """What the operator prunes: |m| <= threshold, plus the tie masks."""
    masks = [m <= t for m, t in zip(magnitudes, selection.thresholds)]
    return [mask if ties is None else mask | ties for mask, ties in zip(masks, selection.ties)]


@pytest.fixture(params=["numpy", "torch"])
def engine(request, monkeypatch):
    """Select through numpy (the CPU path) or through torch (the path of every other device)."""
    if request.param == "torch":
        monkeypatch.setattr(sel, "_FLOATS", ())
    return request.param


def grid_magnitudes(sizes, dtype, seed=0):
    """Magnitudes on a 1/16 grid: every value ties with thousands of others."""
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randint(1, 33, (n,), generator=gen) / 16).to(dtype) for n in sizes]


# -- the k-th smallest ---------------------------------------------------------------------


@pytest.mark.parametrize("sizes", [[10], [3, 7, 1], [300_000, 5, 123_457]])
@pytest.mark.parametrize("fraction", [0.0, 0.01, 0.5, 0.9, 0.99, 1.0])
def test_kth_smallest_is_exact(sizes, fraction):
    gen = torch.Generator().manual_seed(len(sizes))
    values = [torch.randn(n, generator=gen).abs() for n in sizes]
    n = sum(sizes)
    k = max(1, round(fraction * n))
    assert kth_smallest(values, k) == reference_kth(values, k)


@pytest.mark.parametrize("ops", [_NUMPY, _TORCH], ids=["numpy", "torch"])
def test_bracket_finds_random_data_without_fallback(ops):
    gen = torch.Generator().manual_seed(0)
    values = [torch.rand(400_000, generator=gen), torch.rand(200_000, generator=gen)]
    arrays = [v.numpy() for v in values] if ops is _NUMPY else values
    k = 450_000
    found = _bracketed(arrays, k, 600_000, ops)
    flat = torch.cat(values)
    expected = reference_kth(values, k)
    previous = float(flat[flat < expected].max())  # the largest value below: inside the bracket here
    assert found == (expected, int((flat < expected).sum()), int((flat <= expected).sum()), previous)


@pytest.mark.parametrize("ops", [_NUMPY, _TORCH], ids=["numpy", "torch"])
def test_adversarial_layout_falls_back_to_exact_answer(ops):
    # The strided sample only ever sees 1.0, so the bracket misses; the answer must stay exact.
    n = 600_000
    stride = sample_stride(n)
    values = torch.linspace(0.0, 0.5, n)
    values[stride // 2 :: stride] = 1.0
    k = 100_000
    assert _bracketed([values.numpy()] if ops is _NUMPY else [values], k, n, ops) is None
    assert kth_smallest([values], k) == reference_kth([values], k)


def test_split_counts_and_gathers_exactly_in_chunks(monkeypatch):
    monkeypatch.setattr(sel, "_CHUNK", 1 << 10)  # 74 chunks, the last ones partial
    gen = torch.Generator().manual_seed(3)
    values = [torch.rand(50_000, generator=gen), torch.rand(7, generator=gen), torch.rand(25_555, generator=gen)]
    flat = torch.cat(values)
    lo, hi = flat[17].item(), flat[17].item() + 0.01
    below, inside = _split_numpy([v.numpy() for v in values], lo, hi)
    assert below == int((flat < lo).sum())
    assert inside.tolist() == flat[(flat >= lo) & (flat <= hi)].tolist()  # in order


@pytest.mark.parametrize("dtype", DTYPES)
def test_kth_smallest_keeps_the_dtype_exact(dtype):
    values = grid_magnitudes([200_000, 70_000], dtype)
    for k in (1, 12_345, 135_000, 269_999):
        assert kth_smallest(values, k) == reference_kth(values, k)


def test_ties_give_the_tied_value():
    assert kth_smallest([torch.tensor([0.5, 0.5, 0.5, 1.0])], 2) == 0.5


@pytest.mark.parametrize("tied", [2, 60_000], ids=["one-pair", "a-block-wider-than-the-bracket"])
def test_a_tie_at_the_kth_position_gives_the_largest_magnitude_below_it(tied):
    """Past the direct limit: the threshold below a tie straddling position k is read from the
    bracket when it holds it, and found by a second search when the tie fills the bracket."""
    gen = torch.Generator().manual_seed(3)
    low, high = torch.rand(100_000, generator=gen) * 0.5, 0.5 + torch.rand(100_000, generator=gen) * 0.5
    values = [low, torch.full((tied,), 0.5), high]
    k = 100_000 + tied // 2
    selection = select(values, k / (200_000 + tied), "global")
    assert selection.thresholds == [low.max().item()] * 3
    assert sum(int(t.sum()) for t in selection.ties if t is not None) == tied // 2


def test_k_out_of_range_is_rejected():
    with pytest.raises(ValueError, match="k=5 is out of range"):
        kth_smallest([torch.ones(4)], 5)


def test_prune_count_and_zero_threshold():
    assert prune_count(0.9, 1000) == 900
    assert prune_count(0.99, 1234) == round(0.99 * 1234)
    assert select([torch.ones(10)], 0.01, "global").thresholds == [0.0]  # round(0.1) = 0 weights pruned


def test_scopes():
    a = torch.tensor([1.0, 2.0, 3.0, 4.0])
    b = torch.tensor([10.0, 20.0, 30.0, 40.0])
    assert select([a, b], 0.5, "global").thresholds == [4.0, 4.0]
    assert select([a, b], 0.5, "layer").thresholds == [2.0, 20.0]
    assert select([a, b], 0.5, "sigma").thresholds == [4.0, 4.0]  # the caller normalises


def test_layer_sigma():
    assert layer_sigma((64, 32, 3, 3)) == pytest.approx(1 / 102**0.5)


# -- select: exactly k pruned --------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.usefixtures("engine")
def test_a_tie_group_across_two_layers_is_cut_in_layer_then_flat_order(dtype):
    # k = 4 of 8; sorted: 0.125, 0.25 x 4, 0.5, 0.75, 1. v = 0.25 with one value below it,
    # so the threshold drops to 0.125 and the first 3 of the four 0.25s are pruned.
    a = torch.tensor([0.5, 0.25, 0.125, 0.25], dtype=dtype)
    b = torch.tensor([[0.25, 1.0], [0.25, 0.75]], dtype=dtype)
    selection = select([a, b], 0.5, "global")
    assert selection.thresholds == [0.125, 0.125]
    assert selection.ties[0].tolist() == [False, True, False, True]
    assert selection.ties[1].tolist() == [[True, False], [False, False]]
    assert [m.tolist() for m in pruned_masks([a, b], selection)] == [
        [False, True, True, True],
        [[True, False], [False, False]],
    ]


def test_ties_follow_the_logical_row_major_order_of_a_strided_layer():
    a = torch.tensor([[0.25, 0.5], [0.25, 0.25]]).t()  # [[0.25, 0.25], [0.5, 0.25]]
    selection = select([a], 0.5, "global")  # k = 2 of three 0.25s, none below them
    assert selection.thresholds == [0.0]
    assert selection.ties[0].tolist() == [[True, True], [False, False]]


def test_tie_masks_only_where_a_pruned_tie_lies():
    a = torch.tensor([0.25, 0.25, 0.5])
    b = torch.tensor([0.75, 0.25])
    c = torch.tensor([0.25, 0.125])
    selection = select([a, b, c], 0.4, "global")  # k = 3: 0.125 and the first two 0.25s (in a)
    assert selection.thresholds == [0.125] * 3
    assert selection.ties[0].tolist() == [True, True, False]
    assert selection.ties[1] is None and selection.ties[2] is None


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("sparsity", [0.05, 0.3, 0.5, 0.9, 0.99, 1.0])
@pytest.mark.usefixtures("engine")
def test_exactly_k_pruned_on_a_grid(dtype, sparsity):
    magnitudes = grid_magnitudes([150_000, 7, 60_000, 1_000], dtype)
    n = sum(m.numel() for m in magnitudes)
    k = prune_count(sparsity, n)
    selection = select(magnitudes, sparsity, "global")
    assert (selection.ties == [None] * 4) == (k == n)  # the grid ties at v unless all are pruned
    masks = pruned_masks(magnitudes, selection)
    assert sum(int(mask.sum()) for mask in masks) == k
    v = reference_kth(magnitudes, k)
    for m, mask in zip(magnitudes, masks):
        assert bool(mask[m < v].all()) and not bool(mask[m > v].any())
    none = [torch.zeros(m.numel(), dtype=torch.bool) for m in magnitudes]
    ties = torch.cat([n if t is None else t.reshape(-1) for n, t in zip(none, selection.ties)])
    tied = torch.cat(magnitudes) == v
    chosen = ties[tied]  # the ties pruned must be the first ones in layer, then flat, order
    assert not bool((ties & ~tied).any())
    assert chosen.tolist() == sorted(chosen.tolist(), reverse=True)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.usefixtures("engine")
def test_layer_scope_prunes_exactly_k_in_each_layer(dtype):
    magnitudes = grid_magnitudes([100_000, 30, 5_000], dtype, seed=1)
    selection = select(magnitudes, 0.7, "layer")
    for m, mask in zip(magnitudes, pruned_masks(magnitudes, selection)):
        assert int(mask.sum()) == prune_count(0.7, m.numel())


@pytest.mark.parametrize("scope", ["global", "layer", "sigma"])
def test_without_ties_the_threshold_is_the_kth_smallest(scope):
    gen = torch.Generator().manual_seed(2)
    magnitudes = [torch.rand(n, generator=gen, dtype=torch.float64) for n in (50_000, 333, 20_000)]
    selection = select(magnitudes, 0.8, scope)
    assert selection.ties == [None, None, None]
    groups = [[m] for m in magnitudes] if scope == "layer" else [magnitudes] * 3
    expected = [reference_kth(g, prune_count(0.8, sum(m.numel() for m in g))) for g in groups]
    assert selection.thresholds == expected


def test_erk_counts_by_hand():
    # (4, 2): N 8, score 6/8; (10, 10): N 100, score 20/100. s = 0.5 keeps 54: eps = 54 / 26 gives the
    # first layer a density 1.56 >= 1, so it stays dense and eps = (54 - 8) / 20 = 2.3 keeps 46 of the second.
    assert erk_counts([(4, 2), (10, 10)], 0.5) == [0, 54]
    # (3, 3): score 6/9; (5, 5): score 10/25. s = 0.9 of 34 prunes 31, keeps 3: eps = 3 / 16 keeps 1.125 and
    # 1.875; floors 1 + 1, the one left to the larger remainder (the second layer).
    assert erk_counts([(3, 3), (5, 5)], 0.9) == [8, 23]
    assert erk_counts([(3, 3), (5, 5)], 0.0) == [0, 0]
    assert erk_counts([(3, 3), (5, 5)], 1.0) == [9, 25]


@pytest.mark.parametrize("sparsity", [0.3, 0.9, 0.98, 0.999])
def test_erk_scope_prunes_exactly_k_overall_and_its_counts_per_layer(sparsity):
    shapes = [(16, 3, 3, 3), (16, 16, 3, 3), (64, 32, 3, 3), (64, 64, 3, 3), (10, 64)]
    gen = torch.Generator().manual_seed(3)
    magnitudes = [torch.rand(shape, generator=gen) for shape in shapes]
    counts = erk_counts(shapes, sparsity)
    total = sum(m.numel() for m in magnitudes)
    assert sum(counts) == prune_count(sparsity, total)
    assert all(0 <= k <= m.numel() for k, m in zip(counts, magnitudes))
    densities = [1 - k / m.numel() for k, m in zip(counts, magnitudes)]
    assert densities[0] >= densities[1] >= densities[3]  # fewer inputs and outputs: denser
    masks = pruned_masks(magnitudes, select(magnitudes, sparsity, "erk"))
    assert [int(mask.sum()) for mask in masks] == counts


def test_zero_sparsity_prunes_nothing():
    magnitudes = grid_magnitudes([1_000, 40], torch.float32)
    assert select(magnitudes, 0.0, "global") == Selection([0.0, 0.0], [None, None])
    assert select(magnitudes, 0.0, "layer") == Selection([0.0, 0.0], [None, None])
    assert not any(bool(mask.any()) for mask in pruned_masks(magnitudes, select(magnitudes, 0.0, "global")))


def test_more_zeros_than_k_are_all_at_threshold_zero():
    a = torch.tensor([0.0, 0.5, 0.0, 0.0])
    selection = select([a], 0.5, "global")  # k = 2 < 3 zeros: the ties pick the first two
    assert selection.thresholds == [0.0]
    assert selection.ties[0].tolist() == [True, False, True, False]


def test_bad_sparsity_is_rejected():
    with pytest.raises(ValueError, match=r"sparsity=1.5 is out of range; allowed: a number in \[0, 1\]"):
        select([torch.ones(4)], 1.5, "global")
    with pytest.raises(ValueError, match="unknown scope 'model'"):
        select([torch.ones(4)], 0.5, "model")
