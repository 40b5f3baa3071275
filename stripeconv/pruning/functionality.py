"""Functionality-oriented filter pruning (Qin, Yu, Liu, Chen: "Functionality-Oriented Convolutional
Filter Pruning", BMVC 2019, arXiv 1810.07322, first circulated as "Interpretable Convolutional Filter
Pruning"; with the companion NeurIPS 2018 workshop paper "Demystifying Neural Network Filter
Pruning", arXiv 1811.02639).

What the papers argue: a filter is characterised by its *functionality*, the input pattern it
prefers, which they interpret by visualisation (activation maximisation: the input that drives the
filter's activation highest). Filters with near-identical preferences are repeats of one another;
a trained network holds many such repeats, and they are the real redundancy. A small-norm filter
can carry a function no other filter carries (so weight-magnitude ranking prunes the wrong
filters, and fine-tuning then mostly rebuilds what it destroyed), while a large-norm filter can be
a copy of another. Their method groups the filters of a layer by functionality similarity and
removes the repeats in each group, keeping representatives; they report up to 68.88 % fewer FLOPs
with under 0.34 % accuracy loss and little or no retraining.

The papers fix the idea (visualised functionality, clusters of repeats, one representative
kept); the similarity measure, the clustering algorithm and the tie rules below are this
implementation's choices.

Procedure as implemented (one shot, then optional fine-tuning with the usual hooks):

1. **Functionality of each filter.** ``representation="response"`` (default) describes a filter
   by what it responds to on real data: its output map (after its BatchNorm, if it has one) over
   the first ``samples`` images of ``data``, every pixel of every image one observation.
   ``representation="activation_max"`` is the papers' own tool: for every filter an input image
   is synthesised by normalised gradient ascent on the filter's mean response (``am_steps`` steps
   of size ``am_lr``, the image shrunk by ``am_decay`` after each step, all filters starting from
   the same seeded noise image of standard deviation ``am_init_std``); the filter is described by
   how its image moved away from that shared start. Activation maximisation costs ``am_steps``
   forward/backward passes per unit with one image per channel (the passes stop at the unit's
   last conv) and needs no data; the response proxy costs one forward pass over ``samples``
   images and is the default. The images use only the decay as a prior (no blur or jitter);
   both representations are taken where the filter's output leaves its BatchNorm, before any
   activation function.
2. **Similarity.** Pearson correlation of two filters' descriptions (a cosine after removing
   each one's mean): invariant to the filter's scale and offset, so a filter and a rescaled copy
   of it are identical in function whatever their norms, and a sign flip (an opposite detector)
   is not similar. With the response representation the correlations are accumulated in one
   pass (sums and cross products per conv; no response is stored). A filter whose response is
   constant has no pattern preference: it is similar (1) to other constant filters and unrelated
   (0) to the rest.
3. **Channel groups.** A unit is a channel group of the dependency graph: the filters of one
   conv, or the channels that several convs produce together when a residual addition (or a
   product, e.g. a squeeze-excitation gate) ties them. A tied channel's similarity to another
   is the mean of the correlations seen at each conv that produces both. Depthwise convs are
   never pruned themselves: they pass the channels of their producer through and lose the
   filters of the channels that producer loses.
4. **Clustering.** Agglomerative (hierarchical) clustering per unit on the distance ``1 -
   similarity``, ``linkage`` ``"average"`` (default), ``"complete"`` or ``"single"``. Each merge
   joins two groups of filters at a height (their distance); after ``m`` merges a unit has
   ``alive - m`` clusters. (ACP's DBSCAN helper only counts clusters at a fixed radius; a
   hierarchy is needed here to say which filters go at any budget. Plain torch, no sklearn.)
5. **One representative per cluster.** Every cluster keeps one filter and loses the others, so
   pruning ``m`` filters of a unit is exactly its first ``m`` merges. ``keep="medoid"`` (default)
   keeps the member most similar on average to the rest of its cluster (the one that best stands
   for the shared function; ties to the stronger, then the lower index); ``keep="strongest"``
   keeps the member that responds most strongly (standard deviation of its response on the data,
   or the activation reached by activation maximisation), ties to the medoid score.
6. **How much is pruned.** ``similarity=s``, the papers' own mode: every merge between groups at
   least ``s`` similar is made, so the redundancy found sets each layer's rate and the total.
   Or a target: with ``scope="global"`` (default) one similarity cut for the whole network,
   i.e. the lowest merges over all units first, just enough of them to reach ``ratio`` (fraction
   of all prunable filters) or ``target_flops_reduction``; with ``scope="layer"``, ``ratio`` (or
   ``ratios``, per conv name; a tied unit takes the largest ratio of its convs) prunes
   ``floor(ratio * size)`` filters of every unit (at least one stays), and
   ``target_flops_reduction`` finds one such common ratio by bisection. A target that cannot be
   reached warns and prunes as far as possible.
7. The chosen filters are pruned (masks held, BN of dead filters zeroed, as every method here);
   fine-tune with :func:`~stripeconv.pruning.fit` and this pruner if needed (the papers' claim is
   that removing repeats needs little of it). What a removed repeat fed the next layer is not
   moved onto its kept representative (no weight compensation).

Channels already pruned in the masks this pruning starts from stay pruned and take no part in the
clustering; they count towards the target. Responses and activation maximisation run in eval mode
(BN running statistics untouched).

Checkpoints: :meth:`FunctionalityPruning.score` can stop after ``max_batches`` batches;
:meth:`state_dict` holds the accumulated sums (or the activation-maximisation similarities), the
points seen and the shuffle state of a DataLoader with a seeded ``generator``, so a fresh pruner
that loads it and calls :meth:`prune` finishes with exactly the same masks.
"""
from __future__ import annotations

