"""The comparison grid: accuracy against sparsity for every method, resumable, with a table and plots.

A grid trains the dense reference once per seed and every (method, target, seed) cell with
the same recipe; the target is the option the method's registry entry names (sparsity for the
unstructured presets, the FLOPs target for gdp, none for frs). Method flags and ``method_args``
shared by the grid go to the methods that take them. With ``recipe="paper"`` each method trains
on its own paper's recipe (its registry entry names it), scaled to the grid's epochs; by default
all share one recipe, for a like-for-like table. Each finished cell appends one record to ``results.jsonl``; re-running the grid
skips finished cells, resumes a cell killed mid-run from its last epoch checkpoint, and drops a
truncated last line of the results file (a grid killed while writing it) without losing the
other records.

Folder layout: ``grid.json`` (the grid's options), ``results.jsonl``, ``runs/<cell>/`` (one
training run folder per cell), ``results.md`` and the plots ``accuracy_vs_sparsity.png`` and
``accuracy_vs_flops.png``.
"""

from __future__ import annotations

import json
import os
import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..methods import method_options, method_spec, reference_method
from .checkpoint import atomic_write, write_json
from .flags import MethodFlag, method_flags
from .folder import RunFolder
from .loop import train
from .options import options_from_dict

RESULTS, GRID, TABLE = "results.jsonl", "grid.json", "results.md"
PAPER = "paper"  # as --recipe: each method on its own paper's recipe
DEFAULT_METHODS = ("feather", "st3", "st3-sigma", "gmp", "ste")


def grid_axes() -> dict[str, MethodFlag]:
    """The options a grid varies, by their list flag (``sparsities``, ``flops-targets``, ``nm``): the
    method flags whose option is declared with an :class:`~sparsetrain.declare.Axis`."""
    return {flag.axis.flag: flag for flag in method_flags().values() if flag.axis is not None}


def axis_values(flag: MethodFlag) -> tuple[Any, ...]:
    """The values a grid takes on an axis when none are given."""
    return flag.axis.default


@dataclass(frozen=True)
class Cell:
    """One training run of the grid: a method, the value of the option the grid varies for it
    (``target``: e.g. its sparsity, FLOPs target or N:M pattern; None for a method without one), a seed."""

    method: str
    target: float | str | None
    seed: int

    @property
    def target_option(self) -> str | None:
        return method_spec(self.method).target

    @property
    def _flag(self) -> MethodFlag:
        """The method flag of the target option."""
        return next(f for f in method_flags().values() if f.takes.get(self.method) == self.target_option)

    @property
    def name(self) -> str:
        if self.target is None:
            return f"{self.method}-seed{self.seed}"
        value = self.target.replace(":", "-") if isinstance(self.target, str) else f"{self.target:g}"
        return f"{self.method}-{self._flag.axis.short}{value}-seed{self.seed}"

    def options(self) -> dict[str, Any]:
        """The training options that make this cell different from the others."""
        options: dict[str, Any] = {"method": self.method, "seed": self.seed}
        if self.target is not None:
            options[self._flag.key] = self.target
        return options

    def training_options(self, base: dict[str, Any]) -> dict[str, Any]:
        """The shared options, less the method flags and ``method_args`` this cell's method does
        not take (the reference takes none), with the cell's own on top."""
        takes = set(method_spec(self.method).option_names())
        flags = method_flags()
        shared = {k: v for k, v in base.items() if k not in flags or self.method in flags[k].takes}
        if "method_args" in base:
            shared["method_args"] = {k: v for k, v in base["method_args"].items() if k in takes}
        if base.get("recipe") == PAPER:
            shared["recipe"] = method_spec(self.method).recipe
        return {**shared, **self.options()}


def grid_cells(methods: Sequence[str], seeds: Sequence[int], values: Mapping[str, Sequence[Any]] | None = None) -> list[Cell]:
    """Seed by seed: the reference, then every method at each value of the option its grid varies
    (``values``: by the axis's list flag, e.g. {"sparsities": [0.9]}; an axis not given takes its
    defaults), so a partial grid covers every method."""
    values = values or {}
    axes = {flag.key: (axis, flag) for axis, flag in grid_axes().items()}
    reference = reference_method()

    def targets(method: str) -> Sequence[Any]:
        found = [(axis, flag) for axis, flag in axes.values() if method in flag.takes]
        if not found:
            return (None,)
        axis, flag = found[0]
        return values.get(axis, axis_values(flag))

    return [
        cell
        for seed in seeds
        for cell in [Cell(reference, None, seed)] + [Cell(m, t, seed) for m in methods if m != reference for t in targets(m)]
    ]


