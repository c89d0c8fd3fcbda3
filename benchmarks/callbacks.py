"""Step overhead of the trainer callbacks: the same Lightning Trainer and Hugging Face Trainer with
and without ``Sparsify`` / ``SparsifyCallback`` (feather, 90 %), on a CIFAR ResNet-20 and the small
ViT (vit-micro), CPU, batches of the bundled sample (64 unless ``--batch-size``).

A step is timed from the first callback's batch-start hook to the last callback's batch-end hook,
so it holds the forward, backward, optimizer step and every callback hook, ours included. The
set-ups take turns, the order rotating from round to round; each round is one short fit, its first
steps dropped as warm-up. Overhead: ratio of the median step times with and without the callback,
and the paired overhead: the median over rounds of that ratio within each round (drift slower than a
round cancels).

Each fit records the share of CPU time the virtual machine's host stole while it ran (``steal.py``);
the last column repeats the paired overhead over the quiet rounds only (both fits of the pair under
1 % steal), with their count.

    python benchmarks/callbacks.py [--rounds 5] [--steps 30] [--warmup 5] [--threads 1] [--batch-size 64]
                                   [--models resnet20,vit-micro]
"""

from __future__ import annotations

import argparse
import logging
import platform
import statistics
import tempfile
import time
import warnings

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from steal import StolenShare  # benchmarks/steal.py
from torch.utils.data import DataLoader, TensorDataset
from transformers import Trainer, TrainerCallback, TrainingArguments

from sparsetrain.data import load_dataset, normalize
from sparsetrain.integrations.hf import SparsifyCallback
from sparsetrain.integrations.lightning import Sparsify
from sparsetrain.models import create_model

MODELS = "resnet20,vit-micro"
QUIET = 0.01  # a round is quiet when under 1 % of the CPU time was stolen during both fits of a pair


class Clock:
    """Start and end marks of every step; one instance sits first, another last in the callbacks."""

    def __init__(self) -> None:
        self.starts: list[float] = []
        self.ends: list[float] = []

    def step_times(self, warmup: int) -> list[float]:
        return [end - start for start, end in zip(self.starts, self.ends)][warmup:]


class LightningStart(pl.Callback):
    def __init__(self, clock: Clock) -> None:
        self.clock = clock

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.clock.starts.append(time.perf_counter())


class LightningEnd(LightningStart):
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        pass

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.clock.ends.append(time.perf_counter())


class HFStart(TrainerCallback):
    def __init__(self, clock: Clock) -> None:
        self.clock = clock

    def on_step_begin(self, args, state, control, **kwargs):
        self.clock.starts.append(time.perf_counter())


class HFEnd(HFStart):
    def on_step_begin(self, args, state, control, **kwargs):
        pass

    def on_step_end(self, args, state, control, **kwargs):
        self.clock.ends.append(time.perf_counter())


class Classifier(pl.LightningModule):
    def __init__(self, name: str) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = create_model(name)

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


class HFClassifier(torch.nn.Module):
    """A zoo model in the Trainer's interface: keyword inputs, a dict with the loss."""

    def __init__(self, name: str) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = create_model(name)

    def forward(self, pixel_values, labels=None):
        logits = self.net(pixel_values)
        return {"loss": F.cross_entropy(logits, labels), "logits": logits}


def lightning_fit(name: str, sparsify: bool, images, labels, steps: int, warmup: int, batch: int) -> list[float]:
    clock = Clock()
    callbacks = [LightningStart(clock)] + ([Sparsify("feather", sparsity=0.9)] if sparsify else []) + [LightningEnd(clock)]
    loader = DataLoader(TensorDataset(images, labels), batch_size=batch, shuffle=True)
    trainer = pl.Trainer(max_steps=steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks)
    trainer.fit(Classifier(name), loader)
    return clock.step_times(warmup)


def hf_fit(name: str, sparsify: bool, images, labels, steps: int, warmup: int, batch: int) -> list[float]:
    clock = Clock()
    callbacks = [HFStart(clock)] + ([SparsifyCallback("feather", sparsity=0.9)] if sparsify else []) + [HFEnd(clock)]
    samples = [{"pixel_values": x, "labels": int(y)} for x, y in zip(images, labels)]
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(output_dir=out, max_steps=steps, per_device_train_batch_size=batch, learning_rate=0.05,
                                 optim="sgd", report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True,
                                 logging_steps=10**6, dataloader_num_workers=0)
        Trainer(model=HFClassifier(name), args=args, train_dataset=samples, callbacks=callbacks).train()
    return clock.step_times(warmup)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--models", default=MODELS, help="comma-separated zoo models")
    args = parser.parse_args()
    models = args.models.split(",")
    torch.set_num_threads(args.threads)
    logging.disable(logging.WARNING)
    warnings.filterwarnings("ignore")
    data = load_dataset()
    count = max(2048, args.batch_size * args.steps)
    images, labels = normalize(data.x_train[:count], data.mean, data.std), data.y_train[:count].long()
    setups = [(trainer, fit, name, sparsify) for trainer, fit in (("lightning", lightning_fit), ("hf", hf_fit))
              for name in models for sparsify in (False, True)]
    rounds: dict[tuple[str, str, bool], list[list[float]]] = {(t, n, s): [] for t, _, n, s in setups}
    steal: dict[tuple[str, str, bool], list[float]] = {key: [] for key in rounds}
    for round_index in range(args.rounds):
        shift = round_index % len(setups)
        for trainer, fit, name, sparsify in setups[shift:] + setups[:shift]:
            with StolenShare() as stolen:
                rounds[(trainer, name, sparsify)].append(
                    fit(name, sparsify, images, labels, args.steps, args.warmup, args.batch_size))
            steal[(trainer, name, sparsify)].append(stolen.share)
        print(f"round {round_index + 1}/{args.rounds} done", flush=True)
    print(f"\n{platform.processor() or platform.machine()}, torch {torch.__version__}, {args.threads} thread(s), "
          f"batch {args.batch_size}, {args.rounds} rounds x {args.steps - args.warmup} timed steps\n")
    print("| trainer | model | median step, plain (ms) | with feather callback (ms) | overhead | paired overhead "
          "| CPU stolen (median of fits) | paired overhead, quiet rounds |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for trainer in ("lightning", "hf"):
        for name in models:
            plain, ours = rounds[(trainer, name, False)], rounds[(trainer, name, True)]
            plain_ms = statistics.median(t for r in plain for t in r) * 1e3
            ours_ms = statistics.median(t for r in ours for t in r) * 1e3
            ratios = [statistics.median(o) / statistics.median(p) - 1 for p, o in zip(plain, ours)]
            shares = list(zip(steal[(trainer, name, False)], steal[(trainer, name, True)]))
            quiet = [r for r, pair in zip(ratios, shares) if max(pair) < QUIET]
            quiet_text = f"{statistics.median(quiet):+.1%} ({len(quiet)} of {len(ratios)})" if quiet else f"- (0 of {len(ratios)})"
            stolen = statistics.median(share for pair in shares for share in pair)
            print(f"| {trainer} | {name} | {plain_ms:.1f} | {ours_ms:.1f} | {ours_ms / plain_ms - 1:+.1%} "
                  f"| {statistics.median(ratios):+.1%} | {stolen:.1%} | {quiet_text} |")


if __name__ == "__main__":
    main()
