"""L1-norm filter pruning (Li et al., ICLR 2017, "Pruning Filters for Efficient ConvNets"),
and the same L1 criterion at stripe granularity.

One shot: :meth:`L1Norm.prune` removes the filters (or stripes) with the smallest sum of
absolute weights in each layer (``ratio``/``ratios``, as in the paper) or over all layers
(``scope="global"``), or to a FLOPs target; the model is then retrained with the pruner's hooks
(which keep the pruned weights at zero). Following the paper on ResNets, filter pruning skips
convs whose output channels are tied to other convs by a residual addition
(``skip_coupled=True``: only the first conv of each block is pruned); stripe pruning keeps them.
"""
from __future__ import annotations

from typing import Optional

from . import _checks as check
from . import criteria as C
from .base import Pruner

__all__ = ["L1Norm", "L1Filter", "L1Stripe"]


class L1Norm(Pruner):
    """One-shot L1-norm pruning; ``granularity="filter"`` (Li et al.) or ``"stripe"``."""

    def __init__(self, model, input_size=None, *, ratio=None, ratios=None, target_flops_reduction=None,
                 granularity: str = "filter", scope: Optional[str] = None, skip_coupled: Optional[bool] = None,
                 p: int = 1, **kw):
        super().__init__(model, input_size, ratio=ratio, ratios=ratios, target_flops_reduction=target_flops_reduction,
                         scope=scope, granularity=granularity, **kw)
        check.number(type(self).__name__, "p", p, low=0.0, low_open=True)
        self.p = p
        if skip_coupled is None:
            skip_coupled = granularity == "filter"
        self.leave_out_layers(skip_coupled, ratios, drop_unratioed=False)

    def scores(self) -> dict:
        fn = C.filter_norms if self.granularity == "filter" else C.stripe_norms
        return {n: fn(self.weight(n), self.p) for n in self.convs}

    def prune(self, data=None) -> dict:
        """Prune now (``data`` is not used: the criterion is data-free); returns the masks."""
        self.hold(self.select(self.scores()))
        return self.masks()


class L1Filter(L1Norm):
    """Li et al. 2017: prune the lowest-L1 filters of each layer."""

    def __init__(self, model, input_size=None, **kw):
        kw.setdefault("granularity", "filter")
        super().__init__(model, input_size, **kw)


class L1Stripe(L1Norm):
    """The L1 criterion on stripes: prune the lowest-L1 stripes (per layer, or globally)."""

    def __init__(self, model, input_size=None, **kw):
        kw.setdefault("granularity", "stripe")
        super().__init__(model, input_size, **kw)
