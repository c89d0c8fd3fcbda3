"""CIFAR-10/100 from the standard "python version" folders, and the bundled CIFAR-10 sample.

The CIFAR files are pickles. They are read with an unpickler that can rebuild numpy arrays
and nothing else, so a crafted file cannot run code.
"""

from __future__ import annotations

import codecs
import pickle
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch

try:  # numpy >= 2
    from numpy._core import multiarray as _np_multiarray
    from numpy._core import numeric as _np_numeric
except ImportError:  # numpy 1.x
    from numpy.core import multiarray as _np_multiarray  # type: ignore[no-redef]
    from numpy.core import numeric as _np_numeric  # type: ignore[no-redef]

Stats = tuple[float, float, float]

SAMPLE_NAME = "cifar10-sample"
_SAMPLE_FILE = "cifar10_sample.npz"
CIFAR10_CLASSES: tuple[str, ...] = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)
CIFAR10_MEAN: Stats = (0.4914, 0.4822, 0.4465)
CIFAR10_STD: Stats = (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN: Stats = (0.5071, 0.4865, 0.4409)
CIFAR100_STD: Stats = (0.2673, 0.2564, 0.2762)

_IMAGE_SHAPE = (3, 32, 32)
_PIXELS = 3 * 32 * 32


class DataError(ValueError):
    """A dataset name, folder or file that cannot be loaded; the message names it."""


@dataclass(frozen=True, eq=False)
class ImageDataset:
    """An in-memory labelled image dataset: uint8 NCHW images, int64 labels.

    ``mean`` and ``std`` are the per-channel statistics of x / 255 used for normalisation.
    """

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    classes: tuple[str, ...]
    mean: Stats
    std: Stats

    @property
    def num_classes(self) -> int:
        """The number of classes, ``len(classes)``."""
        return len(self.classes)


def _latin1_encode(text: str, encoding: str) -> bytes:
    """``_codecs.encode`` as Python 3 writes bytes into protocol-2 pickles, latin-1 only."""
    if codecs.lookup(encoding) != codecs.lookup("latin-1"):
        raise pickle.UnpicklingError(f"encoding {encoding!r} is not allowed, only latin-1")
    return text.encode("latin-1")


# Everything a pickled numpy array may refer to, under the module names numpy 1.x
# (and the Python 2 pickles CIFAR ships) and numpy 2.x write; nothing else.
_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("numpy.core.multiarray", "_reconstruct"): _np_multiarray._reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _np_multiarray._reconstruct,
    ("numpy.core.numeric", "_frombuffer"): _np_numeric._frombuffer,
    ("numpy._core.numeric", "_frombuffer"): _np_numeric._frombuffer,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): _latin1_encode,
}


class _ArrayUnpickler(pickle.Unpickler):
    """An unpickler that resolves only the globals needed to rebuild numpy arrays."""

    def __init__(self, file: BinaryIO) -> None:
        super().__init__(file, encoding="bytes")

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"global {module}.{name} is forbidden, only numpy arrays are allowed"
            ) from None


@dataclass(frozen=True)
class _CifarLayout:
    """Where a CIFAR "python version" folder keeps its batches, labels and class names."""

    title: str
    folder: str
    contents: str
    train_files: tuple[str, ...]
    test_file: str
    meta_file: str
    label_key: bytes
    names_key: bytes
    num_classes: int
    mean: Stats
    std: Stats

    @property
    def files(self) -> tuple[str, ...]:
        return (*self.train_files, self.test_file, self.meta_file)


_LAYOUTS: dict[str, _CifarLayout] = {
    "cifar10": _CifarLayout(
        title="CIFAR-10",
        folder="cifar-10-batches-py",
        contents="data_batch_1..5, test_batch and batches.meta",
        train_files=tuple(f"data_batch_{i}" for i in range(1, 6)),
        test_file="test_batch",
        meta_file="batches.meta",
        label_key=b"labels",
        names_key=b"label_names",
        num_classes=10,
        mean=CIFAR10_MEAN,
        std=CIFAR10_STD,
    ),
    "cifar100": _CifarLayout(
        title="CIFAR-100",
        folder="cifar-100-python",
        contents="train, test and meta",
        train_files=("train",),
        test_file="test",
        meta_file="meta",
        label_key=b"fine_labels",
        names_key=b"fine_label_names",
        num_classes=100,
        mean=CIFAR100_MEAN,
        std=CIFAR100_STD,
    ),
}

DATASET_NAMES: tuple[str, ...] = (SAMPLE_NAME, *_LAYOUTS)


