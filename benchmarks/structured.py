"""Channel pruning that pays off: ResNet-56 before and after GDP and FRS, on the bundled sample.

Trains ResNet-56 dense, with GDP at a FLOPs target and with FRS (default budget: 30 % of the
channels over the scaled schedule) for the same epochs, then measures each final model's
parameters, FLOPs and CPU inference latency at batch 1 and batch 128 (eval mode, no grad,
median over rounds in which the models take turns, after warm-up). For reference it also times untrained ResNet-56s
thinned uniformly (width 0.7 and 0.5): what CPU speed a given FLOPs cut can buy at all.
Finished runs in --out are reused.

    python benchmarks/structured.py [--epochs 10] [--flops-target 0.5] [--frs-channels-per-step N] [--seed 0] [--out bench-structured]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

import torch

import sparsetrain as st
from sparsetrain.measure import count_flops_params
from sparsetrain.models import create_model
from sparsetrain.run import RunFolder, TrainOptions, load_run, train
from sparsetrain.run.folder import final_weights


def trained(out: Path, method: str, epochs: int, flops_target: float, channels_per_step: int | None, seed: int) -> Path:
    """The finished run folder of ``method``: trained now unless --out holds it (resumed from its checkpoint).

    Each benchmark flag goes to the methods that take the option (flops_target: GDP; channels_per_step:
    FRS, also naming its run). A method with a pruning schedule in epochs (FRS) gets the public one
    (every 21 epochs until 150 of 200) scaled to ``epochs`` and rounded to whole epochs, so it prunes
    at epoch ends (10 epochs: after each of epochs 1-8)."""
    takes = st.list_methods()[method]
    flags = {
        "flops_target": flops_target if "flops_target" in takes else None,
        "channels_per_step": channels_per_step if "channels_per_step" in takes else None,
        "prune_every": max(1, round(epochs * 21 / 200)) if "prune_every" in takes else None,
        "stop_at": max(1, round(epochs * 150 / 200)) if "stop_at" in takes else None,
    }
    name = f"{method}-c{channels_per_step}" if "channels_per_step" in takes else method
    options = TrainOptions(model="resnet56", method=method, epochs=epochs, seed=seed, device="cpu", out=str(out),
                           name=name, method_flags={key: value for key, value in flags.items() if value is not None})
    folder = RunFolder(options.run_dir)
    if not folder.is_finished():
        train(options, resume=folder.has_checkpoint(), log=lambda line: print(f"  {method}: {line}"))
    return folder.path


def load(run_dir: Path) -> tuple[torch.nn.Module, dict]:
    run = load_run(final_weights(run_dir), torch.device("cpu"))
    return run.model.eval(), run.config


@torch.no_grad()
def latencies(models: list[torch.nn.Module], batch: int, repeats: int) -> list[float]:
    """Median forward time of each model; the models take turns every round so machine drift hits all alike."""
    x = torch.randn(batch, 3, 32, 32)
    times: list[list[float]] = [[] for _ in models]
    for round_index in range(repeats + 3):
        for model, record in zip(models, times):
            start = time.perf_counter()
            model(x)
            if round_index >= 3:
                record.append(time.perf_counter() - start)
    return [statistics.median(record) for record in times]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--flops-target", type=float, default=0.5)
    parser.add_argument("--frs-channels-per-step", type=int, default=None,
                        help="FRS budget per pruning step (default: 30 %% of the channels over the schedule)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="bench-structured")
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    out = Path(args.out)
    runs = {
        method: trained(out, method, args.epochs, args.flops_target, args.frs_channels_per_step, args.seed)
        for method in ("dense", "gdp", "frs")
    }
    print(f"torch {torch.__version__}, {platform.machine()}, {torch.get_num_threads()} threads; "
          f"ResNet-56, {args.epochs} epochs on the bundled CIFAR-10 sample, seed {args.seed}")
    print("| model | test acc | params | FLOPs | FLOPs ratio | latency b=1 (ms) | latency b=128 (ms) | speedup b=128 | speedup / FLOPs ratio |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    example = torch.zeros(1, 3, 32, 32)
    base = None
    models = {method: load(run_dir) for method, run_dir in runs.items()}
    for width in (0.7, 0.5):
        models[f"uniform width {width} (untrained)"] = (create_model("resnet56", width=width).eval(), None)
    ones = latencies([model for model, _ in models.values()], 1, args.repeats * 3)
    fulls = latencies([model for model, _ in models.values()], 128, args.repeats)
    for (method, (model, config)), one, full in zip(models.items(), ones, fulls):
        flops, params = count_flops_params(model, example)
        if base is None:
            base = (flops, full)
        flops_speedup = base[0] / flops
        speedup = base[1] / full
        accuracy = "—" if config is None else f"{config['metrics']['test_acc']:.2%}"
        print(f"| {method} | {accuracy} | {params:,} | {flops / 1e6:.1f} M | "
              f"{flops / base[0]:.1%} | {one * 1e3:.2f} | {full * 1e3:.1f} | {speedup:.2f}x | {speedup / flops_speedup:.2f} |")


if __name__ == "__main__":
    main()
