"""Growing regularization: GReg-1 and GReg-2 (Wang, Qin, Zhang, Fu, ICLR 2021, "Neural Pruning
via Growing Regularization"; public code: github.com/MingSun-Tse/Regularization-Pruning).

Both methods add an L2 penalty with a *per-unit* factor ``lambda`` as a gradient term
(``grad += lambda * w`` after ``backward()``, before ``optimizer.step()``) and raise the factors
step by step while the network trains:

- **GReg-1** picks the units to prune up front by L1 (mean ``|w|`` of each filter or stripe, the
  lowest ``ratio`` of each layer, or to a global / FLOPs target) and raises *their* factor by
  ``delta`` every ``interval`` iterations until it exceeds ``ceiling`` (or every layer's
  kept/pruned magnitude ratio reaches ``mag_ratio_limit``), pushing them to zero.
- **GReg-2** first raises the factor of *all* units uniformly by ``pick_delta`` every ``interval``
  iterations up to ``pick_ceiling``: units on flat directions of the loss shrink faster, so the
  magnitudes separate according to curvature (the paper's Hessian argument); the units are then
  picked by L1, the pruned ones' factor keeps growing by ``delta`` and the kept ones get the small
  negative factor ``recover``, until the magnitude ratio exceeds ``mag_ratio_limit`` or the factor
  exceeds ``ceiling``.

Then, in both, the factors are held for ``stabilize_steps`` iterations (stabilisation), the
selected units are pruned (hard masks, BN of dead filters zeroed) and the model is fine-tuned by
the same loop, the hooks keeping the masks. The phase is :attr:`GReg1.phase`
(``"pick"`` (GReg-2 only) → ``"grow"`` → ``"stabilize"`` → ``"finetune"``); :meth:`prune` ends
the regularisation early and prunes now.

Magnitude ratio (the stop test): per layer, mean score of the kept units over mean score of the
pruned units, smoothed as ``r = 0.9 r + 0.1 r_now`` at each update (as in the public code).
"""
from __future__ import annotations

import math
import warnings
from typing import Optional, Sequence, Union

import torch
from torch import Tensor, nn

from . import _checks as check
from . import criteria as C
from ._search import Progress, coupled_convs, mean_abs_units
from .base import Pruner

__all__ = ["GReg1", "GReg2", "UnitRegularizer", "stage_ratios"]


def stage_ratios(model: nn.Module, input_size: Union[Sequence[int], Tensor], stages: dict[str, float],
                 skip_coupled: bool = True) -> dict[str, float]:
    """Per-layer ``ratios`` from per-stage ones, as the paper's ResNet settings give them.

    ``stages`` maps a module-name prefix (e.g. ``"layer1."``) to a pruning ratio; every conv whose
    name starts with it gets that ratio, except (``skip_coupled``) convs whose outputs are tied by a
    residual addition (the public code prunes only the inner convs of residual blocks). Example,
    the paper's ResNet-56 / CIFAR-10 2.55x setting::

        ratios = stage_ratios(model, (1, 3, 32, 32), {"layer1.": 0.75, "layer2.": 0.75, "layer3.": 0.32})
        pruner = GReg1(model, (1, 3, 32, 32), ratios=ratios)
    """
    from .graph import ChannelGraph

    convs = C.prunable_convs(model, warn=False)
    coupled = coupled_convs(ChannelGraph(model, input_size)) if skip_coupled else set()
    out = {}
    for name in convs:
        if name in coupled:
            continue
        for prefix, r in stages.items():
            if name.startswith(prefix) and r > 0:
                out[name] = float(r)
    return out


