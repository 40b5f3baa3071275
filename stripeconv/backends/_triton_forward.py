"""Launchers of the Triton forward kernels: plain, subtile, TMA and split-K, each worked out once per call
signature (everything but the tensors), then ``launch(input, weight, bias)``."""
from __future__ import annotations

import functools
from typing import Callable, Optional

import torch
from torch import Tensor

from ..ops import output_memory_format
from . import _triton_runtime as runtime, _triton_shapes as shapes, gpu_select
from .triton_plans import ForwardPlan, SubtilePlan

# How the forward kernel stores its [pixels, filters] tile (the STORE constant): the tile's filters are
# in any channel order, and 2-byte stores scattered over a channels_last row are slow (on an H100,
# 3-4x the kernel's time); runs of consecutive channels, NCHW planes and tile order store 16-byte vectors.
STORE_SCATTER, STORE_RUNS, STORE_PLANES, STORE_TILES = 0, 1, 2, 3


def _output_maker(tile_order: "Optional[TileOrder]", out_shape: tuple, memory_format) -> Callable[..., Tensor]:
    """``make(dtype=, device=)``: what a forward launch stores into, the tile-order buffer or an output of
    ``memory_format``; the plain output without a Python call (docs/backends.md, "Host work and the frame stack")."""
    if tile_order:
        return tile_order.buffer
    return functools.partial(torch.empty, out_shape, memory_format=memory_format)


class TileOrder:
    """A channels_last output stored in tile order (``STORE_TILES``: ``ncol`` columns, each tile's filters
    one run), then put in channel order by one gather launch (``order_cols``: each channel's column), whose
    scattered 2-byte reads go through the cache where the kernel's scattered stores would not."""

    def __init__(self, order_cols: Tensor, ncol: int, out_shape: tuple):
        b, _, ho, wo = out_shape
        self.out_shape = out_shape
        self.meta = torch.empty((b, ncol, ho, wo), device="meta", memory_format=torch.channels_last)
        self.gather = runtime.column_gather(
            order_cols, self.meta, shapes.needs_int64(self.meta, torch.empty(out_shape, device="meta")))

    def buffer(self, dtype: torch.dtype, device: torch.device) -> Tensor:
        return torch.empty(self.meta.shape, dtype=dtype, device=device, memory_format=torch.channels_last)

    def in_channel_order(self, buffer: Tensor) -> Tensor:
        out = torch.empty(self.out_shape, dtype=buffer.dtype, device=buffer.device,
                          memory_format=torch.channels_last)
        self.gather(buffer, out)
        return out


def bias_output(out_shape, input: Tensor, bias: Optional[Tensor]) -> Tensor:
    """The output of a conv that reads no input: the bias (or zeros) at every pixel, in the input's memory format."""
    out = torch.empty(out_shape, dtype=input.dtype, device=input.device, memory_format=output_memory_format(input))
    return out.zero_() if bias is None else out.copy_(bias.view(1, -1, 1, 1).expand_as(out))


def tile_weight_gather(plan: ForwardPlan, cg: int) -> Callable[[Tensor], Tensor]:
    """``gather(weight)``: the packed rows ``weight`` in ``plan``'s tile order, ``[T * UMAX * BLOCK_N, cg]``
    (row ``(t * UMAX + u) * BLOCK_N + n``: column ``n`` of tile ``t`` at union entry ``u``, zeros where its
    filter does not keep the position), by one launch of ``stripe_scatter_rows_kernel`` over the plan's row table."""
    rows = plan.w_rows.numel()
    launch = runtime.TunedLaunch(
        "stripe_scatter_rows_kernel", (shapes.cdiv(rows, _GATHER_ROWS), shapes.cdiv(cg, _GATHER_CHANNELS)),
        dict(INT64_INDEX=shapes.needs_int64(torch.empty((rows, cg), device="meta")), BLOCK_R=_GATHER_ROWS,
             BLOCK_C=_GATHER_CHANNELS), bound=(plan.w_rows, rows, cg))

    def gather(weight: Tensor) -> Tensor:
        tiles = torch.empty((rows, cg), dtype=weight.dtype, device=weight.device)
        launch(weight.contiguous(), tiles)
        return tiles
    return gather


_GATHER_ROWS, _GATHER_CHANNELS = 32, 64  # a program's block of the tile-major weight


def _tile_major(plan: ForwardPlan, weight: Tensor, tile_weights: Optional[Callable[[Tensor], Tensor]]) -> tuple:
    """(row table, ROW_RUNS, weight shape the kernel reads) for packed rows read through ``plan``'s row table,
    or, with ``tile_weights``, from the tile-major weight it makes (each (tile, position) one block of rows)."""
    if tile_weights is None:
        return plan.w_rows, plan.row_runs, weight.shape
    return plan.tile_rows, True, (plan.w_rows.numel(), weight.shape[1])


