"""Saved pruned models: a plain ``state_dict`` plus a small JSON describing the architecture.

An exported model has fewer channels than the network it came from, so its state dict does
not fit the zoo constructor. The JSON records the constructor (a name from
:mod:`stripeconv.models` and its keyword arguments) and the shape of every conv, BatchNorm and
linear layer; :func:`load_pruned` builds the network, reshapes those layers and loads the
weights (stripe masks travel in the state dict as ``stripe_mask`` buffers)::

    save_pruned(exported, "out/pruned", arch="resnet20", arch_kwargs={"num_classes": 10})
    model = load_pruned("out/pruned")       # an exported StripeConv2d model, ready to run
"""
from __future__ import annotations

import hashlib
import json
import os
import pickle
from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch import nn

from .checkpoint import save_checkpoint
from .nn import StripeConv2d

__all__ = ["save_pruned", "load_pruned", "read_description", "layer_specs", "build_layer", "mask_digest",
           "ArtifactError"]

FORMAT_VERSION = 1
PathLike = Union[str, os.PathLike]


class ArtifactError(ValueError):
    """A saved model that cannot be loaded as it is (corrupted, edited, or its two files disagree)."""


def _conv_spec(module: Union[nn.Conv2d, StripeConv2d]) -> dict[str, Any]:
    spec = {
        "in_channels": module.in_channels,
        "out_channels": module.out_channels,
        "kernel_size": list(module.kernel_size),
        "stride": list(module.stride),
        "padding": module.padding if isinstance(module.padding, str) else list(module.padding),
        "dilation": list(module.dilation),
        "groups": module.groups,
        "bias": module.bias is not None,
        "padding_mode": module.padding_mode,
    }
    if isinstance(module, StripeConv2d):
        spec["density"] = round(module.density, 6)
        spec["mask_sha256"] = mask_digest(module.stripe_mask)
    return spec


def mask_digest(mask: torch.Tensor) -> str:
    """SHA-256 of a stripe mask (its shape and kept positions): two masks of the same density differ here."""
    bits = mask.detach().to("cpu", torch.uint8).contiguous()
    h = hashlib.sha256(repr(tuple(bits.shape)).encode())
    h.update(bits.numpy().tobytes())
    return h.hexdigest()


def layer_specs(model: nn.Module) -> dict[str, dict[str, Any]]:
    """Type and constructor arguments of every conv, BatchNorm and linear layer, by name."""
    specs: dict[str, dict[str, Any]] = {}
    for name, module in model.named_modules():
        if isinstance(module, (StripeConv2d, nn.Conv2d)):
            specs[name] = {"type": type(module).__name__ if isinstance(module, StripeConv2d) else "Conv2d",
                           **_conv_spec(module)}
        elif isinstance(module, nn.BatchNorm2d):
            specs[name] = {
                "type": "BatchNorm2d",
                "num_features": module.num_features,
                "eps": module.eps,
                "momentum": module.momentum,
                "affine": module.affine,
                "track_running_stats": module.track_running_stats,
            }
        elif isinstance(module, nn.Linear):
            specs[name] = {
                "type": "Linear",
                "in_features": module.in_features,
                "out_features": module.out_features,
                "bias": module.bias is not None,
            }
    return specs


def build_layer(spec: dict[str, Any]) -> nn.Module:
    """A fresh layer from one entry of :func:`layer_specs`."""
    args = {k: v for k, v in spec.items() if k not in ("type", "density", "mask_sha256")}
    kind = spec["type"]
    if kind in ("StripeConv2d", "Conv2d"):
        for key in ("kernel_size", "stride", "dilation"):
            args[key] = tuple(args[key])
        if not isinstance(args["padding"], str):
            args["padding"] = tuple(args["padding"])
        return StripeConv2d(**args) if kind == "StripeConv2d" else nn.Conv2d(**args)
    if kind == "BatchNorm2d":
        return nn.BatchNorm2d(**args)
    if kind == "Linear":
        return nn.Linear(**args)
    raise ValueError(f"unknown layer type {kind!r} in a saved architecture")


def save_pruned(
    model: nn.Module,
    path: PathLike,
    arch: str,
    arch_kwargs: Optional[dict[str, Any]] = None,
    extra: Optional[dict[str, Any]] = None,
) -> tuple[Path, Path]:
    """Write ``<path>.pt`` (the state dict) and ``<path>.json`` (architecture, layer shapes, ``extra``).

    ``arch`` names a constructor of :mod:`stripeconv.models` that builds the unpruned network
    with ``arch_kwargs``. Returns the two paths.
    """
    _constructor(arch)
    path = _base(path)
    weights, meta = _with(path, ".pt"), _with(path, ".json")
    path.parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(weights, model.state_dict())
    description = {
        "format": FORMAT_VERSION,
        "arch": arch,
        "arch_kwargs": arch_kwargs or {},
        "layers": layer_specs(model),
        "extra": extra or {},
    }
    tmp = _with(path, ".json.tmp")
    tmp.write_text(json.dumps(description, indent=1))
    os.replace(tmp, meta)
    return weights, meta


def _constructor(arch: str):
    from . import models

    if arch not in getattr(models, "__all__", ()) or not callable(getattr(models, arch, None)):
        raise ValueError(f"unknown architecture {arch!r}; expected a constructor of stripeconv.models")
    return getattr(models, arch)


def _base(path: PathLike) -> Path:
    path = Path(path)
    return path.with_suffix("") if path.suffix in (".pt", ".json") else path


