"""Incremental regularization: IncReg (Wang, Zhang, Wang, Yu, Hu, "Structured Pruning for Efficient
ConvNets via Incremental Regularization", NeurIPS 2018 CDNNRIA workshop / IJCNN 2019, arXiv 1804.09461;
public code: github.com/MingSun-Tse/Caffe_IncReg).

Every unit ``g`` (a filter or a stripe) of a pruned conv carries its own L2 factor ``lambda_g``,
applied as a gradient term (``grad += lambda_g * w_g`` after ``backward()``, before
``optimizer.step()``). Every ``interval`` iterations, in each layer still pruning:

1. the units still alive are ranked by importance (L1 norm, lowest first) and each unit's rank is
   averaged over all updates so far (``r_bar = ((n - 1) r_bar + r) / n`` at the ``n``-th update), so
   a unit's standing reflects its whole history rather than one noisy snapshot;
2. the alive units are sorted by averaged rank ``j = 0 .. M-1`` and each factor grows by
   ``increment(j)`` (:func:`rank_increment`), a decreasing function of the rank that is largest
   (``delta``) for the least important unit, zero at the pruning boundary ``j = R`` (``R``: units
   the layer still has to prune) and negative above it; factors are clipped at 0, so units that
   climb back above the boundary lose their penalty again;
3. a unit whose factor reaches ``ceiling`` is pruned for good (hard mask, weights and, for dead
   filters, BN zeroed); once a layer has pruned its quota it stops: its kept units' factors go
   back to 0.

When every layer has pruned its quota the model is fine-tuned by the same loop (the hooks keep
the masks). The phase is :attr:`IncReg.phase` (``"reg"`` -> ``"finetune"``); :meth:`IncReg.prune`
ends the regularisation early.

The increment (the paper's centre-symmetric exponential, the public code's "scheme 1"), with
``A = delta`` and ``R`` the units still to prune::

    alpha = log(2 / u) / R,   N_c = -log(u) / alpha   (so 0 < N_c < R and increment(N_c) = u A)
    increment(j) = A exp(-alpha j)                        for j <= N_c
                 = 2 u A - A exp(-alpha (2 N_c - j))      for j >  N_c

It is point-symmetric about ``(N_c, u A)``: ``A`` at ``j = 0``, ``0`` at ``j = R`` and ``2 u A - A``
at ``j = 2 N_c``, falling further above.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor, nn

from . import _checks as check
from . import criteria as C
from ._search import Progress
from .greg import UnitRegularizer

__all__ = ["IncReg", "rank_increment", "schedule_length"]


def rank_increment(ranks: Tensor, remaining: int, delta: float, u: float = 0.25) -> Tensor:
    """The factor increment of units at (averaged-rank) positions ``ranks`` (0 = least important).

    ``remaining`` is the number of units the layer still has to prune (the boundary ``R``); the
    result is ``delta`` at rank 0, decreasing, ``0`` at rank ``R`` and negative above it (see the
    module docstring). ``ranks`` may be a float tensor; the result has its dtype (float64 if integer).
    """
    if remaining < 1:
        raise ValueError(f"rank_increment: remaining must be >= 1, got {remaining}")
    if not 0.0 < u < 1.0:
        raise ValueError(f"rank_increment: need 0 < u < 1, got {u}")
    r = ranks if ranks.is_floating_point() else ranks.to(torch.float64)
    alpha = math.log(2.0 / u) / remaining
    n_c = -math.log(u) / alpha
    low = delta * torch.exp(-alpha * r)
    high = 2.0 * u * delta - delta * torch.exp(-alpha * (2.0 * n_c - r))
    return torch.where(r <= n_c, low, high)


def schedule_length(n_units: int, quota: int, steps_to_ceiling: float, u: float = 0.25) -> int:
    """Updates a layer needs to prune ``quota`` of its ``n_units`` if the ranks never change.

    ``steps_to_ceiling`` is ``ceiling / delta`` (the updates the lowest unit needs alone). A dry run
    of the schedule (pruned units leave, the boundary moves down); used to size ``reg_steps`` runs and
    the progress bar. With fluctuating ranks the real schedule is somewhat longer.
    """
    if quota <= 0:
        return 0
    lam = torch.zeros(n_units, dtype=torch.float64)
    pruned, t = 0, 0
    limit = steps_to_ceiling * (1 - 1e-9)
    while pruned < quota:  # the rank-0 unit gains delta every update, so this ends within quota * ceil(k) updates
        t += 1
        remaining = quota - pruned
        lam = (lam + rank_increment(torch.arange(lam.numel(), dtype=torch.float64), remaining, 1.0, u)).clamp_(min=0)
        hit = torch.nonzero(lam >= limit).flatten()[:remaining]
        if hit.numel():
            keep = torch.ones_like(lam, dtype=torch.bool)
            keep[hit] = False
            lam = lam[keep]
            pruned += int(hit.numel())
    return t


class IncReg(UnitRegularizer):
    """IncReg (Wang et al., IJCNN 2019): per-unit L2 factors raised by averaged L1 rank until units reach ``ceiling``.

    Targets (one of): ``ratio`` (per layer, as the paper, or over all units with
    ``scope="global"``), ``ratios`` (name -> ratio; layers without one are not pruned; see
    :func:`~stripeconv.pruning.stage_ratios`) or ``target_flops_reduction``. The target fixes each
    layer's *quota* (number of units to prune) once, at construction, from an L1 selection (mean
    ``|w|`` per unit, like GReg, so global and FLOPs targets compare layers fairly); *which* units
    go is decided by the regularisation. ``granularity``: ``"filter"`` (the paper's row pruning)
    or ``"stripe"`` (one factor per stripe ``[out, kh, kw]``).

    Hyperparameters (defaults: the public code's solver files and constants):

    - ``delta`` (paper A, code ``AA`` = 2.5e-4, half the original weight decay): the largest
      increment per update (the least important unit's).
    - ``u`` (paper u, code ``kk`` = 0.25): shape of the increment; the increment is ``u * delta``
      at the symmetry point ``N_c`` (2/3 of the boundary for 0.25). Must be in (0, 1).
    - ``ceiling`` (code ``target_reg`` = 1e4 * AA = 2.5): a unit whose factor reaches it is pruned.
    - ``interval`` (code ``prune_interval`` = 1): iterations between two updates.
    - ``reg_steps``: fit the schedule into about this many iterations instead: ``interval`` is
      capped at ``reg_steps // 20`` and ``delta`` set so that, with fixed ranks
      (:func:`schedule_length`), every layer prunes its quota within 80 % of them (rank changes
      use the rest). For short runs, e.g. ``reg_steps = len(loader) * epochs // 2``.
    - ``skip_coupled`` (default: True for filters, False for stripes): leave out convs whose
      output channels are tied by residual additions (as :class:`~stripeconv.pruning.GReg1`).
    - ``epochs``: if given, the regularisation is cut short (with a warning) at the end of that
      epoch: every layer prunes the rest of its quota, units with the largest factor first (then
      the lowest averaged rank), so a fixed-length run always ends pruned.
    - ``verbose``: progress lines / tqdm bar during the regularisation.

    With the defaults the least important unit needs 10^4 updates to reach the ceiling, and a layer
    a few times that for its whole quota (with fixed ranks about 2.4x for a quota of 4, 4.8x for 32,
    6.5x for 128: :func:`schedule_length`); the paper regularises a pretrained model with a fixed
    small learning rate (5e-4 in the solver files, weight decay halved) and then fine-tunes.

    Deviations from the public code: the quota is ``floor(ratio * n)`` (the package's selection;
    the code uses ``ceil``), and at most the remaining quota is pruned in one update (the code
    prunes every unit over the ceiling, which can overshoot by a few); ranks are taken among the
    alive units only (the code sinks pruned ones to the bottom, an offset that is the same for
    every alive unit and changes no order); the rank average is over updates (the code's
    iteration count, the same with ``interval`` 1); the boundary is ``R`` for filters too (the
    code's row variant puts it at ``R + 1``, its column variant at ``R``); the stripe
    granularity is the package's (the paper's columns are an input channel at one kernel position
    across all filters); a finished layer's kept factors are zeroed at once (the code stops
    applying them and clears them when the stage ends); the learning rate is the caller's.
    Only the paper's centre-symmetric increment is offered (the code's alternative "scheme 2"
    is off by default there).
    """

    granularities = ("filter", "stripe")

    def __init__(self, model: nn.Module, input_size=None, *, ratio: Optional[float] = None,
                 ratios: Optional[dict] = None, target_flops_reduction: Optional[float] = None,
                 granularity: str = "filter", scope: Optional[str] = None, skip_coupled: Optional[bool] = None,
                 delta: float = 2.5e-4, u: float = 0.25, ceiling: float = 2.5, interval: int = 1,
                 reg_steps: Optional[int] = None, verbose: bool = False, **kw):
        super().__init__(model, input_size, ratio=ratio, ratios=ratios, target_flops_reduction=target_flops_reduction,
                         scope=scope, granularity=granularity, **kw)
        owner = type(self).__name__
        check.number(owner, "interval", interval, low=1, integer=True)
        check.number(owner, "delta", delta, low=0.0, low_open=True)
        check.number(owner, "ceiling", ceiling, low=0.0, low_open=True)
        check.number(owner, "u", u, low=0.0, high=1.0, low_open=True, high_open=True)
        check.number(owner, "reg_steps", reg_steps, low=1, integer=True, optional=True)
        self._regularised_layers(skip_coupled, ratios)
        self.u, self.ceiling, self.verbose = float(u), float(ceiling), verbose
        scores = self.scores()
        selected = self.select(scores)
        self.quota: dict[str, int] = {n: int((~self._units(selected[n])).sum()) for n in self.convs}
        self.lambdas: dict[str, Tensor] = {n: torch.zeros_like(s, dtype=torch.float64) for n, s in scores.items()}
        self.avg_rank: dict[str, Tensor] = {n: torch.zeros_like(s, dtype=torch.float64) for n, s in scores.items()}
        self.finished: dict[str, int] = {n: 0 for n, q in self.quota.items() if q == 0}  # layer -> step it stopped
        self.updates = 0
        self.phase = "reg" if len(self.finished) < len(self.convs) else "finetune"
        # updates each layer needs per unit of ceiling / delta, by a dry run with fixed ranks (k = 50)
        lengths = [schedule_length(scores[n].numel(), q, 50.0, self.u) / 50.0 for n, q in self.quota.items() if q]
        per_k = max(lengths, default=0.0)
        if reg_steps is not None:
            interval = max(1, min(int(interval), int(reg_steps) // 20))
            budget = max(2, int(reg_steps) // interval)
            delta = self.ceiling / max(1.0, 0.8 * budget / per_k) if per_k else float(delta)
        self.delta, self.interval = float(delta), int(interval)
        self.expected_updates = math.ceil(per_k * self.ceiling / self.delta)
        self._progress = None

    # ----------------------------------------------------------------------------- helpers
    def pruned_units(self) -> dict:
        """Number of units pruned so far, per layer."""
        return {n: int((~self._units(self._frozen[n])).sum()) for n in self.convs}

    @property
    def done(self) -> bool:
        """True once every layer has pruned its quota (fine-tuning phase)."""
        return self.phase == "finetune"

    def _bar(self):
        if self._progress is None and self.verbose:
            self._progress = Progress(self.expected_updates or None, f"{type(self).__name__} regularisation", True,
                                      initial=self.updates)
        return self._progress

    # ------------------------------------------------------------------------------- hooks
    def _regularises(self, name: str) -> bool:
        return name not in self.finished  # a finished layer's kept units carry no factor, its pruned ones are 0

    def after_step(self) -> None:
        self.steps += 1
        if self.phase == "reg" and self.steps % self.interval == 0:
            self._update()
        self._enforce(self._frozen)

    def _progress_text(self) -> str:
        return f"{sum(self.pruned_units().values())} of {sum(self.quota.values())} units pruned"

    @torch.no_grad()
    def prune(self, data=None) -> dict:
        """End the regularisation now: every layer prunes the rest of its quota (largest factors first)."""
        if self.phase == "finetune":
            return self.masks()
        scores = self.scores()
        for n in self.convs:
            if n in self.finished:
                continue
            alive = self._units(self._frozen[n]).reshape(-1)
            left = self.quota[n] - (alive.numel() - int(alive.sum()))
            idx = torch.nonzero(alive).flatten()
            # successive stable sorts, the last key first: largest factor, then lowest averaged rank,
            # then lowest L1 score (the only order before any update)
            for key in (scores[n], self.avg_rank[n], -self.lambdas[n]):
                idx = idx[torch.sort(key.reshape(-1)[idx].double(), stable=True).indices]
            self._prune_units(n, idx[:left])
            self._finish_layer(n)
        self._end_regularisation()
        return self.masks()

    # ------------------------------------------------------------------------------ schedule
    @torch.no_grad()
    def _update(self) -> None:
        self.updates += 1
        n_upd = self.updates
        scores = self.scores()
        for name in self.convs:
            if name in self.finished:
                continue
            lam, avg = self.lambdas[name].view(-1), self.avg_rank[name].view(-1)
            alive = self._units(self._frozen[name]).reshape(-1).to(lam.device)
            idx = torch.nonzero(alive).flatten()
            # rank of each alive unit by L1 now (0 = least important; ties by index), averaged over updates
            order = torch.sort(scores[name].reshape(-1)[idx].double(), stable=True).indices
            rank = torch.empty(idx.numel(), dtype=torch.float64, device=lam.device)
            rank[order] = torch.arange(idx.numel(), dtype=torch.float64, device=lam.device)
            avg[idx] = ((n_upd - 1) * avg[idx] + rank) / n_upd
            # position by averaged rank, then the increment of that position
            by_avg = idx[torch.sort(avg[idx], stable=True).indices]
            remaining = self.quota[name] - (alive.numel() - idx.numel())
            pos = torch.arange(by_avg.numel(), dtype=torch.float64, device=lam.device)
            lam[by_avg] = (lam[by_avg] + rank_increment(pos, remaining, self.delta, self.u)).clamp_(min=0.0)
            # units at the ceiling are pruned for good (lowest averaged rank first, at most the quota)
            hit = by_avg[lam[by_avg] >= self.ceiling * (1 - 1e-9)][:remaining]  # (float sums of increments)
            if hit.numel():
                self._prune_units(name, hit)
                if int(hit.numel()) == remaining:
                    self._finish_layer(name)
        bar = self._bar()
        if bar is not None:
            active = [v.max() for n, v in self.lambdas.items() if n not in self.finished]
            bar.update(1, lam=float(max(active)) if active else 0.0,
                       pruned=f"{sum(self.pruned_units().values())}/{sum(self.quota.values())}")
        if len(self.finished) == len(self.convs):
            self._end_regularisation()

    @torch.no_grad()
    def _prune_units(self, name: str, flat_idx: Tensor) -> None:
        if not flat_idx.numel():
            return
        units = self._units(self._frozen[name]).clone()
        units.view(-1)[flat_idx.to(units.device)] = False
        mask = C.units_to_stripes(~units, self.convs[name].out_channels, self.convs[name].kernel_size)
        self._frozen[name] = mask.to(self._frozen[name].device)
        self._masks[name] = self._frozen[name].clone()
        self._enforce(self._frozen)

    def _finish_layer(self, name: str) -> None:
        alive = self._units(self._frozen[name]).to(self.lambdas[name].device)
        self.lambdas[name][alive] = 0.0  # the layer stops: its kept units carry no extra penalty
        self.finished[name] = self.steps
        bar = self._progress
        if bar is not None:
            bar.log(f"{name}: {self.quota[name]} units pruned at step {self.steps}")

    def _end_regularisation(self) -> None:
        self.phase = "finetune"
        self._enforce(self._frozen)
        if self._progress is not None:
            self._progress.log(f"pruned at step {self.steps} (flops reduction {self.flops_reduction():.3f}); "
                               "fine-tuning")
            self._progress.close()

    # --------------------------------------------------------------------------- checkpoint
    def _extra_state(self) -> dict:
        return {
            "phase": self.phase,
            "lambdas": {n: v.detach().cpu().clone() for n, v in self.lambdas.items()},
            "avg_rank": {n: v.detach().cpu().clone() for n, v in self.avg_rank.items()},
            "quota": dict(self.quota),
            "finished": dict(self.finished),
            "updates": self.updates,
            "delta": self.delta,  # reg_steps derives it from the quotas, which global targets draw from the weights
            "interval": self.interval,
            "expected_updates": self.expected_updates,
        }

    def _load_extra_state(self, extra: dict) -> None:
        if not extra:
            return
        dev = {n: c.weight.device for n, c in self.convs.items()}
        self.phase = extra["phase"]
        self.lambdas = {n: extra["lambdas"][n].to(dev[n], torch.float64).clone() for n in self.convs}
        self.avg_rank = {n: extra["avg_rank"][n].to(dev[n], torch.float64).clone() for n in self.convs}
        self.quota = {n: int(extra["quota"][n]) for n in self.convs}
        self.finished = {n: int(s) for n, s in extra["finished"].items()}
        self.updates = int(extra["updates"])
        self.delta, self.interval = float(extra["delta"]), int(extra["interval"])
        self.expected_updates = int(extra["expected_updates"])
