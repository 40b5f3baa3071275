"""The forward with its input tiles loaded as TMA boxes: ``stripe_fwd_tma_kernel``."""
from __future__ import annotations

import triton
import triton.language as tl

from ._tma_boxes import _box_acc, _box_dot, _box_result, _rectangle, _rectangle_pixels
from ._tuning import TMA_FWD_CONFIGS, TMA_FWD_KEY, UNSPECIALISED, _TUNE_EXTRAS, tma_configs_for
from .forward import _fwd_next_entry, _fwd_tables, _fwd_weight_tile, _subtile_store


@triton.autotune(configs=TMA_FWD_CONFIGS, key=TMA_FWD_KEY, prune_configs_by={"early_config_prune": tma_configs_for},
                 **_TUNE_EXTRAS)
@triton.jit(do_not_specialize=UNSPECIALISED)
def stripe_fwd_tma_kernel(
    w_ptr, x_desc, bias_ptr, out_ptr,
    tile_pos_ptr, tile_npos_ptr, tile_ch_ptr, w_rows_ptr,
    Ho, Wo, CG, T, UMAX,
    sob, soc, soh, sow,
    PT, PL, DH, DW, KW: tl.constexpr,
    KEY_M, KEY_C, KEY_N, KEY_DENSITY, KEY_CONV,
    HAS_BIAS: tl.constexpr, INPUT_PRECISION: tl.constexpr, ACC_DTYPE: tl.constexpr, EVEN_K: tl.constexpr,
    STORE: tl.constexpr, NPOS: tl.constexpr, ROW_RUNS: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr,
    BLOCK_M: tl.constexpr, TW: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    t = pid % T  # tile fastest, as in stripe_fwd_kernel
    b, h0, w0 = _rectangle(pid // T, Ho, Wo, BLOCK_M, TW)
    if NPOS > 0:
        npos = NPOS
    else:
        npos = tl.load(tile_npos_ptr + t)

    offs_n = tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    rows_tile = w_rows_ptr + t * UMAX * BLOCK_N
    w_block = offs_n[None, :] * CG + offs_k[:, None]
    acc = _box_acc(BLOCK_M, BLOCK_N, ACC_DTYPE)
    KC = tl.cdiv(CG, BLOCK_K)
    last_u = tl.maximum(npos - 1, 0)
    u = 0
    c0 = 0
    p, rows = _fwd_tables(tile_pos_ptr, rows_tile, t, UMAX, 0, offs_n, NPOS, ROW_RUNS)
    for it in range(0, npos * KC):  # union entry u, channel block c0: counters, tables one ahead
        u_next, c0_next, p_next, rows_next = _fwd_next_entry(tile_pos_ptr, rows_tile, t, UMAX, u, c0, last_u, npos,
                                                             CG, offs_n, NPOS, ROW_RUNS, BLOCK_K, False)
        i = p // KW
        off_h = i * DH - PT  # the input pixel of output pixel (ho, wo) is (SH * ho + off_h, SW * wo + off_w)
        off_w = (p - i * KW) * DW - PL
        xt = x_desc.load([b, h0 + (off_h >> (SH - 1)), off_h & (SH - 1), w0 + (off_w >> (SW - 1)),
                          (off_w & (SW - 1)) * CG + c0]).reshape(BLOCK_M, BLOCK_K)
        wt = _fwd_weight_tile(w_ptr, w_block, rows, c0, offs_k, offs_n, CG, EVEN_K, ROW_RUNS)
        u, c0, p, rows = u_next, c0_next, p_next, rows_next
        acc = _box_dot(acc, xt, wt, BLOCK_N, INPUT_PRECISION, ACC_DTYPE)

    acc = _box_result(acc, BLOCK_N)
    ho, wo, m_ok = _rectangle_pixels(h0, w0, Ho, Wo, BLOCK_M, TW)
    out_row = b * sob + ho * soh + wo * sow
    if STORE == 3:  # tile order: the tile's first column
        out_row += t * BLOCK_N
    _subtile_store(out_ptr, bias_ptr, acc, tile_ch_ptr + t * BLOCK_N, offs_n, out_row, m_ok, soc, 0, 1, BLOCK_N,
                   HAS_BIAS, STORE, ACC_DTYPE)
