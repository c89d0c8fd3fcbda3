"""An in-memory batch loader whose every epoch is a pure function of (seed, epoch, rank)."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import numpy as np
import torch

from sparsetrain.data.augment import normalize, random_crop_flip

CROP_PADDING = 4
_ORDER_STREAM, _AUGMENT_STREAM = 0, 1


def _generator(seed: int, epoch: int, stream: int, rank: int) -> torch.Generator:
    """A CPU generator whose seed is a hash of its four (non-negative) coordinates."""
    (state,) = np.random.SeedSequence([seed, epoch, stream, rank]).generate_state(1, np.uint64)
    return torch.Generator().manual_seed(int(state))


class BatchLoader:
    """Batches of normalised, optionally augmented images and their labels, on ``device``.

    Images stay uint8 on ``device``; each batch is gathered, augmented (random crop with
    padding 4 and horizontal flip) and normalised there. Epoch e uses fresh generators seeded
    from (seed, e): one for the sample order, shared by all ranks, and one per rank for the
    augmentation, so resuming at epoch e needs no RNG state and repeats its batches exactly.

    With ``world_size`` > 1 the epoch's order is padded by wrapping around (or, with
    ``drop_last``, truncated) to a multiple of ``world_size`` and rank r takes every
    world_size-th sample from position r, as ``DistributedSampler`` does, so all ranks get the
    same number of batches. ``drop_last`` also drops this rank's final short batch.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        batch_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        *,
        shuffle: bool = True,
        augment: bool = False,
        drop_last: bool = False,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        device: torch.device | str = "cpu",
    ) -> None:
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(
                f"images must be a uint8 (N, C, H, W) tensor, got {images.dtype} {tuple(images.shape)}."
            )
        if labels.shape != images.shape[:1] or len(labels) == 0:
            raise ValueError(
                f"labels must have shape ({len(images)},) with N >= 1, got {tuple(labels.shape)}."
            )
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}.")
        if not 0 <= rank < world_size:
            raise ValueError(
                f"rank must lie in 0..world_size - 1, got rank {rank} with world_size {world_size}."
            )
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.augment = augment
        self.drop_last = drop_last
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self._images = images.to(self.device)
        self._labels = labels.to(self.device)
        self._mean = torch.tensor(mean, dtype=torch.float32, device=self.device)
        self._std = torch.tensor(std, dtype=torch.float32, device=self.device)
        n = len(labels)
        self.samples_per_rank = n // world_size if drop_last else math.ceil(n / world_size)
        self._epoch = 0

    def __len__(self) -> int:
        """Batches per epoch on this rank."""
        if self.drop_last:
            return self.samples_per_rank // self.batch_size
        return math.ceil(self.samples_per_rank / self.batch_size)

    def indices(self, epoch: int) -> torch.Tensor:
        """This rank's sample indices for ``epoch``, in batch order (on the CPU)."""
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}.")
        n = len(self._labels)
        if self.shuffle:
            order = torch.randperm(n, generator=_generator(self.seed, epoch, _ORDER_STREAM, 0))
        else:
            order = torch.arange(n)
        order = order[torch.arange(self.samples_per_rank * self.world_size) % n]
        return order[self.rank :: self.world_size]

    def batches(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """This rank's (images, labels) batches of ``epoch``: float32 (B, C, H, W), int64 (B,)."""
        index = self.indices(epoch).to(self.device)
        augment_rng = _generator(self.seed, epoch, _AUGMENT_STREAM, self.rank)
        return (
            self._batch(index[start : start + self.batch_size], augment_rng)
            for start in range(0, len(self) * self.batch_size, self.batch_size)
        )

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch that plain iteration (``for x, y in loader``) yields."""
        self._epoch = epoch

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self.batches(self._epoch)

    def _batch(self, index: torch.Tensor, augment_rng: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        images = self._images[index]
        if self.augment:
            images = random_crop_flip(images, CROP_PADDING, augment_rng)
        return normalize(images, self._mean, self._std), self._labels[index]
