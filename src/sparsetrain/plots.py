"""PNG plots of a training run and of a per-layer sparsity report, rendered headless with Agg."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator, PercentFormatter

from .checkpoint import atomic_write
from .report import SparsityReport


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
