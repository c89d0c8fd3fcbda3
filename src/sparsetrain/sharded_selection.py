"""Exact global magnitude selection over weights sharded across processes, without gathering them.

:func:`select_sharded` returns on every rank what ``select(magnitudes, s, "global")`` returns on the
concatenation of all ranks' shards: the same thresholds, and the tie masks cut to the rank's shards.
The global order is layer, then rank, then flat index: the flat order of the unsharded weights when,
as with FSDP2, every rank holds a contiguous block of dim-0 rows, in rank order.

Radix selection on the IEEE bits: for x >= 0 the bit pattern read as an integer (the key) grows with
x. Each round histograms the next 16 bits of the local keys that share the prefix found so far, sums
the histograms across ranks (``all_reduce``) and extends the prefix by the bucket holding position k,
until the key of v, the k-th smallest magnitude, is exact: 1 round for 16-bit floats, 2 for float32,
4 for float64. Only when ties at v straddle k, one ``all_gather`` of each rank's per-layer counts of
keys equal to v (and of its largest key below v, unless the last histogram shows the largest
magnitude below v) tells every rank how many of its own tied entries fall among the first
r = k - #(m < v), and one more pass marks them. Every rank decides from the same reduced counts.
Shards are read in chunks of ``_CHUNK`` entries, so the temporaries stay O(chunk + 2^16) beside
the output masks.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from functools import reduce

import torch
import torch.distributed as dist
from torch import Tensor

from .selection import Selection, prune_count

_CHUNK = 1 << 20
_DIGITS = 16
_BUCKETS = 1 << _DIGITS
_KEYS = {torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.float32: torch.int32, torch.float64: torch.int64}


def select_sharded(magnitudes: Sequence[Tensor], sparsity: float, group: dist.ProcessGroup | None = None) -> Selection:
    """``select(magnitudes, sparsity, "global")`` over the shards of all ranks in ``group``.

    ``magnitudes`` holds this rank's shard (possibly empty) of every layer, in the same layer order
    on every rank. The thresholds are equal on every rank; ``ties[i]`` is shaped like this rank's
    shard of layer i, None where the rank prunes none of its entries equal to v. Without an
    initialised torch.distributed, or in a world of one, it selects over the local tensors alone.
    Collectives: one ``all_reduce`` per 16 bits of the dtype (1, 2 or 4; float32: 2), one
    ``all_gather`` more when ties straddle k, on the tensors' device. Local passes: as many, plus
    at most two when ties straddle k.
    """
    if not 0.0 <= sparsity <= 1.0:
        raise ValueError(f"sparsity={sparsity!r} is out of range; allowed: a number in [0, 1].")
    if sparsity == 0.0 or not magnitudes:
        return _unpruned(len(magnitudes))
    dtype = reduce(torch.promote_types, [m.dtype for m in magnitudes])
    if dtype not in _KEYS:
        raise ValueError(f"magnitudes of dtype {dtype} are not supported; allowed: float16, bfloat16, float32, float64.")
    keys = _KEYS[dtype]
    width = keys.itemsize * 8
    world = dist.get_world_size(group) if dist.is_available() and dist.is_initialized() else 1

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


def _unpruned(layers: int) -> Selection:
    return Selection([0.0] * layers, [None] * layers)


def _chunks(m: Tensor, start: int = 0) -> Iterator[tuple[int, Tensor]]:
    """(start, entries) of consecutive blocks of at most ``_CHUNK`` entries of ``m`` in flat (row-major)
    order; a non-contiguous ``m`` is copied a block of rows (or a piece of a row) at a time."""
    m = m.detach()
    if m.is_contiguous() or m.dim() < 2:
        flat = m.reshape(-1)
        for i in range(0, flat.numel(), _CHUNK):
            yield start + i, flat[i : i + _CHUNK]
    elif m.numel():
        row = m[0].numel()
        if row > _CHUNK:
            for i in range(len(m)):
                yield from _chunks(m[i], start + i * row)
        else:
            for i in range(0, len(m), _CHUNK // row):
                yield start + i * row, m[i : i + _CHUNK // row].reshape(-1)


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
    """Raise, on every rank alike, if the top-digit histogram holds negative numbers or NaN."""
    infinity = int(torch.tensor(float("inf"), dtype=dtype).view(keys)) >> (width - _DIGITS)
    invalid = int(counts[infinity + 1 :].sum())
    if invalid:
        raise ValueError(f"magnitudes hold {invalid} negative or NaN entries; allowed: non-negative numbers.")


def _value(key: int, dtype: torch.dtype, keys: torch.dtype) -> float:
    return torch.tensor(key, dtype=keys).view(dtype).item()


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
