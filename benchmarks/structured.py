"""Channel pruning that pays off: ResNet-56 before and after GDP and FRS, on the bundled sample.

Trains ResNet-56 dense, with GDP at a FLOPs target and with FRS (default budget: 30 % of the
channels over the scaled schedule) for the same epochs, then measures each final model's
parameters, FLOPs and CPU inference latency at batch 1 and batch 128 (eval mode, no grad,
median of repeated runs after warm-up). Finished runs in --out are reused.

    python benchmarks/structured.py [--epochs 10] [--flops-target 0.5] [--out bench-structured]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from sparsetrain.models import create_model
from sparsetrain.report import count_flops
from sparsetrain.structured import rebuild
from sparsetrain.train import CHECKPOINT, CONFIG, MODEL, TrainOptions, train


def trained(out: Path, method: str, epochs: int, flops_target: float) -> Path:
    options = TrainOptions(model="resnet56", method=method, epochs=epochs, flops_target=flops_target,
                           device="cpu", out=str(out), name=method)
    if not (options.run_dir / MODEL).is_file():
        train(options, resume=(options.run_dir / CHECKPOINT).is_file(), log=lambda line: print(f"  {method}: {line}"))
    return options.run_dir


def load(run_dir: Path) -> tuple[torch.nn.Module, dict]:
    config = json.loads((run_dir / CONFIG).read_text())
    name, kwargs = config["model"]["name"], config["model"]["kwargs"]
    model = rebuild(name, kwargs, config["shapes"]) if "shapes" in config else create_model(name, **kwargs)
    model.load_state_dict(load_file(str(run_dir / MODEL)))
    return model.eval(), config


@torch.no_grad()
def latency(model: torch.nn.Module, batch: int, repeats: int) -> float:
    x = torch.randn(batch, 3, 32, 32)
    for _ in range(3):
        model(x)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        model(x)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--flops-target", type=float, default=0.5)
    parser.add_argument("--out", default="bench-structured")
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    out = Path(args.out)
    runs = {method: trained(out, method, args.epochs, args.flops_target) for method in ("dense", "gdp", "frs")}
    print(f"torch {torch.__version__}, {platform.machine()}, {torch.get_num_threads()} threads; "
          f"ResNet-56, {args.epochs} epochs on the bundled CIFAR-10 sample")
    print("| model | test acc | params | FLOPs | FLOPs ratio | latency b=1 (ms) | latency b=128 (ms) | speedup b=128 | speedup / FLOPs ratio |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    example = torch.zeros(1, 3, 32, 32)
    base = None
    for method, run_dir in runs.items():
        model, config = load(run_dir)
        flops = count_flops(model, example)
        params = sum(p.numel() for p in model.parameters())
        one, full = latency(model, 1, args.repeats * 3), latency(model, 128, args.repeats)
        if base is None:
            base = (flops, full)
        flops_speedup = base[0] / flops
        speedup = base[1] / full
        print(f"| {method} | {config['metrics']['test_acc']:.2%} | {params:,} | {flops / 1e6:.1f} M | "
              f"{flops / base[0]:.1%} | {one * 1e3:.2f} | {full * 1e3:.1f} | {speedup:.2f}x | {speedup / flops_speedup:.2f} |")


if __name__ == "__main__":
    main()
