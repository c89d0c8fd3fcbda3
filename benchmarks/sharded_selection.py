"""Exact global selection over sharded weights: ``select_sharded`` across gloo processes against the
single-process ``select`` over one rank's share of the weights, CPU, one torch thread per rank.

The script launches itself under ``torch.distributed.run`` with ``--ranks`` ranks. Every rank builds
the same ``--layers`` float32 layers of |N(0, 1)| magnitudes (about ``--weights`` in all, from one
seed) and keeps its FSDP2 shard of each (``torch.chunk`` along dim 0). Reported, over ``--repeats``
timed calls after one warm-up: the median time of ``select_sharded`` (the slowest rank's median), of a
``ShardedSelector``'s call with the sample it kept from the warm-up (as the engine calls it at each step),
the median time of ``select(shards, s, "global")`` on rank 0's shards alone (the same local work
without communication), the collective rounds of one call (``torch.distributed.all_reduce`` and
``all_gather`` wrapped to count their calls), the passes over the local shards (entries read, counted
by wrapping the module's chunk reader, over the local entries; the bracket's sample of at most
65,536 / ranks entries per rank aside) and whether the bracket held position k or the radix fallback
decided (wrapped to count its calls). Before timing, every rank
checks that its result equals ``select`` on the concatenation of all shards (the full weights).
Memory: the peak resident bytes of one call beyond what the process held before it (Linux's VmHWM,
reset through /proc/self/clear_refs), on the largest rank; large allocations are mapped and unmapped
one by one (``MALLOC_MMAP_THRESHOLD_``) so freed memory does not stay resident between calls.

    python benchmarks/sharded_selection.py [--ranks 2] [--weights 25600000] [--layers 50]
                                           [--sparsity 0.9] [--repeats 5]
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

from sparsetrain import sharded_selection
from sparsetrain.selection import select

COLUMNS = 512


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ranks", type=int, choices=(2, 4), default=2)
    parser.add_argument("--weights", type=int, default=25_600_000)
    parser.add_argument("--layers", type=int, default=50)
    parser.add_argument("--sparsity", type=float, default=0.9)
    parser.add_argument("--repeats", type=int, default=5)
    return parser.parse_args()


def full_layers(weights: int, layers: int) -> list[torch.Tensor]:
    """``layers`` magnitude matrices of COLUMNS columns, row counts varying by +-1 around the mean."""
    rows = max(2, round(weights / layers / COLUMNS))
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(rows + i % 3 - 1, COLUMNS, generator=gen).abs() for i in range(layers)]


def shard(layer: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """FSDP2's shard of ``layer``: torch.chunk along dim 0, empty for ranks left without rows."""
    parts = torch.chunk(layer, world, dim=0)
    return parts[rank] if rank < len(parts) else layer[len(layer) :]


def counting() -> tuple[list[int], list[int], list[int]]:
    """Wrap the collectives, the chunk reader and the radix fallback; return the [calls], [entries read]
    and [fallbacks] counters."""
    calls, read, fallbacks = [0], [0], [0]

    def count_calls(name: str) -> None:
        call = getattr(dist, name)

        def counted(*args, **kwargs):
            calls[0] += 1
            return call(*args, **kwargs)

        setattr(dist, name, counted)

    count_calls("all_reduce")
    count_calls("all_gather")
    chunks, radix = sharded_selection._chunks, sharded_selection._radix

    def counted_chunks(m, *args):
        for start, chunk in chunks(m, *args):
            read[0] += chunk.numel()
            yield start, chunk

    def counted_radix(*args):
        fallbacks[0] += 1
        return radix(*args)

    sharded_selection._chunks, sharded_selection._radix = counted_chunks, counted_radix
    return calls, read, fallbacks


def check(got, want, rank: int, world: int) -> None:
    assert got.thresholds == want.thresholds, (got.thresholds[:1], want.thresholds[:1])
    for mask, full in zip(got.ties, want.ties):
        part = None if full is None else shard(full, rank, world)
        part = part if part is not None and part.any() else None
        assert (mask is None) == (part is None) and (mask is None or torch.equal(mask, part))


def _status(field: str) -> int:
    """A field of /proc/self/status in bytes (VmRSS: resident now; VmHWM: the peak since the last reset)."""
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith(field + ":"))
    return int(line.split()[1]) * 1024


def peak_extra(call) -> int:
    """Peak resident bytes during ``call()`` beyond the resident bytes before it."""
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")  # VmHWM := VmRSS
    before = _status("VmRSS")
    call()
    return _status("VmHWM") - before


def timed(call, repeats: int, barrier: bool) -> float:
    call()  # warm-up
    times = []
    for _ in range(repeats):
        if barrier:
            dist.barrier()
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def worker(args: argparse.Namespace) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    layers = full_layers(args.weights, args.layers)
    shards = [shard(layer, rank, world) for layer in layers]
    total, local = sum(m.numel() for m in layers), sum(m.numel() for m in shards)

    check(sharded_selection.select_sharded(shards, args.sparsity), select(layers, args.sparsity, "global"), rank, world)
    del layers
    sharded = timed(lambda: sharded_selection.select_sharded(shards, args.sparsity), args.repeats, barrier=True)
    selector = sharded_selection.ShardedSelector()  # as the engine keeps one: its sample from the warm-up call on
    kept = torch.tensor(timed(lambda: selector.select(shards, args.sparsity), args.repeats, barrier=True))
    dist.all_reduce(kept, op=dist.ReduceOp.MAX)
    alone = timed(lambda: select(shards, args.sparsity, "global"), args.repeats, barrier=False) if rank == 0 else 0.0
    slowest = torch.tensor(sharded)
    dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
    extra = torch.tensor(peak_extra(lambda: sharded_selection.select_sharded(shards, args.sparsity)))
    dist.all_reduce(extra, op=dist.ReduceOp.MAX)
    calls, read, fallbacks = counting()
    sharded_selection.select_sharded(shards, args.sparsity)
    fresh_calls = calls[0]
    selector.select(shards, args.sparsity)
    if rank == 0:
        print(f"{world} ranks, {total:,} float32 magnitudes in {args.layers} layers, {local:,} on rank 0, s = {args.sparsity}")
        print("result equals select on the concatenated shards: yes (every rank)")
        print(f"select_sharded                 median {slowest.item() * 1e3:8.1f} ms (slowest rank)")
        print(f"ShardedSelector, sample kept   median {kept.item() * 1e3:8.1f} ms (slowest rank)")
        print(f"select on rank 0's shards only median {alone * 1e3:8.1f} ms")
        path = "radix fallback (the bracket missed)" if fallbacks[0] else "bracket from the gathered sample"
        print(f"collective rounds per call: {fresh_calls} (a kept sample: {calls[0] - fresh_calls}); passes over rank 0's "
              f"shards: {read[0] / local / 2:.2f}; path: {path}")
        shard_bytes = local * 4
        print(f"peak memory of one call beyond the shards: {extra.item() / 2**20:.2f} MiB (largest rank) = "
              f"{100 * extra.item() / shard_bytes:.2f} % of rank 0's shards ({shard_bytes / 2**20:.1f} MiB)")
    dist.destroy_process_group()


def main() -> None:
    args = parse_args()
    if "LOCAL_RANK" in os.environ:
        worker(args)
        return
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.ranks}", __file__, *sys.argv[1:]]
    sys.exit(subprocess.run(command, check=False, env={**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "65536"}).returncode)


if __name__ == "__main__":
    main()
