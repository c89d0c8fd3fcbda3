"""Paired comparison of variants of the methods over seeds (issue 24's protocol "sample-R20-30" by default).

Every variant trains from each seed with the same shared options; the first is the reference. Killed
runs resume, finished ones are skipped; the table (per-seed accuracies, mean ± std, the paired mean
difference from the reference with its 95 % t-interval) is printed and written to OUT/results.md.

    python benchmarks/paired.py --variants feather "feather-sigma=feather:scope=sigma" \
        --sparsity 0.98 --seeds 0,1,2,3,4 --epochs 30 --workers 2 --out benchmarks/results/paired-r20-98
"""

from __future__ import annotations

import argparse
import sys

from sparsetrain.run.paired import paired_table, parse_variant, run_paired


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", nargs="+", default=["feather"],
                        help="METHOD[:KEY=VALUE,...] with an optional LABEL= in front; the first is the reference")
    parser.add_argument("--model", default="resnet20")
    parser.add_argument("--sparsity", type=float, default=0.98)
    parser.add_argument("--seeds", default="0,1,2,3,4")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--workers", type=int, default=2, help="CPU threads for torch")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    try:
        variants = [parse_variant(text) for text in args.variants]
        seeds = [int(s) for s in args.seeds.split(",")]
        base = {"model": args.model, "sparsity": args.sparsity, "epochs": args.epochs, "batch_size": args.batch_size,
                "lr": 0.1, "momentum": 0.9, "wd": 5e-4, "lr_schedule": "cosine", "device": "cpu", "workers": args.workers}
        records = run_paired(base, variants, seeds, args.out, log=lambda line: print(line, flush=True))
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    print(paired_table(records, [v.label for v in variants]))


if __name__ == "__main__":
    main()
