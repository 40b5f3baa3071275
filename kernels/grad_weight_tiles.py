"""Grad weight over the forward's filter tiles: ``stripe_wgrad_tiles_kernel`` and its TMA variant
``stripe_wgrad_tiles_tma_kernel``."""
from __future__ import annotations

import triton
import triton.language as tl

from ._indexing import _inside, _pixel_coords, _pixel_step
from ._tma_boxes import _rectangle
from ._tuning import (
    TMA_FWD_CONFIGS, TMA_WGRAD_KEY, UNSPECIALISED, WGRAD_TILES_CONFIGS, WGRAD_TILES_KEY, _TUNE_EXTRAS,
    wgrad_tiles_configs_for,
)


@triton.jit
def _wgrad_tile_entry(ent_t_ptr, ent_u_ptr, tile_pos_ptr, NCB, UMAX, BLOCK_C: tl.constexpr):
    """This program's first channel c0 (channel blocks fastest on grid axis 0), and its (tile, union position)
    entry: tile t, union index u and kernel position p."""
    pid = tl.program_id(0)
    e = pid // NCB
    c0 = (pid - e * NCB) * BLOCK_C
    t = tl.load(ent_t_ptr + e)
    u = tl.load(ent_u_ptr + e)
    p = tl.load(tile_pos_ptr + t * UMAX + u)
    return c0, t, u, p


@triton.jit
def _wgrad_x_tile(x_ptr, x_ch, c_ok, x_pix, hi, wi, ok, H, W, sxh, sxw, INT64_INDEX: tl.constexpr):
    """x's [BLOCK_C, BLOCK_M] tile at input pixels (hi, wi): zeros past the borders and where not ``ok``."""
    ok = ok & _inside(hi, H, INT64_INDEX) & _inside(wi, W, INT64_INDEX)
    return tl.load(x_ptr + x_ch[:, None] + (x_pix + hi * sxh + wi * sxw)[None, :], mask=c_ok[:, None] & ok[None, :],
                   other=0.0)


@triton.autotune(configs=WGRAD_TILES_CONFIGS, key=WGRAD_TILES_KEY, reset_to_zero=["dw_ptr"],
                 prune_configs_by={"early_config_prune": wgrad_tiles_configs_for}, **_TUNE_EXTRAS)
