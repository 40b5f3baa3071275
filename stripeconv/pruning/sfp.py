"""Soft Filter Pruning (He et al., IJCAI 2018): after every epoch the lowest-L2 filters of each layer are zeroed but keep training, so they can come back; the last selection is removed at the end."""
from __future__ import annotations

from ._soft import SoftFilterPrunerBase

__all__ = ["SFP"]


class SFP(SoftFilterPrunerBase):
    """Soft Filter Pruning (He et al., IJCAI 2018): after every epoch the lowest-L2 filters of each layer are zeroed but keep training, so they can come back; the last selection is removed at the end.

    Arguments: ``ratio`` (per-layer pruning rate, as in the paper) / ``ratios`` / ``ratio`` with
    ``scope="global"`` / ``target_flops_reduction``; ``granularity="filter"`` (paper) or
    ``"stripe"``; ``p=2`` (L2 norm criterion); ``interval=1`` (epochs between selections);
    ``schedule`` ("constant" or "asymptotic", default "constant"); plus the common arguments of :class:`~stripeconv.pruning.Pruner`.
    """

    mode = "soft"
    default_schedule = "constant"