class UnitRegularizer(Pruner):
    """Pruners that push units (filters or stripes) to zero with per-unit L2 factors: units are
    scored by mean ``|w|``, as the growing-regularization family's public code scores them."""

    def scores(self) -> dict:
        """Mean ``|w|`` of each unit (filter ``[out]`` or stripe ``[out, kh, kw]``), per layer."""
        return {n: mean_abs_units(self.weight(n), self.granularity) for n in self.convs}


    lambdas: dict  # layer -> factor per filter [out] or per stripe [out, kh, kw]

    def _regularised_layers(self, skip_coupled: Optional[bool], ratios: Optional[dict]) -> None:
        """Keep the convs to regularise: coupled ones left out by default for filters (not stripes),
        and, with ``ratios``, those without a ratio."""
        if skip_coupled is None:
            skip_coupled = self.granularity == "filter"
        _ = self.graph  # traced now (tracing needs autograd, the updates run under no_grad)
        self.leave_out_layers(skip_coupled, ratios)
        if not self.convs:
            raise ValueError(f"{type(self).__name__}: no layer left to prune")

    def _regularises(self, name: str) -> bool:
        """Whether layer ``name``'s factors apply at this step (phase permitting)."""
        return True

    @torch.no_grad()
    def after_backward(self) -> None:
        """``grad += lambda * w`` per unit, before the optimizer step."""
        if self.phase != "finetune":
            for name, lam in self.lambdas.items():
                w = self.convs[name].weight
                if w.grad is not None and self._regularises(name):
                    f = lam.to(w.device, w.dtype)
                    w.grad.add_((f[:, None, None, None] if f.dim() == 1 else f[:, None]) * w)
        super().after_backward()

    def _progress_text(self) -> str:
        """Where the regularisation stands, for the cut-short warning."""
        return ""

    def end_epoch(self, epoch: int) -> None:
        """With ``epochs`` given, a regularisation still running after the last epoch is cut short."""
        super().end_epoch(epoch)
        if self.epochs is not None and epoch + 1 >= self.epochs and self.phase != "finetune":
            warnings.warn(f"{type(self).__name__}: the regularisation had not finished after the last epoch "
                          f"({self._progress_text()}); pruning now", stacklevel=2)
            self.prune()


