"""FRS scoring time per pruning event on ResNet-20 (issue 22): the work a pruning event does before it
picks channels, timed on whichever code tree ``sparsetrain`` is imported from.

A pruning event traces the model's activations and channel groups (``candidates``) and scores relevance on
the scoring data (``FRS.scores``); both are timed, each the median of ``--repeats`` runs after one warm-up,
in wall time and in the CPU time of this process. The scoring data are the CLI's (``sparsetrain.run.loop``):
a ``BatchLoader`` of the first 512 training images of the bundled CIFAR-10 sample, augmented, batch 256;
the example inputs are two test images.

    python benchmarks/frs_scoring.py [--repeats 5] [--threads 0]
    PYTHONPATH=/path/to/other/tree/src python benchmarks/frs_scoring.py   # the same on another tree
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from collections.abc import Callable

import torch

import sparsetrain as st
from sparsetrain.data import BatchLoader, load_dataset
from sparsetrain.methods.frs import candidates
from sparsetrain.models import create_model

SCORING_IMAGES, SCORING_BATCH = 512, 256  # as an epoch of the CLI's scoring loader on the first 512 images


def median_seconds(fn: Callable[[], object], repeats: int) -> tuple[float, float]:
    """Median wall time and median CPU time of this process (all threads) of ``fn()`` over ``repeats``
    calls, after one warm-up call. On a shared machine the CPU time moves less: waiting for a core is
    not counted."""
    fn()
    wall, cpu = [], []
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return statistics.median(wall), statistics.median(cpu)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    data = load_dataset()
    scoring = BatchLoader(data.x_train[:SCORING_IMAGES], data.y_train[:SCORING_IMAGES], SCORING_BATCH, data.mean,
                          data.std, shuffle=False, augment=True, seed=0)
    example = data.x_test[:2].float()
    model = create_model("resnet20")
    method = st.create(model, "frs", total_steps=100, example_inputs=example, data=scoring, prune_every=10,
                       stop_at=100, channels_per_step=40)

    trace = median_seconds(lambda: candidates(model, example), args.repeats)
    timings = {
        "candidates (trace activations and channel groups)": trace,
        f"scores ({SCORING_IMAGES} images, batch {SCORING_BATCH})": median_seconds(method.scores, args.repeats),
    }
    timings["per pruning event, both"] = tuple(map(sum, zip(*timings.values())))
    print(f"code: {st.__file__}")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.machine()}, "
          f"median of {args.repeats} after one warm-up")
    print("| work | wall (ms) | CPU (ms) |\n|---|---:|---:|")
    for name, (wall, cpu) in timings.items():
        print(f"| {name} | {wall * 1e3:.0f} | {cpu * 1e3:.0f} |")


if __name__ == "__main__":
    main()
