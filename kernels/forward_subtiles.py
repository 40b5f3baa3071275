"""The forward over groups of narrow filter tiles: ``stripe_fwd_sub_kernel``."""
from __future__ import annotations

import triton
import triton.language as tl

from ._indexing import _window_at
from ._tuning import SUB_FWD_CONFIGS, SUB_FWD_KEY, UNSPECIALISED, _TUNE_EXTRAS
from .forward import _fwd_pixel_block, _subtile_store


# Narrow filter tiles (16 or 32 filters) keep the union of their positions small at low density, but
# each program then multiplies every input tile it loads by only those few filters: with many tiles
# per layer the same input is read once per tile, and the forward becomes bound by the L2 reads of x
# (on an H100, ~650 MB for a VGG CIFAR layer at density 0.2 in 16-wide tiles: 2x cuDNN's whole
# time). ``stripe_fwd_sub_kernel`` gives one program SUB such tiles: it loads each input tile once
# for their positions' union and multiplies it only by the subtiles that keep that position (a
# per-position bit mask), each into its own accumulator.

@triton.jit
def _subtile_weights(w_ptr, rows_ptr, offs_n, ck, k_ok, CG, I: tl.constexpr, SUB: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, INT64_INDEX: tl.constexpr):
    """Subtile ``I``'s [BLOCK_K, BLOCK_N] weight tile (zeros where a filter does not keep the position)."""
    if I < SUB:
        rows = tl.load(rows_ptr + I * BLOCK_N + offs_n)
        kept = rows >= 0
        if INT64_INDEX:
            rows = rows.to(tl.int64)
        w_off = rows[None, :] * CG + ck[:, None]
        if EVEN_K:
            wt = tl.load(w_ptr + w_off, mask=kept[None, :], other=0.0)
        else:
            wt = tl.load(w_ptr + w_off, mask=kept[None, :] & k_ok[:, None], other=0.0)
    else:
        wt = tl.zeros((BLOCK_K, BLOCK_N), dtype=w_ptr.dtype.element_ty)
    return wt


@triton.jit
def _subtile_dot(acc, xt, wt, bits, I: tl.constexpr, SUB: tl.constexpr, INPUT_PRECISION: tl.constexpr,
                 ACC_DTYPE: tl.constexpr):
    """``acc += xt @ wt`` where subtile ``I``'s bit in ``bits`` is set (its filters keep the position)."""
    if I < SUB:
        if (bits >> I) & 1:
            acc = tl.dot(xt, wt, acc, input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)
    return acc


@triton.jit
def _subtile_operands(x_ptr, w_ptr, sup_pos_ptr, sup_bits_ptr, sup_rows_ptr, u, c0, t, UMAX, KW, CG, H, W,
                      DH, DW, h_base, w_base, x_row, m_ok, offs_n, offs_k, sxc, sxh, sxw, SUB: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, INT64_INDEX: tl.constexpr):
    """The input tile of union entry ``u`` and channels ``c0 + [0, BLOCK_K)``, the entry's subtile bits and
    the SUB weight tiles (8 values; unused ones are zeros the compiler drops). The caller keeps ``u`` inside
    the union: the prefetch past the last iteration reads the last entry again (its values go unused, and
    no mask needs a scalar condition)."""
    p = tl.load(sup_pos_ptr + t * UMAX + u)
    bits = tl.load(sup_bits_ptr + t * UMAX + u)
    hi, wi, ok = _window_at(p, h_base, w_base, m_ok, KW, DH, DW, H, W)
    ck = c0 + offs_k
    k_ok = ck < CG
    x_off = (x_row + hi * sxh + wi * sxw)[:, None] + ck[None, :] * sxc
    if EVEN_K:
        xt = tl.load(x_ptr + x_off, mask=ok[:, None], other=0.0)
    else:
        xt = tl.load(x_ptr + x_off, mask=ok[:, None] & k_ok[None, :], other=0.0)
    rows = sup_rows_ptr + (t * UMAX + u) * (SUB * BLOCK_N)
    w0 = _subtile_weights(w_ptr, rows, offs_n, ck, k_ok, CG, 0, SUB, BLOCK_N, BLOCK_K, EVEN_K, INT64_INDEX)
    w1 = _subtile_weights(w_ptr, rows, offs_n, ck, k_ok, CG, 1, SUB, BLOCK_N, BLOCK_K, EVEN_K, INT64_INDEX)
    w2 = _subtile_weights(w_ptr, rows, offs_n, ck, k_ok, CG, 2, SUB, BLOCK_N, BLOCK_K, EVEN_K, INT64_INDEX)
    w3 = _subtile_weights(w_ptr, rows, offs_n, ck, k_ok, CG, 3, SUB, BLOCK_N, BLOCK_K, EVEN_K, INT64_INDEX)
    w4 = _subtile_weights(w_ptr, rows, offs_n, ck, k_ok, CG, 4, SUB, BLOCK_N, BLOCK_K, EVEN_K, INT64_INDEX)
    w5 = _subtile_weights(w_ptr, rows, offs_n, ck, k_ok, CG, 5, SUB, BLOCK_N, BLOCK_K, EVEN_K, INT64_INDEX)
    w6 = _subtile_weights(w_ptr, rows, offs_n, ck, k_ok, CG, 6, SUB, BLOCK_N, BLOCK_K, EVEN_K, INT64_INDEX)
    w7 = _subtile_weights(w_ptr, rows, offs_n, ck, k_ok, CG, 7, SUB, BLOCK_N, BLOCK_K, EVEN_K, INT64_INDEX)
    return xt, bits, w0, w1, w2, w3, w4, w5, w6, w7


