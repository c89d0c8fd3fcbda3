"""Compressed export of a sparse state dict: safetensors holding only the non-zero values.

Each tensor is stored in whichever layout is smallest:

    dense    the tensor as is
    bitmask  one bit per entry (1 = non-zero, packed 8 to a byte) + the non-zero values in order
    indices  the flat positions of the non-zero entries (int32, or int64 past 2^31) + the values

Loading rebuilds exactly the same dense tensors. The layouts and shapes are kept in the file's
JSON metadata header; nothing is unpickled.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .checkpoint import atomic_write

_LAYOUT_KEY = "sparsetrain.sparse"


def _layout_sizes(tensor: torch.Tensor) -> dict[str, int]:
    """Bytes each layout needs for ``tensor``."""
    n, nnz, item = tensor.numel(), int(torch.count_nonzero(tensor)), tensor.element_size()
    index_bytes = 4 if n < 2**31 else 8
    return {"dense": n * item, "bitmask": math.ceil(n / 8) + nnz * item, "indices": nnz * (index_bytes + item)}


def _encode(name: str, tensor: torch.Tensor) -> tuple[dict[str, torch.Tensor], dict]:
    sizes = _layout_sizes(tensor)
    layout = min(sizes, key=lambda key: (sizes[key], key != "dense"))
    flat = tensor.detach().cpu().contiguous().reshape(-1)
    info = {"layout": layout, "shape": list(tensor.shape), "dtype": str(tensor.dtype).removeprefix("torch.")}
    if layout == "dense":
        return {name: flat.reshape(tensor.shape)}, info
    nonzero = flat != 0
    values = flat[nonzero]
    if layout == "bitmask":
        bits = np.packbits(nonzero.numpy())
        return {f"{name}.mask": torch.from_numpy(bits), f"{name}.values": values}, info
    positions = nonzero.nonzero().reshape(-1)
    positions = positions.to(torch.int32 if flat.numel() < 2**31 else torch.int64)
    return {f"{name}.indices": positions, f"{name}.values": values}, info


def save_sparse(path: str | Path, state: dict[str, torch.Tensor]) -> Path:
    """Write ``state`` compressed (see the module docstring), atomically."""
    tensors: dict[str, torch.Tensor] = {}
    layouts: dict[str, dict] = {}
    for name, tensor in state.items():
        stored, layouts[name] = _encode(name, tensor)
        tensors.update(stored)
    metadata = {_LAYOUT_KEY: json.dumps(layouts)}
    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def load_sparse(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a file written by :func:`save_sparse` back into dense tensors."""
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
        if _LAYOUT_KEY not in metadata:
            raise ValueError(f"{path} is not a sparse export written by sparsetrain.")
        layouts = json.loads(metadata[_LAYOUT_KEY])
        state = {}
        for name, info in layouts.items():
            shape, dtype = info["shape"], getattr(torch, info["dtype"])
            if info["layout"] == "dense":
                state[name] = f.get_tensor(name)
                continue
            dense = torch.zeros(math.prod(shape), dtype=dtype)
            values = f.get_tensor(f"{name}.values")
            if info["layout"] == "bitmask":
                bits = np.unpackbits(f.get_tensor(f"{name}.mask").numpy(), count=dense.numel())
                dense[torch.from_numpy(bits.astype(bool))] = values
            else:
                dense[f.get_tensor(f"{name}.indices").long()] = values
            state[name] = dense.reshape(shape)
    return state
