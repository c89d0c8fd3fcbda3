"""Loading the bundled sample and CIFAR-10/100 python-version folders, and refusing bad files."""

from __future__ import annotations

import codecs
import hashlib
import io
import os
import pickle
import re
import struct
from importlib import resources
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
import torch

from sparsetrain.data import DATASET_NAMES, DataError, load_dataset

SAMPLE_SHA256 = "b16b676c44543fcb41b924e32295518898f0dac501a5ea874c293a142d90c245"
CIFAR10_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


class Py2Pickler(pickle._Pickler):
    """Writes bytes as Python 2 ``str`` opcodes, as in the CIFAR files (cPickle, protocol 2)."""

    dispatch: ClassVar[dict] = dict(pickle._Pickler.dispatch)

    def save_py2_str(self, obj: bytes) -> None:
        if len(obj) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(obj)]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(obj)) + obj)
        self.memoize(obj)

    dispatch[bytes] = save_py2_str


def dump(obj: object, path: Path, protocol: int = 2) -> None:
    """Pickle ``obj`` as the CIFAR files are (Python 2, protocol 2, numpy 1.x names) or with ``protocol``."""
    if protocol != 2:
        path.write_bytes(pickle.dumps(obj, protocol=protocol))
        return
    buffer = io.BytesIO()
    Py2Pickler(buffer, protocol=2).dump(obj)
    path.write_bytes(buffer.getvalue().replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n"))


def fake_batch(rng: np.random.Generator, n: int, label_key: bytes, num_classes: int) -> dict:
    return {
        b"batch_label": b"fake batch",
        label_key: [int(v) for v in rng.integers(0, num_classes, n)],
        b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
        b"filenames": [b"img_%d.png" % i for i in range(n)],
    }


@pytest.fixture
def cifar10_dir(tmp_path: Path) -> Path:
    """A CIFAR-10 python folder with 2 images per training batch and 3 test images."""
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(1, 6):
        dump(fake_batch(rng, 2, b"labels", 10), folder / f"data_batch_{i}")
    dump(fake_batch(rng, 3, b"labels", 10), folder / "test_batch")
    meta = {b"label_names": [n.encode() for n in CIFAR10_NAMES], b"num_cases_per_batch": 2, b"num_vis": 3072}
    dump(meta, folder / "batches.meta")
    return folder


@pytest.fixture
def cifar100_dir(tmp_path: Path) -> Path:
    """A CIFAR-100 python folder with 4 training and 2 test images, pickled with protocol 5."""
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    rng = np.random.default_rng(1)
    for name, n in (("train", 4), ("test", 2)):
        batch = fake_batch(rng, n, b"fine_labels", 100)
        batch[b"coarse_labels"] = [v // 5 for v in batch[b"fine_labels"]]
        dump(batch, folder / name, protocol=5)
    meta = {
        b"fine_label_names": [b"class_%d" % i for i in range(100)],
        b"coarse_label_names": [b"super_%d" % i for i in range(20)],
    }
    dump(meta, folder / "meta", protocol=5)
    return folder


def unpickle(path: Path) -> dict:
    with path.open("rb") as f:
        return pickle.load(f, encoding="bytes")


def test_dataset_names() -> None:
    assert DATASET_NAMES == ("cifar10-sample", "cifar10", "cifar100")


def test_bundled_sample() -> None:
    ref = resources.files("sparsetrain.data").joinpath("cifar10_sample.npz")
    assert hashlib.sha256(ref.read_bytes()).hexdigest() == SAMPLE_SHA256
    ds = load_dataset()
    assert ds.name == "cifar10-sample"
    assert ds.x_train.shape == (5085, 3, 32, 32) and ds.x_train.dtype == torch.uint8
    assert ds.x_test.shape == (1017, 3, 32, 32) and ds.x_test.dtype == torch.uint8
    assert ds.y_train.shape == (5085,) and ds.y_train.dtype == torch.int64
    assert ds.y_test.shape == (1017,) and ds.y_test.dtype == torch.int64
    assert ds.num_classes == 10 and list(ds.classes) == CIFAR10_NAMES
    assert set(ds.y_train.tolist()) == set(range(10)) == set(ds.y_test.tolist())
    assert ds.mean == (0.4914, 0.4822, 0.4465) and ds.std == (0.2470, 0.2435, 0.2616)
    channel_mean = ds.x_train.double().div(255).mean(dim=(0, 2, 3))
    torch.testing.assert_close(
        channel_mean, torch.tensor([0.4936, 0.4846, 0.4483], dtype=torch.float64), atol=1e-4, rtol=0
    )


def test_fake_batches_are_written_as_python2_pickles(cifar10_dir: Path) -> None:
    data = (cifar10_dir / "data_batch_1").read_bytes()
    assert data.startswith(b"\x80\x02") and b"cnumpy.core.multiarray\n_reconstruct\n" in data
    assert b"_codecs" not in data and pickle.BINSTRING + struct.pack("<i", 6144) in data


@pytest.mark.parametrize("point_at_folder", [False, True], ids=["parent", "folder"])
def test_cifar10_folder(cifar10_dir: Path, point_at_folder: bool) -> None:
    ds = load_dataset("cifar10", cifar10_dir if point_at_folder else cifar10_dir.parent)
    train = [unpickle(cifar10_dir / f"data_batch_{i}") for i in range(1, 6)]
    test = unpickle(cifar10_dir / "test_batch")
    assert ds.name == "cifar10" and ds.num_classes == 10 and list(ds.classes) == CIFAR10_NAMES
    assert ds.x_train.shape == (10, 3, 32, 32) and ds.x_train.dtype == torch.uint8
    assert ds.x_test.shape == (3, 3, 32, 32) and ds.y_test.dtype == torch.int64
    expected_x = np.concatenate([b[b"data"] for b in train]).reshape(10, 3, 32, 32)
    assert torch.equal(ds.x_train, torch.from_numpy(expected_x))
    assert ds.y_train.tolist() == [label for b in train for label in b[b"labels"]]
    assert torch.equal(ds.x_test, torch.from_numpy(test[b"data"].reshape(3, 3, 32, 32)))
    assert ds.y_test.tolist() == test[b"labels"]
    # channel-first layout: the first 1024 bytes of a row are the red plane, row-major
    assert ds.x_train[0, 0, 1, 0] == train[0][b"data"][0, 32]
    assert ds.x_train[0, 2, 0, 0] == train[0][b"data"][0, 2048]


@pytest.mark.parametrize("point_at_folder", [False, True], ids=["parent", "folder"])
def test_cifar100_folder(cifar100_dir: Path, point_at_folder: bool) -> None:
    ds = load_dataset("cifar100", str(cifar100_dir if point_at_folder else cifar100_dir.parent))
    train, test = unpickle(cifar100_dir / "train"), unpickle(cifar100_dir / "test")
    assert ds.num_classes == 100 and ds.classes[:2] == ("class_0", "class_1") and ds.classes[-1] == "class_99"
    assert ds.x_train.shape == (4, 3, 32, 32) and ds.x_test.shape == (2, 3, 32, 32)
    assert torch.equal(ds.x_train, torch.from_numpy(train[b"data"].reshape(4, 3, 32, 32)))
    assert ds.y_train.tolist() == train[b"fine_labels"] and ds.y_test.tolist() == test[b"fine_labels"]
    assert ds.mean == (0.5071, 0.4865, 0.4409) and ds.std == (0.2673, 0.2564, 0.2762)


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_any_pickle_protocol_loads(cifar10_dir: Path, protocol: int) -> None:
    batch = fake_batch(np.random.default_rng(2), 3, b"labels", 10)
    pickle_path = cifar10_dir / "test_batch"
    pickle_path.write_bytes(pickle.dumps(batch, protocol=protocol))
    ds = load_dataset("cifar10", cifar10_dir)
    assert torch.equal(ds.x_test, torch.from_numpy(batch[b"data"].reshape(3, 3, 32, 32)))


def test_unknown_name_lists_known_names() -> None:
    with pytest.raises(DataError, match=r"'imagenet'.*cifar10-sample, cifar10, cifar100"):
        load_dataset("imagenet")


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_data_dir_required(name: str) -> None:
    with pytest.raises(DataError, match="needs data_dir"):
        load_dataset(name)


def test_missing_dir(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(DataError, match="cifar-10-batches-py") as err:
        load_dataset("cifar10", missing)
    assert str(missing) in str(err.value)


@pytest.mark.parametrize("name", ["data_batch_3", "test_batch", "batches.meta"])
def test_missing_file(cifar10_dir: Path, name: str) -> None:
    (cifar10_dir / name).unlink()
    with pytest.raises(
        DataError, match="expected the CIFAR-10 python version folder cifar-10-batches-py"
    ) as err:
        load_dataset("cifar10", cifar10_dir.parent)
    assert str(cifar10_dir / name) in str(err.value)


def test_missing_cifar100_file(cifar100_dir: Path) -> None:
    (cifar100_dir / "test").unlink()
    with pytest.raises(DataError, match="cifar-100-python with train, test and meta") as err:
        load_dataset("cifar100", cifar100_dir)
    assert str(cifar100_dir / "test") in str(err.value)


def test_truncated_file(cifar10_dir: Path) -> None:
    path = cifar10_dir / "data_batch_2"
    path.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(DataError, match="is not a valid CIFAR batch file") as err:
        load_dataset("cifar10", cifar10_dir)
    assert str(path) in str(err.value)


@pytest.mark.parametrize(
    "content", [b"", b"this is a text file\n", b"PK\x03\x04\x00\x00zipzip"], ids=["empty", "text", "zip"]
)
def test_not_a_pickle(cifar10_dir: Path, content: bytes) -> None:
    path = cifar10_dir / "test_batch"
    path.write_bytes(content)
    with pytest.raises(DataError, match="is not a valid CIFAR batch file") as err:
        load_dataset("cifar10", cifar10_dir)
    assert str(path) in str(err.value)


class _Payload:
    """Pickles as a call to ``func(*args)``, the way a malicious pickle runs code."""

    def __init__(self, func: object, *args: object) -> None:
        self.func, self.args = func, args

    def __reduce__(self) -> tuple:
        return self.func, self.args


@pytest.mark.parametrize("protocol", [2, 5])
def test_forbidden_global_is_refused_not_run(cifar10_dir: Path, protocol: int) -> None:
    marker = cifar10_dir / "pwned"
    path = cifar10_dir / "data_batch_1"
    path.write_bytes(
        pickle.dumps({b"data": _Payload(os.system, f"touch {marker}"), b"labels": []}, protocol=protocol)
    )
    with pytest.raises(
        DataError,
        match=r"is not a valid CIFAR batch file: cannot unpickle it \(global \w+\.system is forbidden",
    ) as err:
        load_dataset("cifar10", cifar10_dir)
    assert str(path) in str(err.value)
    assert not marker.exists()


def test_codecs_encode_only_latin1(cifar10_dir: Path) -> None:
    path = cifar10_dir / "test_batch"
    path.write_bytes(pickle.dumps({b"data": _Payload(codecs.encode, "abc", "rot13")}, protocol=2))
    with pytest.raises(DataError, match="cannot unpickle it \\(encoding 'rot13' is not allowed") as err:
        load_dataset("cifar10", cifar10_dir)
    assert str(path) in str(err.value)


@pytest.mark.parametrize(
    ("batch", "reason"),
    [
        ([1, 2, 3], "expected a dict with keys b'data' and b'labels'"),
        ({b"data": np.zeros((2, 3072), np.uint8)}, "expected a dict with keys"),
        (
            {b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]},
            "b'data' should be a uint8 array of shape (N, 3072), got uint8 array of shape (2, 100).",
        ),
        (
            {b"data": np.zeros((2, 3072), np.float32), b"labels": [0, 1]},
            "b'data' should be a uint8 array of shape (N, 3072), got float32 array of shape (2, 3072).",
        ),
        (
            {b"data": b"\x00" * 6144, b"labels": [0, 1]},
            "b'data' should be a uint8 array of shape (N, 3072), got bytes.",
        ),
        ({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0]}, "2 images but b'labels' has shape (1,)."),
        ({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 10]}, "labels must lie in 0..9."),
        (
            {b"data": np.zeros((2, 3072), np.uint8), b"labels": [b"a", b"b"]},
            "b'labels' is not a list of integers (",
        ),
    ],
    ids=["not-dict", "no-labels", "shape", "dtype", "not-array", "count", "range", "label-type"],
)
def test_bad_batch_contents(cifar10_dir: Path, batch: object, reason: str) -> None:
    path = cifar10_dir / "data_batch_4"
    dump(batch, path)
    with pytest.raises(DataError, match=re.escape(f"is not a valid CIFAR batch file: {reason}")) as err:
        load_dataset("cifar10", cifar10_dir)
    assert str(path) in str(err.value)


@pytest.mark.parametrize(
    "meta", [{}, {b"label_names": [b"a"] * 9}, [b"a"] * 10], ids=["no-key", "count", "not-dict"]
)
def test_bad_meta(cifar10_dir: Path, meta: object) -> None:
    path = cifar10_dir / "batches.meta"
    dump(meta, path)
    with pytest.raises(
        DataError, match="is not a valid CIFAR meta file: expected b'label_names', a list of 10 names"
    ) as err:
        load_dataset("cifar10", cifar10_dir)
    assert str(path) in str(err.value)
