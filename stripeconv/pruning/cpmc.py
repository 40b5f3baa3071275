"""Channel pruning via multi-criteria based on weight dependency (Yan, Guo, Li, Yang, Xu, IJCNN 2021,
arXiv 2011.03240), here ``CPMC``.

What the paper states: a channel (an output feature map) is scored not only by the filter that
produces it but also by the weights of the next layer that read it, because those weights disappear
with the channel ("weight dependency"); the importance combines three criteria, the weight value,
the computational cost and the parameter quantity of those weights; each criterion is normalised
*globally* so that channels of different layers compare; all channels are ranked together and the
least important are removed, one shot, from a pre-trained model, which is then fine-tuned. VGGNet,
ResNet and DenseNet are compressed.

The formulas below follow those statements; where they leave a detail open (the norm, how each
criterion is normalised, how the three combine) they take the conventions of COP's public code (Wang
et al., IJCAI 2019, the method that put "global normalisation" and FLOPs / parameter terms into a
filter importance). Unlike COP, which cuts one channel at a time and recomputes its cost terms after
each cut, CPMC scores once and ranks once.

**Dependent weights.** For a channel ``c`` (a root channel of a channel group of the dependency
graph, :class:`~stripeconv.pruning.graph.ChannelGraph`) the weights removed with it are

- its filters: ``W_p[c']`` for every conv ``p`` producing it (one conv, or every conv that a
  residual addition ties to it; ``c'`` is ``c``'s index in ``p``),
- its columns in every consumer: ``K_q[:, j]`` for each input channel ``j`` of a conv ``q`` that
  reads ``c`` (across concatenations too), or each input feature of a ``Linear`` that comes from
  ``c`` after a flatten (several per channel),
- the filter of a depthwise conv that ``c`` passes through (MobileNet blocks; the consumer read
  is then the conv after the depthwise one).

**Criteria.** With ``S(c)`` that set of weights (only kept stripes and live input channels
count, so a model pruned before is measured as it now is):

- weight value ``V(c) = sum |w|`` over ``S(c)`` (``p=1``, default) or ``sqrt(sum w^2)`` (``p=2``);
- parameters ``P(c) = |S(c)|``: per producer (kept stripes of the filter) x (live input
  channels), per consumer conv its kept stripes (``out x kh x kw`` when dense), per linear
  feature its ``out_features``, per depthwise filter ``kh x kw``;
- FLOPs ``F(c)``: each of those terms times ``2 x`` the output positions of its layer
  (:func:`stripeconv.profile`'s convention, the same count ``target_flops_reduction`` uses).

**Normalisation and importance.**

- ``V^(c) = V(c) / max V`` with the maximum taken over the channels of ``c``'s own group
  (``normalization="layer"``, default: COP's normalisation of the weight statistic, which makes
  the weight scores of layers with different fan-in and weight scale comparable) or over every
  channel of the network (``normalization="global"``);
- ``F^(c) = g(F(c)) / max g(F)`` and ``P^(c) = g(P(c)) / max g(P)``, maxima over every channel of
  the network, with ``g(x) = log2(1 + x)`` (``log_costs=True``, default: COP compresses its cost
  terms with ``log2`` so that they do not swamp the weight term) or ``g(x) = x``;
- ``I(c) = alpha V^(c) + beta (1 - F^(c)) + gamma (1 - P^(c))``: a channel matters more when its
  weights are large and when removing it saves little; a channel that costs much is cheaper to
  give up (COP's regularisation terms). ``alpha = beta = gamma = 1`` by default.

**Selection.** ``scope="global"`` (default, the paper's global ranking): the channels of all groups
are sorted by ``I`` and the lowest are pruned, at most ``max_layer_rate`` (0.9) of any one group
(within a layer the cost terms are nearly constant, so they order whole layers: uncapped, the
costliest group would lose all but one channel before another lost any); with ``ratio`` (the
fraction of the prunable filters to remove) or ``target_flops_reduction`` the smallest number of
lowest channels that reaches the target is found by bisection. ``scope="layer"`` (``ratio`` per
group) and ``ratios=`` (conv name -> fraction; a group tied by a residual addition takes the largest
ratio given to its convs) rank within each group instead. Every group keeps at least one channel,
channels dead before stay dead, and the filters of the pruned channels are masked (BN of dead
filters zeroed) so that :meth:`~stripeconv.pruning.Pruner.export` removes them and their consumers'
columns.

Generalisation: a group tied by residual additions is scored once, its dependent weights being
the union over all its producers and consumers, and pruned as one (the same indices in every
conv of the group), so ResNets export exactly; DenseNet concatenations map each consumer input
channel to the group that produced it. Groups with a producer that is not prunable (the network
input, a grouped conv, a conv left out by ``layers`` / ``skip_first`` / ``exclude``) are not
pruned. The criterion is data-free (``prune(data)`` ignores ``data``). Only whole channels are
pruned: ``granularity="stripe"`` raises (the criteria measure feature maps, not stripes).
"""
from __future__ import annotations

