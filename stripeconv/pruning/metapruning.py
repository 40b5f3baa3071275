"""MetaPruning (Liu, Mu, Zhang, Guo, Yang, Cheng, Sun, ICCV 2019, arXiv 1903.10258, "MetaPruning:
Meta Learning for Automatic Neural Network Channel Pruning").

Channel counts are searched, not channels ranked:

1. **PruningNet.** For every conv that reads or writes a searched channel unit, a small network
   (``Linear(2, hidden)``, ReLU, ``Linear(hidden, weight numel)``) generates the conv's full weight
   from the *encoding* ``(in scale, out scale)``: the fractions of its input and output channels
   kept. The weight of a pruned network is the generated weight cropped to its first channels
   (here: multiplied by 0/1 channel masks, which computes the same). Every BatchNorm after a
   generated conv runs without affine parameters, as in the public code, so a cropped channel
   stays exactly 0. The PruningNet is trained from the start on the training data, with a fresh
   random encoding at each step (every unit draws one of ``scales`` uniformly); the generators
   and all remaining parameters (classifier, convs outside the search) are learned together.
2. **Evolutionary search.** Candidates are encodings (one scale index per unit) whose FLOPs
   reduction (or pruned filter fraction, with ``ratio``) lies in ``[target, target +
   tolerance]``. Each candidate is scored by its validation error with the generated weights,
   after the BatchNorm statistics are recomputed on ``recalib_batches`` training batches. A
   population of ``population`` candidates is evaluated per iteration; the best ``population``
   seen are kept; the next population is ``mutations`` mutants of the ``parents`` best (each gene
   shifted with probability ``mutation_prob``), ``crossovers`` uniform crossovers of two parents,
   and random candidates for the rest.
3. **Result.** The best candidate keeps the first ``max(1, int(size * scale))`` channels of each
   unit; the others are pruned (masks held). With ``init="scratch"`` (default) all parameters are
   re-initialised (seeded by ``seed``) and the pruned network is trained from scratch, as in the
   paper. ``init="generated"`` gives the model the PruningNet's weights for that encoding (BN
   affine 1/0 with the recomputed statistics), so it starts at the searched accuracy; these
   weights can train more slowly than fresh ones (on Fashion-MNIST, VGG at -50 % FLOPs after a
   4-epoch PruningNet: 0.679 at the start, 0.711 after one epoch, against 0.760 from scratch).

Generalisation to any graph: a *unit* is a channel group of the dependency graph (the output
channels of one conv, or of the convs a residual addition ties), as in
:class:`~stripeconv.pruning.LBS` and :class:`~stripeconv.pruning.PFP`; the public code writes
one PruningNet per architecture, with one scale per ResNet stage output (a tied unit here) and
one per block interior. Its generators read the scales of the whole block; here a conv's
generator reads its own input and output scale, as in the public MobileNet code.

The defaults are the public code's: 31 scales 0.10, 0.13, ..., 1.00, ``hidden=32``, SGD with
LR 0.1 (divided by 10 at 1/4, 1/2 and 3/4 of the steps), momentum 0.9, weight decay 1e-4;
population 50, 10 parents, 25 mutants (probability 0.1), 25 crossovers, 20 iterations, 100
recalibration batches. Random candidates are drawn around the uniform scale that meets the
target (``init_range=None``; the code draws scale indices in ``[0.4 n, 0.8 n)`` for its one
target, ``init_range=(0.4, 0.8)``). The generators hold ``hidden`` times as many parameters as the
generated convs. Their output layer starts scaled so that the generated weights have the spread of
``nn.Conv2d``'s own initialisation: with PyTorch's default ``Linear`` initialisation (the public
code's) they are several times larger, and behind BatchNorm that divides the effective learning
rate by the square of the factor (on Fashion-MNIST, 96 steps lowered the loss from 2.32 to 2.17
instead of 1.96).

Checkpoints: :meth:`MetaPruning.train_pruningnet` and :meth:`MetaPruning.search` can stop after
``max_steps`` / ``max_evals``; :meth:`state_dict` holds the PruningNet, its optimizer, the data
position, the random state and the search population and results, so a fresh pruner that loads
it and calls :meth:`prune` ends with the same masks and weights.
"""
from __future__ import annotations

