"""Checkpoints: tensors in safetensors, everything else as JSON; atomic writes, nothing unpickled.

A checkpoint holds any tree of dicts, lists, tuples, numbers, strings, None and tensors
(state dicts of a model, optimizer, scheduler and sparsifier, RNG states). The tensors go into
a safetensors file under their path in the tree; the tree itself, with each tensor replaced by
a reference, is stored as JSON in the file's metadata header.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

_TREE_KEY = "sparsetrain.tree"


def flatten(tree: Any, prefix: str = "") -> tuple[dict[str, torch.Tensor], Any]:
    """Split ``tree`` into its tensors (keyed by path) and a JSON-able skeleton referring to them."""
    tensors: dict[str, torch.Tensor] = {}

    def encode(node: Any, path: str) -> Any:
        if isinstance(node, torch.Tensor):
            tensors[path] = node.detach().contiguous().cpu()
            return {"__tensor__": path}
        if isinstance(node, dict):
            if all(isinstance(key, str) for key in node):
                return {key: encode(value, f"{path}.{key}") for key, value in node.items()}
            return {"__items__": [[key, encode(value, f"{path}.{key}")] for key, value in node.items()]}
        if isinstance(node, tuple):
            return {"__tuple__": [encode(value, f"{path}.{i}") for i, value in enumerate(node)]}
        if isinstance(node, list):
            return [encode(value, f"{path}.{i}") for i, value in enumerate(node)]
        if node is None or isinstance(node, (bool, int, float, str)):
            return node
        raise TypeError(f"cannot store a {type(node).__name__} at {path or 'the root'} in a checkpoint.")

    return tensors, encode(tree, prefix)


def unflatten(skeleton: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Rebuild the tree that :func:`flatten` split."""
    if isinstance(skeleton, list):
        return [unflatten(value, tensors) for value in skeleton]
    if not isinstance(skeleton, dict):
        return skeleton
    if "__tensor__" in skeleton:
        return tensors[skeleton["__tensor__"]]
    if "__tuple__" in skeleton:
        return tuple(unflatten(value, tensors) for value in skeleton["__tuple__"])
    if "__items__" in skeleton:
        return {key: unflatten(value, tensors) for key, value in skeleton["__items__"]}
    return {key: unflatten(value, tensors) for key, value in skeleton.items()}


TMP_SUFFIX = ".tmp"  # of the temporary files atomic_write renames into place


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def writing(path: str | Path) -> Iterator[None]:
    """Any failure to write inside the block (disk full, a read-only folder) becomes an OSError
    naming ``path``; safetensors reports the OS error in its message only."""
    try:
        yield
    except OSError as error:
        raise OSError(error.errno, error.strerror, str(path)) from None
    except SafetensorError as error:
        code = re.search(r"os error (\d+)", str(error))
        if code is None:
            raise
        raise OSError(int(code.group(1)), os.strerror(int(code.group(1))), str(path)) from None


def atomic_write(path: str | Path, write: Any) -> Path:
    """Call ``write(temporary_path)``, then rename the temporary file onto ``path``.

    A reader sees either the old file or the complete new one, never a partial write.
    A failed write is an OSError naming ``path``.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}{TMP_SUFFIX}")
    try:
        with writing(path):
            write(str(tmp))
            os.chmod(tmp, 0o666 & ~_umask())  # as open() would create it, whatever the writer chose
            os.replace(tmp, path)
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
    return path


def save_checkpoint(path: str | Path, tree: Any) -> Path:
    """Write ``tree`` to ``path`` (safetensors + JSON header), atomically."""
    tensors, skeleton = flatten(tree)
    metadata = {_TREE_KEY: json.dumps(skeleton)}
    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> Any:
    """Read a tree written by :func:`save_checkpoint`; tensors land on ``device``."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"checkpoint {path} does not exist; allowed: a file written by sparsetrain.")
    try:
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            header = (f.metadata() or {}).get(_TREE_KEY)
            tensors = {key: f.get_tensor(key) for key in f.keys()}
        if header is None:
            raise ValueError("it has no sparsetrain header")
        return unflatten(json.loads(header), tensors)
    except KeyError as error:
        raise ValueError(f"the state in {path} does not fit this run (it lacks the tensor {error} its header names).") from None
    except RecursionError:
        problem = "its header nests too deeply"
    except (SafetensorError, OSError, ValueError, TypeError) as error:  # JSONDecodeError is a ValueError
        problem = str(error)
    raise ValueError(f"{path} is not a readable sparsetrain checkpoint ({problem[:200]}).")


def load_weights(path: str | Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """The tensors of the safetensors file at ``path``; ValueError naming it if it is not one
    (corrupt, truncated, a pickle, ...)."""
    try:
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            return {key: f.get_tensor(key) for key in f.keys()}
    except (SafetensorError, OSError) as error:
        raise ValueError(f"{path} is not a readable safetensors file ({error}).") from None


def write_json(path: str | Path, data: Any) -> Path:
    """Write ``data`` as indented JSON, atomically."""
    text = json.dumps(data, indent=2) + "\n"
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def first_non_finite(state: Mapping[str, torch.Tensor]) -> str | None:
    """The first floating-point entry of ``state`` holding a NaN or infinity, or None."""
    for name, value in state.items():
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            return name
    return None


