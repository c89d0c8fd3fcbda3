"""ONNX file size with pruned weights as sparse initializers vs all initializers dense.

For each finished run folder given (or, with none, ResNet-20 at its default width made 90 % sparse
by feather), exports the final model with ``sparsetrain.export_onnx`` twice (``sparse=True`` and
``sparse=False``) into a temporary folder, checks both give PyTorch's logits in onnxruntime, and
prints both sizes and their ratio (target: at most 0.25 at 90 %).

    python benchmarks/onnx_size.py [RUN_DIR ...]
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch

import sparsetrain as st
from sparsetrain.models import create_model, input_size
from sparsetrain.onnx import onnxruntime_difference
from sparsetrain.run.folder import load_run


def models() -> dict[str, tuple[torch.nn.Module, tuple[int, ...]]]:
    """label -> (finalized model, input shape of one sample)."""
    if len(sys.argv) > 1:
        found = {}
        for run in sys.argv[1:]:
            loaded = load_run(run, torch.device("cpu"))
            found[run] = (loaded.model, input_size(loaded.config["model"]["name"]))
        return found
    torch.manual_seed(0)
    model = create_model("resnet20")
    method = st.create(model, "feather", total_steps=1, sparsity=0.9, schedule="constant")
    return {"resnet20, feather at 90 %": (method.finalize(), input_size("resnet20"))}


def main() -> None:
    print(f"{'model':<28} {'dense KiB':>10} {'sparse KiB':>11} {'ratio':>7} {'max |ort - torch|':>18}")
    with tempfile.TemporaryDirectory() as folder:
        for label, (model, shape) in models().items():
            example, check = torch.zeros(2, *shape), torch.randn(4, *shape)
            dense = st.export_onnx(model, example, Path(folder) / "dense.onnx", sparse=False)
            sparse = st.export_onnx(model, example, Path(folder) / "sparse.onnx")
            difference = max(onnxruntime_difference(model, path, check) for path in (dense, sparse))
            before, after = dense.stat().st_size, sparse.stat().st_size
            print(f"{label:<28} {before / 1024:>10.1f} {after / 1024:>11.1f} {after / before:>7.3f} {difference:>18.1e}")


if __name__ == "__main__":
    main()
