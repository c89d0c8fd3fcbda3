"""``sparsetrain export RUN --format onnx``: :func:`sparsetrain.export_onnx`, written atomically."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .. import onnx as onnx_export
from ..onnx import onnxruntime_difference
from .checkpoint import atomic_write

__all__ = ["export_onnx", "onnxruntime_difference"]


def export_onnx(model: nn.Module, example_inputs: torch.Tensor, path: str | Path) -> Path:
    """:func:`sparsetrain.export_onnx` into ``path`` through a temporary file: a reader sees the old
    file or the whole new one, never a partial write."""
    return atomic_write(path, lambda tmp: onnx_export.export_onnx(model, example_inputs, tmp))
