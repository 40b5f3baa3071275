"""Rectangles of pixels and products of TMA boxes, shared by the TMA kernels.

Hopper and later GPUs copy a box of a tensor into shared memory in one instruction (TMA), zero-filling
what lies outside the tensor, negative coordinates included: at stride 1, a [1, TH, TW, BLOCK_K] box of
the NHWC input at (b, h0 + i*DH - PT, w0 + j*DW - PL, c0) is the input tile of a TH x TW rectangle of
output pixels at position (i, j), borders and all, with no per-pixel addresses or masks in the kernel.
So a program computes a rectangle of one image's output pixels (the host picks TW to waste the fewest
pixels at the image's edges). A box has no element stride; for stride 2 the descriptor views the input
as [B, H/SH, SH, W/SW, SW*C] (row parity its own dimension, column parity folded into the channels), and
a position's tile is the [1, TH, 1, TW, BLOCK_K] box of its parities. The descriptor is 5-d at stride 1
too ([B, H, 1, W, C]).
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _rectangle(rect, H, W, BLOCK_M: tl.constexpr, TW: tl.constexpr):
    """Image b and top-left pixel (h0, w0) of the ``rect``-th TH x TW rectangle (TH = BLOCK_M // TW) of
    B images of H x W pixels, row-major within an image."""
    TH: tl.constexpr = BLOCK_M // TW
    tiles_w = tl.cdiv(W, TW)
    tiles_h = tl.cdiv(H, TH)
    h0 = (rect // tiles_w) % tiles_h * TH
    w0 = rect % tiles_w * TW
    b = rect // (tiles_w * tiles_h)
    return b, h0, w0


@triton.jit
def _rectangle_pixels(h0, w0, H, W, BLOCK_M: tl.constexpr, TW: tl.constexpr):
    """The rectangle's pixels (h, w), in the row-major order of a reshaped box, and which lie inside the image."""
    offs_m = tl.arange(0, BLOCK_M)
    h = h0 + offs_m // TW
    w = w0 + offs_m % TW
    return h, w, (h < H) & (w < W)


# A reshaped 4-d box is not a layout that wgmma's A operand reads from shared memory, so Triton (3.6, 3.9)
# copies it into registers first (ldmatrix, register-A wgmma that waits for each MMA); as the B operand it
# is read in place. With 64 or more columns in the other operand (wgmma's minimum M) the TMA kernels take
# their products transposed, acc^T = w^T box^T, and turn the accumulator around once at the end.

@triton.jit
def _box_acc(BLOCK_M: tl.constexpr, N: tl.constexpr, ACC_DTYPE: tl.constexpr):
    """The zero accumulator of a TMA kernel's [BLOCK_M, N] result, [N, BLOCK_M] where it is taken transposed."""
    if N >= 64:
        acc = tl.zeros((N, BLOCK_M), dtype=ACC_DTYPE)
    else:
        acc = tl.zeros((BLOCK_M, N), dtype=ACC_DTYPE)
    return acc


@triton.jit
def _box_dot(acc, box, wt, N: tl.constexpr, INPUT_PRECISION: tl.constexpr, ACC_DTYPE: tl.constexpr):
    """acc + box @ wt for a [BLOCK_M, K] box and a [K, N] weight tile, in :func:`_box_acc`'s orientation."""
    if N >= 64:
        acc = tl.dot(tl.trans(wt), tl.trans(box), acc, input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)
    else:
        acc = tl.dot(box, wt, acc, input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)
    return acc


@triton.jit
def _box_result(acc, N: tl.constexpr):
    """The [BLOCK_M, N] result of a :func:`_box_acc` accumulator."""
    if N >= 64:
        acc = tl.trans(acc)
    return acc
