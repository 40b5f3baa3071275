import gzip
import pickle
import struct

import numpy as np
import pytest
import torch

from stripeconv import data


def _write_idx(path, arr, gz):
    codes = {np.uint8: 0x08, np.int32: 0x0C}
    header = struct.pack(">BBBB", 0, 0, codes[arr.dtype.type], arr.ndim) + b"".join(struct.pack(">I", s) for s in arr.shape)
    body = arr.astype(arr.dtype.newbyteorder(">")).tobytes()
    (gzip.open if gz else open)(path, "wb").write(header + body)


@pytest.mark.parametrize("gz", [False, True])
def test_idx_roundtrip_and_loader(tmp_path, gz):
    rng = np.random.default_rng(0)
    ext = ".gz" if gz else ""
    for split, n in (("train", 30), ("t10k", 10)):
        _write_idx(tmp_path / f"{split}-images-idx3-ubyte{ext}", rng.integers(0, 256, (n, 28, 28), dtype=np.uint8), gz)
        _write_idx(tmp_path / f"{split}-labels-idx1-ubyte{ext}", (np.arange(n) % 10).astype(np.uint8), gz)
    x, y = data.fashion_mnist_arrays(tmp_path, train=True)
    assert x.shape == (30, 28, 28) and x.dtype == np.uint8 and y.dtype == np.int64
    ds = data.fashion_mnist(tmp_path, train=False, normalize=False)
    assert len(ds) == 10 and ds[0][0].shape == (1, 28, 28)
    assert float(ds.tensors[0].max()) <= 1.0
    sub = data.fashion_mnist(tmp_path, train=True, limit=20)
    assert len(sub) == 20 and torch.bincount(sub.tensors[1]).tolist() == [2] * 10
    arr = (np.arange(24, dtype=np.int32) - 5).reshape(2, 3, 4)
    _write_idx(tmp_path / "ints.idx", arr, False)
    np.testing.assert_array_equal(data.read_idx(tmp_path / "ints.idx"), arr)


def test_missing_fashion_mnist_message(tmp_path):
    with pytest.raises(data.DatasetNotFoundError) as e:
        data.fashion_mnist(tmp_path / "nowhere")
    msg = str(e.value)
    assert "nowhere" in msg and "apt-get install dataset-fashion-mnist" in msg


def test_bad_idx(tmp_path):
    (tmp_path / "x").write_bytes(b"\x01\x02\x03\x04")
    with pytest.raises(ValueError, match="IDX"):
        data.read_idx(tmp_path / "x")


@pytest.mark.skipif(not (data.Path(data.FASHION_MNIST_ROOT) / "t10k-labels-idx1-ubyte.gz").exists()
                    and not (data.Path(data.FASHION_MNIST_ROOT) / "t10k-labels-idx1-ubyte").exists(),
                    reason="dataset-fashion-mnist not installed")
def test_real_fashion_mnist():
    ds = data.fashion_mnist(train=False)
    assert len(ds) == 10000 and ds.tensors[0].shape == (10000, 1, 28, 28)
    assert torch.bincount(ds.tensors[1]).tolist() == [1000] * 10
    assert abs(float(ds.tensors[0].mean())) < 0.05


def _cifar_batch(n, key, num_classes, rng):
    return {b"batch_label": b"x", key: list(rng.integers(0, num_classes, n).tolist()),
            b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), b"filenames": [b"f"] * n}


def test_cifar10_pickles(tmp_path):
    rng = np.random.default_rng(0)
    root = tmp_path / "cifar-10-batches-py"
    root.mkdir()
    for i in range(1, 6):
        pickle.dump(_cifar_batch(4, b"labels", 10, rng), open(root / f"data_batch_{i}", "wb"))
    test = _cifar_batch(3, b"labels", 10, rng)
    pickle.dump(test, open(root / "test_batch", "wb"))
    ds = data.cifar(tmp_path, train=True)
    assert len(ds) == 20 and ds[0][0].shape == (3, 32, 32)
    x, y = data.cifar_arrays(root, train=False)
    assert x.shape == (3, 32, 32, 3)
    # channel-major rows: the first 1024 bytes are the red plane
    np.testing.assert_array_equal(x[0, :, :, 0].reshape(-1), test[b"data"][0, :1024])
    assert y.tolist() == test[b"labels"]


def test_cifar100_and_errors(tmp_path):
    rng = np.random.default_rng(1)
    root = tmp_path / "cifar-100-python"
    root.mkdir()
    for split, n in (("train", 5), ("test", 2)):
        b = _cifar_batch(n, b"fine_labels", 100, rng)
        b[b"coarse_labels"] = [0] * n
        pickle.dump(b, open(root / split, "wb"))
    ds = data.cifar(tmp_path, train=False, num_classes=100, normalize=False)
    assert len(ds) == 2 and float(ds.tensors[0].max()) <= 1.0
    with pytest.raises(data.DatasetNotFoundError, match="cifar"):
        data.cifar(tmp_path / "none", num_classes=10)

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    pickle.dump({b"data": Evil(), b"labels": []}, open(root / "train", "wb"))
    with pytest.raises(pickle.UnpicklingError):
        data.cifar(tmp_path, train=True, num_classes=100)