@triton.autotune(configs=SUB_FWD_CONFIGS, key=SUB_FWD_KEY, **_TUNE_EXTRAS)
@triton.jit(do_not_specialize=UNSPECIALISED)
def stripe_fwd_sub_kernel(
    x_ptr, w_ptr, bias_ptr, out_ptr,
    sup_pos_ptr, sup_npos_ptr, sup_bits_ptr, sup_ch_ptr, sup_grp_ptr, sup_rows_ptr,
    B, H, W, Ho, Wo, CG, T, UMAX,
    sxb, sxc, sxh, sxw,
    sob, soc, soh, sow,
    SH, SW, PT, PL, DH, DW, KW: tl.constexpr,
    KEY_M, KEY_C, KEY_N, KEY_DENSITY, KEY_CONV,
    HAS_BIAS: tl.constexpr, INPUT_PRECISION: tl.constexpr, ACC_DTYPE: tl.constexpr, EVEN_K: tl.constexpr,
    INT64_INDEX: tl.constexpr, STORE: tl.constexpr, SUB: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    t = pid % T  # group of tiles, fastest: programs that run together share a pixel block of x
    pid_m = pid // T
    npos = tl.load(sup_npos_ptr + t)
    g = tl.load(sup_grp_ptr + t)

    offs_m, m_ok, b, ho, wo, h_base, w_base, x_row = _fwd_pixel_block(pid_m, g, B, Ho, Wo, CG, sxb, sxc, SH, SW, PT,
                                                                      PL, INT64_INDEX, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    acc0 = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE)
    acc1 = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE)
    acc2 = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE)
    acc3 = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE)
    acc4 = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE)
    acc5 = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE)
    acc6 = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE)
    acc7 = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE)
    # The dots are conditional, which Triton's software pipeliner does not handle: the loop prefetches
    # by hand instead, issuing the loads of iteration it + 1 before the dots of iteration it. The union
    # entry u and channel block c0 advance as counters (as in stripe_fwd_kernel).
    n_it = npos * tl.cdiv(CG, BLOCK_K)
    last_u = tl.maximum(npos - 1, 0)
    u = 0
    c0 = 0
    xt, bits, w0, w1, w2, w3, w4, w5, w6, w7 = _subtile_operands(
        x_ptr, w_ptr, sup_pos_ptr, sup_bits_ptr, sup_rows_ptr, 0, 0, t, UMAX, KW, CG, H, W, DH, DW,
        h_base, w_base, x_row, m_ok, offs_n, offs_k, sxc, sxh, sxw, SUB, BLOCK_N, BLOCK_K, EVEN_K, INT64_INDEX)
    for it in range(0, n_it):
        c0 += BLOCK_K
        wrap = c0 >= CG
        u = tl.where(wrap, u + 1, u)
        c0 = tl.where(wrap, 0, c0)
        xn, bn, v0, v1, v2, v3, v4, v5, v6, v7 = _subtile_operands(
            x_ptr, w_ptr, sup_pos_ptr, sup_bits_ptr, sup_rows_ptr, tl.minimum(u, last_u), c0, t, UMAX, KW, CG, H,
            W, DH, DW, h_base, w_base, x_row, m_ok, offs_n, offs_k, sxc, sxh, sxw, SUB, BLOCK_N, BLOCK_K, EVEN_K,
            INT64_INDEX)
        acc0 = _subtile_dot(acc0, xt, w0, bits, 0, SUB, INPUT_PRECISION, ACC_DTYPE)
        acc1 = _subtile_dot(acc1, xt, w1, bits, 1, SUB, INPUT_PRECISION, ACC_DTYPE)
        acc2 = _subtile_dot(acc2, xt, w2, bits, 2, SUB, INPUT_PRECISION, ACC_DTYPE)
        acc3 = _subtile_dot(acc3, xt, w3, bits, 3, SUB, INPUT_PRECISION, ACC_DTYPE)
        acc4 = _subtile_dot(acc4, xt, w4, bits, 4, SUB, INPUT_PRECISION, ACC_DTYPE)
        acc5 = _subtile_dot(acc5, xt, w5, bits, 5, SUB, INPUT_PRECISION, ACC_DTYPE)
        acc6 = _subtile_dot(acc6, xt, w6, bits, 6, SUB, INPUT_PRECISION, ACC_DTYPE)
        acc7 = _subtile_dot(acc7, xt, w7, bits, 7, SUB, INPUT_PRECISION, ACC_DTYPE)
        xt, bits, w0, w1, w2, w3, w4, w5, w6, w7 = xn, bn, v0, v1, v2, v3, v4, v5, v6, v7

    if STORE == 2:  # contiguous NCHW output: each column a run of pixels of one plane
        pix = offs_m % (Ho * Wo)
        if INT64_INDEX:
            pix = pix.to(tl.int64)
        out_row = b * sob + pix
    else:
        out_row = b * sob + ho * soh + wo * sow
        if STORE == 3:  # tile order: the group's first column
            out_row += t * SUB * BLOCK_N
    ch = sup_ch_ptr + t * SUB * BLOCK_N
    _subtile_store(out_ptr, bias_ptr, acc0, ch, offs_n, out_row, m_ok, soc, 0, SUB, BLOCK_N, HAS_BIAS, STORE, ACC_DTYPE)
    _subtile_store(out_ptr, bias_ptr, acc1, ch, offs_n, out_row, m_ok, soc, 1, SUB, BLOCK_N, HAS_BIAS, STORE, ACC_DTYPE)
    _subtile_store(out_ptr, bias_ptr, acc2, ch, offs_n, out_row, m_ok, soc, 2, SUB, BLOCK_N, HAS_BIAS, STORE, ACC_DTYPE)
    _subtile_store(out_ptr, bias_ptr, acc3, ch, offs_n, out_row, m_ok, soc, 3, SUB, BLOCK_N, HAS_BIAS, STORE, ACC_DTYPE)
    _subtile_store(out_ptr, bias_ptr, acc4, ch, offs_n, out_row, m_ok, soc, 4, SUB, BLOCK_N, HAS_BIAS, STORE, ACC_DTYPE)
    _subtile_store(out_ptr, bias_ptr, acc5, ch, offs_n, out_row, m_ok, soc, 5, SUB, BLOCK_N, HAS_BIAS, STORE, ACC_DTYPE)
    _subtile_store(out_ptr, bias_ptr, acc6, ch, offs_n, out_row, m_ok, soc, 6, SUB, BLOCK_N, HAS_BIAS, STORE, ACC_DTYPE)
    _subtile_store(out_ptr, bias_ptr, acc7, ch, offs_n, out_row, m_ok, soc, 7, SUB, BLOCK_N, HAS_BIAS, STORE, ACC_DTYPE)
