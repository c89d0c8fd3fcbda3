"""PyTorch Lightning: ``Trainer(callbacks=[Sparsify("feather", sparsity=0.9)])``.

The callback drives the method protocol (:mod:`sparsetrain.methods.protocol`) at Lightning's hooks:

- ``setup`` (fitting): ``create`` the method on the LightningModule, for
  ``trainer.estimated_stepping_batches`` optimizer steps, with example inputs from the first
  training batch (or those given) and the training batches as FRS's scoring data. Resuming
  (``fit(ckpt_path=...)``), the method's state is loaded from the checkpoint just before Lightning
  loads the weights (a load-state-dict pre-hook), so a pruned model has its saved widths when they
  arrive.
- ``on_fit_start``: ``bind`` the optimizer ``configure_optimizers`` built (after ``create``, so it
  holds GDP's gates).
- ``on_before_optimizer_step``: ``before_optimizer_step`` (once per optimizer step, whatever the
  gradient accumulation; Lightning clips gradients after this hook, GDP's penalty included).
- ``on_train_batch_end``: ``step`` each time ``trainer.global_step`` advances; when the shapes
  change (FRS) under DDP, the DDP wrapper is rebuilt. Every ``log_every_n_steps`` steps and at the
  last, logs the method's metrics as ``sparsify/...`` (sparsity and threshold, or GDP's and FRS's
  FLOPs ratio), and for unstructured methods the FLOPs
  of the non-zero weights against dense at each epoch's end (``sparsify/flops_ratio``).
- checkpoints: the callback's ``state_dict`` is the method's.
- ``on_fit_end``: ``finalize``; the LightningModule then holds the plain sparse (or compact) model.

The LightningModule's ``forward`` must map a batch of inputs to logits (the example inputs and
FRS's relevance pass through it), and a training batch must be ``(inputs, labels, ...)`` or the
inputs alone; otherwise (a dict batch, a ``forward`` taking named inputs) pass ``example_inputs``,
a tensor batch or a dict of named tensors (``forward(**example_inputs)``).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor

from ..calls import ExampleInputs, map_inputs
from ..measure import count_flops
from ..methods import create
from .holder import MethodHolder


def _inputs_and_labels(batch: Any) -> tuple[Tensor, Tensor | None]:
    if isinstance(batch, Tensor):
        return batch, None
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], Tensor):
        return batch[0], batch[1] if len(batch) > 1 and isinstance(batch[1], Tensor) else None
    raise ValueError(
        f"a training batch of type {type(batch).__name__} has no inputs tensor; allowed: (inputs, labels, ...) "
        "or a tensor, else pass example_inputs= to Sparsify."
    )


class _TrainingBatches:
    """The trainer's training batches, re-iterable, without touching the global random state."""

    def __init__(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        self.trainer, self.module = trainer, module

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        with torch.random.fork_rng(devices=[]):
            for batch in self.trainer.train_dataloader:
                x, y = _inputs_and_labels(batch)
                if y is None:
                    raise ValueError("scoring needs labelled batches; allowed: training batches of (inputs, labels).")
                yield x.to(self.module.device), y.to(self.module.device)


class Sparsify(MethodHolder, pl.Callback):
    """Sparsify the LightningModule during ``Trainer.fit`` with the registered ``method``.

    ``options`` are the method's (``sparsetrain list``); ``example_inputs`` a small input batch, a
    tensor or a dict of named tensors (default: the first training batch's inputs).
    """

    def __init__(self, method: str, *, example_inputs: ExampleInputs | None = None, **options: Any) -> None:
        MethodHolder.__init__(self, method, example_inputs, options)
        self._steps_seen = 0
        self._restore_hook: Any = None
        self._example: ExampleInputs | None = None
        self._dense_flops = 0

    @property
    def state_key(self) -> str:
        return self._generate_state_key(method=self.method_name)

    # -- building ------------------------------------------------------------------------

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit" or self.method is not None:
            return
        total = trainer.estimated_stepping_batches
        if total == float("inf"):
            raise ValueError("the trainer runs without an end; allowed: max_epochs or max_steps, so the schedule has a length.")
        if trainer.train_dataloader is None:  # max_steps given: the estimate did not need the data
            trainer.fit_loop.setup_data()
        example = self.example_inputs
        if example is None:
            with torch.random.fork_rng(devices=[]):
                example = _inputs_and_labels(next(iter(trainer.train_dataloader)))[0]
        self._example = map_inputs(example, lambda x: x[:1])
        self._dense_flops = count_flops(pl_module, self._example)
        self.method = create(pl_module, self.method_name, total_steps=int(total),
                             example_inputs=map_inputs(example, lambda x: x[:2]),
                             data=_TrainingBatches(trainer, pl_module), **self.options)
        self._restore_hook = pl_module.register_load_state_dict_pre_hook(
            lambda *args: self._restore(trainer._checkpoint_connector._loaded_checkpoint)
        )

    def _restore(self, checkpoint: dict[str, Any] | None) -> None:
        """Resuming: load the method's state from the checkpoint Lightning is restoring, just before
        it loads the module's weights (a pruned model gets its saved widths first)."""
        if not checkpoint:
            return
        state = checkpoint.get("callbacks", {}).get(self.state_key)
        if not state:
            raise ValueError(f"the checkpoint being restored holds no {self.state_key} state; "
                             "allowed: a checkpoint of a run with the same Sparsify callback.")
        self._method().load_state_dict(state["method"])

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if len(trainer.optimizers) != 1:
            raise ValueError(f"configure_optimizers returned {len(trainer.optimizers)} optimizers; allowed: exactly one.")
        self._restore_hook.remove()
        self._bind(trainer.optimizers[0])

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._steps_seen = trainer.global_step  # restored by now when resuming

    # -- training ------------------------------------------------------------------------

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        self._method().before_optimizer_step()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        method = self._method()
        while self._steps_seen < trainer.global_step:  # an optimizer step was taken
            self._steps_seen += 1
            if method.step() and trainer.world_size > 1:
                self._rewrap(trainer)
            if self._steps_seen % trainer.log_every_n_steps == 0 or self._steps_seen == trainer.estimated_stepping_batches:
                pl_module.log_dict({f"sparsify/{k}": float(v) for k, v in method.metrics().items()}, on_step=True)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._method().removes_channels:  # the FLOPs of the non-zero weights (channel pruning reports its own)
            flops = count_flops(pl_module, self._example, skip_zeros=True)
            pl_module.log("sparsify/flops_ratio", flops / self._dense_flops, on_epoch=True)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._method().finalize()

    # -- checkpoints ---------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The method's state (``setup`` restores it on resume, before Lightning loads the weights)."""
        return {} if self.method is None else {"method": self.method.state_dict()}

    # -- helpers -------------------------------------------------------------------------

    @staticmethod
    def _rewrap(trainer: pl.Trainer) -> None:
        """Parameter shapes changed: wrap the module in a fresh DistributedDataParallel."""
        strategy = trainer.strategy
        setup_model = getattr(strategy, "_setup_model", None)
        if setup_model is None:
            raise RuntimeError(f"{type(strategy).__name__} cannot rebuild its model wrapper; allowed: the ddp strategies.")
        strategy.model = setup_model(strategy.lightning_module)
