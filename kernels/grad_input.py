"""Grad input over each position's kept filters, by output phase: ``stripe_dgrad_kernel``."""
from __future__ import annotations

import triton
import triton.language as tl

from ._indexing import _pixel_coords
from ._tuning import DGRAD_CONFIGS, DGRAD_KEY, UNSPECIALISED, _TUNE_EXTRAS


@triton.jit
def _output_phase(H, W, SH, SW):
    """This program's output phase (grid axis 1): its index, (rh, rw), and the Hp x Wp plane of its input
    pixels (rh + SH * hp, rw + SW * wp)."""
    phase = tl.program_id(1)
    rh = phase // SW
    rw = phase - rh * SW
    Hp = (H - rh + SH - 1) // SH
    Wp = (W - rw + SW - 1) // SW
    return phase, rh, rw, Hp, Wp


@triton.jit
def _dgrad_program(H, W, B, G, NCB, SH, SW, BLOCK_N: tl.constexpr):
    """A grad-input program's work: output phase (rh, rw) on grid axis 1 (the input pixels
    (rh + SH * hp, rw + SW * wp), Mp = B * Hp * Wp of them), then group g and channel block c0
    (axis 0, fastest) and the block pid_m of phase pixels."""
    pid = tl.program_id(0)
    phase, rh, rw, Hp, Wp = _output_phase(H, W, SH, SW)
    Mp = B * Hp * Wp
    ncol = G * NCB
    pid_c = pid % ncol
    pid_m = pid // ncol
    g = pid_c // NCB
    c0 = (pid_c - g * NCB) * BLOCK_N
    return phase, rh, rw, g, c0, pid_m, Mp, Hp, Wp


@triton.jit
def _dgrad_pixels(pid_m, Mp, Hp, Wp, c0, CG, INT64_INDEX: tl.constexpr, BLOCK_M: tl.constexpr,
                  BLOCK_N: tl.constexpr):
    """The phase pixels (b, hp, wp) of block ``pid_m`` and the channels ``c0 + [0, BLOCK_N)``, with their masks."""
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < Mp
    b, hp, wp = _pixel_coords(offs_m, Hp, Wp, INT64_INDEX)
    offs_c = c0 + tl.arange(0, BLOCK_N)
    c_ok = offs_c < CG
    return b, hp, wp, m_ok, offs_c, c_ok


@triton.jit
def _dy_tap(hp, wp, dh_ptr, dw_ptr, k, m_ok, Ho, Wo):
    """The dy pixel (ho, wo) that entry ``k`` of a phase's table reads for the phase pixels (hp, wp)
    (offsets ``dh_ptr[k]``, ``dw_ptr[k]``), and where it lies inside dy."""
    ho = hp + tl.load(dh_ptr + k)
    wo = wp + tl.load(dw_ptr + k)
    return ho, wo, _dy_inside(ho, wo, m_ok, Ho, Wo)


@triton.jit
def _dy_inside(ho, wo, m_ok, Ho, Wo):
    """Which of the dy pixels (ho, wo) lie inside dy (and belong to pixels of the block)."""
    return m_ok & (ho >= 0) & (ho < Ho) & (wo >= 0) & (wo < Wo)


@triton.jit
def _dgrad_chunk(r0_ptr, r1_ptr, dh_ptr, dw_ptr, filt_ptr, k, k_end, offs_r):
    """Chunk ``k``'s packed rows [r0, r1), dy offsets (dh, dw) and the filter of each row (zeros past
    ``k_end``: the read-ahead of a chunk that does not come)."""
    here = k < k_end
    r0 = tl.load(r0_ptr + k, mask=here, other=0)
    r1 = tl.load(r1_ptr + k, mask=here, other=0)
    dh = tl.load(dh_ptr + k, mask=here, other=0)
    dw = tl.load(dw_ptr + k, mask=here, other=0)
    n = tl.load(filt_ptr + r0 + offs_r, mask=r0 + offs_r < r1, other=0)
    return r0, r1, dh, dw, n


@triton.jit
def _store_dx(dx_ptr, acc, b, hp, wp, rh, rw, g, offs_c, m_ok, c_ok, CG, sxb, sxc, sxh, sxw, SH, SW):
    """dx at the phase pixels' input positions, channels of group g."""
    hi = rh + hp * SH
    wi = rw + wp * SW
    dx_ptrs = (dx_ptr + (b * sxb)[:, None] + (g * CG + offs_c)[None, :] * sxc
               + (hi * sxh + wi * sxw)[:, None])
    tl.store(dx_ptrs, acc.to(dx_ptr.dtype.element_ty), mask=m_ok[:, None] & c_ok[None, :])


