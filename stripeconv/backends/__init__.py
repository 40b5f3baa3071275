"""Backend selection for the stripe_conv2d op.

A backend is a module with ``NAME``, ``is_available() -> (bool, reason)``,
``supports(device) -> bool`` and the three kernels ``forward``, ``grad_input`` and
``grad_weight`` with the arguments of :mod:`stripeconv.ops`.

By default the fastest available backend for the input's device is used: ``cpu`` (the compiled
C++ kernels) for CPU tensors, ``triton`` for CUDA tensors, and ``dense`` (the
framework's conv on the masked weight) where no stripe kernel runs: other devices, or nothing
compiled. ``reference`` is the readable statement of the math and the test oracle. The
``cuda`` kernels are opt-in (never a default) until benchmarks show them faster. :func:`set_backend` or the
environment variable ``STRIPECONV_BACKEND`` pins one. Modules reach the chosen backend through
:func:`eager_conv2d`, without the op's Python layers, in eager mode and (:mod:`.compiled`) under torch.compile.
"""
from __future__ import annotations

import importlib
import os
from types import ModuleType
from typing import Callable, Optional

import torch
from torch.autograd import forward_ad

__all__ = ["BACKENDS", "set_backend", "get_backend", "available_backends", "resolve", "eager_conv2d"]

BACKENDS = ("reference", "dense", "cpu", "triton", "cuda")
_MODULES = {
    "reference": "reference",
    "dense": "dense",
    "cpu": "cpu",
    "triton": "triton_backend",
    "cuda": "cuda",
}
# cuda is opt-in (set_backend) until GPU benchmarks show its kernels faster than the dense conv
_DEFAULT_ORDER = {"cpu": ("cpu", "dense"), "cuda": ("triton", "dense")}
_functorch_active = getattr(torch._C, "_are_functorch_transforms_active", lambda: False)  # vmap, grad, ...
# Dynamo of torch 2.4 cannot trace that query ("torch.* op returned non-Tensor bool"); there compiled
# layers keep the op, whatever the transforms.
_DYNAMO_TRACES_TRANSFORM_CHECKS = torch.__version__ >= (2, 6)
_dispatch_modes_active = getattr(torch._C, "_len_torch_dispatch_stack", lambda: 0)  # FakeTensorMode, ...
_is_tracing = torch._C._is_tracing  # torch.jit.is_tracing() outside TorchScript

_loaded: dict[str, ModuleType] = {}
_eager_conv2d: dict[str, Callable] = {}
# device -> the backend chosen for it (keyed by device: device.type costs ~0.4 us a call)
_default: dict[torch.device, ModuleType] = {}
_pinned: dict[tuple, ModuleType] = {}  # (pinned name, device) -> its module, where it supports the device
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
    _pinned.clear()


def get_backend() -> Optional[str]:
    """The pinned backend name, or ``None`` when it is chosen per device."""
    return _selected


def eager_conv2d(input: torch.Tensor, compiling: Optional[bool] = None) -> Optional[Callable]:
    """What a module runs an eager ``stripe_conv2d`` call on ``input`` with, or None to call the op.

    The same kernels, gradients and layouts as the op, without its Python dispatch layers: the
    ``cpu`` backend's ``eager_conv2d`` (its forward with C++ autograd), or one autograd.Function
    around any other backend (:mod:`.eager`). Under torch.func transforms and forward-mode AD, the
    op inside an autograd.Function they can differentiate (``ops.transform_conv2d``). None where only the op
    works: for the Python backends under tracing, dispatch modes (fake tensors), for meta tensors and
    tensor subclasses. Under torch.compile, what :func:`_compiled_conv2d` says. ``compiling``:
    ``torch.compiler.is_compiling()`` where the caller has asked already.

    On the common path (no transform, a backend resolved before) it calls no Python function: each call
    may cost the interpreter a fresh chunk of its frame stack (docs/backends.md, "Host work and the frame
    stack").
    """
    if torch.compiler.is_compiling() if compiling is None else compiling:
        return _compiled_conv2d(input)
    if _functorch_active() or forward_ad._current_level >= 0:  # torch.func, or dual tensors may come
        from ..ops import transform_conv2d  # the ops import this module

        return transform_conv2d
    # resolve()'s answers so far
    module = _default.get(input.device) if _selected is None else _pinned.get((_selected, input.device))
    if module is None:
        module = resolve(input.device)
    own = getattr(module, "eager_conv2d", None)
    if own is not None:
        return own
    # (torch.jit.is_tracing() without its Python call: this is not TorchScript)
    if _is_tracing() or type(input) is not torch.Tensor or input.is_meta or _dispatch_modes_active():
        return None
    conv2d = _eager_conv2d.get(module.NAME)
    if conv2d is None:
        from .eager import conv2d_for  # imports the ops, which import this module

        conv2d = _eager_conv2d[module.NAME] = conv2d_for(module)
    return conv2d


