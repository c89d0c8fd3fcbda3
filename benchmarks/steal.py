"""CPU time the host of a virtual machine takes from it ("steal": the eighth number of /proc/stat's
cpu line). While the host is busy, steps slow down for seconds at a time, unevenly across the
set-ups a benchmark compares; the benchmarks report the share stolen so a reader can judge."""

from __future__ import annotations

from pathlib import Path


def cpu_times() -> tuple[int, int]:
    """(stolen, total) jiffies of all CPUs since boot; (0, 1) where /proc/stat is absent."""
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    except OSError:
        return 0, 1
    return (fields[7] if len(fields) > 7 else 0), sum(fields)


class StolenShare:
    """``with StolenShare() as stolen: ...``; then ``stolen.share``: the share of CPU time stolen meanwhile."""

    share = 0.0

    def __enter__(self) -> StolenShare:
        self._start = cpu_times()
        return self

    def __exit__(self, *exc: object) -> None:
        (stolen, total), (stolen0, total0) = cpu_times(), self._start
        self.share = (stolen - stolen0) / max(1, total - total0)
