"""Launchers of the Triton backward kernels over the forward's filter tiles (grad input and grad weight,
plain and TMA), and the layout of dy they read: in place where the tiles are runs of channels,
else gathered once per backward into tile order."""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch
from torch import Tensor

from ..ops import output_memory_format
from . import _triton_runtime as runtime, _triton_shapes as shapes, gpu_select
from .triton_plans import TilesBackwardPlan, cached_plan, forward_plans


def backward_tiles(mask: Tensor, weight: Tensor, c: int, groups: int, stride, padding, dilation,
                   device) -> Optional[TilesBackwardPlan]:
    """The tile plan of the forward's width that computes the fewest stripes (one whose tiles are runs
    of channels, which reads dy in place, where it computes at most 5 % more), or None where the
    tiles are too narrow for tensor cores (or there is nothing to compute)."""
    n = mask.shape[0]
    if weight.shape[0] == 0 or not shapes.use_dot_backward(c // groups, n // groups):
        return None
    plans = forward_plans(mask, groups, device)
    best = min(plans, key=lambda p: p.computed)
    runs = [p for p in plans if p.runs and p.computed <= 1.05 * best.computed]
    best = min(runs, key=lambda p: p.computed) if runs else best
    if best.block_n < 16:
        return None
    conv = (tuple(stride), (padding[0], padding[2]), tuple(dilation), best.in_order)
    return cached_plan("bwd_tiles", mask, groups, best.block_n, device, conv)


def backward_tiles_in_place(clustered: Optional[TilesBackwardPlan], mask: Tensor, groups: int, stride, padding,
                            dilation, device) -> Optional[TilesBackwardPlan]:
    """Tiles of consecutive filters at the forward's first width, which read dy in place, offered beside
    ``clustered`` (what :func:`backward_tiles` returned) where that plan gathers dy; None where it reads dy
    in place already (or there is none). Their union of positions grows towards the whole kernel as the density falls, but on an H100
    (bench/results/h100_20261124, ResNet-50 layer1) the tile grad input over runs of channels took about
    half the time of the clustered tiles with dy gathered, as the forward's aligned tiles did."""
    if clustered is None or clustered.fwd.runs:
        return None
    width = forward_plans(mask, groups, device)[0].block_n
    in_order = cached_plan("fwd_in_order", mask, groups, width, device)
    if width < 16 or not in_order.runs or in_order.kept == 0:
        return None
    return cached_plan("bwd_tiles", mask, groups, width, device,
                       (tuple(stride), (padding[0], padding[2]), tuple(dilation), True))


def backward_tiles_wide(chosen: Optional[TilesBackwardPlan], mask: Tensor, groups: int, stride, padding, dilation,
                        device) -> Optional[TilesBackwardPlan]:
    """For grad weight: the forward's widest plan, where it is wider than ``chosen`` (what
    :func:`backward_tiles` returned) and computes at most 5 % more stripes (runs of channels preferred);
    None where there is none. A grad weight program multiplies x's tile at one position by dy's columns
    of one tile, so x is read once per tile and position: for N filters in tiles of width T and channel
    blocks of width K, grad weight reads M * N * C * (1/T + 1/K) elements a position (dy once per channel
    block, x once per tile). The backward's tiles are the narrowest of equal work (:func:`backward_tiles`,
    for grad input, whose reads do not depend on the width); at K = 64, 128-wide tiles read a quarter less
    than 64-wide ones."""
    if chosen is None:
        return None
    wider = [p for p in forward_plans(mask, groups, device)
             if p.block_n > chosen.fwd.block_n and p.computed <= 1.05 * chosen.fwd.computed and p.kept]
    if not wider:
        return None
    best = max(wider, key=lambda p: (p.block_n, p.runs, -p.computed))
    return cached_plan("bwd_tiles", mask, groups, best.block_n, device,
                       (tuple(stride), (padding[0], padding[2]), tuple(dilation), best.in_order))


def tiles_signature(*plans: Optional[TilesBackwardPlan]) -> tuple:
    """What tells the offered tile plans apart in a gradient's choice key (width, stripes computed, dy in place)."""
    return tuple((p.fwd.block_n, p.fwd.computed, p.fwd.runs) for p in plans if p is not None)


def dy_layout(plan: TilesBackwardPlan, grad_output: Tensor) -> tuple[bool, Tensor, tuple, Tensor]:
    """How the tile kernels read dy: (in place, first column of each tile, dy's [b, c, h, w] strides, a
    tensor shaped like what they read). In place where every tile is a run of consecutive channels
    (filters in :func:`~.triton_plans.filter_order`, e.g. after :func:`stripeconv.reorder_filters`) and
    a pixel's channels are contiguous; otherwise a copy gathered into tile order (:func:`gather_dy`)."""
    if plan.fwd.runs and grad_output.is_contiguous(memory_format=torch.channels_last):
        return True, plan.col0, tuple(grad_output.stride()), grad_output
    b, _, ho, wo = grad_output.shape
    ncol = plan.cols.numel()
    return False, plan.gathered_col0, (ho * wo * ncol, 1, wo * ncol, ncol), torch.empty(b * ho * wo, ncol,
                                                                                        device="meta")


# A backward's two tile kernels read the same gathered dy: grad input gathers it and leaves it here,
# grad weight takes it (matched by the very tensor, its version, the plan and whether the stream is being
# captured), so it is gathered once. Grad input never takes one: a call with the dy of an earlier call (a
# candidate timed by gpu_select, a benchmark's fixed dy, a CUDA graph captured after warm-up calls) still
# pays its gather, and a graph never reads a copy made outside it.
_last_gather: Optional[tuple] = None


def forget_gathered() -> None:
    """Drop the gathered dy left for grad weight (:func:`gathered_dy`)."""
    global _last_gather
    _last_gather = None


def gathered_dy(grad_output: Tensor, plan: TilesBackwardPlan, keep: bool, gather: "DyGather") -> Tensor:
    """dy in tile order: for grad input (``keep``) a new gather, left for grad weight; for grad weight
    the copy grad input left for the same ``grad_output`` and plan, or a new gather."""
    global _last_gather
    hit, _last_gather = _last_gather, None
    capturing = runtime.capturing(grad_output)
    if (not keep and hit is not None and hit[0] is grad_output and hit[1] == grad_output._version
            and hit[2] is plan and hit[4] == capturing):
        return hit[3]
    dyt = gather_dy(grad_output, gather)
    if keep:
        _last_gather = (grad_output, grad_output._version, plan, dyt, capturing)
    return dyt


def gather_dy(grad_output: Tensor, gather: "DyGather") -> Tensor:
    """Every gather of dy into tile order goes through here."""
    return gather(grad_output)


class DyGather:
    """dy as [pixels, T * BLOCK_T], its columns in the forward's tile order of ``plan`` and zeros for
    padding, for every dy shaped like ``grad_output``: ``gather(grad_output)``."""

    def __init__(self, plan: TilesBackwardPlan, grad_output: Tensor):
        b, _, ho, wo = grad_output.shape
        self.shape = (b * ho * wo, plan.cols.numel())
        self.kernel = runtime.column_gather(
            plan.cols, grad_output, shapes.needs_int64(grad_output, torch.empty(self.shape, device="meta")))

    def __call__(self, grad_output: Tensor) -> Tensor:
        dyt = torch.empty(self.shape, dtype=grad_output.dtype, device=grad_output.device)
        self.kernel(grad_output, dyt)
        return dyt


def grad_input_tiles_launcher(plan: TilesBackwardPlan, grad_output, weight, input_shape, stride,
                              groups: int, by_position: bool = False,
                              tile_weights: Optional[Callable[[Tensor], Tensor]] = None,
                              through_l1: bool = False) -> Callable:
    """Grad input over the forward's tiles for every call shaped like this one: ``launch(grad_output, weight)``;
    with ``by_position`` over the entries of one kernel position and the tiles that keep it (``plan.bypos_*``);
    with ``tile_weights`` reading the forward plan's tile-major weight it makes (as the forward's ``_wtiles``);
    with ``through_l1`` under one-stage configurations that load dy through L1 (as the forward's ``_l1``)."""
    b, c, h, w = input_shape
    fwd = plan.fwd
    n, kh, kw = fwd.mask_shape
    cg = c // groups
    ho, wo = grad_output.shape[2:]
    dx_shape, dx_format = (b, c, h, w), output_memory_format(grad_output)
    block_n = shapes.dot_block(cg)
    ncb = shapes.cdiv(cg, block_n)
    sh, sw = stride
    mp_max = b * shapes.cdiv(h, sh) * shapes.cdiv(w, sw)
    dx = torch.empty(dx_shape, device="meta", memory_format=torch.channels_last)
    in_place, col0, dy_strides, dy = dy_layout(plan, grad_output)
    gather = None if in_place else DyGather(plan, grad_output)
    if by_position:  # (the tile and union tables are not read)
        tables = (plan.bypos_rows, plan.bypos_ch if in_place else plan.bypos_cols, plan.bypos_off, plan.bypos_p,
                  plan.bypos_g, plan.bypos_dh, plan.bypos_dw)
    else:
        tables = (fwd.tile_rows if tile_weights else fwd.w_rows, col0, plan.ent_off, plan.ent_t, plan.ent_u,
                  plan.ent_dh, plan.ent_dw)
    w_shape = (fwd.w_rows.numel(), weight.shape[1]) if tile_weights else weight.shape
    scalars = (b, h, w, ho, wo, cg, groups, ncb, fwd.umax, *dy_strides, *dx.stride(), sh, sw)
    precision, acc = runtime.precision(grad_output.dtype)
    constants = dict(
        **shapes.tuning_keys(b * h * w, c, n, fwd.density, kh, kw, stride),
        INPUT_PRECISION=precision, ACC_DTYPE=acc,
        INT64_INDEX=shapes.needs_int64(dy, torch.empty(w_shape, device="meta"), dx),
        ROW_RUNS=(fwd.row_runs or tile_weights is not None) and not by_position, BLOCK_N=block_n,
        BLOCK_T=plan.bypos_width if by_position else fwd.block_n, BY_POSITION=by_position,
        RUN=fwd.block_n if by_position else 1, THROUGH_L1=through_l1,
    )
    kernel = runtime.TunedLaunch("stripe_dgrad_tiles_kernel",
                                 lambda meta: (shapes.cdiv(mp_max, meta["BLOCK_M"]) * groups * ncb, sh * sw), constants,
                                 bound=(*tables, *scalars))

    def launch(grad_output, weight):
        dy = grad_output if in_place else gathered_dy(grad_output, plan, True, gather)
        dx = torch.empty(dx_shape, dtype=dy.dtype, device=dy.device, memory_format=torch.channels_last)
        kernel(dy, weight.contiguous() if tile_weights is None else tile_weights(weight), dx)
        return dx if dx_format == torch.channels_last else dx.contiguous(memory_format=dx_format)
    return launch


def tma_dy_offered(plan: TilesBackwardPlan, grad_output: Tensor, weight: Tensor, input_shape, stride,
                   groups: int) -> bool:
    """Whether the TMA grad input is offered for this call: one group, dy (read in place, or gathered into tile
    order) that :func:`._triton_runtime.tma_boxes` can read, and tiles of 64 filters or more over 64 or more
    input channels (any stride: a program's rectangle lies in one output phase). Narrower ones compile to longer
    loops than ``stripe_dgrad_tiles_kernel``'s (sm_90, triton 3.6, 8 warps: 112 / 125 SASS instructions against
    95 / 117 for 16- / 32-filter tiles; 141 / 173 against 158 / 249 for 64- / 128-filter tiles), and the
    product is taken transposed only from 64 channels on."""
    in_place, _, _, dy = dy_layout(plan, grad_output)
    row = grad_output.shape[1] if in_place else plan.cols.numel()
    return (plan.fwd.block_n >= 64 and shapes.dot_block(input_shape[1]) >= 64
            and runtime.tma_boxes(grad_output, row, groups, dy.numel(), weight.numel(), math.prod(input_shape)))


def grad_input_tiles_tma_launcher(plan: TilesBackwardPlan, grad_output: Tensor, weight: Tensor,
                                  input_shape, stride) -> Callable:
    """Grad input over the forward's tiles with TMA boxes of dy (``stripe_dgrad_tiles_tma_kernel``) for every
    call shaped like this one (:func:`tma_dy_offered` holds): ``launch(grad_output, weight)``."""
    b, c, h, w = input_shape
    fwd = plan.fwd
    n, kh, kw = fwd.mask_shape
    ho, wo = grad_output.shape[2:]
    dx_shape, dx_format = (b, c, h, w), output_memory_format(grad_output)
    block_n = shapes.dot_block(c)
    ncb = shapes.cdiv(c, block_n)
    sh, sw = stride
    hp0, wp0 = shapes.cdiv(h, sh), shapes.cdiv(w, sw)  # phase (0, 0), the largest
    block_m, tw = shapes.tma_rectangle(hp0, wp0)
    in_place, col0, _, _ = dy_layout(plan, grad_output)
    gather = None if in_place else DyGather(plan, grad_output)
    row = n if in_place else plan.cols.numel()
    box = [1, block_m // tw, tw, fwd.block_n]
    dx = torch.empty(dx_shape, device="meta", memory_format=torch.channels_last)
    tables = (fwd.w_rows, col0, plan.ent_off, plan.ent_t, plan.ent_u, plan.ent_dh, plan.ent_dw)
    scalars = (b, h, w, c, ncb, fwd.umax, *dx.stride(), sh, sw)
    precision, acc = runtime.precision(grad_output.dtype)
    constants = dict(
        **shapes.tuning_keys(b * h * w, c, n, fwd.density, kh, kw, stride),
        INPUT_PRECISION=precision, ACC_DTYPE=acc, ROW_RUNS=fwd.row_runs,
        BLOCK_M=block_m, TW=tw, BLOCK_N=block_n, BLOCK_T=fwd.block_n,
    )
    programs = b * shapes.cdiv(hp0, block_m // tw) * shapes.cdiv(wp0, tw) * ncb
    kernel = runtime.TunedLaunch("stripe_dgrad_tiles_tma_kernel", (programs, sh * sw), constants,
                                 fixed=gpu_select.deterministic(), bound=(*tables, *scalars))
    descriptor = runtime.tensor_descriptor()

    def launch(grad_output, weight):
        if in_place:  # (channels_last strides, whatever its dimensions of size 1 have)
            dy = grad_output
            if dy.data_ptr() % 16:
                dy = dy.clone(memory_format=torch.channels_last)  # a descriptor's base is 16-byte aligned
        else:
            dy = gathered_dy(grad_output, plan, True, gather)  # [pixels, columns], freshly allocated
        dy_desc = descriptor(dy, [b, ho, wo, row], [ho * wo * row, wo * row, row, 1], box)
        dx = torch.empty(dx_shape, dtype=grad_output.dtype, device=grad_output.device,
                         memory_format=torch.channels_last)
        kernel(dy_desc, weight.contiguous(), dx)
        return dx if dx_format == torch.channels_last else dx.contiguous(memory_format=dx_format)
    return launch


def grad_weight_tiles_launcher(plan: TilesBackwardPlan, grad_output, input, weight, stride, padding,
                               dilation, per: int = 1, by_position: bool = False) -> Callable:
    """Grad weight over the forward's tiles for every call shaped like this one: ``launch(grad_output, input,
    weight)``; split-K partial sums are added atomically (so it is not offered in deterministic mode),
    a single split stores each row once. With ``per`` = :data:`~.triton_plans.WGRAD_PER` each program takes a
    run of up to that many union entries of one tile (``plan.runs_*``), loading dy once for them; with
    ``by_position`` one kernel position and the tiles that keep it (``plan.bypos_*``), loading x once for them."""
    b, c, h, w = input.shape
    fwd = plan.fwd
    n, kh, kw = fwd.mask_shape
    cg = weight.shape[1]
    ho, wo = grad_output.shape[2:]
    s, m = weight.shape[0], b * ho * wo
    block_c = shapes.dot_block(cg)
    ncb = shapes.cdiv(cg, block_c)
    if by_position:
        entries, count = (plan.bypos_p, plan.bypos_g, plan.bypos_g), plan.num_bypos
    elif per > 1:
        entries, count = (plan.runs_t, plan.runs_u, plan.runs_n), plan.num_runs
    else:
        entries, count = (plan.all_t, plan.all_u, plan.all_u), plan.num_all
    programs = count * ncb
    split, chunk = wgrad_split(programs, m, input.device, 256)
    acc_torch = torch.float64 if weight.dtype == torch.float64 else torch.float32
    copy_x = not input.is_contiguous(memory_format=torch.channels_last)
    x = shapes.meta_like(input, copy_x)
    in_place, col0, dy_strides, dy = dy_layout(plan, grad_output)
    gather = None if in_place else DyGather(plan, grad_output)
    rows = fwd.w_rows
    if by_position:  # each entry's own rows and dy columns
        rows, col0 = plan.bypos_rows, (plan.bypos_ch if in_place else plan.bypos_cols)
    tables = (rows, col0, *entries, fwd.tile_pos, fwd.tile_grp)  # (entry lengths unread for per = 1)
    scalars = (b, h, w, ho, wo, cg, ncb, fwd.umax, chunk, *dy_strides, *x.stride(),
               stride[0], stride[1], padding[0], padding[2], dilation[0], dilation[1], kw)
    precision, acc = runtime.precision(input.dtype)
    # One split writes each kept row once, in the weight's dtype; several add into a zeroed fp32 buffer.
    atomic = split > 1
    buf_dtype = acc_torch if atomic else weight.dtype
    constants = dict(
        **shapes.tuning_keys(m, c, n, fwd.density, kh, kw, stride),
        ATOMIC=atomic, INPUT_PRECISION=precision, ACC_DTYPE=acc,
        INT64_INDEX=shapes.needs_int64(dy, x, torch.empty((s, cg), device="meta")),
        PER=per, BLOCK_T=plan.bypos_width if by_position else fwd.block_n, BLOCK_C=block_c, BY_POSITION=by_position,
        RUN=fwd.block_n if by_position else 1,
    )
    kernel = runtime.TunedLaunch("stripe_wgrad_tiles_kernel", (programs, split), constants, bound=(*tables, *scalars))

    def launch(grad_output, input, weight):
        dy = grad_output if in_place else gathered_dy(grad_output, plan, False, gather)
        x = input.contiguous(memory_format=torch.channels_last) if copy_x else input
        buf = (torch.zeros if atomic else torch.empty)((s, cg), dtype=buf_dtype, device=weight.device)
        kernel(dy, x, buf)
        return buf.to(weight.dtype)
    return launch


def wgrad_split(programs: int, pixels: int, device, granule: int) -> tuple[int, int]:
    """(split, chunk): split-K over ``pixels`` (in chunks of ``granule``) that brings grad weight's grid of
    ``programs`` to ~4 programs per multiprocessor, each split reducing over at least ~512 pixels."""
    split = max(1, min(shapes.cdiv(4 * runtime.num_sms(device), max(1, programs)), shapes.cdiv(pixels, 512)))
    chunk = shapes.cdiv(shapes.cdiv(pixels, split), granule) * granule
    return shapes.cdiv(pixels, chunk), chunk


def tma_wgrad_offered(plan: TilesBackwardPlan, grad_output: Tensor, input: Tensor, weight: Tensor, stride,
                      groups: int) -> bool:
    """Whether the TMA grad weight is offered for this call: one group, strides of 1 or 2 (an even input extent
    where 2: the forward's parity view), and dy (in place or gathered) and x that
    :func:`._triton_runtime.tma_boxes` can read. A channel block may reach past the input's channels (into the
    other column parity's at stride 2): those rows of the product are not stored."""
    (sh, sw), (_, c, h, w) = stride, input.shape
    in_place, _, _, dy = dy_layout(plan, grad_output)
    row = grad_output.shape[1] if in_place else plan.cols.numel()
    return (sh in (1, 2) and sw in (1, 2) and h % sh == 0 and w % sw == 0
            and runtime.tma_boxes(grad_output, row, groups, dy.numel(), weight.numel())
            and runtime.tma_boxes(input, c, groups, input.numel()))


def grad_weight_tiles_tma_launcher(plan: TilesBackwardPlan, grad_output: Tensor, input: Tensor, weight: Tensor,
                                   stride, padding, dilation) -> Callable:
    """Grad weight over the forward's tiles with TMA boxes of dy and x (``stripe_wgrad_tiles_tma_kernel``) for
    every call shaped like this one (:func:`tma_wgrad_offered` holds): ``launch(grad_output, input, weight)``;
    split-K partial sums are added atomically, a single split stores each row once."""
    b, c, h, w = input.shape
    fwd = plan.fwd
    n, kh, kw = fwd.mask_shape
    ho, wo = grad_output.shape[2:]
    s = weight.shape[0]
    sh, sw = stride
    block_c = shapes.dot_block(c)
    ncb = shapes.cdiv(c, block_c)
    block_m, tw = shapes.tma_rectangle(ho, wo)
    rectangles = b * shapes.cdiv(ho, block_m // tw) * shapes.cdiv(wo, tw)
    split, chunk = wgrad_split(plan.num_all * ncb, rectangles * block_m, input.device, block_m)
    chunk //= block_m
    in_place, col0, _, _ = dy_layout(plan, grad_output)
    gather = None if in_place else DyGather(plan, grad_output)
    row = n if in_place else plan.cols.numel()
    # Rectangles of whole rows are runs of consecutive pixels: dy's tiles are boxes of dy as [pixels, row].
    dy_rows = tw == wo and ho % (block_m // tw) == 0
    dy_shape, dy_box = ([b * ho * wo, row], [block_m, fwd.block_n]) if dy_rows else (
        [b, ho, wo, row], [1, block_m // tw, tw, fwd.block_n])
    x_box = [1, block_m // tw, 1, tw, block_c]  # of the input as [B, H/SH, SH, W/SW, SW*C], as in the forward
    tables = (fwd.w_rows, col0, plan.all_t, plan.all_u, fwd.tile_pos)
    scalars = (ho, wo, c, ncb, fwd.umax, chunk, rectangles, padding[0], padding[2], dilation[0], dilation[1], kw)
    precision, acc = runtime.precision(input.dtype)
    atomic = split > 1
    buf_dtype = (torch.float64 if weight.dtype == torch.float64 else torch.float32) if atomic else weight.dtype
    constants = dict(
        **shapes.tuning_keys(b * ho * wo, c, n, fwd.density, kh, kw, stride),
        ATOMIC=atomic, INPUT_PRECISION=precision, ACC_DTYPE=acc, SH=sh, SW=sw, DY_ROWS=dy_rows,
        BLOCK_M=block_m, TW=tw, BLOCK_T=fwd.block_n, BLOCK_C=block_c,
    )
    kernel = runtime.TunedLaunch("stripe_wgrad_tiles_tma_kernel", (plan.num_all * ncb, split), constants,
                                 bound=(*tables, *scalars))
    descriptor = runtime.tensor_descriptor()
    dy_strides = [row, 1] if dy_rows else [ho * wo * row, wo * row, row, 1]
    s0, _, s2, s3 = shapes.channels_last_strides(input.shape)
    x_strides = [s0, sh * s2, s2, sw * s3, 1]

    def launch(grad_output, input, weight):
        if in_place:
            dy = grad_output
            if dy.data_ptr() % 16:
                dy = dy.clone(memory_format=torch.channels_last)  # a descriptor's base is 16-byte aligned
        else:
            dy = gathered_dy(grad_output, plan, False, gather)  # [pixels, columns]
        dy_desc = descriptor(dy, dy_shape, dy_strides, dy_box)  # (in place: channels_last strides, as for x)
        x = input
        if not x.is_contiguous(memory_format=torch.channels_last) or x.data_ptr() % 16:
            x = x.clone(memory_format=torch.channels_last)
        x_desc = descriptor(x, [b, h // sh, sh, w // sw, sw * c], x_strides, x_box)
        buf = (torch.zeros if atomic else torch.empty)((s, c), dtype=buf_dtype, device=weight.device)
        kernel(dy_desc, x_desc, buf)
        return buf.to(weight.dtype)
    return launch
