"""select_sharded: on every rank, exactly what select(..., "global") gives on the concatenated shards.

The distributed tests start real gloo processes (2 and 3 ranks) once each; every rank runs all the
cases of :func:`cases` on its FSDP2-style shards (torch.chunk along dim 0, the last ranks possibly
empty) in each of the :data:`MODES` (the bracket on whole samples: the default chunk size and tiny
chunks; the radix fallback forced; a bracket from 4 sampled entries per rank, which misses at times),
and saves what it got.
"""

import math
import struct
import subprocess
import sys
from functools import reduce
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist

from sparsetrain import sharded_selection as ss
from sparsetrain.selection import Selection, prune_count, select
from sparsetrain.sharded_selection import select_sharded

SPARSITIES = (0.0, 1e-4, 0.1, 0.37, 0.5, 0.9, 1.0)
ROUNDS = {torch.float16: 1, torch.bfloat16: 1, torch.float32: 2, torch.float64: 4}  # of the radix fallback
TINY_CHUNK = 5
MODES = ("bracket", "buckets", "tiny-chunks", "radix", "sampled")


def set_mode(mode: str, world: int, patch=setattr) -> None:
    """bracket: the defaults (the tests' shards are smaller than a sample: the bracket is exact, and
    small enough to come with the counts); buckets: no entries carried with the counts, so the bucket
    holding position k is gathered in a round of its own; tiny-chunks: chunks of TINY_CHUNK entries;
    radix: a bracket budget of 0 entries, so the radix fallback decides; sampled: 4 entries sampled per
    rank, a narrow margin and no spare budget."""
    if mode == "buckets":
        patch(ss, "_CARRIED", 0)
    elif mode == "tiny-chunks":
        patch(ss, "_CHUNK", TINY_CHUNK)
    elif mode == "radix":
        patch(ss, "_budget", lambda margin: 0)
    elif mode == "sampled":
        patch(ss, "_SAMPLE", 4 * world)
        patch(ss, "_MARGIN", (0.5, 0.5))
        patch(ss, "_SPARE", 0)


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
    out["rank-without-rows"] = [grid((1, 40), 3, torch.float32), grid((2, 5), 3, torch.float32)]  # world 3: rank 2 holds nothing
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
from test_sharded_selection import MODES, SPARSITIES, cases, set_mode, shard
from sparsetrain import sharded_selection as ss

dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
calls, fallbacks = [0], [0]
for name in ("all_reduce", "all_gather"):
    def counted(*args, _call=getattr(dist, name), **kwargs):
        calls[0] += 1
        return _call(*args, **kwargs)
    setattr(dist, name, counted)
def radix(*args, _radix=ss._radix):
    fallbacks[0] += 1
    return _radix(*args)
ss._radix = radix
defaults = {{name: getattr(ss, name) for name in ("_CHUNK", "_budget", "_SAMPLE", "_MARGIN", "_SPARE", "_CARRIED")}}
results = {{}}
for mode in MODES:
    for name, value in defaults.items():
        setattr(ss, name, value)
    set_mode(mode, world)
    for name, layers in cases().items():
        shards = [shard(layer, world)[rank] for layer in layers]
        for s in SPARSITIES:
            calls[0] = fallbacks[0] = 0
            got = ss.select_sharded(shards, s)
            results[name, s, mode] = (got.thresholds, got.ties, calls[0], fallbacks[0])
for name, value in defaults.items():
    setattr(ss, name, value)
for name, layers in cases().items():  # one selector through the sparsities: its sample is reused
    selector, shards = ss.ShardedSelector(), [shard(layer, world)[rank] for layer in layers]
    for s in SPARSITIES:
        calls[0] = fallbacks[0] = 0
        got = selector.select(shards, s)
        results["kept", name, s] = (got.thresholds, got.ties, calls[0], fallbacks[0], got.straddles)
for name, bad in (("nan", float("nan")), ("negative", -1.0), ("infinite", float("inf"))):  # on one rank only: every rank raises alike
    layer = shard(torch.ones(6, 4), world)[rank]
    layer[:1, :1] = bad if rank == world - 1 - (name == "negative") else 1.0
    try:
        ss.select_sharded([layer], 0.5)
        results[name] = None
    except ValueError as error:
        results[name] = str(error)
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


