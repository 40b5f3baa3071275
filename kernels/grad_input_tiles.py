"""Grad input over the forward's filter tiles: ``stripe_dgrad_tiles_kernel`` and its TMA variant
``stripe_dgrad_tiles_tma_kernel``."""
from __future__ import annotations

import triton
import triton.language as tl

from ._indexing import _inside
from ._tma_boxes import _box_acc, _box_dot, _box_result, _rectangle, _rectangle_pixels
from ._tuning import (
    DGRAD_TILES_CONFIGS, DGRAD_TILES_KEY, TMA_DGRAD_KEY, TMA_FWD_CONFIGS, UNSPECIALISED, _TUNE_EXTRAS, tma_configs_for,
    through_l1_configs_for
)
from .grad_input import _dgrad_pixels, _dgrad_program, _output_phase, _store_dx


@triton.jit
def _dgrad_tile_entry(ent_t_ptr, ent_u_ptr, ent_dh_ptr, ent_dw_ptr, dy_col0_ptr, w_rows_ptr, e, e_end, UMAX, offs_t,
                      ROW_RUNS: tl.constexpr, BLOCK_T: tl.constexpr):
    """Entry ``e`` of a phase's (tile, union position) list: its dy offsets (dh, dw), the tile's first dy
    column and its packed weight rows (the first of a run with ROW_RUNS, else one per filter, -1: absent);
    past ``e_end`` (the read-ahead of an entry that does not come) zeros and absent rows."""
    here = e < e_end
    t = tl.load(ent_t_ptr + e, mask=here, other=0)
    u = tl.load(ent_u_ptr + e, mask=here, other=0)
    dh = tl.load(ent_dh_ptr + e, mask=here, other=0)
    dw = tl.load(ent_dw_ptr + e, mask=here, other=0)
    col0 = tl.multiple_of(tl.load(dy_col0_ptr + t, mask=here, other=0), BLOCK_T)
    if ROW_RUNS:
        rows = tl.load(w_rows_ptr + (t * UMAX + u) * BLOCK_T, mask=here, other=0)
    else:
        # (a vector mask from the scalar: the interpreter makes ``here & vector`` an int32 mask)
        rows = tl.load(w_rows_ptr + (t * UMAX + u) * BLOCK_T + offs_t, mask=offs_t < tl.where(here, BLOCK_T, 0),
                       other=-1)
    return dh, dw, col0, rows


@triton.jit
def _dgrad_position_entry(ent_dh_ptr, ent_dw_ptr, dy_cols_ptr, w_rows_ptr, e, e_end, offs_t, RUN: tl.constexpr,
                          BLOCK_T: tl.constexpr):
    """Entry ``e`` of a phase's by-position list: its dy offsets (dh, dw), and per column its dy column (runs
    of RUN consecutive columns, each starting at a multiple of RUN) and packed weight row (-1: absent); past
    ``e_end`` zeros and absent rows."""
    here = e < e_end
    dh = tl.load(ent_dh_ptr + e, mask=here, other=0)
    dw = tl.load(ent_dw_ptr + e, mask=here, other=0)
    live = offs_t < tl.where(here, BLOCK_T, 0)  # (a vector mask from the scalar, as in _dgrad_tile_entry)
    cols = tl.load(dy_cols_ptr + e * BLOCK_T + offs_t, mask=live, other=0)
    rows = tl.load(w_rows_ptr + e * BLOCK_T + offs_t, mask=live, other=-1)
    return dh, dw, tl.max_contiguous(tl.multiple_of(cols, RUN), RUN), rows


@triton.jit
def _dgrad_entry(ent_t_ptr, ent_u_ptr, ent_dh_ptr, ent_dw_ptr, dy_col0_ptr, w_rows_ptr, e, e_end, UMAX, offs_t,
                 ROW_RUNS: tl.constexpr, BY_POSITION: tl.constexpr, RUN: tl.constexpr, BLOCK_T: tl.constexpr):
    """Entry ``e``: :func:`_dgrad_position_entry` with BY_POSITION (its ``col0`` a column per filter), else
    :func:`_dgrad_tile_entry`."""
    if BY_POSITION:
        return _dgrad_position_entry(ent_dh_ptr, ent_dw_ptr, dy_col0_ptr, w_rows_ptr, e, e_end, offs_t, RUN, BLOCK_T)
    else:
        return _dgrad_tile_entry(ent_t_ptr, ent_u_ptr, ent_dh_ptr, ent_dw_ptr, dy_col0_ptr, w_rows_ptr, e, e_end, UMAX,
                                 offs_t, ROW_RUNS, BLOCK_T)


@triton.jit
def _dgrad_tile_weights(w_ptr, w_block, rows, offs_c, c_ok, CG, INT64_INDEX: tl.constexpr, ROW_RUNS: tl.constexpr):
    """The [BLOCK_T, BLOCK_N] weight tile of an entry's packed ``rows``: a block of consecutive rows from the
    first with ROW_RUNS (none absent, as in the forward), else one row per filter (zeros where absent)."""
    if INT64_INDEX:
        rows = rows.to(tl.int64)
    if ROW_RUNS:
        wt = tl.load(w_ptr + (w_block + rows * CG), mask=c_ok[None, :], other=0.0)
    else:
        wt = tl.load(w_ptr + rows[:, None] * CG + offs_c[None, :], mask=(rows >= 0)[:, None] & c_ok[None, :],
                     other=0.0)
    return wt


