"""DAIS: Differentiable Annealing Indicator Search (Guan, Liu, Zhao, Che, Bian, Wang, Tang,
arXiv 2011.02166, "DAIS: Automatic Channel Pruning via Differentiable Annealing Indicator Search").

Every output channel of a pruned conv gets an indicator relaxed to ``m = sigmoid(alpha / T)``
that multiplies the channel (after its BatchNorm, so normalisation cannot undo it). The
temperature ``T`` is annealed from ``t0`` to ``t_end`` (geometrically, over ``search_steps``
iterations), so the indicators converge to binary values. Weights and indicators are learned
by bi-level optimisation, alternating single steps (first-order, as in DARTS):

- the *weights* on the training split, by the user's loop / :func:`~stripeconv.pruning.fit`
  (the indicators act in that forward pass but are constants for it);
- the *indicators* ``alpha`` on a validation split ``val_data`` (a held-out part of the training
  data, never the test set): after each weight step (:meth:`DAIS.after_step`), the pruner takes
  the next batch of ``val_data`` and steps its own Adam optimizer on

  ``CE + l1_weight * mean(m) + budget_weight * ((E[FLOPs] / budget) - 1)^2 + residual_weight * R``

  where ``E[FLOPs]`` is differentiable: each conv costs ``2 * H * W * kh * kw * E[out] * E[in]``
  with ``E[out]`` its indicator sum and ``E[in]`` the expected number of live input channels
  (a channel produced by several residual-coupled convs is alive with probability
  ``1 - prod(1 - m_p)``), and ``R`` is the residual-consistency term: the variance of the
  indicators of coupled producers of the same channel (they should agree, or the channel
  cannot be removed).

At the end of the search (step ``search_steps``) channels with ``m > 0.5`` are kept. If the
binarised model misses the FLOPs budget by more than ``tolerance`` (relative: the result lies in
``[(1 - tolerance) * budget, budget]``), a greedy correction flips the channels with the
smallest ``|alpha|`` (off when over budget, back on when under); what it did is in
:attr:`DAIS.correction` and :meth:`DAIS.report`. The kept indicator values are folded into the
BN affine (exact), the pruned filters are masked (BN zeroed) and training goes on as fine-tuning,
the hooks holding the masks.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import distributed
from . import _checks as check
from ._search import BatchCursor, ExpectedFlops, Progress, batchnorm_statistics_kept, gate_module_of
from ._phased import SearchThenFinetune

__all__ = ["DAIS"]


class DAIS(SearchThenFinetune):
    """Differentiable Annealing Indicator Search (Guan et al., arXiv 2011.02166): channel pruning to a FLOPs budget.

    Arguments:

    - ``val_data``: re-iterable batches ``(x, y)`` of a **held-out split of the training data**
      (e.g. :func:`~stripeconv.pruning.lbs.holdout_split`), cycled for the indicator steps. For an
      exact resume it must give the same batches in the same order on each pass (no shuffling,
      or a DataLoader with a seeded ``generator``).
    - ``target_flops_reduction`` (required): the FLOPs budget is ``(1 - target) * dense FLOPs``.
    - ``search_steps``: iterations (weight steps) of the search; then the channels are fixed and
      the rest of training fine-tunes. E.g. ``search_epochs * len(train_loader)``.
    - ``t0`` (1.0) / ``t_end`` (1e-3): temperature at the start / end of the search (geometric).
    - ``alpha_init`` (0.3): initial ``alpha`` of every channel (indicator ``sigmoid(0.3) = 0.57`` at
      ``T = 1``). Small, so that the alphas can cross 0 before the temperature freezes them.
      For short searches raise ``alpha_lr`` (e.g. 0.05 for a search of a few hundred steps).
    - ``alpha_lr`` (3e-4), ``alpha_betas`` ((0.5, 0.999)), ``alpha_weight_decay`` (1e-3): Adam for
      ``alpha``, DARTS' architecture-optimizer settings.
    - ``l1_weight`` (1e-3), ``budget_weight`` (2.0), ``residual_weight`` (1.0): the regulariser weights.
    - ``alpha_every`` (1): weight steps per indicator step.
    - ``tolerance`` (0.02): how far below the budget the final FLOPs may land before correction;
      ``correct`` (True): apply the greedy correction (False: keep exactly ``alpha > 0``).
    - ``loss_fn`` (cross entropy): the task loss of the indicator step.
    - ``epochs``: if given and the search is still running at the end of that epoch count, it is
      ended there (with a warning), so a fixed-length run always ends pruned.
    - ``verbose``: progress (temperature, loss, expected FLOPs) during the search.

    The paper's exact regulariser weights and annealing constants are not given in a public code
    release; the defaults above are this implementation's (see the module docstring).
    Only filters (channels) are pruned; convs skipped by ``layers`` / ``skip_first`` /
    ``exclude`` get no indicator.
    """

    granularities = ("filter",)

    def __init__(self, model: nn.Module, input_size=None, *, val_data, target_flops_reduction: float,
                 search_steps: int, t0: float = 1.0, t_end: float = 1e-3, alpha_init: float = 0.3,
                 alpha_lr: float = 3e-4, alpha_betas=(0.5, 0.999), alpha_weight_decay: float = 1e-3,
                 l1_weight: float = 1e-3, budget_weight: float = 2.0, residual_weight: float = 1.0,
                 alpha_every: int = 1, tolerance: float = 0.02, correct: bool = True, loss_fn: Optional[Callable] = None,
                 verbose: bool = False, **kw):
        if kw.get("ratio") is not None or kw.get("ratios") is not None:
            raise ValueError("DAIS searches to a FLOPs budget: give target_flops_reduction=")
        if kw.get("granularity", "filter") != "filter":
            raise ValueError("DAIS prunes channels only (granularity='filter')")
        super().__init__(model, input_size, target_flops_reduction=target_flops_reduction, **kw)
        if val_data is None:
            raise ValueError("DAIS needs val_data: a held-out split of the training data (never the test set)")
        check.number("DAIS", "search_steps", search_steps, low=1, integer=True)
        check.number("DAIS", "t0", t0, low=0.0, low_open=True)
        check.number("DAIS", "t_end", t_end, low=0.0, high=t0, low_open=True)
        check.number("DAIS", "alpha_init", alpha_init)
        check.number("DAIS", "alpha_lr", alpha_lr, low=0.0, low_open=True)
        for name, value in (("alpha_weight_decay", alpha_weight_decay), ("l1_weight", l1_weight),
                            ("budget_weight", budget_weight), ("residual_weight", residual_weight),
                            ("tolerance", tolerance)):
            check.number("DAIS", name, value, low=0.0)
        check.number("DAIS", "alpha_every", alpha_every, low=1, integer=True)
        self.search_steps, self.t0, self.t_end = int(search_steps), float(t0), float(t_end)
        self.l1_weight, self.budget_weight, self.residual_weight = l1_weight, budget_weight, residual_weight
        self.alpha_every, self.tolerance, self.correct = int(alpha_every), float(tolerance), bool(correct)
        self.loss_fn = loss_fn or F.cross_entropy
        self.verbose = verbose
        _ = self.graph
        self.alphas: dict[str, nn.Parameter] = {
            n: nn.Parameter(torch.full((c.out_channels,), float(alpha_init), device=c.weight.device))
            for n, c in self.convs.items()}
        self.alpha_optimizer = torch.optim.Adam(list(self.alphas.values()), lr=alpha_lr, betas=tuple(alpha_betas),
                                                weight_decay=alpha_weight_decay)
        self.temperature = self.t0
        self.phase = "search"
        self.alpha_steps = 0
        self.correction: Optional[dict] = None
        self.history: list = []  # (step, temperature, expected flops ratio, binarised flops ratio)
        self.cursor = BatchCursor(val_data)
        self._train_alpha = False
        self._budget = (1.0 - target_flops_reduction) * self.dense_flops
        self._expected_flops = ExpectedFlops(self.graph)
        self._groups = self._coupled_groups()
        self._hooks = []
        self._attach()
        self._progress = None

    # ------------------------------------------------------------------------- indicators
    def indicators(self, name: Optional[str] = None, detach: bool = True):
        """``sigmoid(alpha / T)``: one conv's ``[out]`` tensor, or a dict of all."""
        if name is None:
            return {n: self.indicators(n, detach) for n in self.alphas}
        a = self.alphas[name]
        m = torch.sigmoid(a / self.temperature)
        return m.detach() if detach else m

    def _attach(self) -> None:
        for name in self.convs:
            mod = gate_module_of(self, name)

            def hook(m, inp, out, name=name):
                if self.phase != "search":
                    return out
                ind = self.indicators(name, detach=not self._train_alpha)
                return out * ind.to(out.dtype)[None, :, None, None]
            self._hooks.append(mod.register_forward_hook(hook))

    def _detach_hooks(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []

    # ----------------------------------------------------------------------- expected FLOPs
    def _coupled_groups(self) -> list:
        out = []
        for gi, grp in enumerate(self.graph.groups):
            gated = [(n, idx, ridx) for n, idx, ridx in grp.producers if n in self.alphas]
            out.append((grp.size, gated, len(gated) != len(grp.producers)))
        return out

    def _alive_probs(self, ind: dict) -> list:
        """Per group, ``[size]`` probability that the root channel is alive."""
        probs = []
        for size, gated, has_fixed in self._groups:
            if has_fixed or not gated:
                probs.append(None)  # always alive
                continue
            dead = None
            for n, idx, ridx in gated:
                d = torch.ones(size, device=ind[n].device, dtype=ind[n].dtype)
                d = d.index_put((ridx.to(d.device),), 1.0 - ind[n][idx.to(d.device)])
                dead = d if dead is None else dead * d
            probs.append(1.0 - dead)
        return probs

    def expected_flops(self, ind: Optional[dict] = None) -> Tensor:
        """Differentiable FLOPs (batch 1, profile's convention) with indicators as keep probabilities."""
        ind = ind if ind is not None else self.indicators(detach=False)
        dev = next(iter(ind.values())).device if ind else torch.device("cpu")
        return self._expected_flops({n: v.sum() for n, v in ind.items()}, self._alive_probs(ind), dev)

    def residual_consistency(self, ind: dict) -> Tensor:
        """Mean variance of the indicators of residual-coupled producers of the same channels."""
        terms = []
        for size, gated, _ in self._groups:
            if len(gated) < 2:
                continue
            vals = []
            for n, idx, ridx in gated:
                v = torch.zeros(size, device=ind[n].device, dtype=ind[n].dtype)
                vals.append(v.index_put((ridx.to(v.device),), ind[n][idx.to(v.device)]))
            stack = torch.stack(vals)
            terms.append(((stack - stack.mean(0, keepdim=True)) ** 2).mean())
        if not terms:
            return torch.zeros(())
        return torch.stack(terms).mean()

    def regularizer(self, ind: dict) -> Tensor:
        flat = torch.cat([v for v in ind.values()])
        ratio = self.expected_flops(ind) / self._budget
        reg = self.l1_weight * flat.mean() + self.budget_weight * (ratio - 1.0) ** 2
        if self.residual_weight:
            reg = reg + self.residual_weight * self.residual_consistency(ind).to(flat.device)
        return reg

    # ------------------------------------------------------------------------------ hooks
    def _after_search_step(self) -> None:
        self.temperature = self.t0 * (self.t_end / self.t0) ** min(1.0, self.steps / self.search_steps)

    def _alpha_step(self) -> None:
        x, y = self._val_batch()
        self._train_alpha = True
        try:  # the indicator step must not move BN statistics
            with torch.enable_grad(), batchnorm_statistics_kept(self.model):
                out = self.model(x)
                ind = self.indicators(detach=False)
                loss = self.loss_fn(out, y) + self.regularizer(ind)
                params = list(self.alphas.values())
                grads = torch.autograd.grad(loss, params)
        finally:
            self._train_alpha = False
        for p, g in zip(params, distributed.average_gradients(grads)):  # one step on every rank
            p.grad = g
        self.alpha_optimizer.step()
        self.alpha_optimizer.zero_grad(set_to_none=True)
        self.alpha_steps += 1
        if self.verbose:
            if self._progress is None:
                self._progress = Progress(self.search_steps, "DAIS search", True, initial=self.steps - 1)
            with torch.no_grad():
                e = float(self.expected_flops(self.indicators())) / self.dense_flops
            self._progress.update(1, T=self.temperature, loss=float(loss.detach()), exp_flops=e)

    def binarized_masks(self, keep: Optional[dict] = None) -> dict:
        keep = keep if keep is not None else {n: (a.detach() > 0) for n, a in self.alphas.items()}
        return {n: keep[n].to(self._masks[n].device)[:, None, None].expand_as(self._masks[n]).clone() for n in self.convs}

    @torch.no_grad()
    def _correct(self, keep: dict) -> dict:
        """Greedy flips (smallest |alpha| first) until FLOPs lie in [(1 - tolerance) * budget, budget]."""
        budget, lo = self._budget, (1.0 - self.tolerance) * self._budget
        before = self.flops(self.binarized_masks(keep))
        flops, off, on = before, 0, 0
        cand = sorted(((float(a), n, i) for n, al in self.alphas.items() for i, a in enumerate(al.detach().cpu())),
                      key=lambda t: (abs(t[0]), t[1], t[2]))
        if flops > budget:
            for a, n, i in sorted([c for c in cand if keep[c[1]][c[2]]], key=lambda t: (t[0], t[1], t[2])):
                if flops <= budget:
                    break
                if int(keep[n].sum()) <= 1:
                    continue
                keep[n][i] = False
                flops = self.flops(self.binarized_masks(keep))
                off += 1
        if flops < lo:
            for a, n, i in sorted([c for c in cand if not keep[c[1]][c[2]]], key=lambda t: (-t[0], t[1], t[2])):
                if flops >= lo:
                    break
                keep[n][i] = True
                f = self.flops(self.binarized_masks(keep))
                if f > budget:
                    keep[n][i] = False
                    continue
                flops = f
                on += 1
        self.correction = {"flops_before": before / self.dense_flops, "flops_after": flops / self.dense_flops,
                           "budget": budget / self.dense_flops, "switched_off": off, "switched_on": on,
                           "applied": bool(off or on)}
        return keep

    @torch.no_grad()
    def _finalize(self) -> None:
        keep = {n: (a.detach() > 0).cpu() for n, a in self.alphas.items()}
        for n in keep:  # never remove a whole layer
            if not bool(keep[n].any()):
                keep[n][int(torch.argmax(self.alphas[n].detach()))] = True
        if self.correct:
            keep = self._correct(keep)
        ind = self.indicators()
        for n, conv in self.convs.items():  # fold the kept indicator values (exact: they scaled BN's output)
            s = torch.where(keep[n].to(ind[n].device), ind[n], torch.zeros_like(ind[n]))
            mod = gate_module_of(self, n)
            if isinstance(mod, nn.modules.batchnorm._BatchNorm):
                if mod.affine:
                    mod.weight.mul_(s.to(mod.weight.dtype))
                    mod.bias.mul_(s.to(mod.bias.dtype))
                else:  # no affine: scale the conv instead (BN(s * z) != s * BN(z)); approximate at s ~ 1
                    pass
            else:
                conv.weight.mul_(s.to(conv.weight.dtype)[:, None, None, None])
                if conv.bias is not None:
                    conv.bias.mul_(s.to(conv.bias.dtype))
        masks = self.binarized_masks(keep)
        self._masks = masks
        self._frozen = {n: m.clone() for n, m in masks.items()}
        self.phase = "finetune"
        self._detach_hooks()
        self._enforce(self._frozen)
        if self.verbose:
            p = self._progress or Progress(None, "DAIS", True)
            p.log(f"search done: flops reduction {self.flops_reduction():.4f} (target {self.target_flops_reduction}); "
                  f"correction {self.correction}")
            p.close()

    def binarization(self) -> float:
        """Fraction of indicators within 0.01 of 0 or 1 at the current temperature."""
        flat = torch.cat([v for v in self.indicators().values()])
        return float((torch.minimum(flat, 1 - flat) < 0.01).float().mean())

    def report(self, exported=None) -> dict:
        rep = super().report(exported)
        rep["correction"] = self.correction
        rep["temperature"] = self.temperature
        return rep

    # --------------------------------------------------------------------------- checkpoint
    def _extra_state(self) -> dict:
        return {
            "phase": self.phase, "temperature": self.temperature, "alpha_steps": self.alpha_steps,
            "alphas": {n: a.detach().cpu().clone() for n, a in self.alphas.items()},
            "alpha_optimizer": self.alpha_optimizer.state_dict(),
            "cursor": self.cursor.state(), "correction": self.correction,
        }

    def _load_extra_state(self, extra: dict) -> None:
        if not extra:
            return
        with torch.no_grad():
            for n, a in self.alphas.items():
                a.copy_(extra["alphas"][n].to(a.device))
        self.alpha_optimizer.load_state_dict(extra["alpha_optimizer"])
        self.temperature, self.alpha_steps = float(extra["temperature"]), int(extra["alpha_steps"])
        self.cursor.load_state(extra["cursor"])
        self.correction = extra["correction"]
        self.phase = extra["phase"]
        if self.phase != "search":
            self._detach_hooks()
