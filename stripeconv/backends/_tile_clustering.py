"""Clustering of filters into the forward's tiles: each tile's filters should keep alike kernel
positions, so that the union of the positions a tile computes stays small (tile efficiency = kept
stripes / stripes computed). Filters are given as a bool ``[filters, positions]`` pattern; a
clustering is a list of tiles, each a list of filter indices. Host code only (numpy)."""
from __future__ import annotations

import functools

import numpy as np


def tiles_greedy(pat: np.ndarray, block_n: int) -> list[list[int]]:
    """Greedy clustering: seed with the heaviest free filter, add the filters that grow the
    union least (all zero-growth filters at once)."""
    nf, npos = pat.shape
    cnt = pat.sum(1)
    free = np.ones(nf, dtype=bool)
    tiles = []
    while free.any():
        idx = np.nonzero(free)[0]
        seed = idx[np.argmax(cnt[idx])]
        union = pat[seed].copy()
        members = [int(seed)]
        free[seed] = False
        while len(members) < block_n and free.any():
            idx = np.nonzero(free)[0]
            grow = (pat[idx] & ~union).sum(1)
            zero = idx[grow == 0]
            if len(zero):
                take = zero[np.argsort(-cnt[zero], kind="stable")][: block_n - len(members)]
            else:
                score = grow * (npos + 1) - cnt[idx]  # least growth, then most kept stripes
                take = idx[[int(np.argmin(score))]]
            members.extend(int(k) for k in take)
            free[take] = False
            union |= pat[take].any(0)
        tiles.append(members)
    return tiles


def tiles_sorted(pat: np.ndarray, block_n: int) -> list[list[int]]:
    """Sort filters by bit pattern (most frequently kept position = most significant bit)."""
    nf, npos = pat.shape
    order = np.argsort(-pat.sum(0), kind="stable")
    keys = [tuple(row) for row in pat[:, order].astype(np.int8)]
    ranked = sorted(range(nf), key=lambda k: keys[k], reverse=True)
    return [ranked[s:s + block_n] for s in range(0, nf, block_n)]


# The set-cover clustering enumerates every set of kernel positions: up to 2**12 of them.
SUBSET_POSITIONS_MAX = 12


@functools.lru_cache(maxsize=None)
def _subset_tables(npos: int) -> tuple[np.ndarray, list[np.ndarray]]:
    """The size of every set of ``npos`` positions (indexed by its bit code), and per position the
    codes of the sets holding it."""
    bits = (np.arange(1 << npos)[:, None] >> np.arange(npos)) & 1
    return bits.sum(1), [np.nonzero(bits[:, b])[0] for b in range(npos)]


def tiles_by_subsets(pat: np.ndarray, block_n: int) -> list[list[int]]:
    """Set-cover greedy over sets of positions: each tile takes the set S that computes the fewest
    stripes per filter it holds (|S| / min(block_n, free filters keeping only positions of S)), then
    up to block_n of those filters, the ones keeping the most positions first, and fills up with the
    filters that widen S least. On random masks of many filters at low density it computes up to a
    third fewer stripes than growing tiles from a seed filter (which does better where few filters
    leave it little to choose from)."""
    nf, npos = pat.shape
    codes = pat.astype(np.int64) @ (np.int64(1) << np.arange(npos, dtype=np.int64))
    sizes, with_bit = _subset_tables(npos)
    free = np.ones(nf, dtype=bool)
    tiles = []
    while free.any():
        within = np.bincount(codes[free], minlength=1 << npos)
        for b, upper in enumerate(with_bit):  # subset sums: within[S] = free filters whose positions all lie in S
            within[upper] += within[upper ^ (1 << b)]
        fill = np.minimum(within, block_n)
        cost = np.where(fill > 0, sizes / np.maximum(fill, 1), np.inf)
        best = np.lexsort((-fill, cost))[0]  # fewest stripes per filter, then the fullest tile
        members = np.nonzero(free & ((codes & ~best) == 0))[0]
        take = [int(f) for f in members[np.argsort(-sizes[codes[members]], kind="stable")][:block_n]]
        free[take] = False
        # Fill the tile up (full tiles but the last, as consecutive runs of filters make them) with the
        # filters that widen its set least.
        union = int(best)
        while len(take) < block_n and free.any():
            rest = np.nonzero(free)[0]
            grow = sizes[codes[rest] | union] - sizes[union]
            order = np.lexsort((-sizes[codes[rest]], grow))
            # Filters inside the set leave it as it is: all of them at once, in the order one at a time takes them.
            picked = rest[order[:max(1, np.count_nonzero(grow == 0))]][:block_n - len(take)]
            take.extend(int(f) for f in picked)
            free[picked] = False
            union |= int(np.bitwise_or.reduce(codes[picked]))
        tiles.append(take)
    return tiles


