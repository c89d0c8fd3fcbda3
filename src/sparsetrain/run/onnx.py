"""ONNX export of a finished model (the compact one after channel pruning), checked with
onnxruntime when it is installed. Needs the ``onnx`` extra (onnx, onnxscript, onnxruntime)."""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

import torch
from torch import nn

from ..modes import eval_mode
from .checkpoint import atomic_write

INPUT, OUTPUT = "images", "logits"
EXTRA = 'pip install "sparsetrain[onnx]"'


def export_onnx(model: nn.Module, example_inputs: torch.Tensor, path: str | Path) -> Path:
    """Write ``model`` (run in eval mode) as ONNX to ``path``, atomically: input ``images`` with a
    dynamic batch dimension, output ``logits``."""
    missing = [name for name in ("onnx", "onnxscript") if importlib.util.find_spec(name) is None]
    if missing:
        raise ValueError(f"ONNX export needs {' and '.join(missing)}, which are not installed; allowed: {EXTRA}.")
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)  # its notes on torchvision ops we do not use
    with eval_mode(model), torch.no_grad():
        program = torch.onnx.export(
            model, (example_inputs,), input_names=[INPUT], output_names=[OUTPUT],
            dynamic_shapes=({0: torch.export.Dim.DYNAMIC},), external_data=False, verbose=False,
        )
    return atomic_write(path, program.save)


def onnxruntime_difference(model: nn.Module, path: str | Path, inputs: torch.Tensor) -> float | None:
    """max |onnxruntime(path)(inputs) - model(inputs)| (model in eval mode); None without onnxruntime."""
    if importlib.util.find_spec("onnxruntime") is None:
        return None
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (theirs,) = session.run([OUTPUT], {INPUT: inputs.cpu().numpy()})
    with eval_mode(model), torch.no_grad():
        ours = model(inputs).cpu()
    return float((torch.from_numpy(theirs) - ours).abs().max())
