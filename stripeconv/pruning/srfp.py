"""SofteR Filter Pruning and its asymptotic variant (Cai et al., 2020, "Softer Pruning, Incremental Regularization").

Instead of zeroing the selected filters like SFP, SRFP multiplies them by a factor that
decreases monotonically over training (here ``alpha0 * (1 - (epoch + 1) / epochs)``, so 0 at the
last epoch); ASRFP also raises the pruning rate asymptotically as ASFP does.
"""
from __future__ import annotations

from ._soft import SoftFilterPrunerBase

__all__ = ["SRFP", "ASRFP"]


class SRFP(SoftFilterPrunerBase):
    """SofteR Filter Pruning: selected filters are decayed by a factor going from ``alpha0`` (0.5) to 0.

    Needs ``epochs=``. Other arguments as :class:`~stripeconv.pruning.SFP`.
    """

    mode = "decay"
    default_schedule = "constant"


class ASRFP(SRFP):
    """Asymptotic SRFP: SRFP with ASFP's asymptotically rising pruning rate. Needs ``epochs=``."""

    default_schedule = "asymptotic"
