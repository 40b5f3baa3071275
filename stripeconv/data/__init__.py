"""Datasets without torchvision: Fashion-MNIST (IDX files) and CIFAR-10/100 (python pickle batches).

>>> from stripeconv.data import fashion_mnist
>>> train = fashion_mnist(train=True)          # TensorDataset of ([1, 28, 28] float, label)

Fashion-MNIST comes from the Debian package ``dataset-fashion-mnist`` (``apt-get install
dataset-fashion-mnist``, files in ``/usr/share/datasets/fashion-mnist``) or from the files of
https://github.com/zalandoresearch/fashion-mnist (``*-idx?-ubyte`` or ``*-idx?-ubyte.gz``).
CIFAR is read from the official "python version" archives, extracted
(``cifar-10-batches-py/`` or ``cifar-100-python/``); nothing is downloaded.
"""
from __future__ import annotations

import gzip
import io
import math
import os
import pickle
import zlib
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch
from torch.utils.data import TensorDataset

__all__ = [
    "FASHION_MNIST_ROOT", "FASHION_MNIST_CLASSES", "FASHION_MNIST_MEAN", "FASHION_MNIST_STD",
    "read_idx", "fashion_mnist_arrays", "fashion_mnist", "cifar_arrays", "cifar", "DatasetNotFoundError",
    "DatasetFormatError",
]

FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
FASHION_MNIST_MEAN, FASHION_MNIST_STD = 0.2860, 0.3530
CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN, CIFAR100_STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)

PathLike = Union[str, os.PathLike]


class DatasetNotFoundError(FileNotFoundError):
    """A dataset's files are not where we looked; the message says where and how to get them."""


class DatasetFormatError(ValueError):
    """A dataset file is there but malformed (truncated, wrong format, bad labels); the message names it."""


class _UnreadableBatch(DatasetFormatError, pickle.UnpicklingError):
    """A CIFAR batch that does not unpickle (also an ``UnpicklingError``, which callers may expect)."""


_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: PathLike) -> np.ndarray:
    """Read one IDX file (gzipped or not) into a numpy array of its stored shape."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (EOFError, zlib.error, gzip.BadGzipFile) as e:  # a cut or damaged download
        raise DatasetFormatError(f"{path}: corrupted gzip file ({e})") from e
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise DatasetFormatError(f"{path} is not an IDX file (bad magic number)")
    code, ndim = data[2], data[3]
    if code not in _IDX_DTYPES:
        raise DatasetFormatError(f"{path}: unknown IDX data type 0x{code:02x}")
    offset = 4 + 4 * ndim
    if ndim == 0:
        raise DatasetFormatError(f"{path}: the IDX header declares no dimensions")
    if len(data) < offset:
        raise DatasetFormatError(f"{path}: truncated IDX header ({ndim} dimensions)")
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    dtype = np.dtype(_IDX_DTYPES[code])
    count = math.prod(shape)  # Python ints: np.prod wraps around on a garbage header
    if len(data) - offset < count * dtype.itemsize:
        raise DatasetFormatError(f"{path}: truncated IDX file (expected {count} values of shape {shape})")
    return np.frombuffer(data, dtype=dtype, count=count, offset=offset).reshape(shape).astype(dtype.newbyteorder("="))


def _find(root: Path, stem: str) -> Optional[Path]:
    for name in (stem, stem + ".gz"):
        if (root / name).is_file():
            return root / name
    return None


def fashion_mnist_arrays(root: Optional[PathLike] = None, train: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Raw Fashion-MNIST: uint8 images [N, 28, 28] and int64 labels [N].

    ``root`` defaults to ``$STRIPECONV_FASHION_MNIST`` or ``/usr/share/datasets/fashion-mnist``.
    """
    root = Path(root or os.environ.get("STRIPECONV_FASHION_MNIST") or FASHION_MNIST_ROOT)
    split = "train" if train else "t10k"
    images = _find(root, f"{split}-images-idx3-ubyte")
    labels = _find(root, f"{split}-labels-idx1-ubyte")
    if images is None or labels is None:
        raise DatasetNotFoundError(
            f"Fashion-MNIST {split} files not found in {root} (looked for {split}-images-idx3-ubyte[.gz] and "
            f"{split}-labels-idx1-ubyte[.gz]). Install them with `apt-get install dataset-fashion-mnist` "
            f"(Debian/Ubuntu; files go to {FASHION_MNIST_ROOT}) or download the four files from "
            "https://github.com/zalandoresearch/fashion-mnist and pass root=<their folder> (--data on the command line)."
        )
    x, y = read_idx(images), read_idx(labels)
    if x.dtype != np.uint8 or x.ndim != 3 or x.shape[1:] != (28, 28):
        raise DatasetFormatError(f"{images}: expected uint8 images of shape [N, 28, 28], got {x.dtype} "
                                 f"{list(x.shape)}")
    if y.dtype.kind not in "iu" or y.ndim != 1 or len(x) != len(y):
        raise DatasetFormatError(f"{labels}: expected {len(x)} integer labels, got {y.dtype} {list(y.shape)}")
    _check_labels(y, len(FASHION_MNIST_CLASSES), labels)
    return x, y.astype(np.int64)


def _check_labels(y: np.ndarray, num_classes: int, where) -> None:
    """Out-of-range labels would only fail deep inside the loss, or not at all."""
    if len(y) and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise DatasetFormatError(f"{where}: labels must be in [0, {num_classes}), got values from {int(y.min())} "
                                 f"to {int(y.max())}")


