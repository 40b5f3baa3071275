"""The forward: ``stripe_fwd_kernel``, implicit GEMM over filter tiles (see :mod:`.stripe_conv`)."""
from __future__ import annotations

import triton
import triton.language as tl

from ._indexing import _inside, _pixel_coords, _window_at
from ._tuning import FWD_CONFIGS, FWD_KEY, UNSPECIALISED, _TUNE_EXTRAS, fwd_configs_for


@triton.jit
def _fwd_pixel_block(pid_m, g, B, Ho, Wo, CG, sxb, sxc, SH, SW, PT, PL, INT64_INDEX: tl.constexpr,
                     BLOCK_M: tl.constexpr):
    """A forward program's output pixels (block ``pid_m``, their mask and (b, ho, wo)), the top-left
    corner of each one's input window and its offset in x for filter group ``g``."""
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < B * Ho * Wo
    b, ho, wo = _pixel_coords(offs_m, Ho, Wo, INT64_INDEX)
    return offs_m, m_ok, b, ho, wo, ho * SH - PT, wo * SW - PL, b * sxb + g * CG * sxc


@triton.jit
def _fwd_tables(tile_pos_ptr, rows_tile, t, UMAX, u, offs_n, NPOS: tl.constexpr, ROW_RUNS: tl.constexpr):
    """Kernel position and packed weight rows of union entry ``u`` of tile ``t``: the first row of a run
    (ROW_RUNS) or one row per column (-1: zero); with NPOS > 0 the position is ``u`` itself."""
    if NPOS > 0:
        p = u
    else:
        p = tl.load(tile_pos_ptr + t * UMAX + u)
    if ROW_RUNS:
        rows = tl.load(rows_tile + u * offs_n.shape[0])
    else:
        rows = tl.load(rows_tile + u * offs_n.shape[0] + offs_n)
    return p, rows


@triton.jit
def _fwd_next_entry(tile_pos_ptr, rows_tile, t, UMAX, u, c0, last_u, npos, CG, offs_n, NPOS: tl.constexpr,
                    ROW_RUNS: tl.constexpr, BLOCK_K: tl.constexpr, CHANNEL_MAJOR: tl.constexpr):
    """The next iteration's union entry and channel block (counters: no division) and its table values
    (:func:`_fwd_tables`; past the union's end, the last entry's, unused). Position-major order: every
    channel block of an entry, then the next entry; CHANNEL_MAJOR: every entry of a channel block, then
    the next block."""
    if CHANNEL_MAJOR:
        u_next = u + 1
        wrap = u_next >= npos
        u_next = tl.where(wrap, 0, u_next)
        c0_next = tl.where(wrap, c0 + BLOCK_K, c0)
    else:
        c0_next = c0 + BLOCK_K
        wrap = c0_next >= CG
        u_next = tl.where(wrap, u + 1, u)
        c0_next = tl.where(wrap, 0, c0_next)
    p_next, rows_next = _fwd_tables(tile_pos_ptr, rows_tile, t, UMAX, tl.minimum(u_next, last_u), offs_n, NPOS,
                                    ROW_RUNS)
    return u_next, c0_next, p_next, rows_next

@triton.jit
def _fwd_weight_tile(w_ptr, w_block, rows, c0, offs_k, offs_n, CG, EVEN_K: tl.constexpr, ROW_RUNS: tl.constexpr):
    """The [BLOCK_K, BLOCK_N] weight tile of channels ``c0 + offs_k`` at packed ``rows`` (see _fwd_tables);
    zeros for absent rows and channels past CG."""
    if ROW_RUNS:
        # The tile's filters keep the position in consecutive packed rows: one [BLOCK_N, CG] block of rows
        # from the first (``w_block``: its offsets from there), no row table, no absent rows to mask.
        w_off = w_block + (rows * CG + c0)
        kept = offs_n < offs_n.shape[0]
    else:
        w_off = rows[None, :] * CG + (c0 + offs_k)[:, None]
        kept = rows >= 0
    if EVEN_K:
        if ROW_RUNS:
            wt = tl.load(w_ptr + w_off)
        else:
            wt = tl.load(w_ptr + w_off, mask=kept[None, :], other=0.0)
    else:
        wt = tl.load(w_ptr + w_off, mask=kept[None, :] & (c0 + offs_k < CG)[:, None], other=0.0)
    return wt


