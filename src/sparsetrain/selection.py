"""Exact magnitude thresholds: the k-th smallest magnitude, k = round(s * N).

Pruning every weight with |w| <= T zeroes exactly k of the N weights when magnitudes are
distinct (ties at T are all pruned, deterministically). T = 0 means "prune nothing".

Scopes decide which weights share a threshold:

    global  one T over all prunable weights
    layer   each layer its own T_l, pruned to the same fraction s
    sigma   one T over the normalised magnitudes |w| / sigma_l,
            sigma_l = 1 / sqrt(sum of the dims of the layer's weight shape)  (ST-3 sigma)
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

SCOPES = ("global", "layer", "sigma")

_DIRECT_LIMIT = 1 << 15


def validate_scope(scope: str) -> str:
    """Return ``scope`` after checking it names a known threshold scope."""
    if scope not in SCOPES:
        raise ValueError(f"unknown scope {scope!r}; known scopes: {', '.join(SCOPES)}.")
    return scope


def layer_sigma(shape: Sequence[int]) -> float:
    """sigma_l = 1 / sqrt(sum of the weight's shape dims), the ST-3 sigma normaliser."""
    return 1.0 / math.sqrt(sum(shape))


def prune_count(sparsity: float, n: int) -> int:
    """k = round(s * N): how many of N weights a sparsity s zeroes."""
    return round(sparsity * n)


def kth_smallest(values: Sequence[Tensor], k: int) -> float:
    """The exact k-th smallest (1-based) element of the concatenation of ``values``.

    Runs in O(N) without a full sort and without concatenating large inputs: a strided
    sample brackets the answer, one pass counts the values below the bracket and gathers
    those inside it, and a selection among the few gathered values finishes the job.
    Falls back to ``torch.kthvalue`` over everything if the bracket misses.
    """
    flat = [v.reshape(-1) for v in values]
    n = sum(v.numel() for v in flat)
    if not 1 <= k <= n:
        raise ValueError(f"k={k} is out of range; allowed: 1 <= k <= {n}.")
    if n <= _DIRECT_LIMIT:
        return torch.cat(flat).kthvalue(k).values.item()
    found = _bracketed_kth(flat, k, n)
    return found if found is not None else torch.cat(flat).kthvalue(k).values.item()


def sample_stride(n: int) -> int:
    """Stride of the bracketing sample: about 8 * sqrt(N) values, between 1,024 and 65,536."""
    size = min(max(8 * math.isqrt(n), 1 << 10), 1 << 16)
    return max(1, n // size)


def _bracketed_kth(flat: Sequence[Tensor], k: int, n: int) -> float | None:
    stride = sample_stride(n)
    sample = torch.cat([v[stride // 2 :: stride] for v in flat]).sort().values
    m = sample.numel()
    q = k / n
    margin = 4.0 * math.sqrt(m * q * (1.0 - q)) + 8.0
    lo_index, hi_index = math.floor(q * m - margin), math.ceil(q * m + margin)
    lo = sample[lo_index].item() if lo_index >= 0 else -math.inf
    hi = sample[hi_index].item() if hi_index < m else math.inf
    below, inside = 0, []
    for v in flat:
        below_mask = v < lo
        inside_mask = (v <= hi) & ~below_mask
        below += int(below_mask.sum())
        inside.append(v[inside_mask])
    candidates = torch.cat(inside)
    rank = k - below
    if not 1 <= rank <= candidates.numel():
        return None
    return candidates.kthvalue(rank).values.item()


def magnitude_threshold(magnitudes: Sequence[Tensor], sparsity: float) -> float:
    """T such that pruning |w| <= T zeroes round(s * N) of the given magnitudes (0 if none)."""
    n = sum(m.numel() for m in magnitudes)
    k = prune_count(sparsity, n)
    return kth_smallest(magnitudes, k) if k > 0 else 0.0


def select_thresholds(magnitudes: Sequence[Tensor], sparsity: float, scope: str) -> list[float]:
    """One threshold per layer, in the units of that layer's (normalised) magnitudes.

    For "global" and "sigma" every entry is the shared T (the caller normalises the
    magnitudes for "sigma"); for "layer" each layer is thresholded on its own.
    """
    if scope == "layer":
        return [magnitude_threshold([m], sparsity) for m in magnitudes]
    shared = magnitude_threshold(magnitudes, sparsity)
    return [shared] * len(magnitudes)