def _check_limit(limit: Optional[int]) -> None:
    if limit is not None and limit < 0:  # a negative slice bound would keep all but the last -limit examples
        raise ValueError(f"limit must be a non-negative integer or None, got {limit!r}")


def fashion_mnist(
    root: Optional[PathLike] = None,
    train: bool = True,
    normalize: bool = True,
    limit: Optional[int] = None,
    seed: int = 0,
) -> TensorDataset:
    """Fashion-MNIST as a ``TensorDataset`` of float images [N, 1, 28, 28] and int64 labels.

    ``normalize`` maps pixels to ``(x / 255 - mean) / std`` (else to [0, 1]); ``limit`` keeps a
    class-stratified random subset of that many examples (reproducible with ``seed``).
    """
    _check_limit(limit)
    x, y = fashion_mnist_arrays(root, train)
    if limit is not None and limit < len(y):
        idx = _stratified(y, limit, seed)
        x, y = x[idx], y[idx]
    images = torch.from_numpy(x.astype(np.float32) / 255.0).unsqueeze(1)
    if normalize:
        images = (images - FASHION_MNIST_MEAN) / FASHION_MNIST_STD
    return TensorDataset(images, torch.from_numpy(y))


def _stratified(labels: np.ndarray, n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    per = [rng.permutation(np.flatnonzero(labels == c)) for c in classes]
    # round-robin over classes so every class gets about n / num_classes examples
    take, i = [], 0
    while len(take) < n:
        for p in per:
            if i < len(p) and len(take) < n:
                take.append(p[i])
        i += 1
    return np.sort(np.asarray(take))


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickler that only builds what CIFAR batches contain (dicts, lists, bytes, numpy arrays)."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"), ("_codecs", "encode"),
    }

    def find_class(self, module, name):
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a CIFAR batch file")


def _load_batch(path: Path) -> dict:
    with open(path, "rb") as f:
        raw = f.read()
    try:
        d = _ArrayUnpickler(io.BytesIO(raw), encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError) as e:
        raise _UnreadableBatch(f"{path} is not a readable CIFAR batch (truncated or corrupted? {e})") from e
    if not isinstance(d, dict):
        raise DatasetFormatError(f"{path} is not a CIFAR batch (a pickled {type(d).__name__}, expected a dict)")
    return {(k.decode() if isinstance(k, bytes) else k): v for k, v in d.items()}


def cifar_arrays(root: PathLike, train: bool = True, num_classes: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """Raw CIFAR-10/100: uint8 images [N, 32, 32, 3] (HWC) and int64 labels [N].

    ``root`` is the extracted folder (``cifar-10-batches-py`` / ``cifar-100-python``) or its parent.
    CIFAR-100 labels are the fine (100-class) labels.
    """
    if num_classes not in (10, 100):
        raise ValueError(f"num_classes must be 10 or 100, got {num_classes}")
    root = Path(root)
    sub = "cifar-10-batches-py" if num_classes == 10 else "cifar-100-python"
    folder = root / sub if (root / sub).is_dir() else root
    if num_classes == 10:
        names = [f"data_batch_{i}" for i in range(1, 6)] if train else ["test_batch"]
        key = "labels"
    else:
        names = ["train"] if train else ["test"]
        key = "fine_labels"
    missing = [n for n in names if not (folder / n).is_file()]
    if missing:
        raise DatasetNotFoundError(
            f"CIFAR-{num_classes} files {missing} not found in {folder}. Download the 'python version' archive "
            f"from https://www.cs.toronto.edu/~kriz/cifar.html, extract it and pass root=<folder containing {sub}> "
            "(--data on the command line)."
        )
    xs, ys = [], []
    for n in names:
        d = _load_batch(folder / n)
        if "data" not in d or key not in d:
            raise DatasetFormatError(f"{folder / n} is not a CIFAR-{num_classes} batch (keys {sorted(map(str, d))})")
        x, y = np.asarray(d["data"]), np.asarray(d[key])
        # a silent cast would turn float or wider pixels into garbage
        if x.dtype != np.uint8 or x.ndim != 2 or x.shape[1] != 3 * 32 * 32:
            raise DatasetFormatError(f"{folder / n}: expected uint8 data of shape [N, 3072], got {x.dtype} "
                                     f"{list(x.shape)}")
        if y.dtype.kind not in "iu" or y.shape != (len(x),):
            raise DatasetFormatError(f"{folder / n}: expected {len(x)} integer labels, got {y.dtype} {list(y.shape)}")
        _check_labels(y, num_classes, folder / n)
        xs.append(x.reshape(-1, 3, 32, 32))
        ys.append(y.astype(np.int64))
    return np.concatenate(xs).transpose(0, 2, 3, 1), np.concatenate(ys)


def cifar(root: PathLike, train: bool = True, num_classes: int = 10, normalize: bool = True) -> TensorDataset:
    """CIFAR-10/100 as a ``TensorDataset`` of float images [N, 3, 32, 32] and int64 labels."""
    x, y = cifar_arrays(root, train, num_classes)
    images = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))).float() / 255.0
    if normalize:
        mean, std = (CIFAR10_MEAN, CIFAR10_STD) if num_classes == 10 else (CIFAR100_MEAN, CIFAR100_STD)
        images = (images - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    return TensorDataset(images, torch.from_numpy(y))
