"""N:M fine-grained sparsity: at most N non-zeros in every group of M consecutive weights.

Groups run along the input dimension, as the GEMM of a sparse kernel sees them: M consecutive
input features of a Linear row, M consecutive input channels at one kernel position of a
convolution (the weight viewed as (out, kh, kw, in)). A weight whose input dimension is not a
multiple of M has no groups: it stays dense.

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

import math
import re
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor, nn

from .selection import Selection

_PATTERN = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")
MAX_M = 256  # a position fits in one byte
RANK_LIMIT = 16  # groups up to this size are ranked by comparisons, larger ones sorted


def parse_nm(text: str) -> tuple[int, int]:
    """``"2:4"`` -> (2, 4); one sentence naming the value otherwise."""
    match = _PATTERN.match(text) if isinstance(text, str) else None
    if match is None or not 1 <= int(match.group(1)) < int(match.group(2)) <= MAX_M:
        raise ValueError(f"nm={text!r} is not an N:M pattern; allowed: 'N:M' with integers 1 <= N < M <= {MAX_M}, e.g. '2:4'.")
    return int(match.group(1)), int(match.group(2))


def validate_nm(n: int, m: int) -> tuple[int, int]:
    """Return (n, m) after checking 1 <= n < m <= MAX_M."""
    if any(isinstance(v, bool) or not isinstance(v, int) for v in (n, m)) or not 1 <= n < m <= MAX_M:
        raise ValueError(f"n={n!r}, m={m!r} is not an N:M pattern; allowed: integers 1 <= n < m <= {MAX_M}.")
    return n, m


def has_groups(shape: Sequence[int], m: int) -> bool:
    """Whether a weight of this shape splits into groups of m along its input dimension."""
    return len(shape) >= 2 and shape[1] % m == 0


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
    """Prune k of every m grouped magnitudes of each layer: per layer a threshold tensor and a tie
    mask shaped like it (see the module docstring); 0.0 and None for a layer without groups, and for
    every layer when k = 0. All layers' groups are selected at once, as the columns of one (m, G)
    tensor, so the work is a few passes over contiguous rows whatever the number of layers."""
    if not 0 <= k <= m:
        raise ValueError(f"k={k} is out of range; allowed: 0 <= k <= m = {m}.")
    thresholds: list[float | Tensor] = [0.0] * len(magnitudes)
    ties: list[Tensor | None] = [None] * len(magnitudes)
    grouped = [i for i, magnitude in enumerate(magnitudes) if k and has_groups(magnitude.shape, m)]
    if not grouped:
        return Selection(thresholds, ties)
    rows = [to_groups(magnitudes[i], m).reshape(-1, m) for i in grouped]
    columns = torch.cat(rows).T.contiguous()  # (m, G): one group per column
    pruned = smallest_in_groups(columns, k)
    v = (columns * pruned).amax(0)  # the k-th smallest (magnitudes are >= 0)
    exact = (columns <= v).sum(0) == k
    below = (columns * (columns < v)).amax(0)
    threshold = torch.where(exact, v, below)
    tied = pruned & (columns > threshold)
    any_tied = bool(tied.any())
    start = 0
    for i, layer_rows in zip(grouped, rows):
        shape, stop = magnitudes[i].shape, start + len(layer_rows)
        grouped_shape = _grouped_shape(shape, m)
        thresholds[i] = from_groups(threshold[start:stop].view(*grouped_shape[:-1], 1).expand(grouped_shape), shape)
        layer_ties = tied[:, start:stop]
        if any_tied and bool(layer_ties.any()):
            ties[i] = from_groups(layer_ties.T.reshape(grouped_shape), shape)
        start = stop
    return Selection(thresholds, ties)


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