def read_results(path: Path) -> list[dict[str, Any]]:
    """The finished records; a truncated last line (a write cut short) is dropped from the file."""
    if not path.is_file():
        return []
    lines = path.read_text().splitlines()
    records = []
    for number, line in enumerate(lines):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if number != len(lines) - 1:
                raise ValueError(f"{path} line {number + 1} is not JSON; only a truncated last line is repaired.") from None
            text = "".join(json.dumps(r) + "\n" for r in records)
            atomic_write(path, lambda tmp, text=text: Path(tmp).write_text(text))
    return records


def append_record(path: Path, record: dict[str, Any]) -> None:
    with open(path, "a") as file:
        file.write(json.dumps(record) + "\n")
        file.flush()
        os.fsync(file.fileno())


def _measure(folder: RunFolder) -> dict[str, Any]:
    """Accuracy, reached sparsity, params and FLOPs (non-zero weights only) of a finished run."""
    metrics = folder.config()["metrics"]
    history = folder.metrics()
    keep = ("test_acc", "params", "nonzero_params", "flops", "dense_flops")
    return {
        **{key: metrics[key] for key in keep},
        "sparsity_reached": metrics["sparsity"],
        "wall_time": sum(record["epoch_time"] for record in history),
    }


def _shared_options(base: dict[str, Any]) -> dict[str, Any]:
    """The options that define a grid's results (not where or how fast it runs)."""
    return {key: value for key, value in base.items() if key not in ("device", "workers")}


def check_grid(base: dict[str, Any], cells: Sequence[Cell], out: str | Path) -> None:
    """Raise ValueError, before anything trains, for a bad cell option or a folder holding another grid."""
    if not cells:
        raise ValueError("the grid has no cell; allowed: at least one seed.")
    taken = {name for cell in cells for name in method_spec(cell.method).option_names()}
    for key, flag in method_flags().items():
        if key in base and not any(cell.method in flag.takes for cell in cells):
            raise ValueError(f"--{key.replace('_', '-')} applies to none of the grid's methods; allowed: a flag one of them takes.")
    unknown = sorted(set(base.get("method_args", {})) - taken)
    if unknown:
        raise ValueError(f"method option {unknown[0]!r} applies to none of the grid's methods; allowed: {', '.join(sorted(taken))}.")
    for cell in cells:
        options_from_dict({**cell.training_options(base), "name": "check"})
    saved = Path(out) / GRID
    if saved.is_file() and json.loads(saved.read_text()) != _shared_options(base):
        raise ValueError(f"{out} holds a grid with other options ({saved}); allowed: the same options, or a new --out.")


def run_grid(
    base: dict[str, Any],
    cells: Sequence[Cell],
    out: str | Path,
    log: Callable[[str], None] = print,
) -> list[dict[str, Any]]:
    """Train every unfinished cell of the grid in ``out``; write the table and plots; return all records.

    ``base`` holds the training options shared by every cell (model, epochs, data, recipe).
    """
    out = Path(out)
    check_grid(base, cells, out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / GRID, _shared_options(base))
    results_path = out / RESULTS
    records = read_results(results_path)
    done = {record["cell"] for record in records}
    for index, cell in enumerate(cells):
        if cell.name in done:
            continue
        options = options_from_dict({**cell.training_options(base), "out": str(out / "runs"), "name": cell.name})
        folder = RunFolder(options.run_dir)
        log(f"[{index + 1}/{len(cells)}] {cell.name}" + (" (resuming)" if folder.has_checkpoint() else ""))
        # a cell killed before its first checkpoint starts over through resume (which keeps what it did not write)
        train(options, resume=folder.has_config(), log=lambda line: log(f"  {line}"))
        record = {"cell": cell.name, "method": cell.method, "target": cell.target_option,
                  "sparsity": _target_sparsity(cell), **_axis_values(cell), "seed": cell.seed, **_measure(folder)}
        append_record(results_path, record)
        records.append(record)
    write_outputs(records, out)
    return records


def _axis_values(cell: Cell) -> dict[str, Any]:
    """The cell's value of every axis option but sparsity (None where the cell's method has another)."""
    names = {flag.takes[m] for flag in grid_axes().values() for m in flag.takes} - {"sparsity"}
    return {name: cell.target if name == cell.target_option else None for name in sorted(names)}