@triton.jit
def _split_k_sum(acc, ws_ptr, count_ptr, tile, t, offs_m, m_ok, M, T, SPLIT_K: tl.constexpr, BLOCK_N: tl.constexpr):
    """Split-K without atomic adds into the output: each split stores its partial sums into its slice of
    the fp32 workspace ``[SPLIT_K, M, T * BLOCK_N]`` and counts itself in at its output tile; the split
    that arrives last adds the slices in split order (the same sum whichever arrives last) and returns
    ``(sum, m_ok)``, the others ``(acc, no row)``: the rows to store. The host zeroes the counts before
    each launch, and the last split zeroes its tile's count again (the tuner launches the kernel several
    times)."""
    split = tl.program_id(1)
    rows = offs_m.to(tl.int64)[:, None]
    cols = (t * BLOCK_N + tl.arange(0, BLOCK_N))[None, :]
    width = T * BLOCK_N
    tl.store(ws_ptr + (split * M + rows) * width + cols, acc, mask=m_ok[:, None])
    # Every thread's partial sums are stored before the count (release); the last split reads the
    # others' past its L1 (.cg) after it (acquire).
    tl.debug_barrier()
    arrived = tl.atomic_add(count_ptr + tile, 1, sem="acq_rel")
    if arrived == SPLIT_K - 1:
        acc = tl.zeros_like(acc)
        for s in tl.static_range(SPLIT_K):
            acc += tl.load(ws_ptr + (s * M + rows) * width + cols, mask=m_ok[:, None], other=0.0, cache_modifier=".cg")
        tl.atomic_xchg(count_ptr + tile, 0)
    # (the comparison per row: Triton's interpreter makes an int of a row mask and a scalar bool)
    return acc, m_ok & ((offs_m * 0 + arrived) == SPLIT_K - 1)


# reset_to_zero: a split-K launch counts its splits in ``count_ptr``; the tuner zeroes the counts before each
# timing run (the kernel leaves them zero, but a run the tuner stops midway would not).
@triton.autotune(configs=FWD_CONFIGS, key=FWD_KEY, prune_configs_by={"early_config_prune": fwd_configs_for},
                 reset_to_zero=["count_ptr"], **_TUNE_EXTRAS)
