"""The parametrization of one prunable weight, w -> a * P_p(w * n; T) / n with the scaled
straight-through estimator, and ST-3's per-output-channel rescale a."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.utils import parametrize

from ...nm import select_groups
from ...operators import Threshold, kept_mask, sparsify_ste, tie_numbers
from ...prunable import out_in
from .config import RESCALE_EPS
from .sharding import gather_rows

# The attributes rewritten for every weight at every step, by step() and by the forward (seven writes a weight
# and step): plain values, never parameters, buffers or modules, so they are set past nn.Module.__setattr__
# and its checks for those.
_EVERY_STEP = frozenset({"threshold", "ties", "_scratch", "_scratch_version", "_prepared", "_tie_end"})
# The tensors the selection derives from the weight, as large as it or per output channel: plain attributes, not
# buffers, which DDP would broadcast from rank 0 at every forward (every rank computes the same); ``.to()`` and
# the like carry them (:meth:`SparseWeight._apply`).
_DERIVED = ("threshold", "limit", "rescale", "ties", "mask")


class SparseWeight(nn.Module):
    """The parametrization of one weight: w -> a * P_p(w * n; T) / n with the scaled STE
    (``ties``: extra entries pruned, see :mod:`sparsetrain.selection`; T a number, or a tensor
    shaped like w for N:M groups).

    ``grouped`` (N:M groups): T is a tensor, one threshold per entry, and ties are read as their
    mask (ties in several groups differ in value, which one tie value below could not tell); the
    selection gives a pruned tie its own |w * n| as T, so there is seldom a mask. ``holds_pattern``
    (N:M groups with ``update_every`` > 1): at each update ``ties`` becomes every entry pruned then, so
    that between updates a group loses no zero, whatever its magnitudes do.

    Under ``torch.compile`` the forward reads only tensors that keep their shapes from step to
    step, so a new threshold, target or tie never recompiles the graph: T as a tensor (``limit``),
    and the pruned ties as the first ``tie_count`` entries (flat index) whose |w * n| equals
    ``tie_value`` (N:M groups: as their mask)."""

    def __init__(self, p: float, theta: float, norm: float, decay: float = 0.0, grouped: bool = False,
                 holds_pattern: bool = False) -> None:
        super().__init__()
        self.p, self.theta, self.norm, self.decay = p, theta, norm, decay
        self.grouped, self.holds_pattern = grouped, holds_pattern
        self.threshold: Threshold = 0.0
        self.rescale: Tensor | None = None
        self.ties: Tensor | None = None
        self.mask: Tensor | None = None  # the kept weights, once fixed
        self.limit = torch.zeros(())  # T as a tensor
        self.register_buffer("tie_value", torch.zeros(()), persistent=False)
        self.register_buffer("tie_count", torch.zeros((), dtype=torch.long), persistent=False)
        self._tie_end = 0  # tie_count's value, read without a sync
        # Under FSDP2 (see :mod:`.sharding`), set by the Sparsifier: the forward works on the unsharded weight.
        self.sharded = False
        # and the dtype FSDP2 casts the unsharded weight to (MixedPrecisionPolicy.param_dtype), if another
        self.forward_dtype: torch.dtype | None = None
        self.groups: tuple[int, int] | None = None  # N:M: (k, m), the groups selected inside the forward
        # N:M held between updates (update_every > 1): T and the ties are this rank's rows, gathered over
        # this group in the forward (the ties only where some rank has any)
        self.held_over: dist.ProcessGroup | None = None
        self.ties_somewhere = False
        self.transposed = False  # the weight is stored (in, out)
        self.rescaled = False  # ST-3's rescale, computed inside the forward
        self.frozen = False  # the fixed-mask phase: the pruned weights are kept at exact zeros
        self.shard_mask: Tensor | None = None  # then the kept entries of this rank's shard
        self._prepared: tuple[int, Tensor] | None = None  # (version of w, forward weight)
        self._scratch: Tensor | None = None  # |w * n|, reused from step to step
        self._scratch_version: int | None = None  # the version of w it holds, until a forward spends it

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _EVERY_STEP:  # plain values: no nn.Module checks for parameters, buffers, submodules
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)

    def _apply(self, fn: Any, recurse: bool = True) -> SparseWeight:
        """``.to()``, ``.cuda()``, ``.double()`` and the like: the buffers, and the tensors of ``_DERIVED``."""
        super()._apply(fn, recurse)
        for name in _DERIVED:
            value = getattr(self, name)
            if isinstance(value, Tensor):
                setattr(self, name, fn(value))
        return self

    def normalised(self, w: Tensor) -> Tensor:
        """w * n, the magnitudes the threshold is compared against (w itself when n = 1)."""
        return w if self.norm == 1.0 else w * self.norm

    def choose(self, threshold: Threshold, ties: Tensor | None, w: Tensor, span: tuple[float, int] | None = None) -> None:
        """Set T and the pruned ties for weight ``w``, with their tensor forms for compiled graphs
        (``span``: the tie value and count of a sharded weight, which its local ties cannot tell).
        Called under ``torch.no_grad()`` for every weight at every step: the tensor forms are rewritten
        only where they change."""
        self.threshold = threshold
        self.ties = ties
        limit = self.limit
        if isinstance(threshold, Tensor):
            self.limit = threshold
        elif limit.dim() == 0 and limit.dtype == w.dtype and limit.device == w.device:
            limit.fill_(threshold)
        else:
            self.limit = torch.full((), threshold, dtype=w.dtype, device=w.device)
        value, count = self.tie_value, self.tie_count
        if value.dtype != w.dtype or value.device != w.device:
            self.tie_value = value = torch.zeros((), dtype=w.dtype, device=w.device)
            self.tie_count = count = torch.zeros((), dtype=torch.long, device=w.device)
            self._tie_end = 0
        if span is not None:
            value.fill_(span[0])
            end = span[1]
        elif ties is None or self.grouped:  # N:M ties are read as their mask
            end = 0
        else:  # the first entries equal to the tie value, in flat order
            positions = ties.reshape(-1).nonzero()
            first = int(positions[0, 0])
            value.copy_(self.normalised(w.reshape(-1)[first]).abs())  # |w * n| of that entry alone
            end = int(positions[-1, 0]) + 1
        if end != self._tie_end:
            count.fill_(end)
            self._tie_end = end

    def magnitude(self, w: Tensor) -> Tensor:
        """|w * n|, written into a buffer kept from step to step (no fresh tensor as large as w at
        every step); the next forward weight computed from this version of w reuses it as scratch.
        Called under ``torch.no_grad()``."""
        if not fits(self._scratch, w):
            self._scratch = torch.empty_like(w)
        if self.norm == 1.0:
            torch.abs(w, out=self._scratch)
        else:
            torch.mul(w, self.norm, out=self._scratch).abs_()
        self._scratch_version = w._version
        return self._scratch

    def scratch_in(self, piece: Tensor) -> None:
        """Keep :meth:`magnitude`'s buffer in ``piece``, a tensor shaped like w (a view of a larger one)."""
        self._scratch, self._scratch_version = piece, None

    def _spend_magnitude(self, w: Tensor) -> Tensor | None:
        """The buffer of :meth:`magnitude` if it holds this version of w (it may then be overwritten)."""
        fresh = self._scratch_version == w._version and fits(self._scratch, w)
        self._scratch_version = None
        return self._scratch if fresh else None

    def as_forward(self, shard: Tensor) -> Tensor:
        """This rank's rows of a sharded weight as the forward sees them: rounded to FSDP2's parameter
        dtype under mixed precision (the unsharded weight is the gathered rounded shards), so that a
        threshold selected on them prunes the forward exactly."""
        return shard if self.forward_dtype in (None, shard.dtype) else shard.to(self.forward_dtype)

    def prepare(self, w: Tensor) -> None:
        """Compute the forward weight of ``w`` now: :meth:`forward` returns it while ``w`` is not
        changed in place, until :meth:`release`."""
        self._prepared = None
        self._prepared = (w._version, self.forward(w))

    def release(self) -> None:
        """Forget the prepared forward weight."""
        self._prepared = None

    def forward(self, w: Tensor) -> Tensor:
        if self.mask is not None:
            return w * self.mask
        # the decay acts on w * n, so lambda / n^2 gives lambda * (1 - E) * w on w
        decay = self.decay / self.norm**2
        if self.sharded:
            return self._forward_unsharded(w, decay)
        if torch.compiler.is_compiling():
            scaled = self.normalised(w)
            if self.grouped:  # the mask, as numbers, as the traced operator takes them
                ties = None if self.ties is None else self.ties.to(scaled.dtype)
            else:
                ties = tie_numbers(scaled.abs(), self.tie_value, self.tie_count)
            out = sparsify_ste(scaled, self.limit, self.p, self.theta, self.rescale, ties, decay)
        elif self._prepared is not None and self._prepared[0] == w._version:
            return self._prepared[1]
        else:
            out = sparsify_ste(self.normalised(w), self.threshold, self.p, self.theta, self.rescale, self.ties,
                               decay, self._spend_magnitude(w))
        return out if self.norm == 1.0 else out / self.norm

    def _forward_unsharded(self, w: Tensor, decay: float) -> Tensor:
        """The forward of an FSDP2-sharded weight, on its unsharded value inside the layer's forward:
        the N:M groups, the pruned ties and ST-3's rescale are computed here from w itself, unless held
        between updates (then the N:M thresholds and ties are gathered from every rank's rows)."""
        if self.frozen:
            return w * (w != 0)
        scaled = self.normalised(w)
        with torch.no_grad():
            magnitude = scaled.abs()
            if self.held_over is not None:
                threshold, ties = self._gathered(w.shape[0], w.dtype)
            elif self.groups is not None:  # traced, the selection's views fail: a compiled graph calls it eagerly
                select_now = torch.compiler.disable(self._groups_now) if torch.compiler.is_compiling() else self._groups_now
                threshold, ties = select_now(magnitude)
            else:
                threshold, ties = self.threshold, None
                if self._tie_end:  # a number: reading the tensor would break a compiled graph
                    index = torch.arange(w.numel(), device=w.device).view(w.shape)
                    ties = (magnitude == self.tie_value) & (index < self.tie_count)
            rescale = self.rescale  # held between updates (update_every > 1), else computed here
            if rescale is not None:  # in the forward's dtype under mixed precision
                rescale = rescale.to(w.dtype)
            if self.rescaled and rescale is None:
                kept = kept_mask(scaled, threshold, ties, magnitude)
                plain = magnitude if self.norm == 1.0 else w.abs()
                rescale = out_in(st3_rescale(out_in(plain, self.transposed), out_in(kept, self.transposed)), self.transposed)
        out = sparsify_ste(scaled, threshold, self.p, self.theta, rescale, ties, decay, magnitude)
        return out if self.norm == 1.0 else out / self.norm

    def _groups_now(self, magnitude: Tensor) -> tuple[Threshold, Tensor | None]:
        """The N:M thresholds and ties of the unsharded weight's magnitudes."""
        chosen = select_groups([out_in(magnitude, self.transposed)], *self.groups)
        return stored(chosen.thresholds[0], self.transposed), stored(chosen.ties[0], self.transposed)

    def _gathered(self, rows: int, dtype: torch.dtype) -> tuple[Threshold, Tensor | None]:
        """The held N:M thresholds (in ``dtype``, the forward's: selected on the weights rounded to it, they
        are exact in it) and ties of the full weight, from every rank's rows of them."""
        threshold, ties = self.threshold, None
        if isinstance(threshold, Tensor):
            threshold = gather_rows(threshold.to(dtype), rows, self.held_over)
        if self.ties_somewhere:
            local = self.ties if self.ties is not None else torch.zeros_like(self.threshold, dtype=torch.bool)
            ties = gather_rows(local, rows, self.held_over)
        return threshold, ties

    def zeros(self, w: Tensor) -> int:
        """How many entries of the forward weight are pruned: |w * n| <= T, or a pruned tie; once
        fixed, outside the mask."""
        if self.mask is not None:
            return int((~self.mask).sum())
        return int((~kept_mask(self.normalised(w), self.threshold, self.ties)).sum())


