"""ACP (Chang, Lu, Xue, Xu, Wei, arXiv 2101.06407; Applied Intelligence 2022, "Automatic Channel
Pruning via Clustering and Swarm Intelligence Optimization for CNN").

Channel counts are searched, channels are then chosen by L1 norm:

1. **Clustering.** Each channel is described by its output feature map averaged over
   ``cluster_images`` training images (flattened ``H x W``). DBSCAN with the cosine distance
   (``eps`` 0.007, ``min_samples`` 5) groups channels with near-identical maps; a layer keeps as
   many channels as it has clusters plus noise points (channels in no cluster). This is the
   preliminary structure.
2. **Population.** Particle ``i`` starts at the preliminary counts shifted by ``i * s`` per
   layer, ``s`` drawn from {-1, 0, 1}, with a velocity drawn from ``[-max_vel, max_vel]``.
3. **Particle swarm search.** A candidate's fitness is its validation accuracy after
   ``fitness_epochs`` of training from the pretrained weights, with the ``count`` channels of
   highest filter L1 norm kept in each layer (``select="l1"``; ``"random"`` draws them). For
   ``cycles`` cycles, every particle moves ``dims_per_move`` randomly chosen layers by ``r``
   times its velocity, and the velocity of those layers becomes ``chi * (w v + c1 R (pbest - x)
   + c2 R (gbest - x))`` clipped to ``[-max_vel, max_vel]``, with the inertia ``w`` falling from
   0.6 to 0.4 over the cycles and one random ``R`` per move.
4. **Result.** The best candidate's structure, with the weights it reached in its fitness
   training; the pruned model is then fine-tuned.

The defaults are the public code's (JingfeiChang/ACP-Automatic-Channel-Pruning,
``particle_cifar.py``): 200 images, 10 particles, 8 cycles, 8 layers moved per step, ``r = 2``,
``c1 = c2 = 2``, ``chi = 0.729``, ``max_vel`` 2 channels, 3 fitness epochs with SGD (LR 0.1,
momentum 0.9, weight decay 1e-4). Where it differs:

- **Budget.** The code has no FLOPs target: the clustering alone sets the compression and the
  swarm only maximises accuracy. With ``target_flops_reduction`` (or ``ratio``, a fraction of all
  prunable filters), every position, the preliminary structure included, is *repaired* into the
  budget: when its reduction lies outside ``[target, target + tolerance]``, all its counts are
  multiplied by the largest common factor that still meets the target. The swarm then searches
  the distribution of a fixed budget. Without a target it is the code's unconstrained search.
- **Generic graphs.** A layer is a channel group of the dependency graph, as in
  :class:`~stripeconv.pruning.MetaPruning`: channels tied by a residual addition are clustered
  and counted together, each described by the maps of all the convs that produce it
  (concatenated). The code prunes only block interiors of ResNets.
- **Fixes.** The code moves layers drawn with repetition from all but the last layer and then
  updates the velocity of the first ``dims_per_move`` layers; here the moved layers are drawn
  without repetition from all layers, and theirs are the velocities updated. Its images come from
  the test set; here from ``data`` (training batches). Its fitness is test accuracy; here the
  accuracy on ``val_data``, a held-out part of the training data. A position already tested is
  not trained again.

Checkpoints: :meth:`ACP.search` stops after ``max_evals`` candidate trainings; :meth:`state_dict`
holds the counts, the swarm, the best candidate's weights, the data position and the random state,
so a fresh pruner that loads it and calls :meth:`prune` ends with the same masks and weights.
"""
from __future__ import annotations

import copy
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._modes import set_eval
from .._plain import plain_copy
from . import _checks as check
from . import criteria as C
from ._search import BatchCursor, ChannelUnit, Progress, channel_units, note
from .base import Pruner, copy_matching
from ._shrink import shrink

__all__ = ["ACP", "dbscan_count"]


