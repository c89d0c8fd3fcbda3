"""Step overhead of sparsifying under FSDP2 (``fully_shard``), CPU gloo processes: dense against each
method on a zoo model, every prunable layer and the root sharded (create(), fully_shard, optimizer,
bind()), the set-ups taking turns step by step (one interleaved run, the order reversed at every other
step); each rank its own batch. The schedules span the timed steps. Reported: the slowest rank's
median step and the overhead over dense, and from each step as the slowest rank timed it the mean
step and the mean paired difference to dense with its 95 % interval: on few cores the steps of
processes that wait on each other spread by a quarter, which a median of 30 steps does not tame.

    python benchmarks/fsdp_overhead.py [--ranks 2] [--model vit-micro] [--methods dense,feather] [--steps 30]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from timing import paired_overhead
from torch import nn

WARMUP = 3


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--model", default="vit-micro")
    parser.add_argument("--methods", default="dense,feather")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=32)
    return parser.parse_args()


def rank_main(args: argparse.Namespace) -> None:
    from torch.distributed.fsdp import fully_shard

    import sparsetrain as st
    from sparsetrain.models import create_model

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    methods = args.methods.split(",")
    runs = {}
    for method in methods:
        torch.manual_seed(0)
        model = create_model(args.model)
        created = st.create(model, method, total_steps=args.steps + WARMUP)
        for module in model.modules():
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                fully_shard(module)
        fully_shard(model)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        created.bind(optimizer)
        runs[method] = (model, created, optimizer)
    gen = torch.Generator().manual_seed(rank)
    x, y = torch.randn(args.batch_size, 3, 32, 32, generator=gen), torch.randint(0, 10, (args.batch_size,), generator=gen)
    times = {method: [] for method in methods}
    for index in range(WARMUP + args.steps):
        for method in methods if index % 2 == 0 else methods[::-1]:
            model, created, optimizer = runs[method]
            dist.barrier()
            start = time.perf_counter()
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            created.before_optimizer_step()
            optimizer.step()
            created.step()
            if index >= WARMUP:
                times[method].append(time.perf_counter() - start)
    medians = torch.tensor([statistics.median(times[method]) for method in methods], dtype=torch.float64)
    dist.all_reduce(medians, op=dist.ReduceOp.MAX)
    slowest = torch.tensor([times[method] for method in methods], dtype=torch.float64)
    dist.all_reduce(slowest, op=dist.ReduceOp.MAX)  # each step as the slowest rank timed it
    if rank == 0:
        print(f"{args.ranks} gloo ranks, torch {torch.__version__}, {torch.get_num_threads()} thread(s) each, "
              f"{args.model}, batch {args.batch_size} per rank, {args.steps} interleaved steps")
        print("| method | median step, slowest rank (ms) | over dense |")
        print("|---|---:|---:|")
        for method, median in zip(methods, medians.tolist()):
            print(f"| {method} | {1e3 * median:.1f} | {100 * (median / medians[0].item() - 1):+.1f} % |")
        print("| method | mean step (ms) | over dense: mean paired difference (95 % interval) |")
        print("|---|---:|---:|")
        for method, steps in zip(methods, slowest.tolist()):
            print(f"| {method} | {1e3 * statistics.fmean(steps):.1f} | {paired_overhead(steps, slowest[0].tolist())} |")
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)  # skip interpreter teardown: torch 2.13's FSDP2 on gloo aborts in it about 1 run in 10


def main() -> None:
    args = parse_args()
    if "RANK" in os.environ:
        rank_main(args)
        return
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.ranks}",
               __file__, *sys.argv[1:]]
    sys.exit(subprocess.run(command, check=False, env={**os.environ, "OMP_NUM_THREADS": "1"}).returncode)


if __name__ == "__main__":
    main()
