"""DSA: Differentiable Sparsity Allocation (Ning, Zhao, Li, Lei, Wang, Yang, ECCV 2020, arXiv 2004.02164,
"DSA: More Efficient Budgeted Pruning via Differentiable Sparsity Allocation").

DSA learns *how many* channels each layer keeps by gradient descent. Every channel unit ``u``
(the output channels of a conv, or of the convs a residual addition ties: DSA's topological
groups) has a keep ratio ``a_u``, and its channels are kept at random by the *differentiable
pruning process* of the authors' public code (``models/op.py``):

- base importance ``w_i``: the L1 norm of filter ``i`` (summed over the tied convs), detached;
- keep probability ``p_i = min(1, sigmoid(beta2 * (log w_i - log beta1)) + floor)``, with the
  threshold ``beta1`` solved (bisection) so that ``mean(p) = a_u``: the expected number of kept
  channels is exactly ``a_u * size``, and more important channels are kept more often;
- masks ``m_i ~ Bernoulli(p_i)`` multiply the channels after their BatchNorm, with a
  straight-through gradient (``dL/dp = dL/dm``);
- ``dL/da_u`` by implicit differentiation of ``mean(p) = a_u``:
  ``dp_i/da = size * f_i / sum_j f_j`` with ``f_i = dp_i/dlog(beta1)``.

The weights train on the training split with sampled masks (the user's loop, or
:func:`~stripeconv.pruning.fit`). After each weight step (:meth:`DSA.after_step`) the keep
ratios take one gradient step on the next batch of ``val_data`` (a held-out part of the
training data, never the test set), projected onto ``[floor, 1]``, on the task loss under the
FLOPs budget ``E[FLOPs](a) <= (1 - target) * dense``. ``E[FLOPs]`` counts each conv as
``2 * H * W * kh * kw * E[out] * E[in]`` from the keep probabilities, so it is differentiable in
``a``, and the constraint is handled by ADMM with a slack variable: each step minimises
``task loss + rho / 2 * (g(a) + s + u)^2`` with ``g = E[FLOPs] / dense - (1 - target)``, and
every ``admm_every`` steps ``s = max(0, -g - u)`` and ``u += g + s``. The gradient of ``g``
weighs each unit by the FLOPs it controls, which on a short search lets the units that control
the most FLOPs (a residual stage, whose channels every block reads) collapse before the task
loss can hold them; by default the step is therefore preconditioned by each unit's FLOPs
sensitivity (``precondition``), which leaves the optimum unchanged (the ratio of the task and
budget gradients is what the KKT conditions equalise) and lets the task loss per FLOP decide the
allocation. Plain SGD, not Adam, is used for the keep ratios on purpose: a per-coordinate
normalisation would move every unit at the same speed whatever its gradient.

At step ``search_steps`` each unit keeps its ``round(a_u * size)`` most important channels. If
that misses the budget by more than ``tolerance`` (relative), all keep ratios are scaled by the
largest factor that fits (bisection) and single channels are added while they fit, so the FLOPs
land in ``[(1 - tolerance) * budget, budget]`` and the learned allocation keeps its shape;
:attr:`DSA.correction` says what was done. Then the pruned filters are masked (BN zeroed) and
training goes on as fine-tuning.

The public code holds the pruning process but not the training loop, so the budget optimiser's
form and constants (ADMM with a slack, ``rho``, ``admm_every``, preconditioned SGD for the keep
ratios) are this implementation's; ``beta2 = 1``, ``floor = 0.01`` and the initial keep ratio 0.993
(``sigmoid(5)``) are the code's. DSA can prune from scratch: nothing here requires a pretrained
model.
"""
from __future__ import annotations

import warnings
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import distributed
from . import _checks as check
from ._search import (BatchCursor, ChannelUnit, ExpectedFlops, Progress, batchnorm_statistics_kept, channel_units,
                      gate_module_of)
from ._phased import SearchThenFinetune

__all__ = ["DSA", "keep_probabilities"]

_EPS = 1e-8


def _probabilities(log_w: Tensor, log_beta1: Tensor, beta2: float, floor: float) -> tuple:
    s = torch.sigmoid(beta2 * (log_w - log_beta1[:, None]))
    return s, (s + floor).clamp(max=1.0)


