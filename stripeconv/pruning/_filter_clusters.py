"""The statistics and clustering behind :class:`~stripeconv.pruning.FunctionalityPruning`: Pearson
correlations of filter responses accumulated in one pass, agglomerative clustering of a distance
matrix (plain torch, no sklearn) and one representative kept per cluster."""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

__all__ = ["Moments", "correlation", "agglomerate", "merge_rows", "cluster_labels", "representatives"]

_CONSTANT = 1e-9  # variance below this fraction of the second moment: a constant response


class Moments:
    """Running sums for the correlations between the rows of ``[C, N]`` observations, in float64
    and shifted by the first batch's row means (numerically safer than raw sums)."""

    def __init__(self, channels: int):
        self.n = 0
        self.shift: Optional[Tensor] = None
        self.s1 = torch.zeros(channels, dtype=torch.float64)
        self.s2 = torch.zeros(channels, channels, dtype=torch.float64)

    def update(self, x: Tensor) -> None:
        """Add observations: ``x`` is ``[C, N]`` (N observations of C variables)."""
        x = x.detach().double()
        if self.shift is None:
            self.shift = x.mean(1).cpu() if x.shape[1] else torch.zeros(x.shape[0], dtype=torch.float64)
        x = x - self.shift.to(x.device)[:, None]
        self.n += x.shape[1]
        self.s1 += x.sum(1).cpu()
        self.s2 += (x @ x.T).cpu()

    def state(self) -> dict:
        return {"n": self.n, "shift": self.shift, "s1": self.s1.clone(), "s2": self.s2.clone()}

    @classmethod
    def from_state(cls, state: dict) -> "Moments":
        m = cls(len(state["s1"]))
        m.n, m.shift = int(state["n"]), state["shift"]
        m.s1, m.s2 = state["s1"].double().clone(), state["s2"].double().clone()
        return m

    def correlation(self) -> tuple:
        """``(corr [C, C], std [C])``; see :func:`correlation`."""
        if self.n == 0:
            c = len(self.s1)
            return torch.eye(c, dtype=torch.float64), torch.zeros(c, dtype=torch.float64)
        mean = self.s1 / self.n
        cov = self.s2 / self.n - mean[:, None] * mean[None, :]
        shift = self.shift if self.shift is not None else torch.zeros_like(mean)
        second = torch.diagonal(self.s2) / self.n + 2.0 * shift * mean + shift ** 2  # of the unshifted values
        return _normalise(cov, second)


def _normalise(cov: Tensor, second: Tensor) -> tuple:
    var = torch.diagonal(cov).clamp(min=0.0)
    constant = var <= _CONSTANT * second.clamp(min=0.0)
    std = torch.where(constant, torch.zeros_like(var), var.sqrt())
    safe = torch.where(constant, torch.ones_like(std), std)
    corr = (cov / (safe[:, None] * safe[None, :])).clamp(-1.0, 1.0)
    both = constant[:, None] & constant[None, :]
    either = constant[:, None] | constant[None, :]
    corr = torch.where(either, both.to(corr.dtype), corr)
    corr.fill_diagonal_(1.0)
    return corr, std


def correlation(x: Tensor) -> tuple:
    """``(corr [C, C], std [C])``: Pearson correlations between the rows of ``x`` (``[C, N]``) and
    each row's standard deviation. A constant row correlates 1 with other constant rows and 0 with
    the rest (and has std 0)."""
    m = Moments(x.shape[0])
    m.update(x)
    return m.correlation()