@triton.jit(do_not_specialize=UNSPECIALISED)
def stripe_fwd_kernel(
    x_ptr, w_ptr, bias_ptr, out_ptr, ws_ptr, count_ptr,
    tile_pos_ptr, tile_npos_ptr, tile_ch_ptr, tile_grp_ptr, w_rows_ptr,
    B, H, W, Ho, Wo, CG, T, UMAX,
    sxb, sxc, sxh, sxw,
    sob, soc, soh, sow,
    SH, SW, PT, PL, DH, DW, KW: tl.constexpr,
    KEY_M, KEY_C, KEY_N, KEY_DENSITY, KEY_CONV,
    HAS_BIAS: tl.constexpr, USE_DOT: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    ACC_DTYPE: tl.constexpr, EVEN_K: tl.constexpr, INT64_INDEX: tl.constexpr, STORE: tl.constexpr,
    NPOS: tl.constexpr, ROW_RUNS: tl.constexpr, SPLIT_K: tl.constexpr, CHANNEL_MAJOR: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    # Tile index varies fastest: programs that run together share the same pixel block of x
    # (reused through L2); the packed weight rows are small and stay cached.
    t = pid % T
    pid_m = pid // T
    # NPOS > 0: every tile's union is all NPOS kernel positions, in order (dense-ish masks): a loop of
    # constant length, and no position loads inside it.
    if NPOS > 0:
        npos = NPOS
    else:
        npos = tl.load(tile_npos_ptr + t)
    g = tl.load(tile_grp_ptr + t)

    offs_m, m_ok, b, ho, wo, h_base, w_base, x_row = _fwd_pixel_block(pid_m, g, B, Ho, Wo, CG, sxb, sxc, SH, SW, PT,
                                                                      PL, INT64_INDEX, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    rows_tile = w_rows_ptr + t * UMAX * BLOCK_N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE)

    if USE_DOT:
        offs_k = tl.arange(0, BLOCK_K)
        KC = tl.cdiv(CG, BLOCK_K)
        it_begin = 0
        it_end = npos * KC
        if SPLIT_K > 1:  # split s of SPLIT_K (grid axis 1) reduces over its share of the tile's iterations
            chunk = tl.cdiv(it_end, SPLIT_K)
            it_begin = tl.program_id(1) * chunk
            it_end = tl.minimum(it_end, it_begin + chunk)
        # Loop invariants of the tile addresses, so that each iteration adds a scalar: the window origin of
        # each pixel in x, the columns of an input tile and, for row runs, the [BLOCK_K, BLOCK_N] block of
        # packed rows from its first. Pixels past M get a row far above the input: one unsigned
        # comparison per axis masks them together with the borders.
        x_base = x_row + h_base * sxh + w_base * sxw
        h_in = tl.where(m_ok, h_base, -(1 << 30))
        x_cols = offs_k * sxc
        w_block = offs_n[None, :] * CG + offs_k[:, None]
        if INT64_INDEX:
            w_block = w_block.to(tl.int64)
        # The channel block and union entry advance as counters (no division per iteration), and the
        # plan's tables (position, weight rows) are read one iteration ahead into registers: a table
        # read that addresses the same iteration's tiles makes Triton's software pipeliner wait for
        # every staged copy in each iteration (cp.async.wait_group 0: one stage in flight whatever
        # num_stages asks for).
        last_u = tl.maximum(npos - 1, 0)
        if CHANNEL_MAJOR:
            cb = it_begin // tl.maximum(npos, 1)
            u = it_begin - cb * npos
            c0 = cb * BLOCK_K
        else:
            u = it_begin // KC
            c0 = (it_begin - u * KC) * BLOCK_K
        p, rows = _fwd_tables(tile_pos_ptr, rows_tile, t, UMAX, tl.minimum(u, last_u), offs_n, NPOS, ROW_RUNS)
        for it in range(it_begin, it_end):
            u_next, c0_next, p_next, rows_next = _fwd_next_entry(tile_pos_ptr, rows_tile, t, UMAX, u, c0, last_u, npos,
                                                                 CG, offs_n, NPOS, ROW_RUNS, BLOCK_K, CHANNEL_MAJOR)
            i = p // KW
            j = p - i * KW
            ok = _inside(h_in + i * DH, H, INT64_INDEX) & _inside(w_base + j * DW, W, INT64_INDEX)
            x_off = (x_base + (i * DH * sxh + j * DW * sxw))[:, None] + (c0 * sxc + x_cols)[None, :]
            if INT64_INDEX:
                rows = rows.to(tl.int64)
            x_ok = ok[:, None] if EVEN_K else ok[:, None] & (c0 + offs_k < CG)[None, :]
            if CHANNEL_MAJOR:  # kept in L1 for the next entries' shifted windows of the same channels
                xt = tl.load(x_ptr + x_off, mask=x_ok, other=0.0, cache_modifier=".ca")
            else:
                xt = tl.load(x_ptr + x_off, mask=x_ok, other=0.0)
            wt = _fwd_weight_tile(w_ptr, w_block, rows, c0, offs_k, offs_n, CG, EVEN_K, ROW_RUNS)
            u, c0, p, rows = u_next, c0_next, p_next, rows_next
            acc = tl.dot(xt, wt, acc, input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)
    else:
        for it in range(0, npos * CG):
            u = it // CG
            c = it - u * CG
            if NPOS > 0:
                p = u
            else:
                p = tl.load(tile_pos_ptr + t * UMAX + u)
            hi, wi, ok = _window_at(p, h_base, w_base, m_ok, KW, DH, DW, H, W)
            xv = tl.load(x_ptr + x_row + hi * sxh + wi * sxw + c * sxc, mask=ok, other=0.0).to(ACC_DTYPE)
            rows = tl.load(rows_tile + u * BLOCK_N + offs_n)
            if INT64_INDEX:
                rows = rows.to(tl.int64)
            wv = tl.load(w_ptr + rows * CG + c, mask=rows >= 0, other=0.0).to(ACC_DTYPE)
            acc += xv[:, None] * wv[None, :]

    if SPLIT_K > 1:
        acc, m_ok = _split_k_sum(acc, ws_ptr, count_ptr, pid, t, offs_m, m_ok, B * Ho * Wo, T, SPLIT_K, BLOCK_N)
    ch = tl.load(tile_ch_ptr + t * BLOCK_N + offs_n)  # original channel, -1 for padding columns
    if STORE == 1:
        # The host guarantees runs of 8 consecutive channels starting at multiples of 8 (and runs of
        # padding): the hint turns 2-byte scattered stores into 16-byte vector stores.
        ch = tl.max_contiguous(tl.multiple_of(ch, 8), 8)
    n_ok = ch >= 0
    if HAS_BIAS:
        acc += tl.load(bias_ptr + ch, mask=n_ok, other=0.0).to(ACC_DTYPE)[None, :]
    if STORE == 2:
        # Contiguous NCHW output: each column is a run of pixels of one plane, stored as vectors
        # whatever the channel order.
        pix = offs_m % (Ho * Wo)
        if INT64_INDEX:
            pix = pix.to(tl.int64)
        out_ptrs = out_ptr + (b * sob + pix)[:, None] + ch[None, :] * soc
    elif STORE == 3:
        # Tile order: a channels_last buffer of T * BLOCK_N channels (soc == 1), each tile's columns one
        # run, stored as vectors (padding columns too: no column mask); a gather puts them in channel order.
        out_ptrs = out_ptr + (b * sob + ho * soh + wo * sow)[:, None] + (t * BLOCK_N + offs_n)[None, :]
        n_ok = offs_n < BLOCK_N
    else:
        out_ptrs = out_ptr + (b * sob + ho * soh + wo * sow)[:, None] + ch[None, :] * soc
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def _subtile_store(out_ptr, bias_ptr, acc, ch_ptr, offs_n, out_row, m_ok, soc, I: tl.constexpr,
                   SUB: tl.constexpr, BLOCK_N: tl.constexpr, HAS_BIAS: tl.constexpr, STORE: tl.constexpr,
                   ACC_DTYPE: tl.constexpr):
    """Subtile ``I``'s columns into their original channels (bias added), stored as the forward stores;
    STORE == 3 (tile order): into columns ``I * BLOCK_N + offs_n`` past ``out_row``, which holds the
    program's first column."""
    if I < SUB:
        ch = tl.load(ch_ptr + I * BLOCK_N + offs_n)  # -1 for padding columns
        if STORE == 1:  # aligned runs of 8 consecutive channels: 16-byte vector stores
            ch = tl.max_contiguous(tl.multiple_of(ch, 8), 8)
        n_ok = ch >= 0
        if HAS_BIAS:
            acc += tl.load(bias_ptr + ch, mask=n_ok, other=0.0).to(ACC_DTYPE)[None, :]
        if STORE == 3:
            tl.store(out_ptr + out_row[:, None] + (I * BLOCK_N + offs_n)[None, :], acc.to(out_ptr.dtype.element_ty),
                     mask=m_ok[:, None] & (offs_n < BLOCK_N)[None, :])
        else:
            tl.store(out_ptr + out_row[:, None] + ch[None, :] * soc, acc.to(out_ptr.dtype.element_ty),
                     mask=m_ok[:, None] & n_ok[None, :])
