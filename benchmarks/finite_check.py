"""Cost of the loop's non-finite checks (issue 12): one ``isfinite`` on the loss every step, and a
scan of the state dict for NaN or infinity once per epoch before the checkpoint is written.

A ResNet-20 training step (forward, backward, clip, feather's before/after-step calls, SGD) is timed
with and without the per-step check, the two taking turns; the per-epoch scan is timed on its own
and spread over an epoch of the bundled sample (40 steps at batch 128).

    python benchmarks/finite_check.py [--steps 60] [--batch-size 128] [--threads 0]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

import sparsetrain as st
from sparsetrain.models import create_model
from sparsetrain.run.checkpoint import first_non_finite

STEPS_PER_EPOCH = 40  # the bundled sample's 5,085 images at batch 128


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = create_model("resnet20")
    method = st.create(model, "feather", total_steps=1000, sparsity=0.9)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    method.bind(optimizer)
    x, y = torch.randn(args.batch_size, 3, 32, 32), torch.randint(0, 10, (args.batch_size,))

    def step(check: bool) -> float:
        start = time.perf_counter()
        loss = F.cross_entropy(model(x), y)
        if check and not bool(torch.isfinite(loss)):
            raise FloatingPointError("the loss is not finite")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 3.0)
        method.before_optimizer_step()
        optimizer.step()
        method.step()
        return time.perf_counter() - start

    for _ in range(3):
        step(True)
    plain, checked = [], []
    for index in range(args.steps):
        first, second = (False, True) if index % 2 else (True, False)
        for check in (first, second):
            (checked if check else plain).append(step(check))
    scans = []
    for _ in range(20):
        start = time.perf_counter()
        first_non_finite(model.state_dict())
        scans.append(time.perf_counter() - start)
    plain_ms, checked_ms = statistics.median(plain) * 1e3, statistics.median(checked) * 1e3
    paired = statistics.median(c / p for p, c in zip(plain, checked)) - 1
    scan_ms = statistics.median(scans) * 1e3
    print(f"{platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch_size}, "
          f"{args.steps} steps each\n")
    print("| | median (ms) |")
    print("|---|---:|")
    print(f"| step without the loss check | {plain_ms:.1f} |")
    print(f"| step with the loss check | {checked_ms:.1f} |")
    print(f"| paired difference | {paired:+.2%} |")
    print(f"| state-dict scan (once per epoch) | {scan_ms:.2f} |")
    print(f"| scan per step over an epoch of {STEPS_PER_EPOCH} | {scan_ms / STEPS_PER_EPOCH / plain_ms:.3%} of a step |")


if __name__ == "__main__":
    main()
