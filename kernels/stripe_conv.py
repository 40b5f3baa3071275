"""Triton kernels of the stripe_conv2d op (forward, grad input, grad weight).

The host side (tile metadata, launch parameters) lives in
``stripeconv.backends.triton_backend``; this module holds only the ``@triton.jit`` kernels and
their autotuning configurations. Every kernel addresses tensors through explicit element
strides, so NCHW and NHWC (channels_last) work alike; NHWC is the fast layout because the
channel dimension of every [pixels, channels] tile is then contiguous.

The kernels:

``stripe_fwd_kernel``
    Implicit GEMM, output-stationary. One program computes a [BLOCK_M pixels, BLOCK_N filters]
    output tile. Filters are permuted into tiles of BLOCK_N; tile ``t`` reduces over the
    positions its filters keep (``tile_pos[t, :tile_npos[t]]``, the union) times the input
    channels of its group, in a single flattened loop (so the software pipeliner sees one loop).
    Weights are read straight from the packed ``[S, CG]`` rows: ``w_rows[t, u, col]`` is the
    packed row of column ``col``'s filter at the union's position ``u``, -1 where that filter
    does not keep it (a masked load that reads zeros), so no per-call weight copy is made. With
    ``ROW_RUNS`` (every tile's rows at each position are consecutive, e.g. at density 1) the tile
    reads a plain block of rows from the first one instead.
    With ``SPLIT_K`` > 1 (few output pixels: more programs for the GPU) grid axis 1 splits each tile's
    iterations, and the splits add atomically into a zeroed output of the accumulator's dtype.
    Borders are masked loads. Bias is added in the epilogue; the store (``STORE``) puts the tile's
    columns back in their original channels: as 16-byte vectors where the tile holds aligned runs
    of 8 consecutive channels, into NCHW planes (each column a run of pixels), or scattered.

``stripe_fwd_tma_kernel``
    The forward for strides 1 and 2 on GPUs with a tensor memory accelerator (compute capability 9.0 on):
    a program's output pixels are a TH x TW rectangle of one image, and each input tile is one
    [1, TH, TW, BLOCK_K] box of the NHWC input's tensor descriptor at the position's offset, which
    the hardware zero-fills where it lies outside the image (negative coordinates too): no
    per-pixel addresses or border masks (stride 2: a box of the input's parity view, see below).
    Weights, tables and the store are the forward's. From 64
    filters on, the product is taken transposed so that wgmma reads the box from shared memory.

``stripe_fwd_sub_kernel``
    The forward over groups of SUB narrow tiles (16 to 64 filters, up to 128 columns in all): one
    program loads each input tile once for the union of its subtiles' positions and multiplies it
    only by the subtiles that keep that position (a bit per subtile and position; the dots are
    skipped, each subtile has its own accumulator). It computes the stripes the narrow tiles compute
    with the input traffic of one wide tile. Conditional dots are beyond Triton's software pipeliner,
    so the loop prefetches the next iteration's operands into registers by hand.

``stripe_dgrad_kernel``
    Grad input, output-stationary on dx: [BLOCK_M input pixels, BLOCK_N input channels] per
    program, reducing over (position p, filters that keep p). The filters that keep p are the
    packed rows of p (contiguous), so no work is spent on pruned stripes. For stride > 1 the
    input pixels are split into the stride_h * stride_w output phases (grid axis 1): in a phase
    a position either lines up with the output grid for every pixel or for none, so the host
    lists, per (phase, group), only the chunks of rows of the positions that line up, and the
    kernel runs one flat loop over them (no masking of (stride^2 - 1)/stride^2 of the loads).

``stripe_wgrad_kernel``
    Grad weight: per block of packed rows of one position (and group), a GEMM
    [rows, pixels] x [pixels, channels] reduced over B*Ho*Wo pixels, split-K over grid axis 1.
    With ATOMIC the partial sums are added atomically into one fp32 buffer; otherwise each split
    writes its own slice of a [SPLIT, S, CG] buffer that the host sums (deterministic).

``stripe_dgrad_tiles_kernel`` / ``stripe_wgrad_tiles_kernel``
    The gradients over the forward's filter tiles instead of per-position row lists: dy is first
    gathered into tile order (``stripe_gather_columns_kernel``), so every load is a contiguous
    row; they compute the pruned stripes inside each tile's union, as the forward does.
    ``stripe_dgrad_tiles_tma_kernel`` is the grad input's variant for stride 1 with dy's tiles
    loaded as TMA boxes over rectangles of input pixels, as ``stripe_fwd_tma_kernel`` loads x's;
    ``stripe_wgrad_tiles_tma_kernel`` the grad weight's for strides 1 and 2, x's and dy's tiles both
    boxes over rectangles of output pixels.

Offsets are int32 (fewer registers: the pipeliner keeps the addresses of every stage in flight)
unless ``INT64_INDEX``, which the host sets for tensors with 2**31 or more elements.

``USE_DOT`` selects tensor-core ``tl.dot`` (block dims >= 16); without it (depthwise and small
groups) the kernels use outer products / broadcast sums, which are correct for any block size.
"""
from __future__ import annotations