def agglomerate(distance: Tensor, linkage: str = "average") -> list:
    """Agglomerative clustering of ``n`` items from a symmetric ``[n, n]`` distance matrix.

    Returns the ``n - 1`` merges in order, each ``(height, a, b)``: the groups whose smallest
    members are ``a < b`` are joined at distance ``height``. Group distances follow the
    Lance-Williams update of ``linkage``: ``"single"`` (closest pair), ``"complete"`` (farthest
    pair) or ``"average"`` (mean over all pairs). The closest pair of groups is merged first; ties
    go to the pair with the smallest ``(a, b)``. Heights never decrease along the merges.
    """
    if linkage not in ("single", "complete", "average"):
        raise ValueError(f"agglomerate: linkage must be 'single', 'complete' or 'average', got {linkage!r}")
    d = distance.detach().double().cpu().clone()
    n = d.shape[0]
    if d.shape != (n, n):
        raise ValueError(f"agglomerate: distance must be a square matrix, got {list(distance.shape)}")
    d = 0.5 * (d + d.T)
    d.fill_diagonal_(math.inf)
    sizes = torch.ones(n, dtype=torch.float64)
    # Each row's nearest neighbour (the first column at its minimum), kept exact after every merge,
    # so a merge costs O(n) instead of a search of the whole matrix; the first row at the smallest
    # row minimum gives the same pair, ties included, as the first minimum of the whole matrix.
    nn_dist, nn_idx = d.min(1) if n > 1 else (d.new_empty(0), torch.empty(0, dtype=torch.long))
    merges = []
    last = -math.inf
    for _ in range(n - 1):
        a = int(torch.argmin(nn_dist))
        b = int(nn_idx[a])  # > a: row b holds the same minimum at column a
        height = max(float(d[a, b]), last)  # guard the order against rounding
        last = height
        merges.append((height, a, b))
        merge_rows(d, sizes, a, b, linkage)
        nn_dist[b] = math.inf
        # rows whose neighbour was a or b (or row a itself) are searched again; any other row keeps
        # its neighbour unless the new column a beats it
        stale = (nn_idx == a) | (nn_idx == b)
        stale[a], stale[b] = True, False
        rows = stale.nonzero().flatten()
        nn_dist[rows], nn_idx[rows] = d[rows].min(1)
        col = d[:, a]
        better = (col < nn_dist) | ((col == nn_dist) & (nn_idx > a))
        better[b] = False
        nn_dist[better], nn_idx[better] = col[better], a
    return merges


def merge_rows(d: Tensor, sizes: Tensor, a: int, b: int, linkage: str) -> None:
    """Join group ``b`` into group ``a`` in place: row and column ``a`` of the distance matrix ``d``
    get the Lance-Williams distances of ``linkage`` to the union, ``b``'s become infinite, and
    ``sizes`` (members per group) is updated."""
    if linkage == "single":
        row = torch.minimum(d[a], d[b])
    elif linkage == "complete":
        row = torch.maximum(d[a], d[b])
    else:
        row = (sizes[a] * d[a] + sizes[b] * d[b]) / (sizes[a] + sizes[b])
    sizes[a] += sizes[b]
    d[a], d[:, a] = row, row
    d[b], d[:, b] = math.inf, math.inf
    d[a, a] = math.inf


def cluster_labels(n: int, merges: list, m: int) -> Tensor:
    """``[n]`` cluster labels (each cluster labelled by its smallest member) after the first ``m``
    of ``merges`` (as :func:`agglomerate` returns them)."""
    label = torch.arange(n)
    for _, a, b in merges[:m]:
        label[label == b] = a
    return label


def representatives(labels: Tensor, similarity: Tensor, strength: Tensor, keep: str = "medoid") -> Tensor:
    """``[n]`` bool: the one member kept in each cluster of ``labels``.

    ``keep="medoid"``: the member with the highest mean similarity to the other members (ties: the
    higher ``strength``, then the lower index); ``"strongest"``: the highest ``strength`` (ties: the
    medoid score, then the lower index).
    """
    kept = torch.zeros(len(labels), dtype=torch.bool)
    sim = similarity.double()
    for lab in torch.unique(labels).tolist():
        members = (labels == lab).nonzero().flatten()
        if len(members) == 1:
            kept[members] = True
            continue
        block = sim[members][:, members]
        centre = (block.sum(1) - torch.diagonal(block)) / (len(members) - 1)
        power = strength.double()[members]
        first, second = (centre, power) if keep == "medoid" else (power, centre)
        best = max(range(len(members)), key=lambda i: (float(first[i]), float(second[i]), -int(members[i])))
        kept[members[best]] = True
    return kept
