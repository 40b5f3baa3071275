"""Launchers of the Triton backward kernels that read dy through a table of filters: grad input per
(output phase, kernel position) over the filters that keep it, grad weight per (position, row block)
split-K over pixels. They spend no work on pruned stripes; the tile kernels of
:mod:`._triton_backward_tiles` are the other candidates."""
from __future__ import annotations

import math
from typing import Callable

import torch

from ..ops import output_memory_format
from . import _triton_runtime as runtime, _triton_shapes as shapes, gpu_select
from .triton_plans import cached_plan, next_pow2


def grad_input_launcher(grad_output, weight, mask, input_shape, stride, padding, dilation, groups) -> Callable:
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
    use_dot = shapes.use_dot_backward(cg, ng)
    block_n = shapes.dot_block(cg) if use_dot else min(16, next_pow2(cg))
    block_k = 32 if use_dot else 1
    # The scalar path walks the rows of a chunk one by one: one chunk per (phase, position, group).
    chunk = block_k if use_dot else 1 << 30
    conv = (tuple(stride), (padding[0], padding[2]), tuple(dilation))
    plan = cached_plan("dgrad", mask, groups, chunk, grad_output.device, conv)
    ncb = shapes.cdiv(cg, block_n)
    sh, sw = stride
    mp_max = b * shapes.cdiv(h, sh) * shapes.cdiv(w, sw)
    copy_dy = not grad_output.is_contiguous(memory_format=torch.channels_last)
    dy = shapes.meta_like(grad_output, copy_dy)
    # Computed in NHWC (strided NCHW stores of the gathered tiles spill) and copied once if needed.
    dx = torch.empty(dx_shape, device="meta", memory_format=torch.channels_last)
    tables = (plan.chunk_off, plan.chunk_r0, plan.chunk_r1, plan.chunk_dh, plan.chunk_dw, plan.filt)
    scalars = (b, h, w, ho, wo, cg, groups, ncb, *dy.stride(), *dx.stride(), sh, sw)
    precision, acc = runtime.precision(grad_output.dtype)
    constants = dict(
        **shapes.tuning_keys(b * h * w, c, n, plan.density, kh, kw, stride),
        USE_DOT=use_dot, INPUT_PRECISION=precision, ACC_DTYPE=acc,
        INT64_INDEX=shapes.needs_int64(dy, torch.empty(weight.shape, device="meta"), dx),
        BLOCK_N=block_n, BLOCK_K=block_k,
    )
    kernel = runtime.TunedLaunch("stripe_dgrad_kernel",
                                 lambda meta: (shapes.cdiv(mp_max, meta["BLOCK_M"]) * groups * ncb, sh * sw), constants,
                                 fixed=gpu_select.deterministic(), bound=(*tables, *scalars))

    def launch(grad_output, weight):
        dy = grad_output.contiguous(memory_format=torch.channels_last) if copy_dy else grad_output
        dx = torch.empty(dx_shape, dtype=dy.dtype, device=dy.device, memory_format=torch.channels_last)
        # The kernel addresses packed rows as row * CG.
        kernel(dy, weight.contiguous(), dx)
        return dx if dx_format == torch.channels_last else dx.contiguous(memory_format=dx_format)
    return launch


def grad_weight_launcher(grad_output, input, weight, mask, stride, padding, dilation, groups,
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
    use_dot = shapes.use_dot_backward(cg, ng)
    block_r = 64 if use_dot else min(4, next_pow2(ng))
    plan = cached_plan("wgrad", mask, groups, block_r, input.device)
    block_c = shapes.dot_block(cg) if use_dot else min(4, next_pow2(cg))
    ncb = shapes.cdiv(cg, block_c)
    tiles = plan.num_blocks * ncb
    acc_torch = torch.float64 if weight.dtype == torch.float64 else torch.float32
    # Split-K over pixels so that the grid fills the GPU (>= ~4 programs per SM).
    target = 4 * runtime.num_sms(input.device)
    split = max(1, min(shapes.cdiv(target, max(1, tiles)), shapes.cdiv(m, 512)))
    if deterministic:  # bound the partial buffers to ~256 MiB
        split = max(1, min(split, (256 << 20) // max(1, s * cg * 4)))
    chunk = shapes.cdiv(shapes.cdiv(m, split), 256) * 256
    split = shapes.cdiv(m, chunk)
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
    dy, x = shapes.meta_like(grad_output, copy_dy), shapes.meta_like(input, copy_x)
    tables = (plan.blk_pos, plan.blk_r0, plan.blk_r1, plan.blk_grp, plan.filt)
    scalars = (b, h, w, ho, wo, cg, ncb, chunk, s * cg, *dy.stride(), *x.stride(),
               stride[0], stride[1], padding[0], padding[2], dilation[0], dilation[1], kw)
    precision, acc = runtime.precision(input.dtype)
    constants = dict(
        **shapes.tuning_keys(m, c, n, plan.density, kh, kw, stride),
        ATOMIC=atomic, USE_DOT=use_dot, INPUT_PRECISION=precision, ACC_DTYPE=acc,
        INT64_INDEX=shapes.needs_int64(dy, x, torch.empty(buf_shape, device="meta")),
        BLOCK_R=block_r, BLOCK_C=block_c,
    )
    kernel = runtime.TunedLaunch("stripe_wgrad_kernel", (tiles, split), constants, fixed=deterministic,
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
