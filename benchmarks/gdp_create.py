"""Time of ``create(model, "gdp")``: tracing the channel groups, finding the layers that feed attention-like
operations, and checking on a copy that cutting one channel per group computes what the gated model does.
Once per run; the median of three fresh models.

    python benchmarks/gdp_create.py [--model resnet56]
    PYTHONPATH=/path/to/other/tree/src python benchmarks/gdp_create.py   # the same on another tree
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import sparsetrain as st
from sparsetrain.models import create_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet56")
    args = parser.parse_args()
    torch.set_num_threads(2)
    times = []
    for _ in range(3):
        model = create_model(args.model)
        start = time.perf_counter()
        st.create(model, "gdp", total_steps=1000, example_inputs=torch.zeros(2, 3, 32, 32))
        times.append(time.perf_counter() - start)
    print(f"{st.__file__}: create({args.model}, 'gdp') median {statistics.median(times):.2f} s of "
          f"{[round(t, 2) for t in times]}")


if __name__ == "__main__":
    main()