import inspect
import os

import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def _cfg(block_m: int, warps: int, stages: int) -> "triton.Config":
    return triton.Config({"BLOCK_M": block_m}, num_warps=warps, num_stages=stages)


if INTERPRET:
    # One config: the interpreter runs programs one by one in Python, so few large programs
    # are fastest, and a single config skips benchmarking.
    FWD_CONFIGS = [_cfg(128, 4, 1)]
    SUB_FWD_CONFIGS = [_cfg(128, 4, 1)]
    DGRAD_CONFIGS = [_cfg(128, 4, 1)]
    WGRAD_CONFIGS = [_cfg(128, 4, 1)]
    TMA_FWD_CONFIGS = [triton.Config({}, num_warps=4, num_stages=1)]
else:
    # The last two depend on the pixel count (fwd_configs_for): BLOCK_M = 256 for many, 32 for few.
    FWD_CONFIGS = [_cfg(128, 4, 3), _cfg(128, 8, 3), _cfg(64, 4, 4), _cfg(256, 8, 3), _cfg(32, 4, 4)]
    # SUB subtiles hold SUB * BLOCK_N <= 128 accumulator columns: a 128-wide tile's registers
    SUB_FWD_CONFIGS = [_cfg(128, 8, 3), _cfg(64, 4, 4), _cfg(64, 8, 3)]
    DGRAD_CONFIGS = [_cfg(128, 4, 3), _cfg(128, 8, 3), _cfg(64, 4, 4)]
    WGRAD_CONFIGS = [_cfg(64, 4, 3), _cfg(128, 8, 3), _cfg(32, 4, 4)]
    # The host fixes the TMA forward's pixel rectangle (the input descriptor's box): only warps and stages vary.
    TMA_FWD_CONFIGS = [triton.Config({}, num_warps=w, num_stages=s) for w, s in ((8, 3), (4, 3), (8, 4))]

# Autotuning key: shape buckets and density bucket are passed as (otherwise unused) integer
# arguments so the key stays small; tensor dtypes are added to the key by triton itself. The
# block sizes and code paths a launch fixes are part of each kernel's key too: the forward's tile
# widths (BLOCK_N 16..128) share every KEY_*, as do grouped and ungrouped layers of one shape,
# and a configuration tuned for one of them can spill, be slow or not fit in shared memory for
# another (an OutOfResources raised outside the tuner, where nothing catches it).
TUNE_KEY = ["KEY_M", "KEY_C", "KEY_N", "KEY_DENSITY", "KEY_CONV"]
_PATH_KEY = ["USE_DOT", "INPUT_PRECISION", "INT64_INDEX"]
FWD_KEY = TUNE_KEY + _PATH_KEY + ["BLOCK_N", "BLOCK_K", "STORE", "NPOS", "ROW_RUNS", "SPLIT_K"]
SUB_FWD_KEY = TUNE_KEY + ["INPUT_PRECISION", "INT64_INDEX", "BLOCK_N", "BLOCK_K", "STORE", "SUB"]
DGRAD_KEY = TUNE_KEY + _PATH_KEY + ["BLOCK_N", "BLOCK_K"]
WGRAD_KEY = TUNE_KEY + _PATH_KEY + ["BLOCK_R", "BLOCK_C", "ATOMIC"]
DGRAD_TILES_KEY = TUNE_KEY + ["INPUT_PRECISION", "INT64_INDEX", "BLOCK_N", "BLOCK_T", "ROW_RUNS"]
TMA_FWD_KEY = TUNE_KEY + ["INPUT_PRECISION", "BLOCK_N", "BLOCK_K", "STORE", "NPOS", "ROW_RUNS", "SH", "SW", "BLOCK_M",
                          "TW"]
