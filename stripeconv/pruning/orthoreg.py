"""OrthoReg (Lubana, Trivedi, Hougen, Dick, Hero, "OrthoReg: Robust Network Pruning Using
Orthonormality Regularization", arXiv 2009.05014; public code: github.com/EkdeepSLubana/OrthoReg).

Loss-preservation importance estimates (Fisher / first-order Taylor) assume that removing one
filter does not change what the others contribute; correlated filters break that assumption, so
pruning many at once goes wrong. OrthoReg trains with a penalty that pushes each layer's filters
towards orthonormality, which keeps the per-filter estimates additive, and prunes in rounds:

1. **Penalty** (while rounds remain): for each pruned conv, ``R`` = the weights of its kept filters
   as rows ``[k, C kh kw]`` (plus the bias as a column when the conv has one); the loss gains
   ``strength * sum_l w_l * || G_l - I ||_1`` (entrywise L1) with ``G = R R^T`` when ``k <= C kh kw``
   and ``R^T R`` otherwise (the smaller Gram matrix, as the public code does per layer), and layer
   weights ``w_l = sqrt(min(k, C kh kw))`` normalised to sum to 1.
2. **Importance** (at each round): the gradient ``g`` of the loss, averaged over
   ``importance_samples`` samples of ``val_data`` in eval mode; a unit's score is
   ``(sum_{unit's weights} w * g)^2`` (the public code's Fisher estimate: the squared first-order
   change of the loss when the unit is removed). Units are filters (conv bias included) or, with
   ``granularity="stripe"``, stripes.
3. **Rounds**: ``rounds`` prunings spread over the run (after ``round(k E / (rounds + 1))`` of the
   ``E`` epochs, ``k = 1 .. rounds``), each reaching ``k / rounds`` of the target (equal steps, as
   the public code's default thresholds); pruned units stay pruned and count first. The units
   are ranked globally by default (``scope="global"``), and a layer keeps at least
   ``1 - max_layer_rate`` of its units. The penalty stops after the last round, so the remaining
   epochs fine-tune without it (the public code's last round retrains without the regulariser).

Deviations from the public code: the penalty covers the pruned convs (the code's also covers
convs it never prunes); the importance data is ``val_data`` (the CLI and the benchmark pass a
held-out split of the training data; the code uses the training loader); the per-layer cap keeps
the highest-scored units (the code keeps the last filters by index); the training between rounds
is one continuous run of the caller's loop (the code retrains, then fine-tunes with the penalty,
from separate schedules). The code trains with weight decay 0 while the penalty is on; that is the
caller's optimizer.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._modes import set_eval
from . import _checks as check
from .base import Pruner

__all__ = ["OrthoReg", "round_epochs"]


def round_epochs(epochs: int, rounds: int) -> list[int]:
    """Epochs completed before each round: ``max(k, round(k * epochs / (rounds + 1)))``, ``k = 1 .. rounds``
    (strictly increasing, the last at most ``epochs``)."""
    if not 1 <= rounds <= epochs:
        raise ValueError(f"round_epochs: need 1 <= rounds <= epochs, got rounds={rounds}, epochs={epochs}")
    return [max(k, int(math.floor(k * epochs / (rounds + 1) + 0.5))) for k in range(1, rounds + 1)]


class OrthoReg(Pruner):
    """Lubana et al. 2020: orthonormality-regularised training, Fisher importance, pruning in rounds.

    Arguments (besides the :class:`~stripeconv.pruning.Pruner` ones; one target, and ``epochs``,
    the length of the run, are required):

    - ``val_data``: batches ``(x, y)`` for the importance (a held-out split of the training data,
      never the test set); read from the start at every round, so it should not be shuffled;
    - ``rounds`` (2): prunings during the run (see the module docstring for when);
    - ``strength`` (1e-2, the code's value for VGG and ResNet; 1e-3 for MobileNet): the penalty's
      weight;
    - ``importance_samples`` (10000): samples of ``val_data`` the gradient is averaged over;
    - ``max_layer_rate`` (0.95): the most of a layer's units one target may prune;
    - ``granularity``: ``"filter"`` (default) or ``"stripe"`` (the same estimate per stripe);
    - ``loss_fn``: the loss for the importance (cross-entropy by default).

    :meth:`prune` runs every remaining round at once (no more training with the penalty).
    """

    oneshot = False
    default_scope = "global"

    def __init__(self, model: nn.Module, input_size=None, *, val_data, epochs: int, ratio: Optional[float] = None,
                 ratios: Optional[dict] = None, target_flops_reduction: Optional[float] = None,
                 granularity: str = "filter", scope: Optional[str] = None, rounds: int = 2, strength: float = 1e-2,
                 importance_samples: int = 10000, max_layer_rate: float = 0.95, loss_fn: Optional[Callable] = None,
                 **kw):
        super().__init__(model, input_size, ratio=ratio, ratios=ratios, target_flops_reduction=target_flops_reduction,
                         scope=scope, granularity=granularity, epochs=epochs, **kw)
        if val_data is None:
            raise ValueError("OrthoReg needs val_data: batches (x, y) for the importance (never the test set)")
        check.number("OrthoReg", "epochs", epochs, low=1, integer=True)
        check.number("OrthoReg", "rounds", rounds, low=1, high=epochs, integer=True)
        check.number("OrthoReg", "strength", strength, low=0.0)
        check.number("OrthoReg", "importance_samples", importance_samples, low=1, integer=True)
        check.number("OrthoReg", "max_layer_rate", max_layer_rate, low=0.0, high=1.0, low_open=True, high_open=True)
        self.val_data = val_data
        self.rounds, self.strength = int(rounds), float(strength)
        self.importance_samples, self.max_layer_rate = int(importance_samples), float(max_layer_rate)
        self.loss_fn = loss_fn or F.cross_entropy
        self.schedule = round_epochs(int(epochs), self.rounds)
        self.rounds_done = 0

    @property
    def regularising(self) -> bool:
        """Whether the penalty is on (rounds remain)."""
        return self.rounds_done < self.rounds

    # ------------------------------------------------------------------------- penalty
    def _rows(self, name: str) -> Tensor:
        """The kept filters of a conv as rows ``[k, C kh kw (+1 for the bias)]``."""
        conv = self.convs[name]
        kept = self._masks[name].reshape(conv.out_channels, -1).any(1).to(conv.weight.device)
        rows = self.weight(name)[kept].flatten(1)
        if conv.bias is not None:
            rows = torch.cat([rows, conv.bias[kept, None]], 1)
        return rows

    def orthogonality(self) -> dict[str, float]:
        """Per layer, ``||diag(G)|| / ||G||`` of the kept filters' Gram matrix (1 for orthogonal filters;
        the public code's diagnostic)."""
        out = {}
        with torch.no_grad():
            for name in self.convs:
                rows = self._rows(name).double()
                gram = rows @ rows.T if rows.shape[0] <= rows.shape[1] else rows.T @ rows
                norm = float(gram.norm())
                out[name] = float(gram.diagonal().norm()) / norm if norm else 1.0
        return out

    def penalty(self) -> Tensor | float:
        """``strength * sum_l w_l ||G_l - I||_1`` while rounds remain, 0 after the last one."""
        if not self.regularising or self.strength == 0.0:
            return 0.0
        terms, weights = [], []
        for name in self.convs:
            rows = self._rows(name)
            k, fan = rows.shape
            gram = rows @ rows.T if k <= fan else rows.T @ rows
            eye = torch.eye(gram.shape[0], device=gram.device, dtype=gram.dtype)
            terms.append((gram - eye).abs().sum())
            weights.append(math.sqrt(min(k, fan)))
        total = sum(weights)
        return self.strength * sum(t * (w / total) for t, w in zip(terms, weights))

    # ---------------------------------------------------------------------- importance
    def mean_gradients(self) -> dict[str, tuple[Tensor, Optional[Tensor]]]:
        """Per conv, the loss gradient w.r.t. its weight (and bias) averaged over ``importance_samples``
        samples of ``val_data``, in eval mode (the model's mode is restored)."""
        params = {n: [c.weight] + ([c.bias] if c.bias is not None else []) for n, c in self.convs.items()}
        flat = [p for ps in params.values() for p in ps]
        sums = [torch.zeros_like(p, dtype=torch.float64) for p in flat]
        device = next(self.model.parameters()).device
        seen = 0
        restore = set_eval(self.model)
        try:
            for x, y in self.val_data:
                x, y = x.to(device), y.to(device)
                n = x.shape[0]
                grads = torch.autograd.grad(self.loss_fn(self.model(x), y), flat, allow_unused=True)
                for s, g in zip(sums, grads):
                    if g is not None:
                        s.add_(g.double(), alpha=n)
                seen += n
                if seen >= self.importance_samples:
                    break
        finally:
            restore()
        if seen == 0:
            raise ValueError("OrthoReg: val_data yielded no batch")
        out, i = {}, 0
        for name, ps in params.items():
            grads = [s / seen for s in sums[i:i + len(ps)]]
            i += len(ps)
            out[name] = (grads[0], grads[1] if len(grads) > 1 else None)
        return out

    def scores(self) -> dict[str, Tensor]:
        """The Fisher importance of every unit: ``[out]`` (filters) or ``[out, kh, kw]`` (stripes)."""
        out = {}
        for name, (gw, gb) in self.mean_gradients().items():
            conv = self.convs[name]
            change = conv.weight.detach().double() * gw
            if self.granularity == "filter":
                s = change.sum((1, 2, 3))
                if gb is not None:
                    s = s + conv.bias.detach().double() * gb
            else:
                s = change.sum(1)
            out[name] = s.pow(2).float()
        return out

    # ------------------------------------------------------------------------- rounds
    def _round(self) -> None:
        """The next round: prune to ``k / rounds`` of the target (``k`` = this round); units pruned
        before stay pruned and count first."""
        k = self.rounds_done + 1
        scores = {}
        for name, s in self.scores().items():
            units = self._units(self._frozen[name])
            s = s.masked_fill(~units, -1.0)
            flat = s.flatten()
            keep = max(1, int(math.ceil((1.0 - self.max_layer_rate) * flat.numel() - 1e-9)))
            flat = flat.clone()
            flat[flat.topk(keep).indices] = math.inf  # the cap: these survive any target
            scores[name] = flat.view_as(s)
        share = k / self.rounds
        if self.ratios is not None:
            target = {"ratios": {n: r * share for n, r in self.ratios.items()}}
        elif self.ratio is not None:
            target = {"ratio": self.ratio * share}
        else:
            target = {"target_flops_reduction": self.target_flops_reduction * share}
        self.hold(self.select(scores, base_masks=self._frozen, **target))
        self.rounds_done = k


    def end_epoch(self, epoch: int) -> None:
        super().end_epoch(epoch)
        while self.regularising and self.schedule[self.rounds_done] <= self.epoch:
            self._round()

    def prune(self, data=None) -> dict:
        """Run the remaining rounds now (``data`` is not used: the importance reads ``val_data``)."""
        while self.regularising:
            self._round()
        return self.masks()

    def _extra_state(self) -> dict:
        return {"rounds_done": self.rounds_done}

    def _load_extra_state(self, extra: dict) -> None:
        self.rounds_done = int(extra.get("rounds_done", 0))