def dbscan_count(points: Tensor, eps: float, min_samples: int) -> int:
    """Number of clusters plus number of noise points that DBSCAN finds among the rows of ``points``
    with the cosine distance (``1 - cos``; a zero row is at distance 1 from every other row).

    A row is a core point when at least ``min_samples`` rows (itself included) lie within ``eps``;
    clusters are the connected groups of core points; noise points are rows within ``eps`` of no
    core point. The count does not depend on the order of the rows.
    """
    x = points.detach().double().flatten(1)
    n = x.shape[0]
    if n == 0:
        return 0
    norm = x.norm(dim=1, keepdim=True)
    unit = torch.where(norm > 0, x / norm.clamp_min(1e-300), torch.zeros_like(x))
    dist = (1.0 - unit @ unit.T).clamp_(0.0, 2.0)
    dist.fill_diagonal_(0.0)
    near = dist <= eps
    core = near.sum(1) >= min_samples
    linked = near & core[:, None] & core[None, :]
    visited = ~core
    clusters = 0
    for start in range(n):  # breadth-first over the core points, one component at a time
        if visited[start]:
            continue
        clusters += 1
        frontier = torch.zeros(n, dtype=torch.bool)
        frontier[start] = True
        visited[start] = True
        while bool(frontier.any()):
            frontier = linked[frontier].any(0) & ~visited
            visited |= frontier
    noise = int((~core & ~(near & core[None, :]).any(1)).sum())
    return clusters + noise


