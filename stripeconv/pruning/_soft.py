"""Shared machinery of the soft/hard filter pruning family (SFP, HFP, GHFP, ASFP, SRFP, ASRFP).

Every epoch end (each ``interval`` epochs), the lowest-norm units of each layer (filters, or
stripes with ``granularity="stripe"``) are selected to the epoch's pruning rate and then:

- *soft*: zeroed, but they keep training in the next epoch and may come back (SFP, ASFP);
- *hard*: zeroed and frozen for good (HFP);
- *decayed*: multiplied by a factor that decreases to 0 over training (SRFP, ASRFP);
- *gradually hard*: a growing share of the selection is frozen (GHFP).

The pruning rate is the target (``ratio`` per layer as in the papers, ``ratios``, a global
``ratio`` with ``scope="global"``, or ``target_flops_reduction``), either from the first epoch
(``schedule="constant"``) or raised asymptotically (``schedule="asymptotic"``, ASFP:
``rate(e) = P * (1 - exp(-k e)) / (1 - exp(-k E))`` with ``k`` such that 3/4 of ``P`` is reached
after 1/4 of the ``E`` epochs). At the end (or whenever :meth:`masks` are exported) the last
selection is hard.

As in the methods' public code only conv weights are zeroed (``zero_bn=False`` by default): a
pruned filter's channel still carries its BN shift, a constant the next layers learn to use
while the filter may come back, and :func:`stripeconv.export` folds that constant exactly when it
removes the channel. ``zero_bn=True`` zeroes the BN of frozen filters instead (the network then
loses the constant at each freezing step).
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from . import _checks as check
from . import criteria as C
from .base import Pruner

__all__ = ["SoftFilterPrunerBase", "asymptotic_rate"]


def _asymptotic_k(level: float = 0.75, at: float = 0.25) -> float:
    """k (per unit of normalized time) with (1 - e^{-k at}) / (1 - e^{-k}) = level."""
    lo, hi = 1e-6, 200.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        val = (1 - math.exp(-mid * at)) / (1 - math.exp(-mid))
        lo, hi = (mid, hi) if val < level else (lo, mid)
    return 0.5 * (lo + hi)


def asymptotic_rate(epoch: int, epochs: int, level: float = 0.75, at: float = 0.25) -> float:
    """Fraction (0..1) of the final rate reached after ``epoch + 1`` of ``epochs`` epochs (ASFP)."""
    if epochs <= 1:
        return 1.0
    t = min(1.0, (epoch + 1) / epochs)
    k = _asymptotic_k(level, at)
    return (1 - math.exp(-k * t)) / (1 - math.exp(-k))


class SoftFilterPrunerBase(Pruner):
    mode = "soft"  # soft | hard | decay | gradual
    default_schedule = "constant"

    def __init__(self, model, input_size=None, *, ratio=None, ratios=None, target_flops_reduction=None,
                 granularity: str = "filter", scope: Optional[str] = None, epochs: Optional[int] = None,
                 schedule: Optional[str] = None, interval: int = 1, p: int = 2,
                 alpha0: float = 0.5, zero_bn: bool = False, **kw):
        super().__init__(model, input_size, ratio=ratio, ratios=ratios, target_flops_reduction=target_flops_reduction,
                         scope=scope, granularity=granularity, epochs=epochs, zero_bn=zero_bn, **kw)
        self.schedule = schedule or self.default_schedule
        if self.schedule not in ("constant", "asymptotic"):
            raise ValueError(f"schedule must be 'constant' or 'asymptotic', got {self.schedule!r}")
        if (self.schedule == "asymptotic" or self.mode in ("decay", "gradual")) and not epochs:
            raise ValueError(f"{type(self).__name__} needs epochs= (the length of its pruning schedule)")
        owner = type(self).__name__
        check.number(owner, "interval", interval, low=1, integer=True)
        check.number(owner, "p", p, low=0.0, low_open=True)
        check.number(owner, "alpha0", alpha0, low=0.0, high=1.0)
        self.interval, self.p, self.alpha0 = interval, p, alpha0

    # ----------------------------------------------------------------------- schedule
    def rate_scale(self, epoch: int) -> float:
        """Fraction of the final target applied after ``epoch``."""
        if self.schedule == "constant":
            return 1.0
        return asymptotic_rate(epoch, self.epochs)

    def decay_factor(self, epoch: int) -> float:
        """SRFP: factor applied to selected units after ``epoch`` (alpha0 -> 0 linearly at the last epoch)."""
        return max(0.0, self.alpha0 * (1.0 - (epoch + 1) / self.epochs))

    def hard_share(self, epoch: int) -> float:
        """GHFP: share of the selected units frozen after ``epoch`` (0 -> 1 linearly)."""
        return min(1.0, (epoch + 1) / self.epochs)

    def scores(self) -> dict:
        fn = C.filter_norms if self.granularity == "filter" else C.stripe_norms
        return {n: fn(self.weight(n), self.p) for n in self.convs}

    def _target_at(self, epoch: int) -> dict:
        s = self.rate_scale(epoch)
        if self.ratios is not None:
            return {"ratios": {k: v * s for k, v in self.ratios.items()}, "ratio": None, "target_flops_reduction": None}
        if self.ratio is not None:
            return {"ratio": self.ratio * s}
        return {"target_flops_reduction": self.target_flops_reduction * s}

    # ------------------------------------------------------------------------- hooks
    def end_epoch(self, epoch: int) -> None:
        super().end_epoch(epoch)
        if (epoch + 1) % self.interval and (self.epochs is None or epoch + 1 < self.epochs):
            return
        scores = self.scores()
        if self.mode in ("hard", "gradual"):
            # frozen units stay pruned and count first towards the target
            scores = {n: s.masked_fill(~self._units(self._frozen[n]), -1.0) for n, s in scores.items()}
        masks = self.select(scores, base_masks=self._frozen if self.mode in ("hard", "gradual") else None,
                            **self._target_at(epoch))
        self._masks = masks
        last = self.epochs is not None and epoch + 1 >= self.epochs
        if self.mode == "hard" or last:
            self._frozen = {n: m.clone() for n, m in masks.items()}
        elif self.mode == "gradual":
            share = self.hard_share(epoch)
            for n, m in masks.items():
                pruned = ~self._units(m) & self._units(self._frozen[n])  # newly selected, not yet frozen
                k = int(math.floor(share * int(pruned.sum()) + 1e-9))
                newly = C.lowest_k(scores[n], k, candidates=pruned)
                self._frozen[n] = self._frozen[n] & C.units_to_stripes(
                    newly, self.convs[n].out_channels, self.convs[n].kernel_size)
        if self.mode == "decay" and not last:
            self._scale(masks, self.decay_factor(epoch))
        else:
            self._scale(masks, 0.0)
        self._enforce(self._frozen)


    @torch.no_grad()
    def _scale(self, masks: dict, factor: float) -> None:
        for n, m in masks.items():
            w = self.convs[n].weight
            scale = torch.where(m, torch.ones((), device=m.device), torch.full((), factor, device=m.device))
            w.mul_(scale.to(w.device, w.dtype)[:, None])

    def prune(self, data=None) -> dict:
        """Select and hard-prune to the full target now (no training)."""
        masks = self.select(self.scores())
        self._masks = masks
        self._frozen = {n: m.clone() for n, m in masks.items()}
        self._enforce(self._frozen)
        return self.masks()
