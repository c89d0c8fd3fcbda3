"""The Sparsifier: attaches the thresholding operator to a model's weights and owns its state.

Each prunable weight w keeps training densely; the forward pass sees

    w~ = a * P_p(w * n; T) / n

where n = 1 / sigma_l (1 outside the sigma scope), a is the ST-3 per-output-channel rescale
(1 when disabled) and the gradient reaches w straight through, scaled by theta on pruned
weights (see :mod:`sparsetrain.operators`).

Threshold timing: the forward pass of step t uses the threshold that makes the weights as
they stand before step t exactly s(t) sparse. ``step()``, called right after
``optimizer.step()``, advances t and recomputes T from the updated weights.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.utils import parametrize

from .methods import KNOBS, MethodConfig, method_config
from .operators import sparsify_ste
from .schedules import Schedule, make_schedule, resolve_step, validate_sparsity, validate_total_steps
from .selection import layer_sigma, select_thresholds

PRUNABLE_TYPES: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)

RESCALE_EPS = 1e-6


class SparseWeight(nn.Module):
    """The parametrization on one layer's weight: w -> a * P_p(w * n; T) / n with the scaled STE."""

    def __init__(self, p: float, theta: float, norm: float) -> None:
        super().__init__()
        self.p, self.theta, self.norm = p, theta, norm
        self.threshold = 0.0
        self.register_buffer("rescale", None, persistent=False)

    def normalised(self, w: Tensor) -> Tensor:
        """w * n, the magnitudes the threshold is compared against (w itself when n = 1)."""
        return w if self.norm == 1.0 else w * self.norm

    def forward(self, w: Tensor) -> Tensor:
        out = sparsify_ste(self.normalised(w), self.threshold, self.p, self.theta, self.rescale)
        return out if self.norm == 1.0 else out / self.norm

    def zeros(self, w: Tensor) -> int:
        """How many entries of the forward weight are zero: |w * n| <= T."""
        return int((self.normalised(w).abs() <= self.threshold).sum())


def st3_rescale(w: Tensor, kept: Tensor) -> Tensor:
    """ST-3 per-output-channel rescale a_c = 1.01 / (r_c + 0.01), shaped to broadcast over w.

    r_c = (mean_k |w_ck| M_ck + 1e-6) / (mean_k |w_ck| + 1e-6), k running over the other dims.
    """
    magnitude = w.detach().abs().flatten(1)
    ratio = ((magnitude * kept.flatten(1)).mean(1) + RESCALE_EPS) / (magnitude.mean(1) + RESCALE_EPS)
    return (1.01 / (ratio + 0.01)).view(-1, *([1] * (w.dim() - 1)))


def find_prunable(
    model: nn.Module,
    types: Sequence[type[nn.Module]] = PRUNABLE_TYPES,
    exclude: Sequence[str] = (),
    min_size: int = 0,
) -> list[tuple[str, nn.Module]]:
    """(name, module) of every layer of one of ``types`` whose weight has at least ``min_size``
    entries and whose name matches none of the glob patterns in ``exclude``."""
    return [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, tuple(types))
        and isinstance(getattr(module, "weight", None), Tensor)
        and module.weight.numel() >= min_size
        and not any(fnmatch.fnmatchcase(name, pattern) for pattern in exclude)
    ]


