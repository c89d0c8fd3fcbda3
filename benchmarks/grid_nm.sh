#!/usr/bin/env bash
# The N:M comparison in BENCHMARKS.md (issue 13): dense, sr-ste, feather-nm and st3-nm at 2:4 and 1:4,
# seeds 0 and 1, 15 epochs of the shared recipe on the bundled CIFAR-10 sample, two torch threads per run,
# for ResNet-20 and for vit-micro. Resumable: run it again to finish an interrupted grid. The ResNet-20
# dense cells have the options of the issue-10 grid (benchmarks/results/resnet20-sample-issue10): copy
# its dense lines into results.jsonl first to skip training them again.
set -euo pipefail
for model in resnet20 vit-micro; do
    sparsetrain bench --model "$model" --methods sr-ste,feather-nm,st3-nm --nm 2:4,1:4 --seeds 0,1 \
        --epochs 15 --device cpu --workers 2 --out "benchmarks/results/$model-sample-nm" "$@"
done
