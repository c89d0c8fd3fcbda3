"""Cost of sparsifying during training, and of exact threshold selection.

1. Median training-step time (forward, backward, ``before_optimizer_step``, SGD step, ``step``)
   of a zoo model (CIFAR ResNet-20 unless ``--model``) at batch 128, and the method's ``step()``
   timed inside those steps as well as alone: a plain loop with no method, then every registered method
   driven through the protocol (``dense`` shows the protocol's own cost).
2. Time to select one global threshold over 25.6 M magnitudes (ResNet-50's size):
   sparsetrain's exact selection (``select``, as the engine calls it, and ``kth_smallest``)
   vs torch.kthvalue vs a full sort, and one pass over the data for scale.

    python benchmarks/overhead.py [--model resnet20] [--steps 30] [--methods a,b] [--total-steps 1000]
                                  [--batch-size 128] [--device cpu] [--flush-denormal]

``--total-steps``: the schedules' length. The default (1000) keeps every schedule early in its ramp
during the measured steps and FRS before its first pruning step; ``--total-steps`` equal to
``--steps`` + 3 spreads the timed steps over the whole schedule, ramp and final pattern alike (the
N:M presets prune k = round(s(t) M) per group, nothing while k = 0: only a whole schedule shows
their cost).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch
import torch.nn.functional as F
from steal import StolenShare  # benchmarks/steal.py

import sparsetrain as st
from sparsetrain.models import create_model


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Trainer:
    """One training set-up of zoo model ``model``; ``step()`` runs and times one full training step."""

    def __init__(self, model: str, method: str | None, batch_size: int, device: torch.device, total_steps: int) -> None:
        torch.manual_seed(0)
        self.device = device
        self.model = create_model(model).to(device)
        self.x = torch.randn(batch_size, 3, 32, 32, device=device)
        self.y = torch.randint(0, 10, (batch_size,), device=device)
        self.method = None
        self.method_step_times: list[float] = []  # the method's step() inside each timed training step
        if method is not None:
            data = [(self.x, self.y)]
            self.method = st.create(self.model, method, total_steps=total_steps, example_inputs=self.x[:2], data=data)
        self.opt = torch.optim.SGD(self.model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
        if self.method is not None:
            self.method.bind(self.opt)

    def step(self) -> float:
        sync(self.device)
        start = time.perf_counter()
        loss = F.cross_entropy(self.model(self.x), self.y)
        self.opt.zero_grad()
        loss.backward()
        if self.method is not None:
            self.method.before_optimizer_step()
        self.opt.step()
        if self.method is not None:
            sync(self.device)
            own = time.perf_counter()
            self.method.step()
            sync(self.device)
            self.method_step_times.append(time.perf_counter() - own)
        sync(self.device)
        return time.perf_counter() - start


def interleaved_step_times(
    model: str, methods: list[str | None], rounds: int, batch_size: int, device: torch.device, total_steps: int
) -> tuple[list[Trainer], list[list[float]]]:
    """Step times per set-up; the set-ups take turns each round so machine drift hits all alike,
    and the order rotates from round to round so no set-up always runs first or after the same one."""
    trainers = [Trainer(model, method, batch_size, device, total_steps) for method in methods]
    times: list[list[float]] = [[] for _ in methods]
    for round_index in range(rounds + 3):
        for offset in range(len(trainers)):
            i = (round_index + offset) % len(trainers)
            elapsed = trainers[i].step()
            if round_index >= 3:
                times[i].append(elapsed)
    return trainers, times


def paired_overhead(times: list[float], reference: list[float]) -> float:
    """Median over rounds of (t - t_ref) / t_ref, each round against the reference step taken
    moments before it: drift slower than a round cancels."""
    return statistics.median((t - r) / r for t, r in zip(times, reference))


def method_costs(trainer: Trainer, repeats: int) -> tuple[float, float]:
    """Median ms of the method's own work per step: ``before_optimizer_step()`` + ``step()``, and
    the forward and backward of the parametrized weights (every layer's w -> w~ and its gradient)."""
    method = trainer.method
    modules = [m for m in trainer.model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    step_times, weight_times = [], []
    for _ in range(repeats):
        sync(trainer.device)
        start = time.perf_counter()
        method.before_optimizer_step()
        method.step()
        sync(trainer.device)
        step_times.append(time.perf_counter() - start)
        trainer.opt.zero_grad()
        start = time.perf_counter()
        sum(module.weight.sum() for module in modules).backward()
        sync(trainer.device)
        weight_times.append(time.perf_counter() - start)
    trainer.opt.zero_grad()
    return statistics.median(step_times) * 1e3, statistics.median(weight_times) * 1e3


def selection_times(n: int, repeats: int, device: torch.device) -> dict[str, float]:
    gen = torch.Generator(device=device).manual_seed(0)
    sizes = [n // 50] * 49 + [n - 49 * (n // 50)]  # a model's worth of layers
    magnitudes = [torch.randn(s, generator=gen, device=device).abs() for s in sizes]
    k = round(0.9 * n)
    flat = torch.cat(magnitudes)
    expected = flat.kthvalue(k).values.item()

    def timed(fn) -> float:
        best = []
        for _ in range(repeats):
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            best.append(time.perf_counter() - start)
        return statistics.median(best)

    assert st.kth_smallest(magnitudes, k) == expected
    assert st.select(magnitudes, 0.9, "global").thresholds[0] == expected  # random floats: no tie at k
    return {
        "sparsetrain select (exact, tie check)": timed(lambda: st.select(magnitudes, 0.9, "global")),
        "sparsetrain kth_smallest": timed(lambda: st.kth_smallest(magnitudes, k)),
        "torch.kthvalue (concatenated)": timed(lambda: torch.cat(magnitudes).kthvalue(k)),
        "full sort (concatenated)": timed(lambda: torch.cat(magnitudes).sort()),
        "one pass (sum)": timed(lambda: sum(m.sum() for m in magnitudes)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet20", help="a zoo model (sparsetrain list)")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--methods", default="", help="comma-separated (default: every registered method)")
    parser.add_argument("--total-steps", type=int, default=1000, help="length of the methods' schedules")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--weights", type=int, default=25_600_000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--flush-denormal", action="store_true", help="treat denormal floats as zero on CPU")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.set_flush_denormal(args.flush_denormal)
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads, device {device}, flush denormal {args.flush_denormal}")

    methods = [m for m in args.methods.split(",") if m] if args.methods else list(st.list_methods())
    print(f"\n{args.model}, batch {args.batch_size}: median step time over {args.steps} interleaved rounds, "
          f"schedules of {args.total_steps} steps")
    print("| method | median step (ms) | overhead: ratio of medians | overhead: median of paired rounds "
          "| before_optimizer_step + step (ms) | w -> w~ fwd+bwd (ms) | own cost vs plain step "
          "| step() inside the training steps (ms) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    with StolenShare() as stolen:
        trainers, (plain, *timed) = interleaved_step_times(args.model, [None, *methods], args.steps, args.batch_size,
                                                           device, args.total_steps)
    print(f"(CPU time stolen by the host during these rounds: {stolen.share:.1%})")
    plain_ms = statistics.median(plain) * 1e3
    print(f"| (no method) | {plain_ms:.1f} | - | - | - | - | - | - |")
    for method, times, trainer in zip(methods, timed, trainers[1:]):
        median_ms = statistics.median(times) * 1e3
        step_ms, weight_ms = method_costs(trainer, args.steps)
        print(f"| {method} | {median_ms:.1f} | {100 * (median_ms / plain_ms - 1):+.1f} % | "
              f"{100 * paired_overhead(times, plain):+.1f} % | {step_ms:.2f} | {weight_ms:.2f} | "
              f"{100 * (step_ms + weight_ms) / plain_ms:.1f} % | {statistics.median(trainer.method_step_times) * 1e3:.2f} |")

    print(f"\nGlobal threshold over {args.weights:,} magnitudes (50 layers), s = 0.9, median of {args.repeats}")
    print("| selection | time (ms) | vs full sort |")
    print("|---|---:|---:|")
    times = selection_times(args.weights, args.repeats, device)
    sort_time = times["full sort (concatenated)"]
    for name, t in times.items():
        print(f"| {name} | {t * 1e3:.1f} | {sort_time / t:.1f}x faster |")


if __name__ == "__main__":
    main()