def stripe_launcher(plan: ForwardPlan, input: Tensor, weight: Tensor, bias: Optional[Tensor], stride, padding,
                    dilation, out_hw, via_planes: bool = False, split_k: int = 1, gathered: bool = False,
                    tile_weights: Optional[Callable[[Tensor], Tensor]] = None, through_l1: bool = False,
                    ) -> Callable[[Tensor, Tensor, Optional[Tensor]], Tensor]:
    """The forward on ``plan``'s tiles for every call shaped like this one (shapes, strides, dtype,
    bias or not): all launch arguments but the tensors are worked out here, once.

    A channels_last output is stored in place when ``plan`` is aligned (runs of 8 channels) and
    scattered otherwise; with ``via_planes`` the kernel writes NCHW planes and a copy makes them
    channels_last (a second pass over the output instead of scattered stores); with ``gathered`` it stores
    tile order and a gather puts the columns in channel order (:class:`TileOrder`). With ``split_k`` > 1
    that many programs share each output tile's reduction: their partial sums go to a workspace of
    the accumulator's dtype, and the last of them to finish adds them up and stores the tile (one
    launch beside zeroing the tiles' counts). With ``tile_weights`` (packed rows -> the plan's tile-major
    weight, e.g. :func:`._dense_weights.tile_weight`) the kernel reads that weight, each (tile, position) as
    one block of rows (``ROW_RUNS``), instead of the packed rows through the row table. With ``through_l1`` a
    program runs every union entry of a channel block before the next block (``CHANNEL_MAJOR``), with
    one-stage configurations whose loads go through L1: the shifted windows of one block of input channels
    follow each other, and all but the first find most of their pixels there, where the staged copies
    read every window from L2 again."""
    b, c, h, w = input.shape
    n, kh, kw = plan.mask_shape
    ho, wo = out_hw
    out_shape, out_format = (b, n, ho, wo), output_memory_format(input)
    if out_format == torch.contiguous_format:
        store, kernel_format = STORE_PLANES, out_format
    elif via_planes:
        store, kernel_format = STORE_PLANES, torch.contiguous_format
    elif gathered:
        store, kernel_format = STORE_TILES, out_format
    else:
        store, kernel_format = (STORE_RUNS if plan.aligned else STORE_SCATTER), out_format

    if plan.kept == 0:  # every stripe pruned: the output is the bias (and a launch would have no rows to read)
        return lambda input, weight, bias: bias_output(out_shape, input, bias)

    cg = weight.shape[1]
    m = b * ho * wo
    bn = plan.block_n
    use_dot = bn >= 16
    block_k = shapes.dot_block(cg) if use_dot else 1
    copy_input = not input.is_contiguous(memory_format=torch.channels_last)
    x = shapes.meta_like(input, copy_input)
    tile_order = TileOrder(plan.order_cols, plan.num_tiles * bn, out_shape) if store == STORE_TILES else None
    out = tile_order.meta if tile_order else torch.empty(out_shape, device="meta", memory_format=kernel_format)
    row_table, row_runs, w_shape = _tile_major(plan, weight, tile_weights)
    tables = (plan.tile_pos, plan.tile_npos, plan.tile_ch, plan.tile_grp, row_table)
    scalars = (b, h, w, ho, wo, cg, plan.num_tiles, plan.umax, *x.stride(), *out.stride(),
               stride[0], stride[1], padding[0], padding[2], dilation[0], dilation[1], kw)
    precision, acc = runtime.precision(input.dtype)
    constants = dict(
        **shapes.tuning_keys(m, c, n, plan.density, kh, kw, stride),
        HAS_BIAS=bias is not None, USE_DOT=use_dot, INPUT_PRECISION=precision, ACC_DTYPE=acc,
        EVEN_K=cg % block_k == 0, INT64_INDEX=shapes.needs_int64(x, out, torch.empty(w_shape, device="meta")),
        STORE=store, NPOS=kh * kw if plan.all_positions else 0, ROW_RUNS=use_dot and row_runs,
        SPLIT_K=split_k, CHANNEL_MAJOR=through_l1, BLOCK_N=bn, BLOCK_K=block_k,
    )
    kernel = runtime.TunedLaunch("stripe_fwd_kernel",
                                 lambda meta: (shapes.cdiv(m, meta["BLOCK_M"]) * plan.num_tiles, split_k),
                                 constants, fixed=gpu_select.deterministic(), bound=(*tables, *scalars))
    # Split-K: partial sums in the accumulator's precision (fp64 for fp64, fp32 otherwise), one slice of
    # [M, tiles * BLOCK_N] per split, and a count per output tile at the smallest pixel block (32).
    acc_dtype = torch.float64 if input.dtype == torch.float64 else torch.float32
    workspace, counts = split_k * m * plan.num_tiles * bn, shapes.cdiv(m, 32) * plan.num_tiles
    new_output = _output_maker(tile_order, out_shape, kernel_format)

    def launch(input, weight, bias):
        x = input.contiguous(memory_format=torch.channels_last) if copy_input else input
        out = new_output(dtype=input.dtype, device=input.device)
        if split_k > 1:
            ws = torch.empty(workspace, dtype=acc_dtype, device=input.device)
            count = torch.zeros(counts, dtype=torch.int32, device=input.device)
        else:  # unused
            ws = count = out
        # The kernel addresses packed rows as row * CG; the bias pointer is unused without a bias.
        rows = weight.contiguous() if tile_weights is None else tile_weights(weight)
        kernel(x, rows, out if bias is None else bias.contiguous(), out, ws, count)
        if tile_order:
            return tile_order.in_channel_order(out)
        return out.contiguous(memory_format=out_format)
    return launch


