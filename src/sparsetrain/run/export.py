"""Compressed export of a sparse state dict: safetensors holding only the non-zero values.

Each tensor is stored in whichever layout is smallest:

    dense    the tensor as is
    bitmask  one bit per entry (1 = non-zero, packed 8 to a byte) + the non-zero values in order
    indices  the flat positions of the non-zero entries (int32, or int64 past 2^31) + the values
    nm       for a weight holding an N:M pattern (``nm`` given): N values per group of M and their
             positions in ceil(log2 M) bits (:func:`sparsetrain.nm.pack`); preferred on a tie
             (2:4 fp32: 2.125 bytes a weight, as the bitmask). Groups run along the input
             dimension: dimension 0 of a weight stored (in, out) (``transposed``, e.g. transformers'
             Conv1D: :func:`sparsetrain.prunable.transposed_weights`), packed in its (out, in) view

Loading rebuilds exactly the same dense tensors. The layouts and shapes are kept in the file's
JSON metadata header; nothing is unpickled.
"""

from __future__ import annotations

import json
import math
from collections.abc import Collection
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..nm import NMPattern, as_pattern, has_groups, index_bits, pack, pattern_holds, unpack
from ..prunable import out_in
from .checkpoint import atomic_write

_LAYOUT_KEY = "sparsetrain.sparse"


_PREFERENCE = ("dense", "nm", "bitmask", "indices")  # on equal sizes, the first wins


def _layout_sizes(tensor: torch.Tensor, nm: tuple[int, int] | None = None, transposed: bool = False) -> dict[str, int]:
    """Bytes each layout needs for ``tensor`` (the nm layout only where the tensor, read as (out, in)
    when ``transposed``, holds ``nm``)."""
    n, nnz, item = tensor.numel(), int(torch.count_nonzero(tensor)), tensor.element_size()
    index_bytes = 4 if n < 2**31 else 8
    sizes = {"dense": n * item, "bitmask": math.ceil(n / 8) + nnz * item, "indices": nnz * (index_bytes + item)}
    grouped = out_in(tensor, transposed)
    if nm is not None and has_groups(grouped.shape, nm[1]) and pattern_holds(grouped, *nm):
        kept = n // nm[1] * nm[0]
        sizes["nm"] = kept * item + math.ceil(kept * index_bits(nm[1]) / 8)
    return sizes


def smallest_layout(sizes: dict[str, int]) -> str:
    """The layout that stores a tensor in the fewest bytes (ties: dense, nm, bitmask, indices)."""
    return min(sizes, key=lambda key: (sizes[key], _PREFERENCE.index(key)))


def _encode(name: str, tensor: torch.Tensor, nm: tuple[int, int] | None,
            transposed: bool) -> tuple[dict[str, torch.Tensor], dict]:
    layout = smallest_layout(_layout_sizes(tensor, nm, transposed))
    flat = tensor.detach().cpu().contiguous().reshape(-1)
    info = {"layout": layout, "shape": list(tensor.shape), "dtype": str(tensor.dtype).removeprefix("torch.")}
    if layout == "dense":
        return {name: flat.reshape(tensor.shape)}, info
    if layout == "nm":
        values, positions = pack(out_in(tensor, transposed), *nm)
        info["nm"] = list(nm)
        if transposed:
            info["transposed"] = True
        return {f"{name}.values": values, f"{name}.positions": positions}, info
    nonzero = flat != 0
    values = flat[nonzero]
    if layout == "bitmask":
        bits = np.packbits(nonzero.numpy())
        return {f"{name}.mask": torch.from_numpy(bits), f"{name}.values": values}, info
    positions = nonzero.nonzero().reshape(-1)
    positions = positions.to(torch.int32 if flat.numel() < 2**31 else torch.int64)
    return {f"{name}.indices": positions, f"{name}.values": values}, info


def save_sparse(path: str | Path, state: dict[str, torch.Tensor], nm: NMPattern | tuple[int, int] | str | None = None,
                transposed: Collection[str] = ()) -> Path:
    """Write ``state`` compressed (see the module docstring), atomically; ``nm``: the N:M
    pattern to pack the weights holding it with (an NMPattern, (n, m) or "N:M"); ``transposed``: the
    keys of the weights stored (in, out), e.g. ``transposed_weights(model)``."""
    nm = None if nm is None else as_pattern(nm)
    tensors: dict[str, torch.Tensor] = {}
    layouts: dict[str, dict] = {}
    for name, tensor in state.items():
        stored, layouts[name] = _encode(name, tensor, nm, name in transposed)
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
            if info["layout"] == "nm":
                n, m = info["nm"]
                transposed = info.get("transposed", False)
                grouped = unpack(f.get_tensor(f"{name}.values"), f.get_tensor(f"{name}.positions"),
                                 shape[::-1] if transposed else shape, n, m)
                state[name] = out_in(grouped, transposed).contiguous()
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
