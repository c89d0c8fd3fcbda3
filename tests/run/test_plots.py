"""The training-curve and per-layer sparsity plots: valid, non-blank PNGs written atomically."""

import struct
from pathlib import Path

import matplotlib.image
import pytest

from sparsetrain.report import LayerReport, SparsityReport
from sparsetrain.run.plots import method_colors, plot_layer_sparsity, plot_training

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_size(path: Path) -> tuple[int, int]:
    """Width and height from the IHDR chunk, after checking the PNG signature."""
    head = path.read_bytes()[:24]
    assert head[:8] == PNG_SIGNATURE
    assert head[12:16] == b"IHDR"
    return struct.unpack(">II", head[16:24])


def assert_drawn(path: Path) -> None:
    """The image has several distinct pixel values, so something was drawn on it."""
    pixels = matplotlib.image.imread(path)
    assert pixels.std() > 0.05
    assert len({tuple(p) for p in pixels.reshape(-1, pixels.shape[-1])[::97]}) > 5


def metrics(epochs: int, sparse: bool = True) -> list[dict[str, float]]:
    records = []
    for e in range(1, epochs + 1):
        record = {"epoch": e, "train_loss": 2.0 / e, "test_loss": 2.2 / e, "test_acc": 0.5 + 0.04 * e, "lr": 0.1, "epoch_time": 3.0}
        if sparse:
            record |= {"sparsity": min(0.9, 0.1 * e), "threshold": 0.01 * e}
        records.append(record)
    return records


def report(layers: int) -> SparsityReport:
    return SparsityReport(tuple(LayerReport(f"blocks.{i}.conv", 1000 + 10 * i, 100 + 15 * i) for i in range(layers)))


def only_png(folder: Path, name: str) -> Path:
    """No temporary file is left beside the plot."""
    assert [p.name for p in folder.iterdir()] == [name]
    return folder / name


@pytest.mark.parametrize("sparse", [True, False], ids=["sparse", "dense"])
def test_plot_training_writes_a_png(tmp_path, sparse):
    out = plot_training(metrics(10, sparse), str(tmp_path / "curves.png"), title="resnet20 / feather")
    assert out == tmp_path / "curves.png"
    width, height = png_size(only_png(tmp_path, "curves.png"))
    assert 400 <= width <= 2000 and 300 <= height <= 2000
    assert_drawn(out)


def test_plot_training_without_sparsity_is_shorter(tmp_path):
    _, sparse = png_size(plot_training(metrics(3), tmp_path / "sparse.png"))
    _, dense = png_size(plot_training(metrics(3, sparse=False), tmp_path / "dense.png"))
    assert dense < sparse


def test_plot_training_overwrites_an_existing_file(tmp_path):
    (tmp_path / "curves.png").write_bytes(b"old")
    plot_training(metrics(2), tmp_path / "curves.png")
    png_size(only_png(tmp_path, "curves.png"))


def test_plot_training_of_no_metrics_raises(tmp_path):
    with pytest.raises(ValueError, match="empty"):
        plot_training([], tmp_path / "curves.png")
    assert list(tmp_path.iterdir()) == []


def test_plot_layer_sparsity_writes_a_png(tmp_path):
    out = plot_layer_sparsity(report(5), tmp_path / "layers.png")
    assert out == tmp_path / "layers.png"
    width, height = png_size(only_png(tmp_path, "layers.png"))
    assert 400 <= width <= 2000 and 200 <= height <= 2000
    assert_drawn(out)


def test_plot_layer_sparsity_of_no_layers_raises(tmp_path):
    with pytest.raises(ValueError, match="no layer"):
        plot_layer_sparsity(SparsityReport(()), tmp_path / "layers.png")
    assert list(tmp_path.iterdir()) == []


def test_plot_layer_sparsity_grows_with_the_layer_count(tmp_path):
    _, few = png_size(plot_layer_sparsity(report(5), tmp_path / "few.png"))
    _, many = png_size(plot_layer_sparsity(report(60), tmp_path / "many.png"))
    assert many > 2 * few


def test_method_colors_are_one_per_method_in_name_order_with_dense_black():
    methods = ["gmp", "dense", "feather", "gdp", "feather"]
    assert method_colors(methods) == {"dense": "black", "feather": "C0", "gdp": "C1", "gmp": "C2"}
