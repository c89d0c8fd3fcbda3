"""select_sharded: on every rank, exactly what select(..., "global") gives on the concatenated shards.

The distributed tests start real gloo processes (2 and 3 ranks) once each; every rank runs all the
cases of :func:`cases` on its FSDP2-style shards (torch.chunk along dim 0, the last ranks possibly
empty), once with the default chunk size and once with tiny chunks, and saves what it got.
"""

import math
import struct
import subprocess
import sys
from functools import reduce
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from sparsetrain import sharded_selection as ss
from sparsetrain.selection import Selection, prune_count, select
from sparsetrain.sharded_selection import select_sharded

SPARSITIES = (0.0, 1e-4, 0.1, 0.37, 0.5, 0.9, 1.0)
ROUNDS = {torch.float16: 1, torch.bfloat16: 1, torch.float32: 2, torch.float64: 4}
TINY_CHUNK = 5


def cases() -> dict[str, list[torch.Tensor]]:
    """Full (unsharded) layers; the workers and the tests build the same ones."""
    gen = torch.Generator().manual_seed(0)
    shapes = [(5, 3), (1, 4), (64, 33), (0, 7), (17,), (2, 2, 3)]  # (1, 4): one row, the other ranks empty

    def grid(shape, levels, dtype):  # few distinct values: ties straddle position k across ranks and layers
        return (torch.randint(0, levels, shape, generator=gen) / levels).to(dtype)

    def near(shape):  # 1, 1 + ulp, 1 + 2 ulp: the value below v shares v's top 16 bits
        return 1.0 + torch.randint(0, 3, shape, generator=gen).float() * 2.0**-23

    out = {
        f"random-{name}": [torch.randn(s, generator=gen).abs().to(dtype) for s in shapes]
        for name, dtype in [("f32", torch.float32), ("bf16", torch.bfloat16), ("f64", torch.float64)]
    }
    out |= {
        f"grid-{name}": [grid(s, 4, dtype) for s in shapes]
        for name, dtype in [("f32", torch.float32), ("bf16", torch.bfloat16), ("f16", torch.float16), ("f64", torch.float64)]
    }
    out["near-f32"] = [near(s) for s in shapes]
    out["zeros-f32"] = [grid(s, 2, torch.float32) * (torch.rand(s, generator=gen) < 0.3) for s in shapes]
    out["equal-f32"] = [torch.ones(s) for s in shapes]
    out["mixed"] = [grid((9, 4), 3, torch.bfloat16), grid((7,), 3, torch.float32), grid((6, 2), 3, torch.float16)]
    out["transposed-f32"] = [  # non-contiguous shards, rows longer than TINY_CHUNK
        grid((8, 6), 3, torch.float32).T,
        grid((5, 1), 3, torch.float32),
        grid((3, 4, 5), 3, torch.float32).permute(2, 0, 1),
    ]
    return out


def shard(layer: torch.Tensor, world: int) -> list[torch.Tensor]:
    """FSDP2's dim-0 sharding: torch.chunk, then empty shards for the ranks left without rows."""
    parts = list(torch.chunk(layer, world, dim=0)) if len(layer) else []
    return parts + [layer[len(layer) :]] * (world - len(parts))


WORKER = """
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, {tests!r})
from test_sharded_selection import SPARSITIES, TINY_CHUNK, cases, shard
from sparsetrain import sharded_selection as ss

dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
calls = [0]
for name in ("all_reduce", "all_gather"):
    def counted(*args, _call=getattr(dist, name), **kwargs):
        calls[0] += 1
        return _call(*args, **kwargs)
    setattr(dist, name, counted)
results = {{}}
for chunk in (ss._CHUNK, TINY_CHUNK):
    ss._CHUNK = chunk
    for name, layers in cases().items():
        shards = [shard(layer, world)[rank] for layer in layers]
        for s in SPARSITIES:
            calls[0] = 0
            got = ss.select_sharded(shards, s)
            results[name, s, chunk] = (got.thresholds, got.ties, calls[0])
torch.save(results, {out!r} + f"/rank{{rank}}.pt")
dist.destroy_process_group()
"""


