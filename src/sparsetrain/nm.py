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


def select_groups(magnitude: Tensor, k: int, m: int) -> tuple[Tensor | float, Tensor | None]:
    """Prune k of every m grouped magnitudes: (T, ties) shaped like ``magnitude`` (see the module
    docstring); (0.0, None) when k = 0 or the weight has no groups."""
    if not 0 <= k <= m:
        raise ValueError(f"k={k} is out of range; allowed: 0 <= k <= m = {m}.")
    if k == 0 or not has_groups(magnitude.shape, m):
        return 0.0, None
    groups = to_groups(magnitude, m)
    pruned = smallest_in_groups(groups, k)
    v = torch.where(pruned, groups, 0).amax(-1, keepdim=True)  # the k-th smallest (magnitudes are >= 0)
    exact = (groups <= v).sum(-1, keepdim=True) == k
    below = torch.where(groups < v, groups, 0).amax(-1, keepdim=True)
    threshold = torch.where(exact, v, below)
    ties = pruned & (groups > threshold)
    shape = magnitude.shape
    return from_groups(threshold.expand_as(groups), shape), (from_groups(ties, shape) if bool(ties.any()) else None)


def smallest_in_groups(groups: Tensor, k: int) -> Tensor:
    """True at the k smallest entries of each group (last dimension), the lower position first on
    ties. Up to RANK_LIMIT entries a group, by rank: r_i = #{j < i: g_j <= g_i} + #{j > i: g_j < g_i},
    pruned where r_i < k (M(M - 1) comparisons, several times faster than a stable sort of small groups)."""
    m = groups.shape[-1]
    if m > RANK_LIMIT:
        order = torch.sort(groups, dim=-1, stable=True).indices
        return torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, order[..., :k], True)
    entries = groups.unbind(-1)
    ranks = [
        sum(((entries[j] <= entries[i]) if j < i else (entries[j] < entries[i])).to(torch.uint8) for j in range(m) if j != i)
        for i in range(m)
    ]
    return torch.stack(ranks, -1) < k


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
    values = groups.gather(-1, chosen).reshape(-1).clone()
    positions = chosen.reshape(-1).to(torch.uint8).numpy()
    bits = (positions[:, None] >> np.arange(index_bits(m), dtype=np.uint8)) & 1
    return values, torch.from_numpy(np.packbits(bits.reshape(-1)))


def unpack(values: Tensor, packed: Tensor, shape: Sequence[int], n: int, m: int) -> Tensor:
    """The dense weight of ``shape`` from :func:`pack`'s output."""
    width = index_bits(m)
    bits = np.unpackbits(packed.numpy(), count=values.numel() * width).reshape(-1, width)
    positions = (bits.astype(np.int64) << np.arange(width)).sum(1)
    dense_shape = (*_grouped_shape(shape, m),)
    groups = torch.zeros(dense_shape, dtype=values.dtype)
    groups.scatter_(-1, torch.from_numpy(positions).reshape(*dense_shape[:-1], n), values.reshape(*dense_shape[:-1], n))
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
