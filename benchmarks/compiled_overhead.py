"""Compiled training: step time and compile time of ``torch.compile`` (inductor) over dense and sparsified
models, CPU. For each model, every method is created, compiled and warmed up (the first step's time is
its compile time), then the set-ups take turns step by step (an interleaved run, the order rotating) and
the median step is reported with the overhead over compiled dense, by medians and as the mean paired
difference with its 95 % interval; graph counts and graph breaks from torch._dynamo's
counters. The schedules span the timed steps (ramp and final sparsity).

    python benchmarks/compiled_overhead.py [--models resnet20,vit-micro] [--methods dense,feather] [--steps 30]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch
import torch._dynamo
import torch.nn.functional as F
from timing import paired_overhead
from torch._dynamo.utils import counters

import sparsetrain as st
from sparsetrain.models import create_model

WARMUP = 3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="resnet20,vit-micro")
    parser.add_argument("--methods", default="dense,feather")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--backend", default="inductor")
    args = parser.parse_args()
    methods = args.methods.split(",")
    print(f"{platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch_size}, "
          f"backend {args.backend}")
    print("| model | method | compile (first step, s) | median step (ms) | over compiled dense (medians) | "
          "over compiled dense (mean paired difference, 95 % interval) | graphs | graph breaks |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch_size, 3, 32, 32, generator=gen)
    y = torch.randint(0, 10, (args.batch_size,), generator=gen)
    for name in args.models.split(","):
        runs, compile_seconds, graphs = {}, {}, {}
        for method in methods:
            torch._dynamo.reset()
            counters.clear()
            torch.manual_seed(0)
            model = create_model(name)
            created = st.create(model, method, total_steps=args.steps + WARMUP)
            optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
            created.bind(optimizer)
            runs[method] = (torch.compile(model, backend=args.backend), created, optimizer)
            start = time.perf_counter()
            step(*runs[method], x, y)
            compile_seconds[method] = time.perf_counter() - start
            for _ in range(WARMUP - 1):
                step(*runs[method], x, y)
            graphs[method] = (counters["stats"].get("unique_graphs", 0), sum(counters["graph_break"].values()))
        times = {method: [] for method in methods}
        for index in range(args.steps):
            turn = index % len(methods)  # interleaved, the order rotating: every set-up sees the same moments
            for method in methods[turn:] + methods[:turn]:
                start = time.perf_counter()
                step(*runs[method], x, y)
                times[method].append(time.perf_counter() - start)
        dense = statistics.median(times["dense"])
        for method in methods:
            median = statistics.median(times[method])
            print(f"| {name} | {method} | {compile_seconds[method]:.1f} | {1e3 * median:.1f} | "
                  f"{100 * (median / dense - 1):+.1f} % | {paired_overhead(times[method], times['dense'])} | "
                  f"{graphs[method][0]} | {graphs[method][1]} |")


def step(model, created, optimizer, x, y) -> None:
    loss = F.cross_entropy(model(x), y)
    optimizer.zero_grad()
    loss.backward()
    created.before_optimizer_step()
    optimizer.step()
    created.step()


if __name__ == "__main__":
    main()