def _target_sparsity(cell: Cell) -> float:
    """The sparsity the cell's method aims at, as its options give it (``target_sparsity()``: the
    sparsity, 1 - N/M for a pattern); 0 for a method whose options state none (dense, channel pruning)."""
    options = method_options(cell.method, **({} if cell.target is None else {cell.target_option: cell.target}))
    return float(options.target_sparsity()) if hasattr(options, "target_sparsity") else 0.0


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation; the std is 0 for a single value."""
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarise(records: Sequence[dict[str, Any]], column: str = "sparsity") -> dict[tuple[str, Any], tuple[float, float, int]]:
    """(method, value of ``column``) -> (mean accuracy, std accuracy, runs); std is 0 for a single run."""
    groups: dict[tuple[str, Any], list[float]] = {}
    for record in records:
        groups.setdefault((record["method"], record.get(column)), []).append(record["test_acc"])
    return {key: (*_mean_std(v), len(v)) for key, v in groups.items()}


def results_table(records: Sequence[dict[str, Any]]) -> str:
    """Markdown: mean ± std test accuracy (%) per method (rows) and target sparsity (columns);
    N:M runs in a table by pattern, channel-pruning runs in one by FLOPs reached. The reference
    alone has a table by sparsity only in a grid of nothing else."""
    reference = [r for r in records if r["method"] == reference_method()]
    unstructured = [r for r in records if _by_sparsity(r)]
    nm = [r for r in records if r.get("target") == "nm"]
    structured = [r for r in records if not _by_sparsity(r) and r.get("target") != "nm"]
    alone = not (nm or structured)  # a grid of the reference only
    tables = [_sparsity_table(unstructured)] if _beside_reference(unstructured) or (unstructured and alone) else []
    if nm:
        tables.append(_sparsity_table(reference + nm, column="nm"))
    if structured:
        tables.append(_flops_table(structured))
    return "\n\n".join(tables)


def _beside_reference(records: Sequence[dict[str, Any]]) -> bool:
    """Whether ``records`` hold a run of a method other than the reference."""
    return any(r["method"] != reference_method() for r in records)


def _by_sparsity(record: dict[str, Any]) -> bool:
    """Whether a record belongs in the accuracy-by-sparsity table: the reference, and the methods
    whose grid varies their sparsity (the others are compared by pattern or by FLOPs)."""
    return record["method"] == reference_method() or record.get("target", "sparsity") == "sparsity"


def _flops_table(records: Sequence[dict[str, Any]]) -> str:
    groups: dict[tuple[str, Any], list[dict[str, Any]]] = {}
    for record in records:
        groups.setdefault((record["method"], record.get("flops_target")), []).append(record)
    rows = ["| method | FLOPs target | FLOPs reached (% of dense) | test accuracy (%) |", "|---|---:|---:|---:|"]
    for (method, target), group in sorted(groups.items(), key=lambda item: item[0][0]):
        mean, std = _mean_std([100 * r["test_acc"] for r in group])
        flops = statistics.mean(100 * r["flops"] / r["dense_flops"] for r in group)
        target_text = "—" if target is None else f"{target:.0%}"
        rows.append(f"| {method} | {target_text} | {flops:.1f} | {mean:.2f} ± {std:.2f} (n={len(group)}) |")
    return "\n".join(rows)


def _sparsity_table(records: Sequence[dict[str, Any]], column: str = "sparsity") -> str:
    """Rows: methods, the reference first; columns: target sparsities, or N:M patterns (column "nm",
    densest first); the reference fills every column."""
    summary = summarise(records, column)
    if column == "nm":  # densest first: by the sparsity the records hold (1 - N/M)
        sparsity = {r["nm"]: r["sparsity"] for r in records if r["method"] != reference_method()}
        values = sorted({v for m, v in summary if m != reference_method()}, key=lambda v: sparsity[v])
        headings = values
    else:
        values = sorted({v for m, v in summary if m != reference_method()})
        headings = [f"{v:.0%}" for v in values]
    methods = sorted({m for m, _ in summary}, key=lambda m: (m != reference_method(), m))
    rows = ["| method | " + " | ".join(headings) + " |", "|---" + "|---:" * len(values) + "|"]
    for method in methods:
        cells = []
        for value in values:
            key = (method, value) if method != reference_method() else (method, 0.0 if column == "sparsity" else None)
            if key in summary:
                mean, std, n = summary[key]
                cells.append(f"{100 * mean:.2f} ± {100 * std:.2f} (n={n})")
            else:
                cells.append("—")
        label = f"{method} (reference, unpruned)" if method == reference_method() else method
        rows.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def write_outputs(records: Sequence[dict[str, Any]], out: Path) -> None:
    """results.md, accuracy against FLOPs, and accuracy against sparsity (N:M runs at 1 - N/M)
    when a method beside the reference has one."""
    if not records:
        return
    from .plots import method_colors, plot_accuracy_vs_flops, plot_accuracy_vs_sparsity  # matplotlib: imported to draw

    atomic_write(out / TABLE, lambda tmp: Path(tmp).write_text(results_table(records) + "\n"))
    by_sparsity = [r for r in records if _by_sparsity(r) or r.get("target") == "nm"]  # N:M: 1 - N/M
    colors = method_colors(r["method"] for r in records)  # one colour per method across both plots
    if _beside_reference(by_sparsity):
        plot_accuracy_vs_sparsity(summarise(by_sparsity), out / "accuracy_vs_sparsity.png", reference_method(), colors)
    plot_accuracy_vs_flops(records, out / "accuracy_vs_flops.png", colors)

