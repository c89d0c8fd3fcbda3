"""Cost of sparsifying during training, and of exact threshold selection.

1. Median training-step time (forward, backward, SGD step, sparsifier step) of a CIFAR
   ResNet-20 at batch 128, dense and with every preset.
2. Time to select one global threshold over 25.6 M magnitudes (ResNet-50's size):
   sparsetrain's bracketed selection vs torch.kthvalue vs a full sort.

    python benchmarks/overhead.py [--steps 20] [--batch-size 128] [--device cpu]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch
import torch.nn.functional as F

import sparsetrain as st
from sparsetrain.models import create_model


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_step_time(method: str | None, steps: int, batch_size: int, device: torch.device) -> float:
    torch.manual_seed(0)
    model = create_model("resnet20").to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    total = 1000
    sp = st.Sparsifier(model, method, 0.9, total_steps=total) if method else None
    x = torch.randn(batch_size, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (batch_size,), device=device)
    times = []
    for i in range(steps + 3):
        sync(device)
        start = time.perf_counter()
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if sp is not None:
            sp.step()
        sync(device)
        if i >= 3:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


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
    return {
        "sparsetrain kth_smallest": timed(lambda: st.kth_smallest(magnitudes, k)),
        "torch.kthvalue (concatenated)": timed(lambda: torch.cat(magnitudes).kthvalue(k)),
        "full sort (concatenated)": timed(lambda: torch.cat(magnitudes).sort()),
        "one pass (sum)": timed(lambda: sum(m.sum() for m in magnitudes)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--weights", type=int, default=25_600_000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads, device {device}")

    print(f"\nResNet-20, batch {args.batch_size}: median step time over {args.steps} steps")
    print("| method | step (ms) | overhead vs dense |")
    print("|---|---:|---:|")
    dense = median_step_time(None, args.steps, args.batch_size, device)
    print(f"| dense | {dense * 1e3:.1f} | - |")
    for method in st.list_methods():
        t = median_step_time(method, args.steps, args.batch_size, device)
        print(f"| {method} | {t * 1e3:.1f} | {100 * (t / dense - 1):+.1f} % |")

    print(f"\nGlobal threshold over {args.weights:,} magnitudes (50 layers), s = 0.9, median of {args.repeats}")
    print("| selection | time (ms) | vs full sort |")
    print("|---|---:|---:|")
    times = selection_times(args.weights, args.repeats, device)
    sort_time = times["full sort (concatenated)"]
    for name, t in times.items():
        print(f"| {name} | {t * 1e3:.1f} | {sort_time / t:.1f}x faster |")


if __name__ == "__main__":
    main()
