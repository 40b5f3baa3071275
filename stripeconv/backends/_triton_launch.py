"""Repeating a settled Triton launch without Triton's launch path.

``kernel[grid](*args, **constants)`` binds and specialises every argument, builds a cache key from
them and looks the compiled kernel up before it calls the kernel's launcher: 17-19 us of host time
per launch of these kernels (triton 3.6 and 3.9, ``bench/launch_overhead.py``), more than the rest
of a settled call. A settled launch passes the same integers, constants, dtypes and grid every
time and only its leading tensors change, so :func:`record` lets one launch go through Triton,
records the call Triton makes into the compiled kernel's launcher, and returns a
:class:`CompiledLaunch` that makes that call again with new tensors.

A :class:`CompiledLaunch` declines (returns False, and the caller launches through Triton) where
Triton would not launch the same compiled kernel, or would do more than launch it: another current
device, a tensor of another dtype, or one that is not 16-byte aligned where the recorded one was
(Triton compiles an aligned variant for aligned pointers), launch hooks installed (profilers such
as proton read them) or pre-run hooks on the JIT function.

A leading argument may also be a host-side tensor descriptor (TMA): Triton compiles in its dtype and
box, which the caller keeps, and its launcher encodes the descriptor on every call, so a new one is
passed as it is; the check is its base tensor's dtype.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import torch
from torch import Tensor

__all__ = ["CompiledLaunch", "record"]

# Where a CompiledKernel keeps its launcher once loaded: ``_run`` behind a ``run`` property
# (triton >= 3.5), or the ``run`` attribute itself (before).
_LAUNCHER_SLOTS = ("_run", "run")
_ALIGNMENT = 16  # Triton specialises pointer arguments on divisibility by 16


def _hook_owner():
    """What holds the launch hooks Triton passes to a launcher: ``triton.knobs.runtime`` (triton >=
    3.4) or the ``CompiledKernel`` class."""
    try:
        from triton import knobs

        if hasattr(knobs.runtime, "launch_enter_hook"):
            return knobs.runtime
    except ImportError:
        pass
    from triton.compiler import CompiledKernel

    return CompiledKernel


class CompiledLaunch:
    """One recorded launch of a compiled kernel, repeated with new leading tensors: ``launch(tensors)``."""

    __slots__ = ("_runner", "_grid", "_function", "_metadata", "_rest", "_device", "_dtypes", "_aligned", "_jit",
                 "_current_device", "_current_stream", "_hooks", "_boxes")

    def __init__(self, runner: Callable, grid: tuple, function: Any, metadata: Any, rest: tuple, device: int,
                 dtypes: tuple, aligned: tuple, jit: Any, driver: Any, hooks: Any, boxes: bool = False):
        self._runner, self._grid, self._function, self._metadata = runner, grid, function, metadata
        self._rest, self._device, self._dtypes, self._aligned = rest, device, dtypes, aligned
        self._jit, self._hooks, self._boxes = jit, hooks, boxes
        self._current_device, self._current_stream = _device_query(driver), driver.get_current_stream

    def __call__(self, tensors: tuple) -> bool:
        """Launch with ``tensors`` in place of the recorded leading tensors; False (nothing launched)
        where Triton's own launch path must run instead."""
        # Checked inline, without Python calls: each one on a settled launch may cost the interpreter a
        # fresh chunk of its frame stack (docs/backends.md, "Host work and the frame stack").
        hooks = self._hooks
        enter, leave = hooks.launch_enter_hook, hooks.launch_exit_hook
        # a hook does something unless it is None or an empty chain (triton >= 3.6 keeps a chain of hooks)
        if ((enter is not None and getattr(enter, "calls", None) != [])
                or (leave is not None and getattr(leave, "calls", None) != [])
                or getattr(self._jit, "pre_run_hooks", None)):
            return False
        boxes = self._boxes
        for t, dtype in zip(tensors, self._dtypes):
            if boxes and not isinstance(t, Tensor):  # a tensor descriptor: its base's dtype (see _tensor_of)
                t = getattr(t, "base", None) if type(t).__name__ == "TensorDescriptor" else None
                if not isinstance(t, Tensor):
                    return False
            if t.dtype is not dtype:
                return False
        for i in self._aligned:
            if tensors[i].data_ptr() % _ALIGNMENT:
                return False
        device = self._current_device()
        if device != self._device:
            return False
        g0, g1, g2 = self._grid
        self._runner(g0, g1, g2, self._current_stream(device), self._function, self._metadata, None, enter,
                     leave, *tensors, *self._rest)
        return True