import copy
import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._plain import plain_copy
from . import _checks as check
from ._search import BatchCursor, ChannelUnit, Progress, channel_units, note
from .base import Pruner, _name_of, copy_matching

__all__ = ["MetaPruning", "DEFAULT_SCALES", "WeightGenerator"]

DEFAULT_SCALES = tuple(round(0.10 + 0.03 * i, 2) for i in range(31))


class WeightGenerator(nn.Module):
    """``(in scale, out scale)`` -> the full weight (and bias) of one conv."""

    def __init__(self, weight_shape: tuple, bias: bool, hidden: int, init_scale: bool = True):
        super().__init__()
        self.weight_shape = tuple(weight_shape)
        self.n_weight = math.prod(self.weight_shape)
        self.n_bias = self.weight_shape[0] if bias else 0
        self.fc1 = nn.Linear(2, hidden)
        self.fc2 = nn.Linear(hidden, self.n_weight + self.n_bias)
        if init_scale:
            # Start at the spread of nn.Conv2d's own initialisation (std 1/sqrt(3 fan_in)). PyTorch's
            # default Linear init generates weights several times larger, which behind BatchNorm
            # divides the effective learning rate by the square of that factor.
            with torch.no_grad():
                fan_in = math.prod(self.weight_shape[1:])
                w, _ = self(torch.ones(2))
                factor = (1.0 / math.sqrt(3.0 * fan_in)) / float(w.std().clamp(min=1e-12))
                self.fc2.weight.mul_(factor)
                self.fc2.bias.mul_(factor)

    def forward(self, code: Tensor) -> tuple:
        out = self.fc2(F.relu(self.fc1(code)))
        weight = out[: self.n_weight].view(self.weight_shape)
        return weight, (out[self.n_weight:] if self.n_bias else None)


def _bn_modules(model: nn.Module) -> list:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


