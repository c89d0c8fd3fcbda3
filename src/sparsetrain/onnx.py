"""ONNX export of a finalized model, its pruned weights stored as sparse initializers.

``export_onnx(model, example_inputs, path)`` traces the model in eval mode with
``torch.onnx.export`` (the ``torch.export`` exporter). ``example_inputs`` is a tensor (the model's
first argument) or a mapping of keyword arguments (``{"input_ids": ..., "attention_mask": ...}``;
entries that are not tensors, e.g. ``use_cache=False``, are passed as constants). The inputs are
named after the ``forward`` arguments and their batch dimension is dynamic; the first output,
``logits``, is the model's output tensor or the ``logits`` of its output object (Hugging Face).
The exporter's graph optimizations apply (batch norms folded into the convolutions before them,
which keeps their zeros); its per-node debugging notes (stack traces naming local files) are dropped.

Sparse initializers. A floating-point initializer of n entries of b bytes, z of them zero, is
stored as an ONNX ``SparseTensorProto`` in ``graph.sparse_initializer`` (its n - z non-zero values
and their positions in the flattened tensor) when that is smaller:

    (n - z) * (b + i) < n * b,      i = bytes of the narrowest of int8/16/32/64 holding n - 1.

At 90 % zeros with float32 values and int32 positions that is 0.1 * 8 / 4 = a fifth of the dense
bytes. onnxruntime expands sparse initializers to dense ones when it loads the model and reads
positions of any of these types; ``onnx.checker`` accepts INT64 positions only (0.3 of the dense
bytes at 90 %): ``sparse=False`` writes the dense file every ONNX tool accepts. Needs the ``onnx`` extra (onnx, onnxscript; onnxruntime to run the file); ``import
sparsetrain`` does not import them.
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor, nn

from .calls import logits_of
from .messages import shown
from .modes import eval_mode

if TYPE_CHECKING:
    import onnx

OUTPUT = "logits"
EXTRA = 'pip install "sparsetrain[onnx]"'
INDEX_TYPES = (np.int8, np.int16, np.int32, np.int64)  # positions: the narrowest that holds n - 1

Inputs = Tensor | Mapping[str, Any]


def export_onnx(model: nn.Module, example_inputs: Inputs, path: str | Path, *, sparse: bool = True) -> Path:
    """Write ``model`` (run in eval mode on ``example_inputs``) as ONNX to ``path``, weights with
    enough zeros as sparse initializers unless ``sparse`` is False (see the module's notes)."""
    proto = onnx_model(model, example_inputs)
    if sparse:
        sparsify_initializers(proto.graph)
    path = Path(path)
    path.write_bytes(proto.SerializeToString())
    return path


def onnx_model(model: nn.Module, example_inputs: Inputs) -> onnx.ModelProto:
    """The ONNX model of ``model`` in eval mode, initializers dense, nodes without debugging notes."""
    missing = [name for name in ("onnx", "onnxscript") if importlib.util.find_spec(name) is None]
    if missing:
        raise ValueError(f"ONNX export needs {' and '.join(missing)}, which are not installed; allowed: {EXTRA}.")
    args, kwargs = _arguments(example_inputs)
    batch = {0: torch.export.Dim.DYNAMIC}
    if kwargs:
        dynamic: Any = {name: batch if isinstance(value, Tensor) else None for name, value in kwargs.items()}
    else:
        dynamic = (batch,)
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)  # its notes on torchvision ops we do not use
    with eval_mode(model), torch.no_grad():
        program = torch.onnx.export(model, args, kwargs=kwargs, output_names=[OUTPUT], dynamic_shapes=dynamic,
                                    verbose=False)
    proto = program.model_proto
    for node in proto.graph.node:  # the exporter's debugging notes: stack traces with local paths, FX nodes
        del node.metadata_props[:]
    return proto


def _arguments(example_inputs: Inputs) -> tuple[tuple[Tensor, ...], dict[str, Any]]:
    if isinstance(example_inputs, Tensor):
        return (example_inputs,), {}
    if isinstance(example_inputs, Mapping) and any(isinstance(v, Tensor) for v in example_inputs.values()):
        return (), dict(example_inputs)
    raise TypeError(f"example_inputs={shown(example_inputs)} is not allowed; allowed: a tensor batch or a mapping "
                    "of keyword arguments holding at least one tensor.")


def sparsify_initializers(graph: onnx.GraphProto) -> int:
    """Move every floating-point initializer of ``graph`` that is smaller stored sparse (see the
    module's notes) to ``graph.sparse_initializer``; returns how many moved."""
    kept, moved = [], []
    for tensor in graph.initializer:
        sparse = _as_sparse(tensor)
        if sparse is None:
            kept.append(tensor)
        else:
            moved.append(sparse)
    if moved:
        del graph.initializer[:]
        graph.initializer.extend(kept)
        graph.sparse_initializer.extend(moved)
    return len(moved)


def _as_sparse(tensor: onnx.TensorProto) -> onnx.SparseTensorProto | None:
    """``tensor`` as a SparseTensorProto of linearized positions, or None if that is not smaller
    (or ``tensor`` is not floating point, has no dimensions or lives in an external file)."""
    from onnx import TensorProto, helper, numpy_helper

    floating = (TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.FLOAT16, TensorProto.BFLOAT16)
    if tensor.data_type not in floating or not tensor.dims or tensor.data_location == TensorProto.EXTERNAL:
        return None
    flat = numpy_helper.to_array(tensor).reshape(-1)
    positions = np.flatnonzero(flat)
    index = next(t for t in INDEX_TYPES if flat.size - 1 <= np.iinfo(t).max)
    if positions.size * (flat.itemsize + np.dtype(index).itemsize) >= flat.nbytes:
        return None
    values = numpy_helper.from_array(flat[positions], name=tensor.name)
    indices = numpy_helper.from_array(positions.astype(index), name=f"{tensor.name}.indices")
    return helper.make_sparse_tensor(values, indices, list(tensor.dims))


def onnxruntime_difference(model: nn.Module, path: str | Path, inputs: Inputs) -> float | None:
    """max |onnxruntime(path)(inputs) - model(inputs)| over the logits (model in eval mode); None
    without onnxruntime."""
    if importlib.util.find_spec("onnxruntime") is None:
        return None
    import onnxruntime

    args, kwargs = _arguments(inputs)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    named = {key: value for key, value in kwargs.items() if isinstance(value, Tensor)}
    feed = {name: value.cpu().numpy() for name, value in (named or {session.get_inputs()[0].name: args[0]}).items()}
    (theirs,) = session.run([OUTPUT], feed)
    with eval_mode(model), torch.no_grad():
        ours = logits_of(model(*args, **kwargs)).cpu()
    return float((torch.from_numpy(theirs) - ours).abs().max())