TMA_DGRAD_KEY = TUNE_KEY + ["INPUT_PRECISION", "BLOCK_N", "BLOCK_T", "ROW_RUNS", "BLOCK_M", "TW"]
WGRAD_TILES_KEY = TUNE_KEY + ["INPUT_PRECISION", "INT64_INDEX", "BLOCK_T", "BLOCK_C", "ATOMIC"]
TMA_WGRAD_KEY = TUNE_KEY + ["INPUT_PRECISION", "BLOCK_T", "BLOCK_C", "ATOMIC", "SH", "SW", "DY_ROWS", "BLOCK_M", "TW"]
# The KEY_* arguments are never read, but Triton compiles a new variant of a kernel whenever an
# integer argument is 1 or changes its divisibility by 16: exempt them (half of the compiles of
# a benchmark suite). Every other integer keeps its specialisation, which decides vector widths
# and index arithmetic (Wo divisible by 16, T or G equal to 1).
UNSPECIALISED = TUNE_KEY


# A forward over few output pixels (batch 1, the late layers of a CIFAR net) has few [BLOCK_M, BLOCK_N]
# programs: at 16x16 pixels and 128 filters in 64-wide tiles, 4 of them with BLOCK_M = 128, on a GPU
# of 132 multiprocessors. There BLOCK_M = 32 (mma.sync, not wgmma) makes 4x as many; BLOCK_M = 256
# makes half as many. The tuner times either for the shapes it suits.
SMALL_M = 4096


def fwd_configs_for(configs, named_args: dict, **kwargs) -> list:
    """The forward's configurations worth timing for a launch's pixel count (``KEY_M``, a power of two):
    BLOCK_M = 32 up to :data:`SMALL_M` pixels, BLOCK_M = 256 above (the autotuner's early prune)."""
    m = kwargs.get("KEY_M", named_args.get("KEY_M"))
    if m is None or len(configs) == 1:
        return list(configs)
    small = m <= SMALL_M
    return [c for c in configs if c.kwargs["BLOCK_M"] != (256 if small else 32)]


def tma_configs_for(configs, named_args: dict, **kwargs) -> list:
    """The TMA forward's configurations worth timing: 4 warps hold at most a 128 x 64 fp32 accumulator
    without spilling (the early prune)."""
    block = kwargs.get("BLOCK_M", named_args.get("BLOCK_M")) * kwargs.get("BLOCK_N", named_args.get("BLOCK_N"))
    kept = [c for c in configs if c.num_warps >= 8 or block <= 128 * 64]
    return kept or list(configs)


def tuning_bench(fn, quantiles=None):
    """Times one configuration while autotuning. Triton's default spends 25 ms warming up and
    100 ms measuring each one; these kernels run for microseconds to a few milliseconds, so a
    fifth of that still averages tens to thousands of runs, and a new shape's first call waits
    about 4x less."""
    from triton.testing import do_bench

    return do_bench(fn, warmup=5, rep=25, quantiles=quantiles)


# Where this triton can, the best configuration per key is kept in triton's on-disk cache (a shape
# is benchmarked once per machine rather than once per process), and timed with tuning_bench.
_AUTOTUNE_PARAMS = inspect.signature(triton.autotune).parameters
_TUNE_EXTRAS = {"cache_results": True, "do_bench": tuning_bench}
_TUNE_EXTRAS = {name: value for name, value in _TUNE_EXTRAS.items() if name in _AUTOTUNE_PARAMS}


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
def _fwd_pixel_block(pid_m, g, B, Ho, Wo, CG, sxb, sxc, SH, SW, PT, PL, INT64_INDEX: tl.constexpr,
                     BLOCK_M: tl.constexpr):
    """A forward program's output pixels (block ``pid_m``, their mask and (b, ho, wo)), the top-left
    corner of each one's input window and its offset in x for filter group ``g``."""
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < B * Ho * Wo
    b, ho, wo = _pixel_coords(offs_m, Ho, Wo, INT64_INDEX)
    return offs_m, m_ok, b, ho, wo, ho * SH - PT, wo * SW - PL, b * sxb + g * CG * sxc


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
def _fwd_next_entry(tile_pos_ptr, rows_tile, t, UMAX, u, c0, last_u, CG, offs_n, NPOS: tl.constexpr,
                    ROW_RUNS: tl.constexpr, BLOCK_K: tl.constexpr):
    """The next iteration's union entry and channel block (counters: no division) and its table values
    (:func:`_fwd_tables`; past the union's end, the last entry's, unused)."""
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


# reset_to_zero: a split-K launch adds into its output, so the tuner zeroes it before each timing run
# and before the launch that counts (the other launches overwrite it anyway).
@triton.autotune(configs=FWD_CONFIGS, key=FWD_KEY, prune_configs_by={"early_config_prune": fwd_configs_for},
                 reset_to_zero=["out_ptr"], **_TUNE_EXTRAS)
