"""Training throughput and accuracy of `sparsetrain train` defaults, dense and with Feather.

Runs the default recipe (ResNet-20, bundled CIFAR-10 sample, 12 epochs) once per method and
reports training images/s (median over epochs, training loop only, evaluation excluded) and
the final test accuracy and sparsity.

    python benchmarks/throughput.py [--methods dense,feather] [--epochs 12] [--device cpu]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile

import torch

from sparsetrain.run import TrainOptions, fit, prepare


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default="dense,feather")
    parser.add_argument("--epochs", type=int, default=None, help="default: the dataset's default")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {platform.machine()}, {torch.get_num_threads()} threads, device {args.device}")
    print("| method | images/s (train) | epochs | test acc | sparsity | wall (s) |")
    print("|---|---:|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as out:
        for method in args.methods.split(","):
            options = TrainOptions(method=method, epochs=args.epochs, device=args.device, out=out, name=method)
            setup = prepare(options)
            final = fit(setup, log=lambda line: None)
            images = len(setup.train_loader) * setup.train_loader.batch_size
            images = min(images, setup.train_loader.samples_per_rank)
            rate = statistics.median(images / r["train_time"] for r in setup.history)
            wall = sum(r["epoch_time"] for r in setup.history)
            print(f"| {method} | {rate:.0f} | {options.epochs} | {final['test_acc']:.2%} | {final['sparsity']:.2%} | {wall:.0f} |")


if __name__ == "__main__":
    main()
