"""Paired comparison of methods: every variant trained from each seed, against a reference variant.

A variant is a method with some of its options set ("feather-sigma=feather:scope=sigma"). For a
seed, every variant starts from the same initial weights and sees the same batches in the same
order (the seed fixes both, whatever the method), so the differences d_i = a_i - r_i of test
accuracy between a variant and the reference on seed i are paired. With n seeds,

    mean d ± t_{0.975, n-1} · s_d / √n

is the 95 % t-interval of the mean difference (s_d the sample standard deviation of the d_i).

Folder layout: ``paired.json`` (the shared options), ``results.jsonl`` (one record per finished
run), ``runs/<label>-seed<seed>/`` (one training run folder each, resumed when killed) and
``results.md`` (the paired table).
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..methods import method_spec
from .bench import append_record, read_results
from .checkpoint import atomic_write, write_json
from .folder import RunFolder
from .loop import train
from .options import options_from_dict, text_value

RESULTS, SHARED, TABLE = "results.jsonl", "paired.json", "results.md"
# Two-sided 95 % quantiles of Student's t distribution, t_{0.975, df}, df = 1..10.
T_975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228)


@dataclass(frozen=True)
class Variant:
    """A method with options of its own, under a label naming it in tables and run folders."""

    label: str
    method: str
    method_args: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {"label": self.label, "method": self.method, "method_args": self.method_args}


def parse_variant(text: str) -> Variant:
    """``METHOD``, ``METHOD:KEY=VALUE,...`` or ``LABEL=METHOD:KEY=VALUE,...`` (values read as on the
    command line); without a label, the text with ':' and ',' made '-'."""
    head, _, args = text.partition(":")
    label, _, method = head.rpartition("=")
    method_args: dict[str, Any] = {}
    for item in filter(None, args.split(",")):
        key, sign, value = item.partition("=")
        if not sign or not key:
            raise ValueError(f"variant {text!r}: {item!r} is not KEY=VALUE; allowed: METHOD[:KEY=VALUE,...] "
                             f"with an optional LABEL= in front.")
        method_args[key] = text_value(value)
    method_spec(method)  # raises for an unknown method
    label = label or text.replace(":", "-").replace(",", "-")
    if not label or "/" in label or label.startswith("."):
        raise ValueError(f"variant label {label!r} is not allowed; allowed: a name without '/' that does not start with '.'.")
    return Variant(label, method, method_args)


def paired_interval(reference: Sequence[float], candidate: Sequence[float]) -> tuple[float, float, float]:
    """Mean paired difference ``candidate - reference`` and its 95 % t-interval (low, high)."""
    if len(reference) != len(candidate) or not 2 <= len(reference) <= len(T_975) + 1:
        raise ValueError(f"paired samples of sizes {len(reference)} and {len(candidate)}; "
                         f"allowed: equal sizes from 2 to {len(T_975) + 1}.")
    differences = [c - r for r, c in zip(reference, candidate)]
    mean = statistics.mean(differences)
    half = T_975[len(differences) - 2] * statistics.stdev(differences) / math.sqrt(len(differences))
    return mean, mean - half, mean + half


def run_options(base: dict[str, Any], variant: Variant, seed: int, out: Path) -> dict[str, Any]:
    """The training options of one run: the shared ones the method takes, the variant's, the seed."""
    takes = set(method_spec(variant.method).option_names())
    shared = {k: v for k, v in base.items() if k != "sparsity" or "sparsity" in takes}
    return {**shared, "method": variant.method, "method_args": dict(variant.method_args), "seed": seed,
            "out": str(out / "runs"), "name": f"{variant.label}-seed{seed}"}


def run_paired(
    base: dict[str, Any],
    variants: Sequence[Variant],
    seeds: Sequence[int],
    out: str | Path,
    log: Callable[[str], None] = print,
) -> list[dict[str, Any]]:
    """Train every unfinished (seed, variant) run, seed by seed; write the table; return all records.

    ``base`` holds the training options shared by every run (model, epochs, sparsity, data, recipe);
    the first variant is the reference of the table.
    """
    out = Path(out)
    labels = [v.label for v in variants]
    if not variants or len(set(labels)) != len(labels) or not seeds:
        raise ValueError(f"variants {labels} and seeds {list(seeds)}; allowed: distinct labels and at least one seed.")
    saved = out / SHARED
    shared = {k: v for k, v in base.items() if k not in ("device", "workers")}
    if saved.is_file() and json.loads(saved.read_text()) != shared:
        raise ValueError(f"{out} holds runs with other shared options ({saved}); allowed: the same options, or a new --out.")
    records = read_results(out / RESULTS)
    for record in records:
        known = next((v for v in variants if v.label == record["label"]), None)
        if known is not None and (known.method, known.method_args) != (record["method"], record["method_args"]):
            raise ValueError(f"{out} holds label {known.label!r} for another variant ({record['method']} "
                             f"{record['method_args']}); allowed: a new label or a new --out.")
    for seed in seeds:
        for variant in variants:
            options_from_dict({**run_options(base, variant, seed, out), "name": "check"})  # before anything trains
    out.mkdir(parents=True, exist_ok=True)
    write_json(saved, shared)
    done = {(r["label"], r["seed"]) for r in records}
    for seed in seeds:
        for variant in variants:
            if (variant.label, seed) in done:
                continue
            options = options_from_dict(run_options(base, variant, seed, out))
            folder = RunFolder(options.run_dir)
            log(f"{variant.label} seed {seed}" + (" (resuming)" if folder.has_checkpoint() else ""))
            train(options, resume=folder.has_config(), log=lambda line: log(f"  {line}"))
            metrics = folder.config()["metrics"]
            record = {**variant.as_dict(), "seed": seed, "test_acc": metrics["test_acc"],
                      "sparsity_reached": metrics["sparsity"],
                      "wall_time": sum(r["epoch_time"] for r in folder.metrics())}
            append_record(out / RESULTS, record)
            records.append(record)
    atomic_write(out / TABLE, lambda tmp: Path(tmp).write_text(paired_table(records, labels) + "\n"))
    return records


def paired_table(records: Sequence[dict[str, Any]], labels: Sequence[str]) -> str:
    """Markdown: per-seed test accuracy (%) of each variant, mean ± std, and the paired difference
    from the first label with its 95 % t-interval over the seeds both have finished."""
    accuracy = {(r["label"], r["seed"]): 100 * r["test_acc"] for r in records}
    seeds = sorted({seed for _, seed in accuracy})
    reference = labels[0]
    rows = ["| variant | " + " | ".join(f"seed {s}" for s in seeds) + f" | mean ± std | paired difference from {reference} "
            "(95 % CI) |", "|---" + "|---:" * (len(seeds) + 2) + "|"]
    for label in labels:
        values = [accuracy.get((label, s)) for s in seeds]
        done = [v for v in values if v is not None]
        spread = f"{statistics.mean(done):.2f} ± {statistics.stdev(done) if len(done) > 1 else 0.0:.2f}" if done else "—"
        pairs = [(accuracy[(reference, s)], accuracy[(label, s)]) for s in seeds
                 if (reference, s) in accuracy and (label, s) in accuracy]
        if label == reference or len(pairs) < 2:
            difference = "—"
        else:
            mean, low, high = paired_interval(*zip(*pairs))
            difference = f"{mean:+.2f} [{low:+.2f}, {high:+.2f}] (n={len(pairs)})"
        cells = " | ".join("—" if v is None else f"{v:.2f}" for v in values)
        rows.append(f"| {label} | {cells} | {spread} | {difference} |")
    return "\n".join(rows)
