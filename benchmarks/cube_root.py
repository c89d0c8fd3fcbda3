"""Cube roots on the CPU, the last step of Feather's p = 3 operator: numpy's ``cbrt`` against torch's
``pow(x, 1/3)``, on 1 M float32 values all non-zero and 90 % zeros (the operator's input at 90 % sparsity),
with the largest error against a float64 cube root in units of float32's epsilon. Which one the operator
takes depends on the CPU (numpy's cbrt is vectorized only with AVX-512, which torch reports).

    python benchmarks/cube_root.py [--size 1000000] [--repeats 30]
"""

from __future__ import annotations

import argparse
import platform

import numpy as np
import torch
from timing import median_ms  # benchmarks/timing.py

from sparsetrain.operators import NUMPY_CBRT_VECTORIZED


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=1_000_000)
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    print(f"{platform.machine()}, torch {torch.__version__} ({torch.get_num_threads()} threads, CPU capability "
          f"{torch.backends.cpu.get_cpu_capability()}), numpy {np.__version__}; the operator takes "
          f"{'numpy' if NUMPY_CBRT_VECTORIZED else 'pow'}")
    print("| input | numpy cbrt (ms) | torch pow (ms) | numpy error (eps) | pow error (eps) |")
    print("|---|---:|---:|---:|---:|")
    gen = torch.Generator().manual_seed(0)
    dense = torch.rand(args.size, generator=gen) * 1e-3 + 1e-9  # |w|^3 - T^3 of weights about 0.1
    sparse = dense * (torch.rand(args.size, generator=gen) < 0.1)
    for name, x in (("all non-zero", dense), ("90 % zeros", sparse)):
        array, out = x.numpy(), torch.empty_like(x)
        out_array = out.numpy()
        numpy_ms = median_ms(lambda a=array, o=out_array: np.cbrt(a, out=o), args.repeats)
        pow_ms = median_ms(lambda v=x, o=out: torch.pow(v, 1 / 3, out=o), args.repeats)
        exact = torch.from_numpy(np.cbrt(x.double().numpy()))
        kept = exact > 0
        errors = []
        for value in (torch.from_numpy(np.cbrt(array)), torch.pow(x, 1 / 3)):
            errors.append(((value.double() - exact).abs()[kept] / exact[kept]).max().item() / torch.finfo(torch.float32).eps)
        print(f"| {name} | {numpy_ms:.2f} | {pow_ms:.2f} | {errors[0]:.2f} | {errors[1]:.2f} |")


if __name__ == "__main__":
    main()
