"""Exact global magnitude selection over weights sharded across processes, without gathering them.

:func:`select_sharded` returns on every rank what ``select(magnitudes, s, "global")`` returns on the
concatenation of all ranks' shards: the same thresholds, and the tie masks cut to the rank's shards.
The global order is layer, then rank, then flat index: the flat order of the unsharded weights when,
as with FSDP2, every rank holds a contiguous block of dim-0 rows, in rank order.

Bracket first (2 or 3 collective rounds; 1 pass over the local shards, and 1 more over the layers
holding tied entries to prune when ties at v straddle k). Every rank takes the same number S of its
entries (S = 2^16 / ranks) at a fixed stride (all of them when it holds fewer) and one ``all_gather`` shares
them with the ranks' entry counts n_r: every rank now knows N, k = round(s * N) and a sample in which
each of rank r's sampled entries stands for n_r / S_r entries, and derives from it the same bracket
[lo, hi] around v, the k-th smallest magnitude, 4 standard deviations of the estimate wide on either
side. One pass counts the local entries below lo and gathers those inside (numpy on the CPU, a
cache-sized piece at a time, like ``select``); a second ``all_gather`` of the counts tells every rank
whether position k lies inside. Where the bracket is expected to hold at most 2^12 entries per rank
(small models), the same round carries them all; otherwise the bracket is cut into 2^12 buckets of
equal width, the counts carry each rank's histogram over them, and a third ``all_gather`` the entries
of the bucket holding position k. Every rank then selects v among these, with the largest magnitude
below v and, when ties at v straddle k, how many entries equal to v each rank holds in each layer.
Each rank then marks its own share of the first r = k - #(m < v) entries equal to v. As in ``select``, 16-bit floats are compared widened to float32 (exactly).

Radix fallback, exact: when the bracket misses k, holds more entries than its budget (4 margins and
2^16: many equal magnitudes, which no sample narrows), a rank holds negative, infinite or NaN
magnitudes (the pass takes each piece's minimum and maximum), or, as unlikely as a miss, ties
straddle k at the smallest value inside while entries lie below lo, every rank takes the same decision from the gathered data, and
selects again on the IEEE bits: for x >= 0 the bit pattern read as
an integer (the key) grows with x. Each round histograms the next 16 bits of the local keys that
share the prefix found so far, sums the histograms across ranks (``all_reduce``) and extends the
prefix by the bucket holding position k, until the key of v is exact: 1 round for 16-bit floats, 2
for float32, 4 for float64. Only when ties at v straddle k, one ``all_gather`` of each rank's
per-layer counts of keys equal to v (and of its largest key below v, unless the last histogram shows
the largest magnitude below v) tells every rank how many of its own tied entries fall among the
first r, and one more pass marks them.

A :class:`ShardedSelector` keeps the gathered sample for its next call: during training the
magnitudes move little from one step to the next, so the old sample still brackets position k and
the call skips round 1 and the sampling; the counts' round tells every rank alike when it no longer
does, and the call then gathers a new sample.

Every rank decides from the same gathered data, so all take the same path and raise the same errors.
Shards are read in chunks, so the temporaries stay O(sample + bracket + chunk + 2^16) beside the
output masks.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import reduce
from typing import NamedTuple

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from .selection import Selection, prune_count

_CHUNK = 1 << 20
_SPLIT = 1 << 16  # entries per piece of a chunk in the bracket's pass: the piece and its masks stay in cache
_SAMPLE = 1 << 16  # entries in the union of the ranks' samples
_HEAD = 2  # a sample row's first entries: the rank's entry count
_SPARE = 1 << 16  # entries the bracket may hold beyond 4 margins before the radix path takes over
_BUCKETS_IN_BRACKET = 1 << 12  # the bracket's buckets: only the one holding position k is gathered
_CARRIED = 1 << 12  # entries per rank the counts' round carries when the whole bracket is expected to fit
_MARGIN = (4.0, 8.0)  # the bracket's margin beyond k: standard deviations of the estimate, and sampled entries
_DIGITS = 16
_BUCKETS = 1 << _DIGITS
_KEYS = {torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.float32: torch.int32, torch.float64: torch.int64}


def select_sharded(magnitudes: Sequence[Tensor], sparsity: float, group: dist.ProcessGroup | None = None
                   ) -> ShardedSelection:
    """``select(magnitudes, sparsity, "global")`` over the shards of all ranks in ``group``.

    ``magnitudes`` holds this rank's shard (possibly empty) of every layer, in the same layer order
    on every rank. The thresholds are equal on every rank; ``ties[i]`` is shaped like this rank's
    shard of layer i, None where the rank prunes none of its entries equal to v; ``straddles`` tells
    every rank alike whether some rank prunes tied entries. Without an initialised torch.distributed,
    or in a world of one, it selects over the local tensors alone.
    Collectives, on the tensors' device: none when s = 0; 1 ``all_gather`` when k = 0; 2 when the
    bracket holds position k and its entries come with the counts, 3 when they are gathered by bucket
    (:class:`ShardedSelector`: one fewer while its sample still brackets k). Otherwise 2 (rarely 3),
    then the radix path's: one ``all_reduce`` per 16 bits of the dtype (float32: 2) and one
    ``all_gather`` more when ties straddle k. Passes over
    the local shards: 1, +1 over the layers holding tied entries to prune when ties straddle k; on the
    radix path 1 + one per radix round, +2 when ties straddle k (float32: at most 5). Negative,
    infinite and NaN magnitudes raise ValueError on every rank alike.
    """
    return ShardedSelector().select(magnitudes, sparsity, group)


@dataclass(frozen=True)
class ShardedSelection(Selection):
    """A :class:`~sparsetrain.selection.Selection` over shards, and whether ties at v straddle position k
    (the same on every rank, even on those that prune none of the tied entries)."""

    straddles: bool = False


class ShardedSelector:
    """:func:`select_sharded`, keeping the last gathered sample from call to call: while it still
    brackets position k (the magnitudes move little between training steps), a selection takes one
    collective round fewer (1 or 2) and no sampling pass. Whether it does is decided from the counts'
    round, by every rank alike; when it misses, a new sample is gathered and the selection runs again
    (the counts' round is then spent twice). Every call must pass the same layers' shards (their
    values may change)."""

    def __init__(self) -> None:
        self._sample: _Sample | None = None

    def select(self, magnitudes: Sequence[Tensor], sparsity: float, group: dist.ProcessGroup | None = None
               ) -> ShardedSelection:
        """:func:`select_sharded` of ``magnitudes`` at ``sparsity`` over the ranks of ``group``."""
        if not 0.0 <= sparsity <= 1.0:
            raise ValueError(f"sparsity={sparsity!r} is out of range; allowed: a number in [0, 1].")
        if sparsity == 0.0 or not magnitudes:
            return _unpruned(len(magnitudes))
        dtype = reduce(torch.promote_types, [m.dtype for m in magnitudes])
        if dtype not in _KEYS:
            raise ValueError(f"magnitudes of dtype {dtype} are not supported; allowed: float16, bfloat16, float32, float64.")
        world = dist.get_world_size(group) if dist.is_available() and dist.is_initialized() else 1
        if self._sample is not None:
            found = _bracketed(magnitudes, sparsity, dtype, group, world, self._sample)
            if found is not None:
                return found
        size = max(1, _SAMPLE // world)
        wide = np.float32 if torch.promote_types(dtype, torch.float32) == torch.float32 else np.float64
        self._sample = _gathered(_gather(_sample(magnitudes, size, wide), magnitudes[0].device, group, world), size)  # round 1
        found = _bracketed(magnitudes, sparsity, dtype, group, world, self._sample)
        return found if found is not None else _radix(magnitudes, sparsity, dtype, group, world)


def _unpruned(layers: int) -> ShardedSelection:
    return ShardedSelection([0.0] * layers, [None] * layers)


def _gather(values: np.ndarray, device: torch.device, group: dist.ProcessGroup | None, world: int) -> np.ndarray:
    """Every rank's ``values`` (the same shape on every rank), stacked in rank order: one ``all_gather``."""
    if world == 1:
        return values[None]
    local = torch.from_numpy(values).to(device)
    table = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(table, local, group=group)
    return torch.stack(table).cpu().numpy()


# -- bracket first ------------------------------------------------------------------------


class _Buckets(NamedTuple):
    """The bracket cut into ``count`` buckets of equal width: x goes to floor((x - start) * scale),
    clipped to [0, count - 1]. Every rank computes the same float64 expression, monotone in x, so
    the buckets follow the order of the entries and agree across ranks."""

    start: float
    scale: float
    count: int

    def index(self, values: np.ndarray) -> np.ndarray:
        where = (values.astype(np.float64) - self.start) * self.scale
        return np.clip(where, 0, self.count - 1).astype(np.int64)


class _Split(NamedTuple):
    """One pass over the local shards against a bracket [lo, hi] cut into :class:`_Buckets`."""

    below: int  # entries < lo
    counts: list[int]  # entries in [lo, hi], per layer
    histogram: np.ndarray  # entries in [lo, hi] per bucket
    parts: list[tuple[int, np.ndarray]]  # (layer, its entries in [lo, hi] in flat order), kept while at most a budget
    valid: bool  # no negative, infinite or NaN entry


def _bracketed(magnitudes: Sequence[Tensor], sparsity: float, dtype: torch.dtype, group: dist.ProcessGroup | None,
               world: int, sample: _Sample) -> ShardedSelection | None:
    """The selection through a bracket from a gathered sample, or None where it misses (a sample of
    other shards, or of magnitudes that have moved since) or the radix path must decide."""
    device, layers = magnitudes[0].device, len(magnitudes)
    n = int(sample.counts.sum())
    k = prune_count(sparsity, n)
    if k == 0:
        return _unpruned(layers)
    lo, hi, margin, sampled = _bracket(sample, k)
    buckets = _buckets(lo, hi, sampled)
    budget = _budget(margin)
    split = _split(magnitudes, torch.promote_types(dtype, torch.float32), lo, hi, budget, buckets)
    fits = sum(m.numel() for m in magnitudes) == sample.counts[_rank(group, world)]  # the sample is of these shards
    carried = np.full(_CARRIED if 2 * margin <= _CARRIED * world / 2 else 0, np.inf)  # the same size on every rank
    if len(carried) and sum(split.counts) <= len(carried) and split.parts:
        mine = np.concatenate([part for _, part in split.parts])
        carried[: len(mine)] = mine
    layout = np.concatenate([[split.below, split.valid and fits], split.counts, split.histogram, carried])
    counts = _gather(layout.astype(np.float64), device, group, world)  # round 2
    below, inside = int(counts[:, 0].sum()), counts[:, 2 : 2 + layers].astype(np.int64)
    if not counts[:, 1].all() or inside.sum() > budget or not 1 <= k - below <= inside.sum():
        return None
    held = inside.sum(1)
    if len(carried) and held.max() <= len(carried):  # every rank's whole bracket came with the counts
        start = 2 + layers + buckets.count
        found = _select_inside([row[start : start + h] for row, h in zip(counts, held)], inside, k - below, -math.inf,
                               below > 0)
    else:
        found = _from_bucket(counts[:, 2 + layers : 2 + layers + buckets.count].astype(np.int64), split, buckets,
                             k - below, below, device, group, world)
    if found is None:
        return None
    value, threshold, tied, count = found
    if tied is None:
        return ShardedSelection([value] * layers, [None] * layers)
    keys = _KEYS[dtype]
    key = _key(value, dtype, keys)
    takes = _takes(torch.from_numpy(tied), _rank(group, world), count)
    ties = [_tie_mask(m, dtype, keys, key, take) if take else None for m, take in zip(magnitudes, takes)]
    return ShardedSelection([threshold] * layers, ties, straddles=True)


def _from_bucket(histogram: np.ndarray, split: _Split, buckets: _Buckets, r: int, below: int, device: torch.device,
                 group: dist.ProcessGroup | None, world: int) -> tuple[float, float, np.ndarray | None, int] | None:
    """:func:`_select_inside` over the entries of the bucket holding the r-th entry of the bracket
    (``histogram``: every rank's counts per bucket), gathered from every rank: round 3."""
    layers = len(split.counts)
    bucket = int(np.searchsorted(histogram.sum(0).cumsum(), r))
    before = below + int(histogram[:, :bucket].sum())
    held = histogram[:, bucket]
    row = np.full(1 + layers + held.max(), np.inf)
    previous, layer_counts, values = _in_bucket(split.parts, buckets, bucket, layers)
    row[0], row[1 : 1 + layers], row[1 + layers : 1 + layers + len(values)] = previous, layer_counts, values
    table = _gather(row, device, group, world)  # round 3
    return _select_inside([entries[1 + layers : 1 + layers + h] for entries, h in zip(table, held)],
                          table[:, 1 : 1 + layers].astype(np.int64), r - (before - below), float(table[:, 0].max()),
                          before > 0)


def _rank(group: dist.ProcessGroup | None, world: int) -> int:
    return dist.get_rank(group) if world > 1 else 0


def _sample(magnitudes: Sequence[Tensor], size: int, dtype: type = np.float64) -> np.ndarray:
    """[n // 2^24, n % 2^24 (n, exact in float32), the sorted entries at positions stride // 2 + j * stride
    of the n local entries (layers concatenated), j < min(n, size), stride = max(1, n // size), then +inf
    up to ``size``], in ``dtype`` (float32 holds float32 and 16-bit magnitudes exactly, in half the bytes)."""
    n = sum(m.numel() for m in magnitudes)
    stride = max(1, n // size)
    first, end = stride // 2, min(n, stride // 2 + size * stride)
    parts, offset = [], 0
    for m in magnitudes:
        start, stop = (first - offset) % stride, min(m.numel(), end - offset)
        if start < stop:
            m = m.detach()
            if m.is_contiguous():
                parts.append(m.reshape(-1)[start:stop:stride])
            else:
                parts.append(m[torch.unravel_index(torch.arange(start, stop, stride, device=m.device), m.shape)])
        offset += m.numel()
    row = np.full(_HEAD + size, np.inf, dtype=dtype)
    row[:_HEAD] = divmod(n, 1 << 24)
    if parts:
        taken = row[_HEAD : _HEAD + sum(len(part) for part in parts)]
        torch.from_numpy(taken).copy_(torch.cat(parts))  # widened as it is copied
        taken.sort()
    return row


def _counts(rows: np.ndarray) -> np.ndarray:
    """Each rank's entry count n from the head of its sample row."""
    return rows[:, 0].astype(np.float64) * (1 << 24) + rows[:, 1]


class _Sample(NamedTuple):
    """A gathered sample: a row per rank as :func:`_sample` makes it, the entries each rank sampled
    at most, every sampled value (not the padding) sorted, and each rank's entry count."""

    rows: np.ndarray
    size: int
    values: np.ndarray
    counts: np.ndarray


def _gathered(rows: np.ndarray, size: int) -> _Sample:
    counts = _counts(rows)
    taken = np.minimum(counts, size).astype(np.int64)
    values = np.concatenate([row[_HEAD : _HEAD + t] for row, t in zip(rows, taken)])
    values.sort()
    return _Sample(rows, size, values, counts)


def _bracket(sample: _Sample, k: int) -> tuple[float, float, float, tuple[float, float] | None]:
    """(lo, hi, margin, sampled): a bracket around the k-th smallest of all entries from a gathered
    ``sample``, ``margin`` entries beyond k on either side by the sample's estimate of #(m <= x): 4
    standard deviations + 8 sampled entries (``_MARGIN``). hi is the first sampled value whose
    estimate reaches k + margin; lo the largest sampled value below the first one whose estimate
    exceeds k - margin, so that v > lo unless the bracket misses; ``sampled``: the smallest and
    largest sampled values inside [lo, hi] (None: none)."""
    counts = sample.counts
    taken = np.minimum(counts, sample.size).astype(np.int64)
    rows = [row[_HEAD : _HEAD + t] for row, t in zip(sample.rows, taken) if t]
    weight = counts[taken > 0] / taken[taken > 0]  # entries per sampled entry, per rank

    def through(x: float) -> float:  # the estimate of #(m <= x)
        x = values.dtype.type(x)  # a sampled value, in the sample's own dtype: no row is converted to search it
        return sum(w * int(np.searchsorted(row, x, side="right")) for w, row in zip(weight, rows))

    q = k / counts.sum()
    spread = q * (1.0 - q) * float(np.sum(counts[taken > 0] * (weight - 1.0)))  # variance of a count, without replacement
    margin = _MARGIN[0] * math.sqrt(spread) + _MARGIN[1] * float(weight.max())
    values = sample.values
    first = min(_first(values, lambda x: through(x) > k - margin), len(values) - 1)
    start = int(np.searchsorted(values, values[first], side="left"))
    last = _first(values, lambda x: through(x) >= k + margin)
    lo = float(values[start - 1]) if start else -math.inf
    hi = float(values[last]) if last < len(values) else math.inf
    first, end = (np.searchsorted(values, values.dtype.type(x), side=side) for x, side in ((lo, "left"), (hi, "right")))
    return lo, hi, margin, (float(values[first]), float(values[end - 1])) if end > first else None


def _first(values: np.ndarray, holds: Callable[[float], bool]) -> int:
    """The first index of the sorted ``values`` whose value ``holds`` (monotone), len(values) if none."""
    lo, hi = 0, len(values)
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if holds(float(values[mid])) else (mid + 1, hi)
    return lo


def _budget(margin: float) -> int:
    """The most entries the bracket may hold (4 margins and a spare) before the radix path takes over:
    many equal magnitudes (all of them, at worst) make a bracket that no sample can narrow."""
    return 4 * math.ceil(margin) + _SPARE


def _buckets(lo: float, hi: float, sampled: tuple[float, float] | None) -> _Buckets:
    """_BUCKETS buckets over [lo, hi], or over the sampled values inside it where an end is infinite."""
    start = lo if math.isfinite(lo) else sampled[0] if sampled else 0.0
    end = hi if math.isfinite(hi) else sampled[1] if sampled else start
    return _Buckets(start, _BUCKETS_IN_BRACKET / (end - start) if end > start else 0.0, _BUCKETS_IN_BRACKET)


def _split(magnitudes: Sequence[Tensor], wide: torch.dtype, lo: float, hi: float, budget: int,
           buckets: _Buckets) -> _Split:
    """Count the entries below lo, and those in [lo, hi] per layer and per bucket, keeping these (in
    ``wide``) while they number at most ``budget`` in all; on the CPU compare, count and gather each
    cache-sized piece (``_SPLIT`` entries) of a chunk in numpy while it is in cache, into reused masks
    (see ``_split_numpy`` in :mod:`.selection`)."""
    cpu = magnitudes[0].device.type == "cpu"
    low, mid = np.empty(_SPLIT, dtype=bool), np.empty(_SPLIT, dtype=bool)
    histogram = np.zeros(buckets.count, dtype=np.int64)
    below, counts, parts, valid, total = 0, [], [], True, 0
    for layer, m in enumerate(magnitudes):
        count, kept = 0, []
        for _, chunk in _chunks(m):
            entries = chunk.to(wide).numpy() if cpu else chunk.to(wide)
            for start in range(0, len(entries), _SPLIT if cpu else len(entries)):
                piece = entries[start : start + _SPLIT] if cpu else entries
                under, mask, finite = _marks_numpy(piece, lo, hi, low, mid) if cpu else _marks_torch(piece, lo, hi)
                part = piece[mask]
                below, count, total, valid = below + under, count + len(part), total + len(part), valid and finite
                if total <= budget and len(part):
                    kept.append(part if cpu else part.cpu().numpy())
        if kept and valid:  # the layer's entries in the bracket, bucketed at once (an invalid pass is discarded)
            values = np.concatenate(kept) if len(kept) > 1 else kept[0]
            histogram += np.bincount(buckets.index(values), minlength=buckets.count)
            parts.append((layer, values))
        counts.append(count)
    return _Split(below, counts, histogram, parts, valid)


def _in_bucket(parts: Sequence[tuple[int, np.ndarray]], buckets: _Buckets, bucket: int, layers: int
               ) -> tuple[float, np.ndarray, np.ndarray]:
    """(the largest kept entry below the bucket, -inf if none; the bucket's entries per layer; those
    entries in layer then flat order)."""
    previous, counts, values = -math.inf, np.zeros(layers, dtype=np.int64), []
    for layer, part in parts:
        index = buckets.index(part)
        under = part[index < bucket]
        if len(under):
            previous = max(previous, float(under.max()))
        inside = part[index == bucket]
        counts[layer] += len(inside)
        values.append(inside)
    return previous, counts, np.concatenate(values) if values else np.empty(0)


def _marks_numpy(a: np.ndarray, lo: float, hi: float, low: np.ndarray, mid: np.ndarray) -> tuple[int, np.ndarray, bool]:
    """(#(a < lo), the mask of lo <= a <= hi, whether every entry is finite and >= 0), into the buffers
    ``low`` and ``mid``."""
    lt, inside = low[: a.size], mid[: a.size]
    np.less(a, lo, out=lt)
    np.less_equal(a, hi, out=inside)
    np.not_equal(lt, inside, out=inside)  # lo <= hi: a < lo implies a <= hi
    return int(np.count_nonzero(lt)), inside, not a.size or bool(a.min() >= 0.0 and a.max() < math.inf)  # NaN: False


def _marks_torch(a: Tensor, lo: float, hi: float) -> tuple[int, Tensor, bool]:
    return int((a < lo).sum()), (a >= lo) & (a <= hi), not a.numel() or bool(a.min() >= 0.0 and a.max() < math.inf)


def _select_inside(values: list[np.ndarray], inside: np.ndarray, r: int, previous: float, lower: bool
                   ) -> tuple[float, float, np.ndarray | None, int] | None:
    """From every rank's entries in the bucket holding position k (``inside``: their counts, ranks x
    layers), r = k - #(entries below the bucket) and ``previous``, the largest entry of the bracket
    below the bucket (-inf: none): (v, the threshold, None or the counts of entries equal to v (ranks x
    layers) when ties straddle k, how many of these to prune). None when ties straddle k, no entry of
    the bracket lies below v and some lie below lo (``lower``): the largest magnitude below v is unknown."""
    union = np.concatenate(values)
    part = np.partition(union, r - 1)
    value = float(part[r - 1]) + 0.0  # + 0.0: -0.0 reads as 0.0
    smaller = part[: r - 1]  # holds every entry of the bucket below v
    less = int(np.count_nonzero(smaller < value))
    if less + int(np.count_nonzero(union == value)) == r:
        return value, value, None, 0
    if less:
        threshold = float(np.partition(smaller, less - 1)[less - 1]) + 0.0  # the less smallest: those below v
    elif previous > -math.inf:
        threshold = previous + 0.0
    elif lower:
        return None
    else:
        threshold = 0.0
    tied = np.stack([_layer_counts(np.flatnonzero(row == value), sizes) for row, sizes in zip(values, inside)])
    return value, threshold, tied, r - less


def _layer_counts(positions: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """How many of ``positions`` (in a rank's inside entries) fall in each layer; ``sizes``: the layers' inside counts."""
    return np.bincount(np.searchsorted(np.cumsum(sizes), positions, side="right"), minlength=len(sizes))


# -- radix fallback -----------------------------------------------------------------------


def _radix(magnitudes: Sequence[Tensor], sparsity: float, dtype: torch.dtype, group: dist.ProcessGroup | None, world: int) -> Selection:
    """The selection by radix selection on the IEEE bits (module docstring)."""
    keys = _KEYS[dtype]
    width = keys.itemsize * 8
    prefix = below = 0
    for shift in range(width - _DIGITS, -1, -_DIGITS):
        counts = _histogram(magnitudes, dtype, keys, shift, None if shift == width - _DIGITS else prefix)
        if world > 1:
            dist.all_reduce(counts, group=group)
        counts = counts.cpu()
        if shift == width - _DIGITS:
            _check_keys(counts, dtype, keys, width)
            k = prune_count(sparsity, int(counts.sum()))
            if k == 0:
                return _unpruned(len(magnitudes))
        total = counts.cumsum(0)
        digit = int(torch.searchsorted(total, k - below))
        below += int(total[digit] - counts[digit])
        prefix = (prefix << _DIGITS) | digit
    value = _value(prefix, dtype, keys)
    if below + int(counts[digit]) == k:
        return Selection([value] * len(magnitudes), [None] * len(magnitudes))

    # Ties at v straddle position k: prune the first k - below of them in the global order.
    lower = counts[:digit].nonzero()
    previous = (prefix - digit + int(lower[-1])) if len(lower) else None
    local = _tie_counts(magnitudes, dtype, keys, prefix, previous is None and below > 0)
    if world > 1:
        table = [torch.empty_like(local) for _ in range(world)]
        dist.all_gather(table, local, group=group)
        table = torch.stack(table).cpu()
    else:
        table = local[None].cpu()
    if previous is None and below:
        previous = int(table[:, 0].max())
    threshold = _value(previous, dtype, keys) if below else 0.0
    takes = _takes(table[:, 1:], dist.get_rank(group) if world > 1 else 0, k - below)
    ties = [_tie_mask(m, dtype, keys, prefix, take) if take else None for m, take in zip(magnitudes, takes)]
    return Selection([threshold] * len(magnitudes), ties)


def _chunks(m: Tensor, size: int | None = None) -> Iterator[tuple[int, Tensor]]:
    """(start, entries) of consecutive blocks of at most ``size`` (default ``_CHUNK``) entries of ``m``
    in flat (row-major) order; a non-contiguous ``m`` is copied a block of rows (or a piece of a row)
    at a time. Every pass over the shards reads them through here."""
    return _blocks(m.detach(), 0, size or _CHUNK)


def _blocks(m: Tensor, start: int, size: int) -> Iterator[tuple[int, Tensor]]:
    if m.is_contiguous() or m.dim() < 2:
        flat = m.reshape(-1)
        for i in range(0, flat.numel(), size):
            yield start + i, flat[i : i + size]
    elif m.numel():
        row = m[0].numel()
        if row > size:
            for i in range(len(m)):
                yield from _blocks(m[i], start + i * row, size)
        else:
            for i in range(0, len(m), size // row):
                yield start + i * row, m[i : i + size // row].reshape(-1)


def _keys(chunk: Tensor, dtype: torch.dtype, keys: torch.dtype) -> Tensor:
    """The IEEE bits of ``chunk`` in ``dtype`` as integers of dtype ``keys``, -0.0 read as 0.0."""
    return (chunk.to(dtype) + 0.0).view(keys)


def _histogram(magnitudes: Sequence[Tensor], dtype: torch.dtype, keys: torch.dtype, shift: int, prefix: int | None) -> Tensor:
    """Counts of the 16-bit digit at ``shift`` of the keys whose higher bits equal ``prefix`` (None: all).
    The digits of consecutive chunks share a buffer of ``_CHUNK`` entries and one ``bincount``."""
    device = magnitudes[0].device
    counts = torch.zeros(_BUCKETS, dtype=torch.int64, device=device)
    digits = torch.empty(_CHUNK, dtype=torch.int32 if keys == torch.int16 else keys, device=device)
    size = 0
    for m in magnitudes:
        for _, chunk in _chunks(m):
            key = _keys(chunk, dtype, keys)
            if prefix is not None:
                key = key[(key >> (shift + _DIGITS)) == prefix]
            if size + len(key) > _CHUNK:
                counts += torch.bincount(digits[:size], minlength=_BUCKETS)
                size = 0
            torch.bitwise_right_shift(key, shift, out=digits[size : size + len(key)]).bitwise_and_(_BUCKETS - 1)
            size += len(key)
    return counts + torch.bincount(digits[:size], minlength=_BUCKETS)


def _check_keys(counts: Tensor, dtype: torch.dtype, keys: torch.dtype, width: int) -> None:
    """Raise, on every rank alike, if the top-digit histogram holds negative numbers, infinities or NaN."""
    infinity = int(torch.tensor(float("inf"), dtype=dtype).view(keys)) >> (width - _DIGITS)
    invalid = int(counts[infinity:].sum())
    if invalid:
        raise ValueError(f"magnitudes hold {invalid} negative, infinite or NaN entries; allowed: finite non-negative numbers.")


def _value(key: int, dtype: torch.dtype, keys: torch.dtype) -> float:
    return torch.tensor(key, dtype=keys).view(dtype).item()


def _key(value: float, dtype: torch.dtype, keys: torch.dtype) -> int:
    """The key of ``value``, a number that ``dtype`` holds exactly."""
    return int(torch.tensor(value, dtype=dtype).view(keys))


def _tie_counts(magnitudes: Sequence[Tensor], dtype: torch.dtype, keys: torch.dtype, value: int, largest_below: bool) -> Tensor:
    """[largest local key below ``value`` (-1: none, or not ``largest_below``), count of keys equal to
    ``value`` in each layer]."""
    device = magnitudes[0].device
    largest = torch.tensor(-1, dtype=torch.int64, device=device)
    counts = torch.zeros(len(magnitudes), dtype=torch.int64, device=device)
    for i, m in enumerate(magnitudes):
        for _, chunk in _chunks(m):
            key = _keys(chunk, dtype, keys)
            counts[i] += (key == value).sum()
            if largest_below:
                largest = torch.maximum(largest, torch.where(key < value, key, -1).max())
    return torch.cat([largest[None], counts])


def _takes(counts: Tensor, rank: int, count: int) -> list[int]:
    """How many of this rank's tied entries of each layer fall among the first ``count`` in layer,
    then rank order; ``counts`` is (ranks, layers)."""
    before = counts.T.reshape(-1).cumsum(0).view(counts.shape[1], counts.shape[0])[:, rank] - counts[rank]
    return (count - before).clamp(min=0).minimum(counts[rank]).tolist()


def _tie_mask(m: Tensor, dtype: torch.dtype, keys: torch.dtype, value: int, take: int) -> Tensor:
    """A bool mask shaped like ``m`` of its first ``take`` entries whose key equals ``value``."""
    mask = torch.zeros(m.shape, dtype=torch.bool, device=m.device)
    flat = mask.view(-1)
    for start, chunk in _chunks(m):
        tied = _keys(chunk, dtype, keys) == value
        found = int(tied.sum())
        if found > take:
            tied &= tied.cumsum(0) <= take
        flat[start : start + len(tied)] = tied
        take -= found
        if take <= 0:
            break
    return mask
