"""The unstructured engine on weights sharded by FSDP2 (``fully_shard``).

Every rank holds a block of dim-0 rows of each weight: a DTensor placed ``Shard(0)`` on a 1-D mesh,
rows split as ``torch.chunk`` splits them (ranks past the last row hold none). The thresholds are
selected over the local shards by :func:`~sparsetrain.sharded_selection.select_sharded`, equal on
every rank; the pruned ties travel as, per layer, the tie value and the count of leading entries
(flat order of the full weight) they cover. A forward sees the unsharded weight, so what else it
needs (ST-3's rescale, N:M groups) it computes from that weight, unless held between updates
(``update_every`` > 1): then a rescale is computed over the shards at each update, and N:M thresholds
and ties (the groups lie within a rank's rows) are kept as each rank's rows and gathered by the
forward. Finalizing bakes each rank's shard
in place and gives the layers back their plain ``weight``, the FSDP2 wrapping kept (torch 2.13's
FSDP2 records each parameter's module, which is updated here).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ...prunable import is_sharded

if TYPE_CHECKING:  # imported where used: loading it takes most of a second, and only sharded weights need it
    from torch.distributed.tensor import DTensor


def local_shard(w: Tensor) -> Tensor:
    """This rank's rows of ``w`` (``w`` itself when it is not sharded)."""
    return w.to_local() if is_sharded(w) else w


def shard_group(weights: Sequence[Tensor], names: Sequence[str]) -> dist.ProcessGroup | None:
    """The process group the weights are sharded over (None: none is sharded); one sentence naming
    the layer when they are not all rows of one 1-D mesh."""
    sharded = [is_sharded(w) for w in weights]
    if not any(sharded):
        return None
    from torch.distributed.tensor import Shard

    meshes = set()
    for name, w, flag in zip(names, weights, sharded):
        if not flag or w.device_mesh.ndim != 1 or tuple(w.placements) != (Shard(0),):
            how = "not sharded" if not flag else f"placed {tuple(w.placements)} on a {w.device_mesh.ndim}-D mesh"
            raise ValueError(f"layer {name!r} is {how}; allowed: every prunable layer sharded by fully_shard "
                             "along dim 0 on one 1-D mesh (fully_shard after create(), then the optimizer, then bind()).")
        meshes.add(tuple(w.device_mesh.mesh.tolist()))
    if len(meshes) > 1:
        raise ValueError(f"the prunable layers are sharded over different ranks {sorted(meshes)}; allowed: one set of "
                         "ranks for all of them.")
    return weights[0].device_mesh.get_group()


def forward_dtype(model: nn.Module, name: str, w: Tensor) -> torch.dtype:
    """The dtype of the unsharded weight ``w`` of layer ``name`` in the forward: the ``param_dtype`` of the
    ``MixedPrecisionPolicy`` given to the ``fully_shard`` call that manages it (the layer's nearest module
    sharded by ``fully_shard``, itself included), else ``w``'s own. FSDP2 keeps the policy in its module
    state, for which it has no public accessor."""
    from torch.distributed.fsdp import FSDPModule

    parts = name.split(".")
    for end in range(len(parts), -1, -1):
        module = model.get_submodule(".".join(parts[:end]))
        if isinstance(module, FSDPModule):
            return module._get_fsdp_state()._mp_policy.param_dtype or w.dtype
    return w.dtype