class _KeepProbabilities(torch.autograd.Function):
    """``p`` from the keep ratios, with the implicit derivative of ``mean(p) = keep`` as backward."""

    @staticmethod
    def forward(ctx, keep: Tensor, log_w: Tensor, valid: Tensor, beta2: float, floor: float) -> Tensor:
        count = valid.sum(1).to(log_w.dtype)
        target = keep.detach().clamp(floor, 1.0)
        big = torch.finfo(log_w.dtype).max
        lo = torch.where(valid, log_w, big).amin(1) - 50.0 / beta2  # mean(p) = 1 at lo, = floor at hi
        hi = torch.where(valid, log_w, -big).amax(1) + 50.0 / beta2
        for _ in range(64):  # mean(p) decreases with log(beta1): bisection
            mid = 0.5 * (lo + hi)
            _, p = _probabilities(log_w, mid, beta2, floor)
            too_many = (p * valid).sum(1) / count > target
            lo, hi = torch.where(too_many, mid, lo), torch.where(too_many, hi, mid)
        s, p = _probabilities(log_w, 0.5 * (lo + hi), beta2, floor)
        slope = s * (1.0 - s) * ((s + floor) < 1.0) * valid  # dp/dlog(beta1), up to the factor -beta2
        ctx.save_for_backward(slope, count)
        return p * valid

    @staticmethod
    def backward(ctx, grad_p: Tensor):
        slope, count = ctx.saved_tensors
        total = slope.sum(1)
        weighted = (grad_p * slope).sum(1)
        grad_keep = torch.where(total > 0, count * weighted / total.clamp_min(torch.finfo(total.dtype).tiny),
                                torch.zeros_like(total))
        return grad_keep, None, None, None, None


def keep_probabilities(keep: Tensor, importance: Tensor, valid: Tensor, beta2: float = 1.0,
                       floor: float = 0.01) -> Tensor:
    """DSA's keep probabilities of ``U`` channel units.

    ``keep``: ``[U]`` keep ratios; ``importance``: ``[U, C]`` non-negative channel scores, padded;
    ``valid``: bool ``[U, C]``, the real channels. Returns ``[U, C]`` probabilities (0 on padding),
    ``p = min(1, sigmoid(beta2 * log(w / beta1)) + floor)`` with ``beta1`` per unit such that the
    mean over its channels equals its keep ratio (clamped to ``[floor, 1]``). Differentiable in
    ``keep`` (implicit function), not in ``importance``.
    """
    log_w = torch.log(importance.detach().clamp_min(0.0) + _EPS)
    return _KeepProbabilities.apply(keep, log_w, valid, float(beta2), float(floor))


