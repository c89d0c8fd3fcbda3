"""Hugging Face ``Trainer``: ``Trainer(..., callbacks=[SparsifyCallback("feather", sparsity=0.9)])``.

The callback drives the method protocol (:mod:`sparsetrain.methods.protocol`) at the Trainer's events:

- ``on_init_end``: ``create`` the method on the Trainer's model for ``TrainingArguments.max_steps``
  optimizer steps (the Trainer builds its optimizer later, so it holds GDP's gates, and a resumed
  checkpoint's weights load into the parametrized model).
- ``on_train_begin``: ``bind`` the Trainer's optimizer; when resuming, load the method's state saved
  beside the checkpoint (``checkpoint-<step>/sparsify_state.pt`` in ``output_dir``).
- ``on_pre_optimizer_step`` (after the Trainer clips): ``before_optimizer_step``;
  ``on_optimizer_step``: ``step`` (once per optimizer step, whatever the gradient accumulation).
- ``on_save``: the method's state into the checkpoint folder; ``on_log``: the method's metrics as
  ``sparsify/...`` (seen by the callbacks after this one); ``on_train_end``: ``finalize``. With
  ``load_best_model_at_end`` the Trainer has just loaded the best checkpoint's weights, so the
  method's state saved beside them is loaded first: the model is finalized as it was at that step.

GDP traces the model with ``example_inputs``: a tensor batch, or a dict of named tensors passed as
``model(**example_inputs)`` (``{"input_ids": ..., "attention_mask": ...}``). Methods that resize
the model while training (FRS) cannot resume inside the Trainer (its weights load before any
callback runs).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from ..calls import ExampleInputs
from ..inference import HF_STATE_FILE as STATE_FILE
from ..methods import create
from .holder import MethodHolder


class SparsifyCallback(MethodHolder, TrainerCallback):
    """Sparsify the Trainer's model during ``Trainer.train`` with the registered ``method``.

    ``options`` are the method's (``sparsetrain list``); ``example_inputs`` a tensor batch or a dict
    of named tensors for the methods that trace the model (gdp).
    """

    def __init__(self, method: str, *, example_inputs: ExampleInputs | None = None, **options: Any) -> None:
        MethodHolder.__init__(self, method, example_inputs, options)

    def on_init_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                    model: torch.nn.Module | None = None, **kwargs: Any) -> None:
        if args.max_steps <= 0:
            raise ValueError(f"TrainingArguments max_steps={args.max_steps}; allowed: max_steps > 0, the length "
                             "of the method's schedule in optimizer steps.")
        self.method = create(model, self.method_name, total_steps=args.max_steps,
                             example_inputs=self.example_inputs, **self.options)

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                       optimizer: torch.optim.Optimizer | None = None, **kwargs: Any) -> None:
        method = self._bind(optimizer)
        if state.global_step > 0:  # resumed: the Trainer restored its state from the checkpoint
            method.load_state_dict(_saved_state(_checkpoint(args, state)))

    def on_pre_optimizer_step(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                              **kwargs: Any) -> None:
        self._method().before_optimizer_step()

    def on_optimizer_step(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                          **kwargs: Any) -> None:
        self._method().step()

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        if state.is_world_process_zero:
            torch.save(self._method().state_dict(), _checkpoint(args, state) / STATE_FILE)

    def on_log(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
               logs: dict[str, float] | None = None, **kwargs: Any) -> None:
        if logs is not None:
            logs.update({f"sparsify/{key}": float(value) for key, value in self._method().metrics().items()})

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                     **kwargs: Any) -> None:
        method = self._method()
        if args.load_best_model_at_end and state.best_model_checkpoint is not None:  # its weights are loaded
            method.load_state_dict(_saved_state(Path(state.best_model_checkpoint)))
        method.finalize()


def _checkpoint(args: TrainingArguments, state: TrainerState) -> Path:
    """The Trainer's checkpoint folder for the current step."""
    return Path(args.output_dir) / f"checkpoint-{state.global_step}"


def _saved_state(checkpoint: Path) -> dict[str, Any]:
    """The method's state that ``on_save`` wrote into the Trainer's ``checkpoint`` folder."""
    path = checkpoint / STATE_FILE
    if not path.is_file():
        raise ValueError(f"{path} does not exist; allowed: a checkpoint in output_dir saved by a run with the same "
                         "SparsifyCallback.")
    return torch.load(path, map_location="cpu", weights_only=True)