def _device_query(driver) -> Callable[[], int]:
    """The driver's current-device query; where that is ``torch.cuda.current_device`` (Triton's CUDA driver),
    the torch builtin it ends in, without its Python calls (CUDA is initialised once a kernel has launched)."""
    query = driver.get_current_device
    builtin = getattr(torch._C, "_cuda_getDevice", None)
    if builtin is not None and query is torch.cuda.current_device and torch.cuda.is_initialized():
        return builtin
    return query


def record(launch: Callable[[], Any], compiled: Any, jit: Any, tensors: tuple, rest: tuple) -> Optional[CompiledLaunch]:
    """Run ``launch()``, one launch through Triton of ``compiled`` (the CompiledKernel an earlier launch
    of ``jit`` with the same arguments returned) with arguments ``(*tensors, *rest)``, and return the
    :class:`CompiledLaunch` that repeats it, or None where the call into the launcher is not the one
    expected (then every launch keeps going through Triton)."""
    attributes = getattr(compiled, "__dict__", {})
    slot = next((name for name in _LAUNCHER_SLOTS if callable(attributes.get(name))), None)
    if slot is None:
        launch()
        return None
    runner = attributes[slot]
    calls = []

    def recorder(*call):
        calls.append(call)
        return runner(*call)

    setattr(compiled, slot, recorder)
    try:
        launch()
    finally:
        setattr(compiled, slot, runner)
    if len(calls) != 1:  # another thread launched the kernel meanwhile: do not guess which call is ours
        return None
    return _from_call(calls[0], runner, compiled, jit, tensors, rest)


def _from_call(call: tuple, runner: Callable, compiled: Any, jit: Any, tensors: tuple,
               rest: tuple) -> Optional[CompiledLaunch]:
    # (grid x, y, z, stream, function, packed metadata, launch metadata, enter hook, exit hook, *kernel arguments)
    if len(call) < 9 + len(tensors) + len(rest):
        return None
    grid, stream, function, metadata, kernel_args = call[:3], call[3], call[4], call[5], call[9:]
    args = (*tensors, *rest)
    # The launcher takes the arguments in signature order, then (triton >= 3.3) the constants: ours come
    # first, as passed; what follows them is fixed for the launch.
    if function is not getattr(compiled, "function", None) or any(a is not b for a, b in zip(kernel_args, args)):
        return None
    from triton.runtime import driver as triton_driver

    driver = triton_driver.active
    device = driver.get_current_device()
    if stream != driver.get_current_stream(device):
        return None
    checked = tuple(map(_tensor_of, tensors))
    if not all(isinstance(t, Tensor) for t in checked):
        return None
    dtypes = tuple(t.dtype for t in checked)
    aligned = tuple(i for i, t in enumerate(tensors) if isinstance(t, Tensor) and t.data_ptr() % _ALIGNMENT == 0)
    return CompiledLaunch(runner, tuple(grid), function, metadata, tuple(kernel_args[len(tensors):]), device, dtypes,
                          aligned, jit, driver, _hook_owner(), boxes=any(t is not c for t, c in zip(tensors, checked)))


def _tensor_of(arg) -> Optional[Tensor]:
    """The tensor a leading argument passes: itself, or a tensor descriptor's base (None for anything else)."""
    if isinstance(arg, Tensor):
        return arg
    base = getattr(arg, "base", None) if type(arg).__name__ == "TensorDescriptor" else None
    return base if isinstance(base, Tensor) else None
