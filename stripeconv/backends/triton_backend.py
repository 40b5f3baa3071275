"""Triton GPU backend of the stripe_conv2d op (kernels in :mod:`stripeconv.kernels.stripe_conv`).

Host side of the kernels: availability, the launches and the settled calls. The mask-derived
metadata the kernels read (forward tile plans, backward row chunks and blocks, tile efficiency) is
built in :mod:`.triton_plans`; its public names are re-exported here.

Which runs: on CUDA every call picks, per shape, the fastest of the stripe kernels at each
offered tile width and cuDNN's dense conv on the scattered weight, timed once per key by
:mod:`stripeconv.backends.gpu_select` (``STRIPECONV_GPU_DENSE`` overrides). Once that choice is
settled, a call shaped like an earlier one (same op, shapes, strides, dtypes, mask version, conv
geometry, bias or not) skips all of this: it reuses the launch worked out for the first one.

NCHW operands are copied to channels_last once per call (the kernels' vector loads need
contiguous channels); results keep the caller's memory format.

Metadata is built once per mask, which reads the mask on the host (a device sync); afterwards a
call does no host sync (no ``.item()``, no ``nonzero``), which keeps the steady state usable under
CUDA graph capture. Triton autotunes on the first launch of a new (shape, density bucket) key and
the dense/stripe choice times its candidates, both of which sync: run one eager step before
capturing a graph.

Precision: fp16/bf16/fp32 accumulate in fp32, fp64 in fp64. fp32 inputs use TF32 tensor cores
only when ``torch.backends.cuda.matmul.allow_tf32`` is True (the matmul flag, since the op is
a GEMM; it is False by default in PyTorch; or ``torch.backends.cuda.matmul.fp32_precision`` is
"tf32"), IEEE fp32 otherwise. The dense cuDNN hand-over runs its fp32 convs at the same precision
(cuDNN's own flag defaults to TF32), so the per-shape choice never changes an fp32 result's precision.

Grad weight is split-K over pixels. By default the splits add into one fp32 buffer with
atomics; with ``STRIPECONV_DETERMINISTIC=1`` or ``torch.use_deterministic_algorithms(True)``
every split writes its own partial buffer and the host sums them in a fixed order. That mode also
chooses nothing by timing (tile width, dense hand-over, kernel configuration: see
:func:`.gpu_select.deterministic`), so every run on the same GPU and software computes the same
bits, at the speed of the fixed choices.

Groups: ``groups == 1`` and groups with >= 16 filters and channels per group use the tensor
core path; depthwise and small groups use an outer-product path (correct, not tuned).
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.util
import math
import os
import sys
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.torch_version import TorchVersion

from ..ops import output_memory_format
from . import _dense_weights, _triton_launch, gpu_select, triton_plans
from ._dense_weights import dense_weight as _dense_weight
from ._environ import getenv
from .triton_plans import (
    DensePlan, ForwardPlan, GradInputPlan, GradWeightPlan, SubtilePlan, TilesBackwardPlan, best_tile_efficiency,
    cached_plan, default_block_n, forward_plan, forward_plans, next_pow2, subtile_count, subtile_plan,
    tile_efficiency, tile_widths,
)

NAME = "triton"

__all__ = [
    "NAME", "is_available", "supports", "forward", "grad_input", "grad_weight", "clear_cache",
    # re-exported from .triton_plans
    "tile_efficiency", "best_tile_efficiency", "tile_widths", "forward_plan", "default_block_n",
    "ForwardPlan", "GradInputPlan", "GradWeightPlan", "DensePlan",
]

_kernels = None
_import_error: Optional[str] = None


MIN_TRITON = (3, 2)


def _load_kernels():
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


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


_interpreter_problem: Optional[str] = None


def _check_interpreter() -> str:
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


def is_available() -> tuple[bool, str]:
    """``(True, "")`` when the kernels load and can run (a CUDA device, or a Triton interpreter that
    runs their loops), else ``(False, why not)``."""
    if _load_kernels() is None:
        return False, _import_error or "triton kernels failed to load"
    if _interpreting():  # every launch runs in the interpreter, CUDA tensors too: it must cope
        problem = _check_interpreter()
        return not problem, problem
    if torch.cuda.is_available():
        return True, ""
    return False, "no CUDA device (set TRITON_INTERPRET=1 before importing triton to run the kernels on CPU)"


def supports(device: torch.device) -> bool:
    """Whether the kernels run on ``device``: CUDA, or CPU under the Triton interpreter (``TRITON_INTERPRET=1``)."""
    device = torch.device(device)
    return device.type == "cuda" or (device.type == "cpu" and _interpreting())


# ----------------------------------------------------------------------------------------------
# Launch helpers
# ----------------------------------------------------------------------------------------------

def _tf32_matmul() -> bool:
    """torch's TF32 setting for fp32 matmuls. Read through ``fp32_precision`` where this torch has it:
    once that API has set the flag (``torch.backends.cuda.matmul.fp32_precision = "tf32"``),
    reading the legacy ``allow_tf32`` raises a RuntimeError (torch >= 2.9)."""
    matmul = torch.backends.cuda.matmul
    precision = getattr(matmul, "fp32_precision", "none")
    if precision in ("tf32", "ieee"):
        return precision == "tf32"
    return bool(matmul.allow_tf32)


@contextlib.contextmanager
def _dense_precision(dtype: torch.dtype):
    """cuDNN's fp32 convs (TF32 by default: ``torch.backends.cudnn.allow_tf32``) at the precision of the
    stripe kernels (:func:`_tf32_matmul`, IEEE by default), so that the per-shape dense hand-over
    never changes how precise an fp32 result is."""
    if dtype != torch.float32:
        yield
        return
    want = _tf32_matmul()
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


def _precision(dtype: torch.dtype):
    tl = _kernels.tl
    if dtype == torch.float64:
        return "ieee", tl.float64
    if dtype == torch.float32 and _tf32_matmul() and not _interpreting():
        return "tf32", tl.float32
    return "ieee", tl.float32


def _keys(m: int, c: int, n: int, density: float, kh: int, kw: int, stride) -> dict:
    return dict(
        KEY_M=next_pow2(max(1, m)), KEY_C=c, KEY_N=n, KEY_DENSITY=int(round(density * 8)),
        KEY_CONV=((kh * 16 + kw) * 16 + stride[0]) * 16 + stride[1],
    )


def _out_hw(h, w, kh, kw, stride, padding, dilation):
    pt, pb, pl, pr = padding
    ho = (h + pt + pb - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    wo = (w + pl + pr - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    return max(ho, 0), max(wo, 0)


def _like_input(shape, ref: Tensor, dtype=None) -> Tensor:
    """New tensor in ``ref``'s memory format (channels_last when ``ref`` is)."""
    return torch.empty(shape, dtype=dtype or ref.dtype, device=ref.device, memory_format=output_memory_format(ref))


_sm_count: dict = {}


