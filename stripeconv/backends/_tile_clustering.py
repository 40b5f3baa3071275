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


def tiles_by_subsets(pat: np.ndarray, block_n: int, cap: "int | None" = None) -> list[list[int]]:
    """Set-cover greedy over sets of positions: each tile takes the set S that computes the fewest
    stripes per filter it holds (|S| / min(block_n, free filters keeping only positions of S)), then
    up to block_n of those filters, the ones keeping the most positions first, and fills up with the
    filters that widen S least. On random masks of many filters at low density it computes up to a
    third fewer stripes than growing tiles from a seed filter (which does better where few filters
    leave it little to choose from). With ``cap``, no tile's set holds more than ``cap`` positions
    (at least as many as any filter keeps): tiles are left partly empty instead."""
    nf, npos = pat.shape
    cap = npos if cap is None else cap
    codes = pat.astype(np.int64) @ (np.int64(1) << np.arange(npos, dtype=np.int64))
    sizes, with_bit = _subset_tables(npos)
    free = np.ones(nf, dtype=bool)
    tiles = []
    while free.any():
        within = np.bincount(codes[free], minlength=1 << npos)
        for b, upper in enumerate(with_bit):  # subset sums: within[S] = free filters whose positions all lie in S
            within[upper] += within[upper ^ (1 << b)]
        fill = np.minimum(within, block_n)
        cost = np.where((fill > 0) & (sizes <= cap), sizes / np.maximum(fill, 1), np.inf)
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
            rest, grow = rest[sizes[union] + grow <= cap], grow[sizes[union] + grow <= cap]
            if not len(rest):
                break
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


def halves(pat: np.ndarray) -> "tuple[list[int], list[int]] | None":
    """Two parts of one tile's filters (rows of ``pat``) whose larger union of positions is smallest,
    then whose unions are smallest together; None where no split makes the larger union smaller than
    the tile's. Kernels of up to 12 positions try every set S of the tile's positions (one part: the
    filters keeping only positions of S); larger ones split the filters sorted by pattern in half."""
    nf, npos = pat.shape
    codes = pat.astype(np.int64) @ (np.int64(1) << np.arange(npos, dtype=np.int64))
    union = int(np.bitwise_or.reduce(codes)) if nf else 0
    if nf < 2 or bin(union).count("1") < 2:
        return None
    if npos <= SUBSET_POSITIONS_MAX:
        sizes, _ = _subset_tables(npos)
        sets = np.arange(1 << npos, dtype=np.int64)
        sets = sets[(sets & ~union) == 0]
        inside = (codes[None, :] & ~sets[:, None]) == 0  # [sets, filters]
        count = inside.sum(1)
        first = np.bitwise_or.reduce(np.where(inside, codes, 0), axis=1)
        second = np.bitwise_or.reduce(np.where(inside, 0, codes), axis=1)
        larger = np.maximum(sizes[first], sizes[second])
        larger = np.where((count > 0) & (count < nf), larger, npos + 1)
        best = int(np.lexsort((sizes[first] + sizes[second], larger))[0])
        if larger[best] >= sizes[union]:
            return None
        return ([int(f) for f in np.nonzero(inside[best])[0]], [int(f) for f in np.nonzero(~inside[best])[0]])
    order = sorted(range(nf), key=lambda f: tuple(pat[f]), reverse=True)
    parts = (sorted(order[:nf // 2]), sorted(order[nf // 2:]))
    if max(int(pat[p].any(0).sum()) for p in parts) >= bin(union).count("1"):
        return None
    return parts


def balanced(pat: np.ndarray, tiles: list[list[int]], max_tiles: int) -> list[list[int]]:
    """``tiles`` with the longest ones split (:func:`halves`) while the longest union shrinks and the
    tiles number at most ``max_tiles``. Where all of a kernel's programs run at once (batch 1, small
    planes) it lasts as long as its longest tile, and clustering leaves one tile of the filters that
    fit no other with about every position, whatever the density."""
    tiles = [list(t) for t in tiles]
    size = [int(pat[t].any(0).sum()) for t in tiles]
    while tiles:
        longest = max(size)
        at_max = [k for k, s in enumerate(size) if s == longest]
        if longest < 2 or len(tiles) + len(at_max) > max_tiles:
            return tiles
        splits = [halves(pat[tiles[k]]) for k in at_max]
        if any(s is None for s in splits):  # that tile stays as long: the kernel would not get shorter
            return tiles
        for k, (first, second) in zip(at_max, splits):
            members = tiles[k]
            tiles[k] = [members[i] for i in first]
            tiles.append([members[i] for i in second])
            size[k] = int(pat[tiles[k]].any(0).sum())
            size.append(int(pat[tiles[-1]].any(0).sum()))
    return tiles


def capped(pat: np.ndarray, groups: int, block_n: int, max_tiles: int) -> "list[list[int]] | None":
    """Tiles of each group's filters (global filter indices) whose unions hold at most as many positions
    as the fewest that lets them number at most ``max_tiles`` (the set-cover greedy with a cap, tiles
    left partly empty), or None where no cap below the kernel's size does (or it has over 12 positions)."""
    nf, npos = pat.shape
    if npos > SUBSET_POSITIONS_MAX or nf == 0:
        return None
    ng = nf // groups
    for cap in range(max(1, int(pat.sum(1).max())), npos):
        tiles = []
        for g in range(groups):
            tiles.extend([g * ng + f for f in t] for t in tiles_by_subsets(pat[g * ng:(g + 1) * ng], block_n, cap))
            if len(tiles) > max_tiles:
                break
        if len(tiles) <= max_tiles:
            return tiles
    return None
