"""Stripe-wise pruning (Meng et al., NeurIPS 2020, "Pruning Filter in Filter").

Each pruned conv gets a Filter Skeleton ``FS`` (``[out, kh, kw]``, initialised to 1), attached as
a parametrization so the forward pass uses ``W * FS[:, None]`` and ``FS`` is an ordinary model
parameter (``conv.parametrizations.weight[0].fs``, trained by the same optimizer). After each
backward pass the L1 penalty on FS is applied as the gradient term ``FS.grad += alpha * sign(FS)``;
stripes whose ``|FS|`` falls below ``threshold`` are pruned for good (FS and W zeroed and frozen);
BN entries of filters left with no stripe are zeroed. At export FS is folded into W.

Defaults follow the paper's CIFAR setting: ``alpha=1e-5``, ``threshold=0.05``, the first conv and
1x1 convs (ResNet projection shortcuts) not pruned. ``group_size=G`` keeps the same kernel
positions across groups of G consecutive filters (a position of a group is scored by the RMS of
its G skeleton values), which makes GPU tiles fully efficient.

With a target (``target_flops_reduction``, ``ratio`` (global, of all stripes), or ``ratios``)
and ``epochs``, the target is reached *during* training: after epoch ``e`` the lowest-``|FS|``
stripes (globally) are pruned until ``target * min(1, (e + 1) / (ramp * epochs))`` is met
(``ramp=0.5``: full target at half of training, before the LR drops), on top of the threshold
pruning. The threshold alone is the paper's method.
"""
from __future__ import annotations

import math
from types import SimpleNamespace
from typing import Optional

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from . import _checks as check
from . import criteria as C
from .base import Pruner

__all__ = ["SWP", "FilterSkeleton"]


class FilterSkeleton(nn.Module):
    """Parametrization ``W -> W * fs[:, None]`` with a learnable ``fs`` ``[out, kh, kw]``."""

    def __init__(self, out_channels: int, kernel_size, device=None, dtype=None):
        super().__init__()
        self.fs = nn.Parameter(torch.ones(out_channels, *kernel_size, device=device, dtype=dtype))

    def forward(self, weight: Tensor) -> Tensor:
        return weight * self.fs.unsqueeze(1)


