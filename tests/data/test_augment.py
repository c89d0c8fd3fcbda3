"""Batched random crop + flip and normalisation: exact values, determinism, devices."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sparsetrain.data import normalize, random_crop_flip


def images(n: int, c: int = 2, h: int = 3, w: int = 4, dtype: torch.dtype = torch.uint8) -> torch.Tensor:
    """Distinct positive pixel values, so any misplaced pixel shows."""
    return (torch.arange(n * c * h * w) % 250 + 1).to(dtype).view(n, c, h, w)


def test_crop_flip_is_the_documented_crop_of_the_padded_image() -> None:
    x, padding = images(16), 1
    out = random_crop_flip(x, padding, torch.Generator().manual_seed(7))
    replay = torch.Generator().manual_seed(7)
    top, left, flip = (torch.randint(0, high, (16,), generator=replay) for high in (3, 3, 2))
    padded = F.pad(x, (1, 1, 1, 1))
    for n in range(16):
        crop = padded[n, :, top[n] : top[n] + 3, left[n] : left[n] + 4]
        assert torch.equal(out[n], crop.flip(-1) if flip[n] else crop)
    assert {0, 1, 2} == set(top.tolist()) == set(left.tolist()) and {0, 1} == set(flip.tolist())


def test_crop_flip_hand_checked() -> None:
    x = torch.tensor([[[[1, 2], [3, 4]]]])
    out = random_crop_flip(x.expand(256, 1, 2, 2), 1, torch.Generator().manual_seed(0))
    # the 9 crops of [[0,0,0,0],[0,1,2,0],[0,3,4,0],[0,0,0,0]] and their 9 mirror images, all seen
    assert {tuple(o.flatten().tolist()) for o in out} == {
        (0, 0, 0, 1),
        (0, 0, 1, 2),
        (0, 0, 2, 0),
        (0, 1, 0, 3),
        (1, 2, 3, 4),
        (2, 0, 4, 0),
        (0, 3, 0, 0),
        (3, 4, 0, 0),
        (4, 0, 0, 0),
        (0, 0, 1, 0),
        (0, 0, 2, 1),
        (0, 0, 0, 2),
        (1, 0, 3, 0),
        (2, 1, 4, 3),
        (0, 2, 0, 4),
        (3, 0, 0, 0),
        (4, 3, 0, 0),
        (0, 4, 0, 0),
    }


def test_no_padding_only_flips() -> None:
    x = images(32)
    out = random_crop_flip(x, 0, torch.Generator().manual_seed(1))
    flipped = [torch.equal(o, xi.flip(-1)) for o, xi in zip(out, x, strict=True)]
    kept = [torch.equal(o, xi) for o, xi in zip(out, x, strict=True)]
    assert all(f != k for f, k in zip(flipped, kept, strict=True)) and any(flipped) and any(kept)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
def test_shape_and_dtype_preserved(dtype: torch.dtype) -> None:
    x = images(5, 3, 32, 32, dtype)
    out = random_crop_flip(x, 4, torch.Generator().manual_seed(0))
    assert out.shape == x.shape and out.dtype == dtype


def test_deterministic_per_seed() -> None:
    x = images(64, 3, 8, 8)
    a = random_crop_flip(x, 4, torch.Generator().manual_seed(3))
    b = random_crop_flip(x, 4, torch.Generator().manual_seed(3))
    c = random_crop_flip(x, 4, torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize(("shape", "padding"), [((3, 4, 4), 1), ((1, 3, 4, 4), -1)])
def test_crop_flip_rejects_bad_input(shape: tuple[int, ...], padding: int) -> None:
    with pytest.raises(ValueError):
        random_crop_flip(torch.zeros(shape), padding, torch.Generator())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu() -> None:
    x = images(64, 3, 32, 32)
    cpu = random_crop_flip(x, 4, torch.Generator().manual_seed(5))
    cuda = random_crop_flip(x.cuda(), 4, torch.Generator().manual_seed(5))
    assert cuda.is_cuda and torch.equal(cuda.cpu(), cpu)


def test_normalize_exact() -> None:
    x = torch.tensor([[[[0, 255]], [[255, 0]]]], dtype=torch.uint8)
    out = normalize(x, (0.5, 0.25), (0.25, 0.5))
    assert out.dtype == torch.float32
    assert torch.equal(out, torch.tensor([[[[-2.0, 2.0]], [[1.5, -0.5]]]]))


def test_normalize_matches_formula() -> None:
    x = images(4, 3, 5, 5)
    mean, std = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
    expected = (x.double() / 255 - torch.tensor(mean, dtype=torch.float64)[:, None, None]) / torch.tensor(
        std, dtype=torch.float64
    )[:, None, None]
    torch.testing.assert_close(normalize(x, mean, std), expected.float())
    assert torch.equal(normalize(x[0], mean, std), normalize(x, mean, std)[0])