@triton.autotune(configs=DGRAD_TILES_CONFIGS, key=DGRAD_TILES_KEY,
                 prune_configs_by={"early_config_prune": through_l1_configs_for}, **_TUNE_EXTRAS)
@triton.jit(do_not_specialize=UNSPECIALISED)
def stripe_dgrad_tiles_kernel(
    dy_ptr, w_ptr, dx_ptr, w_rows_ptr, dy_col0_ptr,
    ent_off_ptr, ent_t_ptr, ent_u_ptr, ent_dh_ptr, ent_dw_ptr,
    B, H, W, Ho, Wo, CG, G, NCB, UMAX,
    sdb, sdc, sdh, sdw,
    sxb, sxc, sxh, sxw,
    SH, SW,
    KEY_M, KEY_C, KEY_N, KEY_DENSITY, KEY_CONV,
    INPUT_PRECISION: tl.constexpr, ACC_DTYPE: tl.constexpr, INT64_INDEX: tl.constexpr, ROW_RUNS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr,
    BY_POSITION: tl.constexpr = False, RUN: tl.constexpr = 1, THROUGH_L1: tl.constexpr = False,
):
    """Grad input over the forward's filter tiles: for each (tile, position of its union) that lines
    up with this program's output phase, a [pixels, BLOCK_T filters] x [BLOCK_T, channels] product.
    Tile t reads dy's columns ``dy_col0[t]`` .. + BLOCK_T, a multiple of BLOCK_T: dy gathered into tile
    order (``stripe_gather_columns_kernel``), or dy itself where every tile is a full run of
    consecutive channels; either way every load is a contiguous row. The work spent on pruned stripes
    is the forward's (1 - tile efficiency).

    BY_POSITION: each entry of the phase is one kernel position and the BLOCK_T columns of the tiles that
    keep it, side by side in runs of RUN (a tile's width): dy columns ``dy_col0[e * BLOCK_T + j]``, packed
    rows ``w_rows[e * BLOCK_T + j]`` (ROW_RUNS off). Narrow tiles then make products BLOCK_T deep instead
    of RUN, in as many fewer iterations.

    THROUGH_L1 (one-stage configurations): dy loaded into L1 as well, where the entries of one tile, which
    follow each other, read the same columns shifted by their positions (staged copies read each from L2)."""
    tl.static_assert(not (BY_POSITION and ROW_RUNS))
    phase, rh, rw, g, c0, pid_m, Mp, Hp, Wp = _dgrad_program(H, W, B, G, NCB, SH, SW, BLOCK_N)
    if pid_m * BLOCK_M < Mp:
        b, hp, wp, m_ok, offs_c, c_ok = _dgrad_pixels(pid_m, Mp, Hp, Wp, c0, CG, INT64_INDEX, BLOCK_M, BLOCK_N)
        offs_t = tl.arange(0, BLOCK_T)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE)
        e_begin = tl.load(ent_off_ptr + phase * G + g)
        e_end = tl.load(ent_off_ptr + phase * G + g + 1)
        # Loop invariants, as in the forward: each pixel's dy offset, the tile columns, the weight block of
        # a row run; phase pixels past Mp get a row far above dy, masked by the same unsigned comparison
        # as the borders. The entry tables are read one iteration ahead (see stripe_fwd_kernel).
        dy_base = b * sdb + hp * sdh + wp * sdw
        hp_in = tl.where(m_ok, hp, -(1 << 30))
        dy_cols = offs_t * sdc
        w_block = offs_t[:, None] * CG + offs_c[None, :]
        if INT64_INDEX:
            w_block = w_block.to(tl.int64)
        dh, dw, col0, rows = _dgrad_entry(ent_t_ptr, ent_u_ptr, ent_dh_ptr, ent_dw_ptr, dy_col0_ptr, w_rows_ptr,
                                          e_begin, e_end, UMAX, offs_t, ROW_RUNS, BY_POSITION, RUN, BLOCK_T)
        for e in range(e_begin, e_end):
            dh_next, dw_next, col0_next, rows_next = _dgrad_entry(
                ent_t_ptr, ent_u_ptr, ent_dh_ptr, ent_dw_ptr, dy_col0_ptr, w_rows_ptr, e + 1, e_end, UMAX, offs_t,
                ROW_RUNS, BY_POSITION, RUN, BLOCK_T)
            ok = _inside(hp_in + dh, Ho, INT64_INDEX) & _inside(wp + dw, Wo, INT64_INDEX)
            if BY_POSITION:
                dy_off = (dy_base + (dh * sdh + dw * sdw))[:, None] + (col0 * sdc)[None, :]
            else:
                dy_off = (dy_base + (dh * sdh + dw * sdw + col0 * sdc))[:, None] + dy_cols[None, :]
            if THROUGH_L1:
                dyt = tl.load(dy_ptr + dy_off, mask=ok[:, None], other=0.0, cache_modifier=".ca")
            else:
                dyt = tl.load(dy_ptr + dy_off, mask=ok[:, None], other=0.0)
            wt = _dgrad_tile_weights(w_ptr, w_block, rows, offs_c, c_ok, CG, INT64_INDEX, ROW_RUNS)
            dh, dw, col0, rows = dh_next, dw_next, col0_next, rows_next
            acc = tl.dot(dyt, wt, acc, input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)
        _store_dx(dx_ptr, acc, b, hp, wp, rh, rw, g, offs_c, m_ok, c_ok, CG, sxb, sxc, sxh, sxw, SH, SW)