class SWP(Pruner):
    """Stripe-wise pruning with a Filter Skeleton (see the module docstring for the method).

    - ``alpha`` (1e-5): weight of the L1 term on the skeleton, added to its gradient.
    - ``threshold`` (0.05): stripes with ``|FS|`` below it are pruned for good.
    - ``group_size`` (1): filters per group that share their kept positions (32: full GPU tiles).
    - target (optional, needs ``epochs``): ``target_flops_reduction``, ``ratio`` or ``ratios``,
      reached during training by pruning the lowest ``|FS|``, in full after ``ramp`` of the epochs.
    - ``skip_first`` / ``skip_1x1`` (True): leave the first conv and 1x1 convs dense.
    """

    granularities = ("stripe",)
    default_scope = "global"

    def __init__(self, model: nn.Module, input_size=None, *, alpha: float = 1e-5, threshold: float = 0.05,
                 group_size: int = 1, target_flops_reduction: Optional[float] = None, ratio: Optional[float] = None,
                 ratios: Optional[dict] = None, epochs: Optional[int] = None, ramp: float = 0.5,
                 skip_first: bool = True, skip_1x1: bool = True, scope: Optional[str] = None, **kw):
        super().__init__(model, input_size, ratio=ratio, ratios=ratios, target_flops_reduction=target_flops_reduction,
                         scope=scope, granularity="stripe", epochs=epochs, skip_first=skip_first, skip_1x1=skip_1x1,
                         require_target=False, **kw)
        self.has_target = any(v is not None for v in (ratio, ratios, target_flops_reduction))
        if self.has_target and not epochs:
            raise ValueError("SWP with a target needs epochs= (the target is reached progressively during training)")
        check.number("SWP", "alpha", alpha, low=0.0)
        check.number("SWP", "threshold", threshold, low=0.0)
        check.number("SWP", "group_size", group_size, low=1, integer=True)
        check.number("SWP", "ramp", ramp, low=0.0, high=1.0, low_open=True)
        self.alpha, self.threshold, self.group_size, self.ramp = alpha, threshold, group_size, ramp
        _ = self.graph  # trace the plain model before it is parametrized
        self.skeletons: dict[str, nn.Parameter] = {}
        for name, conv in self.convs.items():
            w = conv.weight
            parametrize.register_parametrization(conv, "weight", FilterSkeleton(conv.out_channels, conv.kernel_size,
                                                                                 w.device, w.dtype))
            self.skeletons[name] = conv.parametrizations.weight[0].fs

    # ------------------------------------------------------------------------- groups
    def _gid(self, n: int, device) -> Tensor:
        return torch.arange(n, device=device) // self.group_size

    def group_scores(self, name: str) -> Tensor:
        """``[ceil(out / G), kh, kw]``: RMS of |FS| over each group of G filters (|FS| when G = 1)."""
        fs = self.skeletons[name].detach()
        if self.group_size == 1:
            return fs.abs()
        n = fs.shape[0]
        ng = math.ceil(n / self.group_size)
        sq = torch.zeros(ng, *fs.shape[1:], device=fs.device, dtype=fs.dtype).index_add_(0, self._gid(n, fs.device), fs * fs)
        cnt = torch.bincount(self._gid(n, fs.device), minlength=ng).to(fs.dtype)
        return (sq / cnt[:, None, None]).sqrt()

    def _expand(self, name: str, gmask: Tensor) -> Tensor:
        if self.group_size == 1:
            return gmask
        n = self.convs[name].out_channels
        return gmask[self._gid(n, gmask.device)]

    def _to_groups(self, name: str, mask: Tensor) -> Tensor:
        if self.group_size == 1:
            return mask
        return mask[:: self.group_size]

    def _select(self, **target) -> dict:
        gscores = {n: self.group_scores(n) for n in self.convs}
        fake = {n: SimpleNamespace(out_channels=s.shape[0], kernel_size=tuple(s.shape[1:])) for n, s in gscores.items()}
        base = {n: self._to_groups(n, self._masks[n]) for n in self.convs}
        kw = dict(ratio=None, ratios=None, target_flops_reduction=None)
        kw.update(target)
        needs = kw["target_flops_reduction"] is not None
        expand_all = lambda gm: {n: self._expand(n, m) for n, m in gm.items()}  # noqa: E731
        gm = C.select_to_target(gscores, fake, (lambda m: self.flops(expand_all(m))) if needs else None,
                                self.dense_flops if needs else 0, scope=self.scope, base_masks=base, **kw)
        return expand_all(gm)

    def ramp_scale(self, epoch: int) -> float:
        return min(1.0, (epoch + 1) / max(1.0, self.ramp * self.epochs))

    # -------------------------------------------------------------------------- hooks
    @torch.no_grad()
    def after_backward(self) -> None:
        for name, fs in self.skeletons.items():
            if fs.grad is not None:
                fs.grad.add_(torch.sign(fs), alpha=self.alpha)
                fs.grad.mul_(self._masks[name].to(fs.grad.dtype))
            w = self.convs[name].parametrizations.weight.original
            if w.grad is not None:
                w.grad.mul_(self._masks[name].to(w.grad.dtype)[:, None])
        if self.zero_bn:
            self.zero_dead_bn(self._masks, grads=True)

    @torch.no_grad()
    def after_step(self) -> None:
        self.steps += 1
        for name in self.convs:
            keep = self._expand(name, self.group_scores(name) >= self.threshold)
            self._masks[name] &= keep
        self._frozen = self._masks
        self._enforce(self._masks)

    def end_epoch(self, epoch: int) -> None:
        super().end_epoch(epoch)
        if not self.has_target:
            return
        s = self.ramp_scale(epoch)
        if self.target_flops_reduction is not None:
            goal = self.target_flops_reduction * s
            if self.flops_reduction() + 1e-9 < goal:
                self._masks = self._select(target_flops_reduction=goal)
        elif self.ratios is not None:
            self._masks = self._select(ratios={k: v * s for k, v in self.ratios.items()})
        else:
            self._masks = self._select(ratio=self.ratio * s)
        self._frozen = self._masks
        self._enforce(self._masks)

    @torch.no_grad()
    def _zero_weights(self, name: str, mask: Tensor) -> None:
        conv = self.convs[name]
        m = mask.to(self.skeletons[name].device)
        self.skeletons[name].mul_(m.to(self.skeletons[name].dtype))
        w = conv.parametrizations.weight.original
        w.mul_(m.to(w.dtype)[:, None])

    def prune(self, data=None) -> dict:
        """Apply the threshold now (and the full target if one is set); returns the masks."""
        for name in self.convs:
            self._masks[name] &= self._expand(name, self.group_scores(name) >= self.threshold)
        if self.has_target:
            kw = {"target_flops_reduction": self.target_flops_reduction} if self.target_flops_reduction is not None \
                else ({"ratios": self.ratios} if self.ratios is not None else {"ratio": self.ratio})
            self._masks = self._select(**kw)
        self._frozen = self._masks
        self._enforce(self._masks)
        return self.masks()

    def remove(self) -> nn.Module:
        """Fold FS into the weights and detach SWP from the model (masks applied); returns the model."""
        self._enforce(self._masks)
        for conv in self.convs.values():
            if parametrize.is_parametrized(conv, "weight"):
                parametrize.remove_parametrizations(conv, "weight", leave_parametrized=True)
        self.skeletons = {}
        return self.model