class DSA(SearchThenFinetune):
    """Differentiable Sparsity Allocation (Ning et al., ECCV 2020): per-layer keep ratios learned by
    gradient descent under a FLOPs budget, through a differentiable channel pruning process.

    Arguments:

    - ``val_data``: re-iterable batches ``(x, y)`` of a **held-out split of the training data**
      (e.g. :func:`~stripeconv.pruning.lbs.holdout_split`), cycled for the keep-ratio steps. For an
      exact resume it must give the same batches in the same order on each pass.
    - ``target_flops_reduction`` (required): the budget is ``(1 - target) * dense FLOPs``.
    - ``search_steps``: weight steps of the search; then the channels are fixed and the rest of
      training fine-tunes.
    - ``beta2`` (1.0): steepness of the keep probability in the log importance; larger makes the
      sampled masks closer to keeping the most important channels.
    - ``floor`` (0.01): the smallest keep probability of any channel.
    - ``keep_init`` (0.993): initial keep ratio of every unit.
    - ``alpha_lr`` (0.02): SGD step of the keep ratios; ``rho`` (10.0): ADMM penalty of the budget
      constraint; ``admm_every`` (20): keep-ratio steps per ADMM slack/dual update;
      ``alpha_every`` (1): weight steps per keep-ratio step.
    - ``precondition`` (True): divide each unit's step by its FLOPs sensitivity ``dE[FLOPs]/da_u``
      (normalised to mean 1), so the budget moves every keep ratio at one speed and the
      allocation follows the task loss per FLOP; False takes the plain gradient, where the units
      that control the most FLOPs (a whole residual stage) shrink fastest, and on short searches
      can collapse.
    - ``tolerance`` (0.02): how far below the budget the final FLOPs may land before the keep
      ratios are rescaled; ``correct`` (True): rescale (False: keep the rounded allocation).
    - ``loss_fn`` (cross entropy): the task loss of the keep-ratio step.
    - ``seed`` (0): the mask sampler's generator (checkpointed, so a resume is exact).
    - ``epochs``: if given and the search is still running at the end of that epoch count, it is
      ended there (with a warning). ``verbose``: progress during the search.

    Only filters (channels) are pruned; a channel group with a producer that is not prunable
    (skipped by ``layers`` / ``skip_first`` / ``exclude``, grouped convs) is left whole.
    After the search: :attr:`allocation` (unit name -> kept fraction), :attr:`correction`.
    """

    granularities = ("filter",)

    def __init__(self, model: nn.Module, input_size=None, *, val_data, target_flops_reduction: float,
                 search_steps: int, beta2: float = 1.0, floor: float = 0.01, keep_init: float = 0.993,
                 alpha_lr: float = 0.02, rho: float = 10.0, admm_every: int = 20, alpha_every: int = 1,
                 precondition: bool = True, tolerance: float = 0.02, correct: bool = True,
                 loss_fn: Optional[Callable] = None, seed: int = 0,
                 verbose: bool = False, **kw):
        owner = "DSA"
        if kw.get("ratio") is not None or kw.get("ratios") is not None:
            raise ValueError(f"{owner} allocates sparsity to a FLOPs budget: give target_flops_reduction=")
        if kw.get("granularity", "filter") != "filter":
            raise ValueError(f"{owner} prunes channels only (granularity='filter')")
        super().__init__(model, input_size, target_flops_reduction=target_flops_reduction, **kw)
        if val_data is None:
            raise ValueError(f"{owner} needs val_data: a held-out split of the training data (never the test set)")
        check.number(owner, "search_steps", search_steps, low=1, integer=True)
        check.number(owner, "beta2", beta2, low=0.0, low_open=True)
        check.number(owner, "floor", floor, low=0.0, high=1.0, high_open=True)
        check.number(owner, "keep_init", keep_init, low=floor, high=1.0)
        check.number(owner, "alpha_lr", alpha_lr, low=0.0, low_open=True)
        check.number(owner, "rho", rho, low=0.0, low_open=True)
        check.number(owner, "admm_every", admm_every, low=1, integer=True)
        check.number(owner, "alpha_every", alpha_every, low=1, integer=True)
        check.number(owner, "tolerance", tolerance, low=0.0, high=1.0, high_open=True)
        check.number(owner, "seed", seed, low=0, integer=True)
        self.search_steps, self.beta2, self.floor = int(search_steps), float(beta2), float(floor)
        self.rho, self.admm_every, self.alpha_every = float(rho), int(admm_every), int(alpha_every)
        self.tolerance, self.correct = float(tolerance), bool(correct)
        self.precondition = bool(precondition)
        self.loss_fn = loss_fn or F.cross_entropy
        self.verbose = verbose
        self.units: list[ChannelUnit] = channel_units(self)
        if not self.units:
            raise ValueError(f"{owner}: no prunable channel group (every group has a producer that is not prunable)")
        device = next(iter(self.convs.values())).weight.device
        self.keep = nn.Parameter(torch.full((len(self.units),), float(keep_init), device=device))
        self.alpha_optimizer = torch.optim.SGD([self.keep], lr=alpha_lr)
        self._members: dict[str, list] = {}  # conv -> [(unit index, out idx, root idx)]
        for ui, u in enumerate(self.units):
            for name, idx, ridx in u.members:
                self._members.setdefault(name, []).append((ui, idx.to(device), ridx.to(device)))
        sizes = torch.tensor([u.size for u in self.units], device=device)
        self._valid = torch.arange(int(sizes.max()), device=device)[None, :] < sizes[:, None]
        self._budget = (1.0 - target_flops_reduction) * self.dense_flops
        self._expected_flops = ExpectedFlops(self.graph)
        self.generator = torch.Generator().manual_seed(int(seed))
        self.dual, self.slack = 0.0, 0.0  # ADMM's scaled dual u and slack s of the budget constraint
        self.phase = "search"
        self.alpha_steps = 0
        self.allocation: Optional[dict] = None
        self.correction: Optional[dict] = None
        self.cursor = BatchCursor(val_data)
        self._train_alpha = False
        self._probs: Optional[Tensor] = None  # [U, C] keep probabilities of the running keep-ratio step
        self._factors_now: dict = {}  # conv -> [out] gate of the running forward pass
        self._hooks: list = []
        self._attach()
        self._progress = None

    # ---------------------------------------------------------------------------- keep ratios
    def keep_ratios(self) -> Tensor:
        """``[U]`` keep ratio of each unit, in the order of :attr:`units`."""
        return self.keep

    def importance(self) -> Tensor:
        """``[U, C]`` DSA's base importance: per channel, the L1 norm of its filters (0 on padding)."""
        out = torch.zeros(self._valid.shape, device=self._valid.device)
        for name, members in self._members.items():
            l1 = self.weight(name).detach().abs().flatten(1).sum(1).to(out.device, out.dtype)
            for ui, idx, ridx in members:
                out[ui].index_add_(0, ridx, l1[idx])
        return out

    def probabilities(self, keep: Optional[Tensor] = None) -> Tensor:
        """``[U, C]`` keep probabilities at the current (or given) keep ratios."""
        keep = self.keep_ratios() if keep is None else keep
        return keep_probabilities(keep, self.importance(), self._valid, self.beta2, self.floor)

    def keep_counts(self, keep: Optional[Tensor] = None) -> Tensor:
        """``[U]`` channels each unit keeps at ``keep`` (default: the current keep ratios):
        ``round(keep * size)``, at least 1."""
        keep = (self.keep_ratios() if keep is None else keep).detach().clamp(0.0, 1.0)
        sizes = self._valid.sum(1)
        return torch.minimum(torch.clamp(torch.round(keep * sizes), min=1), sizes).long()

    @torch.no_grad()
    def importance_ranks(self) -> Tensor:
        """``[U, C]`` each channel's rank in its unit by :meth:`importance` (0 = most important)."""
        score = torch.where(self._valid, self.importance(), torch.full(self._valid.shape, -1.0,
                                                                       device=self._valid.device))
        order = torch.argsort(score, dim=1, descending=True, stable=True)
        return torch.empty_like(order).scatter_(1, order, torch.arange(order.shape[1], device=order.device)
                                                .expand_as(order).contiguous())

    @torch.no_grad()
    def deterministic_masks(self, counts: Optional[Tensor] = None, ranks: Optional[Tensor] = None) -> Tensor:
        """``[U, C]`` 0/1: each unit keeps its ``counts`` (default :meth:`keep_counts`) most important
        channels (``ranks``: :meth:`importance_ranks`, when already computed)."""
        counts = self.keep_counts() if counts is None else counts
        ranks = self.importance_ranks() if ranks is None else ranks
        return ((ranks < counts[:, None]) & self._valid).float()

    def _sample(self, probs: Tensor) -> Tensor:
        noise = torch.rand(probs.shape, generator=self.generator).to(probs.device)
        hard = (noise < probs.detach()).to(probs.dtype) * self._valid
        return hard + probs - probs.detach() if probs.requires_grad else hard  # straight-through

    def _factors(self, unit_masks: Tensor) -> dict:
        """Conv name -> ``[out]`` channel factors from per-unit values (1 outside the units)."""
        out = {}
        for name, members in self._members.items():
            f = torch.ones(self.convs[name].out_channels, device=unit_masks.device, dtype=unit_masks.dtype)
            for ui, idx, ridx in members:
                f = f.index_put((idx,), unit_masks[ui, ridx])
            out[name] = f
        return out

    # ---------------------------------------------------------------------------- forward gates
    def _attach(self) -> None:
        def draw(module, args):
            if self.phase != "search":
                return
            if self._train_alpha:
                self._probs = self.probabilities()
                masks = self._sample(self._probs)
            elif self.model.training:
                with torch.no_grad():
                    masks = self._sample(self.probabilities())
            else:  # evaluation during the search: the channels the search would keep now
                masks = self.deterministic_masks()
            self._factors_now = self._factors(masks)

        self._hooks.append(self.model.register_forward_pre_hook(draw))
        for name in self._members:
            def gate(module, inp, out, name=name):
                f = self._factors_now.get(name)
                if self.phase != "search" or f is None:
                    return out
                return out * f.to(out.dtype)[None, :, None, None]
            self._hooks.append(gate_module_of(self, name).register_forward_hook(gate))

    def _detach_hooks(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []

    def masked_model(self) -> nn.Module:
        model = super().masked_model()
        ids = {h.id for h in self._hooks}
        for m in model.modules():  # the copy must not carry the search's gates
            for hooks in (m._forward_hooks, m._forward_pre_hooks):
                for i in ids & set(hooks):
                    del hooks[i]
        return model

    # --------------------------------------------------------------------------------- budget
    def expected_flops(self, probs: Optional[Tensor] = None) -> Tensor:
        """Differentiable FLOPs (batch 1, profile's convention) with channels kept with ``probs`` ``[U, C]``."""
        probs = self.probabilities() if probs is None else probs
        alive: list = [None] * len(self.graph.groups)
        for ui, u in enumerate(self.units):
            alive[u.group] = probs[ui, :u.size]
        counts = {n: f.sum() for n, f in self._factors(probs).items()}
        return self._expected_flops(counts, alive, probs.device)

    def budget_violation(self, probs: Optional[Tensor] = None) -> Tensor:
        """``g = E[FLOPs] / dense - (1 - target)``: positive while the expected model is over budget."""
        return self.expected_flops(probs) / self.dense_flops - self._budget / self.dense_flops

    # ---------------------------------------------------------------------------------- hooks
    def _alpha_step(self) -> None:
        x, y = self._val_batch()
        self._train_alpha = True
        try:  # the keep-ratio step must not move BN statistics
            with torch.enable_grad(), batchnorm_statistics_kept(self.model):
                task = self.loss_fn(self.model(x), y)
                g = self.budget_violation(self._probs)
                loss = task + 0.5 * self.rho * (g + self.slack + self.dual) ** 2
                (grad,) = torch.autograd.grad(loss, [self.keep], retain_graph=self.precondition)
                if self.precondition:
                    (share,) = torch.autograd.grad(g, [self.keep])  # each unit's FLOPs sensitivity
                    share = share.clamp_min(1e-3 * float(share.abs().max()) + 1e-12)
                    grad = grad * (share.mean() / share)
        finally:
            self._train_alpha = False
            self._probs = None
        (self.keep.grad,) = distributed.average_gradients([grad])  # one step on every rank
        self.alpha_optimizer.step()
        self.alpha_optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            self.keep.clamp_(self.floor, 1.0)
        self.alpha_steps += 1
        if self.alpha_steps % self.admm_every == 0:  # ADMM: slack, then scaled dual, at the new keep ratios
            with torch.no_grad():
                violation = float(self.budget_violation())
            self.slack = max(0.0, -violation - self.dual)
            self.dual += violation + self.slack
        if self.verbose:
            if self._progress is None:
                self._progress = Progress(self.search_steps, "DSA search", True, initial=self.steps - 1)
            self._progress.update(1, loss=float(task.detach()), exp_flops=1.0 - self.target_flops_reduction
                                  + float(g.detach()), keep=float(self.keep.detach().mean()))

    def unit_keeps_to_masks(self, unit_masks: Tensor) -> dict:
        """Stripe masks (whole filters) from ``[U, C]`` 0/1 per-unit channel masks."""
        masks = {n: torch.ones_like(m) for n, m in self._masks.items()}
        for name, f in self._factors(unit_masks.float()).items():
            masks[name] &= (f > 0.5).to(masks[name].device)[:, None, None]
        return masks

    @torch.no_grad()
    def _finalize(self) -> None:
        keep = self.keep_ratios().detach()
        ranks = self.importance_ranks()  # the weights do not move while the budget is fitted
        flops_cache: dict = {}

        def flops_of(counts: Tensor) -> int:
            key = tuple(counts.tolist())
            if key not in flops_cache:
                flops_cache[key] = self.flops(self.unit_keeps_to_masks(self.deterministic_masks(counts, ranks)))
            return flops_cache[key]

        counts = self.keep_counts(keep)
        before = flops_of(counts)
        scale = 1.0
        if self.correct:
            counts, scale = self._fit_budget(keep, counts, flops_of)
        masks = self.unit_keeps_to_masks(self.deterministic_masks(counts, ranks))
        self.allocation = {u.name: int(counts[i]) / u.size for i, u in enumerate(self.units)}
        self.correction = {"flops_before": before / self.dense_flops,
                           "flops_after": flops_of(counts) / self.dense_flops,
                           "budget": self._budget / self.dense_flops, "scale": scale,
                           "applied": not torch.equal(counts, self.keep_counts(keep))}
        self.phase = "finetune"
        self._detach_hooks()
        self.hold(masks)
        if self.verbose:
            p = self._progress or Progress(None, "DSA", True)
            p.log(f"search done: flops reduction {self.flops_reduction():.4f} (target {self.target_flops_reduction}); "
                  f"correction {self.correction}")
            p.close()

    def _fit_budget(self, keep: Tensor, counts: Tensor, flops_of: Callable[[Tensor], int]) -> tuple:
        """Bring the FLOPs into ``[(1 - tolerance) * budget, budget]``: scale every keep ratio by
        the largest factor that fits (bisection), then add single channels, the units furthest
        below their scaled ratio first, while they fit. Returns ``(counts, scale)``."""
        budget, low = self._budget, (1.0 - self.tolerance) * self._budget
        if low <= flops_of(counts) <= budget:
            return counts, 1.0

        def counts_at(c: float) -> Tensor:
            return self.keep_counts((keep * c).clamp(max=1.0))
        lo, hi = 0.0, float(1.0 / keep.min().clamp_min(1e-6))  # at lo one channel per unit, at hi every unit whole
        if flops_of(counts_at(lo)) > budget:
            warnings.warn("DSA: even one channel per unit exceeds the FLOPs budget; keeping one", stacklevel=4)
            return counts_at(lo), 0.0
        if flops_of(counts_at(hi)) <= budget:
            return counts_at(hi), hi
        for _ in range(40):  # the largest factor whose FLOPs fit
            mid = 0.5 * (lo + hi)
            lo, hi = (mid, hi) if flops_of(counts_at(mid)) <= budget else (lo, mid)
        counts = counts_at(lo)
        flops = flops_of(counts)
        sizes = self._valid.sum(1)
        while flops < low:
            deficit = (keep * lo).clamp(max=1.0) * sizes - counts
            added = False
            for ui in torch.argsort(deficit, descending=True, stable=True).tolist():
                if counts[ui] >= sizes[ui]:
                    continue
                trial = counts.clone()
                trial[ui] += 1
                f = flops_of(trial)
                if f <= budget:
                    counts, flops, added = trial, f, True
                    break
            if not added:
                break
        return counts, lo

    def report(self, exported=None) -> dict:
        rep = super().report(exported)
        rep["allocation"] = self.allocation
        rep["correction"] = self.correction
        return rep

    # ----------------------------------------------------------------------------- checkpoint
    def _extra_state(self) -> dict:
        return {
            "phase": self.phase, "alpha_steps": self.alpha_steps, "keep": self.keep.detach().cpu().clone(),
            "alpha_optimizer": self.alpha_optimizer.state_dict(), "dual": self.dual, "slack": self.slack,
            "generator": self.generator.get_state(), "cursor": self.cursor.state(),
            "allocation": self.allocation, "correction": self.correction,
        }

    def _load_extra_state(self, extra: dict) -> None:
        if not extra:
            return
        with torch.no_grad():
            self.keep.copy_(extra["keep"].to(self.keep.device))
        self.alpha_optimizer.load_state_dict(extra["alpha_optimizer"])
        self.alpha_steps, self.dual, self.slack = int(extra["alpha_steps"]), float(extra["dual"]), float(extra["slack"])
        self.generator.set_state(extra["generator"])
        self.cursor.load_state(extra["cursor"])
        self.allocation, self.correction = extra["allocation"], extra["correction"]
        if extra["phase"] != "search" and self.phase == "search":
            self.phase = extra["phase"]
            self._detach_hooks()
