"""A small Fashion-MNIST subset shipped with the package (2000 train + 500 test images).

It is a class-balanced random sample of the real dataset, written by
``bench/make_embedded_subset.py``; ``stripeconv demo`` and the tests fall back to it when the full
dataset is not installed. Images are normalised like :func:`stripeconv.data.fashion_mnist`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch.utils.data import TensorDataset

__all__ = ["SUBSET_PATH", "fashion_mnist_subset_arrays", "fashion_mnist_subset"]

SUBSET_PATH = Path(__file__).with_name("fashion_mnist_subset.npz")


def fashion_mnist_subset_arrays(train: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images ``[N, 28, 28]`` and int64 labels ``[N]`` of the shipped subset."""
    if not SUBSET_PATH.is_file():
        raise FileNotFoundError(f"the shipped Fashion-MNIST subset is missing ({SUBSET_PATH}); "
                                "reinstall stripeconv or run bench/make_embedded_subset.py")
    split = "train" if train else "test"
    with np.load(SUBSET_PATH) as d:
        return d[f"{split}_images"], d[f"{split}_labels"].astype(np.int64)


def fashion_mnist_subset(train: bool = True, normalize: bool = True, limit: Optional[int] = None) -> TensorDataset:
    """The shipped subset as a ``TensorDataset`` of float ``[N, 1, 28, 28]`` images and int64 labels."""
    from .. import FASHION_MNIST_MEAN, FASHION_MNIST_STD, _check_limit

    _check_limit(limit)
    x, y = fashion_mnist_subset_arrays(train)
    if limit is not None:
        x, y = x[:limit], y[:limit]
    images = torch.from_numpy(x.astype(np.float32) / 255.0).unsqueeze(1)
    if normalize:
        images = (images - FASHION_MNIST_MEAN) / FASHION_MNIST_STD
    return TensorDataset(images, torch.from_numpy(y))