def path(layers: list[torch.Tensor], s: float, tied: bool, calls: int, fallback: int) -> str:
    """The path that made ``calls`` collective rounds: "s = 0" (none), "k = 0" (1), "bracket" (2, the
    bracket's entries with the counts), "bucket" (3, the bucket holding k in a round of its own),
    "radix" (the bracket missed after the counts, or after the values that came with them: 2 + the
    radix rounds), "late radix" (it missed after the bucket's values, as only a narrow margin makes it:
    3 + the radix rounds)."""
    if s == 0.0:
        paths = {(0, 0): "s = 0"}
    elif prune_count(s, sum(m.numel() for m in layers)) == 0:
        paths = {(1, 0): "k = 0"}
    else:
        radix = ROUNDS[reduce(torch.promote_types, [m.dtype for m in layers])] + tied
        paths = {(2, 0): "bracket", (3, 0): "bucket", (2 + radix, 1): "radix", (3 + radix, 1): "late radix"}
    assert (calls, fallback) in paths, (calls, fallback, paths)
    return paths[calls, fallback]


@pytest.mark.slow  # real processes, like the DDP tests
@pytest.mark.parametrize("world", [2, 3])
def test_every_rank_gets_select_on_the_concatenated_shards(tmp_path, world):
    ranks = run_ranks(tmp_path, world)
    checked, spread, paths = 0, 0, {mode: set() for mode in MODES}
    for name, layers in cases().items():
        for s in SPARSITIES:
            want = select(layers, s, "global")
            tied = any(t is not None for t in want.ties)
            for mode in MODES:
                for rank, results in enumerate(ranks):
                    thresholds, ties, calls, fallback = results[name, s, mode]
                    assert bits(thresholds) == bits(want.thresholds), (name, s, mode, rank)
                    assert (calls, fallback) == ranks[0][name, s, mode][2:], (name, s, mode, rank)
                    for layer, mask, full in zip(layers, ties, want.ties):
                        part = shard(full if full is not None else torch.zeros(layer.shape, dtype=torch.bool), world)[rank]
                        assert (mask is None) == (not part.any()), (name, s, mode, rank)
                        assert mask is None or torch.equal(mask, part), (name, s, mode, rank)
                    checked += 1
                paths[mode].add(path(layers, s, tied, calls, fallback))
            masks = [[t is not None for t in results[name, s, "bracket"][1]] for results in ranks]
            spread += sum(map(any, masks)) >= 2 and sum(map(any, zip(*masks))) >= 2  # pruned ties on 2+ ranks and layers
    assert checked == len(cases()) * len(SPARSITIES) * len(MODES) * world
    assert spread >= 10  # through the bracket: ties pruned on 2+ ranks and 2+ layers
    assert paths["bracket"] == paths["tiny-chunks"] == {"s = 0", "k = 0", "bracket"}  # whole samples: never a miss
    assert paths["buckets"] == {"s = 0", "k = 0", "bucket"}
    assert paths["radix"] == {"s = 0", "k = 0", "radix"}
    assert paths["sampled"] == {"s = 0", "k = 0", "bracket", "radix"}
    warm = 0
    for name, layers in cases().items():
        for s in SPARSITIES:
            want = select(layers, s, "global")
            for rank, results in enumerate(ranks):
                thresholds, ties, calls, fallback, straddles = results["kept", name, s]
                assert bits(thresholds) == bits(want.thresholds), (name, s, rank)
                assert (calls, fallback) == ranks[0]["kept", name, s][2:4], (name, s, rank)
                assert straddles == any(t is not None for t in want.ties), (name, s, rank)
                for layer, mask, full in zip(layers, ties, want.ties):
                    part = shard(full if full is not None else torch.zeros(layer.shape, dtype=torch.bool), world)[rank]
                    assert mask is None and not part.any() or torch.equal(mask, part), (name, s, rank)
            warm += ranks[0]["kept", name, s][2:4] == (1, 0)  # the kept sample bracketed k: the counts' round alone
    assert warm >= len(cases()) * 3
    for name in ("nan", "negative", "infinite"):
        assert [results[name] for results in ranks] == [
            "magnitudes hold 1 negative, infinite or NaN entries; allowed: finite non-negative numbers."] * world


# -- one process ----------------------------------------------------------------------------


def same(got, want) -> None:
    assert bits(got.thresholds) == bits(want.thresholds)
    assert [t is None for t in got.ties] == [t is None for t in want.ties]
    assert all(g is None or torch.equal(g, w) for g, w in zip(got.ties, want.ties))


@pytest.mark.parametrize("name", ["random-f32", "grid-f32", "grid-bf16", "grid-f16", "grid-f64", "near-f32", "zeros-f32", "equal-f32", "rank-without-rows", "mixed", "transposed-f32"])
@pytest.mark.parametrize("mode", MODES)
def test_without_torch_distributed_it_is_select(name, mode, monkeypatch):
    set_mode(mode, 1, monkeypatch.setattr)
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


