"""Mask-derived metadata of the Triton backend's kernels (:mod:`.triton_backend` launches them).

Host code only (torch and numpy, no triton), so that tools which only need tile efficiency
(reports, benchmarks) run without triton or a GPU.

Forward: filters are permuted into tiles of ``BLOCK_N`` filters of one group, chosen so that the
union of the positions kept by a tile's filters is small (filters are clustered by their position
bit pattern: greedy growth of the union, or a sort by pattern, whichever computes fewer stripes),
and tiles are sorted by work (heavy tiles first). The kernel reads the packed ``[S, C/g]`` rows in
place through a ``[T, U, BLOCK_N]`` table of row indices (-1 where a filter does not keep a
position of its tile's union: a masked load of zeros), so a call copies no weights. *Tile
efficiency* = kept stripes / stripes computed (``sum_t |union_t| * BLOCK_N``);
:func:`tile_efficiency` reports it for one width, :func:`best_tile_efficiency` for the best of the
widths :func:`tile_widths` offers.

Backward: the filter of each packed row; for grad input, per (output phase, group) the chunks of
packed rows of the positions whose taps line up with that phase (this depends on stride, padding
and dilation too); for grad weight, row blocks of one (position, group). Grad input and grad
weight spend no work on pruned stripes.

All metadata depends only on the mask (and groups, block sizes, conv geometry). It is cached per
mask (:mod:`._masks`: keyed on its ``(data_ptr, _version, shape, device)``, holding a reference so
that its storage cannot be recycled for another mask while cached). Building it reads the mask on
the host once (a device sync); a cached lookup does not sync.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import numpy as np
import torch
from torch import Tensor

from . import _tile_clustering as clustering
from ._environ import getenv
from ._masks import clear, mask_key, memo

__all__ = [
    "ForwardPlan", "SubtilePlan", "GradInputPlan", "GradWeightPlan", "TilesBackwardPlan", "DensePlan",
    "default_block_n", "subtile_count", "subtile_plan", "narrow_plans", "balanced_plans",
    "forward_plan", "tile_efficiency", "tile_widths", "best_tile_efficiency", "filter_order", "clear_cache",
]


def next_pow2(x: int) -> int:
    """The smallest power of two >= ``x`` (1 for ``x <= 1``)."""
    return 1 << max(0, int(x) - 1).bit_length()


_BLOCK_N_CHOICES = (1, 2, 4, 8, 16, 32, 64, 128)  # tl.arange needs a power of two


def default_block_n(out_per_group: int) -> int:
    """Filters per forward tile: 64 (wgmma-sized) for wide layers, smaller for narrow ones."""
    env = getenv("STRIPECONV_TRITON_BLOCK_N")
    if env:
        width = int(env) if env.strip().isdigit() else 0
        if width not in _BLOCK_N_CHOICES:
            raise ValueError(f"STRIPECONV_TRITON_BLOCK_N must be a power of two from 1 to {_BLOCK_N_CHOICES[-1]} "
                             f"(filters per forward tile), got {env!r}")
        return width
    if out_per_group >= 16:
        return min(64, next_pow2(out_per_group))
    return max(2, next_pow2(out_per_group))


def _aligned_runs(tile_ch: np.ndarray) -> bool:
    """Every aligned group of 8 columns of every tile holds 8 consecutive channels starting at a
    multiple of 8, or only padding (-1): the forward kernel then stores 16-byte vectors."""
    if tile_ch.shape[1] % 8:
        return False
    runs = tile_ch.reshape(tile_ch.shape[0], -1, 8)
    first = runs[..., :1]
    padding = (runs == -1).all(-1)
    consecutive = (runs == first + np.arange(8)).all(-1) & (first[..., 0] % 8 == 0)
    return bool((padding | consecutive).all())


@dataclass
class ForwardPlan:
    """Filter tiles of the forward kernel for one mask, groups and tile width (index tensors on the device)."""

    block_n: int
    num_tiles: int
    umax: int
    tile_pos: Tensor      # [T, UMAX] int32 positions of each tile's union (padded with 0)
    tile_npos: Tensor     # [T] int32
    tile_ch: Tensor       # [T, BLOCK_N] int32 original channel of each column, -1 = padding
    tile_grp: Tensor      # [T] int32 group of each tile
    w_rows: Tensor        # [T * UMAX * BLOCK_N] int32 packed row of each (tile, union position, column), -1 = zero
    tile_rows: Tensor     # [T * UMAX * BLOCK_N] int32 0, 1, 2, ...: the rows of the tile-major weight (w_rows gathered)
    order_cols: Tensor    # [N] int32 column of each channel in tile order (``tile_ch`` flattened), for the gather
    kept: int
    computed: int
    density: float
    mask_shape: tuple
    aligned: bool = False  # tile columns come in aligned runs of 8 consecutive channels (:func:`_aligned_runs`)
    in_order: bool = False  # tiles of consecutive filters (not clustered)
    runs: bool = False  # every tile is a full run of BLOCK_N consecutive channels (so starts at a multiple of it)
    all_positions: bool = False  # every tile's union is every kernel position (tile_pos[t] = 0, 1, ..., kh*kw - 1)
    row_runs: bool = False  # every (tile, union position) reads consecutive packed rows, none absent (:func:`_row_runs`)
    balanced: bool = False  # tiles re-clustered to shorten the longest union (:func:`balanced_plans`)

    @property
    def efficiency(self) -> float:
        return self.kept / self.computed if self.computed else 1.0


@dataclass
class GradInputPlan:
    """Packed-row chunks of the grad input kernel, per (output phase, group)."""

    filt: Tensor          # [S] int32 filter of each packed row
    chunk_off: Tensor     # [PHASES * G + 1] int32: chunks of (phase, group) k are off[k]..off[k+1]
    chunk_r0: Tensor      # [NC] int32 packed rows r0..r1 of one position and group
    chunk_r1: Tensor
    chunk_dh: Tensor      # [NC] int32 dy row/column read, relative to the phase pixel
    chunk_dw: Tensor
    density: float


@dataclass
class GradWeightPlan:
    """Packed-row blocks of the grad weight kernel, one (position, group) each."""

    filt: Tensor          # [S] int32 filter of each packed row
    block_r: int
    blk_pos: Tensor       # [NB] int32 blocks of packed rows of one (position, group)
    blk_r0: Tensor
    blk_r1: Tensor
    blk_grp: Tensor
    num_blocks: int
    density: float


def _row_ids(mask_cpu: Tensor) -> np.ndarray:
    """[P, N] packed row index of every stripe (position-major), -1 where pruned."""
    n, kh, kw = mask_cpu.shape
    pm = mask_cpu.permute(1, 2, 0).reshape(kh * kw, n).numpy()
    rid = np.cumsum(pm.reshape(-1)).reshape(pm.shape) - 1
    return np.where(pm, rid, -1)


def _build_forward(mask_cpu: Tensor, groups: int, block_n: int, device, in_order: bool = False) -> ForwardPlan:
    n, kh, kw = mask_cpu.shape
    ng = n // groups
    pat_all = mask_cpu.reshape(n, kh * kw).numpy().astype(bool)
    tiles = []  # (group, [filters])
    for g in range(groups):
        pat = pat_all[g * ng:(g + 1) * ng]
        best = clustering.tiles_in_order(ng, block_n) if in_order else clustering.clustered(pat, block_n)
        tiles.extend((g, [g * ng + k for k in sorted(t)]) for t in best)
    return _forward_from_tiles(mask_cpu, tiles, block_n, device, in_order=in_order)


def _forward_from_tiles(mask_cpu: Tensor, tiles: list, block_n: int, device, in_order: bool = False,
                        balanced: bool = False) -> ForwardPlan:
    """The plan's tables for ``tiles``, (group, [filters]) pairs of at most ``block_n`` filters."""
    n, kh, kw = mask_cpu.shape
    npos = kh * kw
    pat_all = mask_cpu.reshape(n, npos).numpy().astype(bool)
    rid = _row_ids(mask_cpu)
    s = int(pat_all.sum())
    unions = [np.nonzero(pat_all[f].any(0))[0] for _, f in tiles]
    order = sorted(range(len(tiles)), key=lambda k: -len(unions[k]))  # heavy tiles first
    num_tiles = len(tiles)
    umax = max([1] + [len(u) for u in unions])
    tile_pos = np.zeros((num_tiles, umax), dtype=np.int32)
    tile_npos = np.zeros(num_tiles, dtype=np.int32)
    tile_ch = np.full((num_tiles, block_n), -1, dtype=np.int32)
    tile_grp = np.zeros(num_tiles, dtype=np.int32)
    w_rows = np.full((num_tiles, umax, block_n), -1, dtype=np.int32)
    computed = 0
    for t, k in enumerate(order):
        g, filters = tiles[k]
        u = unions[k]
        tile_pos[t, :len(u)] = u
        tile_npos[t] = len(u)
        tile_ch[t, :len(filters)] = filters
        tile_grp[t] = g
        if len(u):
            r = rid[np.ix_(u, filters)]  # [U, F]
            w_rows[t, :len(u), :len(filters)] = r
        computed += len(u) * block_n

    def dev(a):
        return torch.from_numpy(np.ascontiguousarray(a)).to(device)

    return ForwardPlan(
        block_n=block_n, num_tiles=num_tiles, umax=umax, tile_pos=dev(tile_pos), tile_npos=dev(tile_npos),
        tile_ch=dev(tile_ch), tile_grp=dev(tile_grp), w_rows=dev(w_rows.reshape(-1)),
        tile_rows=dev(np.arange(w_rows.size, dtype=np.int32)),
        order_cols=dev(tile_order_cols(tile_ch, n)), kept=s,
        computed=computed, density=s / max(1, n * npos), mask_shape=(n, kh, kw), aligned=_aligned_runs(tile_ch),
        in_order=in_order, runs=bool((tile_ch == tile_ch[:, :1] + np.arange(block_n)).all()),
        all_positions=bool((tile_npos == npos).all()), row_runs=_row_runs(w_rows, tile_npos), balanced=balanced,
    )


