#!/usr/bin/env bash
# The method comparison in BENCHMARKS.md: ResNet-20 on the bundled CIFAR-10 sample, 15 epochs,
# dense + five unstructured presets at 90 % and 98 % + GDP (50 % FLOPs) and FRS (default budget),
# seeds 0 and 1, one torch thread per run. Resumable: run it again to finish an interrupted grid.
set -euo pipefail
exec sparsetrain bench --model resnet20 \
    --methods feather,st3,st3-sigma,gmp,ste,gdp,frs --sparsities 0.9,0.98 --seeds 0,1 \
    --epochs 15 --device cpu --workers 1 --out benchmarks/results/resnet20-sample "$@"
