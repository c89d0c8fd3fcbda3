"""What the step-overhead scripts report about paired timings: the mean of the paired differences to a
reference, as a percentage of the reference's mean step, with its 95 % interval (normal approximation)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence


def paired_overhead(times: Sequence[float], reference: Sequence[float]) -> str:
    """'+m % [lo, hi]': the mean of times[i] - reference[i] over the reference's mean, with its 95 % interval."""
    differences = [t - r for t, r in zip(times, reference)]
    mean = statistics.fmean(differences)
    half = 1.96 * statistics.stdev(differences) / len(differences) ** 0.5 if len(differences) > 1 else 0.0
    base = statistics.fmean(reference)
    return f"{100 * mean / base:+.1f} % [{100 * (mean - half) / base:+.1f}, {100 * (mean + half) / base:+.1f}]"


def median_ms(work: Callable[[], object], repeats: int) -> float:
    """The median wall time of ``work()`` over ``repeats`` calls, in milliseconds."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        work()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)
