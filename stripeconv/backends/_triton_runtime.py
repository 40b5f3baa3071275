"""The Triton backend's runtime: loading the kernels, launching them, and what the device and torch's
settings decide about a launch (multiprocessors, TMA, precision)."""
from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.util
import os
import sys
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor
from torch.torch_version import TorchVersion

from . import _triton_launch
from ._environ import getenv

_kernels = None
_import_error: Optional[str] = None

MIN_TRITON = (3, 2)


def load_kernels():
    """Import ``stripeconv.kernels.stripe_conv`` (falls back to the source tree's kernels/)."""
    global _kernels, _import_error
    if _kernels is not None or _import_error is not None:
        return _kernels
    try:
        import triton
    except Exception as exc:  # ImportError, or a broken install
        _import_error = f"triton is not importable ({exc}); pip install 'triton>=3.2'"
        return None
    if TorchVersion(triton.__version__) < MIN_TRITON:
        _import_error = (f"triton {triton.__version__} is too old: the kernels need triton >= "
                         f"{'.'.join(map(str, MIN_TRITON))}")
        return None
    try:
        _kernels = _import_kernels()
    except Exception as exc:  # e.g. triton < 3.3 without a GPU driver: its autotuner looks for one at import
        _import_error = (f"the Triton kernels failed to load with triton {triton.__version__} "
                         f"({type(exc).__name__}: {exc})")
    return _kernels


def _import_kernels():
    return kernels_module("stripe_conv")


def kernels_module(name: str):
    """``stripeconv.kernels.<name>``: from the install, or from a source checkout's kernels/
    (beside stripeconv/), which is then registered as the ``stripeconv.kernels`` package."""
    full = f"stripeconv.kernels.{name}"
    try:
        return importlib.import_module(full)
    except ModuleNotFoundError as exc:
        if exc.name not in ("stripeconv.kernels", full):
            raise
    here = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    source = os.path.join(here, "kernels")
    if "stripeconv.kernels" in sys.modules or not os.path.exists(os.path.join(source, f"{name}.py")):
        raise ImportError(f"{full} is missing from this install; reinstall stripeconv")
    spec = importlib.util.spec_from_file_location("stripeconv.kernels", os.path.join(source, "__init__.py"),
                                                  submodule_search_locations=[source])
    package = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = package
    try:
        spec.loader.exec_module(package)
        return importlib.import_module(full)
    except BaseException:
        for loaded in [m for m in sys.modules if m == spec.name or m.startswith(spec.name + ".")]:
            sys.modules.pop(loaded, None)
        raise


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


_interpreter_problem: Optional[str] = None


def check_interpreter() -> str:
    """'' when this triton's interpreter runs the kernels' loops (data-dependent bounds), else why not."""
    global _interpreter_problem
    if _interpreter_problem is None:
        n, out = torch.tensor([3], dtype=torch.int32), torch.zeros(1, dtype=torch.int32)
        try:
            _kernels.interpreter_probe[(1,)](n, out)
            _interpreter_problem = "" if int(out) == 3 else f"its probe kernel counted to {int(out)}, not 3"
        except Exception as exc:  # triton 3.6 with numpy 2: loaded scalars are 1-element arrays
            _interpreter_problem = f"{type(exc).__name__}: {exc}"
        if _interpreter_problem:
            import triton

            _interpreter_problem = (f"the Triton interpreter of triton {triton.__version__} cannot run loops whose "
                                    f"bounds are loaded values ({_interpreter_problem}); triton >= 3.7 can")
    return _interpreter_problem


def check_kernels():
    if load_kernels() is None:
        raise RuntimeError(f"stripeconv backend 'triton' is not available: {_import_error}")
    return _kernels


@functools.lru_cache(maxsize=None)
def narrow_dots() -> bool:
    """Whether this triton's ``tl.dot`` takes operands 8 columns wide (on tensor cores, padded), which the
    8-wide tiles of the subtile forward need: triton >= 3.6 (3.2 and 3.3 ask for 16; 3.4 and 3.5 are not
    checked) and its interpreter."""
    import triton

    return interpreting() or TorchVersion(triton.__version__) >= (3, 6)


def tf32_matmul() -> bool:
    """torch's TF32 setting for fp32 matmuls. The legacy flag's getter answers in ~0.1 us (the
    attributes of ``torch.backends.cuda.matmul`` take ~0.6 us each, twice per fp32 call); once the
    ``fp32_precision`` API has set the flag (``torch.backends.cuda.matmul.fp32_precision = "tf32"``),
    reading the legacy flag raises a RuntimeError (torch >= 2.9), and the setting is read through it."""
    try:
        return torch._C._get_cublas_allow_tf32()
    except RuntimeError:
        pass
    matmul = torch.backends.cuda.matmul
    precision = getattr(matmul, "fp32_precision", "none")
    if precision in ("tf32", "ieee"):
        return precision == "tf32"
    return bool(matmul.allow_tf32)