def counting(monkeypatch) -> tuple[list[int], list[int]]:
    """[entries read through ss._chunks] and [radix fallbacks taken], counted from here on."""
    chunks, read, fallbacks = ss._chunks, [0], [0]
    radix = ss._radix

    def counted(m, *args):
        for start, chunk in chunks(m, *args):
            read[0] += chunk.numel()
            yield start, chunk

    def counted_radix(*args):
        fallbacks[0] += 1
        return radix(*args)

    monkeypatch.setattr(ss, "_chunks", counted)
    monkeypatch.setattr(ss, "_radix", counted_radix)
    return read, fallbacks


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("mode", ["bracket", "radix"])
def test_entries_are_read_once_through_the_bracket_and_once_more_per_radix_round(dtype, mode, monkeypatch):
    """Bracket: 1 pass, + at most 1 marking straddling ties. Radix fallback: 1 + its rounds, + at
    most 2 with straddling ties (float32: at most 5 passes in all)."""
    set_mode(mode, 1, monkeypatch.setattr)
    read, fallbacks = counting(monkeypatch)
    passes = 1 if mode == "bracket" else 1 + ROUNDS[dtype]
    gen = torch.Generator().manual_seed(1)
    layers = [(torch.randint(0, 4, (n, 3), generator=gen) / 4).to(dtype) for n in (50, 70)]
    n = sum(m.numel() for m in layers)
    assert any(t is not None for t in select_sharded(layers, 0.5).ties)
    assert passes * n < read[0] <= (passes + 1 + (mode == "radix")) * n and fallbacks[0] == (mode == "radix")
    read[0] = fallbacks[0] = 0
    select_sharded([(torch.randperm(200, generator=gen) + 1).to(dtype)], 0.5)  # distinct values: no ties
    assert read[0] == passes * 200 and fallbacks[0] == (mode == "radix")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_a_sampled_bracket_selects_exactly_in_one_pass(dtype, monkeypatch):
    """300,000 entries: a real sample (65,536 entries), 1 pass; bfloat16: ties straddle k."""
    read, fallbacks = counting(monkeypatch)
    gen = torch.Generator().manual_seed(2)
    layers = [torch.randn(n, 100, generator=gen).abs().to(dtype) for n in (1000, 1, 1999)]
    tied = []
    for s in (1e-4, 0.5, 0.9, 1.0):
        read[0] = 0
        got, want = select_sharded(layers, s), select(layers, s, "global")
        same(got, want)
        tied.append(any(t is not None for t in want.ties))
        assert fallbacks[0] == 0 and read[0] <= (1 + tied[-1]) * 300_000, s
    assert tied == [False, dtype == torch.bfloat16, dtype == torch.bfloat16, False]


@pytest.mark.parametrize("carried", [ss._CARRIED, 0], ids=["with-the-counts", "in-buckets"])
@pytest.mark.parametrize(("bracket", "fallbacks"), [
    # v = lo, the largest magnitude below v lies below lo: the values gathered cannot tell it, and the radix
    # path decides (after the values; the real bracket makes it as unlikely as a miss)
    ((2.0, 3.0, 1.0, (2.0, 3.0)), 1),
    # the bracket [0.5, 3]: the largest magnitude below v = 2, 1.5, among the bracket's values that came with
    # the counts; or, in 4096 buckets, position k = 3 lies in the bucket of the three 2.0s, which holds
    # nothing else, and 1.5 is the largest entry of an earlier bucket
    ((0.5, 3.0, 1.0, (1.0, 3.0)), 0),
], ids=["ties-at-lo-take-the-radix-path", "the-value-below-v-from-an-earlier-bucket"])
def test_the_largest_magnitude_below_tied_values(monkeypatch, bracket, fallbacks, carried):
    monkeypatch.setattr(ss, "_CARRIED", carried)
    _, taken = counting(monkeypatch)
    monkeypatch.setattr(ss, "_bracket", lambda sample, k: bracket)
    layers = [torch.tensor([1.0, 2.0, 2.0]), torch.tensor([[3.0, 2.0, 1.5]])]
    same(select_sharded(layers, 0.5), select(layers, 0.5, "global"))
    assert taken[0] == fallbacks and select_sharded(layers, 0.5).thresholds == [1.5, 1.5]


