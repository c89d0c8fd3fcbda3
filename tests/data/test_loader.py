"""BatchLoader: epochs are pure functions of (seed, epoch), full coverage, DDP shards."""

from __future__ import annotations

import pytest
import torch

from sparsetrain.data import BatchLoader, normalize

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


def make_loader(n: int = 10, batch_size: int = 3, **kwargs: object) -> BatchLoader:
    """A loader whose label is the sample index; image i is filled with pixel value i."""
    images = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 3, 4, 4).contiguous()
    return BatchLoader(images, torch.arange(n), batch_size, MEAN, STD, **kwargs)


def labels_of(loader: BatchLoader, epoch: int) -> list[int]:
    return [i for _, y in loader.batches(epoch) for i in y.tolist()]


def assert_same_batches(a: BatchLoader, b: BatchLoader, epoch: int) -> None:
    batches_a, batches_b = list(a.batches(epoch)), list(b.batches(epoch))
    assert len(batches_a) == len(batches_b)
    for (xa, ya), (xb, yb) in zip(batches_a, batches_b, strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_batches_are_normalised_images_of_their_labels() -> None:
    loader = make_loader(shuffle=True)
    for x, y in loader.batches(0):
        assert x.dtype == torch.float32 and x.shape == (len(y), 3, 4, 4) and y.dtype == torch.int64
        expected = normalize(y.to(torch.uint8).view(-1, 1, 1, 1).expand(-1, 3, 4, 4), MEAN, STD)
        assert torch.equal(x, expected)


@pytest.mark.parametrize("augment", [False, True])
def test_same_seed_and_epoch_same_batches(augment: bool) -> None:
    fresh = make_loader(n=40, batch_size=8, augment=augment, seed=3)
    used = make_loader(n=40, batch_size=8, augment=augment, seed=3)
    for epoch in range(3):  # a loader that ran earlier epochs holds no state that matters
        list(used.batches(epoch))
    assert_same_batches(fresh, used, 3)


def test_epoch_and_seed_change_the_order() -> None:
    loader = make_loader(n=40)
    assert labels_of(loader, 0) != labels_of(loader, 1)
    assert labels_of(loader, 0) != labels_of(make_loader(n=40, seed=1), 0)


def test_augmentation_changes_with_epoch() -> None:
    images = torch.randint(0, 256, (16, 3, 8, 8), dtype=torch.uint8)
    loader = BatchLoader(images, torch.arange(16), 16, MEAN, STD, shuffle=False, augment=True)
    (x0, y0), (x1, y1) = next(loader.batches(0)), next(loader.batches(1))
    assert torch.equal(y0, y1) and not torch.equal(x0, x1)
    assert not torch.equal(x0, normalize(images, MEAN, STD))


def test_every_sample_once_per_epoch() -> None:
    loader = make_loader(n=10, batch_size=3)
    assert len(loader) == 4
    assert [len(y) for _, y in loader.batches(0)] == [3, 3, 3, 1]
    assert sorted(labels_of(loader, 0)) == list(range(10))


def test_drop_last() -> None:
    loader = make_loader(n=10, batch_size=3, drop_last=True)
    assert len(loader) == 3
    assert [len(y) for _, y in loader.batches(0)] == [3, 3, 3]


def test_no_shuffle_keeps_order() -> None:
    assert labels_of(make_loader(shuffle=False), 5) == list(range(10))


def test_set_epoch_and_iteration() -> None:
    loader = make_loader(n=20)
    loader.set_epoch(4)
    assert [y.tolist() for _, y in loader] == [y.tolist() for _, y in loader.batches(4)]


def test_two_ranks_are_disjoint_and_complete() -> None:
    ranks = [make_loader(n=10, batch_size=2, rank=r, world_size=2, seed=9) for r in range(2)]
    shards = [labels_of(loader, 2) for loader in ranks]
    assert len(ranks[0]) == len(ranks[1]) == 3
    assert len(shards[0]) == len(shards[1]) == 5
    assert not set(shards[0]) & set(shards[1])
    assert sorted(shards[0] + shards[1]) == list(range(10))
    order = make_loader(n=10, seed=9).indices(2).tolist()  # shards interleave the common order
    assert shards[0] == order[0::2] and shards[1] == order[1::2]


@pytest.mark.parametrize(("drop_last", "per_rank"), [(False, 4), (True, 3)])
def test_uneven_shards_pad_or_drop(drop_last: bool, per_rank: int) -> None:
    ranks = [make_loader(n=11, batch_size=1, rank=r, world_size=3, drop_last=drop_last) for r in range(3)]
    shards = [labels_of(loader, 0) for loader in ranks]
    assert [len(s) for s in shards] == [per_rank] * 3
    assert len({len(loader) for loader in ranks}) == 1
    union = sorted(i for shard in shards for i in shard)
    if drop_last:
        assert len(set(union)) == 9 and len(union) == 9
    else:  # wrapped around: every sample, and one repeated
        assert set(union) == set(range(11)) and len(union) == 12


@pytest.mark.parametrize("world_size", [1, 2, 3])
@pytest.mark.parametrize("drop_last", [False, True])
@pytest.mark.parametrize("batch_size", [1, 4, 7, 50])
def test_len_counts_batches(world_size: int, drop_last: bool, batch_size: int) -> None:
    loader = make_loader(n=23, batch_size=batch_size, world_size=world_size, drop_last=drop_last)
    assert len(loader) == sum(1 for _ in loader.batches(0))


@pytest.mark.parametrize(
    "kwargs",
    [{"batch_size": 0}, {"rank": 2, "world_size": 2}, {"rank": -1}, {"seed": -1}],
)
def test_rejects_bad_arguments(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        make_loader(**kwargs)


def test_rejects_negative_epoch() -> None:
    with pytest.raises(ValueError, match="epoch must be >= 0"):
        make_loader().batches(-1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_batches_match_cpu() -> None:
    images = torch.randint(0, 256, (50, 3, 32, 32), dtype=torch.uint8)
    kwargs = {"augment": True, "seed": 2}
    cpu = BatchLoader(images, torch.arange(50), 16, MEAN, STD, **kwargs)
    cuda = BatchLoader(images, torch.arange(50), 16, MEAN, STD, device="cuda", **kwargs)
    for (xc, yc), (xg, yg) in zip(cpu.batches(1), cuda.batches(1), strict=True):
        assert xg.is_cuda and torch.equal(yg.cpu(), yc)
        torch.testing.assert_close(xg.cpu(), xc, rtol=0, atol=1e-6)
