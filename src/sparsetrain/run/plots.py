"""PNG plots of a training run and of a per-layer sparsity report, rendered headless with Agg."""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Mapping, Sequence, Sized
from pathlib import Path

from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator, PercentFormatter

from ..report import SparsityReport
from .checkpoint import atomic_write


def plot_training(metrics: Sequence[Mapping[str, float]], path: str | Path, title: str | None = None) -> Path:
    """Plot test accuracy and train/test loss (top) and sparsity (bottom, if any record has it)
    per epoch into one PNG at `path`; each series uses only the records that contain its key."""
    if not metrics:
        raise ValueError("metrics is empty: there is no epoch to plot.")
    has_sparsity = any("sparsity" in record for record in metrics)
    fig = Figure(figsize=(8, 6.5 if has_sparsity else 4), layout="constrained")
    axes = fig.subplots(2 if has_sparsity else 1, 1, sharex=True, squeeze=False)[:, 0]
    top = axes[0]
    loss = top.twinx()
    lines = [
        *top.plot(*_series(metrics, "test_acc", scale=100), "o-", color="tab:blue", label="test accuracy"),
        *loss.plot(*_series(metrics, "train_loss"), "--", color="tab:orange", label="train loss"),
        *loss.plot(*_series(metrics, "test_loss"), ":", color="tab:red", label="test loss"),
    ]
    top.set_ylabel("test accuracy")
    top.yaxis.set_major_formatter(PercentFormatter())
    loss.set_ylabel("loss")
    top.legend(handles=lines, loc="lower center", bbox_to_anchor=(0.5, 1.0), ncols=3, frameon=False)
    top.grid(alpha=0.3)
    if has_sparsity:
        axes[1].plot(*_series(metrics, "sparsity", scale=100), "o-", color="tab:green")
        axes[1].set_ylabel("sparsity")
        axes[1].yaxis.set_major_formatter(PercentFormatter())
        axes[1].grid(alpha=0.3)
    axes[-1].set_xlabel("epoch")
    axes[-1].xaxis.set_major_locator(MaxNLocator(integer=True))
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def plot_layer_sparsity(report: SparsityReport, path: str | Path, title: str | None = None) -> Path:
    """Plot each prunable layer's sparsity as a horizontal bar, first layer on top, with a vertical
    line at the total sparsity, into a PNG at `path`; the figure grows with the layer count."""
    if not report.layers:
        raise ValueError("report has no layer to plot.")
    names = [layer.name for layer in report.layers]
    fig = Figure(figsize=(8, 1.5 + 0.22 * len(names)), layout="constrained")
    ax = fig.subplots()
    ax.barh(names, [100 * layer.sparsity for layer in report.layers], color="tab:blue", label="layer sparsity")
    ax.axvline(100 * report.sparsity, color="tab:red", linestyle="--", label=f"total {report.sparsity:.1%}")
    ax.set_ylim(len(names) - 0.5, -0.5)  # first layer on top, no empty margin
    ax.set_xlim(0, 100)
    ax.xaxis.set_major_formatter(PercentFormatter())
    ax.set_xlabel("sparsity")
    ax.tick_params(axis="y", labelsize=8)
    ax.grid(axis="x", alpha=0.3)
    ax.set_axisbelow(True)
    ax.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), ncols=2, frameon=False)
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def _series(metrics: Sequence[Mapping[str, float]], key: str, scale: float = 1.0) -> tuple[list[float], list[float]]:
    """The epochs and scaled values of the records that contain `key`."""
    rows = [(record["epoch"], scale * record[key]) for record in metrics if key in record]
    return [epoch for epoch, _ in rows], [value for _, value in rows]


def _save(fig: Figure, path: str | Path) -> Path:
    """Render `fig` as PNG onto `path`, atomically."""
    FigureCanvasAgg(fig)  # Agg for this figure only; no pyplot, no global backend switch
    return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))


def _by_method(records: Sequence[Mapping]) -> dict[str, list[Mapping]]:
    groups: dict[str, list[Mapping]] = {}
    for record in records:
        groups.setdefault(str(record["method"]), []).append(record)
    return groups


def method_colors(methods: Iterable[str]) -> dict[str, str]:
    """One colour per method, the same in every plot that is given this mapping: dense black,
    the others matplotlib's C0, C1, ... in name order."""
    others = sorted(set(methods) - {"dense"})
    return {"dense": "black", **{method: f"C{i % 10}" for i, method in enumerate(others)}}


def _comparison_figure(runs: Sized) -> tuple[Figure, Axes]:
    """The figure and axes of a method-comparison plot; ``ValueError`` if there is no run."""
    if not runs:
        raise ValueError("records is empty: there is no run to plot.")
    fig = Figure(figsize=(7, 4.5), layout="constrained")
    return fig, fig.subplots()


def plot_accuracy_vs_sparsity(summary: Mapping[tuple[str, float], tuple[float, float, int]], path: str | Path,
                              reference: str, colors: Mapping[str, str] | None = None) -> Path:
    """Mean ± std test accuracy against target sparsity, one line per method; the ``reference``
    method (the unpruned one the grid compares with) as a horizontal line.
    ``summary`` maps (method, sparsity) to (mean accuracy, std, runs), as
    :func:`sparsetrain.bench.summarise` gives it; ``colors`` maps method names to colours
    (default: :func:`method_colors`)."""
    fig, ax = _comparison_figure(summary)
    colors = colors or method_colors(method for method, _ in summary)
    for method in sorted({method for method, _ in summary}):
        points = sorted((100 * s, 100 * mean, 100 * std) for (m, s), (mean, std, _) in summary.items() if m == method)
        sparsities, means, stds = zip(*points)
        if method == reference:
            mean = statistics.mean(means)
            ax.axhline(mean, color=colors[method], linestyle="--", label=f"{reference} ({mean:.1f}%)")
            continue
        ax.errorbar(sparsities, means, yerr=stds, marker="o", capsize=3, label=method, color=colors[method])
    ax.set_xlabel("sparsity")
    ax.set_ylabel("test accuracy")
    ax.xaxis.set_major_formatter(PercentFormatter())
    ax.yaxis.set_major_formatter(PercentFormatter())
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left", fontsize=8)
    return _save(fig, path)


def plot_accuracy_vs_flops(records: Sequence[Mapping], path: str | Path, colors: Mapping[str, str] | None = None) -> Path:
    """Test accuracy against FLOPs (non-zero weights only, % of dense), every run a point, per method.
    ``colors`` as in :func:`plot_accuracy_vs_sparsity`."""
    fig, ax = _comparison_figure(records)
    colors = colors or method_colors(r["method"] for r in records)
    for method, rows in sorted(_by_method(records).items()):
        ax.scatter([100 * r["flops"] / r["dense_flops"] for r in rows], [100 * r["test_acc"] for r in rows],
                   label=method, color=colors[method])
    ax.set_xscale("log")
    ax.set_xlabel("FLOPs, % of dense (log scale)")
    ax.set_ylabel("test accuracy")
    ax.yaxis.set_major_formatter(PercentFormatter())
    ax.grid(alpha=0.3, which="both")
    ax.legend(loc="lower right", fontsize=8)
    return _save(fig, path)
