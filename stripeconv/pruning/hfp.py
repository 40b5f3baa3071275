"""Hard filter pruning (the baseline of the SFP/GHFP papers): the lowest-L2 filters are zeroed and frozen for good (selection among the remaining ones each epoch)."""
from __future__ import annotations

from ._soft import SoftFilterPrunerBase

__all__ = ["HFP"]


class HFP(SoftFilterPrunerBase):
    """Hard filter pruning (the baseline of the SFP/GHFP papers): the lowest-L2 filters are zeroed and frozen for good (selection among the remaining ones each epoch).

    Arguments: ``ratio`` (per-layer pruning rate, as in the paper) / ``ratios`` / ``ratio`` with
    ``scope="global"`` / ``target_flops_reduction``; ``granularity="filter"`` (paper) or
    ``"stripe"``; ``p=2`` (L2 norm criterion); ``interval=1`` (epochs between selections);
    ``schedule`` ("constant" or "asymptotic", default "constant"); plus the common arguments of :class:`~stripeconv.pruning.Pruner`.
    """

    mode = "hard"
    default_schedule = "constant"
