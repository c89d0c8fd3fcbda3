"""Batched image augmentation and normalisation as whole-batch tensor ops (CPU or CUDA)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def random_crop_flip(x: torch.Tensor, padding: int, generator: torch.Generator) -> torch.Tensor:
    """Random crop from the zero-padded image and random horizontal flip, per image.

    For each image n, offsets (i_n, j_n) uniform in 0..2·padding and a flip bit f_n (p = 1/2)
    are drawn from ``generator`` in that order (three draws of N values), then
    out[n] = pad(x)[n, :, i_n : i_n + H, j_n : j_n + W], reversed along W where f_n = 1.
    The whole batch is one gather; any dtype works (the loader crops uint8, so padding is black).
    """
    if x.dim() != 4:
        raise ValueError(f"random_crop_flip expects an (N, C, H, W) batch, got shape {tuple(x.shape)}.")
    if padding < 0:
        raise ValueError(f"padding must be >= 0, got {padding}.")
    n, c, h, w = x.shape

    def draw(high: int) -> torch.Tensor:
        return torch.randint(0, high, (n,), generator=generator, device=generator.device).to(x.device)

    top, left, flip = draw(2 * padding + 1), draw(2 * padding + 1), draw(2).bool()
    rows = top[:, None] + torch.arange(h, device=x.device)
    cols = left[:, None] + torch.arange(w, device=x.device)
    cols = torch.where(flip[:, None], cols.flip(1), cols)
    # One gather along the flattened padded plane (much faster than 4-way advanced indexing).
    plane = (rows[:, :, None] * (w + 2 * padding) + cols[:, None, :]).view(n, 1, h * w)
    padded = F.pad(x, (padding, padding, padding, padding)).flatten(2)
    return padded.gather(2, plane.expand(n, c, h * w)).view(n, c, h, w)


def normalize(
    x: torch.Tensor, mean: Sequence[float] | torch.Tensor, std: Sequence[float] | torch.Tensor
) -> torch.Tensor:
    """Float32 images (x / 255 - mean_c) / std_c, channel c at dim -3 of uint8 ``x``."""
    mean_c = torch.as_tensor(mean, dtype=torch.float32, device=x.device).view(-1, 1, 1)
    std_c = torch.as_tensor(std, dtype=torch.float32, device=x.device).view(-1, 1, 1)
    return (x.to(torch.float32) / 255 - mean_c) / std_c