def _compiled_conv2d(input: torch.Tensor) -> Optional[Callable]:
    """What a module traces a ``stripe_conv2d`` call to under torch.compile. Where the ``cpu`` backend
    serves ``input``: its C++ op (forward with C++ autograd; every kernel has a fake implementation,
    so it traces), as in eager mode and TorchScript. Elsewhere: :func:`.compiled.conv2d`, the backend
    calls as private ops without the custom op's Python layers, which cost a compiled graph more than
    a small layer's kernels (see :mod:`.compiled`). None, the op, under torch.export, which keeps the
    op that exported programs name whatever device they later run on (a torch without the export
    flag keeps it everywhere). Under torch.func transforms and forward-mode AD, ``transform_conv2d``,
    which is the dense conv of the masked weight under compile (torch >= 2.6). Dynamo guards on
    ``_selected``, so :func:`set_backend` recompiles."""
    if _DYNAMO_TRACES_TRANSFORM_CHECKS and (_functorch_active() or forward_ad._current_level >= 0):
        from ..ops import transform_conv2d  # the ops import this module

        return transform_conv2d
    # The flag itself: Dynamo of torch 2.11 folds torch.compiler.is_exporting() to True in every trace.
    exporting = getattr(torch.compiler, "_is_exporting_flag", None)
    if exporting is not False:
        return None
    if input.device.type == "cpu" and _selected in (None, "cpu"):
        # resolve()'s answer, without its cache write (a side effect Dynamo would have to replay)
        cpu = _loaded.get("cpu")  # loaded with the package
        if cpu is not None and cpu.is_available()[0]:
            return cpu.eager_conv2d
    from .compiled import conv2d  # loaded with the ops (it imports them, and they import this module)

    return conv2d


def resolve(device: torch.device) -> ModuleType:
    """The backend module that runs a call on ``device``."""
    if _selected is not None:
        module = _pinned.get((_selected, device))
        if module is None:
            module = _module(_selected)
            if not module.supports(device):
                raise RuntimeError(
                    f"stripeconv backend {_selected!r} cannot run on {device.type} tensors; "
                    f"move the data or call stripeconv.set_backend(None)"
                )
            _pinned[_selected, device] = module
        return module
    module = _default.get(device)
    if module is None:
        for name in _DEFAULT_ORDER.get(device.type, ("dense",)):
            if _module(name).is_available()[0] and _module(name).supports(device):
                module = _default[device] = _module(name)  # what is built and importable stays so
                break
        else:
            raise RuntimeError(f"no stripeconv backend supports {device.type} tensors")
    return module


def _apply_environment() -> None:
    """Pin the backend ``STRIPECONV_BACKEND`` names. Called once the package is imported: checking
    that a backend can run imports it, and the backends import :mod:`stripeconv.ops`."""
    if os.environ.get("STRIPECONV_BACKEND"):
        set_backend(os.environ["STRIPECONV_BACKEND"])