def tile_order_cols(tile_ch: np.ndarray, n: int) -> np.ndarray:
    """[N] int32 column of each of ``n`` channels in the tile order of ``tile_ch`` (the channel of each
    column, per tile: the table flattened), -1 for a channel in no column."""
    flat = tile_ch.reshape(-1)
    cols = np.full(n, -1, dtype=np.int32)
    stored = np.nonzero(flat >= 0)[0]
    cols[flat[stored]] = stored
    return cols


def _row_runs(w_rows: np.ndarray, tile_npos: np.ndarray) -> bool:
    """Whether each tile's filters all keep every position of its union and sit in consecutive packed
    rows there (``w_rows[t, u] = r0 + 0..BLOCK_N-1``): tiles of consecutive filters that keep the same
    positions, as at density 1, in a filter-pruned layer or with grouped stripes in tile order. The
    forward then reads a tile's weights as one [BLOCK_N, C] block of rows, without the row table."""
    block_n = w_rows.shape[2]
    for t, npos in enumerate(tile_npos):
        rows = w_rows[t, :npos]
        if (rows != rows[:, :1] + np.arange(block_n)).any() or (rows[:, 0] < 0).any():
            return False
    return True


def _segments(mask_cpu: Tensor, groups: int) -> tuple[np.ndarray, np.ndarray]:
    """(filter of each packed row, [P, G + 1] row offsets of each (position, group))."""
    n, kh, kw = mask_cpu.shape
    npos = kh * kw
    pm = mask_cpu.permute(1, 2, 0).reshape(npos, n).numpy().astype(bool)  # [P, N]
    filt = np.nonzero(pm)[1].astype(np.int32)  # row-major over (p, n): the packed order
    per_group = pm.reshape(npos, groups, n // groups).sum(2)  # [P, G]
    starts = np.concatenate([[0], np.cumsum(pm.sum(1))])[:-1]
    seg = np.zeros((npos, groups + 1), dtype=np.int64)
    seg[:, 0] = starts
    seg[:, 1:] = starts[:, None] + np.cumsum(per_group, 1)
    return filt, seg


def _dev(a: np.ndarray, device, dtype=np.int32) -> Tensor:
    a = np.asarray(a, dtype=dtype).reshape(-1)
    return torch.from_numpy(np.ascontiguousarray(a if len(a) else np.zeros(1, dtype))).to(device)


def _build_grad_input(mask_cpu: Tensor, groups: int, block: int, conv: tuple, device) -> GradInputPlan:
    (sh, sw), (pt, pl), (dh, dw) = conv
    n, kh, kw = mask_cpu.shape
    filt, seg = _segments(mask_cpu, groups)
    chunks, offsets = [], [0]
    for rh in range(sh):
        for rw in range(sw):
            # Taps of position (i, j) line up with this phase iff (rh + pt - i*dh) % sh == 0 (and
            # likewise for w); then they read dy at (hp + oh, wp + ow) for every phase pixel.
            for g in range(groups):
                for p in range(kh * kw):
                    i, j = divmod(p, kw)
                    th, tw = rh + pt - i * dh, rw + pl - j * dw
                    if th % sh or tw % sw:
                        continue
                    a, b = int(seg[p, g]), int(seg[p, g + 1])
                    chunks.extend((r0, min(b, r0 + block), th // sh, tw // sw) for r0 in range(a, b, block))
                offsets.append(len(chunks))
    ch = np.array(chunks, dtype=np.int64).reshape(-1, 4)
    return GradInputPlan(
        filt=_dev(filt, device), chunk_off=_dev(offsets, device), chunk_r0=_dev(ch[:, 0], device),
        chunk_r1=_dev(ch[:, 1], device), chunk_dh=_dev(ch[:, 2], device), chunk_dw=_dev(ch[:, 3], device),
        density=len(filt) / max(1, mask_cpu.numel()),
    )


def _build_grad_weight(mask_cpu: Tensor, groups: int, block: int, conv: tuple, device) -> GradWeightPlan:
    filt, seg = _segments(mask_cpu, groups)
    blocks = []
    for p in range(seg.shape[0]):
        for g in range(groups):
            a, b = int(seg[p, g]), int(seg[p, g + 1])
            blocks.extend((p, r0, min(b, r0 + block), g) for r0 in range(a, b, block))
    blk = np.array(blocks, dtype=np.int64).reshape(-1, 4)
    return GradWeightPlan(
        filt=_dev(filt, device), block_r=block, blk_pos=_dev(blk[:, 0], device), blk_r0=_dev(blk[:, 1], device),
        blk_r1=_dev(blk[:, 2], device), blk_grp=_dev(blk[:, 3], device), num_blocks=len(blk),
        density=len(filt) / max(1, mask_cpu.numel()),
    )


@dataclass
class SubtilePlan:
    """The forward's tiles of one width in groups of ``sub`` tiles of one filter group, for the subtile
    forward (one program per group of tiles and pixel block: each input tile is loaded once for the
    group's union of positions and multiplied by the subtiles that keep that position; tiles are grouped
    by the positions they keep, as filters are into tiles). It computes
    the stripes its tiles compute (the same tile efficiency) and reads x ``x_reads`` times per pixel
    block (the sum of the groups' unions) instead of ``sum_t |union_t|``."""

    block_n: int
    sub: int
    num_tiles: int        # groups of tiles (the kernel's T)
    umax: int
    sup_pos: Tensor       # [T, UMAX] int32 positions of each group's union (padded with 0)
    sup_npos: Tensor      # [T] int32
    sup_bits: Tensor      # [T, UMAX] int32 bit i: subtile i's union holds the position
    sup_ch: Tensor        # [T, SUB * BLOCK_N] int32 original channel of each column, -1 = padding
    sup_grp: Tensor       # [T] int32
    sup_rows: Tensor      # [T * UMAX * SUB * BLOCK_N] int32 packed row, -1 = zero
    order_cols: Tensor    # [N] int32 column of each channel in the groups' tile order (``sup_ch`` flattened)
    kept: int
    computed: int
    x_reads: int
    density: float
    mask_shape: tuple
    aligned: bool


def _build_subtiles(fwd: ForwardPlan, groups: int, block_n: int, conv: tuple, device) -> SubtilePlan:
    sub, _ = conv
    kh, kw = fwd.mask_shape[1:]
    t_all, u_all = fwd.num_tiles, fwd.umax
    tile_pos, tile_npos = fwd.tile_pos.numpy(), fwd.tile_npos.numpy()
    tile_ch, tile_grp = fwd.tile_ch.numpy(), fwd.tile_grp.numpy()
    w_rows = fwd.w_rows.numpy().reshape(t_all, u_all, block_n)
    sets = []  # the plan's tiles of each filter group in sets of ``sub``, clustered by the positions they keep
    for g in range(groups):
        tiles = [t for t in range(t_all) if tile_grp[t] == g]
        if len(tiles) > sub:
            keeps = np.zeros((len(tiles), kh * kw), dtype=bool)
            for i, t in enumerate(tiles):
                keeps[i, tile_pos[t, :tile_npos[t]]] = True
            sets.extend((g, [tiles[i] for i in sorted(c)]) for c in clustering.clustered(keeps, sub, nested=False))
        else:
            sets.append((g, tiles))
    unions = [sorted({int(p) for t in tiles for p in tile_pos[t, :tile_npos[t]]}) for _, tiles in sets]
    order = sorted(range(len(sets)), key=lambda k: -len(unions[k]))
    num, umax, width = len(sets), max([1] + [len(u) for u in unions]), sub * block_n
    sup_pos = np.zeros((num, umax), dtype=np.int32)
    sup_npos = np.zeros(num, dtype=np.int32)
    sup_bits = np.zeros((num, umax), dtype=np.int32)
    sup_ch = np.full((num, width), -1, dtype=np.int32)
    sup_grp = np.zeros(num, dtype=np.int32)
    sup_rows = np.full((num, umax, width), -1, dtype=np.int32)
    for s, k in enumerate(order):
        g, tiles = sets[k]
        index = {p: u for u, p in enumerate(unions[k])}
        sup_pos[s, :len(unions[k])] = unions[k]
        sup_npos[s] = len(unions[k])
        sup_grp[s] = g
        for i, t in enumerate(tiles):
            cols = slice(i * block_n, (i + 1) * block_n)
            sup_ch[s, cols] = tile_ch[t]
            for u in range(tile_npos[t]):
                v = index[int(tile_pos[t, u])]
                sup_rows[s, v, cols] = w_rows[t, u]
                sup_bits[s, v] |= 1 << i

    def dev(a):
        return torch.from_numpy(np.ascontiguousarray(a)).to(device)

    return SubtilePlan(
        block_n=block_n, sub=sub, num_tiles=num, umax=umax, sup_pos=dev(sup_pos), sup_npos=dev(sup_npos),
        sup_bits=dev(sup_bits), sup_ch=dev(sup_ch), sup_grp=dev(sup_grp), sup_rows=dev(sup_rows.reshape(-1)),
        order_cols=dev(tile_order_cols(sup_ch, fwd.mask_shape[0])),
        kept=fwd.kept, computed=fwd.computed, x_reads=int(sup_npos.sum()), density=fwd.density,
        mask_shape=fwd.mask_shape, aligned=fwd.aligned,
    )


# The subtile kernel holds up to 8 accumulators, one per tile.
SUBTILES_MAX = 8
# Tiles of 8 filters, which only the subtile forward runs (8 per program, tensor-core dots 8 columns
# wide): at low density they compute far fewer stripes than 16-wide ones (random masks of 256 filters
# at density 0.2: kept / computed 0.64 against 0.49; at 0.1: 0.59 against 0.40).
NARROW_WIDTH = 8


def subtile_count(plan: ForwardPlan, groups: int) -> int:
    """Tiles of ``plan`` per program of the subtile forward: as many as make up to 128 columns (the
    accumulator of a 128-wide tile), at most 8, a power of two, at most the tiles of a filter group; 1
    where there is nothing to group (or the tiles are narrower than 8 filters)."""
    per_group = -(-(plan.mask_shape[0] // groups) // plan.block_n)
    if plan.block_n < NARROW_WIDTH or plan.kept == 0:
        return 1
    sub = min(SUBTILES_MAX, 128 // plan.block_n, per_group)
    return 1 << (sub.bit_length() - 1)


def narrow_plans(mask: Tensor, groups: int, device) -> list[ForwardPlan]:
    """The 8-wide tiles the subtile forward runs beside the widths of :func:`tile_widths`: where they
    compute at least 10 % fewer stripes than the best of those and a filter group holds at least two
    of them (none with ``STRIPECONV_TRITON_BLOCK_N`` set). As in :func:`forward_plans`, tiles of
    consecutive filters (whose runs of 8 channels store 16-byte vectors) stand in for the clustered
    ones where they compute at most 5 % more stripes and join ahead of them at most 25 % more."""
    def build():
        ng = mask.shape[0] // groups
        if getenv("STRIPECONV_TRITON_BLOCK_N") or default_block_n(ng) < 16 or ng < 2 * NARROW_WIDTH:
            return []
        offered = forward_plans(mask, groups, device)
        best = min(p.computed for p in offered)
        if offered[0].kept >= 0.9 * best:  # no tiles compute fewer stripes than are kept: nothing to win
            return []
        plan = forward_plan(mask, groups, NARROW_WIDTH, device)
        if plan.kept == 0 or plan.computed >= 0.9 * best:
            return []
        in_order = cached_plan("fwd_in_order", mask, groups, NARROW_WIDTH, device)
        if plan.aligned or not in_order.aligned or in_order.computed > 1.25 * plan.computed:
            return [plan]
        return [in_order] if in_order.computed <= 1.05 * plan.computed else [in_order, plan]
    key = ("fwd_narrow", *mask_key(mask), groups, str(device), getenv("STRIPECONV_TRITON_BLOCK_N"))
    return memo(key, mask, build)


def subtile_plan(plan: ForwardPlan, mask: Tensor, groups: int, device) -> SubtilePlan:
    """The (cached) :class:`SubtilePlan` grouping ``plan``'s tiles (:func:`subtile_count` per group)."""
    return cached_plan("fwd_sub", mask, groups, plan.block_n, device, (subtile_count(plan, groups), plan.in_order))


# Union entries of one tile whose grad weight one program of ``stripe_wgrad_tiles_kernel`` computes (``PER``).
WGRAD_PER = 3
# Columns of dy one program of the grad weight by position multiplies at most (``BY_POSITION``: the tiles keeping
# one position side by side), and the share of them that may be padding.
BY_POSITION_COLUMNS = 128
BY_POSITION_PADDING = 1.25


@dataclass
class TilesBackwardPlan:
    """The backward over the forward's filter tiles (``fwd``): dy gathered into tile order by ``cols``
    (``fwd.tile_ch`` flattened: [T * BLOCK_T] channel of each column, -1 = zero), or read in place where
    every tile is a run of consecutive channels (``fwd.runs``); then grad input over the (tile, union
    position) entries of each (output phase, group), and grad weight over all of them."""

    fwd: ForwardPlan
    cols: Tensor          # [T * BLOCK_T] int32
    gathered_col0: Tensor  # [T] int32 first column of each tile in the gathered dy: t * BLOCK_T
    col0: Tensor          # [T] int32 first channel of each tile (dy read in place; meaningful where fwd.runs)
    ent_off: Tensor       # [PHASES * G + 1] int32: entries of (phase, group) k are off[k]..off[k+1]
    ent_t: Tensor         # [E] int32 tile
    ent_u: Tensor         # [E] int32 index into the tile's union
    ent_dh: Tensor        # [E] int32 dy row/column read, relative to the phase pixel
    ent_dw: Tensor
    all_t: Tensor         # [A] int32 every (tile, union position) pair, for grad weight
    all_u: Tensor
    num_all: int
    runs_t: Tensor        # [R] int32 runs of up to WGRAD_PER consecutive entries of one tile's union: tile,
    runs_u: Tensor        # first union index
    runs_n: Tensor        # and length (grad weight loads dy once per run)
    num_runs: int
    # By position: each entry one kernel position of one group and up to bypos_width / BLOCK_T tiles whose
    # unions hold it, side by side (grad weight loads x's tile once for them, grad input multiplies them in one
    # product); bypos_width 0: not offered. Entries in order of (output phase, group, position): each position
    # lines up with one output phase of grad input.
    bypos_width: int
    bypos_p: Tensor       # [Q] int32 kernel position of each entry
    bypos_g: Tensor       # [Q] int32 its group
    bypos_off: Tensor     # [PHASES * G + 1] int32: entries of (phase, group) k are off[k]..off[k+1]
    bypos_dh: Tensor      # [Q] int32 dy row/column grad input reads, relative to the phase pixel
    bypos_dw: Tensor
    bypos_rows: Tensor    # [Q * bypos_width] int32 packed row of each column, -1 = dropped (padding included)
    bypos_cols: Tensor    # [Q * bypos_width] int32 its column of the gathered dy
    bypos_ch: Tensor      # [Q * bypos_width] int32 its channel (dy read in place; meaningful where fwd.runs)
    num_bypos: int


def _build_backward_tiles(fwd: ForwardPlan, groups: int, block_n: int, conv: tuple, device) -> TilesBackwardPlan:
    (sh, sw), (pt, pl), (dh, dw), _ = conv
    n, kh, kw = fwd.mask_shape
    tile_pos, tile_npos, tile_grp = fwd.tile_pos.numpy(), fwd.tile_npos.numpy(), fwd.tile_grp.numpy()
    pairs = [(t, u) for t in range(fwd.num_tiles) for u in range(int(tile_npos[t]))]
    entries, offsets = [], [0]
    for rh in range(sh):
        for rw in range(sw):
            for g in range(groups):
                for t, u in pairs:
                    if tile_grp[t] != g:
                        continue
                    i, j = divmod(int(tile_pos[t, u]), kw)
                    th, tw = rh + pt - i * dh, rw + pl - j * dw
                    if th % sh or tw % sw:  # this position's taps miss the phase's pixels
                        continue
                    entries.append((t, u, th // sh, tw // sw))
                offsets.append(len(entries))
    ent = np.array(entries, dtype=np.int64).reshape(-1, 4)
    al = np.array(pairs, dtype=np.int64).reshape(-1, 2)
    runs = np.array([(t, u, min(WGRAD_PER, int(tile_npos[t]) - u)) for t in range(fwd.num_tiles)
                     for u in range(0, int(tile_npos[t]), WGRAD_PER)], dtype=np.int64).reshape(-1, 3)
    bypos = _by_position(fwd, groups, block_n, conv)
    on_device = _forward_on(fwd, device)
    return TilesBackwardPlan(
        fwd=on_device, cols=on_device.tile_ch.reshape(-1),
        gathered_col0=_dev(np.arange(fwd.num_tiles) * block_n, device), col0=on_device.tile_ch[:, 0].contiguous(),
        ent_off=_dev(offsets, device), ent_t=_dev(ent[:, 0], device),
        ent_u=_dev(ent[:, 1], device), ent_dh=_dev(ent[:, 2], device), ent_dw=_dev(ent[:, 3], device),
        all_t=_dev(al[:, 0], device), all_u=_dev(al[:, 1], device), num_all=len(al),
        runs_t=_dev(runs[:, 0], device), runs_u=_dev(runs[:, 1], device), runs_n=_dev(runs[:, 2], device),
        num_runs=len(runs),
        bypos_width=bypos["width"], num_bypos=len(bypos["p"]),
        **{"bypos_" + name: _dev(bypos[name], device) for name in ("p", "g", "off", "dh", "dw", "rows", "cols", "ch")},
    )


def _by_position(fwd: ForwardPlan, groups: int, block_n: int, conv: tuple) -> dict:
    """The backward's entries by position (see :class:`TilesBackwardPlan`), width 0 and no entries where no
    width of two tiles or more fits :data:`BY_POSITION_COLUMNS` with at most :data:`BY_POSITION_PADDING`
    times the tiles' own columns."""
    (sh, sw), (pt, pl), (dh, dw), _ = conv
    kw = fwd.mask_shape[2]
    tile_pos, tile_npos, tile_grp = fwd.tile_pos.numpy(), fwd.tile_npos.numpy(), fwd.tile_grp.numpy()
    w_rows, tile_ch = fwd.w_rows.numpy().reshape(fwd.num_tiles, fwd.umax, block_n), fwd.tile_ch.numpy()
    # (group, position) -> [(tile, union index)], tiles in order
    holders: dict = {}
    for t in range(fwd.num_tiles):
        for u in range(int(tile_npos[t])):
            holders.setdefault((int(tile_grp[t]), int(tile_pos[t, u])), []).append((t, u))
    tiles_kept = sum(len(v) for v in holders.values())
    width = next((w for w in (BY_POSITION_COLUMNS, BY_POSITION_COLUMNS // 2, BY_POSITION_COLUMNS // 4)
                  if w >= 2 * block_n and sum(-(-len(v) // (w // block_n)) for v in holders.values()) * (w // block_n)
                  <= BY_POSITION_PADDING * tiles_kept), 0) if tiles_kept else 0
    tables: dict = {name: [] for name in ("p", "g", "dh", "dw", "rows", "cols", "ch")}
    tables.update(width=width, off=[0])
    if not width:
        tables["off"] = []
        return tables
    per = width // block_n
    lane = np.arange(block_n)
    for rh in range(sh):
        for rw in range(sw):
            for g in range(groups):
                for p in range(fwd.mask_shape[1] * kw):
                    i, j = divmod(p, kw)
                    th, tw = rh + pt - i * dh, rw + pl - j * dw
                    held = holders.get((g, p), [])
                    if th % sh or tw % sw:  # this position's taps miss the phase's pixels (it lines up with another)
                        continue
                    for s in range(0, len(held), per):
                        slots = held[s:s + per]
                        pad = per - len(slots)
                        tables["p"].append(p)
                        tables["g"].append(g)
                        tables["dh"].append(th // sh)
                        tables["dw"].append(tw // sw)
                        tables["rows"].extend([*(w_rows[t, u] for t, u in slots), *[np.full(block_n, -1)] * pad])
                        # padding reads the first tile's columns again (in bounds) and keeps no row
                        tables["cols"].extend([*(t * block_n + lane for t, _ in slots),
                                               *[slots[0][0] * block_n + lane] * pad])
                        first = [max(0, int(tile_ch[t, 0])) + lane for t, _ in slots]
                        tables["ch"].extend([*first, *[first[0]] * pad])
                tables["off"].append(len(tables["p"]))
    for name in ("rows", "cols", "ch"):
        tables[name] = np.concatenate(tables[name])
    return tables


@dataclass
class DensePlan:
    """Index maps between the packed rows and a dense weight (the dense conv's weight and gradient)."""

    scatter: Tensor       # [N * kh * kw] int64 packed row of each (filter, position), S = pruned
    gather: Tensor        # [S] int64 (filter, position) of each packed row
    rows: Tensor          # [N * kh * kw] int32 packed row of each (filter, position), -1 = pruned


def _build_dense(mask_cpu: Tensor, groups: int, block: int, conv: tuple, device) -> DensePlan:
    n, kh, kw = mask_cpu.shape
    rid = _row_ids(mask_cpu).T.reshape(-1)  # [N * P]: (filter, position) order
    s = int(mask_cpu.sum())
    return DensePlan(scatter=_dev(np.where(rid >= 0, rid, s), device, np.int64),
                     gather=_dev(np.argsort(np.where(rid >= 0, rid, s), kind="stable")[:s], device, np.int64),
                     rows=_dev(rid, device, np.int32))


def _forward_on(fwd: ForwardPlan, device) -> ForwardPlan:
    """``fwd`` with its index tensors on ``device``."""
    return ForwardPlan(**{**fwd.__dict__, **{name: getattr(fwd, name).to(device) for name in
                                             ("tile_pos", "tile_npos", "tile_ch", "tile_grp", "w_rows",
                                              "tile_rows", "order_cols")}})


_BUILDERS = {"fwd": lambda m, g, b, conv, d: _build_forward(m, g, b, d),
             "fwd_in_order": lambda m, g, b, conv, d: _build_forward(m, g, b, d, in_order=True),
             "dgrad": _build_grad_input, "wgrad": _build_grad_weight, "dense": _build_dense}
# Plans over the forward's tiles of one width (``conv`` ends with its in_order): built from its host copy.
_FROM_FORWARD = {"bwd_tiles": _build_backward_tiles, "fwd_sub": _build_subtiles}


def cached_plan(kind: str, mask: Tensor, groups: int, block: int, device, conv: tuple = ()):
    """The ``kind`` plan (``fwd``, ``dgrad``, ``wgrad``, ``dense``, ...) of ``mask``, built on its first request.
    A forward plan's clustering runs once per mask and width: on the host, whatever device asks, and the
    plans built over its tiles (subtiles, the tile backward) start from that host copy."""
    def build():
        if kind in _FROM_FORWARD:
            host = cached_plan("fwd_in_order" if conv[-1] else "fwd", mask, groups, block, "cpu")
            return _FROM_FORWARD[kind](host, groups, block, conv, device)
        if kind in ("fwd", "fwd_in_order") and str(device) != "cpu":
            return _forward_on(cached_plan(kind, mask, groups, block, "cpu"), device)
        mask_cpu = mask.detach().to("cpu", torch.bool).contiguous()  # the one host sync per mask
        return _BUILDERS[kind](mask_cpu, groups, block, conv, device)
    return memo((kind, *mask_key(mask), groups, block, str(device), conv), mask, build)


def clear_cache() -> None:
    """Drop all cached mask metadata (the cache is shared with the other backends).

    :func:`stripeconv.backends.triton_backend.clear_cache` also drops the backend's settled calls."""
    clear()


def forward_plan(mask: Tensor, groups: int = 1, block_n: Optional[int] = None,
                 device: Optional[Union[str, torch.device]] = None) -> ForwardPlan:
    """The (cached) forward tile plan of ``mask`` (index tensors on ``device``, default the mask's)."""
    ng = mask.shape[0] // groups
    return cached_plan("fwd", mask, groups, block_n or default_block_n(ng), device or mask.device)


def tile_efficiency(mask: Tensor, block_n: Optional[int] = None, groups: int = 1) -> float:
    """Kept stripes / stripes computed by the forward kernel for ``mask`` (1.0 = no waste)."""
    return forward_plan(mask, groups, block_n).efficiency


def tile_widths(mask: Tensor, groups: int = 1, device: Optional[Union[str, torch.device]] = None) -> list[int]:
    """Filter-tile widths worth timing for ``mask``, the default first (64 for wide layers).

    Half and quarter widths (not below 16, the smallest tensor-core tile) join when each computes
    at least 10 % fewer stripes than the widths before it: random masks, whose tiles' position
    unions shrink with the tile, and channel counts that a wide tile pads (45 filters in one
    64-wide tile compute 64 columns, in three 16-wide tiles 48). 128 joins for dense-ish masks
    when it computes at most 5 % more than 64: wider wgmma tiles reuse each input tile more.
    """
    ng = mask.shape[0] // groups
    device = device or mask.device
    default = default_block_n(ng)
    if getenv("STRIPECONV_TRITON_BLOCK_N") or default < 16:
        return [default]
    computed = lambda w: forward_plan(mask, groups, w, device).computed  # noqa: E731
    widths, best = [default], computed(default)
    for w in (default // 2, default // 4):
        if w >= 16 and computed(w) < 0.9 * best:
            widths.append(w)
            best = computed(w)
    if default == 64 and ng >= 128 and computed(128) <= 1.05 * computed(64):
        widths.append(128)
    return widths


def forward_plans(mask: Tensor, groups: int, device) -> list[ForwardPlan]:
    """The plans of :func:`tile_widths`, in its order (one cache lookup a call instead of one a width),
    then tiles of consecutive filters that are always timed beside them.

    An aligned plan stores 16-byte vectors into a channels_last output, where the others scatter
    2-byte values or go through a second pass, so tiles of consecutive filters (aligned for channel
    counts divisible by 8) stand in for a width's clustered tiles where they compute at most 5 % more
    stripes (masks whose filters :func:`filter_order` sorted) and join ahead of them where they compute
    at most 25 % more. Consecutive tiles at the first width, and at 128 for 128 filters a group or more,
    join last whatever they compute: their union of positions grows towards the whole kernel as the
    density falls, but on an H100 at batch 64-256 a plan that scatters or writes planes took about twice
    the time of an aligned plan computing every stripe (bench/results/h100_20261124), so at low
    densities the aligned tiles are the fastest stripe kernel."""
    def build():
        plans = []
        for w in tile_widths(mask, groups, device):
            plan = forward_plan(mask, groups, w, device)
            if not plan.aligned:
                in_order = cached_plan("fwd_in_order", mask, groups, w, device)
                if in_order.aligned and in_order.computed <= 1.05 * plan.computed:
                    plan = in_order
                elif in_order.aligned and in_order.computed <= 1.25 * plan.computed:
                    plans.append(in_order)  # (filter_order makes one width's tiles exact, the others close)
            plans.append(plan)
        wide = plans[0].block_n == 64 and mask.shape[0] // groups >= 128 and not getenv("STRIPECONV_TRITON_BLOCK_N")
        for w in [plans[0].block_n] + ([128] if wide else []):
            if not any(p.aligned and p.block_n == w for p in plans):
                in_order = cached_plan("fwd_in_order", mask, groups, w, device)
                if in_order.aligned and in_order.kept:
                    plans.append(in_order)
        return plans
    key = ("fwd_widths", *mask_key(mask), groups, str(device), getenv("STRIPECONV_TRITON_BLOCK_N"))
    return memo(key, mask, build)


def balanced_plans(mask: Tensor, groups: int, device, max_tiles: int) -> list[ForwardPlan]:
    """For a call whose forward programs all run at once (few output pixels): tiles of at most
    ``max_tiles`` whose longest union of positions is shorter than that of the clustered plans of
    :func:`forward_plans`, one plan per width where one is found. Such a kernel lasts as long as its
    longest program, and every clustering leaves a last tile of the filters that fit no other, whose
    union is about every position whatever the density (a 512-filter layer at density 0.1 in 16-wide
    tiles: 9 positions, where the mean is under 2). The shorter of two ways is taken (the longest
    union, then the stripes computed): the set-cover clustering with its sets capped at the fewest
    positions it can keep to ``max_tiles`` (:func:`._tile_clustering.capped`, tiles left partly
    empty), and the clustered plan's longest tiles split in two while that shortens the longest
    (:func:`._tile_clustering.balanced`). Both compute more stripes in all."""
    def build():
        plans = []
        pat = None
        for plan in forward_plans(mask, groups, device):
            if plan.in_order or plan.all_positions or plan.num_tiles >= max_tiles:
                continue
            if pat is None:
                mask_cpu = mask.detach().to("cpu", torch.bool).contiguous()  # once per mask and budget
                pat = mask_cpu.reshape(mask_cpu.shape[0], -1).numpy()
            host = cached_plan("fwd", mask, groups, plan.block_n, "cpu")
            filters = [[int(f) for f in row if f >= 0] for row in host.tile_ch.numpy()]
            ng = pat.shape[0] // groups
            options = [clustering.balanced(pat, filters, max_tiles),
                       clustering.capped(pat, groups, plan.block_n, max_tiles)]

            def longest(tiles):
                return max(int(pat[t].any(0).sum()) for t in tiles), clustering.computed_stripes(pat, tiles,
                                                                                                   plan.block_n)
            best = min((t for t in options if t), key=longest)
            if longest(best)[0] >= plan.umax:
                continue
            tiles = [(t[0] // ng, sorted(t)) for t in best]
            plans.append(_forward_from_tiles(mask_cpu, tiles, plan.block_n, device, balanced=True))
        return plans
    key = ("fwd_balanced", *mask_key(mask), groups, str(device), max_tiles, getenv("STRIPECONV_TRITON_BLOCK_N"))
    return memo(key, mask, build)


def filter_order(mask: Tensor, groups: int = 1) -> Tensor:
    """A permutation of ``mask``'s filters (int64 ``[N]``, new position -> old filter) under which the
    forward's clustered tiles are runs of consecutive filters, at each width :func:`tile_widths` offers.

    Filters are clustered into tiles as the forward clusters them at the width that computes the
    fewest stripes (which the backward's tiles then match exactly), each tile is ordered in turn for
    the narrower widths (and for :func:`narrow_plans`' 8-wide tiles where those are offered), and runs
    of tiles are grouped by the positions they keep for the wider ones; groups keep their filters.
    With the filters in this order (:func:`stripeconv.reorder_filters` permutes a model's layers so,
    without changing what it computes), tiles of consecutive filters do about the work of the clustered ones and, for
    channel counts divisible by 8, store 16-byte vectors into channels_last outputs. Host-only.
    """
    if mask.dim() != 3 or mask.shape[0] % groups:
        raise ValueError(f"filter_order expects a [out_channels, kh, kw] mask whose out_channels divide into "
                         f"groups={groups}, got shape {list(mask.shape)}")
    mask_cpu = mask.detach().to("cpu", torch.bool).contiguous()
    n = mask_cpu.shape[0]
    ng = n // groups
    pat = mask_cpu.reshape(n, -1).numpy()
    widths = tile_widths(mask_cpu, groups, "cpu") if n and mask_cpu.any() else []
    widths = sorted(widths, key=lambda w: forward_plan(mask_cpu, groups, w, "cpu").computed)
    if widths and narrow_plans(mask_cpu, groups, "cpu"):
        widths.append(NARROW_WIDTH)  # narrower than every offered width: each tile's filters in clustered runs of 8
    order = [g * ng + f for g in range(groups)
             for f in (clustering.grouped_order(pat[g * ng:(g + 1) * ng], widths) if widths else range(ng))]
    return torch.tensor(order, dtype=torch.long)


def best_tile_efficiency(mask: Tensor, groups: int = 1) -> float:
    """Kept / computed stripes of the forward kernel at the tile width that computes the fewest
    (1.0 = no waste). Host-only: needs neither triton nor a GPU."""
    if not bool(mask.any()):
        return 1.0
    computed = min(forward_plan(mask, groups, w).computed for w in tile_widths(mask, groups))
    return int(mask.sum()) / computed