def tiles_in_order(nf: int, block_n: int) -> list[list[int]]:
    """Consecutive filters: tiles whose output channels are contiguous (see ``ForwardPlan.aligned``)."""
    return [list(range(s, min(nf, s + block_n))) for s in range(0, nf, block_n)]


def computed_stripes(pat: np.ndarray, tiles: list[list[int]], block_n: int) -> int:
    return sum(int(pat[t].any(0).sum()) * block_n for t in tiles)


def clustered(pat: np.ndarray, block_n: int, nested: bool = True) -> list[list[int]]:
    """The forward's tiles of ``pat``'s filters: the candidate that computes the fewest stripes of a
    sort by pattern, the greedy growth, the set-cover greedy (kernels of up to 12 positions) and
    (``nested``) tiles of wider clusterings split in turn."""
    nf = len(pat)
    cand = [tiles_sorted(pat, block_n)]
    if nf > block_n:
        cand.append(tiles_greedy(pat, block_n))
        if pat.shape[1] <= SUBSET_POSITIONS_MAX:
            cand.append(tiles_by_subsets(pat, block_n))
        # Sparse masks: splitting wider tiles often beats clustering at the narrow width directly
        # (random masks at density 0.1: up to ~15 % fewer stripes at width 16).
        wider = [w for w in (64, 32, 16, 8, 4) if block_n < w < nf] if nested else []
        if wider:
            order = nested_order(pat, np.arange(nf), wider + [block_n])
            cand.append([order[s:s + block_n] for s in range(0, nf, block_n)])
    return min(cand, key=lambda tiles: computed_stripes(pat, tiles, block_n))


def nested_order(pat: np.ndarray, filters: np.ndarray, widths: list[int]) -> list[int]:
    """``filters`` in tiles of ``widths[0]`` (a partial tile last), each tile ordered the same way at
    the next width: for every width, consecutive runs of the result are clustered tiles."""
    if not widths or len(filters) <= 1:
        return [int(f) for f in filters]
    if len(filters) > widths[0]:
        tiles = clustered(pat[filters], widths[0], nested=False)
    else:
        tiles = [list(range(len(filters)))]
    tiles.sort(key=lambda t: len(t) < widths[0])  # stable: full tiles keep their order, a partial one goes last
    return [f for t in tiles for f in nested_order(pat, filters[sorted(t)], widths[1:])]


def grouped_order(pat: np.ndarray, widths: list[int]) -> list[int]:
    """Filters ordered for ``widths`` (``widths[0]`` first): runs of ``widths[0]`` are that width's
    clustered tiles (a partial one last), each ordered in turn for the narrower widths; runs of each
    wider width are groups of the narrower runs, clustered by the positions they keep."""
    base = widths[0]
    tiles = clustered(pat, base) if len(pat) > base else [list(range(len(pat)))]
    tiles.sort(key=lambda t: len(t) < base)  # stable: full tiles keep their order, a partial one goes last
    narrower = sorted((w for w in widths if w < base), reverse=True)
    runs = [nested_order(pat, np.array(sorted(t), dtype=np.int64), narrower) for t in tiles]
    size = base
    for width in sorted(w for w in widths if w > base):
        full = [r for r in runs if len(r) == size]
        rest = [f for r in runs if len(r) < size for f in r]
        per = width // size
        if len(full) > per:
            groups = clustered(np.array([pat[r].any(0) for r in full]), per, nested=False)
            groups.sort(key=lambda g: len(g) < per)
        else:
            groups = [list(range(len(full)))]
        runs = [[f for i in g for f in full[i]] for g in groups] + ([rest] if rest else [])
        size = width
    return [f for r in runs for f in r]