def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 4
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _sm_count:
        _sm_count[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _sm_count[idx]


def _check_kernels():
    if _load_kernels() is None:
        raise RuntimeError(f"stripeconv backend 'triton' is not available: {_import_error}")
    return _kernels


def _dot_block(cg: int) -> int:
    """Channel block of a tensor-core tile over ``cg`` channels: the power of two from 16 to 64 that covers them."""
    return max(16, min(64, next_pow2(cg)))


def _needs_int64(*tensors: Tensor) -> bool:
    """Whether element offsets into any of ``tensors`` can exceed int32."""
    return any(_max_offset(t) >= 2**31 - 1 for t in tensors)


def _max_offset(t: Tensor) -> int:
    if t.numel() == 0:
        return 0
    if t.is_contiguous() or t.is_contiguous(memory_format=torch.channels_last):
        return t.numel() - 1  # dense: the offsets are 0 .. numel - 1
    return sum((d - 1) * abs(s) for d, s in zip(t.shape, t.stride()))


def _conv_ints(stride, padding, dilation):
    return [int(v) for v in stride], [int(v) for v in padding], [int(v) for v in dilation]


# ----------------------------------------------------------------------------------------------
# The op's kernels
# ----------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _several_gpus() -> bool:
    return torch.cuda.is_available() and torch.cuda.device_count() > 1


class _TunedLaunch:
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


# How the forward kernel stores its [pixels, filters] tile (the STORE constant): the tile's filters are
# in any channel order, and 2-byte stores scattered over a channels_last row are slow (on an H100,
# 3-4x the kernel's time); runs of consecutive channels or NCHW planes store 16-byte vectors.
STORE_SCATTER, STORE_RUNS, STORE_PLANES = 0, 1, 2


def _stripe_launcher(plan: ForwardPlan, input: Tensor, weight: Tensor, bias: Optional[Tensor], stride, padding,
                     dilation, out_hw, via_planes: bool = False,
                     split_k: int = 1) -> Callable[[Tensor, Tensor, Optional[Tensor]], Tensor]:
    """The forward on ``plan``'s tiles for every call shaped like this one (shapes, strides, dtype,
    bias or not): all launch arguments but the tensors are worked out here, once.

    A channels_last output is stored in place when ``plan`` is aligned (runs of 8 channels) and
    scattered otherwise; with ``via_planes`` the kernel writes NCHW planes and a copy makes them
    channels_last (a second pass over the output instead of scattered stores). With ``split_k`` > 1
    that many programs share each output tile's reduction and add into a zeroed channels_last buffer
    of the accumulator's dtype (the output itself for fp32 and fp64), cast to the output afterwards."""
    b, c, h, w = input.shape
    n, kh, kw = plan.mask_shape
    ho, wo = out_hw
    out_shape, out_format = (b, n, ho, wo), output_memory_format(input)
    if split_k > 1:
        store, kernel_format = (STORE_RUNS if plan.aligned else STORE_SCATTER), torch.channels_last
    elif out_format == torch.contiguous_format:
        store, kernel_format = STORE_PLANES, out_format
    elif via_planes:
        store, kernel_format = STORE_PLANES, torch.contiguous_format
    else:
        store, kernel_format = (STORE_RUNS if plan.aligned else STORE_SCATTER), out_format

    if plan.kept == 0:  # every stripe pruned: the output is the bias (and a launch would have no rows to read)
        def bias_only(input, weight, bias):
            out = torch.empty(out_shape, dtype=input.dtype, device=input.device, memory_format=out_format)
            return out.zero_() if bias is None else out.copy_(bias.view(1, n, 1, 1).expand_as(out))
        return bias_only

    cg = weight.shape[1]
    m = b * ho * wo
    bn = plan.block_n
    use_dot = bn >= 16
    block_k = _dot_block(cg) if use_dot else 1
    copy_input = not input.is_contiguous(memory_format=torch.channels_last)
    x = _meta_like(input, copy_input)
    out = torch.empty(out_shape, device="meta", memory_format=kernel_format)
    tables = (plan.tile_pos, plan.tile_npos, plan.tile_ch, plan.tile_grp, plan.w_rows)
    scalars = (b, h, w, ho, wo, cg, plan.num_tiles, plan.umax, *x.stride(), *out.stride(),
               stride[0], stride[1], padding[0], padding[2], dilation[0], dilation[1], kw)
    precision, acc = _precision(input.dtype)
    constants = dict(
        **_keys(m, c, n, plan.density, kh, kw, stride),
        HAS_BIAS=bias is not None, USE_DOT=use_dot, INPUT_PRECISION=precision, ACC_DTYPE=acc,
        EVEN_K=cg % block_k == 0, INT64_INDEX=_needs_int64(x, out, torch.empty(weight.shape, device="meta")),
        STORE=store, NPOS=kh * kw if plan.all_positions else 0, ROW_RUNS=use_dot and plan.row_runs,
        SPLIT_K=split_k, BLOCK_N=bn, BLOCK_K=block_k,
    )
    kernel = _TunedLaunch("stripe_fwd_kernel",
                          lambda meta: (triton_cdiv(m, meta["BLOCK_M"]) * plan.num_tiles, split_k),
                          constants, fixed=gpu_select.deterministic(), bound=(*tables, *scalars))
    # split-K partial sums add up in the accumulator's precision (fp64 for fp64, fp32 otherwise)
    out_dtype = None if split_k == 1 else torch.float64 if input.dtype == torch.float64 else torch.float32

    def launch(input, weight, bias):
        x = input.contiguous(memory_format=torch.channels_last) if copy_input else input
        if out_dtype is None:
            out = torch.empty(out_shape, dtype=input.dtype, device=input.device, memory_format=kernel_format)
        else:
            out = torch.empty(out_shape, dtype=out_dtype, device=input.device, memory_format=kernel_format).zero_()
        # The kernel addresses packed rows as row * CG; the bias pointer is unused without a bias.
        kernel(x, weight.contiguous(), out if bias is None else bias.contiguous(), out)
        if out_dtype is not None:
            out = out.to(input.dtype)
        return out.contiguous(memory_format=out_format)
    return launch


def _subtile_launcher(plan: SubtilePlan, input: Tensor, weight: Tensor, bias: Optional[Tensor], stride, padding,
                      dilation, out_hw) -> Callable[[Tensor, Tensor, Optional[Tensor]], Tensor]:
    """The forward over ``plan``'s groups of tiles (``stripe_fwd_sub_kernel``) for every call shaped like
    this one; stores as :func:`_stripe_launcher` does without ``via_planes`` (no split-K)."""
    b, c, h, w = input.shape
    n, kh, kw = plan.mask_shape
    ho, wo = out_hw
    out_shape, out_format = (b, n, ho, wo), output_memory_format(input)
    store = STORE_PLANES if out_format == torch.contiguous_format else STORE_RUNS if plan.aligned else STORE_SCATTER
    cg = weight.shape[1]
    m = b * ho * wo
    block_k = _dot_block(cg)
    copy_input = not input.is_contiguous(memory_format=torch.channels_last)
    x = _meta_like(input, copy_input)
    out = torch.empty(out_shape, device="meta", memory_format=out_format)
    tables = (plan.sup_pos, plan.sup_npos, plan.sup_bits, plan.sup_ch, plan.sup_grp, plan.sup_rows)
    scalars = (b, h, w, ho, wo, cg, plan.num_tiles, plan.umax, *x.stride(), *out.stride(),
               stride[0], stride[1], padding[0], padding[2], dilation[0], dilation[1], kw)
    precision, acc = _precision(input.dtype)
    constants = dict(
        **_keys(m, c, n, plan.density, kh, kw, stride),
        HAS_BIAS=bias is not None, INPUT_PRECISION=precision, ACC_DTYPE=acc, EVEN_K=cg % block_k == 0,
        INT64_INDEX=_needs_int64(x, out, torch.empty(weight.shape, device="meta")), STORE=store, SUB=plan.sub,
        BLOCK_N=plan.block_n, BLOCK_K=block_k,
    )
    kernel = _TunedLaunch("stripe_fwd_sub_kernel", lambda meta: (triton_cdiv(m, meta["BLOCK_M"]) * plan.num_tiles,),
                          constants, fixed=gpu_select.deterministic(), bound=(*tables, *scalars))

    def launch(input, weight, bias):
        x = input.contiguous(memory_format=torch.channels_last) if copy_input else input
        out = torch.empty(out_shape, dtype=input.dtype, device=input.device, memory_format=out_format)
        # The kernel addresses packed rows as row * CG; the bias pointer is unused without a bias.
        kernel(x, weight.contiguous(), out if bias is None else bias.contiguous(), out)
        return out
    return launch


# The TMA forward (stripe_fwd_tma_kernel): a program's output pixels are a TH x TW rectangle of one image,
# the box of the input descriptor. Its widths, and the pixels per program (64 where an image has fewer).
TMA_WIDTHS = (8, 16, 32, 64, 128)


def _tensor_descriptor():
    """Triton's host-side tensor descriptor (``triton.tools.tensor_descriptor``), or None where this triton has none."""
    try:
        from triton.tools.tensor_descriptor import TensorDescriptor
    except ImportError:
        return None
    return TensorDescriptor


def _tma_capable(device: torch.device) -> bool:
    """Whether ``device`` copies tensor boxes (TMA: compute capability 9.0 and later; the interpreter emulates it)."""
    if _interpreting():
        return device.type == "cpu"
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 9


def _tma_boxes(t: Tensor, row: int, groups: int, *numels: int) -> bool:
    """Whether a TMA kernel can read ``t`` (a 16-bit or fp32 tensor whose pixels hold ``row`` elements) as boxes
    of a tensor descriptor for a convolution of one group: the strides of a descriptor are 16-byte
    multiples, and every offset (``numels``) fits in int32 (the TMA kernels have no int64 variant)."""
    return (groups == 1 and t.dtype in (torch.float16, torch.bfloat16, torch.float32)
            and row * t.element_size() % 16 == 0 and max(numels) < 2**31
            and _tensor_descriptor() is not None and _tma_capable(t.device))


def _tma_offered(plan: ForwardPlan, input: Tensor, weight: Tensor, stride, groups: int, out_numel: int) -> bool:
    """Whether the TMA forward can run ``plan`` for this call: tensor-core tiles, a channels_last input that
    :func:`_tma_boxes` can read, and strides of 1 or 2; a stride of 2 where the input's extent is even (the
    descriptor's parity view), across the width with channel blocks that divide the channels (a box must not
    reach into the other column parity's channels)."""
    (sh, sw), (_, _, h, w), c = stride, input.shape, input.shape[1]
    return (plan.block_n >= 16 and plan.kept > 0 and output_memory_format(input) == torch.channels_last
            and sh in (1, 2) and sw in (1, 2) and h % sh == 0 and w % sw == 0
            and (sw == 1 or c % _dot_block(c) == 0)
            and _tma_boxes(input, c, groups, input.numel(), weight.numel(), out_numel))


def _tma_rectangle(ho: int, wo: int) -> tuple[int, int]:
    """(BLOCK_M, TW): pixels per program and the width of their TH x TW rectangle, the one that covers the
    Ho x Wo image with the fewest padding pixels (the wider on a tie: longer rows per box)."""
    block_m = 128 if ho * wo > 64 else 64

    def covered(tw):
        th = block_m // tw
        return triton_cdiv(ho, th) * th * triton_cdiv(wo, tw) * tw, -tw
    return block_m, min((tw for tw in TMA_WIDTHS if tw <= block_m), key=covered)


def _tma_launcher(plan: ForwardPlan, input: Tensor, weight: Tensor, bias: Optional[Tensor], stride, padding,
                  dilation, out_hw) -> Callable[[Tensor, Tensor, Optional[Tensor]], Tensor]:
    """The forward on ``plan``'s tiles with TMA input boxes (``stripe_fwd_tma_kernel``) for every call shaped like
    this one (:func:`_tma_offered` holds); stores as :func:`_stripe_launcher` does into a channels_last output."""
    b, c, h, w = input.shape
    n, kh, kw = plan.mask_shape
    ho, wo = out_hw
    out_shape = (b, n, ho, wo)
    block_k = _dot_block(c)
    block_m, tw = _tma_rectangle(ho, wo)
    sh, sw = stride
    box = [1, block_m // tw, 1, tw, block_k]  # of the input as [B, H/SH, SH, W/SW, SW*C]
    out = torch.empty(out_shape, device="meta", memory_format=torch.channels_last)
    tables = (plan.tile_pos, plan.tile_npos, plan.tile_ch, plan.w_rows)
    scalars = (ho, wo, c, plan.num_tiles, plan.umax, *out.stride(), padding[0], padding[2], dilation[0],
               dilation[1], kw)
    precision, acc = _precision(input.dtype)
    constants = dict(
        **_keys(b * ho * wo, c, n, plan.density, kh, kw, stride),
        HAS_BIAS=bias is not None, INPUT_PRECISION=precision, ACC_DTYPE=acc, EVEN_K=c % block_k == 0,
        STORE=STORE_RUNS if plan.aligned else STORE_SCATTER, NPOS=kh * kw if plan.all_positions else 0,
        ROW_RUNS=plan.row_runs, SH=sh, SW=sw, BLOCK_M=block_m, TW=tw, BLOCK_N=plan.block_n, BLOCK_K=block_k,
    )
    programs = b * triton_cdiv(ho, block_m // tw) * triton_cdiv(wo, tw) * plan.num_tiles
    kernel = _TunedLaunch("stripe_fwd_tma_kernel", (programs,), constants, fixed=gpu_select.deterministic(),
                          bound=(*tables, *scalars))
    descriptor = _tensor_descriptor()

    def launch(input, weight, bias):
        x = input
        if not x.is_contiguous(memory_format=torch.channels_last) or x.data_ptr() % 16:
            x = x.clone(memory_format=torch.channels_last)  # a descriptor's base is 16-byte aligned
        x_desc = descriptor(x, [b, h // sh, sh, w // sw, sw * c],
                            [x.stride(0), sh * x.stride(2), x.stride(2), sw * x.stride(3), 1], box)
        out = torch.empty(out_shape, dtype=input.dtype, device=input.device, memory_format=torch.channels_last)
        # The kernel addresses packed rows as row * CG; the bias pointer is unused without a bias.
        kernel(weight.contiguous(), x_desc, out if bias is None else bias.contiguous(), out)
        return out
    return launch


# The forward's split-K candidate: where few output pixels leave most multiprocessors idle
# (batch 1, late CIFAR layers), several programs share each output tile's reduction.
SPLIT_K_MAX = 8


def _split_k(plan: ForwardPlan, m: int, cg: int, sms: int) -> int:
    """Splits of each tile's reduction that bring the forward's programs (at 64-pixel blocks) to about
    two per multiprocessor, each split keeping at least 4 iterations of BLOCK_K channels; 1 where the
    programs fill the GPU already or the reduction is short. A power of two (2, 4 or 8): each count
    is a compiled variant of the kernel."""
    programs = triton_cdiv(m, 64) * plan.num_tiles
    iterations = plan.umax * triton_cdiv(cg, _dot_block(cg))
    split = max(1, min(SPLIT_K_MAX, triton_cdiv(2 * sms, programs), iterations // 4))
    return 1 << (split.bit_length() - 1)


def _symmetric(padding) -> bool:
    return padding[0] == padding[1] and padding[2] == padding[3]


def _select_key(op: str, *tensors: Tensor, extra: tuple = ()) -> tuple:
    return (op, *[(tuple(t.shape), t.dtype, t.is_contiguous(memory_format=torch.channels_last), str(t.device))
                  for t in tensors], *extra)


def _dense_launcher(mask: Tensor, stride, padding, dilation, groups: int, device) -> Callable:
    """cuDNN's dense conv on the packed rows scattered into a dense weight."""
    def launch(input, weight, bias):
        w_dense = _dense_weight(weight, mask, device)
        with _dense_precision(input.dtype):
            return F.conv2d(input, w_dense, bias, stride, (padding[0], padding[2]), dilation, groups)
    return launch


# Settled calls: per call signature (op, shapes, strides, dtypes, mask version, conv geometry and
# the settings the choice depends on), what the call runs, worked out once: tile plan, stripe /
# dense choice and every launch argument but the tensors. A batch-1 layer's kernels take ~10 us,
# so the host work of a call matters. Each entry holds its mask, whose data_ptr is in the key, so
# that no other mask can take that address while the entry exists.
_SETTLED_SIZE = 1024
_settled: dict[tuple, tuple[Tensor, Callable]] = {}


def clear_cache() -> None:
    """Drop all cached mask metadata (:func:`.triton_plans.clear_cache`), kept dense weights and settled calls."""
    global _last_gather
    triton_plans.clear_cache()
    _dense_weights.clear()
    _settled.clear()
    _last_gather = None


def _call_key(op: str, mask: Tensor, tensors: tuple, extra: tuple) -> tuple:
    # The TF32 setting changes only fp32 launches (and costs ~1.5 us to read).
    tf32 = _tf32_matmul() if tensors[0].dtype == torch.float32 else None
    return (op, *[(t.shape, t.stride(), t.dtype, t.device) for t in tensors], mask.data_ptr(), mask._version,
            mask.shape, *extra, gpu_select.mode(), gpu_select.excluded(), gpu_select.deterministic(),
            gpu_select.generation(), tf32)


def _run_chosen(key: tuple, mask: Tensor, launchers: dict[str, Callable], select_key: tuple, args: tuple, device):
    """Run the launcher :mod:`.gpu_select` picks for ``select_key``; remember it for ``key`` once settled."""
    candidates = {name: functools.partial(launch, *args) for name, launch in launchers.items()}
    name, settled = gpu_select.choice(select_key, candidates, device)
    if settled:
        if len(_settled) >= _SETTLED_SIZE:
            _settled.clear()
        _settled[key] = (mask, launchers[name])
    return launchers[name](*args)


def forward(
    input: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    mask: Tensor,
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    groups: int,
) -> Tensor:
    """The op's forward: the fastest of the stripe kernels (one per offered tile width) and cuDNN's
    dense conv on the scattered weight, as :mod:`.gpu_select` picks per shape."""
    key = _call_key("fwd", mask, (input,), (weight.shape, bias is None, tuple(stride), tuple(padding),
                                            tuple(dilation), groups, getenv("STRIPECONV_TRITON_BLOCK_N")))
    settled = _settled.get(key)
    if settled is not None:
        return settled[1](input, weight, bias)
    _check_kernels()
    stride, padding, dilation = _conv_ints(stride, padding, dilation)
    b, c, h, w = input.shape
    n, kh, kw = mask.shape
    ho, wo = _out_hw(h, w, kh, kw, stride, padding, dilation)
    if b * n * ho * wo == 0:
        return _like_input((b, n, ho, wo), input)
    device = input.device
    launchers, counts = {}, []
    channels_last = output_memory_format(input) == torch.channels_last
    for plan in forward_plans(mask, groups, device):
        counts.append((plan.block_n, plan.kept, plan.computed, plan.aligned))
        name = f"stripe{plan.block_n}" + ("_aligned" if plan.aligned else "")
        launchers[name] = _stripe_launcher(plan, input, weight, bias, stride, padding, dilation, (ho, wo))
        if channels_last and not plan.aligned:
            launchers[name + "_planes"] = _stripe_launcher(plan, input, weight, bias, stride, padding, dilation,
                                                           (ho, wo), via_planes=True)
        if subtile_count(plan, groups) > 1:
            sub = subtile_plan(plan, mask, groups, device)
            launchers[f"stripe{plan.block_n}x{sub.sub}" + ("_aligned" if sub.aligned else "")] = _subtile_launcher(
                sub, input, weight, bias, stride, padding, dilation, (ho, wo))
        if _tma_offered(plan, input, weight, stride, groups, b * n * ho * wo):
            launchers[name + "_tma"] = _tma_launcher(plan, input, weight, bias, stride, padding, dilation, (ho, wo))
        split = _split_k(plan, b * ho * wo, c // groups, _num_sms(device))
        if split > 1 and plan.block_n >= 16 and plan.kept and not gpu_select.deterministic():
            launchers[name + "_splitk"] = _stripe_launcher(plan, input, weight, bias, stride, padding, dilation,
                                                           (ho, wo), split_k=split)
    if _symmetric(padding):
        launchers["dense"] = _dense_launcher(mask, stride, padding, dilation, groups, device)
    select_key = _select_key("fwd", input, weight, extra=(bias is not None, tuple(stride), tuple(padding),
                                                           tuple(dilation), groups, tuple(counts)))
    return _run_chosen(key, mask, launchers, select_key, (input, weight, bias), device)


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _use_dot_backward(cg: int, ng: int) -> bool:
    return cg >= 16 and ng >= 16


def _meta_like(t: Tensor, copy_to_nhwc: bool) -> Tensor:
    """What a launch will see of ``t``: ``t`` itself, or (meta, no memory) its channels_last copy.

    The kernels read NHWC tiles (channels contiguous, vector loads); strided NCHW gathers cost more
    registers than they are worth, so NCHW operands are copied once per call. Outputs keep the
    caller's memory format."""
    return torch.empty(t.shape, device="meta", memory_format=torch.channels_last) if copy_to_nhwc else t


def grad_input(
    grad_output: Tensor,
    weight: Tensor,
    mask: Tensor,
    input_shape: Sequence[int],
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    groups: int,
) -> Tensor:
    """Gradient of the forward with respect to its input, of shape ``input_shape`` in ``grad_output``'s
    memory format: the stripe kernel or cuDNN's dense grad input, as :mod:`.gpu_select` picks per shape."""
    key = _call_key("dgrad", mask, (grad_output,), (weight.shape, tuple(input_shape), tuple(stride), tuple(padding),
                                                   tuple(dilation), groups))
    settled = _settled.get(key)
    if settled is not None:
        return settled[1](grad_output, weight)
    _check_kernels()
    stride, padding, dilation = _conv_ints(stride, padding, dilation)
    input_shape = [int(v) for v in input_shape]
    device = grad_output.device
    launchers = {"stripe": _grad_input_launcher(grad_output, weight, mask, input_shape, stride, padding, dilation,
                                                groups)}
    tiles = _backward_tiles(mask, weight, input_shape[1], groups, stride, padding, dilation, device)
    if tiles is not None and grad_output.numel() and math.prod(input_shape):
        launchers["stripe_tiles"] = _grad_input_tiles_launcher(tiles, grad_output, weight, input_shape, stride,
                                                                groups)
        if _tma_dy_offered(tiles, grad_output, weight, input_shape, stride, groups):
            launchers["stripe_tiles_tma"] = _grad_input_tiles_tma_launcher(tiles, grad_output, weight, input_shape)
    if _symmetric(padding) and grad_output.numel() and math.prod(input_shape):
        def dense(grad_output, weight):
            w_dense = _dense_weight(weight, mask, device)
            with _dense_precision(grad_output.dtype):
                dx = torch.nn.grad.conv2d_input(input_shape, w_dense, grad_output, stride, (padding[0], padding[2]),
                                                dilation, groups)
            return dx.contiguous(memory_format=output_memory_format(grad_output))
        launchers["dense"] = dense
    select_key = _select_key("dgrad", grad_output, weight, extra=(tuple(input_shape), tuple(stride), tuple(padding),
                                                                  tuple(dilation), groups))
    return _run_chosen(key, mask, launchers, select_key, (grad_output, weight), device)


def _grad_input_launcher(grad_output, weight, mask, input_shape, stride, padding, dilation, groups) -> Callable:
    """Grad input by the stripe kernel for every call shaped like this one: ``launch(grad_output, weight)``."""
    b, c, h, w = input_shape
    n, kh, kw = mask.shape
    cg, ng = c // groups, n // groups
    ho, wo = grad_output.shape[2:]
    dx_shape, dx_format = (b, c, h, w), output_memory_format(grad_output)
    if math.prod(dx_shape) == 0 or grad_output.numel() == 0 or weight.shape[0] == 0:
        def no_work(grad_output, weight):
            dx = torch.empty(dx_shape, dtype=grad_output.dtype, device=grad_output.device, memory_format=dx_format)
            return dx.zero_() if dx.numel() else dx
        return no_work
    use_dot = _use_dot_backward(cg, ng)
    block_n = _dot_block(cg) if use_dot else min(16, next_pow2(cg))
    block_k = 32 if use_dot else 1
    # The scalar path walks the rows of a chunk one by one: one chunk per (phase, position, group).
    chunk = block_k if use_dot else 1 << 30
    conv = (tuple(stride), (padding[0], padding[2]), tuple(dilation))
    plan = cached_plan("dgrad", mask, groups, chunk, grad_output.device, conv)
    ncb = triton_cdiv(cg, block_n)
    sh, sw = stride
    mp_max = b * triton_cdiv(h, sh) * triton_cdiv(w, sw)
    copy_dy = not grad_output.is_contiguous(memory_format=torch.channels_last)
    dy = _meta_like(grad_output, copy_dy)
    # Computed in NHWC (strided NCHW stores of the gathered tiles spill) and copied once if needed.
    dx = torch.empty(dx_shape, device="meta", memory_format=torch.channels_last)
    tables = (plan.chunk_off, plan.chunk_r0, plan.chunk_r1, plan.chunk_dh, plan.chunk_dw, plan.filt)
    scalars = (b, h, w, ho, wo, cg, groups, ncb, *dy.stride(), *dx.stride(), sh, sw)
    precision, acc = _precision(grad_output.dtype)
    constants = dict(
        **_keys(b * h * w, c, n, plan.density, kh, kw, stride),
        USE_DOT=use_dot, INPUT_PRECISION=precision, ACC_DTYPE=acc,
        INT64_INDEX=_needs_int64(dy, torch.empty(weight.shape, device="meta"), dx),
        BLOCK_N=block_n, BLOCK_K=block_k,
    )
    kernel = _TunedLaunch("stripe_dgrad_kernel",
                          lambda meta: (triton_cdiv(mp_max, meta["BLOCK_M"]) * groups * ncb, sh * sw), constants,
                          fixed=gpu_select.deterministic(), bound=(*tables, *scalars))

    def launch(grad_output, weight):
        dy = grad_output.contiguous(memory_format=torch.channels_last) if copy_dy else grad_output
        dx = torch.empty(dx_shape, dtype=dy.dtype, device=dy.device, memory_format=torch.channels_last)
        # The kernel addresses packed rows as row * CG.
        kernel(dy, weight.contiguous(), dx)
        return dx if dx_format == torch.channels_last else dx.contiguous(memory_format=dx_format)
    return launch


def grad_weight(
    grad_output: Tensor,
    input: Tensor,
    weight: Tensor,
    mask: Tensor,
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    groups: int,
) -> Tensor:
    """Gradient of the forward with respect to the packed rows ``weight`` (same shape and dtype): the
    stripe kernel or cuDNN's dense grad weight gathered back to the rows, as :mod:`.gpu_select` picks per shape."""
    key = _call_key("wgrad", mask, (grad_output, input), (weight.shape, weight.dtype, tuple(stride), tuple(padding),
                                                          tuple(dilation), groups))
    settled = _settled.get(key)
    if settled is not None:
        return settled[1](grad_output, input, weight)
    _check_kernels()
    deterministic = gpu_select.deterministic()
    stride, padding, dilation = _conv_ints(stride, padding, dilation)
    device = input.device
    launchers = {"stripe": _grad_weight_launcher(grad_output, input, weight, mask, stride, padding, dilation, groups,
                                                 deterministic)}
    tiles = _backward_tiles(mask, weight, input.shape[1], groups, stride, padding, dilation, device)
    if tiles is not None and not deterministic and grad_output.numel() and input.numel():
        launchers["stripe_tiles"] = _grad_weight_tiles_launcher(tiles, grad_output, input, weight, stride, padding,
                                                                dilation)
        if _tma_wgrad_offered(tiles, grad_output, input, weight, stride, groups):
            launchers["stripe_tiles_tma"] = _grad_weight_tiles_tma_launcher(tiles, grad_output, input, weight, stride,
                                                                            padding, dilation)
    if _symmetric(padding) and weight.shape[0] and grad_output.numel() and input.numel():
        n, kh, kw = mask.shape

        def dense(grad_output, input, weight):
            with _dense_precision(input.dtype):
                dw = torch.nn.grad.conv2d_weight(input, (n, weight.shape[1], kh, kw), grad_output, stride,
                                                 (padding[0], padding[2]), dilation, groups)
            gather = cached_plan("dense", mask, 1, 0, device).gather
            return dw.permute(0, 2, 3, 1).reshape(-1, weight.shape[1]).index_select(0, gather).to(weight.dtype)
        launchers["dense"] = dense
    select_key = _select_key("wgrad", grad_output, input, weight, extra=(tuple(stride), tuple(padding),
                                                                         tuple(dilation), groups, deterministic))
    return _run_chosen(key, mask, launchers, select_key, (grad_output, input, weight), device)


def _grad_weight_launcher(grad_output, input, weight, mask, stride, padding, dilation, groups,
                          deterministic: bool) -> Callable:
    """Grad weight by the stripe kernel for every call shaped like this one: ``launch(grad_output, input, weight)``."""
    b, c, h, w = input.shape
    n, kh, kw = mask.shape
    cg, ng = c // groups, n // groups
    ho, wo = grad_output.shape[2:]
    s = weight.shape[0]
    m = b * ho * wo
    if s == 0 or cg == 0 or m == 0:
        return lambda grad_output, input, weight: torch.zeros_like(weight, memory_format=torch.contiguous_format)
    use_dot = _use_dot_backward(cg, ng)
    block_r = 64 if use_dot else min(4, next_pow2(ng))
    plan = cached_plan("wgrad", mask, groups, block_r, input.device)
    block_c = _dot_block(cg) if use_dot else min(4, next_pow2(cg))
    ncb = triton_cdiv(cg, block_c)
    tiles = plan.num_blocks * ncb
    acc_torch = torch.float64 if weight.dtype == torch.float64 else torch.float32
    # Split-K over pixels so that the grid fills the GPU (>= ~4 programs per SM).
    target = 4 * _num_sms(input.device)
    split = max(1, min(triton_cdiv(target, max(1, tiles)), triton_cdiv(m, 512)))
    if deterministic:  # bound the partial buffers to ~256 MiB
        split = max(1, min(split, (256 << 20) // max(1, s * cg * 4)))
    chunk = triton_cdiv(triton_cdiv(m, split), 256) * 256
    split = triton_cdiv(m, chunk)
    atomic = split > 1 and not deterministic
    # Atomics add into one zeroed fp32 buffer; several splits without them write a slice each, summed
    # below; a single split writes every row once, in the weight's dtype (no zeroing, no cast after).
    if atomic:
        buf_shape, buf_dtype, zeroed = (s, cg), acc_torch, True
    elif split == 1:
        buf_shape, buf_dtype, zeroed = (s, cg), weight.dtype, False
    else:
        buf_shape, buf_dtype, zeroed = (split, s, cg), acc_torch, False
    copy_dy = not grad_output.is_contiguous(memory_format=torch.channels_last)
    copy_x = not input.is_contiguous(memory_format=torch.channels_last)
    dy, x = _meta_like(grad_output, copy_dy), _meta_like(input, copy_x)
    tables = (plan.blk_pos, plan.blk_r0, plan.blk_r1, plan.blk_grp, plan.filt)
    scalars = (b, h, w, ho, wo, cg, ncb, chunk, s * cg, *dy.stride(), *x.stride(),
               stride[0], stride[1], padding[0], padding[2], dilation[0], dilation[1], kw)
    precision, acc = _precision(input.dtype)
    constants = dict(
        **_keys(m, c, n, plan.density, kh, kw, stride),
        ATOMIC=atomic, USE_DOT=use_dot, INPUT_PRECISION=precision, ACC_DTYPE=acc,
        INT64_INDEX=_needs_int64(dy, x, torch.empty(buf_shape, device="meta")),
        BLOCK_R=block_r, BLOCK_C=block_c,
    )
    kernel = _TunedLaunch("stripe_wgrad_kernel", (tiles, split), constants, fixed=deterministic,
                          bound=(*tables, *scalars))

    def launch(grad_output, input, weight):
        dy = grad_output.contiguous(memory_format=torch.channels_last) if copy_dy else grad_output
        x = input.contiguous(memory_format=torch.channels_last) if copy_x else input
        buf = (torch.zeros if zeroed else torch.empty)(buf_shape, dtype=buf_dtype, device=weight.device)
        kernel(dy, x, buf)
        if buf.dim() == 3:
            buf = buf.sum(0)
        return buf.to(weight.dtype)
    return launch


# ---- the backward over the forward's filter tiles ------------------------------------------------
# The kernels above spend no work on pruned stripes, but read dy through a table of filters: 2-byte
# loads that do not vectorise (on an H100, grad input took ~5x cuDNN's whole backward). These gather
# dy into the forward's tile order once per call, then load contiguous rows, and compute the stripes
# of each tile's position union (the forward's tile efficiency). Both are timed candidates.

def _backward_tiles(mask: Tensor, weight: Tensor, c: int, groups: int, stride, padding, dilation,
                    device) -> Optional[TilesBackwardPlan]:
    """The tile plan of the forward's width that computes the fewest stripes (one whose tiles are runs
    of channels, which reads dy in place, where it computes at most 5 % more), or None where the
    tiles are too narrow for tensor cores (or there is nothing to compute)."""
    n = mask.shape[0]
    if weight.shape[0] == 0 or not _use_dot_backward(c // groups, n // groups):
        return None
    plans = forward_plans(mask, groups, device)
    best = min(plans, key=lambda p: p.computed)
    runs = [p for p in plans if p.runs and p.computed <= 1.05 * best.computed]
    best = min(runs, key=lambda p: p.computed) if runs else best
    if best.block_n < 16:
        return None
    conv = (tuple(stride), (padding[0], padding[2]), tuple(dilation), best.in_order)
    return cached_plan("bwd_tiles", mask, groups, best.block_n, device, conv)


def _dy_layout(plan: TilesBackwardPlan, grad_output: Tensor) -> tuple[bool, Tensor, tuple, Tensor]:
    """How the tile kernels read dy: (in place, first column of each tile, dy's [b, c, h, w] strides, a
    tensor shaped like what they read). In place where every tile is a run of consecutive channels
    (filters in :func:`~.triton_plans.filter_order`, e.g. after :func:`stripeconv.reorder_filters`) and
    a pixel's channels are contiguous; otherwise a copy gathered into tile order (:func:`_gather_dy`)."""
    if plan.fwd.runs and grad_output.is_contiguous(memory_format=torch.channels_last):
        return True, plan.col0, tuple(grad_output.stride()), grad_output
    b, _, ho, wo = grad_output.shape
    ncol = plan.cols.numel()
    return False, plan.gathered_col0, (ho * wo * ncol, 1, wo * ncol, ncol), torch.empty(b * ho * wo, ncol,
                                                                                         device="meta")


# A backward's two tile kernels read the same gathered dy: grad input gathers it and leaves it here,
# grad weight takes it (matched by the very tensor, its version and the plan), so it is gathered once.
_last_gather: Optional[tuple] = None


def _gathered_dy(grad_output: Tensor, plan: TilesBackwardPlan, keep: bool, gather: "_DyGather") -> Tensor:
    """dy in tile order: the copy grad input left for the same ``grad_output`` and plan, or a new
    gather (left for grad weight when ``keep``)."""
    global _last_gather
    hit, _last_gather = _last_gather, None
    if hit is not None and hit[0] is grad_output and hit[1] == grad_output._version and hit[2] is plan:
        return hit[3]
    dyt = _gather_dy(grad_output, gather)
    if keep:
        _last_gather = (grad_output, grad_output._version, plan, dyt)
    return dyt


def _gather_dy(grad_output: Tensor, gather: "_DyGather") -> Tensor:
    """Every gather of dy into tile order goes through here."""
    return gather(grad_output)


class _DyGather:
    """dy as [pixels, T * BLOCK_T], its columns in the forward's tile order of ``plan`` and zeros for
    padding, for every dy shaped like ``grad_output``: ``gather(grad_output)``."""

    def __init__(self, plan: TilesBackwardPlan, grad_output: Tensor):
        b, _, ho, wo = grad_output.shape
        self.shape = (b * ho * wo, plan.cols.numel())
        m, ncol = self.shape
        self.kernel = _TunedLaunch(
            "stripe_gather_columns_kernel", (triton_cdiv(m, 64), triton_cdiv(ncol, 64)),
            dict(INT64_INDEX=_needs_int64(grad_output, torch.empty(self.shape, device="meta")), BLOCK_M=64, BLOCK_N=64),
            bound=(plan.cols, m, ho, wo, ncol, *grad_output.stride()))

    def __call__(self, grad_output: Tensor) -> Tensor:
        dyt = torch.empty(self.shape, dtype=grad_output.dtype, device=grad_output.device)
        self.kernel(grad_output, dyt)
        return dyt


def _grad_input_tiles_launcher(plan: TilesBackwardPlan, grad_output, weight, input_shape, stride,
                               groups: int) -> Callable:
    """Grad input over the forward's tiles for every call shaped like this one: ``launch(grad_output, weight)``."""
    b, c, h, w = input_shape
    fwd = plan.fwd
    n, kh, kw = fwd.mask_shape
    cg = c // groups
    ho, wo = grad_output.shape[2:]
    dx_shape, dx_format = (b, c, h, w), output_memory_format(grad_output)
    block_n = _dot_block(cg)
    ncb = triton_cdiv(cg, block_n)
    sh, sw = stride
    mp_max = b * triton_cdiv(h, sh) * triton_cdiv(w, sw)
    dx = torch.empty(dx_shape, device="meta", memory_format=torch.channels_last)
    in_place, col0, dy_strides, dy = _dy_layout(plan, grad_output)
    gather = None if in_place else _DyGather(plan, grad_output)
    tables = (fwd.w_rows, col0, plan.ent_off, plan.ent_t, plan.ent_u, plan.ent_dh, plan.ent_dw)
    scalars = (b, h, w, ho, wo, cg, groups, ncb, fwd.umax, *dy_strides, *dx.stride(), sh, sw)
    precision, acc = _precision(grad_output.dtype)
    constants = dict(
        **_keys(b * h * w, c, n, fwd.density, kh, kw, stride),
        INPUT_PRECISION=precision, ACC_DTYPE=acc,
        INT64_INDEX=_needs_int64(dy, torch.empty(weight.shape, device="meta"), dx), ROW_RUNS=fwd.row_runs,
        BLOCK_N=block_n, BLOCK_T=fwd.block_n,
    )
    kernel = _TunedLaunch("stripe_dgrad_tiles_kernel",
                          lambda meta: (triton_cdiv(mp_max, meta["BLOCK_M"]) * groups * ncb, sh * sw), constants,
                          bound=(*tables, *scalars))

    def launch(grad_output, weight):
        dy = grad_output if in_place else _gathered_dy(grad_output, plan, True, gather)
        dx = torch.empty(dx_shape, dtype=dy.dtype, device=dy.device, memory_format=torch.channels_last)
        kernel(dy, weight.contiguous(), dx)
        return dx if dx_format == torch.channels_last else dx.contiguous(memory_format=dx_format)
    return launch


def _tma_dy_offered(plan: TilesBackwardPlan, grad_output: Tensor, weight: Tensor, input_shape, stride,
                    groups: int) -> bool:
    """Whether the TMA grad input is offered for this call: stride 1, one group, dy (read in place, or gathered
    into tile order) that :func:`_tma_boxes` can read, and tiles of 64 filters or more over 64 or more input
    channels. Narrower ones compile to longer loops than ``stripe_dgrad_tiles_kernel``'s (sm_90, triton 3.6,
    8 warps: 112 / 125 SASS instructions against 95 / 117 for 16- / 32-filter tiles; 141 / 173 against
    158 / 249 for 64- / 128-filter tiles), and the product is taken transposed only from 64 channels on."""
    in_place, _, _, dy = _dy_layout(plan, grad_output)
    row = grad_output.shape[1] if in_place else plan.cols.numel()
    return (plan.fwd.block_n >= 64 and _dot_block(input_shape[1]) >= 64 and tuple(stride) == (1, 1)
            and _tma_boxes(grad_output, row, groups, dy.numel(), weight.numel(), math.prod(input_shape)))


def _grad_input_tiles_tma_launcher(plan: TilesBackwardPlan, grad_output: Tensor, weight: Tensor,
                                   input_shape) -> Callable:
    """Grad input over the forward's tiles with TMA boxes of dy (``stripe_dgrad_tiles_tma_kernel``) for every
    call shaped like this one (:func:`_tma_dy_offered` holds): ``launch(grad_output, weight)``."""
    b, c, h, w = input_shape
    fwd = plan.fwd
    n, kh, kw = fwd.mask_shape
    ho, wo = grad_output.shape[2:]
    dx_shape, dx_format = (b, c, h, w), output_memory_format(grad_output)
    block_n = _dot_block(c)
    ncb = triton_cdiv(c, block_n)
    block_m, tw = _tma_rectangle(h, w)
    in_place, col0, _, _ = _dy_layout(plan, grad_output)
    gather = None if in_place else _DyGather(plan, grad_output)
    row = n if in_place else plan.cols.numel()
    box = [1, block_m // tw, tw, fwd.block_n]
    dx = torch.empty(dx_shape, device="meta", memory_format=torch.channels_last)
    tables = (fwd.w_rows, col0, plan.ent_t, plan.ent_u, plan.ent_dh, plan.ent_dw)
    scalars = (h, w, c, ncb, fwd.umax, plan.ent_t.numel(), *dx.stride())
    precision, acc = _precision(grad_output.dtype)
    constants = dict(
        **_keys(b * h * w, c, n, fwd.density, kh, kw, (1, 1)),
        INPUT_PRECISION=precision, ACC_DTYPE=acc, ROW_RUNS=fwd.row_runs,
        BLOCK_M=block_m, TW=tw, BLOCK_N=block_n, BLOCK_T=fwd.block_n,
    )
    programs = b * triton_cdiv(h, block_m // tw) * triton_cdiv(w, tw) * ncb
    kernel = _TunedLaunch("stripe_dgrad_tiles_tma_kernel", (programs,), constants, fixed=gpu_select.deterministic(),
                          bound=(*tables, *scalars))
    descriptor = _tensor_descriptor()

    def launch(grad_output, weight):
        if in_place:
            dy = grad_output
            if dy.data_ptr() % 16:
                dy = dy.clone(memory_format=torch.channels_last)  # a descriptor's base is 16-byte aligned
            dy_desc = descriptor(dy, [b, ho, wo, row], [dy.stride(0), dy.stride(2), dy.stride(3), 1], box)
        else:
            dy = _gathered_dy(grad_output, plan, True, gather)  # [pixels, columns], freshly allocated
            dy_desc = descriptor(dy, [b, ho, wo, row], [ho * wo * row, wo * row, row, 1], box)
        dx = torch.empty(dx_shape, dtype=grad_output.dtype, device=grad_output.device,
                         memory_format=torch.channels_last)
        kernel(dy_desc, weight.contiguous(), dx)
        return dx if dx_format == torch.channels_last else dx.contiguous(memory_format=dx_format)
    return launch


def _grad_weight_tiles_launcher(plan: TilesBackwardPlan, grad_output, input, weight, stride, padding,
                                dilation) -> Callable:
    """Grad weight over the forward's tiles for every call shaped like this one: ``launch(grad_output, input,
    weight)``; split-K partial sums are added atomically (so it is not offered in deterministic mode),
    a single split stores each row once."""
    b, c, h, w = input.shape
    fwd = plan.fwd
    n, kh, kw = fwd.mask_shape
    cg = weight.shape[1]
    ho, wo = grad_output.shape[2:]
    s, m = weight.shape[0], b * ho * wo
    block_c = _dot_block(cg)
    ncb = triton_cdiv(cg, block_c)
    programs = plan.num_all * ncb
    split, chunk = _wgrad_split(programs, m, input.device, 256)
    acc_torch = torch.float64 if weight.dtype == torch.float64 else torch.float32
    copy_x = not input.is_contiguous(memory_format=torch.channels_last)
    x = _meta_like(input, copy_x)
    in_place, col0, dy_strides, dy = _dy_layout(plan, grad_output)
    gather = None if in_place else _DyGather(plan, grad_output)
    tables = (fwd.w_rows, col0, plan.all_t, plan.all_u, fwd.tile_pos, fwd.tile_grp)
    scalars = (b, h, w, ho, wo, cg, ncb, fwd.umax, chunk, *dy_strides, *x.stride(),
               stride[0], stride[1], padding[0], padding[2], dilation[0], dilation[1], kw)
    precision, acc = _precision(input.dtype)
    # One split writes each kept row once, in the weight's dtype; several add into a zeroed fp32 buffer.
    atomic = split > 1
    buf_dtype = acc_torch if atomic else weight.dtype
    constants = dict(
        **_keys(m, c, n, fwd.density, kh, kw, stride),
        ATOMIC=atomic, INPUT_PRECISION=precision, ACC_DTYPE=acc,
        INT64_INDEX=_needs_int64(dy, x, torch.empty((s, cg), device="meta")),
        BLOCK_T=fwd.block_n, BLOCK_C=block_c,
    )
    kernel = _TunedLaunch("stripe_wgrad_tiles_kernel", (programs, split), constants, bound=(*tables, *scalars))

    def launch(grad_output, input, weight):
        dy = grad_output if in_place else _gathered_dy(grad_output, plan, False, gather)
        x = input.contiguous(memory_format=torch.channels_last) if copy_x else input
        buf = (torch.zeros if atomic else torch.empty)((s, cg), dtype=buf_dtype, device=weight.device)
        kernel(dy, x, buf)
        return buf.to(weight.dtype)
    return launch


def _wgrad_split(programs: int, pixels: int, device, granule: int) -> tuple[int, int]:
    """(split, chunk): split-K over ``pixels`` (in chunks of ``granule``) that brings grad weight's grid of
    ``programs`` to ~4 programs per multiprocessor, each split reducing over at least ~512 pixels."""
    split = max(1, min(triton_cdiv(4 * _num_sms(device), max(1, programs)), triton_cdiv(pixels, 512)))
    chunk = triton_cdiv(triton_cdiv(pixels, split), granule) * granule
    return triton_cdiv(pixels, chunk), chunk


def _tma_wgrad_offered(plan: TilesBackwardPlan, grad_output: Tensor, input: Tensor, weight: Tensor, stride,
                       groups: int) -> bool:
    """Whether the TMA grad weight is offered for this call: one group, strides of 1 or 2 (an even input extent
    where 2: the forward's parity view), and dy (in place or gathered) and x that :func:`_tma_boxes` can read.
    A channel block may reach past the input's channels (into the other column parity's at stride 2): those
    rows of the product are not stored."""
    (sh, sw), (_, c, h, w) = stride, input.shape
    in_place, _, _, dy = _dy_layout(plan, grad_output)
    row = grad_output.shape[1] if in_place else plan.cols.numel()
    return (sh in (1, 2) and sw in (1, 2) and h % sh == 0 and w % sw == 0
            and _tma_boxes(grad_output, row, groups, dy.numel(), weight.numel())
            and _tma_boxes(input, c, groups, input.numel()))


def _grad_weight_tiles_tma_launcher(plan: TilesBackwardPlan, grad_output: Tensor, input: Tensor, weight: Tensor,
                                    stride, padding, dilation) -> Callable:
    """Grad weight over the forward's tiles with TMA boxes of dy and x (``stripe_wgrad_tiles_tma_kernel``) for
    every call shaped like this one (:func:`_tma_wgrad_offered` holds): ``launch(grad_output, input, weight)``;
    split-K partial sums are added atomically, a single split stores each row once."""
    b, c, h, w = input.shape
    fwd = plan.fwd
    n, kh, kw = fwd.mask_shape
    ho, wo = grad_output.shape[2:]
    s = weight.shape[0]
    sh, sw = stride
    block_c = _dot_block(c)
    ncb = triton_cdiv(c, block_c)
    block_m, tw = _tma_rectangle(ho, wo)
    rectangles = b * triton_cdiv(ho, block_m // tw) * triton_cdiv(wo, tw)
    split, chunk = _wgrad_split(plan.num_all * ncb, rectangles * block_m, input.device, block_m)
    chunk //= block_m
    in_place, col0, _, _ = _dy_layout(plan, grad_output)
    gather = None if in_place else _DyGather(plan, grad_output)
    row = n if in_place else plan.cols.numel()
    # Rectangles of whole rows are runs of consecutive pixels: dy's tiles are boxes of dy as [pixels, row].
    dy_rows = tw == wo and ho % (block_m // tw) == 0
    dy_shape, dy_box = ([b * ho * wo, row], [block_m, fwd.block_n]) if dy_rows else (
        [b, ho, wo, row], [1, block_m // tw, tw, fwd.block_n])
    x_box = [1, block_m // tw, 1, tw, block_c]  # of the input as [B, H/SH, SH, W/SW, SW*C], as in the forward
    tables = (fwd.w_rows, col0, plan.all_t, plan.all_u, fwd.tile_pos)
    scalars = (ho, wo, c, ncb, fwd.umax, chunk, rectangles, padding[0], padding[2], dilation[0], dilation[1], kw)
    precision, acc = _precision(input.dtype)
    atomic = split > 1
    buf_dtype = (torch.float64 if weight.dtype == torch.float64 else torch.float32) if atomic else weight.dtype
    constants = dict(
        **_keys(b * ho * wo, c, n, fwd.density, kh, kw, stride),
        ATOMIC=atomic, INPUT_PRECISION=precision, ACC_DTYPE=acc, SH=sh, SW=sw, DY_ROWS=dy_rows,
        BLOCK_M=block_m, TW=tw, BLOCK_T=fwd.block_n, BLOCK_C=block_c,
    )
    kernel = _TunedLaunch("stripe_wgrad_tiles_tma_kernel", (plan.num_all * ncb, split), constants,
                          bound=(*tables, *scalars))
    descriptor = _tensor_descriptor()

    def launch(grad_output, input, weight):
        if in_place:
            dy = grad_output
            if dy.data_ptr() % 16:
                dy = dy.clone(memory_format=torch.channels_last)  # a descriptor's base is 16-byte aligned
        else:
            dy = _gathered_dy(grad_output, plan, False, gather)  # [pixels, columns]
        pixel = dy.stride(3) if in_place else row
        dy_strides = [pixel, 1] if dy_rows else [ho * wo * pixel, wo * pixel, pixel, 1]
        dy_desc = descriptor(dy, dy_shape, dy_strides, dy_box)
        x = input
        if not x.is_contiguous(memory_format=torch.channels_last) or x.data_ptr() % 16:
            x = x.clone(memory_format=torch.channels_last)
        x_desc = descriptor(x, [b, h // sh, sh, w // sw, sw * c],
                            [x.stride(0), sh * x.stride(2), x.stride(2), sw * x.stride(3), 1], x_box)
        buf = (torch.zeros if atomic else torch.empty)((s, c), dtype=buf_dtype, device=weight.device)
        kernel(dy_desc, x_desc, buf)
        return buf.to(weight.dtype)
    return launch