@triton.jit(do_not_specialize=UNSPECIALISED)
def stripe_fwd_kernel(
    x_ptr, w_ptr, bias_ptr, out_ptr,
    tile_pos_ptr, tile_npos_ptr, tile_ch_ptr, tile_grp_ptr, w_rows_ptr,
    B, H, W, Ho, Wo, CG, T, UMAX,
    sxb, sxc, sxh, sxw,
    sob, soc, soh, sow,
    SH, SW, PT, PL, DH, DW, KW: tl.constexpr,
    KEY_M, KEY_C, KEY_N, KEY_DENSITY, KEY_CONV,
    HAS_BIAS: tl.constexpr, USE_DOT: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    ACC_DTYPE: tl.constexpr, EVEN_K: tl.constexpr, INT64_INDEX: tl.constexpr, STORE: tl.constexpr,
    NPOS: tl.constexpr, ROW_RUNS: tl.constexpr, SPLIT_K: tl.constexpr,
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
        u = it_begin // KC
        c0 = (it_begin - u * KC) * BLOCK_K
        p, rows = _fwd_tables(tile_pos_ptr, rows_tile, t, UMAX, tl.minimum(u, last_u), offs_n, NPOS, ROW_RUNS)
        for it in range(it_begin, it_end):
            u_next, c0_next, p_next, rows_next = _fwd_next_entry(tile_pos_ptr, rows_tile, t, UMAX, u, c0, last_u, CG,
                                                                 offs_n, NPOS, ROW_RUNS, BLOCK_K)
            i = p // KW
            j = p - i * KW
            ok = _inside(h_in + i * DH, H, INT64_INDEX) & _inside(w_base + j * DW, W, INT64_INDEX)
            x_off = (x_base + (i * DH * sxh + j * DW * sxw))[:, None] + (c0 * sxc + x_cols)[None, :]
            if INT64_INDEX:
                rows = rows.to(tl.int64)
            if EVEN_K:
                xt = tl.load(x_ptr + x_off, mask=ok[:, None], other=0.0)
            else:
                xt = tl.load(x_ptr + x_off, mask=ok[:, None] & (c0 + offs_k < CG)[None, :], other=0.0)
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

    ch = tl.load(tile_ch_ptr + t * BLOCK_N + offs_n)  # original channel, -1 for padding columns
    if STORE == 1:
        # The host guarantees runs of 8 consecutive channels starting at multiples of 8 (and runs of
        # padding): the hint turns 2-byte scattered stores into 16-byte vector stores.
        ch = tl.max_contiguous(tl.multiple_of(ch, 8), 8)
    n_ok = ch >= 0
    if HAS_BIAS:
        bv = tl.load(bias_ptr + ch, mask=n_ok, other=0.0).to(ACC_DTYPE)
        if SPLIT_K > 1:
            bv = tl.where(tl.program_id(1) == 0, bv, 0.0)  # added once, by the first split
        acc += bv[None, :]
    if STORE == 2:
        # Contiguous NCHW output: each column is a run of pixels of one plane, stored as vectors
        # whatever the channel order.
        pix = offs_m % (Ho * Wo)
        if INT64_INDEX:
            pix = pix.to(tl.int64)
        out_ptrs = out_ptr + (b * sob + pix)[:, None] + ch[None, :] * soc
    else:
        out_ptrs = out_ptr + (b * sob + ho * soh + wo * sow)[:, None] + ch[None, :] * soc
    if SPLIT_K > 1:  # partial sums into a zeroed output of the accumulator's dtype
        tl.atomic_add(out_ptrs, acc, mask=m_ok[:, None] & n_ok[None, :])
    else:
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


# ---- forward with the input tiles loaded by the tensor memory accelerator ---------------------
# Hopper and later GPUs copy a box of a tensor into shared memory in one instruction (TMA), zero-filling
# what lies outside the tensor, negative coordinates included: at stride 1, a [1, TH, TW, BLOCK_K] box of
# the NHWC input at (b, h0 + i*DH - PT, w0 + j*DW - PL, c0) is the input tile of a TH x TW rectangle of
# output pixels at position (i, j), borders and all, with no per-pixel addresses or masks in the kernel.
# So a program computes a rectangle of one image's output pixels (the host picks TW to waste the fewest
# pixels at the image's edges). A box has no element stride; for stride 2 the descriptor views the input
# as [B, H/SH, SH, W/SW, SW*C] (row parity its own dimension, column parity folded into the channels), and
# a position's tile is the [1, TH, 1, TW, BLOCK_K] box of its parities. The descriptor is 5-d at stride 1
# too ([B, H, 1, W, C]).

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
        u_next, c0_next, p_next, rows_next = _fwd_next_entry(tile_pos_ptr, rows_tile, t, UMAX, u, c0, last_u, CG,
                                                             offs_n, NPOS, ROW_RUNS, BLOCK_K)
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
    _subtile_store(out_ptr, bias_ptr, acc, tile_ch_ptr + t * BLOCK_N, offs_n, b * sob + ho * soh + wo * sow, m_ok,
                   soc, 0, 1, BLOCK_N, HAS_BIAS, STORE, ACC_DTYPE)


# ---- forward over groups of filter tiles --------------------------------------------------------
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
def _subtile_store(out_ptr, bias_ptr, acc, ch_ptr, offs_n, out_row, m_ok, soc, I: tl.constexpr,
                   SUB: tl.constexpr, BLOCK_N: tl.constexpr, HAS_BIAS: tl.constexpr, STORE: tl.constexpr,
                   ACC_DTYPE: tl.constexpr):
    """Subtile ``I``'s columns into their original channels (bias added), stored as the forward stores."""
    if I < SUB:
        ch = tl.load(ch_ptr + I * BLOCK_N + offs_n)  # -1 for padding columns
        if STORE == 1:  # aligned runs of 8 consecutive channels: 16-byte vector stores
            ch = tl.max_contiguous(tl.multiple_of(ch, 8), 8)
        n_ok = ch >= 0
        if HAS_BIAS:
            acc += tl.load(bias_ptr + ch, mask=n_ok, other=0.0).to(ACC_DTYPE)[None, :]
        tl.store(out_ptr + out_row[:, None] + ch[None, :] * soc, acc.to(out_ptr.dtype.element_ty),
                 mask=m_ok[:, None] & n_ok[None, :])


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
    ch = sup_ch_ptr + t * SUB * BLOCK_N
    _subtile_store(out_ptr, bias_ptr, acc0, ch, offs_n, out_row, m_ok, soc, 0, SUB, BLOCK_N, HAS_BIAS, STORE, ACC_DTYPE)
    _subtile_store(out_ptr, bias_ptr, acc1, ch, offs_n, out_row, m_ok, soc, 1, SUB, BLOCK_N, HAS_BIAS, STORE, ACC_DTYPE)
    _subtile_store(out_ptr, bias_ptr, acc2, ch, offs_n, out_row, m_ok, soc, 2, SUB, BLOCK_N, HAS_BIAS, STORE, ACC_DTYPE)
    _subtile_store(out_ptr, bias_ptr, acc3, ch, offs_n, out_row, m_ok, soc, 3, SUB, BLOCK_N, HAS_BIAS, STORE, ACC_DTYPE)
    _subtile_store(out_ptr, bias_ptr, acc4, ch, offs_n, out_row, m_ok, soc, 4, SUB, BLOCK_N, HAS_BIAS, STORE, ACC_DTYPE)
    _subtile_store(out_ptr, bias_ptr, acc5, ch, offs_n, out_row, m_ok, soc, 5, SUB, BLOCK_N, HAS_BIAS, STORE, ACC_DTYPE)
    _subtile_store(out_ptr, bias_ptr, acc6, ch, offs_n, out_row, m_ok, soc, 6, SUB, BLOCK_N, HAS_BIAS, STORE, ACC_DTYPE)
    _subtile_store(out_ptr, bias_ptr, acc7, ch, offs_n, out_row, m_ok, soc, 7, SUB, BLOCK_N, HAS_BIAS, STORE, ACC_DTYPE)


@triton.jit
def _dgrad_program(H, W, B, G, NCB, SH, SW, BLOCK_N: tl.constexpr):
    """A grad-input program's work: output phase (rh, rw) on grid axis 1 (the input pixels
    (rh + SH * hp, rw + SW * wp), Mp = B * Hp * Wp of them), then group g and channel block c0
    (axis 0, fastest) and the block pid_m of phase pixels."""
    pid = tl.program_id(0)
    phase = tl.program_id(1)
    rh = phase // SW
    rw = phase - rh * SW
    Hp = (H - rh + SH - 1) // SH
    Wp = (W - rw + SW - 1) // SW
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
def _dgrad_chunk(r0_ptr, r1_ptr, dh_ptr, dw_ptr, filt_ptr, k, k_end, offs_r, USE_DOT: tl.constexpr):
    """Chunk ``k``'s packed rows [r0, r1), dy offsets (dh, dw) and, for the tensor-core path, the
    filter of each row (zeros past ``k_end``: the read-ahead of a chunk that does not come)."""
    here = k < k_end
    r0 = tl.load(r0_ptr + k, mask=here, other=0)
    r1 = tl.load(r1_ptr + k, mask=here, other=0)
    dh = tl.load(dh_ptr + k, mask=here, other=0)
    dw = tl.load(dw_ptr + k, mask=here, other=0)
    if USE_DOT:
        n = tl.load(filt_ptr + r0 + offs_r, mask=r0 + offs_r < r1, other=0)
    else:
        n = r0
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
        offs_r = tl.arange(0, BLOCK_K)
        # Each chunk's table entries are read one chunk ahead, into registers, as in the forward (a table
        # read that addresses the same iteration's tiles serialises the pipeliner's stages).
        r0_next, r1_next, dh_next, dw_next, n_next = _dgrad_chunk(
            chunk_r0_ptr, chunk_r1_ptr, chunk_dh_ptr, chunk_dw_ptr, filt_ptr, k_begin, k_end, offs_r, USE_DOT)
        for kk in range(k_begin, k_end):
            r0, r1, dh, dw, n = r0_next, r1_next, dh_next, dw_next, n_next
            r0_next, r1_next, dh_next, dw_next, n_next = _dgrad_chunk(
                chunk_r0_ptr, chunk_r1_ptr, chunk_dh_ptr, chunk_dw_ptr, filt_ptr, kk + 1, k_end, offs_r, USE_DOT)
            ho = hp + dh
            wo = wp + dw
            ok = _dy_inside(ho, wo, m_ok, Ho, Wo)
            dy_off = dy_row + ho * sdh + wo * sdw
            if USE_DOT:
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
                for r in range(r0, r1):
                    n = tl.load(filt_ptr + r)
                    dv = tl.load(dy_ptr + dy_off + n * sdc, mask=ok, other=0.0).to(ACC_DTYPE)
                    wv = tl.load(w_ptr + r * CG + offs_c, mask=c_ok, other=0.0).to(ACC_DTYPE)
                    acc += dv[:, None] * wv[None, :]
        _store_dx(dx_ptr, acc, b, hp, wp, rh, rw, g, offs_c, m_ok, c_ok, CG, sxb, sxc, sxh, sxw, SH, SW)


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


@triton.jit
def stripe_gather_columns_kernel(
    src_ptr, dst_ptr, cols_ptr,
    M, Ho, Wo, NCOL,
    ssb, ssc, ssh, ssw,
    INT64_INDEX: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """dst[m, j] = src[pixel m, channel cols[j]] (0 where cols[j] < 0): dy in the forward's tile
    order, [pixels, T * BLOCK_T] contiguous, so that the tile kernels of the backward load
    contiguous rows of filters (a gather of 2-byte channels inside them is several times slower)."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
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


@triton.autotune(configs=DGRAD_CONFIGS, key=DGRAD_TILES_KEY, **_TUNE_EXTRAS)
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
):
    """Grad input over the forward's filter tiles: for each (tile, position of its union) that lines
    up with this program's output phase, a [pixels, BLOCK_T filters] x [BLOCK_T, channels] product.
    Tile t reads dy's columns ``dy_col0[t]`` .. + BLOCK_T, a multiple of BLOCK_T: dy gathered into tile
    order (``stripe_gather_columns_kernel``), or dy itself where every tile is a full run of
    consecutive channels; either way every load is a contiguous row. The work spent on pruned stripes
    is the forward's (1 - tile efficiency)."""
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
        dh, dw, col0, rows = _dgrad_tile_entry(ent_t_ptr, ent_u_ptr, ent_dh_ptr, ent_dw_ptr, dy_col0_ptr, w_rows_ptr,
                                               e_begin, e_end, UMAX, offs_t, ROW_RUNS, BLOCK_T)
        for e in range(e_begin, e_end):
            dh_next, dw_next, col0_next, rows_next = _dgrad_tile_entry(
                ent_t_ptr, ent_u_ptr, ent_dh_ptr, ent_dw_ptr, dy_col0_ptr, w_rows_ptr, e + 1, e_end, UMAX, offs_t,
                ROW_RUNS, BLOCK_T)
            ok = _inside(hp_in + dh, Ho, INT64_INDEX) & _inside(wp + dw, Wo, INT64_INDEX)
            dy_off = (dy_base + (dh * sdh + dw * sdw + col0 * sdc))[:, None] + dy_cols[None, :]
            dyt = tl.load(dy_ptr + dy_off, mask=ok[:, None], other=0.0)
            wt = _dgrad_tile_weights(w_ptr, w_block, rows, offs_c, c_ok, CG, INT64_INDEX, ROW_RUNS)
            dh, dw, col0, rows = dh_next, dw_next, col0_next, rows_next
            acc = tl.dot(dyt, wt, acc, input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)
        _store_dx(dx_ptr, acc, b, hp, wp, rh, rw, g, offs_c, m_ok, c_ok, CG, sxb, sxc, sxh, sxw, SH, SW)


# Grad input with dy's tiles loaded by the TMA, as in stripe_fwd_tma_kernel: at stride 1 the dy pixels an
# entry reads for a TH x TW rectangle of input pixels are a [1, TH, TW, BLOCK_T] box of dy (or of dy
# gathered into tile order) at (b, h0 + dh, w0 + dw, col0), zero-filled outside dy.

@triton.autotune(configs=TMA_FWD_CONFIGS, key=TMA_DGRAD_KEY, prune_configs_by={"early_config_prune": tma_configs_for},
                 **_TUNE_EXTRAS)
@triton.jit(do_not_specialize=UNSPECIALISED)
def stripe_dgrad_tiles_tma_kernel(
    dy_desc, w_ptr, dx_ptr, w_rows_ptr, dy_col0_ptr,
    ent_t_ptr, ent_u_ptr, ent_dh_ptr, ent_dw_ptr,
    H, W, CG, NCB, UMAX, E,
    sxb, sxc, sxh, sxw,
    KEY_M, KEY_C, KEY_N, KEY_DENSITY, KEY_CONV,
    INPUT_PRECISION: tl.constexpr, ACC_DTYPE: tl.constexpr, ROW_RUNS: tl.constexpr,
    BLOCK_M: tl.constexpr, TW: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr,
):
    """Grad input over the forward's filter tiles (``stripe_dgrad_tiles_kernel`` at stride 1, one group): a
    program computes a TH x TW rectangle of one image's input pixels and BLOCK_N channels, over the E
    (tile, union position) entries."""
    pid = tl.program_id(0)
    c0 = pid % NCB * BLOCK_N  # channel blocks fastest: the programs of a rectangle read the same dy boxes
    b, h0, w0 = _rectangle(pid // NCB, H, W, BLOCK_M, TW)
    offs_t = tl.arange(0, BLOCK_T)
    offs_c = c0 + tl.arange(0, BLOCK_N)
    c_ok = offs_c < CG
    w_block = offs_t[:, None] * CG + offs_c[None, :]
    acc = _box_acc(BLOCK_M, BLOCK_N, ACC_DTYPE)
    dh, dw, col0, rows = _dgrad_tile_entry(ent_t_ptr, ent_u_ptr, ent_dh_ptr, ent_dw_ptr, dy_col0_ptr, w_rows_ptr,
                                           0, E, UMAX, offs_t, ROW_RUNS, BLOCK_T)
    for e in range(0, E):  # the entry tables read one iteration ahead (see stripe_fwd_kernel)
        dh_next, dw_next, col0_next, rows_next = _dgrad_tile_entry(
            ent_t_ptr, ent_u_ptr, ent_dh_ptr, ent_dw_ptr, dy_col0_ptr, w_rows_ptr, e + 1, E, UMAX, offs_t,
            ROW_RUNS, BLOCK_T)
        dyt = dy_desc.load([b, h0 + dh, w0 + dw, col0]).reshape(BLOCK_M, BLOCK_T)
        wt = _dgrad_tile_weights(w_ptr, w_block, rows, offs_c, c_ok, CG, False, ROW_RUNS)
        dh, dw, col0, rows = dh_next, dw_next, col0_next, rows_next
        acc = _box_dot(acc, dyt, wt, BLOCK_N, INPUT_PRECISION, ACC_DTYPE)
    acc = _box_result(acc, BLOCK_N)
    hi, wi, m_ok = _rectangle_pixels(h0, w0, H, W, BLOCK_M, TW)
    dx_ptrs = dx_ptr + (b * sxb + hi * sxh + wi * sxw)[:, None] + offs_c[None, :] * sxc  # (b: one image)
    tl.store(dx_ptrs, acc.to(dx_ptr.dtype.element_ty), mask=m_ok[:, None] & c_ok[None, :])


@triton.autotune(configs=WGRAD_CONFIGS, key=WGRAD_TILES_KEY, reset_to_zero=["dw_ptr"], **_TUNE_EXTRAS)
@triton.jit(do_not_specialize=UNSPECIALISED)
def stripe_wgrad_tiles_kernel(
    dy_ptr, x_ptr, dw_ptr, w_rows_ptr, dy_col0_ptr,
    ent_t_ptr, ent_u_ptr, tile_pos_ptr, tile_grp_ptr,
    B, H, W, Ho, Wo, CG, NCB, UMAX, CHUNK,
    sdb, sdc, sdh, sdw,
    sxb, sxc, sxh, sxw,
    SH, SW, PT, PL, DH, DW, KW,
    KEY_M, KEY_C, KEY_N, KEY_DENSITY, KEY_CONV,
    ATOMIC: tl.constexpr, INPUT_PRECISION: tl.constexpr, ACC_DTYPE: tl.constexpr, INT64_INDEX: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Grad weight over the forward's filter tiles: per (tile, position of its union) a
    [channels, pixels] x [pixels, BLOCK_T filters] product (channels on the M side: BLOCK_C = 64 makes
    it a warpgroup MMA on Hopper whatever the tile width, where [BLOCK_T, pixels] x [pixels, channels]
    with a 16 or 32-wide tile is not), split-K over pixels (grid axis 1) and added atomically into the
    fp32 rows that the tile's filters keep (the others are dropped); with a single split (not
    ``ATOMIC``) each kept row is written once, in the buffer's dtype. dy's columns as in
    ``stripe_dgrad_tiles_kernel``."""
    pid = tl.program_id(0)
    split = tl.program_id(1)
    e = pid // NCB
    c0 = (pid - e * NCB) * BLOCK_C
    t = tl.load(ent_t_ptr + e)
    u = tl.load(ent_u_ptr + e)
    p = tl.load(tile_pos_ptr + t * UMAX + u)
    g = tl.load(tile_grp_ptr + t)
    i = p // KW
    j = p - i * KW
    offs_t = tl.arange(0, BLOCK_T)
    offs_c = c0 + tl.arange(0, BLOCK_C)
    c_ok = offs_c < CG
    if INT64_INDEX:
        offs_c = offs_c.to(tl.int64)
    x_ch = (g * CG + offs_c) * sxc
    dy_col = (tl.multiple_of(tl.load(dy_col0_ptr + t), BLOCK_T) + offs_t) * sdc

    M = B * Ho * Wo
    m_start = split * CHUNK
    m_end = tl.minimum(M, m_start + CHUNK)
    acc = tl.zeros((BLOCK_C, BLOCK_T), dtype=ACC_DTYPE)
    # Each block of pixels advances the last one's coordinates (no division per pixel in the loop).
    offs_m = m_start + tl.arange(0, BLOCK_M)
    b, ho, wo = _pixel_coords(offs_m, Ho, Wo, INT64_INDEX)
    step_b, step_h, step_w = BLOCK_M // (Ho * Wo), (BLOCK_M // Wo) % Ho, BLOCK_M % Wo
    for m0 in range(m_start, m_end, BLOCK_M):
        m_ok = offs_m < m_end
        hi = ho * SH + (i * DH - PT)
        wi = wo * SW + (j * DW - PL)
        x_ok = m_ok & _inside(hi, H, INT64_INDEX) & _inside(wi, W, INT64_INDEX)
        xt = tl.load(x_ptr + x_ch[:, None] + (b * sxb + hi * sxh + wi * sxw)[None, :],
                     mask=c_ok[:, None] & x_ok[None, :], other=0.0)
        dyt = tl.load(dy_ptr + (b * sdb + ho * sdh + wo * sdw)[:, None] + dy_col[None, :], mask=m_ok[:, None],
                      other=0.0)
        acc = tl.dot(xt, dyt, acc, input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)
        offs_m += BLOCK_M
        b, ho, wo = _pixel_step(b, ho, wo, step_b, step_h, step_w, Ho, Wo)

    _store_wgrad_tile(dw_ptr, acc, w_rows_ptr + (t * UMAX + u) * BLOCK_T, offs_t, offs_c, c_ok, CG, ATOMIC,
                      INT64_INDEX)


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
    pid = tl.program_id(0)
    e = pid // NCB
    c0 = (pid - e * NCB) * BLOCK_C
    t = tl.load(ent_t_ptr + e)
    u = tl.load(ent_u_ptr + e)
    p = tl.load(tile_pos_ptr + t * UMAX + u)
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


@triton.jit
def interpreter_probe(n_ptr, out_ptr):
    """Counts to a loaded bound: the pattern every kernel above uses for its main loop. Run once
    under TRITON_INTERPRET=1 to check that this triton's interpreter supports it."""
    n = tl.load(n_ptr)
    total = 0
    for _ in range(0, n):
        total += 1
    tl.store(out_ptr, total)