class Sparsifier:
    """Makes a model sparse during training with one of the registered methods.

    ``method`` names a preset (see :func:`sparsetrain.list_methods`); any of its knobs
    (``p``, ``theta``, ``scope``, ``rescale``, ``schedule``, ``start``, ``end``) can be
    overridden by keyword. ``start``/``end`` are int steps or float fractions of
    ``total_steps``; ``schedule`` may also be a ready schedule object. Layers are chosen by
    ``types``, ``exclude`` (glob patterns on module names) and ``min_size`` (entries).
    """

    def __init__(
        self,
        model: nn.Module,
        method: str = "feather",
        sparsity: float = 0.9,
        total_steps: int = 1,
        *,
        types: Sequence[type[nn.Module]] = PRUNABLE_TYPES,
        exclude: Sequence[str] = (),
        min_size: int = 0,
        **knobs: Any,
    ) -> None:
        sparsity = validate_sparsity(sparsity)
        validate_total_steps(total_steps)
        schedule = None if isinstance(knobs.get("schedule", ""), str) else knobs.pop("schedule")
        unknown = sorted(set(knobs) - set(KNOBS))
        if unknown:
            raise ValueError(f"unknown option {unknown[0]!r}; allowed options: {', '.join(KNOBS)}.")
        self.config: MethodConfig = dataclasses.replace(method_config(method, sparsity), **knobs)
        self.method = method
        self.total_steps = total_steps
        self.schedule: Schedule = schedule or make_schedule(
            self.config.schedule,
            sparsity,
            resolve_step(self.config.start, total_steps, "start"),
            resolve_step(self.config.end, total_steps, "end"),
        )
        if not math.isclose(self.schedule.final, sparsity):
            raise ValueError(
                f"the schedule's final sparsity {self.schedule.final} differs from sparsity={sparsity}; allowed: equal values."
            )
        layers = find_prunable(model, types, exclude, min_size)
        if not layers:
            raise ValueError(
                f"model {type(model).__name__} has no prunable layer; allowed: a model with at least one "
                f"{'/'.join(t.__name__ for t in types)} layer of at least {min_size} weights not excluded by {list(exclude)}."
            )
        if any(parametrize.is_parametrized(module, "weight") for _, module in layers):
            raise ValueError("the model's weights are already parametrized; allowed: a model not yet attached to a Sparsifier.")
        self.model = model
        self.names = [name for name, _ in layers]
        self._modules = [module for _, module in layers]
        self._weights: list[Tensor] = [module.weight for module in self._modules]
        self._params: list[SparseWeight] = []
        for module in self._modules:
            norm = 1.0 / layer_sigma(module.weight.shape) if self.config.scope == "sigma" else 1.0
            param = SparseWeight(self.config.p, self.config.theta, norm)
            parametrize.register_parametrization(module, "weight", param)
            self._params.append(param)
        self._step = 0
        self._finalized = False
        self.refresh()

    # -- reading the state -------------------------------------------------------------

    @property
    def step_count(self) -> int:
        """How many times ``step()`` has been called (t)."""
        return self._step

    @property
    def target(self) -> float:
        """s(t): the sparsity the current thresholds were chosen for."""
        return self.schedule.sparsity_at(self._step)

    @property
    def threshold(self) -> float:
        """The current shared threshold T (in normalised units for the sigma scope)."""
        if self.config.scope == "layer":
            raise ValueError("scope='layer' has one threshold per layer; allowed: read Sparsifier.thresholds instead.")
        return self._params[0].threshold

    @property
    def thresholds(self) -> dict[str, float]:
        """Each prunable layer's threshold, by module name."""
        return {name: param.threshold for name, param in zip(self.names, self._params)}

    def dense_weights(self) -> list[Tensor]:
        """The trained dense weights w of the prunable layers, in order."""
        return list(self._weights)

    def sparsity(self) -> float:
        """Fraction of zeros among the prunable weights as the forward pass uses them."""
        self._check_attached()
        with torch.no_grad():
            zeros = sum(param.zeros(w) for param, w in zip(self._params, self.dense_weights()))
        return zeros / self.numel()

    def numel(self) -> int:
        """N, the number of prunable weights."""
        return sum(w.numel() for w in self.dense_weights())

    def layer_stats(self) -> list[tuple[str, int, int]]:
        """(name, size, zeros in the forward weight) of each prunable layer."""
        self._check_attached()
        with torch.no_grad():
            return [(n, w.numel(), p.zeros(w)) for n, p, w in zip(self.names, self._params, self.dense_weights())]

    # -- changing the state ------------------------------------------------------------

    def step(self) -> None:
        """Advance t by one and recompute thresholds (and rescales) from the current weights."""
        self._check_attached()
        self._step += 1
        self.refresh()

    def refresh(self) -> None:
        """Recompute thresholds (and rescales) for s(t) from the current weights, t unchanged."""
        self._check_attached()
        weights = self.dense_weights()
        with torch.no_grad():
            magnitudes = [param.normalised(w).abs() for param, w in zip(self._params, weights)]
            self._check_finite(magnitudes)
            thresholds = _same_on_every_rank(select_thresholds(magnitudes, self.target, self.config.scope))
            for param, w, mag, threshold in zip(self._params, weights, magnitudes, thresholds):
                param.threshold = threshold
                if self.config.rescale:
                    param.rescale = st3_rescale(w, mag > threshold)

    def _check_finite(self, magnitudes: Sequence[Tensor]) -> None:
        peaks = torch.stack([m.amax() for m in magnitudes])
        if not bool(torch.isfinite(peaks).all()):
            name = self.names[int((~torch.isfinite(peaks)).nonzero()[0])]
            raise FloatingPointError(
                f"layer {name!r} has a NaN or infinite weight at step {self._step}; "
                "allowed: finite weights (lower the learning rate or clip gradients)."
            )

    def _check_attached(self) -> None:
        if self._finalized:
            raise RuntimeError("this Sparsifier was finalized; create a new one to sparsify again.")

    def finalize(self) -> nn.Module:
        """Bake a * P_p(w; T) into plain weights, remove the parametrizations, return the model."""
        self._check_attached()
        with torch.no_grad():
            for module in self._modules:
                parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
        self._finalized = True
        return self.model

    # -- checkpointing -----------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Step, thresholds and rescales: everything needed to resume mid-schedule."""
        return {
            "method": self.method,
            "step": self._step,
            "layers": list(self.names),
            "thresholds": [param.threshold for param in self._params],
            "rescale": [None if param.rescale is None else param.rescale.clone() for param in self._params],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a state saved by :meth:`state_dict` on the same model and method."""
        self._check_attached()
        if state["method"] != self.method or list(state["layers"]) != self.names:
            raise ValueError(
                f"this state is for method {state['method']!r} on layers {state['layers'][:3]}...; "
                f"allowed: a state of method {self.method!r} on the same layers."
            )
        self._step = int(state["step"])
        for param, threshold, rescale in zip(self._params, state["thresholds"], state["rescale"]):
            param.threshold = float(threshold)
            param.rescale = None if rescale is None else rescale.to(param.rescale.device)


def _same_on_every_rank(thresholds: list[float]) -> list[float]:
    """Under torch.distributed, every rank takes rank 0's thresholds so all masks agree."""
    if not (dist.is_available() and dist.is_initialized()):
        return thresholds
    values = torch.tensor(thresholds, dtype=torch.float64)
    if dist.get_backend() == "nccl":
        values = values.cuda()
    dist.broadcast(values, src=0)
    return values.tolist()
