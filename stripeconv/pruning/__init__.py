"""Pruning methods that emit stripe masks, and the export to StripeConv2d models.

Every method is a :class:`Pruner` with the same hooks, driven by :func:`fit` or by your loop::

    import torch.nn.functional as F
    from stripeconv import pruning
    pruner = pruning.SWP(model, input_size=(1, 3, 32, 32), target_flops_reduction=0.5, epochs=E)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)  # after the pruner
    for epoch in range(E):
        for x, y in loader:
            loss = F.cross_entropy(model(x), y) + pruner.penalty()
            optimizer.zero_grad(); loss.backward()
            pruner.after_backward()
            optimizer.step()
            pruner.after_step()
        pruner.end_epoch(epoch)
    small = pruner.export()   # StripeConv2d layers, dead filters and their channels removed
    print(pruner.report())    # FLOPs / params reduction (via stripeconv.profile)

    # or: pruning.fit(model, pruner, loader, epochs=E, eval_loader=test_loader)
    # one-shot: pruner = pruning.L1Filter(model, input_size=..., ratio=0.3); pruner.prune(); fit(...)

Methods: :class:`SWP` (stripe-wise pruning), :class:`L1Filter` / :class:`L1Stripe` (L1-norm
pruning), :class:`SFP`, :class:`HFP`, :class:`GHFP`, :class:`ASFP`, :class:`SRFP`, :class:`ASRFP`
(soft / hard / gradually hard / asymptotic / softer filter pruning; ``granularity="stripe"`` too),
:class:`GReg1` / :class:`GReg2` (growing regularization), :class:`IncReg` (incremental
regularization: per-unit L2 factors raised by averaged rank), :class:`OrthoReg` (orthonormality
regularization, Fisher importance, pruning in rounds), :class:`PFP` (provable filter pruning:
data sensitivities, one error bound for the network), :class:`LBS` (balanced filter pruning
at a preset loss variation), :class:`DAIS` (differentiable annealing indicator search),
:class:`DSA` (differentiable sparsity allocation: per-layer keep ratios learned by gradient
descent under a FLOPs budget),
:class:`MetaPruning` (a PruningNet that generates the weights of any channel configuration, and
an evolutionary search over configurations) and :class:`ACP` (channel counts from clustering similar
feature maps, refined by a particle swarm search over briefly trained candidates), :class:`CPMC`
(channels ranked globally by the weights that go with them, their own filters and the next
layers' columns that read them, and by the FLOPs and parameters they cost) and
:class:`FunctionalityPruning` (filters with repeated functionality clustered, one representative
of each cluster kept).
Shared primitives are in :mod:`stripeconv.pruning.criteria`; :func:`shrink` gives the physically
smaller network that a masked model computes, to train, and puts its values back (ACP trains its
candidates that way). Export and FLOPs targets need
``torch-pruning`` (the dependency graph).
"""
from . import criteria
from .acp import ACP
from .asfp import ASFP
from .cpmc import CPMC
from .base import Pruner, evaluate, fit
from .dais import DAIS
from .dsa import DSA
from .functionality import FunctionalityPruning
from .ghfp import GHFP
from .greg import GReg1, GReg2, stage_ratios
from .hfp import HFP
from .increg import IncReg
from .l1 import L1Filter, L1Norm, L1Stripe
from .lbs import LBS, BalancedFilterPruning, holdout_split
from .metapruning import MetaPruning
from .orthoreg import OrthoReg
from .pfp import PFP
from .sfp import SFP
from ._shrink import Shrunk, shrink
from .srfp import ASRFP, SRFP
from .swp import SWP, FilterSkeleton

__all__ = ["Pruner", "fit", "evaluate", "criteria", "SWP", "FilterSkeleton", "L1Norm", "L1Filter", "L1Stripe",
           "SFP", "HFP", "GHFP", "ASFP", "SRFP", "ASRFP", "GReg1", "GReg2", "stage_ratios", "IncReg", "OrthoReg", "PFP", "LBS",
           "BalancedFilterPruning", "holdout_split", "DAIS", "DSA", "MetaPruning", "ACP", "CPMC",
           "FunctionalityPruning", "METHODS",
           "shrink", "Shrunk"]

METHODS = {"SWP": SWP, "L1Filter": L1Filter, "L1Stripe": L1Stripe, "SFP": SFP, "HFP": HFP, "GHFP": GHFP,
           "ASFP": ASFP, "SRFP": SRFP, "ASRFP": ASRFP, "GReg1": GReg1, "GReg2": GReg2, "IncReg": IncReg,
           "OrthoReg": OrthoReg, "PFP": PFP, "LBS": LBS, "DAIS": DAIS, "DSA": DSA, "MetaPruning": MetaPruning,
           "ACP": ACP, "CPMC": CPMC, "FunctionalityPruning": FunctionalityPruning}