class ACP(Pruner):
    """ACP (Chang et al. 2021): channel counts from clustering similar feature maps, refined by a
    particle swarm search that maximises the validation accuracy of briefly trained candidates.

    Arguments:

    - target (optional): ``target_flops_reduction`` or ``ratio`` (fraction of all prunable
      filters); every candidate is repaired into ``[target, target + tolerance]`` (``tolerance``
      0.03). Without one, the clustering alone sets the budget, as in the public code.
    - ``val_data``: re-iterable batches ``(x, y)`` of a **held-out split of the training data**
      (never the test set): the candidates' fitness.
    - clustering: ``cluster_images`` (200), ``eps`` (0.007, cosine distance), ``min_samples`` (5).
    - swarm: ``particles`` (10), ``cycles`` (8), ``dims_per_move`` (8), ``max_vel`` (2.0 channels),
      ``step`` (the code's ``r``, 2.0), ``c1`` / ``c2`` (2.0), ``chi`` (0.729).
    - fitness: ``fitness_epochs`` (3 passes over ``data``) or ``fitness_steps`` (batches, overrides),
      ``lr`` (0.1), ``momentum`` (0.9), ``weight_decay`` (1e-4), ``eval_batches`` (None: all of
      ``val_data``); ``select``: ``"l1"`` (highest filter L1 norms) or ``"random"`` channels kept;
      ``shrink_candidates`` (True): train each candidate as the smaller network without its pruned
      channels (:func:`~stripeconv.pruning.shrink`), which computes what the full-size
      network with masked weights computes (False) at the smaller network's cost.
    - ``seed`` (swarm, channel draws, candidate training), ``verbose`` (progress), and the common
      arguments of :class:`~stripeconv.pruning.Pruner`. Only filters are pruned.

    After :meth:`prune`: ``cluster_counts`` (unit name -> channels after clustering), ``best``
    (unit name -> channels kept), ``best_accuracy`` (its validation accuracy before fine-tuning),
    ``tested`` (position -> accuracy).
    """

    granularities = ("filter",)
    oneshot = True

    def __init__(self, model: nn.Module, input_size=None, *, val_data, target_flops_reduction: Optional[float] = None,
                 ratio: Optional[float] = None, cluster_images: int = 200, eps: float = 0.007, min_samples: int = 5,
                 particles: int = 10, cycles: int = 8, dims_per_move: int = 8, max_vel: float = 2.0,
                 step: float = 2.0, c1: float = 2.0, c2: float = 2.0, chi: float = 0.729, tolerance: float = 0.03,
                 fitness_epochs: int = 3, fitness_steps: Optional[int] = None, lr: float = 0.1,
                 momentum: float = 0.9, weight_decay: float = 1e-4, eval_batches: Optional[int] = None,
                 select: str = "l1", shrink_candidates: bool = True, seed: int = 0, verbose: bool = False, **kw):
        owner = "ACP"
        if kw.get("ratios") is not None:
            raise ValueError("ACP searches the per-layer channel counts itself, ratios= is not accepted: give "
                             "target_flops_reduction=, ratio= (global) or no target")
        if kw.get("granularity", "filter") != "filter":
            raise ValueError("ACP prunes filters only (granularity='filter')")
        if val_data is None:
            raise ValueError("ACP needs val_data: a held-out split of the training data (never the test set)")
        super().__init__(model, input_size, ratio=ratio, target_flops_reduction=target_flops_reduction,
                         require_target=False, **kw)
        for name in ("cluster_images", "min_samples", "particles", "dims_per_move", "fitness_epochs"):
            check.number(owner, name, locals()[name], low=1, integer=True)
        for name in ("cycles", "seed"):
            check.number(owner, name, locals()[name], low=0, integer=True)
        for name in ("fitness_steps", "eval_batches"):
            check.number(owner, name, locals()[name], low=1, integer=True, optional=True)
        check.number(owner, "eps", eps, low=0.0, high=2.0)
        for name in ("max_vel", "step", "lr"):
            check.number(owner, name, locals()[name], low=0.0, low_open=True)
        for name in ("c1", "c2", "weight_decay"):
            check.number(owner, name, locals()[name], low=0.0)
        check.number(owner, "chi", chi, low=0.0, high=1.0, low_open=True)
        check.number(owner, "momentum", momentum, low=0.0, high=1.0, high_open=True)
        check.number(owner, "tolerance", tolerance, low=0.0, high=1.0)
        check.choice(owner, "select", select, ("l1", "random"))
        self.val_data = val_data
        self.cluster_images, self.eps, self.min_samples = cluster_images, eps, min_samples
        self.particles, self.cycles, self.dims_per_move, self.max_vel = particles, cycles, dims_per_move, max_vel
        self.step, self.c1, self.c2, self.chi, self.tolerance = step, c1, c2, chi, tolerance
        self.fitness_epochs, self.fitness_steps, self.lr = fitness_epochs, fitness_steps, lr
        self.momentum, self.weight_decay, self.eval_batches = momentum, weight_decay, eval_batches
        self.select, self.seed, self.verbose = select, seed, verbose
        self.shrink_candidates = bool(shrink_candidates)
        self.units: list[ChannelUnit] = channel_units(self)
        if not self.units:
            raise ValueError(f"{owner}: no prunable unit (every channel group has a producer that is not prunable)")
        self.sizes = [u.size for u in self.units]
        self.goal = target_flops_reduction if target_flops_reduction is not None else ratio
        self.rng = torch.Generator().manual_seed(seed)
        self._metric_cache: dict = {}
        self._scores: Optional[list] = None
        self.cursor: Optional[BatchCursor] = None
        self._cursor_state = None
        # progress (checkpointed)
        self.phase = "cluster"
        self.cluster_counts: dict = {}
        self.start: tuple = ()  # the preliminary structure, repaired into the budget
        self.position: list = []  # per particle: channels kept per unit
        self.velocity: list = []
        self.pbest: list = []
        self.pbest_fit: list = []
        self.gbest: tuple = ()
        self.gbest_fit = -1.0
        self._gbest_state: Optional[dict] = None
        self._gbest_roots: Optional[list] = None
        self.cycle = 0  # 0: the initial population; 1..cycles: swarm moves
        self.next_particle = 0
        self.evaluations = 0
        self.tested: dict = {}
        self.best: dict = {}
        self.best_accuracy: Optional[float] = None

    # --------------------------------------------------------------------------- clustering
    @torch.no_grad()
    def channel_features(self, data) -> list:
        """Per unit, ``[size, features]``: each channel's output map averaged over the first
        ``cluster_images`` images of ``data`` (the maps of a tied unit's convs concatenated)."""
        modules = dict(self.model.named_modules())
        sums: dict = {}
        handles = []
        for u in self.units:
            for name, _, _ in u.members:
                def hook(mod, inp, out, name=name):
                    part = out.sum(0).flatten(1).double()
                    sums[name] = part if name not in sums else sums[name] + part
                handles.append(modules[name].register_forward_hook(hook))
        device = next(self.model.parameters()).device
        restore = set_eval(self.model)
        seen = 0
        try:
            for batch in data:
                x = batch[0] if isinstance(batch, (tuple, list)) else batch
                x = x[: self.cluster_images - seen]
                self.model(x.to(device))
                seen += len(x)
                if seen >= self.cluster_images:
                    break
        finally:
            restore()
            for h in handles:
                h.remove()
        if seen == 0:
            raise ValueError("ACP: data yielded no image for the clustering")
        feats = []
        for u in self.units:
            parts = []
            for name, idx, ridx in u.members:
                mean = (sums[name] / seen).cpu()
                by_root = torch.zeros(u.size, mean.shape[1], dtype=mean.dtype)
                by_root[ridx] = mean[idx]
                parts.append(by_root)
            feats.append(torch.cat(parts, 1))
        return feats

    def cluster(self, data) -> dict:
        """Channels per unit after clustering (``cluster_counts``), and the starting structure."""
        if self.phase != "cluster":
            return self.cluster_counts
        if data is None:
            raise ValueError("ACP.prune needs data: training batches (x, y) for the clustering and the fitness "
                             "training")
        feats = self.channel_features(data)
        counts = [max(1, dbscan_count(f, self.eps, self.min_samples)) for f in feats]
        self.cluster_counts = {u.name: c for u, c in zip(self.units, counts)}
        self.start = self.repair(counts)
        self.phase = "search"
        if self.verbose:
            note("ACP", f"clustering keeps {sum(counts)} of {sum(self.sizes)} channels; start "
                        f"{sum(self.start)} channels, reduction {self.metric(self.start):.3f}")
        return self.cluster_counts

    # ------------------------------------------------------------------------------- budget
    def unit_scores(self) -> list:
        """Per unit, ``[size]`` filter L1 norms of the pretrained model (summed over tied convs)."""
        if self._scores is None:
            scores = []
            for u in self.units:
                s = torch.zeros(u.size)
                for name, idx, ridx in u.members:
                    w = self.convs[name].weight.detach()
                    s.index_add_(0, ridx.cpu(), w[idx.to(w.device)].abs().sum((1, 2, 3)).double().cpu().float())
                scores.append(s)
            self._scores = scores
        return self._scores

    def masks_for(self, roots: list) -> dict:
        """Stripe masks keeping, per unit, the channels (root indices) in ``roots``."""
        masks = {n: m.clone() for n, m in self._frozen.items()}
        for u, keep in zip(self.units, roots):
            pruned = torch.ones(u.size, dtype=torch.bool)
            pruned[keep] = False
            if bool(pruned.any()):
                u.remove(masks, self.convs, pruned.nonzero().flatten())
        return masks

    def metric(self, counts) -> float:
        """FLOPs reduction (or pruned filter fraction, with ``ratio``) of keeping ``counts`` channels."""
        key = tuple(int(c) for c in counts)
        if key not in self._metric_cache:
            self._metric_cache[key] = self.target_metric(self.masks_for([torch.arange(c) for c in key]))
        return self._metric_cache[key]

    def _clip(self, counts) -> tuple:
        return tuple(min(max(1, int(c)), s) for c, s in zip(counts, self.sizes))

    def repair(self, counts) -> tuple:
        """``counts`` clipped to the unit sizes and, with a target outside ``[target, target +
        tolerance]``, multiplied by the largest common factor that meets the target."""
        counts = self._clip(counts)
        if self.goal is None:
            return counts
        if self.goal - 1e-12 <= self.metric(counts) <= self.goal + self.tolerance + 1e-12:
            return counts

        def scaled(f: float) -> tuple:
            return self._clip(round(f * c) for c in counts)
        if self.metric(scaled(0.0)) < self.goal - 1e-12:
            raise ValueError(f"ACP: the target {self.goal} cannot be reached with one channel per unit (at most "
                             f"{self.metric(scaled(0.0)):.4f})")
        lo, hi = 0.0, max(s / c for s, c in zip(self.sizes, counts)) + 1.0
        for _ in range(40):  # the reduction falls as f grows: the largest f that still meets the target
            mid = (lo + hi) / 2
            if self.metric(scaled(mid)) >= self.goal - 1e-12:
                lo = mid
            else:
                hi = mid
        out = list(scaled(lo))
        # One common factor moves in coarse steps: add single channels, to the unit furthest below
        # its share first, while the target is met, until the reduction is inside the window.
        while self.metric(out) > self.goal + self.tolerance + 1e-12:
            order = sorted((j for j in range(len(out)) if out[j] < self.sizes[j]),
                           key=lambda j: (out[j] / (hi * counts[j]), j))
            for j in order:
                trial = out[:j] + [out[j] + 1] + out[j + 1:]
                if self.metric(trial) >= self.goal - 1e-12:
                    out = trial
                    break
            else:
                break
        return tuple(out)

    # ------------------------------------------------------------------------------ fitness
    def kept_roots(self, counts) -> list:
        """Per unit, the root indices of the channels kept: the highest L1 norms, or random ones."""
        out = []
        for score, c, size in zip(self.unit_scores(), counts, self.sizes):
            if self.select == "random":
                keep = torch.randperm(size, generator=self.rng)[:c]
            else:
                keep = torch.sort(score, descending=True, stable=True).indices[:c]
            out.append(keep.sort().values)
        return out

    def _steps(self, data) -> int:
        if self.fitness_steps is not None:
            return self.fitness_steps
        try:
            per_epoch = len(data)
        except TypeError:
            raise TypeError("ACP: data must have a length (a DataLoader or a list of batches) to schedule "
                            "fitness_epochs; or give fitness_steps") from None
        if per_epoch == 0:
            raise ValueError("ACP: data yielded no batch")
        return per_epoch * self.fitness_epochs

    def train_candidate(self, roots: list, data) -> tuple:
        """A copy of the pretrained model keeping ``roots``, trained for the fitness steps with the
        pruned channels held at zero; returns ``(validation accuracy, its state_dict)``."""
        model = plain_copy(self.model)
        masks = self.masks_for(roots)

        @torch.no_grad()
        def enforce():
            for name, conv in convs.items():
                conv.weight.mul_(masks[name].to(conv.weight.device, conv.weight.dtype)[:, None])
            zero_dead_bn()

        def zero_dead_bn(grads: bool = False) -> None:
            if shrunk:  # no dead channel left to pass through a depthwise conv
                C.zero_dead_bn(convs, masks, bn_of, grads=grads)
            else:
                self.zero_dead_bn(masks, grads=grads, modules=modules)

        def bind(net: nn.Module) -> tuple:
            names = dict(net.named_modules())
            return {n: names[n] for n in self.convs}, {n: names[b] for n, b in self._bn_names.items()}, names
        shrunk = None
        convs, bn_of, modules = bind(model)
        enforce()
        if self.shrink_candidates:  # the same training on the network without its pruned channels
            full_state = model.state_dict()
            shrunk = shrink(model, masks, self.input_size)
            model, masks = shrunk.model, shrunk.masks
            convs, bn_of, modules = bind(model)
        if self.cursor is None or self.cursor.data is not data:
            self.cursor = BatchCursor(data)
            if self._cursor_state is not None:
                self.cursor.load_state(self._cursor_state)
        device = next(model.parameters()).device
        opt = torch.optim.SGD(model.parameters(), lr=self.lr, momentum=self.momentum,
                              weight_decay=self.weight_decay)
        model.train()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed * 1_000_003 + self.evaluations)
            for i in range(self._steps(data)):
                batch = self.cursor.next()
                if not (isinstance(batch, (tuple, list)) and len(batch) >= 2):
                    raise TypeError("ACP: data must yield batches (x, y)")
                loss = F.cross_entropy(model(batch[0].to(device)), batch[1].to(device))
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"ACP: candidate loss is {loss.item()} at step {i}; lower lr")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                C.mask_grads(convs, masks)
                zero_dead_bn(grads=True)
                opt.step()
                enforce()
        self._cursor_state = self.cursor.state()
        return self._accuracy(model, device), (shrunk.expand(full_state) if shrunk else model.state_dict())

    @torch.no_grad()
    def _accuracy(self, model: nn.Module, device) -> float:
        model.eval()
        correct = total = 0
        for i, batch in enumerate(self.val_data):
            if self.eval_batches is not None and i >= self.eval_batches:
                break
            pred = model(batch[0].to(device)).argmax(1)
            correct += int((pred == batch[1].to(device)).sum())
            total += len(batch[1])
        if total == 0:
            raise ValueError("ACP: val_data yielded no batch")
        return correct / total

    def fitness(self, position: tuple, data) -> float:
        """Validation accuracy of ``position`` (trained once; a tested position is looked up)."""
        if position in self.tested:
            return self.tested[position]
        roots = self.kept_roots(position)
        acc, state = self.train_candidate(roots, data)
        self.evaluations += 1
        self.tested[position] = acc
        if acc > self.gbest_fit:
            self.gbest, self.gbest_fit = position, acc
            self._gbest_state, self._gbest_roots = state, roots
        return acc

    # -------------------------------------------------------------------------------- swarm
    def _initial_particle(self, i: int) -> None:
        shift = torch.randint(-1, 2, (len(self.units),), generator=self.rng)
        pos = self.repair(c + i * int(s) for c, s in zip(self.start, shift))
        vel = ((torch.rand(len(self.units), generator=self.rng, dtype=torch.float64) * 2 - 1) * self.max_vel).tolist()
        self.position.append(pos)
        self.velocity.append(vel)

    def _move(self, i: int) -> tuple:
        """Particle ``i``'s next position; updates its velocity on the moved layers."""
        pos, vel = list(self.position[i]), self.velocity[i]
        dims = torch.randperm(len(pos), generator=self.rng)[: self.dims_per_move].tolist()
        r = float(torch.rand((), generator=self.rng, dtype=torch.float64))
        w = 0.4 + 0.2 * (self.cycles - (self.cycle - 1)) / self.cycles  # 0.6 at the first cycle, towards 0.4
        new = list(pos)
        for d in dims:
            new[d] = int(pos[d] + self.step * vel[d])
            v = w * vel[d] + self.c1 * r * (self.pbest[i][d] - pos[d]) + self.c2 * r * (self.gbest[d] - pos[d])
            vel[d] = max(-self.max_vel, min(self.max_vel, self.chi * v))
        return self.repair(new)

    def search(self, data, max_evals: Optional[int] = None) -> bool:
        """The swarm search (fitness training on ``data``, accuracy on ``val_data``), continuing where
        a checkpoint stopped; stops after ``max_evals`` new candidate trainings. Returns True when done."""
        if self.phase == "cluster":
            raise RuntimeError("ACP: cluster first (prune(data) or cluster(data))")
        if self.phase != "search":
            return True
        if data is None:
            raise ValueError("ACP.search needs data: training batches (x, y) for the fitness training")
        bar = Progress(self.particles * (self.cycles + 1), "ACP search", self.verbose,
                       initial=self.cycle * self.particles + self.next_particle)
        start = self.evaluations
        try:
            while self.cycle <= self.cycles:
                while self.next_particle < self.particles:
                    i = self.next_particle
                    if max_evals is not None and self.evaluations - start >= max_evals:
                        return False
                    if self.cycle == 0:
                        if len(self.position) == i:
                            self._initial_particle(i)
                        pos = self.position[i]
                    else:
                        pos = self._move(i)
                        self.position[i] = pos
                    fit = self.fitness(pos, data)
                    if self.cycle == 0:
                        self.pbest.append(pos)
                        self.pbest_fit.append(fit)
                    elif fit > self.pbest_fit[i]:
                        self.pbest[i], self.pbest_fit[i] = pos, fit
                    self.next_particle += 1
                    bar.update(1, best=self.gbest_fit)
                self.cycle += 1
                self.next_particle = 0
        finally:
            bar.close()
        self.phase = "chosen"
        return True

    # --------------------------------------------------------------------------------- api
    def prune(self, data=None) -> dict:
        """Cluster on ``data`` (training batches), search, prune; returns the masks."""
        if self.phase == "done":
            return self.masks()
        self.cluster(data)
        self.search(data)
        self.best = {u.name: c for u, c in zip(self.units, self.gbest)}
        self.best_accuracy = self.gbest_fit
        copy_matching(self.model, self._gbest_state)  # the weights the best candidate reached, as the code keeps them
        self.hold(self.masks_for(self._gbest_roots))
        self._gbest_state = None
        self.phase = "done"
        if self.verbose:
            note("ACP", f"best validation accuracy {self.best_accuracy:.4f} after {self.evaluations} candidates, "
                        f"reduction {self.metric(self.gbest):.3f}")
        return self.masks()

    def report(self, exported=None) -> dict:
        rep = super().report(exported)
        rep.update({"channels_kept": dict(self.best), "cluster_counts": dict(self.cluster_counts),
                    "best_accuracy": self.best_accuracy, "evaluations": self.evaluations})
        return rep

    # --------------------------------------------------------------------------- checkpoint
    def _extra_state(self) -> dict:
        state = {key: copy.deepcopy(getattr(self, key)) for key in _STATE}
        state["rng"] = self.rng.get_state()
        state["cursor"] = self.cursor.state() if self.cursor is not None else self._cursor_state
        state["gbest_state"] = copy.deepcopy(self._gbest_state)
        state["gbest_roots"] = copy.deepcopy(self._gbest_roots)
        return state

    def _load_extra_state(self, extra: dict) -> None:
        if not extra:
            return
        for key in _STATE:
            setattr(self, key, copy.deepcopy(extra[key]))
        self.start, self.gbest = tuple(self.start), tuple(self.gbest)
        self.position = [tuple(p) for p in self.position]
        self.pbest = [tuple(p) for p in self.pbest]
        self.tested = {tuple(k): float(v) for k, v in self.tested.items()}
        self.rng.set_state(extra["rng"])
        self._cursor_state, self.cursor = extra["cursor"], None
        self._gbest_state, self._gbest_roots = extra["gbest_state"], extra["gbest_roots"]


_STATE = ("phase", "cluster_counts", "start", "position", "velocity", "pbest", "pbest_fit", "gbest", "gbest_fit",
          "cycle", "next_particle", "evaluations", "tested", "best", "best_accuracy")
