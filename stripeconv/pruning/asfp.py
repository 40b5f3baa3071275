"""Asymptotic Soft Filter Pruning (He et al., 2019): SFP whose pruning rate rises asymptotically towards the target (3/4 of it after 1/4 of the epochs). Needs epochs=."""
from __future__ import annotations

from ._soft import SoftFilterPrunerBase

__all__ = ["ASFP"]


class ASFP(SoftFilterPrunerBase):
    """Asymptotic Soft Filter Pruning (He et al., 2019): SFP whose pruning rate rises asymptotically towards the target (3/4 of it after 1/4 of the epochs). Needs epochs=.

    Arguments: ``ratio`` (per-layer pruning rate, as in the paper) / ``ratios`` / ``ratio`` with
    ``scope="global"`` / ``target_flops_reduction``; ``granularity="filter"`` (paper) or
    ``"stripe"``; ``p=2`` (L2 norm criterion); ``interval=1`` (epochs between selections);
    ``schedule`` ("constant" or "asymptotic", default "asymptotic"); plus the common arguments of :class:`~stripeconv.pruning.Pruner`.
    """

    mode = "soft"
    default_schedule = "asymptotic"
