"""Gradually Hard Filter Pruning (Cai et al., 2020): soft filter pruning whose selected filters are frozen in a growing share (0 to 1 linearly over epochs), moving from SFP to HFP. Needs epochs=."""
from __future__ import annotations

from ._soft import SoftFilterPrunerBase

__all__ = ["GHFP"]


class GHFP(SoftFilterPrunerBase):
    """Gradually Hard Filter Pruning (Cai et al., 2020): soft filter pruning whose selected filters are frozen in a growing share (0 to 1 linearly over epochs), moving from SFP to HFP. Needs epochs=.

    Arguments: ``ratio`` (per-layer pruning rate, as in the paper) / ``ratios`` / ``ratio`` with
    ``scope="global"`` / ``target_flops_reduction``; ``granularity="filter"`` (paper) or
    ``"stripe"``; ``p=2`` (L2 norm criterion); ``interval=1`` (epochs between selections);
    ``schedule`` ("constant" or "asymptotic", default "constant"); plus the common arguments of :class:`~stripeconv.pruning.Pruner`.
    """

    mode = "gradual"
    default_schedule = "constant"