import math
import warnings
from typing import Optional

import torch
from torch import Tensor, nn

from . import _checks as check
from ._search import ChannelUnit, channel_units
from .base import Pruner

__all__ = ["CPMC"]

_OWNER = "CPMC"


class CPMC(Pruner):
    """Channel pruning via multi-criteria (weights, FLOPs, params) based on weight dependency (Yan et al. 2021).

    Arguments:

    - target: ``ratio`` (fraction of all prunable filters with ``scope="global"``, the default;
      per channel group with ``scope="layer"``), ``ratios`` (conv name -> fraction) or
      ``target_flops_reduction``.
    - ``alpha`` / ``beta`` / ``gamma`` (1, 1, 1): weights of the weight-value, FLOPs and
      parameter criteria in ``I = alpha V^ + beta (1 - F^) + gamma (1 - P^)``.
    - ``p`` (1): the weight value is the L1 (1) or L2 (2) norm of a channel's dependent weights.
    - ``normalization`` (``"layer"``): the weight value is divided by the largest in the
      channel's group (``"layer"``) or in the network (``"global"``); the costs always by the
      largest in the network.
    - ``log_costs`` (True): FLOPs and parameters enter as ``log2(1 + x)`` before normalisation.
    - ``max_layer_rate`` (0.9): the global ranking removes at most this fraction of a group's
      channels (the cost terms are nearly constant within a layer, so without a cap the costliest
      layer can lose all but one channel before any other loses one).
    - the common arguments of :class:`~stripeconv.pruning.Pruner` (``layers``, ``skip_first``,
      ``exclude`` ...). Only filters (whole channels) are pruned (``granularity="filter"``).

    After :meth:`prune`: :meth:`criteria` (raw ``weight`` / ``flops`` / ``params`` per channel),
    :meth:`importance` (the scores used), ``unit_rates`` (group -> pruned fraction), ``units``.
    """

    granularities = ("filter",)
    default_scope = "global"

    def __init__(self, model: nn.Module, input_size=None, *, ratio: Optional[float] = None,
                 ratios: Optional[dict] = None, target_flops_reduction: Optional[float] = None,
                 scope: Optional[str] = None, alpha: float = 1.0, beta: float = 1.0, gamma: float = 1.0,
                 p: int = 1, normalization: str = "layer", log_costs: bool = True, max_layer_rate: float = 0.9,
                 **kw):
        if kw.get("granularity", "filter") != "filter":
            raise ValueError(f"{_OWNER} prunes channels only (granularity='filter'): its criteria measure whole "
                             f"feature maps, not stripes; got granularity={kw['granularity']!r}")
        super().__init__(model, input_size, ratio=ratio, ratios=ratios, target_flops_reduction=target_flops_reduction,
                         scope=scope, **kw)
        for name, value in (("alpha", alpha), ("beta", beta), ("gamma", gamma)):
            check.number(_OWNER, name, value, low=0.0)
        if alpha + beta + gamma <= 0:
            raise ValueError(f"{_OWNER}: alpha, beta and gamma cannot all be 0 (no criterion left)")
        if isinstance(p, bool) or p not in (1, 2):
            raise ValueError(f"{_OWNER}: p must be 1 (L1 norm) or 2 (L2 norm), got {p!r}")
        check.choice(_OWNER, "normalization", normalization, ("layer", "global"))
        check.number(_OWNER, "max_layer_rate", max_layer_rate, low=0.0, high=1.0, low_open=True)
        if not isinstance(log_costs, bool):
            raise TypeError(f"{_OWNER}: log_costs must be True or False, got {log_costs!r}")
        self.alpha, self.beta, self.gamma = float(alpha), float(beta), float(gamma)
        self.p, self.normalization, self.log_costs = int(p), normalization, log_costs
        self.max_layer_rate = float(max_layer_rate)
        self.units: list[ChannelUnit] = channel_units(self)
        if not self.units:
            raise ValueError(f"{_OWNER}: no prunable channel group (every group has a producer that is not prunable)")
        if ratios:
            in_units = {name for u in self.units for name, _, _ in u.members}
            stray = sorted(n for n, r in ratios.items() if r > 0 and n not in in_units)
            if stray:
                raise ValueError(f"{_OWNER}: ratios names convs whose channels cannot be pruned (a producer of "
                                 f"their channel group is not prunable): {stray}")
        self.phase = "score"
        self._importance: Optional[dict] = None
        self._base: Optional[dict] = None  # the masks the pruning started from
        self.unit_pruned: dict = {}

    def base_masks(self) -> dict[str, Tensor]:
        """The masks pruning starts from: the held ones before :meth:`prune`, the ones it started
        from after (channels dead there are dead before CPMC prunes anything)."""
        return self._base if self._base is not None else self._frozen

    # ------------------------------------------------------------------------------ criteria
    @torch.no_grad()
    def criteria(self) -> dict[str, dict[str, Tensor]]:
        """Unit name -> ``{"weight", "flops", "params", "alive"}``: per root channel (``[size]``,
        float64) the norm of its dependent weights, their FLOPs and their count, under
        :meth:`base_masks`; ``alive`` (bool) marks the channels not already dead there."""
        g = self.graph
        base = self.base_masks()
        roots = g.alive_roots(base)
        alive_in = g.alive_inputs(base, roots)
        out = {}
        for u in self.units:
            grp = g.groups[u.group]
            value = torch.zeros(u.size, dtype=torch.float64)
            params = torch.zeros(u.size, dtype=torch.float64)
            flops = torch.zeros(u.size, dtype=torch.float64)

            def add(ridx: Tensor, mag: Tensor, count, name: str) -> None:
                count = torch.as_tensor(count, dtype=torch.float64).expand(len(ridx))
                value.index_add_(0, ridx, mag)
                params.index_add_(0, ridx, count)
                flops.index_add_(0, ridx, 2.0 * g.spatial[name] * count)

            for name, idx, ridx in u.members:  # the channel's own filters
                conv = g.modules[name]
                w = self.weight(name).detach().double()[idx.to(conv.weight.device)].cpu()
                cin = int(alive_in[name].sum()) if name in alive_in else conv.in_channels
                stripes = base[name][idx.to(base[name].device)].reshape(len(idx), -1).sum(1).double().cpu()
                add(ridx, self._magnitude(w).sum((1, 2, 3)), stripes * cin, name)
            for name, idx, ridx in grp.consumers:  # the next layers' weights that read it
                m = g.modules[name]
                w = (self.weight(name) if name in self.convs else m.weight).detach().double()
                w = w[:, idx.to(w.device)].cpu()
                if isinstance(m, nn.Conv2d):
                    kept = int(base[name].sum()) if name in base else m.out_channels * w.shape[2] * w.shape[3]
                    add(ridx, self._magnitude(w).sum((0, 2, 3)), float(kept), name)
                else:
                    add(ridx, self._magnitude(w).sum(0), float(m.out_features), name)
            for name, idx, ridx in grp.passthrough:  # depthwise filters that go with it
                m = g.modules[name]
                w = m.weight.detach().double()[idx.to(m.weight.device)].cpu()
                add(ridx, self._magnitude(w).sum((1, 2, 3)), float(w.shape[2] * w.shape[3]), name)
            if self.p == 2:
                value = value.sqrt()
            out[u.name] = {"weight": value, "flops": flops, "params": params, "alive": roots[u.group].clone()}
        return out

    def _magnitude(self, w: Tensor) -> Tensor:
        return w.abs() if self.p == 1 else w.square()

    def importance(self) -> dict[str, Tensor]:
        """Unit name -> ``[size]`` importance ``I`` of its root channels (-1 for channels already dead)."""
        if self._importance is not None:
            return {k: v.clone() for k, v in self._importance.items()}
        crit = self.criteria()
        cost = (lambda x: torch.log2(1.0 + x)) if self.log_costs else (lambda x: x)  # noqa: E731

        def network_max(values) -> float:
            live = [v[c["alive"]] for v, c in zip(values, crit.values()) if bool(c["alive"].any())]
            return float(torch.cat(live).max()) if live else 0.0

        v_max = network_max([c["weight"] for c in crit.values()])
        f_max = network_max([cost(c["flops"]) for c in crit.values()])
        p_max = network_max([cost(c["params"]) for c in crit.values()])
        out = {}
        for name, c in crit.items():
            alive = c["alive"]
            if self.normalization == "layer":
                denom = float(c["weight"][alive].max()) if bool(alive.any()) else 0.0
            else:
                denom = v_max
            v = c["weight"] / denom if denom > 0 else torch.zeros_like(c["weight"])
            f = cost(c["flops"]) / f_max if f_max > 0 else torch.zeros_like(c["flops"])
            q = cost(c["params"]) / p_max if p_max > 0 else torch.zeros_like(c["params"])
            score = self.alpha * v + self.beta * (1.0 - f) + self.gamma * (1.0 - q)
            out[name] = torch.where(alive, score, torch.full_like(score, -1.0))
        return out

    # ----------------------------------------------------------------------------- selection
    def masks_for(self, pruned: dict) -> dict[str, Tensor]:
        """Stripe masks pruning, of each unit, the root channels ``pruned[unit]`` (bool ``[size]``),
        on top of :meth:`base_masks`."""
        masks = {n: m.clone() for n, m in self.base_masks().items()}
        for u in self.units:
            sel = pruned.get(u.name)
            if sel is None or not bool(sel.any()):
                continue
            u.remove(masks, self.convs, sel.nonzero().flatten())
        return masks

    def _global_order(self, scores: dict) -> list:
        """``(unit name, root)`` pairs, least important first: each unit's lowest
        ``floor(max_layer_rate * size)`` channels, never its best one. Ties go to model order, then
        channel index."""
        entries = []
        for ui, u in enumerate(self.units):
            s = scores[u.name]
            best = int(torch.argmax(s))
            cap = min(u.size - 1, int(math.floor(self.max_layer_rate * u.size + 1e-9)))
            entries += sorted((float(s[r]), ui, r) for r in range(u.size) if r != best)[:cap]
        entries.sort()
        return [(self.units[ui].name, r) for _, ui, r in entries]

    def _pruned_first(self, order: list, k: int) -> dict:
        pruned = {u.name: torch.zeros(u.size, dtype=torch.bool) for u in self.units}
        for name, r in order[:k]:
            pruned[name][r] = True
        return pruned

    def _pruned_per_unit(self, scores: dict, rates: dict) -> dict:
        pruned = {}
        for u in self.units:
            k = min(u.size - 1, int(math.floor(rates.get(u.name, 0.0) * u.size + 1e-9)))
            sel = torch.zeros(u.size, dtype=torch.bool)
            if k > 0:
                sel[torch.sort(scores[u.name], stable=True).indices[:k]] = True
            pruned[u.name] = sel
        return pruned

    def _search(self, masks_at, lo: float, hi: float, integer: bool, goal: float) -> dict:
        """The smallest ``x`` in ``[lo, hi]`` whose ``masks_at(x)`` reaches ``goal`` (bisection)."""
        reaches = lambda x: self.target_metric(self.masks_for(masks_at(x))) >= goal - 1e-12  # noqa: E731
        if not reaches(hi):
            most = self.target_metric(self.masks_for(masks_at(hi)))
            warnings.warn(f"{_OWNER}: the target {goal} cannot be reached by pruning these layers (at most "
                          f"{most:.4f}); pruning as much as allowed", stacklevel=3)
            return masks_at(hi)
        if integer:
            lo, hi = int(lo), int(hi)
            while lo < hi:
                mid = (lo + hi) // 2
                if reaches(mid):
                    hi = mid
                else:
                    lo = mid + 1
        else:
            for _ in range(40):
                mid = 0.5 * (lo + hi)
                if reaches(mid):
                    hi = mid
                else:
                    lo = mid
        return masks_at(hi)

    def select_units(self, scores: dict) -> dict:
        """Unit name -> bool ``[size]`` root channels to prune for this pruner's target."""
        if self.ratios is not None:
            rates = {u.name: max([self.ratios.get(n, 0.0) for n, _, _ in u.members]) for u in self.units}
            return self._pruned_per_unit(scores, rates)
        if self.scope == "layer":
            at = lambda r: self._pruned_per_unit(scores, {u.name: r for u in self.units})  # noqa: E731
            if self.ratio is not None:
                return at(self.ratio)
            return self._search(at, 0.0, 1.0, False, self.target_flops_reduction)
        order = self._global_order(scores)
        goal = self.ratio if self.ratio is not None else self.target_flops_reduction
        return self._search(lambda k: self._pruned_first(order, k), 0, len(order), True, goal)

    # ----------------------------------------------------------------------------------- api
    def prune(self, data=None) -> dict[str, Tensor]:
        """Score every channel, prune the least important to the target; returns the masks.

        ``data`` is not used (the criteria are data-free). A second call returns the same masks.
        """
        if self.phase == "done":
            return self.masks()
        self._importance = self._base = None
        self._importance = self.importance()
        self._base = {n: m.clone() for n, m in self._frozen.items()}
        pruned = self.select_units(self._importance)
        self.hold(self.masks_for(pruned))
        self.unit_pruned = {n: s.clone() for n, s in pruned.items()}
        self.phase = "done"
        return self.masks()

    @property
    def unit_rates(self) -> dict:
        """Unit name -> fraction of its channels dead after :meth:`prune`."""
        if self.phase != "done":
            return {}
        roots = self.graph.alive_roots(self._masks)
        return {u.name: 1.0 - float(roots[u.group].double().mean()) for u in self.units}

    def report(self, exported=None) -> dict:
        rep = super().report(exported)
        rep["unit_rates"] = self.unit_rates
        return rep

    # ---------------------------------------------------------------------------- checkpoint
    def _extra_state(self) -> dict:
        return {"phase": self.phase,
                "importance": None if self._importance is None else {k: v.clone() for k, v in self._importance.items()},
                "unit_pruned": {k: v.clone() for k, v in self.unit_pruned.items()},
                "base": None if self._base is None else {k: v.clone() for k, v in self._base.items()}}

    def _load_extra_state(self, extra: dict) -> None:
        if not extra:
            return
        self.phase = extra["phase"]
        imp = extra.get("importance")
        self._importance = None if imp is None else {k: v.double() for k, v in imp.items()}
        self.unit_pruned = {k: v.bool() for k, v in extra.get("unit_pruned", {}).items()}
        base = extra.get("base")
        dev = {n: c.weight.device for n, c in self.convs.items()}
        self._base = None if base is None else {n: base[n].to(dev[n]).bool() for n in self.convs}