# torch.cuda.is_current_stream_capturing(), without its Python call where torch is a CUDA build
stream_capturing = getattr(torch._C, "_cuda_isCurrentStreamCapturing", None) or torch.cuda.is_current_stream_capturing


def capturing(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` is a CUDA tensor and the current CUDA stream is being captured into a graph."""
    return tensor.is_cuda and stream_capturing()


@contextlib.contextmanager
def dense_precision(dtype: torch.dtype):
    """cuDNN's fp32 convs (TF32 by default: ``torch.backends.cudnn.allow_tf32``) at the precision of the
    stripe kernels (:func:`tf32_matmul`, IEEE by default), so that the per-shape dense hand-over
    never changes how precise an fp32 result is."""
    if dtype != torch.float32:
        yield
        return
    want = tf32_matmul()
    try:
        old = torch._C._get_cudnn_allow_tf32()
    except (AttributeError, RuntimeError):  # set through torch.backends.cudnn.conv.fp32_precision: left as it is
        old = want
    if old == want:
        yield
        return
    torch._C._set_cudnn_allow_tf32(want)
    try:
        yield
    finally:
        torch._C._set_cudnn_allow_tf32(old)


def at_dense_precision(dtype: torch.dtype, fn: Callable, *args):
    """``fn(*args)`` under :func:`dense_precision` for ``dtype``, entered only for fp32: a context manager costs
    a settled call a handful of Python calls (docs/backends.md, "Host work and the frame stack")."""
    if dtype != torch.float32:
        return fn(*args)
    with dense_precision(dtype):
        return fn(*args)


def precision(dtype: torch.dtype):
    tl = _kernels.tl
    if dtype == torch.float64:
        return "ieee", tl.float64
    if dtype == torch.float32 and tf32_matmul() and not interpreting():
        return "tf32", tl.float32
    return "ieee", tl.float32


_sm_count: dict = {}


def num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 4
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _sm_count:
        _sm_count[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _sm_count[idx]


def tensor_descriptor():
    """Triton's host-side tensor descriptor (``triton.tools.tensor_descriptor``), or None where this triton has none."""
    try:
        from triton.tools.tensor_descriptor import TensorDescriptor
    except ImportError:
        return None
    return TensorDescriptor


def tma_capable(device: torch.device) -> bool:
    """Whether ``device`` copies tensor boxes (TMA: compute capability 9.0 and later; the interpreter emulates it)."""
    if interpreting():
        return device.type == "cpu"
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 9


def tma_boxes(t: Tensor, row: int, groups: int, *numels: int) -> bool:
    """Whether a TMA kernel can read ``t`` (a 16-bit or fp32 tensor whose pixels hold ``row`` elements) as boxes
    of a tensor descriptor for a convolution of one group: the strides of a descriptor are 16-byte
    multiples, and every offset (``numels``) fits in int32 (the TMA kernels have no int64 variant)."""
    return (groups == 1 and t.dtype in (torch.float16, torch.bfloat16, torch.float32)
            and row * t.element_size() % 16 == 0 and max(numels) < 2**31
            and tensor_descriptor() is not None and tma_capable(t.device))


@functools.lru_cache(maxsize=None)
def _several_gpus() -> bool:
    return torch.cuda.is_available() and torch.cuda.device_count() > 1


class TunedLaunch:
    """``kernel[grid](*tensors, *bound, **constants)`` for one settled call signature: only the leading
    tensors change from call to call.

    The first launch goes through the autotuner, which picks (or benchmarks) the configuration for
    the signature's tuning key. Later launches pass that configuration to the JIT function
    directly: the tuner's per-launch key (a dict over every argument, the dtype of each tensor)
    costs ~20 us of host time, more than the rest of a settled call. The key is fixed for the
    signature, so the tuner would pick the same configuration again. From the third launch on, the
    compiled kernel's launcher is called directly (:mod:`._triton_launch`), which skips the JIT
    function's ~18 us of binding and cache lookup; it hands back to the JIT function wherever that
    would launch something else (``STRIPECONV_TRITON_DIRECT=0``: always).

    ``fixed`` (deterministic mode) skips the tuner: the launch runs the kernel's first configuration
    that fits this GPU. A timed pick can differ between processes, and another pixel block
    (BLOCK_M) sums grad weight in another order. A kernel without an autotuner launches as it is.
    """

    __slots__ = ("name", "grid", "constants", "fixed", "bound", "_direct", "_compiled", "_fast")

    def __init__(self, name: str, grid, constants: dict, fixed: bool = False, bound: tuple = ()):
        self.name, self.grid, self.constants, self.fixed, self.bound = name, grid, constants, fixed, bound
        self._direct = None  # (kernel, jit function, configuration kwargs)
        self._compiled = None  # what the last launch through the jit function compiled (None in the interpreter)
        # CompiledLaunch, or False where the launch is not repeated directly (STRIPECONV_TRITON_DIRECT=0: never)
        self._fast = None if getenv("STRIPECONV_TRITON_DIRECT", "1").strip() != "0" else False

    def __call__(self, *tensors) -> None:
        # Triton launches on the *current* CUDA device and its stream; with several GPUs the tensors
        # may live on another (one GPU: no per-launch device query on the settled path).
        if _several_gpus():
            device = tensors[0].device
            if device.type == "cuda" and device.index != torch.cuda.current_device():
                with torch.cuda.device(device):
                    return self._launch(tensors)
        # A settled launch calls the compiled kernel from here, one Python call deep
        # (docs/backends.md, "Host work and the frame stack")
        fast = self._fast
        if fast and self._direct[0] is getattr(_kernels, self.name) and fast(tensors):
            return None
        return self._launch(tensors)

    def _launch(self, tensors: tuple) -> None:
        kernel = getattr(_kernels, self.name)  # looked up per call: tools may stand in for the kernels
        direct = self._direct
        if direct is not None and direct[0] is kernel:
            fast = self._fast
            if fast and fast(tensors):
                return
            jit, config = direct[1], direct[2]

            def through_jit():
                return jit[self.grid](*tensors, *self.bound, **self.constants, **config)
            if fast is None and self._compiled is not None:
                self._fast = _triton_launch.record(through_jit, self._compiled, jit, tensors, self.bound) or False
            else:
                self._compiled = through_jit()
            return
        args = (*tensors, *self.bound)
        if self._fast:  # recorded for the kernel a tool has since stood in for (or that came back)
            self._fast = None
        configs = getattr(kernel, "configs", None)
        jit = getattr(kernel, "fn", None) if configs is not None else kernel
        if self.fixed and configs:
            self._direct = (kernel, jit, _launch_first_fitting(jit, self.grid, args, self.constants, configs))
            return
        self._compiled = kernel[self.grid](*args, **self.constants)
        if configs is None:
            self._direct = (kernel, kernel, {})
            return
        self._compiled = None  # the tuner's return value varies between triton versions
        config = getattr(kernel, "best_config", None)
        if jit is not None and hasattr(config, "all_kwargs") and getattr(config, "pre_hook", None) is None:
            self._direct = (kernel, jit, config.all_kwargs())


# Pixels and columns of one program of ``stripe_gather_columns_kernel``.
GATHER_BLOCK = 64


def column_gather(cols: Tensor, src: Tensor, int64_index: bool) -> TunedLaunch:
    """``launch(src, dst)``: ``dst[m, j] = src[pixel m, channel cols[j]]`` (0 where ``cols[j] < 0``) for
    every ``src`` shaped and strided like this one (``[B, C, Ho, Wo]``, meta is fine), ``dst`` a contiguous
    ``[B * Ho * Wo, cols.numel()]`` (a channels_last tensor's memory). Reads scatter within a pixel's
    channels, writes are contiguous rows."""
    b, _, ho, wo = src.shape
    m, ncol = b * ho * wo, cols.numel()
    return TunedLaunch("stripe_gather_columns_kernel", ((-(-m // GATHER_BLOCK)) * (-(-ncol // GATHER_BLOCK)),),
                       dict(INT64_INDEX=int64_index, BLOCK_M=GATHER_BLOCK, BLOCK_N=GATHER_BLOCK),
                       bound=(cols, m, ho, wo, ncol, *src.stride()))


def _launch_first_fitting(jit, grid, args: tuple, constants: dict, configs: Sequence) -> dict:
    """Launch ``jit`` with the first of ``configs`` this GPU can run (as the autotuner does, a
    configuration that needs more registers or shared memory than there are is skipped); return its kwargs."""
    from triton.runtime import errors

    too_big = tuple(getattr(errors, name) for name in ("OutOfResources", "PTXASError") if hasattr(errors, name))
    for config in configs[:-1]:
        try:
            jit[grid](*args, **constants, **config.all_kwargs())
            return config.all_kwargs()
        except too_big:
            pass
    jit[grid](*args, **constants, **configs[-1].all_kwargs())  # the last one's error is the GPU's answer
    return configs[-1].all_kwargs()