def _with(path: Path, suffix: str) -> Path:
    return path.parent / (path.name + suffix)  # not with_suffix: "run.v2" must keep its ".v2"


# The models a run folder holds (train, prune, finetune, demo), in the order a user most likely wants them.
_RUN_MODELS = ("pruned", "finetuned", "model")


def _saved_models(folder: Path) -> list[Path]:
    """The saved models (``<name>.json`` + ``<name>.pt``) in ``folder``, paths without suffix."""
    found = [p.parent / p.stem for p in sorted(folder.glob("*.json")) if _with(p.parent / p.stem, ".pt").is_file()]
    return sorted(found, key=lambda p: (_RUN_MODELS.index(p.name) if p.name in _RUN_MODELS else len(_RUN_MODELS),
                                        p.name))


def _description_path(path: PathLike) -> Path:
    """The ``.json`` of a saved model; a folder (a run's ``--out``) is an error that names the models in it, also
    when a trailing slash says it is one (``Path`` would drop it and look for ``runs/swp.json``)."""
    folder = isinstance(path, str) and path.endswith(("/", os.sep))
    meta = _with(_base(path), ".json")
    if Path(path).is_dir() and (folder or not meta.is_file()):
        models = _saved_models(Path(path))
        if models:
            raise FileNotFoundError(f"{path} is a folder, not a saved model; its saved models: "
                                    f"{', '.join(map(str, models))}")
        raise FileNotFoundError(f"{path} is a folder that holds no saved model (a <name>.json + <name>.pt pair "
                                "written by save_pruned)")
    if not meta.is_file():
        raise FileNotFoundError(f"no saved model description at {meta} (expected the .json written by save_pruned "
                                "next to its .pt)")
    return meta


def read_description(path: PathLike) -> dict[str, Any]:
    """The JSON written by :func:`save_pruned` (``arch``, ``arch_kwargs``, ``layers``, ``extra``)."""
    meta = _description_path(path)
    try:
        description = json.loads(meta.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ArtifactError(f"{meta} is not valid JSON ({e}); it should be the description written by save_pruned") \
            from e
    if not isinstance(description, dict):
        raise ArtifactError(f"{meta}: expected a JSON object, got {type(description).__name__}")
    version = description.get("format", FORMAT_VERSION)
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ArtifactError(f"{meta} has format {version!r}; this stripeconv reads format {FORMAT_VERSION} "
                            "(upgrade stripeconv)")
    for key, kind in (("arch", str), ("arch_kwargs", dict), ("layers", dict)):
        if not isinstance(description.get(key), kind):
            raise ArtifactError(f"{meta}: {key!r} is missing or not a {kind.__name__}")
    if not isinstance(description.setdefault("extra", {}), dict):
        raise ArtifactError(f"{meta}: 'extra' must be a JSON object")
    return description


def load_pruned(path: PathLike, map_location: Any = "cpu") -> nn.Module:
    """Rebuild a model saved by :func:`save_pruned` (``path`` with or without the .pt/.json suffix).

    Returns the model in eval mode, its pruned convs as ``StripeConv2d`` with their saved masks.
    """
    description = read_description(path)  # before _base(): it would drop a trailing slash
    path = _base(path)
    meta, weights = _with(path, ".json"), _with(path, ".pt")
    try:
        model = _constructor(description["arch"])(**description["arch_kwargs"])
        modules = dict(model.named_modules())
        for name, spec in description["layers"].items():
            if name not in modules:
                raise ValueError(f"saved layer {name!r} does not exist in {description['arch']}")
            parent, _, child = name.rpartition(".")
            setattr(modules[parent] if parent else model, child, build_layer(spec))
    except (ValueError, TypeError, KeyError, AttributeError) as e:
        raise ArtifactError(f"{meta} does not describe a model stripeconv can build: {e}") from e
    if not weights.is_file():
        raise FileNotFoundError(f"no saved weights at {weights} (expected the .pt written by save_pruned next to "
                                f"{meta.name})")
    try:
        state = torch.load(weights, map_location=map_location, weights_only=True)
    except (RuntimeError, EOFError, KeyError, ValueError, pickle.UnpicklingError) as e:
        raise ArtifactError(f"{weights} is not a readable state dict (truncated or corrupted?): "
                            f"{type(e).__name__}: {e}") from e
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError, ValueError, AttributeError) as e:
        raise ArtifactError(f"the weights {weights} do not fit the architecture in {meta}: {e}") from e
    _check_masks(model, description["layers"], weights, meta)
    model.eval()
    return model


def _check_masks(model: nn.Module, layers: dict, weights: Path, meta: Path) -> None:
    """Loading takes each layer's mask from the weights: a mask that disagrees with the description means the
    two files come from different models."""
    for name, module in model.named_modules():
        spec = layers.get(name)
        if isinstance(module, StripeConv2d) and isinstance(spec, dict) and spec.get("density") is not None:
            if abs(round(module.density, 6) - float(spec["density"])) > 1e-6:
                raise ArtifactError(f"{weights} and {meta} disagree: layer {name!r} keeps {module.density:.6f} of "
                                    f"its stripes in the weights, {spec['density']} in the description")
            digest = spec.get("mask_sha256")  # absent in files written before it was recorded
            if digest is not None and digest != mask_digest(module.stripe_mask):
                raise ArtifactError(f"{weights} and {meta} disagree: layer {name!r} keeps other stripes in the weights "
                                    f"than in the description (same density {module.density:.6f}, different mask)")