@triton.jit(do_not_specialize=UNSPECIALISED)
def stripe_wgrad_tiles_kernel(
    dy_ptr, x_ptr, dw_ptr, w_rows_ptr, dy_col0_ptr,
    ent_t_ptr, ent_u_ptr, ent_n_ptr, tile_pos_ptr, tile_grp_ptr,
    B, H, W, Ho, Wo, CG, NCB, UMAX, CHUNK,
    sdb, sdc, sdh, sdw,
    sxb, sxc, sxh, sxw,
    SH, SW, PT, PL, DH, DW, KW,
    KEY_M, KEY_C, KEY_N, KEY_DENSITY, KEY_CONV,
    ATOMIC: tl.constexpr, INPUT_PRECISION: tl.constexpr, ACC_DTYPE: tl.constexpr, INT64_INDEX: tl.constexpr,
    PER: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
    BY_POSITION: tl.constexpr = False, RUN: tl.constexpr = 1,
):
    """Grad weight over the forward's filter tiles: per (tile, position of its union) a
    [channels, pixels] x [pixels, BLOCK_T filters] product (channels on the M side: BLOCK_C = 64 makes
    it a warpgroup MMA on Hopper whatever the tile width, where [BLOCK_T, pixels] x [pixels, channels]
    with a 16 or 32-wide tile is not), split-K over pixels (grid axis 1) and added atomically into the
    fp32 rows that the tile's filters keep (the others are dropped); with a single split (not
    ``ATOMIC``) each kept row is written once, in the buffer's dtype. dy's columns as in
    ``stripe_dgrad_tiles_kernel``.

    With PER = 2 or 3 a program takes that many consecutive entries of one tile's union
    (``ent_u[e]`` on, ``ent_n[e]`` of them): each block of dy is loaded once for all of them, and their
    x tiles, the same pixels shifted by a position, largely share cache lines. An entry past
    ``ent_n[e]`` multiplies zeros and is not stored.

    BY_POSITION: each entry e is one kernel position (``ent_t[e]``) of one group (``ent_u[e]``) and the
    BLOCK_T dy columns of several tiles whose unions hold it, in runs of RUN (a tile's width): their dy
    columns ``dy_col0[e * BLOCK_T + j]`` and packed rows ``w_rows[e * BLOCK_T + j]``. x's tile is loaded
    once for them all, where the (tile, position) entries load it once per tile: narrow tiles keep the
    stripes computed few, and this keeps the x tiles read per product as few as a wide tile's."""
    tl.static_assert(not BY_POSITION or PER == 1)
    offs_t = tl.arange(0, BLOCK_T)
    if BY_POSITION:
        e = tl.program_id(0) // NCB
        c0 = (tl.program_id(0) - e * NCB) * BLOCK_C
        p = tl.load(ent_t_ptr + e)
        g = tl.load(ent_u_ptr + e)
        cols = tl.load(dy_col0_ptr + e * BLOCK_T + offs_t)
        dy_col = tl.max_contiguous(tl.multiple_of(cols, RUN), RUN) * sdc
        rows = w_rows_ptr + e * BLOCK_T
    else:
        c0, t, u, p = _wgrad_tile_entry(ent_t_ptr, ent_u_ptr, tile_pos_ptr, NCB, UMAX, BLOCK_C)
        g = tl.load(tile_grp_ptr + t)
        dy_col = (tl.multiple_of(tl.load(dy_col0_ptr + t), BLOCK_T) + offs_t) * sdc
        rows = w_rows_ptr + (t * UMAX + u) * BLOCK_T
    split = tl.program_id(1)
    if PER > 1:
        count = tl.load(ent_n_ptr + tl.program_id(0) // NCB)
        # per pixel (Triton's interpreter makes an int of a pixel mask and a scalar bool)
        count_m = tl.arange(0, BLOCK_M) * 0 + count
        p1 = tl.load(tile_pos_ptr + t * UMAX + u + tl.minimum(1, count - 1))
        i1 = p1 // KW
        off_h1 = i1 * DH - PT
        off_w1 = (p1 - i1 * KW) * DW - PL
    if PER > 2:
        p2 = tl.load(tile_pos_ptr + t * UMAX + u + tl.minimum(2, count - 1))
        i2 = p2 // KW
        off_h2 = i2 * DH - PT
        off_w2 = (p2 - i2 * KW) * DW - PL
    i = p // KW
    off_h = i * DH - PT
    off_w = (p - i * KW) * DW - PL
    offs_c = c0 + tl.arange(0, BLOCK_C)
    c_ok = offs_c < CG
    if INT64_INDEX:
        offs_c = offs_c.to(tl.int64)
    x_ch = (g * CG + offs_c) * sxc

    M = B * Ho * Wo
    m_start = split * CHUNK
    m_end = tl.minimum(M, m_start + CHUNK)
    acc = tl.zeros((BLOCK_C, BLOCK_T), dtype=ACC_DTYPE)
    if PER > 1:
        acc1 = tl.zeros((BLOCK_C, BLOCK_T), dtype=ACC_DTYPE)
    if PER > 2:
        acc2 = tl.zeros((BLOCK_C, BLOCK_T), dtype=ACC_DTYPE)
    # Each block of pixels advances the last one's coordinates (no division per pixel in the loop).
    offs_m = m_start + tl.arange(0, BLOCK_M)
    b, ho, wo = _pixel_coords(offs_m, Ho, Wo, INT64_INDEX)
    step_b, step_h, step_w = BLOCK_M // (Ho * Wo), (BLOCK_M // Wo) % Ho, BLOCK_M % Wo
    for m0 in range(m_start, m_end, BLOCK_M):
        m_ok = offs_m < m_end
        dyt = tl.load(dy_ptr + (b * sdb + ho * sdh + wo * sdw)[:, None] + dy_col[None, :], mask=m_ok[:, None],
                      other=0.0)
        x_pix = b * sxb
        h0 = ho * SH
        w0 = wo * SW
        xt = _wgrad_x_tile(x_ptr, x_ch, c_ok, x_pix, h0 + off_h, w0 + off_w, m_ok, H, W, sxh, sxw, INT64_INDEX)
        acc = tl.dot(xt, dyt, acc, input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)
        if PER > 1:
            xt = _wgrad_x_tile(x_ptr, x_ch, c_ok, x_pix, h0 + off_h1, w0 + off_w1, m_ok & (count_m > 1), H, W, sxh,
                               sxw, INT64_INDEX)
            acc1 = tl.dot(xt, dyt, acc1, input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)
        if PER > 2:
            xt = _wgrad_x_tile(x_ptr, x_ch, c_ok, x_pix, h0 + off_h2, w0 + off_w2, m_ok & (count_m > 2), H, W, sxh,
                               sxw, INT64_INDEX)
            acc2 = tl.dot(xt, dyt, acc2, input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)
        offs_m += BLOCK_M
        b, ho, wo = _pixel_step(b, ho, wo, step_b, step_h, step_w, Ho, Wo)

    _store_wgrad_tile(dw_ptr, acc, rows, offs_t, offs_c, c_ok, CG, ATOMIC, INT64_INDEX)
    if PER > 1:
        if count > 1:
            _store_wgrad_tile(dw_ptr, acc1, rows + BLOCK_T, offs_t, offs_c, c_ok, CG, ATOMIC, INT64_INDEX)
    if PER > 2:
        if count > 2:
            _store_wgrad_tile(dw_ptr, acc2, rows + 2 * BLOCK_T, offs_t, offs_c, c_ok, CG, ATOMIC, INT64_INDEX)


@triton.jit
def _store_wgrad_tile(dw_ptr, acc, rows_ptr, offs_t, offs_c, c_ok, CG, ATOMIC: tl.constexpr, INT64_INDEX: tl.constexpr,
                      FILTERS_FIRST: tl.constexpr = False):
    """Puts a [BLOCK_C, BLOCK_T] grad-weight tile ([BLOCK_T, BLOCK_C] with FILTERS_FIRST) into the packed rows
    its filters keep (``rows_ptr``: one per filter, -1 where absent, dropped): added atomically into fp32
    with ATOMIC, else stored in dw's dtype."""
    rows = tl.load(rows_ptr + offs_t)
    if INT64_INDEX:
        rows = rows.to(tl.int64)
    if FILTERS_FIRST:
        dw_ptrs = dw_ptr + rows[:, None] * CG + offs_c[None, :]
        keep = (rows >= 0)[:, None] & c_ok[None, :]
    else:
        dw_ptrs = dw_ptr + rows[None, :] * CG + offs_c[:, None]
        keep = c_ok[:, None] & (rows >= 0)[None, :]
    if ATOMIC:
        tl.atomic_add(dw_ptrs, acc, mask=keep)
    else:
        tl.store(dw_ptrs, acc.to(dw_ptr.dtype.element_ty), mask=keep)


# Grad weight with both operands loaded by the TMA: over rectangles of output pixels, dy's tile is the
# [1, TH, TW, BLOCK_T] box of the rectangle (zero past dy's edges, so the x pixels of a partial rectangle
# add nothing) and x's the forward's box of the position, in the same parity view for stride 2. The product
# is [filters, pixels] x [pixels, channels] with dy's tile transposed: a reshaped box as wgmma's A operand is
# copied to registers (see _box_acc), and ptxas then runs one MMA at a time; with the filters on the M side
# the 16- and 32-wide tiles take mma.sync instead (shorter loops, sm_90, triton 3.6), and where rectangles
# are whole rows of dy (TW = Wo, TH divides Ho: DY_ROWS) they are runs of BLOCK_M consecutive pixels, dy's
# tile is a plain 2-d box, and the 64- and 128-wide tiles read both operands from shared memory (async wgmma).

@triton.autotune(configs=TMA_FWD_CONFIGS, key=TMA_WGRAD_KEY, reset_to_zero=["dw_ptr"], **_TUNE_EXTRAS)
@triton.jit(do_not_specialize=UNSPECIALISED)
def stripe_wgrad_tiles_tma_kernel(
    dy_desc, x_desc, dw_ptr, w_rows_ptr, dy_col0_ptr,
    ent_t_ptr, ent_u_ptr, tile_pos_ptr,
    Ho, Wo, CG, NCB, UMAX, CHUNK, R,
    PT, PL, DH, DW, KW: tl.constexpr,
    KEY_M, KEY_C, KEY_N, KEY_DENSITY, KEY_CONV,
    ATOMIC: tl.constexpr, INPUT_PRECISION: tl.constexpr, ACC_DTYPE: tl.constexpr, SH: tl.constexpr,
    SW: tl.constexpr, DY_ROWS: tl.constexpr, BLOCK_M: tl.constexpr, TW: tl.constexpr, BLOCK_T: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """Grad weight over the forward's filter tiles (``stripe_wgrad_tiles_kernel`` for strides 1 and 2, one
    group): per (tile, union position) entry and BLOCK_C channels a product over the R TH x TW rectangles of
    output pixels, split-K over CHUNK rectangles (grid axis 1)."""
    TH: tl.constexpr = BLOCK_M // TW
    c0, t, u, p = _wgrad_tile_entry(ent_t_ptr, ent_u_ptr, tile_pos_ptr, NCB, UMAX, BLOCK_C)
    col0 = tl.multiple_of(tl.load(dy_col0_ptr + t), BLOCK_T)
    i = p // KW
    off_h = i * DH - PT  # as in stripe_fwd_tma_kernel: the box coordinates of the position's input pixels
    off_w = (p - i * KW) * DW - PL
    xh, xph = off_h >> (SH - 1), off_h & (SH - 1)
    xw, xc = off_w >> (SW - 1), (off_w & (SW - 1)) * CG + c0

    r = tl.program_id(1) * CHUNK
    r_end = tl.minimum(R, r + CHUNK)
    b, h0, w0 = _rectangle(r, Ho, Wo, BLOCK_M, TW)
    acc = tl.zeros((BLOCK_T, BLOCK_C), dtype=ACC_DTYPE)
    for rect in range(r, r_end):  # each rectangle steps from the last one (no division in the loop)
        xt = x_desc.load([b, h0 + xh, xph, w0 + xw, xc]).reshape(BLOCK_M, BLOCK_C)
        if DY_ROWS:
            dyt = dy_desc.load([rect * BLOCK_M, col0])
        else:
            dyt = dy_desc.load([b, h0, w0, col0]).reshape(BLOCK_M, BLOCK_T)
        acc = tl.dot(tl.trans(dyt), xt, acc, input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)
        w0 += TW
        row_done = w0 >= Wo
        w0 = tl.where(row_done, 0, w0)
        h0 = tl.where(row_done, h0 + TH, h0)
        image_done = h0 >= Ho
        h0 = tl.where(image_done, 0, h0)
        b = tl.where(image_done, b + 1, b)

    offs_c = c0 + tl.arange(0, BLOCK_C)
    # (filters first: each kept row's channels are contiguous in dw)
    _store_wgrad_tile(dw_ptr, acc, w_rows_ptr + (t * UMAX + u) * BLOCK_T, tl.arange(0, BLOCK_T), offs_c,
                      offs_c < CG, CG, ATOMIC, False, FILTERS_FIRST=True)
