"""Datasets and models named on the command line: data specs, dataset loading, model presets."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch
from torch import nn
from torch.utils.data import Dataset

from .common import CLIError


# Named model presets: zoo constructor + keyword arguments (the JSON of a saved model records these).
PRESETS = {
    "cnn-small": ("vgg", {"cfg": [16, "M", 32, 32, "M", 64, 64]}),
    "cnn-tiny": ("vgg", {"cfg": [8, "M", 16, "M", 16]}),
}
DATASETS = ("fashion-mnist", "fashion-mnist-subset", "cifar10", "cifar100", "imagefolder")
DEFAULT_MODEL = {"fashion-mnist": "cnn-small", "fashion-mnist-subset": "cnn-small", "cifar10": "resnet20",
                 "cifar100": "resnet56", "imagefolder": "resnet18"}


def load_datasets(spec: dict, train: bool = True) -> tuple[Optional[Dataset], Dataset, dict]:
    """``(train_set or None, test_set, meta)`` for a data spec.

    ``spec``: ``dataset`` (one of :data:`DATASETS`), ``data`` (folder or None), ``limit_train``,
    ``limit_test``, ``seed``, ``image_size`` (imagefolder). ``meta``: ``input_size`` [1, C, H, W],
    ``num_classes``, ``train_size``, ``test_size``.
    """
    from .. import data as D

    name, root = spec["dataset"], spec.get("data")
    lt, le, seed = spec.get("limit_train"), spec.get("limit_test"), int(spec.get("seed") or 0)
    if name == "fashion-mnist":
        tr = D.fashion_mnist(root, train=True, limit=lt, seed=seed) if train else None
        te = D.fashion_mnist(root, train=False, limit=le, seed=seed)
        meta = {"input_size": [1, 1, 28, 28], "num_classes": 10}
    elif name == "fashion-mnist-subset":
        from ..data.embedded import fashion_mnist_subset
        tr = fashion_mnist_subset(train=True, limit=lt) if train else None
        te = fashion_mnist_subset(train=False, limit=le)
        meta = {"input_size": [1, 1, 28, 28], "num_classes": 10}
    elif name in ("cifar10", "cifar100"):
        if not root:
            raise CLIError(f"--dataset {name} needs --data PATH: the folder of the extracted 'python version' archive "
                           "(cifar-10-batches-py / cifar-100-python, or its parent), from "
                           "https://www.cs.toronto.edu/~kriz/cifar.html")
        nc = 10 if name == "cifar10" else 100
        tr = _limit(D.cifar(root, train=True, num_classes=nc), lt, seed) if train else None
        te = _limit(D.cifar(root, train=False, num_classes=nc), le, seed)
        meta = {"input_size": [1, 3, 32, 32], "num_classes": nc}
    elif name == "imagefolder":
        tr, te, meta = _imagefolder(root, int(spec.get("image_size") or 224), train)
        tr = _limit(tr, lt, seed) if tr is not None else None
        te = _limit(te, le, seed)
    else:
        raise CLIError(f"unknown dataset {name!r}; choose from {', '.join(DATASETS)}")
    meta.update(train_size=len(tr) if tr is not None else None, test_size=len(te))
    return tr, te, meta


def _limit(ds, n: Optional[int], seed: int):
    if n is None or n >= len(ds):
        return ds
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(ds), generator=g)[:n].sort().values.tolist()
    return torch.utils.data.Subset(ds, idx)


def _imagefolder(root, size: int, train: bool):
    if not root:
        raise CLIError("--dataset imagefolder needs --data PATH (a folder with train/ and val/ subfolders, one "
                       "subfolder per class, as ImageNet is usually laid out)")
    try:
        from torchvision import datasets, transforms
    except ImportError as e:
        raise CLIError("ImageNet-style folders are read with torchvision, which is not installed: "
                       "pip install torchvision (matching your torch build)") from e
    root = Path(root)
    val_dir = next((root / d for d in ("val", "validation", "test") if (root / d).is_dir()), None)
    if not (root / "train").is_dir() or val_dir is None:
        raise CLIError(f"{root} must contain train/ and val/ (or validation/, test/) class folders")
    norm = transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    tr_tf = transforms.Compose([transforms.RandomResizedCrop(size), transforms.RandomHorizontalFlip(),
                                transforms.ToTensor(), norm])
    te_tf = transforms.Compose([transforms.Resize(int(round(size * 256 / 224))), transforms.CenterCrop(size),
                                transforms.ToTensor(), norm])
    tr = datasets.ImageFolder(str(root / "train"), tr_tf) if train else None
    te = datasets.ImageFolder(str(val_dir), te_tf)
    return tr, te, {"input_size": [1, 3, size, size], "num_classes": len(te.classes)}


def data_spec(args, saved: Optional[dict] = None) -> dict:
    """The data spec from the command line, defaulting to what a saved model recorded."""
    saved = dict(saved or {})
    spec = {k: saved.get(k) for k in ("dataset", "data", "limit_train", "limit_test", "seed", "image_size")}
    for k in ("dataset", "data", "limit_train", "limit_test", "image_size"):
        v = getattr(args, k, None)
        if v is not None:
            spec[k] = v
    if getattr(args, "data_seed", None) is not None:
        spec["seed"] = args.data_seed
    spec["dataset"] = spec.get("dataset") or "fashion-mnist"
    spec["seed"] = spec.get("seed") or 0
    if spec["dataset"] == "fashion-mnist-subset":  # shipped with stripeconv: it reads no folder
        if getattr(args, "data", None) is not None:
            raise CLIError(f"--data {args.data}: fashion-mnist-subset is shipped with stripeconv and reads no folder; "
                           "pass --dataset fashion-mnist to read Fashion-MNIST from PATH, or leave out --data")
        spec["data"] = None  # a folder recorded for another dataset
    return spec


def build_model(name: str, num_classes: int, in_channels: int, width: Optional[float] = None,
                model_kwargs: Optional[dict] = None) -> tuple[nn.Module, str, dict]:
    """``(model, arch, arch_kwargs)`` from a preset (:data:`PRESETS`) or a :mod:`stripeconv.models` constructor."""
    from .. import models

    if name in PRESETS:
        arch, kw = PRESETS[name]
        kw = dict(kw)
    elif name in models.__all__ and callable(getattr(models, name)) and name[0].islower():
        arch, kw = name, {}
    else:
        choices = sorted(PRESETS) + [n for n in models.__all__ if n[0].islower()]
        raise CLIError(f"unknown model {name!r}; choose from {', '.join(choices)}")
    kw.update(num_classes=num_classes, in_channels=in_channels)
    if width is not None:
        kw["width"] = width
    kw.update(model_kwargs or {})
    try:
        return getattr(models, arch)(**kw), arch, kw
    except TypeError as e:  # an argument the constructor does not take
        raise CLIError(f"model {name!r}: {e}") from e


def parse_model_kwargs(args) -> Optional[dict]:
    if not args.model_kwargs:
        return None
    try:
        kw = json.loads(args.model_kwargs)
    except json.JSONDecodeError as e:
        raise CLIError(f"--model-kwargs: invalid JSON ({e}); expected an object, e.g. '{{\"width\": 0.5}}'") from None
    if not isinstance(kw, dict):
        raise CLIError(f"--model-kwargs: expected a JSON object, got {args.model_kwargs!r}")
    return kw


def check_fits(desc: dict, meta: dict, path, spec: dict) -> None:
    """A saved model fed another dataset's images would fail in its first conv (or score a wrong accuracy)."""
    extra = desc.get("extra", {})
    saved_c = (extra.get("input_size") or [None, None])[1]
    saved_n = extra.get("num_classes")
    wrong_c = saved_c is not None and saved_c != meta["input_size"][1]
    wrong_n = saved_n is not None and saved_n != meta["num_classes"]
    if wrong_c or wrong_n:
        raise CLIError(f"{path} takes {saved_c}-channel images and predicts {saved_n} classes, but "
                       f"{spec['dataset']} has {meta['input_size'][1]} channels and {meta['num_classes']} classes; "
                       "pass the --dataset it was trained on")
