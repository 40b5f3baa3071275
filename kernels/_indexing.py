"""Pixel coordinates and border tests the pointer kernels share."""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _pixel_coords(offs, H, W, INT64_INDEX: tl.constexpr):
    """(b, h, w) of flat pixel indices ``offs`` over [B, H, W]; int64 where offsets exceed int32
    (widened once here, all offsets computed from them follow)."""
    w = offs % W
    tmp = offs // W
    h = tmp % H
    b = tmp // H
    if INT64_INDEX:
        b, h, w = b.to(tl.int64), h.to(tl.int64), w.to(tl.int64)
    return b, h, w


@triton.jit
def _pixel_step(b, h, w, step_b, step_h, step_w, H, W):
    """(b, h, w) advanced by a step of flat pixels whose own coordinates are (step_b, step_h, step_w),
    with step_h < H and step_w < W: one carry per axis instead of two divisions per pixel."""
    w = w + step_w
    carry = w >= W
    w = tl.where(carry, w - W, w)
    h = h + step_h + carry.to(h.dtype)
    carry = h >= H
    h = tl.where(carry, h - H, h)
    return b + step_b + carry.to(b.dtype), h, w


@triton.jit
def _inside(v, n, INT64_INDEX: tl.constexpr):
    """0 <= v < n in one unsigned comparison (a negative v wraps above any n)."""
    if INT64_INDEX:
        return v.to(tl.uint64, bitcast=True) < n.to(tl.uint64)
    else:
        return v.to(tl.uint32, bitcast=True) < n.to(tl.uint32)


@triton.jit
def _window_at(p, h_base, w_base, m_ok, KW, DH, DW, H, W):
    """Input row and column of kernel position ``p`` for output pixels whose window starts at (h_base, w_base),
    and whether the pixel reads inside the input (False also where ``m_ok`` is)."""
    i = p // KW
    j = p - i * KW
    hi = h_base + i * DH
    wi = w_base + j * DW
    return hi, wi, m_ok & (hi >= 0) & (hi < H) & (wi >= 0) & (wi < W)
