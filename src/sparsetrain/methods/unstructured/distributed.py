"""The unstructured engine across processes: weights sharded by FSDP2 (the thresholds selected over
every rank's shards, see :mod:`.sharding`) and replicated by DDP (every rank takes rank 0's selection)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from ...nm import has_groups, select_groups
from ...operators import Threshold, kept_mask, threshold_operator
from ...prunable import out_in
from ...selection import Selection, layer_sparsities, prune_count
from ...sharded_selection import ShardedSelection, ShardedSelector
from .config import PER_LAYER, RESCALE_EPS
from .sharding import any_rank, channel_sums, first_row, global_ties, local_shard, rows_of, sharded_like
from .weight import SparseWeight, stored


class ShardedEngine:
    """The :class:`~.engine.Sparsifier`'s work on weights sharded by FSDP2: selection over the shards,
    the pruned ties as spans of the full weight, baking and loading each rank's shard."""

    def _local_zeros(self, param: SparseWeight, w: Tensor, transposed: bool) -> int:
        """Entries of this rank's shard of ``w`` that the forward prunes (sharded weights)."""
        shard = local_shard(w)
        if self._finalized or param.frozen:
            return int((shard == 0).sum())
        seen = param.as_forward(shard)
        if param.groups is not None:
            threshold, ties = self._local_groups(param, w, seen, transposed)
            return int((~kept_mask(seen, threshold, ties)).sum())
        return int((~kept_mask(param.normalised(seen), param.threshold, param.ties)).sum())


    @torch.no_grad()
    def _zero_pruned_shards(self) -> None:
        """Sharded weights in the fixed-mask phase: the optimizer's momentum may have moved pruned
        entries; they are set back to 0 (the forward reads the mask off the zeros)."""
        for param, w in zip(self._params, self._weights):
            if param.shard_mask is not None:
                local_shard(w).mul_(param.shard_mask)


    @torch.no_grad()
    def _reselect_sharded(self, sparsity: float, weights: Sequence[Tensor], group: dist.ProcessGroup,
                          exact: bool = False) -> None:
        """:meth:`_reselect` for weights sharded by FSDP2: the threshold of the scope selected over every
        rank's shards, equal on every rank. N:M groups (which lie within a shard) and ST-3's rescale are
        left to the forward, unless held between updates (``update_every`` > 1): then each rank selects
        the groups of its rows, and the forward gathers them. Selected on the shards as the forward sees
        them (rounded under mixed precision), or, ``exact``, as they are (for baking them)."""
        config = self.config
        shards = [local_shard(w) for w in weights]
        self._mark_sharded()
        held = config.update_every > 1
        if config.nm is not None and not held:  # the forward selects the groups
            self._set_groups(sparsity, weights)
            for param, shard in zip(self._params, shards):
                param.choose(0.0, None, shard)  # no threshold tensor as large as the weight kept
            self._hold_rescales(weights, group)
            return
        seen = shards if exact else [param.as_forward(shard) for param, shard in zip(self._params, shards)]
        if config.nm is not None:  # each rank selects from its own rows: a NaN or an infinity on one rank stops every rank
            self._set_groups(sparsity, weights)
            self._check_finite_shards(any_rank([not bool(torch.isfinite(rows).all()) for rows in seen], group))
            for param, w, shard, rows, transposed in zip(self._params, weights, shards, seen, self._transposed):
                param.choose(*self._groups_of(param, w, rows, transposed), shard)
            self._hold_groups([param.ties for param in self._params], group)
            if not exact:  # baking computes the rescale it needs
                self._hold_rescales(weights, group)
            return
        magnitudes = [param.normalised(rows).abs() for param, rows in zip(self._params, seen)]
        try:
            chosen = self._select_shards(magnitudes, sparsity, weights, group)
        except ValueError:  # an infinite or NaN magnitude on some rank: every rank is here
            self._check_finite_shards(any_rank([not bool(torch.isfinite(m).all()) for m in magnitudes], group))
            raise
        spans = self._spans(magnitudes, chosen.ties, weights, group) if chosen.straddles else [(0.0, 0)] * len(weights)
        for param, shard, threshold, ties, span in zip(self._params, shards, chosen.thresholds, chosen.ties, spans):
            param.choose(threshold, ties, shard, span)
        if not exact:  # baking computes the rescale it needs
            self._hold_rescales(weights, group)

    def _set_groups(self, sparsity: float, weights: Sequence[Tensor]) -> None:
        """Tell each weight's parametrization its N:M groups' (k, m) for ``sparsity``, after checking that no
        group straddles two ranks' rows (one sentence naming the layer)."""
        m = self.config.nm.m
        for name, param, w, transposed in zip(self.names, self._params, weights, self._transposed):
            rows = -(-w.shape[0] // w.device_mesh.size())
            if transposed and has_groups(out_in(w, True).shape, m) and rows % m:
                raise ValueError(f"layer {name!r} (stored (in, out)) has {rows} input rows per shard, so groups of "
                                 f"{m} straddle the shards; allowed: a rank count that splits its "
                                 f"{w.shape[0]} rows into multiples of {m}.")
            param.groups = (prune_count(sparsity, m), m)

    def _hold_groups(self, ties: Sequence[Tensor | None], group: dist.ProcessGroup) -> None:
        """Mark the N:M thresholds and ties set on every weight as held until the next update (this rank's
        rows of them); which layers have ties on some rank: one ``all_reduce``."""
        for param, somewhere in zip(self._params, any_rank([t is not None for t in ties], group)):
            param.held_over, param.ties_somewhere = group, somewhere

    def _hold_rescales(self, weights: Sequence[Tensor], group: dist.ProcessGroup,
                       saved: Sequence[Tensor | None] = ()) -> None:
        """With ``update_every`` > 1, ST-3's rescale of every full weight, kept until the next update (the
        same on every rank; ``saved``, a state's rescales, where it holds one for every weight); otherwise
        none is kept (the forward computes it from the unsharded weight)."""
        held = self.config.rescale and self.config.update_every > 1
        restored = held and len(saved) == len(weights) and all(r is not None for r in saved)
        for i, (param, w, transposed) in enumerate(zip(self._params, weights, self._transposed)):
            if not held or restored:
                param.rescale = saved[i].to(local_shard(w).device) if restored else None
                continue
            shard = local_shard(w)
            kept = kept_mask(param.normalised(param.as_forward(shard)), param.threshold, param.ties)
            rescale = self._channel_rescale(w, shard, kept, transposed, group)
            param.rescale = rescale.view(1, -1) if transposed else rescale.view(-1, *([1] * (w.dim() - 1)))

    def _select_shards(self, magnitudes: Sequence[Tensor], sparsity: float, weights: Sequence[Tensor],
                       group: dist.ProcessGroup) -> ShardedSelection:
        """The selection of the scope over every rank's shards, by selectors kept from step to step
        (one per layer for the scopes "layer" and "erk"), whose samples of the magnitudes save a
        collective round at most steps."""
        if not self._shard_selectors:
            count = len(magnitudes) if self.config.scope in PER_LAYER else 1
            self._shard_selectors = [ShardedSelector() for _ in range(count)]
        if self.config.scope not in PER_LAYER:
            return self._shard_selectors[0].select(magnitudes, sparsity, group)
        shares = layer_sparsities([tuple(w.shape) for w in weights], sparsity, self.config.scope)
        parts = [selector.select([m], share, group) for selector, m, share in zip(self._shard_selectors, magnitudes, shares)]
        return ShardedSelection([p.thresholds[0] for p in parts], [p.ties[0] for p in parts],
                                straddles=any(p.straddles for p in parts))


    def _mark_sharded(self) -> None:
        """Tell each weight's parametrization that it computes on the unsharded weight in its layer's forward."""
        if not self._params[0].sharded:
            for param, transposed in zip(self._params, self._transposed):
                param.sharded, param.transposed, param.rescaled = True, transposed, self.config.rescale

    def _check_finite_shards(self, broken: Sequence[bool]) -> None:
        """FloatingPointError naming the first layer with a NaN or infinite weight on some rank."""
        if any(broken):
            raise FloatingPointError(f"layer {self.names[list(broken).index(True)]!r} has a NaN or infinite weight at "
                                     f"step {self._step}; allowed: finite weights (lower the learning rate or clip gradients).")


    def _spans(self, magnitudes: Sequence[Tensor], ties: Sequence[Tensor | None], weights: Sequence[Tensor],
               group: dist.ProcessGroup) -> list[tuple[float, int]]:
        """Each weight's (tie value, end of its pruned ties in the full weight) from the local tie masks
        (one tie value for a shared threshold, one per layer for scopes "layer" and "erk")."""
        if self.config.scope in PER_LAYER:
            spans = [global_ties([m], [t], [w], group) for m, t, w in zip(magnitudes, ties, weights)]
            return [(value, ends[0]) for value, ends in spans]
        value, ends = global_ties(magnitudes, ties, weights, group)
        return [(value, end) for end in ends]


    def _local_groups(self, param: SparseWeight, w: Tensor, rows: Tensor, transposed: bool) -> tuple[Threshold, Tensor | None]:
        """The N:M thresholds and ties of this rank's shard of ``w``: held, or selected now from ``rows``,
        the shard's values (as the forward sees them, or as they are)."""
        if param.held_over is not None:
            return param.threshold, param.ties
        return self._groups_of(param, w, rows, transposed)

    @staticmethod
    def _groups_of(param: SparseWeight, w: Tensor, rows: Tensor, transposed: bool) -> tuple[Threshold, Tensor | None]:
        """The N:M thresholds and ties selected from ``rows``, this rank's shard of ``w`` (the groups lie
        within it), as the forward sees them or as they are; the thresholds in ``w``'s dtype (a rounded
        value is exact in it); for a held pattern, every pruned entry as a tie. 0 and None where the full
        weight has no groups or nothing is pruned (on every rank alike)."""
        if not prunes_groups(param, w, transposed):
            return 0.0, None
        if not rows.numel():  # a rank past the last row
            return torch.zeros_like(rows, dtype=w.dtype), None
        magnitude = out_in(rows.abs(), transposed)
        chosen = select_groups([magnitude], *param.groups)
        threshold, ties = chosen.thresholds[0], chosen.ties[0]
        if param.holds_pattern:
            ties = ~kept_mask(magnitude, threshold, ties)
        return stored(threshold.to(w.dtype), transposed), stored(ties, transposed)


    @torch.no_grad()
    def _bake_shards(self, group: dist.ProcessGroup) -> None:
        """Write a * P_p(w; T) into every rank's shard of every weight (sharded weights). Under mixed
        precision the thresholds of s(t) are first selected again on the shards as they are, so that the
        baked weights hold the exact count (the forward's were selected on the rounded ones)."""
        if any(param.forward_dtype not in (None, w.dtype) for param, w in zip(self._params, self._weights)):
            self._reselect_sharded(self.schedule.sparsity_at(self._step), self._weights, group, exact=True)
        for param, w, transposed in zip(self._params, self._weights, self._transposed):
            shard = local_shard(w)
            if param.groups is not None:
                threshold, ties = self._local_groups(param, w, shard, transposed)
            else:
                threshold, ties = param.threshold, param.ties
            scaled = param.normalised(shard)
            value = threshold_operator(scaled, threshold, param.p)
            if ties is not None:
                value = value * ~ties
            if param.rescaled:
                value = value * self._shard_rescale(w, shard, kept_mask(scaled, threshold, ties), transposed, group)
            shard.copy_(value if param.norm == 1.0 else value / param.norm)


    @staticmethod
    def _channel_rescale(w: Tensor, shard: Tensor, kept: Tensor, transposed: bool, group: dist.ProcessGroup) -> Tensor:
        """ST-3's a_c (:func:`st3_rescale`) of each of the full weight's output channels, from every rank's
        shard and its kept entries."""
        magnitude = shard.abs()
        per_channel = w.numel() // (w.shape[1] if transposed else w.shape[0])
        kept_sum = channel_sums(magnitude * kept, w, transposed, group) / per_channel
        all_sum = channel_sums(magnitude, w, transposed, group) / per_channel
        return 1.01 / ((kept_sum + RESCALE_EPS) / (all_sum + RESCALE_EPS) + 0.01)

    @classmethod
    def _shard_rescale(cls, w: Tensor, shard: Tensor, kept: Tensor, transposed: bool, group: dist.ProcessGroup) -> Tensor:
        """:meth:`_channel_rescale`, shaped to broadcast over this rank's shard."""
        rescale = cls._channel_rescale(w, shard, kept, transposed, group)
        if transposed:
            return rescale.view(1, -1)
        start = first_row(w)
        return rescale[start : start + shard.shape[0]].view(-1, *([1] * (shard.dim() - 1)))


    @torch.no_grad()
    def _load_sharded(self, thresholds: Sequence[Threshold], ties: Sequence[Any], rescales: Sequence[Tensor | None],
                      weights: Sequence[Tensor], group: dist.ProcessGroup) -> None:
        """:meth:`load_state_dict` on sharded weights (from a state saved under FSDP on any number of
        ranks, or without FSDP; the rescales held between updates as saved, or computed again)."""
        shards = [local_shard(w) for w in weights]
        self._mark_sharded()
        if self.fix_step is not None and self._step >= self.fix_step:
            for param, shard in zip(self._params, shards):
                param.frozen, param.shard_mask = True, shard != 0
            return
        if self.config.scope == "nm":
            if self.config.update_every > 1:  # held: as saved
                self._set_groups(self.target, weights)
                self._load_groups(thresholds, ties, weights, group)
                self._hold_rescales(weights, group, rescales)
            else:  # the groups follow the weights
                self._reselect_sharded(self.target, weights, group)
            return
        local: list[Tensor | None] = []
        for param, w, shard, saved in zip(self._params, weights, shards, ties):
            start = first_row(w) * (w.numel() // max(w.shape[0], 1))
            if isinstance(saved, Mapping):
                local.append(span_mask(param.normalised(param.as_forward(shard)).abs(), saved["value"], saved["end"], start))
            elif saved is not None:  # a full mask, saved without FSDP
                rows = saved.reshape(-1)[start : start + shard.numel()].view(shard.shape).to(shard.device).bool()
                local.append(rows if rows.any() else None)
            else:
                local.append(None)
        magnitudes = [param.normalised(param.as_forward(shard)).abs() for param, shard in zip(self._params, shards)]
        for param, shard, threshold, mask, span in zip(self._params, shards, thresholds, local,
                                                       self._spans(magnitudes, local, weights, group)):
            param.choose(threshold, mask, shard, span)
        self._hold_rescales(weights, group, rescales)


    def _load_groups(self, thresholds: Sequence[Threshold], ties: Sequence[Tensor | None], weights: Sequence[Tensor],
                     group: dist.ProcessGroup) -> None:
        """Held N:M thresholds and ties as a state saved them (blocks of DTensors, or full tensors); a
        layer without groups, or with none pruned at this step, keeps T = 0 (a number, as selected)."""
        for param, w, threshold, saved, transposed in zip(self._params, weights, thresholds, ties, self._transposed):
            shard = local_shard(w)
            if not prunes_groups(param, w, transposed):
                param.choose(0.0, None, shard)
                continue
            mask = None if saved is None else rows_of(saved, w).to(shard.device).bool()
            param.choose(rows_of(threshold, w).to(shard.device, shard.dtype) if isinstance(threshold, Tensor) else threshold,
                         mask if mask is not None and bool(mask.any()) else None, shard)
        self._hold_groups([param.ties for param in self._params], group)

    def held_groups(self) -> tuple[list[Tensor], list[Tensor]]:
        """The N:M thresholds and ties held between updates under FSDP, as DTensors placed like the weights,
        one of each for every weight whatever it holds (zeros for T = 0 and for no ties), so that a state's
        layout does not change from step to step (``torch.distributed.checkpoint`` loads a state into one
        laid out like it, on any number of ranks)."""
        thresholds: list[Tensor] = []
        ties: list[Tensor] = []
        for param, w in zip(self._params, self._weights):
            shard = local_shard(w)
            threshold = param.threshold
            thresholds.append(sharded_like(threshold.clone() if isinstance(threshold, Tensor) else torch.zeros_like(shard), w))
            ties.append(sharded_like(param.ties.clone() if param.ties is not None else torch.zeros_like(shard, dtype=torch.bool), w))
        return thresholds, ties


def prunes_groups(param: SparseWeight, w: Tensor, transposed: bool) -> bool:
    """Whether the N:M selection prunes in ``w`` now: the full weight has groups and k > 0 (alike on every rank)."""
    k, m = param.groups
    return bool(k) and has_groups(out_in(w, transposed).shape, m)


def span_of(param: SparseWeight) -> dict[str, float | int] | None:
    """The pruned ties of a sharded weight as saved: the tie value and their end in flat order."""
    return None if int(param.tie_count) == 0 else {"value": float(param.tie_value), "end": int(param.tie_count)}


def span_mask(magnitude: Tensor, value: float, end: int, start: int) -> Tensor | None:
    """The entries of ``magnitude`` (flat positions ``start``... of a full weight) equal to ``value``
    before position ``end``; None if there are none."""
    index = torch.arange(start, start + magnitude.numel(), device=magnitude.device).view(magnitude.shape)
    mask = (magnitude == value) & (index < end)
    return mask if bool(mask.any()) else None


def same_on_every_rank(selection: Selection, magnitudes: Sequence[Tensor]) -> Selection:
    """Under torch.distributed, every rank takes rank 0's thresholds and tie masks, so all masks
    agree (per-group threshold tensors are broadcast whole; every rank holds one for the same layers)."""
    if not (dist.is_available() and dist.is_initialized()):
        return selection
    device = torch.device("cuda") if dist.get_backend() == "nccl" else torch.device("cpu")
    has_ties = [float(t is not None) for t in selection.ties]
    numbers = [0.0 if isinstance(t, Tensor) else t for t in selection.thresholds]
    values = torch.tensor(numbers + has_ties, dtype=torch.float64, device=device)
    dist.broadcast(values, src=0)
    count = len(selection.thresholds)
    thresholds: list[Threshold] = []
    for number, local in zip(values[:count].tolist(), selection.thresholds):
        if isinstance(local, Tensor):
            dist.broadcast(local, src=0)
            thresholds.append(local)
        else:
            thresholds.append(number)
    ties: list[Tensor | None] = []
    for flag, local, mag in zip(values[count:].tolist(), selection.ties, magnitudes):
        if not flag:
            ties.append(None)
            continue
        buffer = (local if local is not None else torch.zeros_like(mag, dtype=torch.bool)).to(torch.uint8)
        dist.broadcast(buffer, src=0)
        ties.append(buffer.bool())
    return Selection(thresholds, ties)