def run_ranks(tmp_path: Path, world: int) -> list[dict]:
    script = tmp_path / "worker.py"
    script.write_text(WORKER.format(tests=str(Path(__file__).parent), out=str(tmp_path)))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}", str(script)]
    done = subprocess.run(command, check=False, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    return [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]


def bits(values: list[float]) -> list[bytes]:
    return [struct.pack("<d", v) for v in values]


def expected_rounds(layers: list[torch.Tensor], s: float, tied: bool) -> int:
    if s == 0.0:
        return 0
    if prune_count(s, sum(m.numel() for m in layers)) == 0:
        return 1
    return ROUNDS[reduce(torch.promote_types, [m.dtype for m in layers])] + tied


@pytest.mark.slow  # real processes, like the DDP tests
@pytest.mark.parametrize("world", [2, 3])
def test_every_rank_gets_select_on_the_concatenated_shards(tmp_path, world):
    ranks = run_ranks(tmp_path, world)
    checked, spread = 0, 0
    for name, layers in cases().items():
        for s in SPARSITIES:
            want = select(layers, s, "global")
            for chunk in (ss._CHUNK, TINY_CHUNK):
                for rank, results in enumerate(ranks):
                    thresholds, ties, calls = results[name, s, chunk]
                    assert bits(thresholds) == bits(want.thresholds), (name, s, rank)
                    assert calls == expected_rounds(layers, s, any(t is not None for t in want.ties)), (name, s)
                    for layer, mask, full in zip(layers, ties, want.ties):
                        part = shard(full if full is not None else torch.zeros(layer.shape, dtype=torch.bool), world)[rank]
                        assert (mask is None) == (not part.any()), (name, s, rank)
                        assert mask is None or torch.equal(mask, part), (name, s, rank)
                    checked += 1
            masks = [[t is not None for t in results[name, s, ss._CHUNK][1]] for results in ranks]
            spread += sum(map(any, masks)) >= 2 and sum(map(any, zip(*masks))) >= 2  # pruned ties on 2+ ranks and layers
    assert checked == len(cases()) * len(SPARSITIES) * 2 * world and spread >= 10


# -- one process ----------------------------------------------------------------------------


def same(got, want) -> None:
    assert bits(got.thresholds) == bits(want.thresholds)
    assert [t is None for t in got.ties] == [t is None for t in want.ties]
    assert all(g is None or torch.equal(g, w) for g, w in zip(got.ties, want.ties))


@pytest.mark.parametrize("name", ["random-f32", "grid-f32", "grid-bf16", "grid-f16", "grid-f64", "near-f32", "zeros-f32", "equal-f32", "mixed", "transposed-f32"])
@pytest.mark.parametrize("chunk", [ss._CHUNK, TINY_CHUNK])
def test_without_torch_distributed_it_is_select(name, chunk, monkeypatch):
    monkeypatch.setattr(ss, "_CHUNK", chunk)
    layers = cases()[name]
    for s in SPARSITIES:
        same(select_sharded(layers, s), select(layers, s, "global"))


def test_a_world_of_one_is_select():
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        layers = cases()["grid-f32"]
        for s in SPARSITIES:
            same(select_sharded(layers, s), select(layers, s, "global"))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize(("dtype", "passes"), [(torch.float32, 4), (torch.bfloat16, 3), (torch.float64, 6)])
def test_entries_are_read_at_most_rounds_plus_two_times(dtype, passes, monkeypatch):
    keys, read = ss._keys, [0]

    def counted(chunk, *args):
        read[0] += chunk.numel()
        return keys(chunk, *args)

    monkeypatch.setattr(ss, "_keys", counted)
    gen = torch.Generator().manual_seed(1)
    layers = [(torch.randint(0, 4, (n, 3), generator=gen) / 4).to(dtype) for n in (50, 70)]
    n = sum(m.numel() for m in layers)
    assert any(t is not None for t in select_sharded(layers, 0.5).ties)
    assert read[0] <= passes * n
    read[0] = 0
    select_sharded([(torch.randperm(200, generator=gen) + 1).to(dtype)], 0.5)  # distinct values: no ties
    assert read[0] == (passes - 2) * 200


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_tensors_select_like_the_cpu():
    for name in ("random-f32", "grid-f32", "grid-bf16", "grid-f64", "near-f32", "mixed"):
        layers = cases()[name]
        for s in SPARSITIES:
            got = select_sharded([m.cuda() for m in layers], s)
            same(Selection(got.thresholds, [t if t is None else t.cpu() for t in got.ties]), select(layers, s, "global"))


def test_negative_zero_counts_as_zero():
    layers = [torch.tensor([-0.0, 0.5, 0.0, -0.0, 1.0])]
    for s in (0.2, 0.4, 0.6, 0.8):
        got, want = select_sharded(layers, s), select(layers, s, "global")
        assert got.thresholds == want.thresholds
        assert [t is None for t in got.ties] == [t is None for t in want.ties]
        assert all(g is None or torch.equal(g, w) for g, w in zip(got.ties, want.ties))


def test_empty_input_and_empty_layers():
    assert select_sharded([], 0.5).thresholds == []
    got = select_sharded([torch.empty(0, 3), torch.empty(0)], 0.5)
    assert got.thresholds == [0.0, 0.0] and got.ties == [None, None]


@pytest.mark.parametrize(
    ("layers", "sparsity", "message"),
    [
        ([torch.ones(3)], 1.5, "sparsity=1.5 is out of range"),
        ([torch.ones(3)], math.nan, "sparsity=nan is out of range"),
        ([torch.tensor([1.0, -2.0, 3.0])], 0.5, "1 negative or NaN entries"),
        ([torch.tensor([1.0, math.nan])], 0.5, "1 negative or NaN entries"),
        ([torch.ones(3, dtype=torch.int32)], 0.5, "dtype torch.int32 are not supported"),
    ],
)
def test_invalid_input_is_refused(layers, sparsity, message):
    with pytest.raises(ValueError, match=message):
        select_sharded(layers, sparsity)
