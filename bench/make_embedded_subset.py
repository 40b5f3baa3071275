"""Write the small Fashion-MNIST subset shipped in the package (stripeconv/data/embedded/).

    python bench/make_embedded_subset.py [--root /usr/share/datasets/fashion-mnist] [--train 2000] [--test 500]

Reads the real dataset (IDX files, e.g. from Debian's ``dataset-fashion-mnist``), takes a
class-balanced random subset of each split (fixed seed, so the output is reproducible) and saves
uint8 images and labels in one compressed ``.npz`` (``fashion_mnist_subset.npz``, < 2 MB). The
subset lets ``stripeconv demo`` and the tests run on a machine without the dataset.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from stripeconv.data import FASHION_MNIST_ROOT, fashion_mnist_arrays

OUT = Path(__file__).resolve().parents[1] / "stripeconv" / "data" / "embedded" / "fashion_mnist_subset.npz"


def balanced(labels: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` indices, the same number from every class (the remainder from the first classes), sorted."""
    classes = np.unique(labels)
    per, extra = divmod(n, len(classes))
    idx = [rng.choice(np.flatnonzero(labels == c), per + (i < extra), replace=False) for i, c in enumerate(classes)]
    return np.sort(np.concatenate(idx))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default=FASHION_MNIST_ROOT, help="folder of the Fashion-MNIST IDX files")
    parser.add_argument("--train", type=int, default=2000, help="training images to keep")
    parser.add_argument("--test", type=int, default=500, help="test images to keep")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)

    rng = np.random.default_rng(args.seed)
    arrays = {}
    for split, n in (("train", args.train), ("test", args.test)):
        x, y = fashion_mnist_arrays(args.root, train=split == "train")
        idx = balanced(y, n, rng)
        arrays[f"{split}_images"] = x[idx].astype(np.uint8)
        arrays[f"{split}_labels"] = y[idx].astype(np.uint8)
        arrays[f"{split}_source_index"] = idx.astype(np.int32)  # rows of the original split
    args.out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(args.out, **arrays)
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e6:.2f} MB): "
          f"{args.train} train + {args.test} test images from {args.root}")


if __name__ == "__main__":
    main()