@triton.autotune(configs=DGRAD_CONFIGS, key=DGRAD_KEY, **_TUNE_EXTRAS)
@triton.jit(do_not_specialize=UNSPECIALISED)
def stripe_dgrad_kernel(
    dy_ptr, w_ptr, dx_ptr,
    chunk_off_ptr, chunk_r0_ptr, chunk_r1_ptr, chunk_dh_ptr, chunk_dw_ptr, filt_ptr,
    B, H, W, Ho, Wo, CG, G, NCB,
    sdb, sdc, sdh, sdw,
    sxb, sxc, sxh, sxw,
    SH, SW,
    KEY_M, KEY_C, KEY_N, KEY_DENSITY, KEY_CONV,
    USE_DOT: tl.constexpr, INPUT_PRECISION: tl.constexpr, ACC_DTYPE: tl.constexpr,
    INT64_INDEX: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    phase, rh, rw, g, c0, pid_m, Mp, Hp, Wp = _dgrad_program(H, W, B, G, NCB, SH, SW, BLOCK_N)
    if pid_m * BLOCK_M < Mp:
        b, hp, wp, m_ok, offs_c, c_ok = _dgrad_pixels(pid_m, Mp, Hp, Wp, c0, CG, INT64_INDEX, BLOCK_M, BLOCK_N)
        dy_row = b * sdb
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE)
        # One flat loop over the chunks of this (phase, group): a chunk is up to BLOCK_K packed
        # rows of one position whose taps line up with the phase, and (dh, dw) is where that
        # position reads dy relative to the phase pixel (hp, wp).
        k_begin = tl.load(chunk_off_ptr + phase * G + g)
        k_end = tl.load(chunk_off_ptr + phase * G + g + 1)
        if USE_DOT:
            offs_r = tl.arange(0, BLOCK_K)
            # Each chunk's table entries are read one chunk ahead, into registers, as in the forward (a
            # table read that addresses the same iteration's tiles serialises the pipeliner's stages).
            r0_next, r1_next, dh_next, dw_next, n_next = _dgrad_chunk(
                chunk_r0_ptr, chunk_r1_ptr, chunk_dh_ptr, chunk_dw_ptr, filt_ptr, k_begin, k_end, offs_r)
            for kk in range(k_begin, k_end):
                r0, r1, dh, dw, n = r0_next, r1_next, dh_next, dw_next, n_next
                r0_next, r1_next, dh_next, dw_next, n_next = _dgrad_chunk(
                    chunk_r0_ptr, chunk_r1_ptr, chunk_dh_ptr, chunk_dw_ptr, filt_ptr, kk + 1, k_end, offs_r)
                ho = hp + dh
                wo = wp + dw
                ok = _dy_inside(ho, wo, m_ok, Ho, Wo)
                dy_off = dy_row + ho * sdh + wo * sdw
                rows = r0 + offs_r
                r_ok = rows < r1
                if INT64_INDEX:
                    rows = rows.to(tl.int64)
                    n = n.to(tl.int64)
                dyt = tl.load(dy_ptr + dy_off[:, None] + n[None, :] * sdc,
                              mask=ok[:, None] & r_ok[None, :], other=0.0)
                wt = tl.load(w_ptr + rows[:, None] * CG + offs_c[None, :],
                             mask=r_ok[:, None] & c_ok[None, :], other=0.0)
                acc = tl.dot(dyt, wt, acc, input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)
        else:
            # Channel counts too small for tensor cores: each chunk is every row of one position, walked
            # one row at a time. Its table entries are read in the iteration that uses them: the rows'
            # loop takes its bounds from them, and bounds carried over from the previous iteration
            # computed wrong results on sm_90.
            for kk in range(k_begin, k_end):
                r0 = tl.load(chunk_r0_ptr + kk)
                r1 = tl.load(chunk_r1_ptr + kk)
                ho, wo, ok = _dy_tap(hp, wp, chunk_dh_ptr, chunk_dw_ptr, kk, m_ok, Ho, Wo)
                dy_off = dy_row + ho * sdh + wo * sdw
                for r in range(r0, r1):
                    f = tl.load(filt_ptr + r)
                    dv = tl.load(dy_ptr + dy_off + f * sdc, mask=ok, other=0.0).to(ACC_DTYPE)
                    wv = tl.load(w_ptr + r * CG + offs_c, mask=c_ok, other=0.0).to(ACC_DTYPE)
                    acc += dv[:, None] * wv[None, :]
        _store_dx(dx_ptr, acc, b, hp, wp, rh, rw, g, offs_c, m_ok, c_ok, CG, sxb, sxc, sxh, sxw, SH, SW)