class GReg1(UnitRegularizer):
    """GReg-1 (Wang et al., ICLR 2021): L1-selected units, their L2 factor grown to ``ceiling``, then pruned.

    Targets (one of): ``ratio`` (per layer, as the paper, or over all units with
    ``scope="global"``), ``ratios`` (name -> ratio; see :func:`stage_ratios`) or
    ``target_flops_reduction``. ``granularity``: ``"filter"`` (the paper) or ``"stripe"``.

    Hyperparameters (defaults: the public code's CIFAR / ResNet-56 settings):

    - ``delta`` (``reg_granularity_prune`` = 1e-4): increment of the pruned units' factor per update.
    - ``interval`` (``update_reg_interval`` K_u = 10): iterations between two updates.
    - ``ceiling`` (``reg_upper_limit`` tau = 1.0): a layer stops growing once its factor exceeds it.
    - ``mag_ratio_limit`` (1000): growth also stops once every regularised layer's smoothed
      kept/pruned magnitude ratio reaches it (GReg-2: per layer).
    - ``stabilize_steps`` (``stabilize_reg_interval`` = 5000): iterations with the final factors
      held before pruning.
    - ``pick_delta`` / ``pick_ceiling`` / ``recover``: GReg-2 only (see :class:`GReg2`).
    - ``reg_steps``: fit the schedule into about this many iterations instead (sets ``delta``,
      for GReg-2 also ``pick_delta``, so the ceilings are reached within it; ``stabilize_steps``
      defaults to a tenth of it). For short runs, e.g. ``reg_steps = len(loader) * epochs // 2``.
    - ``skip_coupled`` (default: True for filters, False for stripes): leave out convs whose
      output channels are tied by residual additions (the public code prunes only the inner convs
      of residual blocks, like L1-norm pruning).
    - ``epochs``: if given, the regularisation is cut short (with a warning) and the units pruned
      at the end of that epoch count, so a fixed-length run always ends pruned.
    - ``verbose``: progress lines / tqdm bar during the regularisation.

    Deviations from the public code: units are scored by mean ``|w|`` as there, but the number
    pruned per layer is ``floor(ratio * n)`` (the package's selection; the code uses ``ceil``);
    the factor lives per stripe ``[out, kh, kw]`` (per filter it is the code's ``[N, C]`` factor
    broadcast); pruning sets hard masks and zeroes the BN of dead filters instead of building a
    smaller model (:meth:`export` does that); the learning rate is the caller's (the paper uses a
    fixed 1e-3 during regularisation).

    With delta 1e-4, K_u 10 and tau 1 the growth takes 10^5 iterations, plus 5000 of
    stabilisation, before fine-tuning (the paper trains with lr 1e-3 during this phase and fine-tunes
    with the usual schedule); shorter schedules scale ``delta`` up or ``interval`` down.
    """

    variant = 1
    granularities = ("filter", "stripe")

    def __init__(self, model: nn.Module, input_size=None, *, ratio: Optional[float] = None,
                 ratios: Optional[dict] = None, target_flops_reduction: Optional[float] = None,
                 granularity: str = "filter", scope: Optional[str] = None, skip_coupled: Optional[bool] = None,
                 delta: float = 1e-4, interval: int = 10, ceiling: float = 1.0, mag_ratio_limit: float = 1000.0,
                 stabilize_steps: Optional[int] = None, pick_delta: float = 1e-5, pick_ceiling: float = 1e-2,
                 recover: float = -1e-4, reg_steps: Optional[int] = None, verbose: bool = False, **kw):
        super().__init__(model, input_size, ratio=ratio, ratios=ratios, target_flops_reduction=target_flops_reduction,
                         scope=scope, granularity=granularity, **kw)
        owner = type(self).__name__
        for name, value in (("delta", delta), ("ceiling", ceiling), ("mag_ratio_limit", mag_ratio_limit),
                            ("pick_delta", pick_delta), ("pick_ceiling", pick_ceiling)):
            check.number(owner, name, value, low=0.0, low_open=True)
        check.number(owner, "recover", recover, high=0.0)
        check.number(owner, "interval", interval, low=1, integer=True)
        check.number(owner, "stabilize_steps", stabilize_steps, low=0, integer=True, optional=True)
        check.number(owner, "reg_steps", reg_steps, low=1, integer=True, optional=True)
        if reg_steps is not None:  # fit the schedule into a budget of iterations
            interval = max(1, min(int(interval), int(reg_steps) // 20))  # at least ~20 updates
            updates = max(2, int(reg_steps) // interval)
            if self.variant == 1:
                delta = ceiling / (updates - 1)
            else:  # the public defaults spend ~1/11 of the updates picking, ~10/11 growing
                n_pick = max(1, updates // 11)
                pick_delta = pick_ceiling / n_pick
                delta = ceiling / max(1, updates - n_pick - 1)
            if stabilize_steps is None:
                stabilize_steps = max(1, int(reg_steps) // 10)
        if stabilize_steps is None:
            stabilize_steps = 5000
        self._regularised_layers(skip_coupled, ratios)
        self.delta, self.interval, self.ceiling = float(delta), int(interval), float(ceiling)
        self.mag_ratio_limit, self.stabilize_steps = float(mag_ratio_limit), int(stabilize_steps)
        self.pick_delta, self.pick_ceiling, self.recover = float(pick_delta), float(pick_ceiling), float(recover)
        self.verbose = verbose
        dev = {n: c.weight.device for n, c in self.convs.items()}
        self.lambdas: dict[str, Tensor] = {
            n: torch.zeros(c.out_channels, *c.kernel_size, dtype=torch.float64, device=dev[n]) for n, c in self.convs.items()}
        self.hist_ratio: dict[str, float] = {}
        self.finished: dict[str, int] = {}  # layer -> step its growth stopped
        self.updates = 0
        self.stab_start: Optional[int] = None
        self.target: Optional[dict] = None  # stripe masks to apply at the end (True = kept)
        self.phase = "pick" if self.variant == 2 else "grow"
        if self.variant == 1:
            self.target = self.select(self.scores())
            for n in self.convs:
                if bool(self.target[n].all()):
                    self.finished[n] = 0
        self._progress = None

    # ----------------------------------------------------------------------------- helpers
    def _mag_ratio(self, name: str, score: Tensor, kept_units: Tensor) -> float:
        kept_units = kept_units.to(score.device)
        if bool(kept_units.all()):
            r = math.inf
            self.hist_ratio[name] = r
            return r
        pruned_mean = float(score[~kept_units].mean())
        kept_mean = float(score[kept_units].mean()) if bool(kept_units.any()) else 0.0
        r = kept_mean / pruned_mean if pruned_mean > 0 else math.inf
        old = self.hist_ratio.get(name)
        self.hist_ratio[name] = r if old is None or not math.isfinite(old) else 0.9 * old + 0.1 * r
        return r

    def magnitude_ratio(self) -> dict:
        """Smoothed kept/pruned magnitude ratio per layer (the stop test's statistic)."""
        return dict(self.hist_ratio)

    @property
    def done(self) -> bool:
        """True once the units are pruned (fine-tuning phase)."""
        return self.phase == "finetune"

    def _bar(self):
        if self._progress is None and self.verbose:
            if self.variant == 1:
                total = int(math.floor(self.ceiling / self.delta)) + 1
            else:
                total = int(math.ceil(self.pick_ceiling / self.pick_delta - 1e-9)) + int(math.floor(self.ceiling / self.delta)) + 1
            self._progress = Progress(total, f"{type(self).__name__} regularisation", True, initial=self.updates)
        return self._progress

    # ------------------------------------------------------------------------------- hooks
    def after_step(self) -> None:
        self.steps += 1
        if self.phase in ("pick", "grow") and self.steps % self.interval == 0:
            self._update()
        if self.phase == "stabilize" and self.steps - self.stab_start >= self.stabilize_steps:
            self._finish()
        self._enforce(self._frozen)

    def _progress_text(self) -> str:
        return f"phase {self.phase!r}"

    def prune(self, data=None) -> dict:
        """End the regularisation now: pick (GReg-2, if not yet), prune the selected units, fine-tune next."""
        if self.phase == "pick":
            self._pick()
        if self.phase != "finetune":
            self._finish()
        return self.masks()

    # ------------------------------------------------------------------------------ schedule
    @torch.no_grad()
    def _update(self) -> None:
        self.updates += 1
        scores = self.scores()
        if self.phase == "pick":
            self._update_pick(scores)
        else:
            self._update_grow(scores)
        bar = self._bar()
        if bar is not None:
            lam = max(float(v.max()) for v in self.lambdas.values())
            finite = [v for v in self.hist_ratio.values() if math.isfinite(v)]
            bar.update(1, phase=self.phase, lam=lam, ratio=min(finite) if finite else math.inf)

    def _update_grow(self, scores: dict) -> None:
        active = [n for n in self.convs if n not in self.finished]
        for n in active:
            self._mag_ratio(n, scores[n], self._units(self.target[n]))
            pruned = ~self.target[n]
            self.lambdas[n][pruned] += self.delta
            if self.variant == 2:
                self.lambdas[n][~pruned] = self.recover
        regularised = [n for n in self.convs if not bool(self.target[n].all())]
        all_sep = all(self.hist_ratio.get(n, 0.0) >= self.mag_ratio_limit for n in regularised)
        for n in active:
            over = float(self.lambdas[n].max()) > self.ceiling * (1 + 1e-9)  # (float sums of delta)
            sep = all_sep if self.variant == 1 else self.hist_ratio.get(n, 0.0) >= self.mag_ratio_limit
            if over or sep:
                self.finished[n] = self.steps
        if len(self.finished) == len(self.convs):
            self.phase = "stabilize"
            self.stab_start = self.steps
            if self.verbose and self._progress is not None:
                self._progress.log(f"growth finished at step {self.steps}; stabilising for {self.stabilize_steps} steps")

    def _update_pick(self, scores: dict) -> None:
        tentative = self.select(scores)  # for the magnitude ratio only (the public code logs/smooths it here too)
        for n in self.convs:
            self._mag_ratio(n, scores[n], self._units(tentative[n]))
            self.lambdas[n] += self.pick_delta
        if max(float(v.max()) for v in self.lambdas.values()) >= self.pick_ceiling * (1 - 1e-9):
            self._pick(scores)

    @torch.no_grad()
    def _pick(self, scores: Optional[dict] = None) -> None:
        scores = scores if scores is not None else self.scores()
        self.target = self.select(scores)
        for n in self.convs:
            if bool(self.target[n].all()):  # nothing pruned here: no regularisation at all
                self.lambdas[n].zero_()
                self.finished[n] = self.steps
        self.phase = "grow"
        if self.verbose:
            bar = self._bar()
            if bar is not None:
                bar.log(f"picked units at step {self.steps} (flops reduction {self.flops_reduction(self.target):.3f})")
        if len(self.finished) == len(self.convs):
            self.phase = "stabilize"
            self.stab_start = self.steps

    @torch.no_grad()
    def _finish(self) -> None:
        if self.target is None:
            self._pick()
        self._masks = {n: m.clone() for n, m in self.target.items()}
        self._frozen = {n: m.clone() for n, m in self.target.items()}
        self.phase = "finetune"
        self._enforce(self._frozen)
        if self._progress is not None:
            self._progress.log(f"pruned at step {self.steps} (flops reduction {self.flops_reduction():.3f}); fine-tuning")
            self._progress.close()

    # --------------------------------------------------------------------------- checkpoint
    def _extra_state(self) -> dict:
        return {
            "phase": self.phase,
            "lambdas": {n: v.detach().cpu().clone() for n, v in self.lambdas.items()},
            "hist_ratio": dict(self.hist_ratio),
            "finished": dict(self.finished),
            "updates": self.updates,
            "stab_start": self.stab_start,
            "target": None if self.target is None else {n: m.cpu().clone() for n, m in self.target.items()},
        }

    def _load_extra_state(self, extra: dict) -> None:
        if not extra:
            return
        self.phase = extra["phase"]
        self.lambdas = {n: extra["lambdas"][n].to(self.convs[n].weight.device, torch.float64).clone() for n in self.convs}
        self.hist_ratio = dict(extra["hist_ratio"])
        self.finished = dict(extra["finished"])
        self.updates = int(extra["updates"])
        self.stab_start = extra["stab_start"]
        t = extra["target"]
        self.target = None if t is None else {n: t[n].to(self.convs[n].weight.device).bool() for n in self.convs}


class GReg2(GReg1):
    """GReg-2 (Wang et al., ICLR 2021): uniform L2 growth on all units to separate magnitudes, then L1 picking.

    Same arguments as :class:`GReg1`, plus (defaults: the public code's ResNet-56 / CIFAR-10 file):

    - ``pick_delta`` (``reg_granularity_pick`` = 1e-5): uniform increment of every unit's factor
      per update during picking.
    - ``pick_ceiling`` (``reg_upper_limit_pick`` = 1e-2): picking ends (units chosen by L1 to the
      target) once the factor reaches it.
    - ``recover`` (``reg_granularity_recover`` = -1e-4): the factor of the kept units after picking
      (a small negative L2 factor that lets them regain magnitude).
    - ``delta`` / ``ceiling`` / ``mag_ratio_limit``: growth of the pruned units after picking; a
      layer stops when its smoothed kept/pruned magnitude ratio reaches ``mag_ratio_limit`` or its
      factor exceeds ``ceiling``.

    Units are picked for all layers at once (the uniform growth makes every layer reach
    ``pick_ceiling`` at the same update), so global and FLOPs targets select jointly.
    """

    variant = 2
