"""N:M fine-grained sparsity: at most N non-zeros in every group of M consecutive weights.

Groups run along the input dimension, as the GEMM of a sparse kernel sees them: M consecutive
input features of a Linear row, M consecutive input channels at one kernel position of a
convolution (the weight viewed as (out, kh, kw, in)). A weight whose input dimension is not a
multiple of M has no groups: it stays dense. The functions here take weights as (out, in, *kernel);
a weight stored (in, out), transformers' Conv1D, is passed as its (out, in) view
(:func:`sparsetrain.prunable.out_in`), so its groups run along its dimension 0.

Selection prunes k of the M magnitudes of each group, smallest first, ties by position (the
lower index is pruned first). As in the global selection (:func:`sparsetrain.selection.select`),
each group gets a threshold T (prune |w| <= T) and a mask of pruned ties: with v the group's k-th
smallest magnitude, T = v if exactly k magnitudes are <= v, else the largest magnitude below v
(0 if none) and the first tied entries complete the count. So an operator P_p(w; T) zeroes
exactly k weights per group and shrinks the survivors by their own group's T.

Packing (:func:`pack`, :func:`unpack`): N values per group and each value's position in its
group in ceil(log2 M) bits.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor, nn

from .selection import NonFiniteMagnitudes, Selection

_PATTERN = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")
MAX_M = 256  # a position fits in one byte
RANK_LIMIT = 16  # groups up to this size are ranked by comparisons, larger ones sorted


class NMPattern(NamedTuple):
    """An N:M pattern: at most ``n`` non-zeros in every group of ``m``. A tuple, so ``n, m = pattern``
    and ``pattern == (2, 4)`` hold; ``str(pattern)`` is ``"2:4"``. Build one with :func:`as_pattern`,
    which checks 1 <= n < m <= MAX_M."""

    n: int
    m: int

    def __str__(self) -> str:
        return f"{self.n}:{self.m}"


def parse_nm(text: str) -> NMPattern:
    """``"2:4"`` -> NMPattern(2, 4); one sentence naming the value otherwise."""
    match = _PATTERN.match(text) if isinstance(text, str) else None
    if match is None or not 1 <= int(match.group(1)) < int(match.group(2)) <= MAX_M:
        raise ValueError(f"nm={text!r} is not an N:M pattern; allowed: 'N:M' with integers 1 <= N < M <= {MAX_M}, e.g. '2:4'.")
    return NMPattern(int(match.group(1)), int(match.group(2)))


def validate_nm(n: int, m: int) -> NMPattern:
    """NMPattern(n, m) after checking 1 <= n < m <= MAX_M."""
    if any(isinstance(v, bool) or not isinstance(v, int) for v in (n, m)) or not 1 <= n < m <= MAX_M:
        raise ValueError(f"n={n!r}, m={m!r} is not an N:M pattern; allowed: integers 1 <= n < m <= {MAX_M}.")
    return NMPattern(n, m)


def as_pattern(value: Any) -> NMPattern:
    """The N:M pattern ``value`` stands for: ``"N:M"`` text, an (n, m) tuple or list, or an
    :class:`NMPattern`, checked as :func:`parse_nm` and :func:`validate_nm` check it; anything else
    is :func:`parse_nm`'s ValueError."""
    if isinstance(value, (tuple, list)) and len(value) == 2:  # an NMPattern too: built directly, unchecked
        return validate_nm(*value)
    return parse_nm(value)


def has_groups(shape: Sequence[int], m: int) -> bool:
    """Whether a weight of this shape splits into groups of m along its input dimension."""
    return len(shape) >= 2 and shape[1] % m == 0