def test_many_equal_magnitudes_take_the_radix_path_without_gathering_them(monkeypatch):
    _, fallbacks = counting(monkeypatch)
    layers = [torch.ones(150_000), torch.full((50_000,), 2.0)]
    same(select_sharded(layers, 0.5), select(layers, 0.5, "global"))
    assert fallbacks[0] == 1
    split = ss._split(layers, torch.float32, 1.0, 1.0, budget=1000, buckets=ss._Buckets(1.0, 0.0, 1))
    assert split.counts == [150_000, 0] and split.below == 0 and split.valid
    assert sum(len(part) for _, part in split.parts) <= 1000


def test_the_bracket_from_unequal_shards_holds_the_kth_value():
    """Rank 0 holds 150,000 entries, rank 1 holds 5,000, rank 2 none: their samples weigh 150,000 / 1,024,
    5,000 / 1,024 and nothing. The k-th smallest v lies in (lo, hi], inside the budget."""
    gen = torch.Generator().manual_seed(3)
    shards = [[torch.rand(150_000, generator=gen)], [torch.rand(5_000, generator=gen) * 0.1 + 0.45], [torch.empty(0)]]
    samples = np.stack([ss._sample(m, 1024) for m in shards])
    assert list(ss._counts(samples)) == [150_000, 5_000, 0] and np.isinf(samples[2, ss._HEAD :]).all()
    values = torch.cat([m[0] for m in shards]).numpy()
    for s in (1e-3, 0.3, 0.47, 0.5, 0.9, 1.0):
        k = prune_count(s, len(values))
        lo, hi, margin, sampled = ss._bracket(ss._gathered(samples, 1024), k)
        v = np.partition(values, k - 1)[k - 1]
        assert lo < v <= hi and ((values >= lo) & (values <= hi)).sum() <= ss._budget(margin), s
        inside = [x for x in samples[:, ss._HEAD :].flat if lo <= x <= hi and x != math.inf]  # not the padding
        assert sampled == (min(inside), max(inside)), s


def test_the_torch_pass_marks_like_the_numpy_pass():
    """The pass's primitive off the CPU (run here on CPU tensors): #(a < lo), lo <= a <= hi, and
    whether every entry is finite and >= 0."""
    buffers = np.empty(16, dtype=bool), np.empty(16, dtype=bool)
    cases = [([0.5, 2.0, 1.0, 0.0, 3.0, 1.5], True), ([1.0, -1.0, 2.0], False), ([1.0, math.nan, 0.5], False),
             ([1.0, math.inf], False), ([], True)]
    for values, valid in cases:
        a = torch.tensor(values)
        for lo, hi in ((1.0, 2.0), (-math.inf, 0.5), (3.0, math.inf)):
            got, want = ss._marks_torch(a, lo, hi), ss._marks_numpy(a.numpy(), lo, hi, *buffers)
            assert (got[0], got[1].tolist(), got[2]) == (want[0], want[1].tolist(), want[2]) == (want[0], want[1].tolist(), valid)


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
        ([torch.tensor([1.0, -2.0, 3.0])], 0.5, "1 negative, infinite or NaN entries"),
        ([torch.tensor([1.0, math.nan])], 0.5, "1 negative, infinite or NaN entries"),
        ([torch.tensor([math.inf, 1.0, math.inf])], 0.5, "2 negative, infinite or NaN entries"),
        ([torch.ones(3, dtype=torch.int32)], 0.5, "dtype torch.int32 are not supported"),
    ],
)
def test_invalid_input_is_refused(layers, sparsity, message):
    with pytest.raises(ValueError, match=message):
        select_sharded(layers, sparsity)


def test_a_selector_keeps_its_sample_while_it_brackets_k_and_stays_exact(monkeypatch):
    """Magnitudes that drift a little at each step, a ramp of sparsities, then a jump that moves every
    magnitude: one sample until the jump, one more after it, and select()'s result at every call."""
    sampled, sample = [], ss._sample

    def counted(*args):
        sampled.append(args)
        return sample(*args)

    monkeypatch.setattr(ss, "_sample", counted)
    gen = torch.Generator().manual_seed(4)
    weights = [torch.randn(n, 300, generator=gen) for n in (200, 500)]
    selector = ss.ShardedSelector()
    for step in range(12):
        weights = [w + 1e-3 * torch.randn(w.shape, generator=gen) for w in weights]
        if step == 8:
            weights = [w * 10.0 + 5.0 for w in weights]
        magnitudes = [w.abs() for w in weights]
        s = min(0.9, 0.1 * (step + 1))
        same(selector.select(magnitudes, s), select(magnitudes, s, "global"))
        assert len(sampled) == (1 if step < 8 else 2), step
