"""Grad weight over blocks of each position's packed rows: ``stripe_wgrad_kernel``."""
from __future__ import annotations

import triton
import triton.language as tl

from ._indexing import _pixel_coords
from ._tuning import UNSPECIALISED, WGRAD_CONFIGS, WGRAD_KEY, _TUNE_EXTRAS


@triton.autotune(configs=WGRAD_CONFIGS, key=WGRAD_KEY, reset_to_zero=["dw_ptr"], **_TUNE_EXTRAS)
@triton.jit(do_not_specialize=UNSPECIALISED)
def stripe_wgrad_kernel(
    dy_ptr, x_ptr, dw_ptr,
    blk_pos_ptr, blk_r0_ptr, blk_r1_ptr, blk_grp_ptr, filt_ptr,
    B, H, W, Ho, Wo, CG, NCB, CHUNK, SPLIT_STRIDE,
    sdb, sdc, sdh, sdw,
    sxb, sxc, sxh, sxw,
    SH, SW, PT, PL, DH, DW, KW,
    KEY_M, KEY_C, KEY_N, KEY_DENSITY, KEY_CONV,
    ATOMIC: tl.constexpr, USE_DOT: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    ACC_DTYPE: tl.constexpr, INT64_INDEX: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid = tl.program_id(0)
    split = tl.program_id(1)
    blk = pid // NCB
    c0 = (pid - blk * NCB) * BLOCK_C
    p = tl.load(blk_pos_ptr + blk)
    r0 = tl.load(blk_r0_ptr + blk)
    r1 = tl.load(blk_r1_ptr + blk)
    g = tl.load(blk_grp_ptr + blk)
    i = p // KW
    j = p - i * KW
    rows = r0 + tl.arange(0, BLOCK_R)
    r_ok = rows < r1
    n = tl.load(filt_ptr + rows, mask=r_ok, other=0)
    offs_c = c0 + tl.arange(0, BLOCK_C)
    c_ok = offs_c < CG
    if INT64_INDEX:
        rows, n, offs_c = rows.to(tl.int64), n.to(tl.int64), offs_c.to(tl.int64)
    x_ch = (g * CG + offs_c) * sxc
    dy_ch = n * sdc

    M = B * Ho * Wo
    m_start = split * CHUNK
    m_end = tl.minimum(M, m_start + CHUNK)
    acc = tl.zeros((BLOCK_R, BLOCK_C), dtype=ACC_DTYPE)
    for m0 in range(m_start, m_end, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        m_ok = offs_m < m_end
        b, ho, wo = _pixel_coords(offs_m, Ho, Wo, INT64_INDEX)
        hi = ho * SH - PT + i * DH
        wi = wo * SW - PL + j * DW
        x_ok = m_ok & (hi >= 0) & (hi < H) & (wi >= 0) & (wi < W)
        dyt = tl.load(dy_ptr + dy_ch[:, None] + (b * sdb + ho * sdh + wo * sdw)[None, :],
                      mask=r_ok[:, None] & m_ok[None, :], other=0.0)
        xt = tl.load(x_ptr + x_ch[None, :] + (b * sxb + hi * sxh + wi * sxw)[:, None],
                     mask=x_ok[:, None] & c_ok[None, :], other=0.0)
        if USE_DOT:
            acc = tl.dot(dyt, xt, acc, input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)
        else:
            acc += tl.sum(dyt.to(ACC_DTYPE)[:, :, None] * xt.to(ACC_DTYPE)[None, :, :], axis=1)

    dw_ptrs = dw_ptr + rows[:, None] * CG + offs_c[None, :]
    out_mask = r_ok[:, None] & c_ok[None, :]
    if ATOMIC:
        tl.atomic_add(dw_ptrs, acc, mask=out_mask)
    else:
        tl.store(dw_ptrs + split.to(tl.int64) * SPLIT_STRIDE, acc.to(dw_ptr.dtype.element_ty), mask=out_mask)
