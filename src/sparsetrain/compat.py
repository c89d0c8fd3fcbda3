"""A drop-in for the Pruner of the published Feather code, built on :class:`Sparsifier`.

    pruner = Pruner(model, device, final_rate, nbatches, epochs, pthres=0, t1=0)
    ...  loss.backward(); optimizer.step(); pruner.update_thresh(end_of_batch=True)
    pruner.print_sparsity(); pruner.desparsify()

Feather's recipe: p = 3, theta = 0.5 when final_rate > 0.95 (else 1), one global threshold,
cubic schedule from epoch ``t1`` to step floor(0.5 * nbatches * epochs). Layers with at most
``pthres`` weights are left dense.
"""

from __future__ import annotations

import torch
from torch import nn

from .methods import Sparsifier


class Pruner:
    """The reference signature over the sparsetrain engine; ``device`` is accepted for
    compatibility (thresholds follow the model's own device)."""

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
        self.sparsifier = Sparsifier(
            model,
            "feather",
            sparsity=final_rate,
            total_steps=nbatches * epochs,
            start=t1 * nbatches,
            end=(nbatches * epochs) // 2,
            min_size=pthres + 1,
        )

    @property
    def thresh(self) -> float:
        """The current global threshold."""
        return self.sparsifier.threshold

    def update_thresh(self, end_of_batch: bool = False) -> None:
        """Recompute the threshold; with ``end_of_batch`` first advance the schedule by one step."""
        if end_of_batch:
            self.sparsifier.step()
        else:
            self.sparsifier.refresh()

    def print_sparsity(self) -> float:
        """Print and return the current sparsity of the prunable weights, in percent."""
        percent = 100.0 * self.sparsifier.sparsity()
        print(f"sparsity: {percent:.2f}%")
        return percent

    def desparsify(self) -> nn.Module:
        """Bake the thresholded weights into the model and detach the pruner."""
        return self.sparsifier.finalize()