import functools
import math
import warnings
from typing import Optional

import torch
from torch import Tensor, nn

from .._modes import set_eval
from . import _checks as check
from ._filter_clusters import Moments, agglomerate, cluster_labels, correlation, merge_rows, representatives
from ._search import ChannelUnit, Progress, channel_units, note, sample_pass
from .base import Pruner

__all__ = ["FunctionalityPruning", "Moments", "correlation", "agglomerate", "merge_rows", "cluster_labels",
           "representatives"]

_OWNER = "FunctionalityPruning"


class _Stop(Exception):
    """Raised in a forward hook once every conv a pass needs has run."""


class FunctionalityPruning(Pruner):
    """Functionality-oriented filter pruning (Qin et al., BMVC 2019): cluster filters with repeated
    functionality and keep one representative of each cluster.

    Arguments:

    - target: ``similarity`` (prune every repeat at least this similar; the papers' mode: the
      redundancy sets the rates), or ``ratio`` / ``ratios`` / ``target_flops_reduction``
      (``scope="global"``, default: one similarity cut over the network; ``"layer"``: the same
      fraction of every unit).
    - ``representation``: ``"response"`` (default: correlation of the filters' responses on the
      first ``samples`` (256) images of the ``data`` given to :meth:`prune`) or
      ``"activation_max"`` (correlation of activation-maximisation images: ``am_steps`` (30),
      ``am_lr`` (0.5), ``am_decay`` (0.01), ``am_init_std`` (0.1), from noise seeded by ``seed``).
    - ``linkage``: ``"average"`` (default), ``"complete"`` or ``"single"``.
    - ``keep``: ``"medoid"`` (default) or ``"strongest"`` member of each cluster.
    - ``verbose`` (progress), and the common arguments of :class:`~stripeconv.pruning.Pruner`.
      Only filters are pruned (``granularity="filter"``).

    After :meth:`prune`: ``unit_keep`` (unit -> channels kept), ``unit_rates``, ``clusters``
    (unit -> lists of root channel indices, one list per cluster), ``kept`` (unit -> root indices
    kept), ``cut_similarity`` (the lowest similarity at which filters were merged), and
    :meth:`similarity` (a unit's ``[size, size]`` matrix).
    """

    granularities = ("filter",)
    default_scope = "global"
    oneshot = True

    def __init__(self, model: nn.Module, input_size=None, *, ratio: Optional[float] = None,
                 ratios: Optional[dict] = None, target_flops_reduction: Optional[float] = None,
                 similarity: Optional[float] = None, representation: str = "response", samples: int = 256,
                 linkage: str = "average", keep: str = "medoid", am_steps: int = 30, am_lr: float = 0.5,
                 am_decay: float = 0.01, am_init_std: float = 0.1, seed: int = 0, verbose: bool = False, **kw):
        if kw.get("granularity", "filter") != "filter":
            raise ValueError(f"{_OWNER} prunes filters only (granularity='filter')")
        if similarity is not None and any(v is not None for v in (ratio, ratios, target_flops_reduction)):
            raise ValueError(f"{_OWNER}: give either similarity= or a target (ratio= / ratios= / "
                             "target_flops_reduction=), not both")
        super().__init__(model, input_size, ratio=ratio, ratios=ratios, target_flops_reduction=target_flops_reduction,
                         require_target=similarity is None, **kw)
        check.number(_OWNER, "similarity", similarity, low=-1.0, high=1.0, optional=True)
        check.choice(_OWNER, "representation", representation, ("response", "activation_max"))
        check.number(_OWNER, "samples", samples, low=1, integer=True)
        check.choice(_OWNER, "linkage", linkage, ("average", "complete", "single"))
        check.choice(_OWNER, "keep", keep, ("medoid", "strongest"))
        check.number(_OWNER, "am_steps", am_steps, low=1, integer=True)
        check.number(_OWNER, "am_lr", am_lr, low=0.0, low_open=True)
        check.number(_OWNER, "am_decay", am_decay, low=0.0, high=1.0, high_open=True)
        check.number(_OWNER, "am_init_std", am_init_std, low=0.0)
        check.number(_OWNER, "seed", seed, low=0, integer=True)
        self.similarity_cut = similarity
        self.representation, self.samples, self.linkage, self.keep = representation, samples, linkage, keep
        self.am_steps, self.am_lr, self.am_decay, self.am_init_std = am_steps, am_lr, am_decay, am_init_std
        self.seed, self.verbose = int(seed), verbose
        self.units: list[ChannelUnit] = channel_units(self)
        if not self.units:
            raise ValueError(f"{_OWNER}: no prunable unit (every channel group has a producer that is not prunable)")
        self._members = [name for u in self.units for name, _, _ in u.members]
        # scoring state (checkpointed)
        self.phase = "score"
        self.points_seen = 0
        self.batches_scored = 0
        self._score_gen_state = None
        self.moments: dict = {name: Moments(self.convs[name].out_channels) for name in self._members}
        self._am: dict = {}  # unit name -> (similarity, strength), activation maximisation
        # results
        self.unit_keep: dict = {}
        self.clusters: dict = {}
        self.kept: dict = {}
        self.cut_similarity: Optional[float] = None
        self._plan = None
        self._base = None
        self._cache: dict = {}

    # ------------------------------------------------------------------------------- scoring
    def _response_module(self, name: str) -> nn.Module:
        return self._bn_of.get(name) or self.convs[name]

    def score(self, data, max_batches: Optional[int] = None) -> bool:
        """Describe every filter's functionality: accumulate the response correlations over the
        first ``samples`` points of ``data`` (batches ``(x, y)`` or ``x``), continuing where a
        checkpoint stopped and stopping after ``max_batches`` new batches; or, with
        ``representation="activation_max"``, synthesise the images (``data`` unused). Returns True
        when done."""
        if self.phase != "score":
            return True
        if self.representation == "activation_max":
            self._activation_max()
            self.phase = "cluster"
            return True
        if data is None:
            raise ValueError(f"{_OWNER}.prune needs data: training batches (x, y) whose responses describe the "
                             "filters (or representation='activation_max')")
        def accumulate(mod, inp, out, name):
            self.moments[name].update(out.transpose(0, 1).reshape(out.shape[1], -1))

        hooks = [(self._response_module(name), functools.partial(accumulate, name=name)) for name in self._members]
        if sample_pass(self, data, hooks, f"{_OWNER} responses", max_batches):
            self.phase = "cluster"
            return True
        return False

    def _activation_max(self) -> None:
        """Activation maximisation, one image per channel of each unit, all from one seeded start."""
        shape = tuple(self.input_size.shape if isinstance(self.input_size, Tensor) else self.input_size)
        p = next(self.model.parameters())
        dtype = p.dtype if p.is_floating_point() else torch.float32
        gen = torch.Generator().manual_seed(self.seed)
        start = torch.randn((1, *shape[1:]), generator=gen, dtype=torch.float64) * self.am_init_std
        start = start.to(p.device, dtype)
        restore = set_eval(self.model)
        bar = Progress(len(self.units) * self.am_steps, f"{_OWNER} activation maximisation", self.verbose)
        try:
            for u in self.units:
                if u.name in self._am:
                    bar.update(self.am_steps)
                    continue
                x = start.expand(u.size, *start.shape[1:]).clone()
                reached = torch.zeros(u.size, dtype=torch.float64)
                for _ in range(self.am_steps):
                    x.requires_grad_(True)
                    resp = self._unit_response(u, x)
                    objective = torch.diagonal(resp).sum()
                    (grad,) = torch.autograd.grad(objective, x)
                    reached = torch.diagonal(resp).detach().double().cpu()
                    norm = grad.flatten(1).norm(dim=1).clamp(min=1e-12).view(-1, *([1] * (x.dim() - 1)))
                    x = ((x.detach() + self.am_lr * grad / norm) * (1.0 - self.am_decay)).detach()
                    bar.update(1)
                corr, _ = correlation((x - start).flatten(1).double())
                self._am[u.name] = (corr, reached)
        finally:
            restore()
            bar.close()

    def _unit_response(self, u: ChannelUnit, x: Tensor) -> Tensor:
        """``[batch, size]``: each root channel's mean response (summed over the convs producing it)
        to the inputs ``x``; the forward pass stops after the unit's last conv."""
        outs: dict = {}
        handles = []
        members = {name for name, _, _ in u.members}

        def hook(mod, inp, out, name):
            # the mean now: an in-place activation may overwrite ``out`` after the hook
            outs[name] = out.flatten(2).mean(2) if out.dim() > 2 else out.clone()
            if members <= set(outs):
                raise _Stop
        for name in members:
            handles.append(self._response_module(name).register_forward_hook(
                lambda mod, inp, out, name=name: hook(mod, inp, out, name)))
        try:
            with torch.enable_grad():
                self.model(x)
        except _Stop:
            pass
        finally:
            for h in handles:
                h.remove()
        resp = torch.zeros(x.shape[0], u.size, device=x.device, dtype=x.dtype)
        for name, idx, ridx in u.members:
            resp = resp.index_add(1, ridx.to(x.device), outs[name][:, idx.to(x.device)].to(x.dtype))
        return resp

    # ---------------------------------------------------------------------------- similarity
    def similarity(self, unit) -> Tensor:
        """``[size, size]`` functionality similarity of a unit's root channels (a unit or its name)."""
        return self._unit_similarity(unit)[0]

    def _unit_similarity(self, unit) -> tuple:
        u = unit if isinstance(unit, ChannelUnit) else {v.name: v for v in self.units}[unit]
        if self.phase == "score":
            raise RuntimeError(f"{_OWNER}: describe the filters first (prune(data) or score(data))")
        key = ("sim", u.name)
        if key in self._cache:
            return self._cache[key]
        if self.representation == "activation_max":
            out = self._am[u.name]
        else:
            total = torch.zeros(u.size, u.size, dtype=torch.float64)
            count = torch.zeros(u.size, u.size, dtype=torch.float64)
            power = torch.zeros(u.size, dtype=torch.float64)
            seen = torch.zeros(u.size, dtype=torch.float64)
            for name, idx, ridx in u.members:
                corr, std = self.moments[name].correlation()
                total[ridx[:, None], ridx[None, :]] += corr[idx][:, idx]
                count[ridx[:, None], ridx[None, :]] += 1.0
                power[ridx] += std[idx]
                seen[ridx] += 1.0
            sim = torch.where(count > 0, total / count.clamp(min=1.0), torch.zeros_like(total))
            sim.fill_diagonal_(1.0)
            out = (sim, power / seen.clamp(min=1.0))
        self._cache[key] = out
        return out

    # ------------------------------------------------------------------------------ clustering
    def _ensure_plan(self) -> None:
        if self._plan is not None:
            return
        if self.phase == "score":
            raise RuntimeError(f"{_OWNER}: describe the filters first (prune(data) or score(data))")
        self._base = {n: m.clone() for n, m in self._frozen.items()}
        alive_roots = self.graph.alive_roots(self._base)
        plan = []
        bar = Progress(len(self.units), f"{_OWNER} clustering", self.verbose)
        try:
            for u in self.units:
                alive = alive_roots[u.group].nonzero().flatten()
                sim, strength = self._unit_similarity(u)
                sub = sim[alive][:, alive]
                merges = agglomerate(1.0 - sub, self.linkage) if len(alive) > 1 else []
                plan.append({"alive": alive, "merges": merges, "sim": sub, "strength": strength[alive],
                             "dead": u.size - len(alive)})
                bar.update(1)
        finally:
            bar.close()
        self._plan = plan

    def _pruned_roots(self, i: int, m: int) -> Tensor:
        """Root indices of unit ``i`` pruned after its first ``m`` merges (plus those dead at start)."""
        key = ("pruned", i, m)
        if key not in self._cache:
            p, u = self._plan[i], self.units[i]
            labels = cluster_labels(len(p["alive"]), p["merges"], m)
            kept = representatives(labels, p["sim"], p["strength"], self.keep)
            pruned = torch.ones(u.size, dtype=torch.bool)
            pruned[p["alive"][kept]] = False
            self._cache[key] = pruned.nonzero().flatten()
        return self._cache[key]

    def masks_for(self, counts: list) -> dict:
        """Stripe masks after ``counts[i]`` merges (filters pruned) in unit ``i``; channels pruned
        before stay pruned."""
        self._ensure_plan()
        masks = {n: m.clone() for n, m in self._base.items()}
        for i, (u, m) in enumerate(zip(self.units, counts)):
            pruned = self._pruned_roots(i, int(m))
            if len(pruned):
                u.remove(masks, self.convs, pruned)
        return masks

    # --------------------------------------------------------------------------------- budget
    def _max_counts(self) -> list:
        return [len(p["merges"]) for p in self._plan]

    def _global_order(self) -> list:
        """All merges of all units, lowest first: ``(height, unit, merge index)``."""
        return sorted((h, i, k) for i, p in enumerate(self._plan) for k, (h, _, _) in enumerate(p["merges"]))

    def _counts_global(self, order: list, k: int) -> list:
        counts = [0] * len(self.units)
        for _, i, _ in order[:k]:
            counts[i] += 1
        return counts

    def _counts_layer(self, r: Optional[float]) -> list:
        counts = []
        for u, p, cap in zip(self.units, self._plan, self._max_counts()):
            rate = r
            if rate is None:  # ratios: the largest ratio named for any of the unit's convs
                rate = max((self.ratios.get(name, 0.0) for name, _, _ in u.members), default=0.0)
            want = int(math.floor(rate * u.size + 1e-9)) - p["dead"]
            counts.append(max(0, min(want, cap)))
        return counts

    def _counts_threshold(self, s: float) -> list:
        return [sum(1 for h, _, _ in p["merges"] if 1.0 - h >= s - 1e-12) for p in self._plan]

    def _choose(self) -> list:
        self._ensure_plan()
        if self.similarity_cut is not None:
            return self._counts_threshold(self.similarity_cut)
        if self.ratios is not None or (self.scope == "layer" and self.ratio is not None):
            return self._counts_layer(self.ratio if self.ratios is None else None)
        goal = self.target_flops_reduction if self.target_flops_reduction is not None else self.ratio
        reaches = {}

        def metric(counts: list) -> float:
            key = tuple(counts)
            if key not in reaches:
                reaches[key] = self.target_metric(self.masks_for(counts))
            return reaches[key]
        if self.scope == "layer":  # a common per-unit ratio, found by bisection
            def at(r: float) -> list:
                return self._counts_layer(r)
            lo, hi = 0.0, 1.0
            if metric(at(hi)) < goal - 1e-12:
                return self._unreachable(goal, at(hi), metric)
            for _ in range(40):
                mid = 0.5 * (lo + hi)
                if metric(at(mid)) >= goal - 1e-12:
                    hi = mid
                else:
                    lo = mid
            return at(hi)
        order = self._global_order()
        lo, hi = 0, len(order)
        if metric(self._counts_global(order, hi)) < goal - 1e-12:
            return self._unreachable(goal, self._counts_global(order, hi), metric)
        bar = Progress(None, f"{_OWNER} budget search", self.verbose, every=5)
        try:
            while lo < hi:  # the fewest merges that reach the goal
                mid = (lo + hi) // 2
                if metric(self._counts_global(order, mid)) >= goal - 1e-12:
                    hi = mid
                else:
                    lo = mid + 1
                bar.update(1)
        finally:
            bar.close()
        return self._counts_global(order, hi)

    def _unreachable(self, goal: float, counts: list, metric) -> list:
        warnings.warn(f"{_OWNER}: the target {goal} cannot be reached (at most {metric(counts):.4f} with one filter "
                      "left per unit); pruning as much as allowed", stacklevel=4)
        return counts

    # ------------------------------------------------------------------------------------ api
    def prune(self, data=None) -> dict:
        """Describe the filters (responses on ``data``, training batches; or activation maximisation),
        cluster each unit, keep one filter per cluster to the target; returns the masks."""
        if self.phase == "done":
            return self.masks()
        self.score(data)
        counts = self._choose()
        self.hold(self.masks_for(counts))
        self._record(counts)
        self.phase = "done"
        if self.verbose:
            cut = "-" if self.cut_similarity is None else f"{self.cut_similarity:.4f}"
            note(_OWNER, f"{sum(counts)} filters pruned as repeats (lowest merge similarity {cut}), flops reduction "
                         f"{self.flops_reduction():.3f}")
        return self.masks()

    def _record(self, counts: list) -> None:
        self.unit_keep, self.clusters, self.kept = {}, {}, {}
        heights = []
        for i, (u, p, m) in enumerate(zip(self.units, self._plan, counts)):
            labels = cluster_labels(len(p["alive"]), p["merges"], m)
            alive = p["alive"]
            self.clusters[u.name] = [alive[labels == lab].tolist() for lab in torch.unique(labels).tolist()]
            pruned = self._pruned_roots(i, m)
            keep = torch.ones(u.size, dtype=torch.bool)
            keep[pruned] = False
            self.kept[u.name] = keep.nonzero().flatten().tolist()
            self.unit_keep[u.name] = len(self.kept[u.name])
            heights += [h for h, _, _ in p["merges"][:m]]
        self.cut_similarity = 1.0 - max(heights) if heights else None

    @property
    def unit_rates(self) -> dict:
        return {u.name: 1.0 - self.unit_keep[u.name] / u.size for u in self.units if u.name in self.unit_keep}

    def report(self, exported=None) -> dict:
        rep = super().report(exported)
        rep.update({"representation": self.representation, "unit_rates": self.unit_rates,
                    "cut_similarity": self.cut_similarity, "samples": self.points_seen})
        return rep

    # ----------------------------------------------------------------------------- checkpoint
    def _extra_state(self) -> dict:
        return {"phase": self.phase, "points_seen": self.points_seen, "batches_scored": self.batches_scored,
                "score_generator": self._score_gen_state,
                "moments": {k: m.state() for k, m in self.moments.items()},
                "am": {k: (s.clone(), r.clone()) for k, (s, r) in self._am.items()},
                "unit_keep": dict(self.unit_keep), "clusters": dict(self.clusters), "kept": dict(self.kept),
                "cut_similarity": self.cut_similarity}

    def _load_extra_state(self, extra: dict) -> None:
        if not extra:
            return
        self.phase = extra["phase"]
        self.points_seen, self.batches_scored = int(extra["points_seen"]), int(extra["batches_scored"])
        self._score_gen_state = extra.get("score_generator")
        self.moments = {k: Moments.from_state(v) for k, v in extra["moments"].items()}
        self._am = {k: (s.double(), r.double()) for k, (s, r) in extra.get("am", {}).items()}
        self.unit_keep, self.clusters = dict(extra["unit_keep"]), dict(extra["clusters"])
        self.kept, self.cut_similarity = dict(extra["kept"]), extra["cut_similarity"]
        self._plan = self._base = None
        self._cache = {}
