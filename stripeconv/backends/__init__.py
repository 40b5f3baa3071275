"""Backend selection for the stripe_conv2d op.

A backend is a module with ``NAME``, ``is_available() -> (bool, reason)``,
``supports(device) -> bool`` and the three kernels ``forward``, ``grad_input`` and
``grad_weight`` with the arguments of :mod:`stripeconv.ops`.

By default the fastest available backend for the input's device is used: ``cpu`` (the compiled
C++ kernels) for CPU tensors, ``triton`` (then ``cuda``) for CUDA tensors, and ``dense`` (the
framework's conv on the masked weight) where no stripe kernel runs: other devices, or nothing
compiled. ``reference`` is the readable statement of the math and the test oracle. The ``cuda`` kernels are opt-in until benchmarks show them faster. :func:`set_backend` or the environment variable
``STRIPECONV_BACKEND`` pins one.
"""
from __future__ import annotations

import importlib
import os
from types import ModuleType
from typing import Optional

import torch

__all__ = ["BACKENDS", "set_backend", "get_backend", "available_backends", "resolve", "eager_cpu_module"]

BACKENDS = ("reference", "dense", "cpu", "triton", "cuda")
_MODULES = {
    "reference": "reference",
    "dense": "dense",
    "cpu": "cpu",
    "triton": "triton_backend",
    "cuda": "cuda",
}
_DEFAULT_ORDER = {"cpu": ("cpu", "dense"), "cuda": ("triton", "cuda", "dense")}

_loaded: dict[str, ModuleType] = {}
_selected: Optional[str] = None


def _module(name: str) -> ModuleType:
    if name not in _MODULES:
        raise ValueError(f"unknown stripeconv backend {name!r}; expected one of {', '.join(BACKENDS)}")
    if name not in _loaded:
        _loaded[name] = importlib.import_module(f".{_MODULES[name]}", __name__)
    return _loaded[name]


def _check_available(name: str) -> ModuleType:
    module = _module(name)
    ok, reason = module.is_available()
    if not ok:
        raise RuntimeError(f"stripeconv backend {name!r} is not available: {reason}")
    return module


def available_backends() -> list[str]:
    """Names of the backends that can run in this process."""
    return [name for name in BACKENDS if _module(name).is_available()[0]]


def set_backend(name: Optional[str]) -> None:
    """Pin the backend of every stripe_conv2d call (``None`` restores automatic choice).

    Raises ``RuntimeError`` if the backend cannot run here (not built, no GPU, no triton).
    """
    global _selected
    if name is not None:
        _check_available(name)
    _selected = name


def get_backend() -> Optional[str]:
    """The pinned backend name, or ``None`` when it is chosen per device."""
    return _selected


def eager_cpu_module() -> Optional[ModuleType]:
    """The ``cpu`` backend when it runs CPU calls (chosen by default or pinned), else ``None``.

    Modules call its ``eager_conv2d`` directly in eager mode: the same kernels as the op.
    """
    if _selected not in (None, "cpu"):
        return None
    module = _loaded.get("cpu") or _module("cpu")
    return module if module.is_available()[0] else None


def resolve(device: torch.device) -> ModuleType:
    """The backend module that runs a call on ``device``."""
    if _selected is not None:
        module = _module(_selected)
        if not module.supports(device):
            raise RuntimeError(
                f"stripeconv backend {_selected!r} cannot run on {device.type} tensors; "
                f"move the data or call stripeconv.set_backend(None)"
            )
        return module
    for name in _DEFAULT_ORDER.get(device.type, ("dense",)):
        module = _module(name)
        if module.is_available()[0] and module.supports(device):
            return module
    raise RuntimeError(f"no stripeconv backend supports {device.type} tensors")


if os.environ.get("STRIPECONV_BACKEND"):
    set_backend(os.environ["STRIPECONV_BACKEND"])
