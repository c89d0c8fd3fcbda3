"""Exact magnitude selection: prune exactly k = round(s * N) of N magnitudes, smallest first.

Scopes decide which weights share a selection:

    global  one selection over all prunable weights
    layer   each layer on its own, pruned to the same fraction s
    sigma   one selection over the normalised magnitudes |w| / sigma_l,
            sigma_l = 1 / sqrt(sum of the dims of the layer's weight shape)  (ST-3 sigma)
    erk     each layer on its own, with the Erdos-Renyi-kernel allocation of the kept weights
            (Evci et al. 2020): density d_l = min(1, eps * sum(dims) / prod(dims)), eps such
            that sum_l d_l N_l = (1 - s) N; counts rounded so that they add up to round(s * N)

:func:`select` gives each layer a threshold T (prune |m| <= T; T = 0 prunes nothing) and,
when magnitudes tie across the k-th position, a mask of the tied entries pruned too.
:func:`kth_smallest` finds the k-th smallest value in O(N) without sorting.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import reduce
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor

SCOPES = ("global", "layer", "sigma", "erk")

_DIRECT_LIMIT = 1 << 15
_CHUNK = 1 << 18
_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class NonFiniteMagnitudes(ValueError):
    """A selection found a NaN or an infinity among its magnitudes."""

    def __init__(self) -> None:
        super().__init__("the magnitudes hold a NaN or an infinity; allowed: finite numbers.")


@dataclass(frozen=True)
class Selection:
    """Per layer: prune |m| <= thresholds[i], plus the entries where ties[i] is True (None: none).
    A threshold is a number, or a tensor shaped like the layer (one per N:M group, :mod:`sparsetrain.nm`)."""

    thresholds: list[float | Tensor]
    ties: list[Tensor | None]


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


def select(magnitudes: Sequence[Tensor], sparsity: float, scope: str) -> Selection:
    """Choose exactly k = round(s * N) magnitudes to prune, smallest first.

    "global" and "sigma" select once over all layers (the caller has normalised the
    magnitudes for "sigma"); "layer" selects in each layer alone with k_l = round(s * N_l),
    "erk" with k_l from :func:`erk_counts`.
    Let v be the k-th smallest magnitude (1-based) of the scope. If #(m <= v) = k, the
    threshold is v and every ``ties`` entry is None. Otherwise (ties at v straddle position
    k) the threshold is the largest magnitude below v (0.0 if none), and the first
    r = k - #(m < v) entries equal to v, in layer order then flat (row-major) index, are
    pruned through ``ties``: a bool mask shaped like the layer, None for a layer holding
    none of them. So, for v > 0, #(m <= threshold) + #ties = k in any dtype, and every
    magnitude above v survives. k = 0 gives thresholds 0.0 and no ties. v = 0 means more
    than k magnitudes are exactly 0: the threshold is 0.0 and the ties pick k of the zeros,
    but the weights keep all #(m = 0) > k of their zeros.
    """
    validate_scope(scope)
    if not 0.0 <= sparsity <= 1.0:
        raise ValueError(f"sparsity={sparsity!r} is out of range; allowed: a number in [0, 1].")
    if scope in ("global", "sigma"):
        return _select_group(magnitudes, prune_count(sparsity, sum(m.numel() for m in magnitudes)))
    shares = layer_sparsities([tuple(m.shape) for m in magnitudes], sparsity, scope)
    parts = [_select_group([m], prune_count(share, m.numel())) for m, share in zip(magnitudes, shares)]
    return Selection([p.thresholds[0] for p in parts], [p.ties[0] for p in parts])


def layer_sparsities(shapes: Sequence[Sequence[int]], sparsity: float, scope: str) -> list[float]:
    """The sparsity of each layer under a per-layer scope: s for "layer", k_l / N_l for "erk"
    (so that round(s_l * N_l) = k_l of :func:`erk_counts`)."""
    if scope == "layer":
        return [sparsity] * len(shapes)
    return [k / math.prod(shape) for k, shape in zip(erk_counts(shapes, sparsity), shapes)]


def erk_counts(shapes: Sequence[Sequence[int]], sparsity: float) -> list[int]:
    """How many weights of each layer the "erk" scope prunes: k_l = N_l - kept_l, where the
    kept_l = d_l N_l follow the Erdos-Renyi-kernel densities d_l = min(1, eps * sum(dims) / prod(dims))
    with eps solving sum_l d_l N_l = (1 - s) N (layers reaching d_l = 1 stay dense and eps is
    solved again over the others). The real counts are rounded by largest remainder (ties to the
    earlier layer), so that sum_l k_l = round(s * N) exactly."""
    sizes = [math.prod(shape) for shape in shapes]
    scores = [sum(shape) / size for shape, size in zip(shapes, sizes)]
    budget = sum(sizes) - prune_count(sparsity, sum(sizes))  # weights kept in all
    open_layers = set(range(len(sizes)))
    while open_layers:
        eps = (budget - sum(sizes) + sum(sizes[i] for i in open_layers)) / sum(scores[i] * sizes[i] for i in open_layers)
        full = {i for i in open_layers if eps * scores[i] >= 1.0}
        if not full:
            break
        open_layers -= full
    keep = [eps * score * size if i in open_layers else size for i, (score, size) in enumerate(zip(scores, sizes))]
    kept = [math.floor(k) for k in keep]
    order = sorted((i for i in range(len(sizes)) if kept[i] < sizes[i]), key=lambda i: (kept[i] - keep[i], i))
    for i in order[: budget - sum(kept)]:
        kept[i] += 1
    return [size - k for size, k in zip(sizes, kept)]


def _select_group(magnitudes: Sequence[Tensor], k: int) -> Selection:
    arrays, ops = _arrays(magnitudes)
    if k == 0:
        return Selection([0.0] * len(arrays), [None] * len(arrays))
    rank = _locate(arrays, ops, k)
    if rank.through == k:
        return Selection([rank.value] * len(arrays), [None] * len(arrays))
    below = 0.0 if not rank.below else rank.previous if rank.previous is not None else _locate(arrays, ops, rank.below).value
    ties = _tie_masks(arrays, rank.value, k - rank.below)
    return Selection([below] * len(arrays), [t if t is None else t.view(m.shape) for t, m in zip(ties, magnitudes)])


def _tie_masks(arrays: Sequence[Any], value: float, count: int) -> list[Tensor | None]:
    """Flat masks of the first ``count`` entries equal to ``value``, in layer order then flat index."""
    masks: list[Tensor | None] = [None] * len(arrays)
    for i, a in enumerate(arrays):
        if count == 0:
            break
        tied = a == value
        size = int(tied.sum())
        if size > count:  # cut after the count-th tied entry (a cumulative sum would read the whole layer again)
            where = tied.nonzero()
            tied[int(where[0][count] if isinstance(where, tuple) else where[count, 0]) :] = False
            size = count
        if size:
            masks[i] = torch.as_tensor(tied)
            count -= size
    return masks


def kth_smallest(values: Sequence[Tensor], k: int) -> float:
    """The exact k-th smallest (1-based) element of the concatenation of ``values``."""
    return _locate(*_arrays(values), k).value


# -- finding the k-th smallest value ------------------------------------------------------


class _Rank(NamedTuple):
    """The k-th smallest value, how many values lie below it and at or below it, and the largest
    value below it when the search saw it (None: not known, or none)."""

    value: float
    below: int
    through: int
    previous: float | None


class _Ops(NamedTuple):
    """The three primitives the selection needs, for numpy arrays or for tensors."""

    concat: Callable[[Sequence[Any]], Any]
    kth: Callable[[Any, Sequence[int]], list[float]]  # the k-th smallest (1-based) for each k given
    split: Callable[[Sequence[Any], float, float], tuple[int, Any]]


def _arrays(values: Sequence[Tensor]) -> tuple[list[Any], _Ops]:
    """Flat detached views in one dtype, so that every comparison is exact, and the primitives
    to select among them: numpy arrays on the CPU, where numpy compares and selects many times
    faster than torch (16-bit floats are widened to float32, exactly), tensors elsewhere."""
    flat = [v.detach().reshape(-1) for v in values]
    dtype = reduce(torch.promote_types, [f.dtype for f in flat]) if flat else None
    if flat and flat[0].device.type == "cpu" and dtype in _FLOATS:
        wide = torch.promote_types(dtype, torch.float32)
        return [f.to(wide).numpy() for f in flat], _NUMPY
    return [f.to(dtype) for f in flat], _TORCH


def _locate(arrays: Sequence[Any], ops: _Ops, k: int) -> _Rank:
    """The k-th smallest (1-based) of the concatenation of ``arrays``, in O(N), without a sort.

    A strided sample brackets the answer, one pass counts the values below the bracket and
    gathers those inside it, and a selection among the few gathered values finishes the job;
    if the bracket misses, the selection runs over everything.
    """
    n = sum(len(a) for a in arrays)
    if not 1 <= k <= n:
        raise ValueError(f"k={k} is out of range; allowed: 1 <= k <= {n}.")
    found = _bracketed(arrays, k, n, ops) if n > _DIRECT_LIMIT else None
    return found if found is not None else _rank(ops.concat(arrays), k, ops)


def _rank(values: Any, k: int, ops: _Ops) -> _Rank:
    (value,) = ops.kth(values, [k])
    smaller = values[values < value]
    previous = float(smaller.max()) if len(smaller) else None
    return _Rank(value, len(smaller), int((values <= value).sum()), previous)


def sample_stride(n: int) -> int:
    """Stride of the bracketing sample: about 32 * sqrt(N) values, between 1,024 and 262,144
    (a larger sample narrows the bracket, so fewer values are gathered)."""
    size = min(max(32 * math.isqrt(n), 1 << 10), 1 << 18)
    return max(1, n // size)


def _bracketed(arrays: Sequence[Any], k: int, n: int, ops: _Ops) -> _Rank | None:
    """The k-th smallest via a bracket [lo, hi] from a sample, or None if it misses."""
    stride = sample_stride(n)
    sample = ops.concat([a[stride // 2 :: stride] for a in arrays])
    m = len(sample)
    q = k / n
    margin = 4.0 * math.sqrt(m * q * (1.0 - q)) + 8.0
    lo_rank, hi_rank = math.floor(q * m - margin) + 1, math.ceil(q * m + margin) + 1
    ranks = [r for r in (lo_rank, hi_rank) if 1 <= r <= m]
    found = dict(zip(ranks, ops.kth(sample, ranks)))  # both ends of the bracket
    lo, hi = found.get(lo_rank, -math.inf), found.get(hi_rank, math.inf)
    below, inside = ops.split(arrays, lo, hi)
    if not 1 <= k - below <= len(inside):
        return None
    rank = _rank(inside, k - below, ops)
    return _Rank(rank.value, below + rank.below, below + rank.through, rank.previous)


def _kth_numpy(values: np.ndarray, ks: Sequence[int]) -> list[float]:
    """One partition per k, each over the values above the previous k (numpy's partition at
    several positions at once is 10-20 times slower than at one)."""
    found: dict[int, float] = {}
    start, rest = 0, values
    for k in sorted(set(ks)):
        rest = np.partition(rest, k - 1 - start)
        found[k] = float(rest[k - 1 - start])
        start, rest = k, rest[k - start :]
    return [found[k] for k in ks]


def _split_numpy(arrays: Sequence[np.ndarray], lo: float, hi: float) -> tuple[int, np.ndarray]:
    """#(a < lo) and the values lo <= a <= hi: compare, count, compare and gather each cache-sized
    chunk while it is in cache, into reused mask buffers. One thread: called between torch's
    operations in a training step, helper threads lost more to torch's waiting OpenMP threads
    than they gained."""
    low, inside = np.empty(_CHUNK, dtype=bool), np.empty(_CHUNK, dtype=bool)
    below, parts = 0, []
    for a in arrays:
        for start in range(0, a.size, _CHUNK):
            chunk = a[start : start + _CHUNK]
            lt, le = low[: chunk.size], inside[: chunk.size]
            np.less(chunk, lo, out=lt)
            below += int(np.count_nonzero(lt))
            np.less_equal(chunk, hi, out=le)
            np.not_equal(lt, le, out=le)
            parts.append(chunk[le])
    return below, np.concatenate(parts)


def _kth_torch(values: Tensor, ks: Sequence[int]) -> list[float]:
    # kthvalue lacks bfloat16 on CUDA before torch 2.3; float32 holds 16-bit floats exactly.
    wide = values.float() if values.dtype in (torch.float16, torch.bfloat16) else values
    return [wide.kthvalue(k).values.item() for k in ks]


def _split_torch(flat: Sequence[Tensor], lo: float, hi: float) -> tuple[int, Tensor]:
    """#(v < lo) and the values lo <= v <= hi, with one host sync for the count."""
    below = torch.stack([(v < lo).sum() for v in flat]).sum()
    inside = torch.cat([v[(v >= lo) & (v <= hi)] for v in flat])
    return int(below), inside


_NUMPY = _Ops(np.concatenate, _kth_numpy, _split_numpy)
_TORCH = _Ops(torch.cat, _kth_torch, _split_torch)