class MetaPruning(Pruner):
    """MetaPruning (Liu et al., ICCV 2019): a PruningNet generates the weights of any channel
    configuration; an evolutionary search picks the configuration with the best validation
    accuracy under the FLOPs target.

    Arguments:

    - target: ``target_flops_reduction`` or ``ratio`` (fraction of all prunable filters); the
      searched candidates lie in ``[target, target + tolerance]``.
    - ``val_data``: re-iterable batches ``(x, y)`` of a **held-out split of the training data**
      (never the test set): the candidates' validation error.
    - ``scales`` (31 values 0.10 ... 1.00): the channel fractions a unit may keep.
    - PruningNet: ``hidden`` (32), ``meta_epochs`` (32), ``meta_lr`` (0.1), ``meta_momentum`` (0.9),
      ``meta_weight_decay`` (1e-4), ``label_smoothing`` (0.0).
    - search: ``population`` (50), ``parents`` (10), ``mutations`` (half the population),
      ``mutation_prob`` (0.1), ``crossovers`` (half the population), ``iterations`` (20), ``tolerance`` (0.03), ``init_range`` (None: around
      the uniform scale meeting the target; or a pair of fractions of the scale list),
      ``recalib_batches`` (100), ``eval_batches`` (None: all of ``val_data``).
    - ``init``: ``"scratch"`` (re-initialised, seeded) or ``"generated"`` (the PruningNet's weights).
    - ``seed`` (encodings and search), ``verbose`` (progress), and the common arguments of
      :class:`~stripeconv.pruning.Pruner`. Only filters are pruned (``granularity="filter"``).

    After :meth:`prune`: ``best`` (the chosen encoding, unit name -> channels kept),
    ``best_error`` (its validation error before fine-tuning), ``tested`` (encoding -> error).
    """

    granularities = ("filter",)
    oneshot = True

    def __init__(self, model: nn.Module, input_size=None, *, val_data, target_flops_reduction: Optional[float] = None,
                 ratio: Optional[float] = None, scales: tuple = DEFAULT_SCALES, hidden: int = 32,
                 meta_epochs: int = 32, meta_lr: float = 0.1, meta_momentum: float = 0.9,
                 meta_weight_decay: float = 1e-4, label_smoothing: float = 0.0, population: int = 50,
                 parents: int = 10, mutations: Optional[int] = None, mutation_prob: float = 0.1,
                 crossovers: Optional[int] = None,
                 iterations: int = 20, tolerance: float = 0.03, init_range: Optional[tuple] = None,
                 recalib_batches: int = 100, eval_batches: Optional[int] = None, init: str = "scratch",
                 seed: int = 0, verbose: bool = False, **kw):
        if kw.get("ratios") is not None:
            raise ValueError("MetaPruning searches the per-layer channel counts itself, ratios= is not accepted: give "
                             "target_flops_reduction= or ratio= (global)")
        if kw.get("granularity", "filter") != "filter":
            raise ValueError("MetaPruning prunes filters only (granularity='filter')")
        if val_data is None:
            raise ValueError("MetaPruning needs val_data: a held-out split of the training data (never the test set)")
        super().__init__(model, input_size, ratio=ratio, target_flops_reduction=target_flops_reduction, **kw)
        owner = "MetaPruning"
        if not (isinstance(scales, (tuple, list)) and len(scales) >= 2):
            raise TypeError(f"{owner}: scales must be a list of at least two channel fractions in (0, 1], "
                            f"got {scales!r}")
        for s in scales:
            check.number(owner, "scales", s, low=0.0, high=1.0, low_open=True)
        if list(scales) != sorted(set(scales)):
            raise ValueError(f"{owner}: scales must be strictly increasing, got {scales!r}")
        for name in ("hidden", "meta_epochs", "population", "iterations", "recalib_batches"):
            check.number(owner, name, locals()[name], low=1, integer=True)
        for name in ("parents", "seed"):
            check.number(owner, name, locals()[name], low=0, integer=True)
        mutations = population // 2 if mutations is None else mutations
        crossovers = population // 2 if crossovers is None else crossovers
        check.number(owner, "mutations", mutations, low=0, integer=True)
        check.number(owner, "crossovers", crossovers, low=0, integer=True)
        if mutations + crossovers > population:
            raise ValueError(f"{owner}: mutations + crossovers must be at most population ({population}), "
                             f"got {mutations} + {crossovers}")
        check.number(owner, "eval_batches", eval_batches, low=1, integer=True, optional=True)
        check.number(owner, "meta_lr", meta_lr, low=0.0, low_open=True)
        check.number(owner, "meta_momentum", meta_momentum, low=0.0, high=1.0, high_open=True)
        check.number(owner, "meta_weight_decay", meta_weight_decay, low=0.0)
        check.number(owner, "label_smoothing", label_smoothing, low=0.0, high=1.0, high_open=True)
        check.number(owner, "mutation_prob", mutation_prob, low=0.0, high=1.0)
        check.number(owner, "tolerance", tolerance, low=0.0, high=1.0, low_open=True)
        check.choice(owner, "init", init, ("generated", "scratch"))
        if parents < 2 and crossovers:
            raise ValueError(f"{owner}: crossovers need at least 2 parents, got parents={parents}")
        if parents < 1 and mutations:
            raise ValueError(f"{owner}: mutations need at least 1 parent, got parents={parents}")
        if init_range is not None:
            if not (isinstance(init_range, (tuple, list)) and len(init_range) == 2):
                raise TypeError(f"{owner}: init_range must be None or a pair (low, high) of fractions, "
                                f"got {init_range!r}")
            for v in init_range:
                check.number(owner, "init_range", v, low=0.0, high=1.0)
            if not init_range[0] < init_range[1]:
                raise ValueError(f"{owner}: init_range must have low < high, got {init_range!r}")
        self.val_data = val_data
        self.scales = tuple(float(s) for s in scales)
        self.hidden, self.meta_epochs, self.meta_lr = hidden, meta_epochs, meta_lr
        self.meta_momentum, self.meta_weight_decay, self.label_smoothing = meta_momentum, meta_weight_decay, \
            label_smoothing
        self.population, self.parents, self.mutations, self.crossovers = population, parents, mutations, crossovers
        self.mutation_prob, self.iterations, self.tolerance = mutation_prob, iterations, tolerance
        self.init_range = None if init_range is None else tuple(init_range)
        self.recalib_batches, self.eval_batches, self.init = recalib_batches, eval_batches, init
        self.seed, self.verbose = seed, verbose
        self.units: list[ChannelUnit] = channel_units(self)
        if not self.units:
            raise ValueError(f"{owner}: no prunable unit (every channel group has a producer that is not prunable)")
        self.goal = target_flops_reduction if target_flops_reduction is not None else ratio
        self._build_pruningnet()
        self.rng = torch.Generator().manual_seed(seed)
        # progress (checkpointed)
        self.phase = "train"
        self.meta_steps = 0
        self.cursor: Optional[BatchCursor] = None
        self._cursor_state = None
        self.generation: list = []  # encodings of the current population, evaluated in order
        self.iteration = 0
        self.tested: dict = {}  # encoding -> validation error
        self.top: list = []  # best encodings seen, best first
        self._metric_cache: dict = {}
        self.best: dict = {}
        self.best_error: Optional[float] = None

    # ---------------------------------------------------------------------------- PruningNet
    def _build_pruningnet(self) -> None:
        """The PruningNet: a copy of the model whose generated convs take their weights from
        :class:`WeightGenerator` s, and whose BNs after those convs have no affine parameters."""
        device = next(self.model.parameters()).device
        self.meta = plain_copy(self.model).to(device)
        modules = dict(self.meta.named_modules())
        self._in_units = {}  # conv -> [(unit index, in idx, root idx)]
        self._out_units = {}  # conv -> [(unit index, out idx, root idx)]
        for ui, u in enumerate(self.units):
            for name, idx, ridx in u.members:
                self._out_units.setdefault(name, []).append((ui, idx, ridx))
            for name, idx, ridx in self.graph.groups[u.group].consumers:
                if isinstance(modules.get(name), nn.Conv2d):
                    self._in_units.setdefault(name, []).append((ui, idx, ridx))
        generated = [n for n, m in self.meta.named_modules()
                     if isinstance(m, nn.Conv2d) and m.groups == 1 and (n in self._in_units or n in self._out_units)]
        self.generators = nn.ModuleDict({
            n.replace(".", "/"): WeightGenerator(tuple(modules[n].weight.shape), modules[n].bias is not None,
                                                 self.hidden) for n in generated}).to(device)
        self.generated = generated
        self._meta_convs = {n: modules[n] for n in generated}
        bn_names = {}
        for name in generated:
            bn = self._bn_of.get(name)  # the BN that normalises the conv's output
            if bn is not None:
                bn_names[name] = _name_of(self.model, bn)
        self._bn_names = bn_names
        with torch.no_grad():
            for name in generated:
                conv = modules[name]
                conv.weight.requires_grad_(False)
                if conv.bias is not None:
                    conv.bias.requires_grad_(False)
            for bn_name in bn_names.values():
                bn = modules[bn_name]
                if bn.affine:  # no affine parameters, as in the public code
                    bn.weight.fill_(1.0)
                    bn.bias.zero_()
                    bn.weight.requires_grad_(False)
                    bn.bias.requires_grad_(False)
        for bn in _bn_modules(self.meta):
            bn.momentum = None  # cumulative statistics: exact averages over the recalibration batches
        params = list(self.generators.parameters()) + [p for p in self.meta.parameters() if p.requires_grad]
        self.optimizer = torch.optim.SGD(params, lr=self.meta_lr, momentum=self.meta_momentum,
                                         weight_decay=self.meta_weight_decay)

    def keep_counts(self, encoding: tuple) -> dict:
        """Unit name -> channels kept by ``encoding`` (one scale index per unit)."""
        return {u.name: max(1, int(u.size * self.scales[i])) for u, i in zip(self.units, encoding)}

    def _channel_masks(self, encoding: tuple) -> tuple:
        """Per generated conv: 0/1 ``[out]`` and ``[in]`` masks (first channels of each unit kept)."""
        kept = list(self.keep_counts(encoding).values())
        out_masks, in_masks = {}, {}
        for name in self.generated:
            conv = self._meta_convs[name]
            om = torch.ones(conv.out_channels)
            for ui, idx, ridx in self._out_units.get(name, []):
                om[idx] = (ridx < kept[ui]).float()
            im = torch.ones(conv.in_channels)
            for ui, idx, ridx in self._in_units.get(name, []):
                im[idx] = (ridx < kept[ui]).float()
            out_masks[name], in_masks[name] = om, im
        return out_masks, in_masks

    def generated_weights(self, encoding: tuple) -> dict:
        """``{"<conv>.weight": ..., "<conv>.bias": ...}``: the PruningNet's weights of the network
        ``encoding`` describes (pruned channels zero)."""
        out_masks, in_masks = self._channel_masks(encoding)
        device = next(self.generators.parameters()).device
        out = {}
        for name in self.generated:
            om, im = out_masks[name].to(device), in_masks[name].to(device)
            code = torch.tensor([float(im.mean()), float(om.mean())], device=device)
            weight, bias = self.generators[name.replace(".", "/")](code)
            out[f"{name}.weight"] = weight * (om[:, None] * im[None, :])[:, :, None, None]
            if bias is not None:
                out[f"{name}.bias"] = bias * om
        return out

    def meta_forward(self, x: Tensor, encoding: tuple) -> Tensor:
        """The PruningNet's output for the pruned network ``encoding`` describes."""
        return torch.func.functional_call(self.meta, self.generated_weights(encoding), (x,))

    def random_encoding(self) -> tuple:
        return tuple(int(v) for v in torch.randint(len(self.scales), (len(self.units),), generator=self.rng))

    def _lr_at(self, step: int, total: int) -> float:
        drops = sum(step >= f * total for f in (0.25, 0.5, 0.75))
        return self.meta_lr * 0.1 ** drops

    def train_pruningnet(self, data, max_steps: Optional[int] = None) -> bool:
        """Train the PruningNet for ``meta_epochs`` passes over ``data`` (batches ``(x, y)``), a random
        encoding per step, continuing where a checkpoint stopped; stop after ``max_steps`` new
        steps. Returns True when training is complete."""
        if self.phase != "train":
            return True
        if data is None:
            raise ValueError("MetaPruning.prune needs data: training batches (x, y) for the PruningNet")
        try:
            per_epoch = len(data)
        except TypeError:
            raise TypeError("MetaPruning: data must have a length (a DataLoader or a list of batches) to "
                            "schedule meta_epochs") from None
        if per_epoch == 0:
            raise ValueError("MetaPruning: data yielded no batch")
        total = per_epoch * self.meta_epochs
        if self.cursor is None or self.cursor.data is not data:
            self.cursor = BatchCursor(data)
            if self._cursor_state is not None:
                self.cursor.load_state(self._cursor_state)
        device = next(self.generators.parameters()).device
        bar = Progress(total, "MetaPruning PruningNet", self.verbose, initial=self.meta_steps)
        self.meta.train()
        done = 0
        try:
            while self.meta_steps < total and (max_steps is None or done < max_steps):
                batch = self.cursor.next()
                if not (isinstance(batch, (tuple, list)) and len(batch) >= 2):
                    raise TypeError("MetaPruning: data must yield batches (x, y)")
                x, y = batch[0].to(device), batch[1].to(device)
                for group in self.optimizer.param_groups:
                    group["lr"] = self._lr_at(self.meta_steps, total)
                loss = F.cross_entropy(self.meta_forward(x, self.random_encoding()), y,
                                       label_smoothing=self.label_smoothing)
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"MetaPruning: PruningNet loss is {loss.item()} at step "
                                             f"{self.meta_steps}; lower meta_lr")
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                self.optimizer.step()
                self.meta_steps += 1
                done += 1
                bar.update(1, loss=loss.item())
        finally:
            bar.close()
            self._cursor_state = self.cursor.state()
        if self.meta_steps >= total:
            self.phase = "search"
            return True
        return False

    # ------------------------------------------------------------------------------- search
    def masks_for(self, encoding: tuple) -> dict:
        """Stripe masks keeping the first channels of each unit, as ``encoding`` says."""
        masks = {n: m.clone() for n, m in self._frozen.items()}
        for u, keep in zip(self.units, self.keep_counts(encoding).values()):
            if keep < u.size:
                u.remove(masks, self.convs, torch.arange(keep, u.size))
        return masks

    def metric(self, encoding: tuple) -> float:
        """FLOPs reduction (or pruned filter fraction, with ``ratio``) of ``encoding``."""
        key = tuple(encoding)
        if key not in self._metric_cache:
            self._metric_cache[key] = self.target_metric(self.masks_for(key))
        return self._metric_cache[key]

    def in_window(self, encoding: tuple) -> bool:
        return self.goal - 1e-12 <= self.metric(encoding) <= self.goal + self.tolerance + 1e-12

    def _init_bounds(self) -> tuple:
        n = len(self.scales)
        if self.init_range is not None:
            lo, hi = int(self.init_range[0] * n), int(self.init_range[1] * n)
            return lo, max(hi, lo + 1)
        uniform = [i for i in range(n) if self.metric((i,) * len(self.units)) >= self.goal - 1e-12]
        if not uniform:
            most = self.metric((0,) * len(self.units))
            raise ValueError(f"MetaPruning: the target {self.goal} cannot be reached with the smallest scale "
                             f"{self.scales[0]} (at most {most:.4f}); add smaller scales")
        centre, spread = max(uniform), max(1, n // 5)
        return max(0, centre - spread), min(n, centre + spread + 1)

    def _new_candidates(self, count: int, make, seen: set, tries: int) -> list:
        out = []
        for _ in range(tries):
            if len(out) >= count:
                break
            can = make()
            if can is None or can in seen or not self.in_window(can):
                continue
            seen.add(can)
            out.append(can)
        return out

    def _random_candidates(self, count: int, seen: set) -> list:
        lo, hi = self._init_bounds()

        def make():
            return tuple(int(v) for v in torch.randint(lo, hi, (len(self.units),), generator=self.rng))
        return self._new_candidates(count, make, seen, tries=200 * max(1, count))

    def _mutants(self, parents: list, seen: set) -> list:
        n = len(self.scales)

        def make():
            p = parents[int(torch.randint(len(parents), (1,), generator=self.rng))]
            hit = torch.rand(len(p), generator=self.rng) < self.mutation_prob
            shift = torch.randint(1, n, (len(p),), generator=self.rng)
            return tuple(int((g + int(s)) % n) if h else g for g, s, h in zip(p, shift, hit))
        return self._new_candidates(self.mutations, make, seen, tries=10 * max(1, self.mutations))

    def _crossovers(self, parents: list, seen: set) -> list:
        def make():
            i, j = torch.randperm(len(parents), generator=self.rng)[:2].tolist()
            pick = torch.randint(2, (len(parents[i]),), generator=self.rng)
            return tuple(a if int(c) else b for a, b, c in zip(parents[i], parents[j], pick))
        return self._new_candidates(self.crossovers, make, seen, tries=10 * max(1, self.crossovers))

    def _next_generation(self) -> list:
        seen = set(self.tested)
        parents = self.top[: self.parents]
        out = self._mutants(parents, seen) if self.mutations and parents else []
        if self.crossovers and len(parents) >= 2:
            out += self._crossovers(parents, seen)
        out += self._random_candidates(self.population - len(out), seen)
        return out

    @torch.no_grad()
    def recalibrate(self, encoding: tuple, data) -> dict:
        """Recompute every BatchNorm's statistics of the PruningNet for ``encoding`` on the first
        ``recalib_batches`` batches of ``data``; returns the generated weights of ``encoding``."""
        for bn in _bn_modules(self.meta):
            bn.reset_running_stats()
        device = next(self.generators.parameters()).device
        weights = self.generated_weights(encoding)
        self.meta.train()
        for i, batch in enumerate(data):
            if i >= self.recalib_batches:
                break
            x = batch[0] if isinstance(batch, (tuple, list)) else batch
            torch.func.functional_call(self.meta, weights, (x.to(device),))
        return weights

    @torch.no_grad()
    def evaluate_encoding(self, encoding: tuple, data) -> float:
        """Validation error of the pruned network ``encoding`` describes, with the generated weights
        and BN statistics recomputed on ``data``."""
        weights = self.recalibrate(encoding, data)
        device = next(self.generators.parameters()).device
        self.meta.eval()
        correct = total = 0
        for i, batch in enumerate(self.val_data):
            if self.eval_batches is not None and i >= self.eval_batches:
                break
            x, y = batch[0].to(device), batch[1].to(device)
            pred = torch.func.functional_call(self.meta, weights, (x,)).argmax(1)
            correct += int((pred == y).sum())
            total += len(y)
        if total == 0:
            raise ValueError("MetaPruning: val_data yielded no batch")
        return 1.0 - correct / total

    def search(self, data, max_evals: Optional[int] = None) -> bool:
        """Run the evolutionary search (BN statistics from ``data``, errors on ``val_data``),
        continuing where a checkpoint stopped; stop after ``max_evals`` new evaluations.
        Returns True when the search is complete."""
        if self.phase == "train":
            raise RuntimeError("MetaPruning: train the PruningNet first (prune(data) or train_pruningnet(data))")
        if self.phase != "search":
            return True
        if not self.generation and self.iteration == 0 and not self.tested:
            self.generation = self._random_candidates(self.population, set())
            if not self.generation:
                raise ValueError(f"MetaPruning: no random candidate has a reduction in [{self.goal}, "
                                 f"{self.goal + self.tolerance}]; raise tolerance or change init_range/scales")
        bar = Progress(self.iterations * self.population, "MetaPruning search", self.verbose,
                       initial=self.iteration * self.population + sum(c in self.tested for c in self.generation))
        done = 0
        try:
            while self.iteration < self.iterations:
                for can in self.generation:
                    if can in self.tested:
                        continue
                    if max_evals is not None and done >= max_evals:
                        return False
                    self.tested[can] = self.evaluate_encoding(can, data)
                    done += 1
                    bar.update(1, best=min(self.tested.values()))
                self.top = sorted(set(self.top) | set(self.generation), key=lambda c: (self.tested[c], c))
                self.top = self.top[: self.population]
                self.iteration += 1
                self.generation = self._next_generation() if self.iteration < self.iterations else []
        finally:
            bar.close()
        self.phase = "chosen"
        return True

    # --------------------------------------------------------------------------------- api
    def prune(self, data=None) -> dict:
        """Train the PruningNet on ``data`` (training batches), search, prune; returns the masks."""
        if self.phase == "done":
            return self.masks()
        self.train_pruningnet(data)
        self.search(data)
        best = self.top[0]
        self.best, self.best_error = self.keep_counts(best), self.tested[best]
        self._set_weights(best, data)
        self.hold(self.masks_for(best))
        self.phase = "done"
        if self.verbose:
            note("MetaPruning", f"best validation error {self.best_error:.4f} after {len(self.tested)} "
                                f"evaluations, reduction {self.metric(best):.3f}")
        return self.masks()

    @torch.no_grad()
    def _set_weights(self, encoding: tuple, data) -> None:
        if self.init == "scratch":
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.seed)
                for m in self.model.modules():
                    if m is not self.model and hasattr(m, "reset_parameters"):
                        m.reset_parameters()
            return
        weights = self.recalibrate(encoding, data)
        state = dict(self.meta.state_dict())
        state.update(weights)
        copy_matching(self.model, state)

    def report(self, exported=None) -> dict:
        rep = super().report(exported)
        rep.update({"channels_kept": dict(self.best), "best_error": self.best_error, "evaluations": len(self.tested)})
        return rep

    # --------------------------------------------------------------------------- checkpoint
    def _extra_state(self) -> dict:
        state = {"phase": self.phase, "meta_steps": self.meta_steps,
                 "cursor": self.cursor.state() if self.cursor is not None else self._cursor_state,
                 "rng": self.rng.get_state(), "generation": list(self.generation), "iteration": self.iteration,
                 "tested": dict(self.tested), "top": list(self.top), "best": dict(self.best),
                 "best_error": self.best_error}
        if self.phase != "done":  # once pruned, the PruningNet (hidden x the conv weights, twice) is not needed
            state.update(meta=copy.deepcopy(self.meta.state_dict()),
                         generators=copy.deepcopy(self.generators.state_dict()),
                         optimizer=copy.deepcopy(self.optimizer.state_dict()))
        return state

    def _load_extra_state(self, extra: dict) -> None:
        if not extra:
            return
        self.phase, self.meta_steps = extra["phase"], int(extra["meta_steps"])
        self._cursor_state, self.cursor = extra["cursor"], None
        if "meta" in extra:
            self.meta.load_state_dict(extra["meta"])
            self.generators.load_state_dict(extra["generators"])
            self.optimizer.load_state_dict(extra["optimizer"])
        self.rng.set_state(extra["rng"])
        self.generation = [tuple(c) for c in extra["generation"]]
        self.iteration = int(extra["iteration"])
        self.tested = {tuple(k): float(v) for k, v in extra["tested"].items()}
        self.top = [tuple(c) for c in extra["top"]]
        self.best, self.best_error = dict(extra["best"]), extra["best_error"]