def subtile_launcher(plan: SubtilePlan, input: Tensor, weight: Tensor, bias: Optional[Tensor], stride, padding,
                     dilation, out_hw, gathered: bool = False) -> Callable[[Tensor, Tensor, Optional[Tensor]], Tensor]:
    """The forward over ``plan``'s groups of tiles (``stripe_fwd_sub_kernel``) for every call shaped like
    this one; stores as :func:`stripe_launcher` does without ``via_planes`` (no split-K)."""
    b, c, h, w = input.shape
    n, kh, kw = plan.mask_shape
    ho, wo = out_hw
    out_shape, out_format = (b, n, ho, wo), output_memory_format(input)
    store = (STORE_PLANES if out_format == torch.contiguous_format else STORE_TILES if gathered
             else STORE_RUNS if plan.aligned else STORE_SCATTER)
    cg = weight.shape[1]
    m = b * ho * wo
    block_k = shapes.dot_block(cg)
    copy_input = not input.is_contiguous(memory_format=torch.channels_last)
    x = shapes.meta_like(input, copy_input)
    width = plan.num_tiles * plan.sub * plan.block_n
    tile_order = TileOrder(plan.order_cols, width, out_shape) if store == STORE_TILES else None
    out = tile_order.meta if tile_order else torch.empty(out_shape, device="meta", memory_format=out_format)
    tables = (plan.sup_pos, plan.sup_npos, plan.sup_bits, plan.sup_ch, plan.sup_grp, plan.sup_rows)
    scalars = (b, h, w, ho, wo, cg, plan.num_tiles, plan.umax, *x.stride(), *out.stride(),
               stride[0], stride[1], padding[0], padding[2], dilation[0], dilation[1], kw)
    precision, acc = runtime.precision(input.dtype)
    constants = dict(
        **shapes.tuning_keys(m, c, n, plan.density, kh, kw, stride),
        HAS_BIAS=bias is not None, INPUT_PRECISION=precision, ACC_DTYPE=acc, EVEN_K=cg % block_k == 0,
        INT64_INDEX=shapes.needs_int64(x, out, torch.empty(weight.shape, device="meta")), STORE=store, SUB=plan.sub,
        BLOCK_N=plan.block_n, BLOCK_K=block_k,
    )
    kernel = runtime.TunedLaunch("stripe_fwd_sub_kernel",
                                 lambda meta: (shapes.cdiv(m, meta["BLOCK_M"]) * plan.num_tiles,), constants,
                                 fixed=gpu_select.deterministic(), bound=(*tables, *scalars))
    new_output = _output_maker(tile_order, out_shape, out_format)

    def launch(input, weight, bias):
        x = input.contiguous(memory_format=torch.channels_last) if copy_input else input
        out = new_output(dtype=input.dtype, device=input.device)
        # The kernel addresses packed rows as row * CG; the bias pointer is unused without a bias.
        kernel(x, weight.contiguous(), out if bias is None else bias.contiguous(), out)
        return tile_order.in_channel_order(out) if tile_order else out
    return launch


def tma_offered(plan: ForwardPlan, input: Tensor, weight: Tensor, stride, groups: int, out_numel: int) -> bool:
    """Whether the TMA forward can run ``plan`` for this call: tensor-core tiles, a channels_last input that
    :func:`._triton_runtime.tma_boxes` can read, and strides of 1 or 2; a stride of 2 where the input's extent
    is even (the descriptor's parity view), across the width with channel blocks that divide the channels (a
    box must not reach into the other column parity's channels)."""
    (sh, sw), (_, _, h, w), c = stride, input.shape, input.shape[1]
    return (plan.block_n >= 16 and plan.kept > 0 and output_memory_format(input) == torch.channels_last
            and sh in (1, 2) and sw in (1, 2) and h % sh == 0 and w % sw == 0
            and (sw == 1 or c % shapes.dot_block(c) == 0)
            and runtime.tma_boxes(input, c, groups, input.numel(), weight.numel(), out_numel))


