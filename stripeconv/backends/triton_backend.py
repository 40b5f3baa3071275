"""Triton GPU backend of the stripe_conv2d op (kernels in :mod:`stripeconv.kernels.stripe_conv`).

The op's three entry points (forward, grad input, grad weight): which launcher runs a call, and the
settled calls. The launchers are in :mod:`._triton_forward`, :mod:`._triton_backward` (grad by
filter tables) and :mod:`._triton_backward_tiles` (grad over the forward's tiles); loading and
launching the kernels in :mod:`._triton_runtime`; the mask-derived metadata the kernels read
(forward tile plans, backward row chunks and blocks, tile efficiency) in :mod:`.triton_plans`,
whose public names are re-exported here.

Which runs: on CUDA every call picks, per shape, the fastest of the stripe kernels at each
offered tile width and cuDNN's dense conv on the scattered weight, timed once per key by
:mod:`stripeconv.backends.gpu_select` (``STRIPECONV_GPU_DENSE`` overrides). Once that choice is
settled, a call shaped like an earlier one (same op, shapes, strides, dtypes, mask version, conv
geometry, bias or not) skips all of this: it reuses the launch worked out for the first one. A call
captured into a CUDA graph runs the candidate fastest there, which differs where cuDNN won with its
dense weight kept between calls (a graph replays the weight's scatter: see :mod:`.gpu_select`).

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

import functools
import math
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ..ops import output_memory_format
from . import _dense_weights, _triton_runtime as runtime, _triton_shapes as shapes, gpu_select, triton_plans
from ._dense_weights import dense_weight as _dense_weight, tile_weight
from ._triton_backward import grad_input_launcher, grad_weight_launcher
from ._triton_backward_tiles import (
    backward_tiles, backward_tiles_in_place, backward_tiles_wide, forget_gathered, grad_input_tiles_launcher,
    grad_input_tiles_tma_launcher, grad_weight_tiles_launcher, grad_weight_tiles_tma_launcher, tiles_signature,
    tma_dy_offered, tma_wgrad_offered,
)
from ._triton_forward import (bias_output, split_k, stripe_launcher, subtile_launcher, tile_weight_gather, tma_launcher,
                              tma_offered)
from ._triton_runtime import kernels_module  # noqa: F401  (tools load stripeconv.kernels modules through it)
from .dense import conv2d_grad_input
from .triton_plans import (
    WGRAD_PER, DensePlan, ForwardPlan, GradInputPlan, GradWeightPlan, balanced_plans, best_tile_efficiency, cached_plan,
    default_block_n, forward_plan, forward_plans, narrow_plans, subtile_count, subtile_plan, tile_efficiency,
    tile_widths,
)

NAME = "triton"

__all__ = [
    "NAME", "is_available", "supports", "forward", "grad_input", "grad_weight", "clear_cache",
    # re-exported from .triton_plans
    "tile_efficiency", "best_tile_efficiency", "tile_widths", "forward_plan", "default_block_n",
    "ForwardPlan", "GradInputPlan", "GradWeightPlan", "DensePlan",
]


def is_available() -> tuple[bool, str]:
    """``(True, "")`` when the kernels load and can run (a CUDA device, or a Triton interpreter that
    runs their loops), else ``(False, why not)``."""
    if runtime.load_kernels() is None:
        return False, runtime._import_error or "triton kernels failed to load"
    if runtime.interpreting():  # every launch runs in the interpreter, CUDA tensors too: it must cope
        problem = runtime.check_interpreter()
        return not problem, problem
    if torch.cuda.is_available():
        return True, ""
    return False, "no CUDA device (set TRITON_INTERPRET=1 before importing triton to run the kernels on CPU)"


def supports(device: torch.device) -> bool:
    """Whether the kernels run on ``device``: CUDA, or CPU under the Triton interpreter (``TRITON_INTERPRET=1``)."""
    device = torch.device(device)
    return device.type == "cuda" or (device.type == "cpu" and runtime.interpreting())


def _symmetric(padding) -> bool:
    return padding[0] == padding[1] and padding[2] == padding[3]


def _select_key(op: str, *tensors: Tensor, extra: tuple = ()) -> tuple:
    return (op, *[(tuple(t.shape), t.dtype, t.is_contiguous(memory_format=torch.channels_last), str(t.device))
                  for t in tensors], *extra)


def _balance_budget(pixels: int, device) -> int:
    """Forward tiles that run at once on ``device`` beside each other for a call of ``pixels`` output pixels:
    two programs a multiprocessor, in pixel blocks of 32 (the smallest the tuner tries)."""
    return 2 * runtime.num_sms(device) // shapes.cdiv(pixels, 32)


def _dense_launcher(mask: Tensor, stride, padding, dilation, groups: int, device, keep: bool = True) -> Callable:
    """cuDNN's dense conv on the packed rows scattered into a dense weight (kept between calls, or with
    ``keep=False`` scattered on every call, as a CUDA graph replays it)."""
    def launch(input, weight, bias):
        w_dense = _dense_weight(weight, mask, device, keep, output_memory_format(input))
        return runtime.at_dense_precision(input.dtype, F.conv2d, input, w_dense, bias, stride,
                                          (padding[0], padding[2]), dilation, groups)
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
    triton_plans.clear_cache()
    _dense_weights.clear()
    _settled.clear()
    forget_gathered()


def _call_key(op: str, mask: Tensor, tensors: tuple, extra: tuple) -> tuple:
    # A settled call makes few Python calls, in small frames: each may cost the interpreter a fresh chunk of
    # its frame stack (docs/backends.md, "Host work and the frame stack"). So the key calls nothing but
    # gpu_select.settings(), and its tensors' part is a loop, not a comprehension (a call of its own before
    # Python 3.12). The TF32 setting changes only fp32 launches.
    key = [op]
    for t in tensors:
        key.append((t.shape, t.stride(), t.dtype, t.device))
    tf32 = runtime.tf32_matmul() if tensors[0].dtype == torch.float32 else None
    return (*key, mask.data_ptr(), mask._version, mask.shape, *extra, gpu_select.settings(), tf32)


def _run_chosen(key: tuple, mask: Tensor, launchers: dict[str, Callable], select_key: tuple, args: tuple, device,
                captured: Optional[dict[str, Callable]] = None):
    """Run the launcher :mod:`.gpu_select` picks for ``select_key``; remember it for ``key`` once settled.
    ``captured``: launchers that do other work where a CUDA graph replays them (the dense hand-over's
    scatter), timed for the choice under capture."""
    candidates = {name: functools.partial(launch, *args) for name, launch in launchers.items()}
    variants = {name: functools.partial(launch, *args) for name, launch in (captured or {}).items()}
    name, settled = gpu_select.choice(select_key, candidates, device, variants)
    launch = launchers[name]
    if settled:
        in_graph = gpu_select.captured_choice(select_key)
        if in_graph is not None and in_graph != name:
            launch = _capture_aware(launch, launchers[in_graph])
        if len(_settled) >= _SETTLED_SIZE:
            _settled.clear()
        _settled[key] = (mask, launch)
    return launch(*args)


def _capture_aware(eager: Callable, in_graph: Callable) -> Callable:
    """``eager``, but ``in_graph`` while the current CUDA stream is being captured."""
    def launch(*args):
        return (in_graph if runtime.capturing(args[0]) else eager)(*args)
    return launch


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
    # (the first call of a signature in a function of its own: a settled call's frame stays small, see _call_key)
    key = _call_key("fwd", mask, (input,), (weight.shape, bias is None, tuple(stride), tuple(padding),
                                            tuple(dilation), groups))
    settled = _settled.get(key)
    if settled is not None:
        return settled[1](input, weight, bias)
    return _first_forward(key, input, weight, bias, mask, stride, padding, dilation, groups)


def _first_forward(key: tuple, input: Tensor, weight: Tensor, bias: Optional[Tensor], mask: Tensor, stride, padding,
                   dilation, groups: int) -> Tensor:
    """:func:`forward` for a call ``key`` that has not settled: its candidates, run as :mod:`.gpu_select` picks."""
    runtime.check_kernels()
    stride, padding, dilation = shapes.conv_ints(stride, padding, dilation)
    b, c, h, w = input.shape
    n, kh, kw = mask.shape
    ho, wo = shapes.out_hw(h, w, kh, kw, stride, padding, dilation)
    if b * n * ho * wo == 0:
        return shapes.like_input((b, n, ho, wo), input)
    if c == 0:  # no input channels: the output is the bias (the subtile kernel's first loads assume a channel)
        return bias_output((b, n, ho, wo), input, bias)
    device = input.device
    launchers, counts = {}, []
    channels_last = output_memory_format(input) == torch.channels_last
    # (the variants that never won on an H100 join only when asked for: see gpu_select.every_candidate)
    every = gpu_select.every_candidate()
    captured = {}

    def add_tile_major(name, plan, make, gather, **kwargs):
        """``name`` once more reading the plan's tile-major weight (kept per version of the packed rows;
        made on every call where a CUDA graph replays it), where the row table reads the packed rows."""
        for table, keep in ((launchers, True), (captured, False)):
            table[name + "_wtiles"] = make(plan, input, weight, bias, stride, padding, dilation, (ho, wo), **kwargs,
                                           tile_weights=functools.partial(tile_weight, mask=mask, plan=plan,
                                                                          gather=gather, keep=keep))

    def add_subtiles(plan):
        sub = subtile_plan(plan, mask, groups, device)
        name = f"stripe{plan.block_n}x{sub.sub}" + ("_aligned" if sub.aligned else "")
        launchers[name] = subtile_launcher(sub, input, weight, bias, stride, padding, dilation, (ho, wo))
        if channels_last and not sub.aligned:
            launchers[name + "_gathered"] = subtile_launcher(sub, input, weight, bias, stride, padding, dilation,
                                                             (ho, wo), gathered=True)
    for plan in forward_plans(mask, groups, device):
        counts.append((plan.block_n, plan.kept, plan.computed, plan.aligned))
        name = f"stripe{plan.block_n}" + ("_aligned" if plan.aligned else "")
        launchers[name] = stripe_launcher(plan, input, weight, bias, stride, padding, dilation, (ho, wo))
        # Columns in no channel order: two more ways to store them as vectors, NCHW planes and tile order
        # (each with a second pass over the output)
        scattered = channels_last and not plan.aligned
        if scattered:
            launchers[name + "_planes"] = stripe_launcher(plan, input, weight, bias, stride, padding, dilation,
                                                          (ho, wo), via_planes=True)
            launchers[name + "_gathered"] = stripe_launcher(plan, input, weight, bias, stride, padding, dilation,
                                                            (ho, wo), gathered=True)
        # Each (tile, position) one block of rows of the tile-major weight instead of rows through the row
        # table, with the plan's vector stores (in place, or tile order then the gather)
        tile_major = plan.block_n >= 16 and plan.kept and not plan.row_runs
        gather = tile_weight_gather(plan, weight.shape[1]) if tile_major else None  # (one for both kernels)
        if tile_major:
            add_tile_major(name + ("_gathered" if scattered else ""), plan, stripe_launcher, gather,
                           gathered=scattered)
        if plan.block_n >= 16 and plan.kept:  # the input's shifted windows through L1, with the plan's vector stores
            launchers[name + ("_gathered" if scattered else "") + "_l1"] = stripe_launcher(
                plan, input, weight, bias, stride, padding, dilation, (ho, wo), gathered=scattered, through_l1=True)
        if every and subtile_count(plan, groups) > 1 and (plan.block_n >= 16 or runtime.narrow_dots()):
            add_subtiles(plan)
        if tma_offered(plan, input, weight, stride, groups, b * n * ho * wo):
            if every or not scattered:
                launchers[name + "_tma"] = tma_launcher(plan, input, weight, bias, stride, padding, dilation,
                                                        (ho, wo))
            if scattered:
                launchers[name + "_tma_gathered"] = tma_launcher(plan, input, weight, bias, stride, padding,
                                                                 dilation, (ho, wo), gathered=True)
            tiles_shape = (plan.w_rows.numel(), weight.shape[1])
            if tile_major and tma_offered(plan, input, torch.empty(tiles_shape, device="meta"), stride, groups,
                                          b * n * ho * wo):
                add_tile_major(name + ("_tma_gathered" if scattered else "_tma"), plan, tma_launcher, gather,
                               gathered=scattered)
        split = split_k(plan, b * ho * wo, c // groups, runtime.num_sms(device))
        if split > 1 and plan.block_n >= 16 and plan.kept and not gpu_select.deterministic():
            launchers[name + "_splitk"] = stripe_launcher(plan, input, weight, bias, stride, padding, dilation,
                                                          (ho, wo), split_k=split)
    for plan in narrow_plans(mask, groups, device) if every and runtime.narrow_dots() else ():
        counts.append((plan.block_n, plan.kept, plan.computed, plan.aligned))
        add_subtiles(plan)
    for plan in balanced_plans(mask, groups, device, _balance_budget(b * ho * wo, device)):
        counts.append((plan.block_n, plan.kept, plan.computed, plan.aligned, plan.umax))
        launchers[f"stripe{plan.block_n}_balanced"] = stripe_launcher(plan, input, weight, bias, stride, padding,
                                                                      dilation, (ho, wo))
    if _symmetric(padding):
        launchers["dense"] = _dense_launcher(mask, stride, padding, dilation, groups, device)
        captured["dense"] = _dense_launcher(mask, stride, padding, dilation, groups, device, keep=False)
    select_key = _select_key("fwd", input, weight, extra=(bias is not None, tuple(stride), tuple(padding),
                                                          tuple(dilation), groups, tuple(counts), every))
    return _run_chosen(key, mask, launchers, select_key, (input, weight, bias), device, captured)


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
    return _first_grad_input(key, grad_output, weight, mask, input_shape, stride, padding, dilation, groups)


def _first_grad_input(key: tuple, grad_output: Tensor, weight: Tensor, mask: Tensor, input_shape, stride, padding,
                      dilation, groups: int) -> Tensor:
    """:func:`grad_input` for a call ``key`` that has not settled."""
    runtime.check_kernels()
    stride, padding, dilation = shapes.conv_ints(stride, padding, dilation)
    input_shape = [int(v) for v in input_shape]
    device = grad_output.device
    launchers = {"stripe": grad_input_launcher(grad_output, weight, mask, input_shape, stride, padding, dilation,
                                               groups)}
    tiles = backward_tiles(mask, weight, input_shape[1], groups, stride, padding, dilation, device)
    runs = backward_tiles_in_place(tiles, mask, groups, stride, padding, dilation, device)
    tile_major = {}  # what the _wtiles candidates do where a CUDA graph replays them: make the weight anew
    for suffix, plan in (("", tiles), ("_runs", runs)):
        if plan is not None and grad_output.numel() and math.prod(input_shape):
            launchers["stripe_tiles" + suffix] = grad_input_tiles_launcher(plan, grad_output, weight, input_shape,
                                                                           stride, groups)
            # (a tile's entries follow each other: its dy columns at each position, through L1)
            launchers[f"stripe_tiles{suffix}_l1"] = grad_input_tiles_launcher(plan, grad_output, weight, input_shape,
                                                                              stride, groups, through_l1=True)
            if plan.bypos_width:  # several tiles keep a position: products over all of them at once
                launchers[f"stripe_tiles{suffix}_bypos"] = grad_input_tiles_launcher(
                    plan, grad_output, weight, input_shape, stride, groups, by_position=True)
            if tma_dy_offered(plan, grad_output, weight, input_shape, stride, groups):
                launchers[f"stripe_tiles{suffix}_tma"] = grad_input_tiles_tma_launcher(
                    plan, grad_output, weight, input_shape, stride)
            if plan.fwd.kept and not plan.fwd.row_runs:  # the forward's tile-major weight (shared with its _wtiles)
                gather = tile_weight_gather(plan.fwd, weight.shape[1])
                for table, keep in ((launchers, True), (tile_major, False)):
                    made = functools.partial(tile_weight, mask=mask, plan=plan.fwd, gather=gather, keep=keep)
                    table[f"stripe_tiles{suffix}_wtiles"] = grad_input_tiles_launcher(
                        plan, grad_output, weight, input_shape, stride, groups, tile_weights=made)
    captured = dict(tile_major)
    if _symmetric(padding) and grad_output.numel() and math.prod(input_shape):
        def dense(grad_output, weight, keep=True):
            w_dense = _dense_weight(weight, mask, device, keep, output_memory_format(grad_output))
            dx = runtime.at_dense_precision(grad_output.dtype, conv2d_grad_input, input_shape, w_dense, grad_output,
                                            stride, (padding[0], padding[2]), dilation, groups)
            return dx.contiguous(memory_format=output_memory_format(grad_output))
        launchers["dense"] = dense
        captured["dense"] = functools.partial(dense, keep=False)
    select_key = _select_key("dgrad", grad_output, weight, extra=(tuple(input_shape), tuple(stride), tuple(padding),
                                                                  tuple(dilation), groups, tiles_signature(tiles, runs)))
    return _run_chosen(key, mask, launchers, select_key, (grad_output, weight), device, captured)


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
    return _first_grad_weight(key, grad_output, input, weight, mask, stride, padding, dilation, groups)


def _first_grad_weight(key: tuple, grad_output: Tensor, input: Tensor, weight: Tensor, mask: Tensor, stride, padding,
                       dilation, groups: int) -> Tensor:
    """:func:`grad_weight` for a call ``key`` that has not settled."""
    runtime.check_kernels()
    deterministic = gpu_select.deterministic()
    stride, padding, dilation = shapes.conv_ints(stride, padding, dilation)
    device = input.device
    launchers = {"stripe": grad_weight_launcher(grad_output, input, weight, mask, stride, padding, dilation, groups,
                                                deterministic)}
    tiles = backward_tiles(mask, weight, input.shape[1], groups, stride, padding, dilation, device)
    runs = backward_tiles_in_place(tiles, mask, groups, stride, padding, dilation, device)
    for suffix, plan in (("", tiles), ("_runs", runs)):
        if plan is not None and not deterministic and grad_output.numel() and input.numel():
            launchers["stripe_tiles" + suffix] = grad_weight_tiles_launcher(plan, grad_output, input, weight, stride,
                                                                            padding, dilation)
            if plan.num_runs < plan.num_all:  # some tile keeps several positions: dy loaded once for up to 3
                launchers[f"stripe_tiles{suffix}_pos{WGRAD_PER}"] = grad_weight_tiles_launcher(
                    plan, grad_output, input, weight, stride, padding, dilation, per=WGRAD_PER)
            if plan.bypos_width:  # several tiles keep a position: x loaded once for them
                launchers[f"stripe_tiles{suffix}_bypos"] = grad_weight_tiles_launcher(
                    plan, grad_output, input, weight, stride, padding, dilation, by_position=True)
            if tma_wgrad_offered(plan, grad_output, input, weight, stride, groups):
                launchers[f"stripe_tiles{suffix}_tma"] = grad_weight_tiles_tma_launcher(
                    plan, grad_output, input, weight, stride, padding, dilation)
    wide = backward_tiles_wide(tiles, mask, groups, stride, padding, dilation, device)
    if wide is runs or deterministic or not (grad_output.numel() and input.numel()):
        wide = None
    if wide is not None and wide.num_runs < wide.num_all:
        # The widest tiles and dy loaded once for up to 3 positions: the fewest reads of dy and x a product
        # (backward_tiles_wide; one tile wide, the by-position entries read x as seldom, dy no less)
        launchers[f"stripe_tiles_wide_pos{WGRAD_PER}"] = grad_weight_tiles_launcher(
            wide, grad_output, input, weight, stride, padding, dilation, per=WGRAD_PER)
    if _symmetric(padding) and weight.shape[0] and grad_output.numel() and input.numel():
        n, kh, kw = mask.shape
        gather = cached_plan("dense", mask, 1, 0, device).gather  # the kept rows of the dense gradient (per mask)

        def dense(grad_output, input, weight):
            dw = runtime.at_dense_precision(input.dtype, torch.nn.grad.conv2d_weight, input,
                                            (n, weight.shape[1], kh, kw), grad_output, stride,
                                            (padding[0], padding[2]), dilation, groups)
            return dw.permute(0, 2, 3, 1).reshape(-1, weight.shape[1]).index_select(0, gather).to(weight.dtype)
        launchers["dense"] = dense
    select_key = _select_key("wgrad", grad_output, input, weight, extra=(tuple(stride), tuple(padding), tuple(dilation),
                                                                         groups, deterministic,
                                                                         tiles_signature(tiles, runs, wide)))
    return _run_chosen(key, mask, launchers, select_key, (grad_output, input, weight), device)
