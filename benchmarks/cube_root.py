"""Cube roots on the CPU, the last step of Feather's p = 3 operator: numpy's ``cbrt``, torch's
``pow(x, 1/3)`` and Newton's steps from a guess read off the bits (``sparsetrain.operators.cube_root_``),
on 1 M float32 values all non-zero and 90 % zeros (the operator's input at 90 % sparsity), with the
largest error against a float64 cube root in units of float32's epsilon. Which one the operator takes
depends on the CPU (numpy's cbrt is vectorized only with AVX-512, which torch reports; float32 elsewhere
takes Newton's steps).

    python benchmarks/cube_root.py [--size 1000000] [--repeats 30]
"""

from __future__ import annotations

import argparse
import platform

import numpy as np
import torch
from timing import median_ms  # benchmarks/timing.py

from sparsetrain.operators import NUMPY_CBRT_VECTORIZED, cube_root_


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=1_000_000)
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    print(f"{platform.machine()}, torch {torch.__version__} ({torch.get_num_threads()} threads, CPU capability "
          f"{torch.backends.cpu.get_cpu_capability()}), numpy {np.__version__}; the operator takes "
          f"{'numpy' if NUMPY_CBRT_VECTORIZED else 'Newton'} for float32")
    print("| input | numpy cbrt (ms) | torch pow (ms) | Newton (ms) | numpy error (eps) | pow error (eps) | Newton error (eps) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    gen = torch.Generator().manual_seed(0)
    dense = torch.rand(args.size, generator=gen) * 1e-3 + 1e-9  # |w|^3 - T^3 of weights about 0.1
    sparse = dense * (torch.rand(args.size, generator=gen) < 0.1)
    for name, x in (("all non-zero", dense), ("90 % zeros", sparse)):
        array, out = x.numpy(), torch.empty_like(x)
        out_array = out.numpy()
        roots = {
            "numpy": lambda a=array, o=out_array: np.cbrt(a, out=o),
            "pow": lambda v=x, o=out: torch.pow(v, 1 / 3, out=o),
            "newton": lambda v=x, o=out: cube_root_(o.copy_(v)),  # in place: the copy is part of its time
        }
        times = [median_ms(root, args.repeats) for root in roots.values()]
        exact = torch.from_numpy(np.cbrt(x.double().numpy()))
        kept = exact > 0
        errors = []
        for value in (torch.from_numpy(np.cbrt(array)), torch.pow(x, 1 / 3), cube_root_(x.clone())):
            errors.append(((value.double() - exact).abs()[kept] / exact[kept]).max().item() / torch.finfo(torch.float32).eps)
        print(f"| {name} | " + " | ".join(f"{t:.2f}" for t in times) + " | " + " | ".join(f"{e:.2f}" for e in errors) + " |")


if __name__ == "__main__":
    main()