def group_view(x: Tensor, m: int) -> Tensor:
    """(out, in, *kernel) -> (out, in / m, m, *kernel), a view: dimension 2 runs through one group."""
    return x.view(x.shape[0], x.shape[1] // m, m, *x.shape[2:])


def to_groups(x: Tensor, m: int) -> Tensor:
    """(out, in, *kernel) -> (out, *kernel, in / m, m): the last dimension is one group."""
    if x.dim() > 2:
        x = x.movedim(1, -1)
    return x.reshape(*x.shape[:-1], x.shape[-1] // m, m)


def from_groups(groups: Tensor, shape: Sequence[int]) -> Tensor:
    """The inverse of :func:`to_groups` for a weight of ``shape``."""
    x = groups.reshape(*groups.shape[:-2], -1)
    return (x.movedim(-1, 1) if len(shape) > 2 else x).contiguous()


def select_groups(magnitudes: Sequence[Tensor], k: int, m: int) -> Selection:
    """Prune k of every m grouped magnitudes of each layer: :meth:`GroupSelector.select` with a
    selector of its own."""
    return GroupSelector(m).select(magnitudes, k)


class _Layer(NamedTuple):
    """Where one layer's groups go in a :class:`GroupSelector`'s buffer, and its threshold tensor."""

    index: int  # the layer's position in the magnitudes
    begin: int  # its groups are the buffer's columns begin..stop-1
    stop: int
    grid: tuple[int, ...]  # its group grid, in its memory order
    source: Tensor  # (m, *grid): its magnitudes, grouped
    columns: Tensor  # (m, *grid): its columns of the buffer
    threshold: Tensor  # shaped and strided like the layer, rewritten at every call
    written: Tensor  # (m, *grid): the threshold tensor, grouped


class GroupSelector:
    """Selects k of every m grouped magnitudes, keeping its working buffer, the threshold tensors it
    returns and the views between them from call to call (fresh ones as large as the weights at every
    training step, and the views, cost more than the selection): a call overwrites the thresholds
    the previous call returned."""

    def __init__(self, m: int) -> None:
        self.m = m
        self._buffer: Tensor | None = None  # (m + 1, G): the groups as columns, and one spare row
        self._layers: list[_Layer] = []
        self._key: tuple | None = None  # the magnitudes the layers were laid out for

    def select(self, magnitudes: Sequence[Tensor], k: int) -> Selection:
        """Per layer a threshold tensor and a tie mask shaped like it (see the module docstring);
        0.0 and None for a layer without groups, and for every layer when k = 0. All layers' groups
        are selected at once, as the columns of one (m, G) tensor written in one pass, so the work is
        a few passes over contiguous rows whatever the number of layers; each layer's thresholds and
        ties are written back in its own layout in one pass. A NaN or an infinity in a layer with groups
        raises :class:`~sparsetrain.selection.NonFiniteMagnitudes` (when k > 0: the sort reads them)."""
        m = self.m
        if not 0 <= k <= m:
            raise ValueError(f"k={k} is out of range; allowed: 0 <= k <= m = {m}.")
        thresholds: list[float | Tensor] = [0.0] * len(magnitudes)
        ties: list[Tensor | None] = [None] * len(magnitudes)
        layers = self._laid_out(magnitudes) if k else []
        if not layers:
            return Selection(thresholds, ties)

        def fill() -> Tensor:
            for layer in layers:
                layer.columns.copy_(layer.source)
            return self._buffer[:m]

        ordered = sort_rows_(fill(), self._buffer[m])
        if not math.isfinite(ordered[-1].max()):  # the largest of the groups' largest values, NaN if a group holds one
            raise NonFiniteMagnitudes()
        v = ordered[k - 1]  # each group's k-th smallest
        tied = None
        if k == m or bool((ordered[k] > v).all()):  # no group has a tie across its k-th position
            threshold = v
        else:  # the sort has shuffled the buffer: the groups are written again
            v = v.clone()
            columns = fill()
            pruned = smallest_in_groups(columns, k)
            exact = (columns <= v).sum(0) == k
            below = (columns * (columns < v)).amax(0)  # magnitudes are >= 0
            threshold = torch.where(exact, v, below)
            tied = pruned & (columns > threshold)
        for layer in layers:
            layer.written.copy_(threshold[layer.begin : layer.stop].view(1, *layer.grid).expand(m, *layer.grid))
            thresholds[layer.index] = layer.threshold
            if tied is not None and bool(tied[:, layer.begin : layer.stop].any()):
                magnitude = magnitudes[layer.index]
                ties[layer.index] = _laid_out_like(magnitude, _columns_of(tied[:, layer.begin : layer.stop], magnitude, m), m)
        return Selection(thresholds, ties)

    def _laid_out(self, magnitudes: Sequence[Tensor]) -> list[_Layer]:
        """The layers with groups, their columns in the (m + 1, G) buffer and their threshold tensors:
        kept while the magnitudes are the same tensors (storage, shape, strides, dtype)."""
        key = tuple((x.data_ptr(), x.shape, x.stride(), x.dtype, x.device) for x in magnitudes)
        if key == self._key:
            return self._layers
        m = self.m
        grouped = [i for i, x in enumerate(magnitudes) if has_groups(x.shape, m)]
        earlier = {layer.index: layer.threshold for layer in self._layers}
        self._key, self._layers = key, []
        if not grouped:
            return self._layers
        dtype = functools.reduce(torch.promote_types, (magnitudes[i].dtype for i in grouped))
        device = magnitudes[grouped[0]].device
        spans, start = [], 0
        for i in grouped:
            spans.append((i, start, start + magnitudes[i].numel() // m))
            start = spans[-1][2]
        if not _fits(self._buffer, (m + 1, start), dtype, device):
            self._buffer = torch.empty(m + 1, start, dtype=dtype, device=device)
        for i, begin, stop in spans:
            x = magnitudes[i]
            columns = _columns_of(self._buffer[:m, begin:stop], x, m)
            threshold = earlier.get(i)
            if not _fits(threshold, x.shape, dtype, x.device) or threshold.stride() != x.stride():
                threshold = torch.empty_like(x, dtype=dtype)
            self._layers.append(_Layer(i, begin, stop, tuple(columns.shape[1:]), _groups_in_memory_order(x, m), columns,
                                       threshold, _groups_in_memory_order(threshold, m)))
        return self._layers


def _fits(x: Tensor | None, shape: Sequence[int], dtype: torch.dtype, device: torch.device) -> bool:
    return x is not None and x.shape == tuple(shape) and x.dtype == dtype and x.device == device


def _grid_order(x: Tensor, m: int) -> list[int]:
    """The dimensions of ``x``'s group grid (out, in / m, *kernel), outermost in memory first."""
    grid_strides = group_view(x, m).movedim(2, 0).stride()[1:]
    return sorted(range(len(grid_strides)), key=lambda d: -grid_strides[d])


def _groups_in_memory_order(x: Tensor, m: int) -> Tensor:
    """(m, *grid) view of ``x``'s groups, the grid's dimensions in ``x``'s memory order (so a copy
    reads ``x`` as it lies: a weight stored (in, out) is read row by row, not column by column)."""
    return group_view(x, m).movedim(2, 0).permute(0, *(1 + d for d in _grid_order(x, m)))


def _columns_of(columns: Tensor, x: Tensor, m: int) -> Tensor:
    """An (m or 1, G) slice of columns viewed as (m or 1, *grid in ``x``'s memory order)."""
    grid = (x.shape[0], x.shape[1] // m, *x.shape[2:])
    return columns.reshape(columns.shape[0], *(grid[d] for d in _grid_order(x, m)))


def _laid_out_like(x: Tensor, grouped: Tensor, m: int) -> Tensor:
    """A new tensor shaped and strided like ``x`` holding ``grouped``, an (m, *grid in memory order) tensor."""
    out = torch.empty_like(x, dtype=grouped.dtype)
    _groups_in_memory_order(out, m).copy_(grouped)
    return out


def sort_rows_(columns: Tensor, spare: Tensor) -> list[Tensor]:
    """The rows of an (m, G) tensor sorted within each column, smallest first, in place: up to
    RANK_LIMIT rows by a sorting network (a minimum and a maximum of two rows per compare-exchange:
    10 passes over G values for m = 4), the minimum written into ``spare``, a row as long as the
    others (the rows returned are ``columns``' rows and ``spare`` in some order, one of them left
    over); larger groups by torch.sort."""
    if columns.shape[0] > RANK_LIMIT:
        return list(torch.sort(columns, dim=0).values.unbind(0))
    rows = list(columns.unbind(0))
    for i, j in sorting_network(columns.shape[0]):
        torch.minimum(rows[i], rows[j], out=spare)
        torch.maximum(rows[i], rows[j], out=rows[j])
        rows[i], spare = spare, rows[i]
    return rows


@functools.cache
def sorting_network(m: int) -> tuple[tuple[int, int], ...]:
    """Compare-exchange pairs (i, j), i < j, that sort m values: Batcher's odd-even merge sort over
    the next power of two n, whose entries at m..n-1 stand for +inf (their pairs, no-ops, are left out)."""
    n = 1 << max(0, m - 1).bit_length()
    pairs = []
    merged = 1  # sorted runs of this length are merged into runs of twice it
    while merged < n:
        step = merged
        while step >= 1:
            for start in range(step % merged, n - step, 2 * step):
                for i in range(start, start + min(step, n - start - step)):
                    if i // (2 * merged) == (i + step) // (2 * merged) and i + step < m:
                        pairs.append((i, i + step))
            step //= 2
        merged *= 2
    return tuple(pairs)


def smallest_in_groups(columns: Tensor, k: int) -> Tensor:
    """True at the k smallest entries of each column of an (m, G) tensor, the lower position first
    on ties. Up to RANK_LIMIT rows, by rank: r_i = #{j < i: g_j <= g_i} + #{j > i: g_j < g_i}, pruned
    where r_i < k (m(m - 1) comparisons of contiguous rows, several times faster than a stable sort
    of small groups); larger groups by a stable sort."""
    m = columns.shape[0]
    if m > RANK_LIMIT:
        order = torch.sort(columns, dim=0, stable=True).indices
        return torch.zeros_like(columns, dtype=torch.bool).scatter_(0, order[:k], True)
    entries = columns.unbind(0)
    ranks = torch.zeros_like(columns, dtype=torch.uint8)
    for i in range(m):
        for j in range(m):
            if j != i:
                ranks[i] += (entries[j] <= entries[i]) if j < i else (entries[j] < entries[i])
    return ranks < k


def pattern_holds(weight: Tensor, n: int, m: int) -> bool:
    """Whether every group of m of ``weight`` holds at most n non-zeros (False without groups)."""
    if not has_groups(weight.shape, m):
        return False
    return bool(((to_groups(weight.detach(), m) != 0).sum(-1) <= n).all())


def index_bits(m: int) -> int:
    """Bits that hold a position in a group of m."""
    return max(1, math.ceil(math.log2(m)))


def pack(weight: Tensor, n: int, m: int) -> tuple[Tensor, Tensor]:
    """(values, positions) of a weight holding the n:m pattern: n values per group in group order
    (the non-zeros first, padded with zeros of the group), and their positions in ceil(log2 m)
    bits each, packed into bytes."""
    if not pattern_holds(weight, n, m):
        raise ValueError(f"the weight of shape {tuple(weight.shape)} does not hold the {n}:{m} pattern; "
                         f"allowed: at most {n} non-zeros in every group of {m} along the input dimension.")
    groups = to_groups(weight.detach().cpu(), m)
    chosen = torch.argsort((groups == 0).to(torch.uint8), dim=-1, stable=True)[..., :n].sort(-1).values
    values = groups.gather(-1, chosen).reshape(-1)
    positions = chosen.reshape(-1).to(torch.uint8).numpy()
    bits = (positions[:, None] >> np.arange(index_bits(m), dtype=np.uint8)) & 1
    return values, torch.from_numpy(np.packbits(bits.reshape(-1)))


def unpack(values: Tensor, packed: Tensor, shape: Sequence[int], n: int, m: int) -> Tensor:
    """The dense weight of ``shape`` from :func:`pack`'s output."""
    width = index_bits(m)
    bits = np.unpackbits(packed.numpy(), count=values.numel() * width).reshape(-1, width)
    positions = (bits.astype(np.int64) << np.arange(width)).sum(1)
    grouped_shape = _grouped_shape(shape, m)
    groups = torch.zeros(grouped_shape, dtype=values.dtype)
    groups.scatter_(-1, torch.from_numpy(positions).reshape(*grouped_shape[:-1], n), values.reshape(*grouped_shape[:-1], n))
    return from_groups(groups, shape)


def _grouped_shape(shape: Sequence[int], m: int) -> tuple[int, ...]:
    """The shape :func:`to_groups` gives a weight of ``shape``."""
    out, inputs, *kernel = shape
    return (out, *kernel, inputs // m, m)


def to_semi_structured(model: nn.Module) -> nn.Module:
    """Give every Linear layer whose weight holds 2:4 a PyTorch semi-structured sparse weight
    (``torch.sparse.to_sparse_semi_structured``, run by the GPU's sparse tensor cores). Needs
    CUDA; the layers' weights must be float16 or bfloat16 on the GPU and meet PyTorch's shape
    rules (PyTorch names the rule a layer breaks). Returns the model, changed in place."""
    if not torch.cuda.is_available():
        raise RuntimeError("to_semi_structured needs a CUDA GPU (torch.cuda.is_available() is False); "
                           "allowed: a model on a CUDA device of compute capability 8.0 or newer.")
    from torch.sparse import to_sparse_semi_structured

    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and pattern_holds(module.weight, 2, 4):
            if module.weight.device.type != "cuda":
                raise RuntimeError(f"layer {name!r} is on {module.weight.device}; allowed: a model moved to CUDA first.")
            module.weight = nn.Parameter(to_sparse_semi_structured(module.weight.detach()), requires_grad=False)
    return model