def tma_launcher(plan: ForwardPlan, input: Tensor, weight: Tensor, bias: Optional[Tensor], stride, padding,
                 dilation, out_hw, gathered: bool = False, tile_weights: Optional[Callable[[Tensor], Tensor]] = None,
                 ) -> Callable[[Tensor, Tensor, Optional[Tensor]], Tensor]:
    """The forward on ``plan``'s tiles with TMA input boxes (``stripe_fwd_tma_kernel``) for every call shaped like
    this one (:func:`tma_offered` holds); stores and reads weights as :func:`stripe_launcher` does into a
    channels_last output."""
    b, c, h, w = input.shape
    n, kh, kw = plan.mask_shape
    ho, wo = out_hw
    out_shape = (b, n, ho, wo)
    block_k = shapes.dot_block(c)
    block_m, tw = shapes.tma_rectangle(ho, wo)
    sh, sw = stride
    box = [1, block_m // tw, 1, tw, block_k]  # of the input as [B, H/SH, SH, W/SW, SW*C]
    tile_order = TileOrder(plan.order_cols, plan.num_tiles * plan.block_n, out_shape) if gathered else None
    out = tile_order.meta if tile_order else torch.empty(out_shape, device="meta", memory_format=torch.channels_last)
    row_table, row_runs, _ = _tile_major(plan, weight, tile_weights)
    tables = (plan.tile_pos, plan.tile_npos, plan.tile_ch, row_table)
    scalars = (ho, wo, c, plan.num_tiles, plan.umax, *out.stride(), padding[0], padding[2], dilation[0],
               dilation[1], kw)
    precision, acc = runtime.precision(input.dtype)
    constants = dict(
        **shapes.tuning_keys(b * ho * wo, c, n, plan.density, kh, kw, stride),
        HAS_BIAS=bias is not None, INPUT_PRECISION=precision, ACC_DTYPE=acc, EVEN_K=c % block_k == 0,
        STORE=STORE_TILES if gathered else STORE_RUNS if plan.aligned else STORE_SCATTER,
        NPOS=kh * kw if plan.all_positions else 0,
        ROW_RUNS=row_runs, SH=sh, SW=sw, BLOCK_M=block_m, TW=tw, BLOCK_N=plan.block_n, BLOCK_K=block_k,
    )
    programs = b * shapes.cdiv(ho, block_m // tw) * shapes.cdiv(wo, tw) * plan.num_tiles
    kernel = runtime.TunedLaunch("stripe_fwd_tma_kernel", (programs,), constants, fixed=gpu_select.deterministic(),
                                 bound=(*tables, *scalars))
    descriptor = runtime.tensor_descriptor()
    s0, _, s2, s3 = shapes.channels_last_strides(input.shape)
    x_strides = [s0, sh * s2, s2, sw * s3, 1]
    new_output = _output_maker(tile_order, out_shape, torch.channels_last)

    def launch(input, weight, bias):
        x = input
        if not x.is_contiguous(memory_format=torch.channels_last) or x.data_ptr() % 16:
            x = x.clone(memory_format=torch.channels_last)  # a descriptor's base is 16-byte aligned
        x_desc = descriptor(x, [b, h // sh, sh, w // sw, sw * c], x_strides, box)
        out = new_output(dtype=input.dtype, device=input.device)
        # The kernel addresses packed rows as row * CG; the bias pointer is unused without a bias.
        rows = weight.contiguous() if tile_weights is None else tile_weights(weight)
        kernel(rows, x_desc, out if bias is None else bias.contiguous(), out)
        return tile_order.in_channel_order(out) if tile_order else out
    return launch


# The forward's split-K candidate: where few output pixels leave most multiprocessors idle
# (batch 1, late CIFAR layers), several programs share each output tile's reduction.
SPLIT_K_MAX = 8


def split_k(plan: ForwardPlan, m: int, cg: int, sms: int) -> int:
    """Splits of each tile's reduction that bring the forward's programs (at 64-pixel blocks) to about
    two per multiprocessor, each split keeping at least 4 iterations of BLOCK_K channels; 1 where the
    programs fill the GPU already or the reduction is short. A power of two (2, 4 or 8): each count
    is a compiled variant of the kernel."""
    programs = shapes.cdiv(m, 64) * plan.num_tiles
    iterations = plan.umax * shapes.cdiv(cg, shapes.dot_block(cg))
    split = max(1, min(SPLIT_K_MAX, shapes.cdiv(2 * sms, programs), iterations // 4))
    return 1 << (split.bit_length() - 1)