def load_dataset(name: str = SAMPLE_NAME, data_dir: str | Path | None = None) -> ImageDataset:
    """Load a dataset by name: the bundled ``cifar10-sample``, ``cifar10`` or ``cifar100``.

    ``data_dir`` is the folder holding ``cifar-10-batches-py`` / ``cifar-100-python``, or that
    folder itself; the bundled sample needs none and ignores it.
    """
    if name == SAMPLE_NAME:
        return _load_sample()
    layout = _LAYOUTS.get(name)
    if layout is None:
        raise DataError(f"Unknown dataset {name!r}; known datasets: {', '.join(DATASET_NAMES)}.")
    if data_dir is None:
        raise DataError(
            f"Dataset {name!r} needs data_dir, the folder holding {layout.folder} (or that folder itself)."
        )
    folder = _find_folder(Path(data_dir).expanduser(), layout)
    train = [_read_batch(folder / f, layout) for f in layout.train_files]
    x_test, y_test = _read_batch(folder / layout.test_file, layout)
    return ImageDataset(
        name=name,
        x_train=torch.from_numpy(np.concatenate([x for x, _ in train])),
        y_train=torch.from_numpy(np.concatenate([y for _, y in train])),
        x_test=torch.from_numpy(x_test),
        y_test=torch.from_numpy(y_test),
        classes=_read_class_names(folder / layout.meta_file, layout),
        mean=layout.mean,
        std=layout.std,
    )


def _load_sample() -> ImageDataset:
    """The 6,102-image CIFAR-10 sample shipped inside the package."""
    ref = resources.files("sparsetrain.data").joinpath(_SAMPLE_FILE)
    with resources.as_file(ref) as path, np.load(path) as npz:
        arrays = {key: torch.from_numpy(npz[key]) for key in ("x_train", "y_train", "x_test", "y_test")}
    return ImageDataset(
        name=SAMPLE_NAME, classes=CIFAR10_CLASSES, mean=CIFAR10_MEAN, std=CIFAR10_STD, **arrays
    )


def _find_folder(data_dir: Path, layout: _CifarLayout) -> Path:
    """The folder with the batch files: ``data_dir/<layout.folder>`` or ``data_dir`` itself."""
    expected = f"the {layout.title} python version folder {layout.folder} with {layout.contents}"
    if not data_dir.is_dir():
        raise DataError(f"data_dir {data_dir} is not a directory; expected {expected}, or its parent.")
    folder = data_dir / layout.folder if (data_dir / layout.folder).is_dir() else data_dir
    for file in layout.files:
        if not (folder / file).is_file():
            raise DataError(f"{folder / file} is missing; expected {expected}.")
    return folder


def _unpickle(path: Path) -> Any:
    """Read a CIFAR pickle, allowing no globals but numpy arrays."""
    try:
        with path.open("rb") as file:
            return _ArrayUnpickler(file).load()
    except OSError as err:
        raise DataError(f"Cannot read {path}: {err.strerror}.") from err
    except Exception as err:  # unpickling bad bytes can raise almost any type (see pickle docs)
        reason = " ".join(str(err).split()).rstrip(".") or type(err).__name__
        raise DataError(f"{path} is not a valid CIFAR batch file: cannot unpickle it ({reason}).") from err


def _read_batch(path: Path, layout: _CifarLayout) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, 3, 32, 32) uint8 and labels (N,) int64 from one batch file."""
    batch = _unpickle(path)
    invalid = f"{path} is not a valid CIFAR batch file:"
    if not isinstance(batch, dict) or b"data" not in batch or layout.label_key not in batch:
        raise DataError(f"{invalid} expected a dict with keys b'data' and {layout.label_key!r}.")
    data = batch[b"data"]
    if not (
        isinstance(data, np.ndarray)
        and data.dtype == np.uint8
        and data.ndim == 2
        and data.shape[1] == _PIXELS
    ):
        got = (
            f"{data.dtype} array of shape {data.shape}"
            if isinstance(data, np.ndarray)
            else type(data).__name__
        )
        raise DataError(f"{invalid} b'data' should be a uint8 array of shape (N, {_PIXELS}), got {got}.")
    try:
        labels = np.asarray(batch[layout.label_key], dtype=np.int64)
    except (TypeError, ValueError) as err:
        raise DataError(f"{invalid} {layout.label_key!r} is not a list of integers ({err}).") from err
    if labels.shape != (len(data),):
        raise DataError(f"{invalid} {len(data)} images but {layout.label_key!r} has shape {labels.shape}.")
    if ((labels < 0) | (labels >= layout.num_classes)).any():
        raise DataError(f"{invalid} labels must lie in 0..{layout.num_classes - 1}.")
    return data.reshape(-1, *_IMAGE_SHAPE), labels


def _read_class_names(path: Path, layout: _CifarLayout) -> tuple[str, ...]:
    """The class names, in label order, from a ``batches.meta`` / ``meta`` file."""
    meta = _unpickle(path)
    names = meta.get(layout.names_key) if isinstance(meta, dict) else None
    if not (
        isinstance(names, list)
        and len(names) == layout.num_classes
        and all(isinstance(n, bytes) for n in names)
    ):
        raise DataError(
            f"{path} is not a valid CIFAR meta file: expected {layout.names_key!r}, "
            f"a list of {layout.num_classes} names."
        )
    return tuple(n.decode("utf-8") for n in names)
