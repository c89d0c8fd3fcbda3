"""A drop-in for the ``Pruner`` of the published Feather code (athglentis/feather, sparse_utils.py).

Users of that code switch by changing one import; in its own loop the thresholds, forward weights,
printed percentages and final weights are the published code's:

    pruner = Pruner(model, device, final_rate, nbatches, epochs, pthres=0, t1=0)
    for epoch ...:
        for batch ...:
            pruner.update_thresh()                    # before every forward
            loss.backward(); optimizer.step()
        pruner.update_thresh(end_of_batch=True)       # after the epoch's last optimizer step
        pruner.print_sparsity()
    pruner.desparsify()

The published semantics, which this module alone follows (the engine keeps its exact k-th
selection):

- Schedule: an array over the nbatches * epochs steps: 0 before step t1 * nbatches, then
  s_f - s_f * (1 - (t - t1) / (t2 - t1))^3 up to t2 = floor(0.5 * nbatches * epochs), then s_f.
- ``update_thresh()`` reads the schedule at ``step_idx``, sets the threshold from the weights as
  they stand, then advances ``step_idx``; ``update_thresh(end_of_batch=True)`` recomputes at
  ``step_idx - 1`` and does not advance.
- Threshold: the linearly interpolated quantile of all prunable magnitudes at s: sorted values v,
  m = (N - 1) * s, T = v[floor m] + (v[ceil m] - v[floor m]) * (m - floor m); s = 0 gives T = 0.
- Prunable: modules whose type is exactly ``nn.Conv2d`` or ``nn.Linear`` with
  in * out * kh * kw / groups >= pthres weights.
- Forward weight, for T > 0: d = |w|^3 - T^3, w~ = sign(w) * d^(1/3) where d > 0, else 0; the
  gradient reaches w straight through, times theta where |w| <= T (theta = 0.5 when
  final_rate > 0.95, else 1).
- ``print_sparsity()`` prints one line per prunable layer (name, weight count, sparsity %) and
  returns the total percentage, counting |w| <= T as zero on the raw weights.
- ``desparsify()`` bakes w~ into the weights of the same model object, leaving plain modules.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize


def feather_schedule(final_rate: float, nbatches: int, epochs: int, t1: int) -> np.ndarray:
    """The published per-step sparsity array over nbatches * epochs steps."""
    total, start = nbatches * epochs, t1 * nbatches
    end = math.floor(0.5 * total)
    ramp = np.arange(start, end)
    return np.hstack([
        np.zeros(start),
        final_rate - final_rate * (1 - (ramp - start) / (end - start)) ** 3,
        final_rate * np.ones(total - end),
    ])


def interpolated_quantile(magnitudes: Tensor, rate: float) -> float:
    """T = v[floor m] + (v[ceil m] - v[floor m]) * (m - floor m), v sorted, m = (N - 1) * rate."""
    values = torch.sort(magnitudes).values
    m = (len(values) - 1) * rate
    low, high = int(np.floor(m)), int(np.ceil(m))
    return (values[low] + (values[high] - values[low]) * (m - low)).item()


def feather_weight(w: Tensor, threshold: float) -> Tensor:
    """The published forward weight: d = |w|^3 - T^3, sign(w) * d^(1/3) where d > 0, else 0."""
    diff = torch.abs(w) ** 3 - threshold**3
    return torch.where(diff > 0, torch.sign(w) * diff ** (1 / 3), 0.0)


class _FeatherReference(torch.autograd.Function):
    """The published forward weight and theta-scaled straight-through gradient."""

    @staticmethod
    def forward(ctx, w: Tensor, threshold: float, theta: float) -> Tensor:
        ctx.save_for_backward(w)
        ctx.threshold, ctx.theta = threshold, theta
        return feather_weight(w, threshold)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (w,) = ctx.saved_tensors
        return torch.where(torch.abs(w) > ctx.threshold, 1.0, ctx.theta) * grad, None, None


class _SharedThreshold(nn.Module):
    """The parametrization of one prunable weight; every layer reads the pruner's one threshold."""

    def __init__(self, pruner: Pruner) -> None:
        super().__init__()
        self.__dict__["pruner"] = pruner  # not a submodule

    def forward(self, w: Tensor) -> Tensor:
        if self.pruner.thresh <= 0:
            return w
        return _FeatherReference.apply(w, self.pruner.thresh, self.pruner.theta)


def _weight_count(module: nn.Module) -> float:
    if type(module) is nn.Conv2d:
        return module.in_channels * module.out_channels * module.kernel_size[0] * module.kernel_size[1] / module.groups
    return module.in_features * module.out_features


class Pruner:
    """The published Feather ``Pruner``: same signature, same numbers in its own loop.
    ``device`` is accepted for compatibility (the threshold follows the model's own device)."""

    def __init__(
        self,
        model: nn.Module,
        device: str | torch.device,
        final_rate: float,
        nbatches: int,
        epochs: int,
        pthres: int = 0,
        t1: int = 0,
    ) -> None:
        self.device = torch.device(device)
        self.model = model
        self.theta = 0.5 if final_rate > 0.95 else 1.0
        self.thresh = 0.0
        self.step_idx = 0
        self.schedule = feather_schedule(final_rate, nbatches, epochs, t1)
        self.layers = [
            (name, module) for name, module in model.named_modules()
            if type(module) in (nn.Conv2d, nn.Linear) and _weight_count(module) >= pthres
        ]
        if not self.layers:
            raise ValueError(f"model {type(model).__name__} has no Conv2d or Linear layer of at least pthres={pthres} "
                             "weights; allowed: a smaller pthres.")
        for _, module in self.layers:
            parametrize.register_parametrization(module, "weight", _SharedThreshold(self))

    def _raw_weights(self) -> list[Tensor]:
        return [module.parametrizations.weight.original for _, module in self.layers]

    def update_thresh(self, end_of_batch: bool = False) -> None:
        """Set the threshold for the schedule at ``step_idx`` (then advance), or with ``end_of_batch``
        at ``step_idx - 1`` from the updated weights (no advance)."""
        rate = self.schedule[self.step_idx - 1 if end_of_batch else self.step_idx]
        self.thresh = 0.0
        if rate > 0:
            with torch.no_grad():
                magnitudes = torch.cat([w.detach().flatten() for w in self._raw_weights()]).abs()
            self.thresh = interpolated_quantile(magnitudes, float(rate))
        if not end_of_batch:
            self.step_idx += 1

    def print_sparsity(self) -> float:
        """Print one line per prunable layer and return the percentage of prunable weights with
        |w| <= threshold."""
        zeros_total, count = 0, 0
        with torch.no_grad():
            for (name, _), w in zip(self.layers, self._raw_weights()):
                zeros = int((w.abs() <= self.thresh).sum())
                zeros_total, count = zeros_total + zeros, count + w.numel()
                print(f"{name}".ljust(40), f"#w: {w.numel()}".ljust(11), f"| sparsity: {round(100.0 * zeros / w.numel(), 2)}%".ljust(18))
        return 100 * float(zeros_total) / float(count)

    def desparsify(self) -> nn.Module:
        """Bake the published forward weight at the current threshold into the model's own
        weights (as the published code does, even at T = 0) and remove the pruner."""
        with torch.no_grad():
            for _, module in self.layers:
                parametrize.remove_parametrizations(module, "weight", leave_parametrized=False)
                module.weight.copy_(feather_weight(module.weight, self.thresh))
        return self.model
