"""Gathers: dy's columns into the forward's tile order (``stripe_gather_columns_kernel``) and the packed
rows into a dense weight (``stripe_scatter_rows_kernel``)."""
from __future__ import annotations

import triton
import triton.language as tl

from ._indexing import _pixel_coords


@triton.jit
def stripe_gather_columns_kernel(
    src_ptr, dst_ptr, cols_ptr,
    M, Ho, Wo, NCOL,
    ssb, ssc, ssh, ssw,
    INT64_INDEX: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """dst[m, j] = src[pixel m, channel cols[j]] (0 where cols[j] < 0): dy in the forward's tile
    order, [pixels, T * BLOCK_T] contiguous, so that the tile kernels of the backward load
    contiguous rows of filters (a gather of 2-byte channels inside them is several times slower).
    The column blocks of one pixel block are consecutive programs: they read the same source rows
    (each column block's channels are scattered over them) while those are in cache."""
    ncb = tl.cdiv(NCOL, BLOCK_N)
    pid_m = tl.program_id(0) // ncb
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = (tl.program_id(0) - pid_m * ncb) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = offs_m < M
    n_ok = offs_n < NCOL
    if INT64_INDEX:
        offs_m = offs_m.to(tl.int64)
    b, ho, wo = _pixel_coords(offs_m, Ho, Wo, False)  # offs_m is widened already where needed
    col = tl.load(cols_ptr + offs_n, mask=n_ok, other=-1)
    src = src_ptr + (b * ssb + ho * ssh + wo * ssw)[:, None] + col[None, :] * ssc
    v = tl.load(src, mask=m_ok[:, None] & (col >= 0)[None, :], other=0.0)
    tl.store(dst_ptr + offs_m[:, None] * NCOL + offs_n[None, :], v, mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def stripe_scatter_rows_kernel(
    src_ptr, dst_ptr, rows_ptr,
    R, CG,
    INT64_INDEX: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """dst[r, c] = src[rows[r], c] (0 where rows[r] < 0): the packed [S, CG] rows scattered into a dense
    weight of R = N * kh * kw rows in one launch (the cuDNN hand-over's weight, which a CUDA graph
    scatters again on every replay)."""
    offs_r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    r_ok = offs_r < R
    c_ok = offs_c < CG
    row = tl.load(rows_ptr + offs_r, mask=r_ok, other=-1)
    if INT64_INDEX:
        offs_r = offs_r.to(tl.int64)
        row = row.to(tl.int64)
    v = tl.load(src_ptr + row[:, None] * CG + offs_c[None, :], mask=(row >= 0)[:, None] & c_ok[None, :], other=0.0)
    tl.store(dst_ptr + offs_r[:, None] * CG + offs_c[None, :], v, mask=r_ok[:, None] & c_ok[None, :])