def weight_of(module: nn.Module) -> Tensor:
    """The dense weight w of a layer: the original under its parametrization, once removed the weight."""
    return module.parametrizations["weight"].original if parametrize.is_parametrized(module, "weight") else module.weight


def fits(buffer: Tensor | None, w: Tensor) -> bool:
    """Whether ``buffer`` can hold a tensor like ``w``: same shape, dtype and device."""
    return buffer is not None and buffer.shape == w.shape and buffer.dtype == w.dtype and buffer.device == w.device


def st3_rescale(magnitude: Tensor, kept: Tensor) -> Tensor:
    """ST-3 per-output-channel rescale a_c = 1.01 / (r_c + 0.01) of a weight's magnitudes |w|,
    shaped to broadcast over w.

    r_c = (mean_k |w_ck| M_ck + 1e-6) / (mean_k |w_ck| + 1e-6), k running over the other dims.
    """
    flat = magnitude.flatten(1)
    ratio = ((flat * kept.flatten(1)).mean(1) + RESCALE_EPS) / (flat.mean(1) + RESCALE_EPS)
    return (1.01 / (ratio + 0.01)).view(-1, *([1] * (magnitude.dim() - 1)))


def stored(value: Any, transposed: bool) -> Any:
    """A threshold or tie tensor of a weight's (out, in) view in the weight's own layout
    (contiguous, as broadcasts and checkpoints need); numbers and None as they are."""
    return out_in(value, transposed).contiguous() if isinstance(value, Tensor) and transposed else value


def copy_threshold(threshold: Threshold) -> Threshold:
    return threshold.clone() if isinstance(threshold, Tensor) else threshold