# Grad input with dy's tiles loaded by the TMA, as in stripe_fwd_tma_kernel. A program computes a TH x TW
# rectangle of one output phase's input pixels (rh + SH * hp, rw + SW * wp): an entry of the phase reads dy at
# (hp + dh, wp + dw), so its dy pixels for the rectangle are a [1, TH, TW, BLOCK_T] box of dy (or of dy gathered
# into tile order) at (b, hp0 + dh, wp0 + dw, col0), zero-filled outside dy, at any stride.

@triton.autotune(configs=TMA_FWD_CONFIGS, key=TMA_DGRAD_KEY, prune_configs_by={"early_config_prune": tma_configs_for},
                 **_TUNE_EXTRAS)
@triton.jit(do_not_specialize=UNSPECIALISED)
def stripe_dgrad_tiles_tma_kernel(
    dy_desc, w_ptr, dx_ptr, w_rows_ptr, dy_col0_ptr,
    ent_off_ptr, ent_t_ptr, ent_u_ptr, ent_dh_ptr, ent_dw_ptr,
    B, H, W, CG, NCB, UMAX,
    sxb, sxc, sxh, sxw,
    SH, SW,
    KEY_M, KEY_C, KEY_N, KEY_DENSITY, KEY_CONV,
    INPUT_PRECISION: tl.constexpr, ACC_DTYPE: tl.constexpr, ROW_RUNS: tl.constexpr,
    BLOCK_M: tl.constexpr, TW: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr,
):
    """Grad input over the forward's filter tiles (``stripe_dgrad_tiles_kernel``, one group): a program
    computes a TH x TW rectangle of one image's pixels of the output phase on grid axis 1 and BLOCK_N
    channels, over that phase's (tile, union position) entries. Axis 0 covers phase (0, 0)'s rectangles,
    the most of any phase; a smaller phase's programs past its own rectangles do nothing."""
    pid = tl.program_id(0)
    phase, rh, rw, Hp, Wp = _output_phase(H, W, SH, SW)
    c0 = pid % NCB * BLOCK_N  # channel blocks fastest: the programs of a rectangle read the same dy boxes
    b, h0, w0 = _rectangle(pid // NCB, Hp, Wp, BLOCK_M, TW)
    if b < B:
        offs_t = tl.arange(0, BLOCK_T)
        offs_c = c0 + tl.arange(0, BLOCK_N)
        c_ok = offs_c < CG
        w_block = offs_t[:, None] * CG + offs_c[None, :]
        acc = _box_acc(BLOCK_M, BLOCK_N, ACC_DTYPE)
        e_begin = tl.load(ent_off_ptr + phase)
        e_end = tl.load(ent_off_ptr + phase + 1)
        dh, dw, col0, rows = _dgrad_tile_entry(ent_t_ptr, ent_u_ptr, ent_dh_ptr, ent_dw_ptr, dy_col0_ptr, w_rows_ptr,
                                               e_begin, e_end, UMAX, offs_t, ROW_RUNS, BLOCK_T)
        for e in range(e_begin, e_end):  # the entry tables read one iteration ahead (see stripe_fwd_kernel)
            dh_next, dw_next, col0_next, rows_next = _dgrad_tile_entry(
                ent_t_ptr, ent_u_ptr, ent_dh_ptr, ent_dw_ptr, dy_col0_ptr, w_rows_ptr, e + 1, e_end, UMAX, offs_t,
                ROW_RUNS, BLOCK_T)
            dyt = dy_desc.load([b, h0 + dh, w0 + dw, col0]).reshape(BLOCK_M, BLOCK_T)
            wt = _dgrad_tile_weights(w_ptr, w_block, rows, offs_c, c_ok, CG, False, ROW_RUNS)
            dh, dw, col0, rows = dh_next, dw_next, col0_next, rows_next
            acc = _box_dot(acc, dyt, wt, BLOCK_N, INPUT_PRECISION, ACC_DTYPE)
        acc = _box_result(acc, BLOCK_N)
        hp, wp, m_ok = _rectangle_pixels(h0, w0, Hp, Wp, BLOCK_M, TW)
        dx_ptrs = dx_ptr + (b * sxb + (rh + hp * SH) * sxh + (rw + wp * SW) * sxw)[:, None] + offs_c[None, :] * sxc
        tl.store(dx_ptrs, acc.to(dx_ptr.dtype.element_ty), mask=m_ok[:, None] & c_ok[None, :])
