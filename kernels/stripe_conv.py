"""Triton kernels of the stripe_conv2d op (forward, grad input, grad weight).

The host side (tile metadata, launch parameters) lives in
``stripeconv.backends.triton_backend``; this module gathers the ``@triton.jit`` kernels from the
modules beside it, one kernel family each (``forward``, ``forward_tma``, ``forward_subtiles``,
``grad_input``, ``grad_weight``, ``gather``, ``grad_input_tiles``, ``grad_weight_tiles``; their
autotuning configurations in ``_tuning``, shared index helpers in ``_indexing`` and ``_tma_boxes``).
Every kernel addresses tensors through explicit element strides, so NCHW and NHWC (channels_last)
work alike; NHWC is the fast layout because the channel dimension of every [pixels, channels] tile
is then contiguous.

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
    iterations; each split stores its partial sums into a fp32 workspace and counts itself in, and the
    split that arrives last adds them up in split order (deterministic) and stores the tile.
    Borders are masked loads. Bias is added in the epilogue; the store (``STORE``) puts the tile's
    columns back in their original channels: as 16-byte vectors where the tile holds aligned runs
    of 8 consecutive channels, into NCHW planes (each column a run of pixels), or scattered; or it
    stores tile order (each tile's columns one run of a channels_last buffer) for
    ``stripe_gather_columns_kernel`` to put in channel order.

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
    ``stripe_dgrad_tiles_tma_kernel`` is the grad input's variant with dy's tiles loaded as TMA
    boxes over rectangles of one output phase's input pixels, as ``stripe_fwd_tma_kernel`` loads x's;
    ``stripe_wgrad_tiles_tma_kernel`` the grad weight's for strides 1 and 2, x's and dy's tiles both
    boxes over rectangles of output pixels. With ``BY_POSITION`` both take entries of one kernel position
    and the tiles that keep it side by side (their dy columns and packed rows through per-entry tables,
    in runs of a tile's width): grad weight loads x's tile once for all of them, grad input multiplies
    them in one deeper product.

``stripe_gather_columns_kernel``
    Columns gathered by a table: dy into the forward's tile order for the tile backward, a forward's
    tile-order output into channel order.

``stripe_scatter_rows_kernel``
    The packed rows scattered into a dense weight (zeros for pruned stripes) in one launch: the weight
    of the cuDNN hand-over, which a CUDA graph scatters again on every replay.

Offsets are int32 (fewer registers: the pipeliner keeps the addresses of every stage in flight)
unless ``INT64_INDEX``, which the host sets for tensors with 2**31 or more elements.

``USE_DOT`` selects tensor-core ``tl.dot`` (block dims >= 16); without it (depthwise and small
groups) the kernels use outer products / broadcast sums, which are correct for any block size.
"""
from __future__ import annotations

import triton
import triton.language as tl

from ._tuning import INTERPRET
from .forward import stripe_fwd_kernel
from .forward_subtiles import stripe_fwd_sub_kernel
from .forward_tma import stripe_fwd_tma_kernel
from .gather import stripe_gather_columns_kernel, stripe_scatter_rows_kernel
from .grad_input import stripe_dgrad_kernel
from .grad_input_tiles import stripe_dgrad_tiles_kernel, stripe_dgrad_tiles_tma_kernel
from .grad_weight import stripe_wgrad_kernel
from .grad_weight_tiles import stripe_wgrad_tiles_kernel, stripe_wgrad_tiles_tma_kernel

__all__ = ["INTERPRET", "interpreter_probe", "stripe_dgrad_kernel", "stripe_dgrad_tiles_kernel",
           "stripe_dgrad_tiles_tma_kernel", "stripe_fwd_kernel", "stripe_fwd_sub_kernel", "stripe_fwd_tma_kernel",
           "stripe_gather_columns_kernel", "stripe_scatter_rows_kernel", "stripe_wgrad_kernel",
           "stripe_wgrad_tiles_kernel", "stripe_wgrad_tiles_tma_kernel", "tl"]


@triton.jit
def interpreter_probe(n_ptr, out_ptr):
    """Counts to a loaded bound: the pattern every kernel uses for its main loop. Run once
    under TRITON_INTERPRET=1 to check that this triton's interpreter supports it."""
    n = tl.load(n_ptr)
    total = 0
    for _ in range(0, n):
        total += 1
    tl.store(out_ptr, total)