def first_row(w: DTensor) -> int:
    """The index of this rank's first row of ``w`` in the full weight (``torch.chunk``'s split)."""
    rows = w.shape[0]
    per_rank = -(-rows // w.device_mesh.size())
    return min(w.device_mesh.get_local_rank() * per_rank, rows)


def gather_rows(local: Tensor, rows: int, group: dist.ProcessGroup) -> Tensor:
    """The full tensor of ``rows`` rows whose dim-0 block on each rank is ``local`` (split as
    ``torch.chunk`` splits a weight's rows): one ``all_gather`` of blocks padded to equal size."""
    world = dist.get_world_size(group)
    per_rank = -(-rows // world)
    carried = local.to(torch.uint8) if local.dtype == torch.bool else local  # gloo gathers no bool
    padded = carried.new_zeros((per_rank, *local.shape[1:]))
    padded[: local.shape[0]] = carried
    blocks = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(blocks, padded, group=group)
    full = torch.cat(blocks)[:rows]
    return full.bool() if local.dtype == torch.bool else full


def sharded_like(local: Tensor, w: DTensor) -> DTensor:
    """``local``, this rank's rows of a tensor shaped like ``w``, as a DTensor placed like ``w``
    (``torch.distributed.checkpoint`` saves it in blocks and loads it on any number of ranks)."""
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(local, w.device_mesh, w.placements, run_check=False, shape=w.shape, stride=w.stride())


def rows_of(value: Tensor, w: DTensor) -> Tensor:
    """This rank's rows of ``value``, a tensor shaped like ``w``: a DTensor's local block, or the
    rows of a full tensor (a state saved without FSDP)."""
    if is_sharded(value):
        return value.to_local()
    start = first_row(w)
    return value[start : start + local_shard(w).shape[0]]


def global_ties(magnitudes: Sequence[Tensor], ties: Sequence[Tensor | None], weights: Sequence[DTensor],
                group: dist.ProcessGroup) -> tuple[float, list[int]]:
    """The tie value v and, per layer, how many leading entries of the full weight (flat order) the
    pruned ties span (0: none), from each rank's local tie masks. One ``all_reduce`` (MAX)."""
    local = torch.zeros(1 + len(ties), dtype=torch.float64)  # [v, ends]
    for i, (mag, mask, w) in enumerate(zip(magnitudes, ties, weights)):
        if mask is not None:
            positions = mask.reshape(-1).nonzero()
            local[0] = float(mag.reshape(-1)[positions[0, 0]])
            row = w.numel() // max(w.shape[0], 1)
            local[1 + i] = first_row(w) * row + int(positions[-1, 0]) + 1
    dist.all_reduce(local, op=dist.ReduceOp.MAX, group=group)
    return float(local[0]), [int(end) for end in local[1:].tolist()]


def total(counts: Sequence[int], group: dist.ProcessGroup) -> list[int]:
    """The sums over the ranks of ``counts``: one ``all_reduce``."""
    values = torch.tensor(list(counts), dtype=torch.int64)
    dist.all_reduce(values, group=group)
    return values.tolist()


def any_rank(flags: Sequence[bool], group: dist.ProcessGroup) -> list[bool]:
    """For each flag, whether it is set on some rank: one ``all_reduce``."""
    return [bool(count) for count in total([int(flag) for flag in flags], group)]


def channel_sums(values: Tensor, w: DTensor, transposed: bool, group: dist.ProcessGroup) -> Tensor:
    """Per output channel of the full weight, the sum of ``values`` (shaped like this rank's shard)
    over the other dimensions, summed over the ranks: one ``all_reduce`` of a vector as long as the
    output channels."""
    out = w.shape[1] if transposed else w.shape[0]
    sums = torch.zeros(out, dtype=values.dtype, device=values.device)
    if values.numel():
        if transposed:
            sums += values.reshape(values.shape[0], values.shape[1], -1).sum((0, 2))
        else:
            start = first_row(w)
            sums[start : start + values.shape[0]] = values.reshape(values.shape[0], -1).sum(1)
    dist.all_reduce(sums, group=group)
    return sums


def unparametrize(model: nn.Module, module: nn.Module, name: str = "weight") -> None:
    """Remove the (baked) parametrization of ``module.<name>`` under FSDP2: the sharded original
    becomes ``module.<name>`` again, the layer keeps its FSDP class, and FSDP2's record of where the
    parameter lives follows it."""
    original = module.parametrizations[name].original
    holder = next(cls for cls in type(module).__mro__ if name in vars(cls))  # the parametrized class
    delattr(holder, name)
    del module.parametrizations[name]
    module.register_parameter(name, original)
    if not module.parametrizations:
        del module.parametrizations
        plain = holder.__bases__[0]
        module.__class__ = plain if type(module) is holder else _fsdp_class(plain)
    for info in _module_infos(model, original):
        info.module, info.param_name = module, name


def _fsdp_class(cls: type) -> type:
    """FSDP2's class for a module of class ``cls`` (as ``fully_shard`` makes it)."""
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.fsdp._fully_shard._fully_shard import get_cls_to_fsdp_cls

    classes = get_cls_to_fsdp_cls()
    if cls not in classes:
        classes[cls] = type(f"FSDP{cls.__name__}", (FSDPModule, cls), {})
    return classes[cls]


def _module_infos(model: nn.Module, param: Tensor) -> list:
    """FSDP2's records (module, name) of where ``param`` lives."""
    from torch.distributed.fsdp import FSDPModule

    infos = []
    for module in model.modules():
        if isinstance(module, FSDPModule):
            group = module._get_fsdp_state()._fsdp_param_group
            infos += [p._module_info for p in (group.fsdp_params if group else []) if p.sharded_param is param]
    return infos
