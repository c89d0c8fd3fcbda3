"""The unstructured engine, the :class:`Sparsifier`: one threshold scope over the prunable weights.

Each prunable weight w keeps training densely; the forward pass sees

    w~ = a * P_p(w * n; T) / n

where n = 1 / sigma_l (1 outside the sigma scope), a is the ST-3 per-output-channel rescale
(1 when disabled) and the gradient reaches w straight through, scaled by theta on pruned
weights (see :mod:`sparsetrain.operators`). T is chosen by :func:`sparsetrain.selection.select`
so that exactly round(s(t) * N) weights are pruned; when magnitudes tie at T, a mask of the
tied weights pruned (first in layer order, then flat index) completes the count.

Threshold timing: the forward pass of step t uses the threshold that makes the weights as
they stand before step t exactly s(t) sparse. ``step()``, called right after
``optimizer.step()``, advances t and recomputes T from the updated weights. With
``update_every=k`` it does so only when t is a multiple of k (for s(t)); in between T, the ties and
the rescales stay as they are (for N:M, the ties are every entry pruned at the update, so no group
gains a non-zero), and ``finalize()`` recomputes them from the final weights first.
When the model's forward starts, every forward weight is computed at once (the layers then find
theirs ready); a layer called on its own computes its weight as it reads it.

N:M scope (``nm="N:M"``, which sets ``scope="nm"``): the threshold is per group of M consecutive weights
along the input dimension (:mod:`sparsetrain.nm`; dimension 0 of a weight stored (in, out), such as
transformers' Conv1D: :func:`sparsetrain.prunable.out_in`); at s(t) each group prunes k = round(s(t) * M)
weights, so the final sparsity is 1 - N/M and a schedule is a path M:M -> ... -> N:M. Layers whose
input dimension is not a multiple of M stay dense (``dense_layers``). ``decay`` adds SR-STE's
lambda_w * (1 - E) * w to the pruned weights' gradient.

ST-3's rescale is per output channel, dimension 1 of a weight stored (in, out).

Fixed-mask phase (``fix_at``, ST-3's last 10 of 170 epochs): when t reaches ``fix_at`` the
thresholds are recomputed for s(t), the forward weights a * P_p(w; T) are written into the
weights, and from then on each layer computes with w * M, M the frozen mask of the kept
weights: no shift, no rescale, gradient only on the kept weights, thresholds no longer move.

A weight shared by several layers (one Parameter in two modules) is one weight: counted
once, thresholded once, finalized once.

Weights sharded by FSDP2 (``fully_shard`` after ``create()``, seen at ``bind()``) are selected over
every rank's shards (:mod:`.distributed`, :mod:`.sharding`); under ``torch.compile`` the forward reads T and the pruned
ties as fixed-shape tensors (:class:`SparseWeight`), so changing them recompiles nothing.
The named configurations of the engine are :mod:`.presets`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.utils import parametrize

from ...messages import shown
from ...nm import GroupSelector, has_groups
from ...operators import Threshold, kept_mask
from ...prunable import PRUNABLE_TYPES, LayerType, choose_layers, out_in, stores_transposed, validate_types
from ...schedules import Schedule, make_schedule, resolve_step, validate_total_steps
from ...selection import NonFiniteMagnitudes, Selection, layer_sigma, prune_count, select
from ...sharded_selection import ShardedSelector
from ..protocol import Method, check_finite
from .config import KNOBS, LEGACY_NM_KNOBS, resolve_config, unsaved_knobs
from .distributed import ShardedEngine, same_on_every_rank, span_mask, span_of
from .sharding import any_rank, forward_dtype, is_sharded, local_shard, shard_group, total, unparametrize
from .weight import SparseWeight, copy_threshold, st3_rescale, stored, weight_of


class Sparsifier(ShardedEngine, Method):
    """Makes a model sparse during training with one of the unstructured presets.

    ``method`` names a preset (``feather``, ``st3``, ``st3-sigma``, ``gmp``, ``ste``,
    ``feather-nm``, ``st3-nm``, ``sr-ste``); any of its knobs (``p``, ``theta``, ``scope``,
    ``rescale``, ``schedule``, ``start``, ``end``, ``fix_at``, ``nm``, ``decay``,
    ``update_every``) can be
    overridden by keyword (the pattern also as ``n`` and ``m``, as earlier versions took it).
    ``sparsity`` None means 0.9, or 1 - N/M for an N:M pattern.
    ``start``/``end`` are int steps or float fractions of ``total_steps``; ``schedule`` may also
    be a ready schedule object. Layers are chosen by :func:`~sparsetrain.prunable.choose_layers`
    from ``types`` (classes or class names), ``exclude`` (glob patterns on module names; None: the
    default exclusions, e.g. a ViT's patch embedding, a language model's tied head) and
    ``min_size`` (entries); ``excluded`` lists the layers left dense and why.
    """

    def __init__(
        self,
        model: nn.Module,
        method: str = "feather",
        sparsity: float | None = None,
        total_steps: int = 1,
        *,
        types: Sequence[LayerType] = PRUNABLE_TYPES,
        exclude: Sequence[str] | None = None,
        min_size: int = 0,
        **knobs: Any,
    ) -> None:
        super().__init__()
        validate_total_steps(total_steps)
        schedule = None if isinstance(knobs.get("schedule", ""), str) else knobs.pop("schedule")
        unknown = sorted(set(knobs) - set(KNOBS) - set(LEGACY_NM_KNOBS))
        if unknown:
            raise ValueError(f"unknown option {unknown[0]!r}; allowed options: {', '.join(KNOBS)}.")
        self.config, sparsity = resolve_config(method, sparsity, knobs)
        self._groups = None if self.config.nm is None else GroupSelector(self.config.nm.m)
        self._shard_selectors: list[ShardedSelector] = []  # under FSDP2: kept from step to step
        self.name = method
        self.total_steps = total_steps
        self.schedule: Schedule = schedule or make_schedule(
            self.config.schedule,
            sparsity,
            resolve_step(self.config.start, total_steps, "start"),
            resolve_step(self.config.end, total_steps, "end"),
        )
        self.fix_step = None if self.config.fix_at is None else resolve_step(self.config.fix_at, total_steps, "fix_at")
        if not math.isclose(self.schedule.final, sparsity):
            raise ValueError(
                f"the schedule's final sparsity {self.schedule.final} differs from sparsity={sparsity}; allowed: equal values."
            )
        types = validate_types(types)
        choice = choose_layers(model, types, exclude, min_size)
        layers = choice.layers
        if not layers:
            kinds = "/".join(t if isinstance(t, str) else t.__name__ for t in types)
            dense = shown([name for name, _ in choice.dense])
            raise ValueError(f"model {type(model).__name__} has no prunable layer; allowed: a model with at least one "
                             f"{kinds} layer of at least {min_size} weights not left dense (left dense: {dense}).")
        if any(parametrize.is_parametrized(module, "weight") for _, module in layers):
            raise ValueError("the model's weights are already parametrized; allowed: a model not yet attached to a method.")
        sharded = [name for name, module in layers if is_sharded(module.weight)]
        if sharded:
            raise ValueError(f"layer {sharded[0]!r} is already sharded by fully_shard; allowed: create() first, then "
                             "fully_shard, then the optimizer, then bind().")
        self.model = model
        self.excluded: list[tuple[str, str]] = list(choice.dense)
        self._modules = [module for _, module in layers]
        # One entry per distinct weight: a Parameter shared by several layers is one weight.
        first: dict[int, int] = {}
        self._owner: list[int] = []  # for each layer, the index of its weight
        self.names: list[str] = []
        self._holders: list[nn.Module] = []  # for each weight, the first layer holding it
        self._transposed: list[bool] = []  # stored (in, out): N:M groups and rescale read it transposed
        for name, module in layers:
            key = id(module.weight)
            if key not in first:
                first[key] = len(self._holders)
                self.names.append(name)
                self._holders.append(module)
                self._transposed.append(stores_transposed(module))
            self._owner.append(first[key])
        # each distinct weight as its layer holds it; read again at bind(), as fully_shard replaces them
        self._weights: list[Tensor] = [module.weight for module in self._holders]
        self._group: dist.ProcessGroup | None = None  # the group FSDP2 shards the weights over, seen at bind()
        self._flat: Tensor | None = None  # one shared threshold: every |w * n| buffer is a piece of it
        self._params: list[SparseWeight] = []
        grouped = self.config.nm is not None
        held = grouped and self.config.update_every > 1  # the N:M pattern held between updates
        for w in self._weights:
            norm = 1.0 / layer_sigma(w.shape) if self.config.scope == "sigma" else 1.0
            self._params.append(SparseWeight(self.config.p, self.config.theta, norm, self.config.decay, grouped, held))
        for module, owner in zip(self._modules, self._owner):
            parametrize.register_parametrization(module, "weight", self._params[owner])
        self._hooks = [model.register_forward_pre_hook(self._prepare),
                       model.register_forward_hook(self._release, always_call=True)]
        self._step = 0
        self.refresh()

    # -- reading the state -------------------------------------------------------------

    @property
    def method(self) -> str:
        """The preset's name."""
        return self.name

    @property
    def step_count(self) -> int:
        """How many times ``step()`` has been called (t)."""
        return self._step

    @property
    def target(self) -> float:
        """s(t_u): the sparsity the current thresholds were chosen for, t_u the last multiple of
        ``update_every`` up to t (t itself by default)."""
        return self.schedule.sparsity_at(self._step - self._step % self.config.update_every)

    @property
    def threshold(self) -> float:
        """The current shared threshold T (in normalised units for the sigma scope)."""
        if not self._shared_threshold:
            raise ValueError(f"scope={self.config.scope!r} has a threshold per layer or group; "
                             "allowed: read Sparsifier.thresholds instead.")
        return self._params[0].threshold

    @property
    def _shared_threshold(self) -> bool:
        return self.config.scope in ("global", "sigma")

    @property
    def thresholds(self) -> dict[str, Threshold]:
        """Each prunable weight's threshold, by the name of the first layer holding it (for
        scope "nm" a tensor shaped like the weight: its group's threshold at every entry, a pruned tie's
        own magnitude at its entry; a copy, as the engine rewrites its own at every update)."""
        return {name: copy_threshold(param.threshold) for name, param in zip(self.names, self._params)}

    @property
    def dense_layers(self) -> list[str]:
        """For scope "nm", the prunable weights left dense: no groups of M along their input dimension."""
        if self.config.scope != "nm":
            return []
        return [name for name, w, transposed in zip(self.names, self._weights, self._transposed)
                if not has_groups(out_in(w, transposed).shape, self.config.nm.m)]

    def dense_weights(self) -> list[Tensor]:
        """The trained dense weights w, one per distinct prunable weight, in order."""
        return list(self._weights)

    def sparsity(self) -> float:
        """Fraction of zeros among the prunable weights as the forward pass uses them (after
        ``finalize()``, in the baked weights)."""
        return sum(zeros for _, _, zeros in self.layer_stats()) / self.numel()

    def numel(self) -> int:
        """N, the number of prunable weights (a shared weight counted once)."""
        return sum(w.numel() for w in self._weights)

    def layer_stats(self) -> list[tuple[str, int, int]]:
        """(name, size, zeros in the forward weight) of each distinct prunable weight; after
        ``finalize()``, the zeros of the baked weight."""
        weights = self._weights
        group = self._group
        with torch.no_grad():
            if group is not None:
                zeros = total([self._local_zeros(p, w, t) for p, w, t in
                               zip(self._params, weights, self._transposed)], group)
                return [(n, w.numel(), z) for n, w, z in zip(self.names, weights, zeros)]
            if self._finalized:
                return [(n, w.numel(), int((w == 0).sum())) for n, w in zip(self.names, weights)]
            return [(n, w.numel(), p.zeros(w)) for n, p, w in zip(self.names, self._params, weights)]


    def metrics(self) -> dict[str, float]:
        values = {"sparsity": self.sparsity()}
        if self._shared_threshold:
            values["threshold"] = self.threshold
        return values

    # -- the forward pass --------------------------------------------------------------

    def _prepare(self, model: nn.Module, args: Any) -> None:
        """Before the model's forward: every forward weight computed at once, one after another.
        The layers then find theirs ready (computed lazily inside the forward, between the
        convolutions, the same work took several times as long on CPU). Not in a compiled graph,
        where the compiler fuses each layer's work."""
        if torch.compiler.is_compiling() or self._params[0].sharded:
            return
        if is_sharded(weight_of(self._holders[0])):
            raise RuntimeError("the model was sharded by fully_shard after create(), but bind() has not seen it; "
                               "allowed: bind(optimizer) after fully_shard and before the first forward.")
        for param, w in zip(self._params, self._weights):
            param.prepare(w)

    def _release(self, model: nn.Module, args: Any, output: Any) -> None:
        """After the model's forward, even one that raised: the prepared weights are dropped (the
        graph keeps what the backward needs)."""
        if torch.compiler.is_compiling() or self._params[0].sharded:
            return
        for param in self._params:
            param.release()

    # -- changing the state ------------------------------------------------------------

    def bind(self, optimizer: torch.optim.Optimizer) -> None:
        """Remember the optimizer; if FSDP2 has sharded the weights since ``create()``, take over
        the sharded weights: thresholds selected again across the shards (the same values)."""
        super().bind(optimizer)
        self._weights = weights = [weight_of(module) for module in self._holders]
        self._group = group = shard_group(weights, self.names)
        if group is not None:
            for param, name, w in zip(self._params, self.names, weights):
                param.forward_dtype = forward_dtype(self.model, name, w)
        if group is not None and not self.fixed:
            self._reselect_sharded(self.target, weights, group)

    @property
    def fixed(self) -> bool:
        """Whether the fixed-mask phase has begun."""
        return self._params[0].mask is not None or self._params[0].frozen

    def step(self) -> bool:
        """Advance t by one and recompute thresholds (and rescales) from the current weights when t
        is a multiple of ``update_every``; at ``fix_at`` recompute them, write the forward weights
        into the weights and freeze the masks."""
        self._check_attached()
        self._step += 1
        if self.fixed:
            self._zero_pruned_shards()
            return False
        if self.fix_step is not None and self._step >= self.fix_step:
            self._reselect(self.schedule.sparsity_at(self._step))
            self._fix()
        elif self._step % self.config.update_every == 0:
            self.refresh()
        return False


    def _fix(self) -> None:
        """w <- a * P_p(w; T) and M <- 1[w kept], for good."""
        group = self._group
        if group is not None:
            self._bake_shards(group)
            for param, w in zip(self._params, self._weights):
                param.frozen, param.shard_mask = True, local_shard(w) != 0
            return
        with torch.no_grad():
            for param, w in zip(self._params, self._weights):
                value = param(w)
                w.copy_(value)
                param.mask = value != 0

    def refresh(self) -> None:
        """Recompute thresholds (and rescales) for :attr:`target` from the current weights, t
        unchanged (nothing once the masks are fixed)."""
        self._check_attached()
        if not self.fixed:
            self._reselect(self.target)

    def _reselect(self, sparsity: float) -> None:
        """Thresholds, ties and rescales that make the current weights exactly ``sparsity`` sparse."""
        weights = self._weights
        group = self._group
        if group is not None:
            self._reselect_sharded(sparsity, weights, group)
            return
        with torch.no_grad():
            flat = self._lay_flat() if self._shared_threshold else None
            magnitudes = [param.magnitude(w) for param, w in zip(self._params, self._weights)]
            try:  # a NaN or an infinity is seen where the selection reads the magnitudes anyway
                selection = self._select(magnitudes, sparsity) if flat is None else self._select_flat(flat, magnitudes, sparsity)
            except NonFiniteMagnitudes:
                check_finite(magnitudes, self.names, "layer", "weight", self._step)  # names the layer
                raise
            selection = same_on_every_rank(selection, magnitudes)
            for param, w, mag, threshold, ties, transposed in zip(
                self._params, self._weights, magnitudes, selection.thresholds, selection.ties, self._transposed
            ):
                if param.holds_pattern and isinstance(threshold, Tensor):  # every entry pruned now, held
                    ties = ~kept_mask(mag, threshold, ties)
                elif param.grouped and ties is not None:  # a pruned tie's own |w * n| as its T: no mask
                    threshold, ties = torch.where(ties, mag, threshold), None
                param.choose(threshold, ties, w)
                if self.config.rescale:  # on |w|: the sigma scale cancels in the ratio r_c
                    kept = kept_mask(mag, threshold, ties)
                    magnitude = w.abs() if param.norm != 1.0 else mag
                    rescale = st3_rescale(out_in(magnitude, transposed), out_in(kept, transposed))
                    param.rescale = out_in(rescale, transposed)  # per output channel, in w's layout


    def _lay_flat(self) -> Tensor | None:
        """For one shared threshold, every |w * n| buffer a consecutive piece of one flat tensor, in
        layer order (None when the weights differ in dtype or device): the selection and the finite
        check then read one array instead of one per layer."""
        weights = self._weights
        dtype, device = weights[0].dtype, weights[0].device
        if any(w.dtype != dtype or w.device != device for w in weights):
            return None
        flat = self._flat
        if flat is None or flat.dtype != dtype or flat.device != device:
            flat = self._flat = torch.empty(self.numel(), dtype=dtype, device=device)
            offset = 0
            for param, w in zip(self._params, weights):
                # on flat's memory, but not a view of it: a version counter of its own, so that a forward
                # spending one layer's piece (and saving it for the backward) leaves the others' intact
                param.scratch_in(torch.empty(0, dtype=dtype, device=device).set_(flat.untyped_storage(), offset, w.shape))
                offset += w.numel()
        return flat

    def _select_flat(self, flat: Tensor, magnitudes: Sequence[Tensor], sparsity: float) -> Selection:
        """:meth:`_select` of a shared threshold, over the flat tensor the magnitudes are pieces of."""
        if not math.isfinite(flat.max()):  # NaN if any entry is
            raise NonFiniteMagnitudes()
        chosen = select([flat], sparsity, self.config.scope)
        tied, ties = chosen.ties[0], [None] * len(magnitudes)
        if tied is not None:
            for i, (piece, magnitude) in enumerate(zip(tied.split([m.numel() for m in magnitudes]), magnitudes)):
                ties[i] = piece.view(magnitude.shape) if bool(piece.any()) else None
        return Selection([chosen.thresholds[0]] * len(magnitudes), ties)

    def _select(self, magnitudes: Sequence[Tensor], sparsity: float) -> Selection:
        """Thresholds and tie masks for ``sparsity``: one selection over the scope, or one per N:M group
        (groups along the input dimension: a weight stored (in, out) is selected in its (out, in)
        view, and its thresholds and ties are stored back in its own layout). A NaN or an infinity
        raises FloatingPointError naming the layer, or, in a layer the group selection sorts,
        NonFiniteMagnitudes."""
        if self.config.scope != "nm":
            check_finite(magnitudes, self.names, "layer", "weight", self._step)
            return select(magnitudes, sparsity, self.config.scope)
        views = [out_in(mag, transposed) for mag, transposed in zip(magnitudes, self._transposed)]
        k = prune_count(sparsity, self._groups.m)
        unread = [i for i, view in enumerate(views) if not k or not has_groups(view.shape, self._groups.m)]
        if unread:  # the layers the group selection does not sort (left dense, or k = 0) are checked here
            check_finite([magnitudes[i] for i in unread], [self.names[i] for i in unread], "layer", "weight", self._step)
        selection = self._groups.select(views, k)
        return Selection(
            [stored(t, transposed) for t, transposed in zip(selection.thresholds, self._transposed)],
            [stored(t, transposed) for t, transposed in zip(selection.ties, self._transposed)],
        )

    def finalize(self) -> nn.Module:
        """Bake a * P_p(w; T) into plain weights, remove the parametrizations, return the model.

        A shared weight is baked once (by its first layer); its other layers get it back as is.
        Thresholds left from an earlier step (``update_every`` > 1) are first recomputed for s(t).
        """
        self._check_attached()
        if not self.fixed and self._step % self.config.update_every:
            self._reselect(self.schedule.sparsity_at(self._step))
        for hook in self._hooks:
            hook.remove()
        group = self._group
        if group is not None:
            if not self.fixed:
                self._bake_shards(group)
            for module in self._modules:
                unparametrize(self.model, module)
            self._finalized = True
            return self.model
        baked: set[int] = set()
        with torch.no_grad():
            for module, owner in zip(self._modules, self._owner):
                parametrize.remove_parametrizations(module, "weight", leave_parametrized=owner not in baked)
                baked.add(owner)
        self._finalized = True
        return self.model

    # -- checkpointing -----------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Step, thresholds, tie masks, rescales and fixed masks: everything needed to resume
        mid-schedule, with the settings they belong to. Under FSDP the same on every rank, whatever
        their number (for ``torch.distributed.checkpoint``): the ties as ``{"value", "end"}`` (the
        tie value and the end of the pruned ties in the full weight's flat order), the rescales only
        where held between updates (``update_every`` > 1; otherwise the forward computes them), no masks
        (the fixed phase keeps the pruned weights at 0); N:M thresholds and ties held between updates
        are DTensors placed like the weights."""
        sharded = self._params[0].sharded
        if self._params[0].held_over is not None:
            thresholds, ties = self.held_groups()
        else:
            thresholds = [copy_threshold(param.threshold) for param in self._params]
            ties = [span_of(param) if sharded else None if param.ties is None else param.ties.clone() for param in self._params]
        return {
            "method": self.name,
            "settings": self._settings(),
            "step": self._step,
            "layers": list(self.names),
            "thresholds": thresholds,
            "ties": ties,
            "rescale": [None if param.rescale is None else param.rescale.clone() for param in self._params],
            "masks": [None if sharded or param.mask is None else param.mask.clone() for param in self._params],
        }

    @property
    def state_is_sharded(self) -> bool:
        """True for N:M groups held between updates under FSDP (their thresholds and ties are DTensors)."""
        return self._params[0].held_over is not None

    def _check_model(self, state: Mapping[str, Any]) -> None:
        if list(state["layers"]) != self.names:
            raise ValueError(f"this state is for layers {list(state['layers'])[:3]}...; allowed: a state of "
                             f"method {self.name!r} on the same layers.")

    def _settings(self) -> dict[str, Any]:
        """What a saved state must agree on: the target, the schedule's steps and every knob."""
        knobs: dict[str, Any] = {}
        for k in KNOBS:
            if k == "nm":  # recorded as n and m, as by earlier versions: their states load, and these load there
                knobs["n"], knobs["m"] = self.config.nm or (None, None)
            elif k not in unsaved_knobs(self.config):
                knobs[k] = getattr(self.config, k)
        return {"sparsity": self.schedule.final, "total_steps": self.total_steps, "fix_step": self.fix_step, **knobs,
                "start": self.schedule.start if hasattr(self.schedule, "start") else None,
                "end": self.schedule.end if hasattr(self.schedule, "end") else None}

    @torch.no_grad()
    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a state saved by :meth:`state_dict` on the same model and method; a state that
        does not fit (not a mapping: TypeError; other method, layers, settings, shapes, a missing
        entry, a non-finite threshold: ValueError) is refused naming what differs."""
        self._check_attached()
        self._check_state(state)
        thresholds = [t if isinstance(t, Tensor) else float(t) for t in state["thresholds"]]
        broken = not all(bool(torch.isfinite(torch.as_tensor(local_shard(t))).all()) for t in thresholds)  # this rank's rows
        if self._group is not None:  # under FSDP every rank refuses alike
            broken = any_rank([broken], self._group)[0]
        if broken:
            raise ValueError("the saved state holds a NaN or infinite threshold; allowed: finite thresholds.")
        for key in ("thresholds", "ties", "rescale", "masks"):
            for name, w, value in zip(self.names, self._weights, state[key]):
                if isinstance(value, Tensor) and key != "rescale" and value.shape != w.shape:
                    raise ValueError(f"the saved {key} of layer {name!r} has shape {tuple(value.shape)}; "
                                     f"allowed: the weight's {tuple(w.shape)}.")
        self._step = int(state["step"])
        weights = self._weights
        group = self._group
        if group is not None:
            self._load_sharded(thresholds, state["ties"], state["rescale"], weights, group)
            return
        fixed = self.fix_step is not None and self._step >= self.fix_step
        for param, w, threshold, ties, rescale, mask in zip(
            self._params, weights, thresholds, state["ties"], state["rescale"], state["masks"]
        ):
            if isinstance(ties, Mapping):  # saved under FSDP
                ties = span_mask(param.magnitude(w), ties["value"], ties["end"], 0)
            param.choose(threshold.to(w.device, w.dtype) if isinstance(threshold, Tensor) else threshold,
                         None if ties is None else ties.to(w.device).bool(), w)
            param.rescale = None if rescale is None else rescale.to(w.device)
            param.mask = None if mask is None else mask.to(w.device).bool()
            if fixed and param.mask is None:  # saved under FSDP: the pruned weights are zeros
                param.mask = w != 0
        if self.config.rescale and not fixed and self._params[0].rescale is None:
            self._rescale_all()

    @torch.no_grad()
    def _rescale_all(self) -> None:
        """ST-3's rescale of every weight from its current thresholds and ties."""
        for param, w, transposed in zip(self._params, self._weights, self._transposed):
            kept = kept_mask(param.normalised(w), param.threshold, param.ties)
            param.rescale = out_in(st3_rescale(out_in(w.abs(), transposed), out_in(kept, transposed)), transposed)

