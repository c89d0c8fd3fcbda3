"""What the Hugging Face Trainer tests share."""

from transformers import TrainerCallback


class StopAt(TrainerCallback):
    """Stop training after optimizer step ``step`` (a run killed there, its checkpoints on disk)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True
