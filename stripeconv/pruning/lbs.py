"""Balanced filter pruning with a preset loss variation (Li et al. 2020, arXiv 2010.06821,
"Towards Optimal Filter Pruning with Balanced Performance and Pruning Speed"), here ``LBS``
(layer-wise balanced search), also exported as ``BalancedFilterPruning``.

One shot, then one fine-tune:

1. **Filter ranks.** Over the batches of ``data`` (training data), each filter gets the first-order
   Taylor score ``|sum(grad * w)|`` (the loss change of removing it); within each *unit* the
   filters are ranked per batch and the ranks are summed over batches.
2. **Units.** A unit is a conv, or a *layer group*: convs whose output channels are tied by
   residual additions (found with the dependency graph, :class:`~stripeconv.pruning.graph.ChannelGraph`)
   are pruned together with shared channel indices. A group's rank is the weighted sum of its
   members' ranks, deeper members weighted more (weight ``i + 1`` for the ``i``-th member in
   model order). Projection shortcuts join the group of the stage they feed, so the channel
   selection is aligned across stage transitions by construction.
3. **Per-unit rate at a loss variation delta.** For a unit alone (every other unit unpruned), the
   largest number ``k`` of lowest-ranked channels whose removal changes the loss on ``val_data``
   by at most ``delta`` (``L(pruned) - L(dense) <= delta``) is found by binary search over ``k``
   (capped at ``max_layer_rate`` of the unit's channels).
4. **Search over delta.** ``delta`` is found by bisection so that the per-unit rates together
   reach the requested global ``ratio`` (fraction of the prunable filters) or
   ``target_flops_reduction`` (the smallest such delta: the target is met; the overshoot of the
   last delta step is trimmed, see ``trim``). Where pruning lowers the loss (an untrained model)
   that delta is negative.
5. The selected filters are pruned (masks held, BN of dead filters zeroed) and the model is
   fine-tuned once (:func:`~stripeconv.pruning.fit` with this pruner, which keeps the masks).

``val_data`` **must be a held-out part of the training data**, never the test set (the loss
variation steers the architecture; measuring it on test data leaks the test set): see
:func:`holdout_split`. Losses are measured in eval mode (BN running statistics), Taylor scores
too (so scoring does not change BN statistics).

Checkpoints: :meth:`LBS.search` can stop after ``max_work`` units of work (score batches + loss
evaluations); :meth:`state_dict` holds the ranks, every loss evaluated so far, the reference loss
and the delta bracket, so a fresh pruner that loads it and calls :meth:`prune` finishes with
exactly the same result (the search is deterministic given the cached losses). ``val_data`` must
yield the same batches on every pass (it is read once and kept in memory) and ``data`` the same
batches in the same order: no shuffling, or a DataLoader with a seeded ``generator``, whose state at
the start of scoring is checkpointed and restored.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Callable, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset, Subset

from .._modes import set_eval
from . import _checks as check
from . import criteria as C
from ._search import ChannelUnit, Progress, channel_units, gate_outputs, note, replay
from .base import Pruner

__all__ = ["LBS", "BalancedFilterPruning", "holdout_split"]


def holdout_split(dataset: Dataset, val_size: Union[int, float], seed: int = 0) -> tuple[Subset, Subset]:
    """Split a *training* dataset into ``(train, held_out)`` subsets (``val_size``: count or fraction).

    Use the held-out part as ``val_data`` of :class:`LBS` / :class:`~stripeconv.pruning.DAIS`.
    """
    n = len(dataset)
    k = int(round(val_size * n)) if isinstance(val_size, float) and val_size < 1 else int(val_size)
    if not 0 < k < n:
        raise ValueError(f"holdout_split: val_size must leave both parts non-empty, got {val_size} of {n}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return Subset(dataset, sorted(perm[k:])), Subset(dataset, sorted(perm[:k]))


class _Interrupted(Exception):
    pass


@dataclass
class Unit(ChannelUnit):
    """A channel unit with the rank weight of each member (``weights[i]`` for ``members[i]``)."""

    weights: list = field(default_factory=list)


class LBS(Pruner):
    """Layer-wise balanced filter pruning at a preset loss variation (Li et al. 2020, arXiv 2010.06821).

    Arguments:

    - ``val_data``: batches ``(x, y)`` of a **held-out split of the training data** (never the test
      set) on which loss variations are measured; ``val_batches`` caps how many are used (all by
      default; they are kept in memory).
    - target: ``ratio`` (global filter pruning rate over the prunable convs; the paper's
      "pre-defined pruning rate for the entire network") or ``target_flops_reduction``.
    - ``delta``: a fixed loss variation instead of a target (the paper's basic mode; negative:
      the loss must fall, as the search may find for an untrained model).
    - ``score_batches``: how many batches of ``data`` the Taylor ranks are accumulated over
      (default 10; all with ``None``).
    - ``max_layer_rate`` (0.9): the most a unit may lose (at least one channel always stays).
    - ``depth_weighted`` (True): in a layer group, member ``i`` (model order) has rank weight ``i + 1``.
    - ``delta_iters`` (30): bisection steps of the outer search over delta.
    - ``trim`` (True): when the last step of delta makes unit rates jump past the target (a
      unit whose loss change stays flat up to a large rate jumps from 0 to its maximum), jumps
      the target does not need are undone, and of those it needs, the one that lands closest
      above the target gets the smallest rate that reaches it, still with loss change <= delta
      (a deviation from the paper, which takes the rates at delta as they are).
    - ``loss_fn`` (cross entropy), ``verbose`` (progress of scoring and search), and the common
      arguments of :class:`~stripeconv.pruning.Pruner` (``layers``, ``skip_first``, ``exclude`` ...).
      Only filters are pruned (``granularity="filter"``).

    After :meth:`prune`: ``delta`` (the loss variation used), ``unit_rates`` (unit -> pruned
    fraction), ``loss_changes`` (unit -> measured loss change at its rate), ``units``.
    """

    granularities = ("filter",)

    def __init__(self, model: nn.Module, input_size=None, *, val_data, ratio: Optional[float] = None,
                 target_flops_reduction: Optional[float] = None, delta: Optional[float] = None,
                 score_batches: Optional[int] = 10, val_batches: Optional[int] = None, max_layer_rate: float = 0.9,
                 depth_weighted: bool = True, delta_iters: int = 30, trim: bool = True, loss_fn: Optional[Callable] = None,
                 verbose: bool = False, **kw):
        if kw.get("ratios") is not None:
            raise ValueError("LBS finds the per-layer rates itself: give ratio= (global) or target_flops_reduction=")
        if kw.get("granularity", "filter") != "filter":
            raise ValueError("LBS prunes filters only (granularity='filter')")
        if delta is not None and (ratio is not None or target_flops_reduction is not None):
            raise ValueError("LBS: give either delta= or a target (ratio= / target_flops_reduction=), not both")
        super().__init__(model, input_size, ratio=ratio, target_flops_reduction=target_flops_reduction,
                         require_target=delta is None, **kw)
        if val_data is None:
            raise ValueError("LBS needs val_data: a held-out split of the training data (never the test set)")
        check.number("LBS", "delta", delta, optional=True)
        check.number("LBS", "score_batches", score_batches, low=1, integer=True, optional=True)
        check.number("LBS", "val_batches", val_batches, low=1, integer=True, optional=True)
        check.number("LBS", "max_layer_rate", max_layer_rate, low=0.0, high=1.0, low_open=True, high_open=True)
        check.number("LBS", "delta_iters", delta_iters, low=1, integer=True)
        self.val_data = val_data
        self.fixed_delta = delta
        self.score_batches, self.val_batches = score_batches, val_batches
        self.max_layer_rate, self.depth_weighted, self.delta_iters = max_layer_rate, depth_weighted, delta_iters
        self.trim = trim
        self.loss_fn = loss_fn or F.cross_entropy
        self.verbose = verbose
        self.units = self._build_units()
        if not self.units:
            raise ValueError("LBS: no prunable unit (every channel group has a producer that is not prunable)")
        # search state (checkpointed)
        self.phase = "score"
        self.batches_scored = 0
        self.rank_sums = {u.name: torch.zeros(u.size, dtype=torch.float64) for u in self.units}
        self.base_loss: Optional[float] = None
        self.cache: dict = {}  # (unit name, k) -> loss change
        self.delta_lo: Optional[float] = None
        self.delta_hi: Optional[float] = None
        self.delta: Optional[float] = None
        self.unit_k: dict = {}
        self._score_gen_state = None
        self._val = None
        self._work = 0
        self._budget = None

    # --------------------------------------------------------------------------------- units
    def _build_units(self) -> list:
        units = []
        for cu in channel_units(self):
            w = [(i + 1.0) if self.depth_weighted else 1.0 for i in range(len(cu.members))]
            units.append(Unit(cu.name, cu.size, cu.group, cu.members, w))
        return units

    def _unit(self, name: str) -> Unit:
        return next(u for u in self.units if u.name == name)

    def k_max(self, unit: Unit) -> int:
        return max(0, min(unit.size - 1, int(math.floor(self.max_layer_rate * unit.size + 1e-9))))

    def ranks(self, unit: Unit) -> Tensor:
        """``[size]`` accumulated rank (low = least important) of the unit's channels."""
        return self.rank_sums[unit.name]

    def _order(self, unit: Unit) -> Tensor:
        # ties broken by index (stable) so the order is deterministic
        return torch.sort(self.rank_sums[unit.name], stable=True).indices

    def _pruned_roots(self, unit: Unit, k: int) -> Tensor:
        return self._order(unit)[:k]

    def _factors(self, unit: Unit, k: int) -> dict:
        return unit.factors(self.convs, self._pruned_roots(unit, k))

    def masks_for(self, unit_k: dict) -> dict:
        """Stripe masks pruning the ``k`` lowest-ranked channels of each unit."""
        masks = C.full_masks(self.convs)
        for u in self.units:
            k = unit_k.get(u.name, 0)
            if not k:
                continue
            u.remove(masks, self.convs, self._pruned_roots(u, k))
        return masks

    # ------------------------------------------------------------------------------- scoring
    def _spend(self):
        if self._budget is not None and self._work >= self._budget:
            raise _Interrupted
        self._work += 1

    def _score(self, data) -> None:
        if data is None:
            raise ValueError("LBS.prune needs data: training batches (x, y) for the Taylor ranks")
        device = next(self.model.parameters()).device
        total = self.score_batches
        bar = Progress(total, "LBS taylor ranks", self.verbose, initial=self.batches_scored)
        # a shuffled DataLoader replays the same order on resume
        self._score_gen_state, batches = replay(data, self._score_gen_state if self.batches_scored else None,
                                                self.batches_scored)
        restore = set_eval(self.model)
        try:
            for i, (x, y) in batches:
                if total is not None and i >= total:
                    break
                self._spend()
                x, y = x.to(device), y.to(device)
                loss = self.loss_fn(self.model(x), y)
                grads = torch.autograd.grad(loss, [self.convs[n].weight for n in self.convs])
                g = dict(zip(self.convs, grads))
                for u in self.units:
                    acc = torch.zeros(u.size, dtype=torch.float64)
                    for (name, idx, ridx), wgt in zip(u.members, u.weights):
                        w = self.convs[name].weight.detach()
                        s = (g[name] * w).sum((1, 2, 3)).abs().double().cpu()
                        root = torch.zeros(u.size, dtype=torch.float64)
                        root[ridx] = s[idx]
                        rank = torch.empty(u.size, dtype=torch.float64)
                        rank[torch.sort(root, stable=True).indices] = torch.arange(u.size, dtype=torch.float64)
                        acc += wgt * rank
                    self.rank_sums[u.name] += acc
                self.batches_scored += 1
                bar.update(1)
        finally:
            restore()
            bar.close()
        self.phase = "search"

    # ------------------------------------------------------------------------------- losses
    def _val_list(self) -> list:
        if self._val is None:
            device = next(self.model.parameters()).device
            out = []
            for i, (x, y) in enumerate(self.val_data):
                if self.val_batches is not None and i >= self.val_batches:
                    break
                out.append((x.to(device), y.to(device)))
            if not out:
                raise ValueError("LBS: val_data yielded no batch")
            self._val = out
        return self._val

    @torch.no_grad()
    def val_loss(self, factors: Optional[dict] = None) -> float:
        """Mean loss on ``val_data`` (eval mode), with output channels gated by ``factors``."""
        restore = set_eval(self.model)
        total, n = 0.0, 0
        try:
            with gate_outputs(self, factors or {}):
                for x, y in self._val_list():
                    total += float(self.loss_fn(self.model(x), y)) * len(y)
                    n += len(y)
        finally:
            restore()
        return total / n

    def loss_change(self, unit: Unit, k: int) -> float:
        """Loss change of pruning the ``k`` lowest-ranked channels of ``unit`` alone (cached)."""
        if k == 0:
            return 0.0
        key = (unit.name, int(k))
        if key not in self.cache:
            self._spend()
            if self.base_loss is None:
                self.base_loss = self.val_loss()
            self.cache[key] = self.val_loss(self._factors(unit, k)) - self.base_loss
        return self.cache[key]

    def rate_at(self, unit: Unit, delta: float) -> int:
        """Largest ``k`` (binary search, k <= k_max) whose loss change is <= ``delta``."""
        hi = self.k_max(unit)
        if hi == 0 or self.loss_change(unit, hi) <= delta:
            return hi
        lo = 0  # k = 0 changes nothing: the answer when even one channel changes the loss by more than delta
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if self.loss_change(unit, mid) <= delta:
                lo = mid
            else:
                hi = mid
        return lo

    def ks_at(self, delta: float) -> dict:
        return {u.name: self.rate_at(u, delta) for u in self.units}

    def _metric(self, ks: dict) -> float:
        if self.target_flops_reduction is not None:
            return self.flops_reduction(self.masks_for(ks))
        pruned = sum(ks[u.name] * len(u.members) for u in self.units)
        total = sum(c.out_channels for c in self.convs.values())
        return pruned / total

    def _trim(self, ks_lo: dict, ks_hi: dict, delta: float, goal: float) -> dict:
        """Undo the overshoot of the last delta step. Units whose rate jumped between the bracket's
        ends fall back to their rate at the lower end where the goal does not need their jump; of
        the jumps it needs, the one whose trimmed rate lands closest above the goal gets the smallest
        rate that still reaches it with a loss change <= delta; repeated while that helps."""
        ks = dict(ks_hi)
        jumped = [u for u in self.units if ks_hi[u.name] > ks_lo[u.name] + 1]
        for u in jumped:  # jumps the goal does not need
            ks[u.name] = ks_lo[u.name]
            if self._metric(ks) < goal - 1e-12:
                ks[u.name] = ks_hi[u.name]
        while True:
            best, best_metric = None, self._metric(ks)
            for u in jumped:
                k = self._smallest_reaching(ks, u, ks_lo[u.name], ks[u.name], delta, goal)
                if k < ks[u.name]:
                    metric = self._metric({**ks, u.name: k})
                    if metric < best_metric - 1e-12:
                        best, best_metric = (u.name, k), metric
            if best is None:
                return ks
            ks[best[0]] = best[1]

    def _smallest_reaching(self, ks: dict, unit: Unit, lo: int, hi: int, delta: float, goal: float) -> int:
        """Smallest ``k`` in ``(lo, hi]`` for ``unit`` (the others as in ``ks``) whose metric reaches
        the goal and whose loss change is <= ``delta`` (``hi`` if none is smaller)."""
        trial = dict(ks)
        while hi - lo > 1:  # the metric grows with k
            mid = (lo + hi) // 2
            trial[unit.name] = mid
            if self._metric(trial) >= goal - 1e-12:
                hi = mid
            else:
                lo = mid
        k = hi
        while k < ks[unit.name] and self.loss_change(unit, k) > delta:  # keep the bound (non-monotone losses)
            k += 1
        return k

    def _goal(self) -> float:
        return self.target_flops_reduction if self.target_flops_reduction is not None else self.ratio

    def _search_delta(self) -> None:
        if self.base_loss is None:
            self._spend()
            self.base_loss = self.val_loss()
        if self.fixed_delta is not None:
            self.delta = float(self.fixed_delta)
            self.unit_k = self.ks_at(self.delta)
            return
        goal = self._goal()
        bar = Progress(None, "LBS delta search", self.verbose, every=1)
        try:
            lo = 0.0
            if self._metric(self.ks_at(lo)) >= goal - 1e-12:
                # Pruning up to these rates does not raise the loss (an untrained model, say): the
                # smallest delta meeting the goal is negative, a loss that must fall.
                hi, lo = lo, -1e-3 * max(self.base_loss, 1e-3)
                none = {u.name: 0 for u in self.units}
                while self._metric(ks := self.ks_at(lo)) >= goal - 1e-12 and ks != none:
                    hi, lo = lo, lo * 2.0
                    self.delta_lo, self.delta_hi = lo, hi
                    bar.update(1, bracket=lo)
            else:
                hi = 1e-3 * max(self.base_loss, 1e-3)
                full = {u.name: self.k_max(u) for u in self.units}
                while self._metric(self.ks_at(hi)) < goal - 1e-12:
                    if self.ks_at(hi) == full:
                        warnings.warn(f"LBS: the target {goal} cannot be reached with max_layer_rate="
                                      f"{self.max_layer_rate}; pruning every unit to its maximum", stacklevel=3)
                        break
                    lo, hi = hi, hi * 2.0
                    self.delta_lo, self.delta_hi = lo, hi
                    bar.update(1, bracket=hi)
            for _ in range(self.delta_iters):
                self.delta_lo, self.delta_hi = lo, hi
                if hi - lo <= 1e-6 * max(abs(hi), abs(lo), 1e-12):
                    break
                mid = 0.5 * (lo + hi)
                m = self._metric(self.ks_at(mid))
                if m >= goal - 1e-12:
                    hi = mid
                else:
                    lo = mid
                bar.update(1, delta=hi, metric=m, evals=len(self.cache))
            self.delta_lo, self.delta_hi = lo, hi
            self.delta = hi
            self.unit_k = self._trim(self.ks_at(lo), self.ks_at(hi), hi, goal) if self.trim else self.ks_at(hi)
        finally:
            bar.close()

    # --------------------------------------------------------------------------------- api
    def search(self, data=None, max_work: Optional[int] = None) -> bool:
        """Run (or continue) scoring and the search; stop after ``max_work`` new units of work
        (score batches + loss evaluations). Returns True when the search is complete."""
        if self.phase in ("searched", "done"):
            return True
        self._work, self._budget = 0, max_work
        try:
            if self.phase == "score":
                self._score(data)
            self._search_delta()
        except _Interrupted:
            return False
        finally:
            self._budget = None
        self.phase = "searched"
        return True

    def prune(self, data=None) -> dict:
        """Rank filters on ``data`` (training batches), search the rates, prune; returns the masks."""
        if self.phase != "done":
            self.search(data)
            masks = self.masks_for(self.unit_k)
            self._masks = masks
            self._frozen = {n: m.clone() for n, m in masks.items()}
            self.phase = "done"
            self._enforce(self._frozen)
            if self.verbose:
                note("LBS", f"delta={self.delta:.4g}, flops reduction {self.flops_reduction():.3f}, "
                            f"{len(self.cache)} loss evaluations")
        return self.masks()

    @property
    def unit_rates(self) -> dict:
        return {u.name: self.unit_k.get(u.name, 0) / u.size for u in self.units}

    @property
    def loss_changes(self) -> dict:
        return {u.name: self.loss_change(u, self.unit_k.get(u.name, 0)) for u in self.units}

    def report(self, exported=None) -> dict:
        rep = super().report(exported)
        rep.update({"delta": self.delta, "unit_rates": self.unit_rates, "loss_evaluations": len(self.cache)})
        return rep

    # --------------------------------------------------------------------------- checkpoint
    def _extra_state(self) -> dict:
        return {
            "phase": self.phase, "batches_scored": self.batches_scored,
            "rank_sums": {k: v.clone() for k, v in self.rank_sums.items()},
            "base_loss": self.base_loss, "cache": dict(self.cache),
            "delta_lo": self.delta_lo, "delta_hi": self.delta_hi, "delta": self.delta, "unit_k": dict(self.unit_k),
            "score_generator": self._score_gen_state,
        }

    def _load_extra_state(self, extra: dict) -> None:
        if not extra:
            return
        self.phase, self.batches_scored = extra["phase"], int(extra["batches_scored"])
        self.rank_sums = {k: v.clone().double() for k, v in extra["rank_sums"].items()}
        self.base_loss, self.cache = extra["base_loss"], dict(extra["cache"])
        self.delta_lo, self.delta_hi, self.delta = extra["delta_lo"], extra["delta_hi"], extra["delta"]
        self.unit_k = dict(extra["unit_k"])
        self._score_gen_state = extra.get("score_generator")


BalancedFilterPruning = LBS
