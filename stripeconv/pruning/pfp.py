"""Provable filter pruning (Liebenwein, Baykal, Lang, Feldman, Rus, ICLR 2020, arXiv 1911.07412,
"Provable Filter Pruning for Efficient Neural Networks"), deterministic variant.

One shot, then fine-tune:

1. **Sensitivity.** PFP scores a channel by how much it can matter to the layer that *reads* it.
   For a consumer layer (conv or linear) with weight ``W``, one data point and one output unit
   ``(f, p)`` (filter, output pixel), the share of input channel ``j`` at kernel offset ``k`` is
   ``g = W⁺[f,j,k] a[j,k,p] / Σ W⁺[f,·,·] a[·,·,p]`` (``W⁺`` the positive part of ``W``; the same
   with the negative part, and the larger of the two is kept). Negative activations are split
   the same way (``a⁺`` and ``a⁻`` count as two points). The sensitivity ``s_j`` of the channel is
   the largest share over filters, offsets, pixels and the ``samples`` data points; shares whose
   denominator is below float32 epsilon count 0.
2. **Budget.** For a consumer with sensitivities ``s`` (total ``S``, probabilities ``p = s/S``),
   a relative error ``ε`` needs ``m(ε) = ⌈3 (6 + 2ε) α S / ε²⌉`` importance samples, with
   ``α = 2 c log(8 (P + 1) K / δ)`` (``P`` output pixels, ``K`` kernel size, ``c`` = ``c_constant``,
   ``δ`` = ``delta_failure``); the channels kept are the expected number of distinct samples,
   ``⌈Σ_j 1 - (1 - p_j)^m⌉`` (at least one).
3. **Search over ε.** One ``ε`` for the whole network: a bisection on ``log ε`` finds the smallest
   ``ε`` whose allocation reaches the requested ``ratio`` (fraction of the prunable filters) or
   ``target_flops_reduction``.
4. **Selection.** ``sampling="deterministic"`` (default): each channel group keeps its
   highest-sensitivity channels (the public code's PFP: top channels instead of sampling, no
   reweighting). ``sampling="random"`` (the public code's PFPNetRand, the paper's algorithm):
   ``m'`` channels are drawn with replacement from ``p``, with ``m'`` the smallest number of draws
   whose expected count of distinct channels reaches the allocation; the channels drawn are kept
   and each consumer's weights of channel ``j`` are multiplied by ``count_j / (m' p_j)``, so that
   the consumer's output is an unbiased estimate of the unpruned one. The filters of the rest are
   pruned (masks held, BN of dead filters zeroed) and the model is fine-tuned.

Generalisation to residual networks: a *unit* is a channel group of the dependency graph (the
output channels of one conv, or of the convs a residual addition ties, as in
:class:`~stripeconv.pruning.LBS`). A unit read by several consumers keeps the largest of their
allocations, and ranks its channels by the largest of their probabilities ``p_j`` (which a
consumer reading several units, after a concatenation, takes within each unit). On a plain
chain (VGG) every unit has one consumer and this is PFP exactly.

With ``sampling="random"`` the number of channels kept is itself random (its mean is the
allocation), so the reduction reached varies around the target; ``report()`` gives the one reached.
A unit read by several consumers is drawn once from its channel scores (normalised) and every
consumer is reweighted with those draws: every reader of a channel is scaled alike, which scales
the channel itself (residual additions included).

Channels with sensitivity 0 (no contribution to any consumer output on the data: dead ReLUs,
zero weights) are always pruned, so the reduction can exceed the target. Channels pruned
before stay pruned: iterative PFP (prune, fine-tune, prune further, as in the paper's
experiments) is a new ``PFP`` on the fine-tuned model for each step, with the target of that
step measured from the dense model; the filters pruned before are zero, have sensitivity 0 and
are pruned again.

Checkpoints: :meth:`PFP.score` can stop after ``max_batches`` batches; :meth:`state_dict` holds
the running sensitivities, the number of points seen and the shuffle state, so a fresh pruner
that loads it and calls :meth:`prune` finishes with exactly the same masks.
"""
from __future__ import annotations

import functools
import math
import warnings
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import _checks as check
from ._search import ChannelUnit, Progress, channel_units, note, sample_pass
from .base import Pruner

__all__ = ["PFP", "conv_input_sensitivity", "linear_input_sensitivity", "sample_complexity", "expected_unique",
           "draws_for_unique", "sample_channels"]

_EPS = torch.finfo(torch.float32).eps


def _sign_parts(t: Tensor) -> list:
    """``[t]`` when ``t >= 0``, else the magnitudes of its positive and negative parts."""
    if bool((t >= 0).all()):
        return [t]
    return [t.clamp(min=0), (-t).clamp(min=0)]


def _inverse(z: Tensor) -> Tensor:
    """``1/z`` where ``z`` exceeds float32 epsilon, 0 elsewhere (the share counts 0 there)."""
    return torch.where(z > _EPS, 1.0 / z.clamp(min=_EPS), torch.zeros_like(z))


def _chunk_elements(x: Tensor, max_elements: Optional[int]) -> int:
    # On CPU, chunks that stay in cache are several times faster than large ones (and large
    # allocations page-fault on every call); GPUs want fewer, larger launches.
    return max_elements if max_elements is not None else (1 << 26 if x.is_cuda else 1 << 21)


@torch.no_grad()
def conv_input_sensitivity(conv: nn.Conv2d, x: Tensor, max_elements: Optional[int] = None) -> Tensor:
    """``[in_channels]``: the largest share any input channel has in any output of ``conv`` on the
    batch ``x`` (PFP's per-layer sensitivity, before the maximum over batches).

    ``max_elements`` bounds the size of the intermediate (batch x filters x channels x pixels) chunks
    (default: 2**21 on CPU, 2**26 on CUDA).
    """
    max_elements = _chunk_elements(x, max_elements)
    if conv.groups != 1:
        raise ValueError("PFP: sensitivities of grouped convs are not defined (their channel groups are not pruned)")
    # the module's own padding ("same", reflect, ...) applied up front, so unfold and conv agree
    pad, mode = conv._reversed_padding_repeated_twice, "constant" if conv.padding_mode == "zeros" else conv.padding_mode
    w = conv.weight.detach().float()
    n_out, n_in = w.shape[:2]
    k = w.shape[2] * w.shape[3]
    out = torch.zeros(n_in, device=w.device)
    for a in _sign_parts(x.detach().float()):
        a = F.pad(a, pad, mode) if any(pad) else a
        cols = F.unfold(a, conv.kernel_size, conv.dilation, 0, conv.stride)  # [B, C*K, P]
        b, _, p = cols.shape
        cols = cols.view(b, n_in, k, p).transpose(1, 2).contiguous()  # [B, K, C, P]: one offset is contiguous
        for ws in _sign_parts(w):
            if not bool(ws.any()):
                continue
            inv = _inverse(F.conv2d(a, ws, None, conv.stride, 0, conv.dilation)).view(b, n_out, p)
            ws = ws.reshape(n_out, n_in, k)
            f_chunk = max(1, max_elements // max(1, b * n_in * p))
            b_chunk = b if f_chunk > 1 or b * n_in * p <= max_elements else max(1, max_elements // (n_in * p))
            for b0 in range(0, b, b_chunk):
                for f0 in range(0, n_out, f_chunk):
                    inv_c = inv[b0:b0 + b_chunk, f0:f0 + f_chunk, None, :]  # [b, f, 1, P]
                    for kk in range(k):
                        # max over pixels of a * (1/z), then the weight (constant over pixels)
                        share = (cols[b0:b0 + b_chunk, kk, None] * inv_c).amax(-1)  # [b, f, C]
                        share = share * ws[f0:f0 + f_chunk, :, kk]
                        out = torch.maximum(out, share.amax((0, 1)))
    return out


@torch.no_grad()
def linear_input_sensitivity(linear: nn.Linear, x: Tensor, max_elements: Optional[int] = None) -> Tensor:
    """``[in_features]``: the largest share any input feature has in any output of ``linear`` on ``x``."""
    max_elements = _chunk_elements(x, max_elements)
    w = linear.weight.detach().float()
    out = torch.zeros(w.shape[1], device=w.device)
    for a in _sign_parts(x.detach().float().reshape(-1, w.shape[1])):
        for ws in _sign_parts(w):
            if not bool(ws.any()):
                continue
            inv = _inverse(a @ ws.t())  # [B, out]
            chunk = max(1, max_elements // max(1, w.numel()))
            for b0 in range(0, a.shape[0], chunk):
                share = a[b0:b0 + chunk, None, :] * ws[None] * inv[b0:b0 + chunk, :, None]  # [b, out, in]
                out = torch.maximum(out, share.amax((0, 1)))
    return out


def sample_complexity(eps: float, alpha: float, total: float) -> float:
    """``m(ε) = ⌈3 (6 + 2ε) α S / ε²⌉`` (at least 1; ``inf`` beyond float range)."""
    m = 3.0 * (6.0 + 2.0 * eps) * alpha * total / eps ** 2 if eps > 1e-150 else math.inf
    return max(1.0, float(math.ceil(m))) if math.isfinite(m) else math.inf


def expected_unique(p: Tensor, m: float) -> float:
    """Expected number of distinct outcomes of ``m`` draws from the distribution ``p``:
    ``Σ_j 1 - (1 - p_j)^m``."""
    p = p[p > 0].double()
    if math.isinf(m):
        return float(len(p))
    return float(-torch.expm1(m * torch.log1p(-p.clamp(max=1.0))).sum())


def draws_for_unique(p: Tensor, k: float) -> int:
    """The fewest draws ``m`` from ``p`` whose expected number of distinct outcomes reaches ``k``
    (capped at the number of outcomes with ``p > 0``)."""
    k = min(float(k), float(int((p > 0).sum())))
    if k <= 0:
        return 0
    hi = max(1, math.ceil(k))
    while expected_unique(p, hi) < k - 1e-9:
        hi *= 2
    lo = hi // 2 if hi > 1 else 0  # expected_unique(lo) < k <= expected_unique(hi)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if expected_unique(p, mid) >= k - 1e-9:
            hi = mid
        else:
            lo = mid
    return hi


def sample_channels(p: Tensor, k: float, generator: Optional[torch.Generator] = None) -> tuple:
    """PFP's importance sampling: ``m = draws_for_unique(p, k)`` draws with replacement from ``p``.
    Returns ``(counts [len(p)], m)``; the channels with ``counts > 0`` are kept, and
    ``counts / (m p)`` (0 where ``p = 0``) are their unbiased reweighting factors."""
    p = p.double().clamp(min=0.0)
    m = draws_for_unique(p, k)
    counts = torch.zeros(len(p), dtype=torch.long)
    if m > 0:
        draws = torch.multinomial(p / p.sum(), m, replacement=True, generator=generator)
        counts = torch.bincount(draws, minlength=len(p))
    return counts, m


class PFP(Pruner):
    """Provable filter pruning (Liebenwein et al., ICLR 2020, arXiv 1911.07412).

    Arguments:

    - target: ``ratio`` (fraction of all prunable filters, found with one ``ε`` for the network)
      or ``target_flops_reduction``.
    - ``samples`` (256): data points the sensitivities are taken over (the first ``samples``
      points of the ``data`` given to :meth:`prune`: training data).
    - ``delta_failure`` (1e-16) and ``c_constant`` (3): the failure probability and constant of
      the sample-complexity bound, as in the public code.
    - ``sampling``: ``"deterministic"`` (top channels, default) or ``"random"`` (importance
      sampling with reweighting, drawn with a generator seeded by ``seed``, default 0).
    - ``eps_range`` ((1e-12, 1e12)) and ``eps_iters`` (200): bracket and bisection steps of the
      search over ``ε`` (on ``log ε``).
    - ``max_elements``: size bound of the intermediate chunks of the sensitivity computation
      (default: 2**21 elements on CPU, 2**26 on CUDA).
    - ``verbose`` (progress), and the common arguments of :class:`~stripeconv.pruning.Pruner`.
      Only filters are pruned (``granularity="filter"``).

    After :meth:`prune`: ``eps`` (the relative error bound used), ``unit_rates`` (unit -> pruned
    fraction), ``sensitivity(unit)`` (the channel scores), ``units``; with random sampling also
    ``draws`` (unit -> ``(counts, m)``).
    """

    granularities = ("filter",)

    def __init__(self, model: nn.Module, input_size=None, *, ratio: Optional[float] = None,
                 target_flops_reduction: Optional[float] = None, samples: int = 256, delta_failure: float = 1e-16,
                 c_constant: float = 3.0, eps_range: tuple = (1e-12, 1e12), eps_iters: int = 200,
                 max_elements: Optional[int] = None, sampling: str = "deterministic", seed: int = 0,
                 verbose: bool = False, **kw):
        if kw.get("ratios") is not None:
            raise ValueError("PFP allocates the per-layer rates itself: give ratio= (global) or "
                             "target_flops_reduction=")
        if kw.get("granularity", "filter") != "filter":
            raise ValueError("PFP prunes filters only (granularity='filter')")
        super().__init__(model, input_size, ratio=ratio, target_flops_reduction=target_flops_reduction, **kw)
        check.number("PFP", "samples", samples, low=1, integer=True)
        check.number("PFP", "delta_failure", delta_failure, low=0.0, high=1.0, low_open=True, high_open=True)
        check.number("PFP", "c_constant", c_constant, low=0.0, low_open=True)
        check.number("PFP", "eps_iters", eps_iters, low=1, integer=True)
        check.number("PFP", "max_elements", max_elements, low=1, integer=True, optional=True)
        check.choice("PFP", "sampling", sampling, ("deterministic", "random"))
        check.number("PFP", "seed", seed, low=0, integer=True)
        if not (isinstance(eps_range, (tuple, list)) and len(eps_range) == 2):
            raise TypeError(f"PFP: eps_range must be a pair (low, high), got {eps_range!r}")
        for value in eps_range:
            check.number("PFP", "eps_range", value, low=0.0, low_open=True)
        if not eps_range[0] < eps_range[1]:
            raise ValueError(f"PFP: eps_range must have low < high, got {eps_range!r}")
        self.samples, self.delta_failure, self.c_constant = samples, delta_failure, c_constant
        self.eps_range, self.eps_iters, self.max_elements = tuple(eps_range), eps_iters, max_elements
        self.sampling, self.seed, self.verbose = sampling, int(seed), verbose
        self.draws: dict = {}
        self.units: list[ChannelUnit] = channel_units(self)
        if not self.units:
            raise ValueError("PFP: no prunable unit (every channel group has a producer that is not prunable)")
        self.consumers = sorted({name for u in self.units for name, _, _ in self.graph.groups[u.group].consumers})
        # scoring state (checkpointed)
        self.phase = "score"
        self.points_seen = 0
        self.batches_scored = 0
        self.sens = {name: None for name in self.consumers}  # consumer -> [in] running max
        self._score_gen_state = None
        self.eps: Optional[float] = None
        self.unit_keep: dict = {}
        self._shares = self._scores = self._base = None

    # ------------------------------------------------------------------------------- scoring
    def score(self, data, max_batches: Optional[int] = None) -> bool:
        """Take the sensitivities over the first ``samples`` points of ``data`` (batches ``(x, y)``
        or ``x``), continuing where a checkpoint stopped; stop after ``max_batches`` new batches.
        Returns True when all ``samples`` points are in."""
        if self.phase != "score":
            return True
        if data is None:
            raise ValueError("PFP.prune needs data: training batches (x, y) for the sensitivities")
        modules = self.graph.modules
        current: dict = {}

        def capture(m, inp, out, name):
            current[name] = inp[0]

        def accumulate() -> None:
            for name in self.consumers:
                m = modules[name]
                fn = conv_input_sensitivity if isinstance(m, nn.Conv2d) else linear_input_sensitivity
                s = fn(m, current[name], self.max_elements).cpu().double()
                self.sens[name] = s if self.sens[name] is None else torch.maximum(self.sens[name], s)
            current.clear()

        hooks = [(modules[name], functools.partial(capture, name=name)) for name in self.consumers]
        if sample_pass(self, data, hooks, "PFP sensitivity", max_batches, accumulate):
            self.phase = "search"
            return True
        return False

    def _alive_roots(self) -> list:
        """Per graph group, the channels alive in the masks this pruning starts from."""
        return self.graph.alive_roots(self._base if self._base is not None else self._frozen)

    def _consumer_shares(self, unit: ChannelUnit) -> list:
        """Per consumer of the unit: ``(probabilities [size], total sensitivity, alpha)``."""
        out = []
        alive = self._alive_roots()[unit.group].double()
        for name, idx, ridx in self.graph.groups[unit.group].consumers:
            s = torch.zeros(unit.size, dtype=torch.float64)
            s.scatter_reduce_(0, ridx, self.sens[name][idx], "amax")  # a channel's features: their max
            s = s * alive
            total = float(s.sum())
            m = self.graph.modules[name]
            k_size = m.kernel_size[0] * m.kernel_size[1] if isinstance(m, nn.Conv2d) else 1
            alpha = 2.0 * self.c_constant * math.log(8.0 * (self.graph.spatial[name] + 1) * k_size / self.delta_failure)
            out.append((s / total if total > 0 else s, total, alpha))
        return out

    def sensitivity(self, unit: ChannelUnit) -> Tensor:
        """``[size]`` channel scores of a unit: the largest probability ``p_j`` over its consumers
        (-1 for channels already pruned)."""
        shares = self._shares[unit.name] if self._shares is not None else self._consumer_shares(unit)
        alive = self._alive_roots()[unit.group]
        score = torch.stack([p for p, _, _ in shares]).amax(0) if shares else torch.ones(unit.size, dtype=torch.float64)
        return torch.where(alive, score, torch.full_like(score, -1.0))

    # ---------------------------------------------------------------------------- allocation
    def _ensure_shares(self) -> None:
        if self.phase == "score":
            raise RuntimeError("PFP: take the sensitivities first (prune(data) or score(data))")
        if self._shares is None:
            # the masks this pruning starts from: allocation and selection are relative to them
            self._base = {n: m.clone() for n, m in self._frozen.items()}
            self._shares = {u.name: self._consumer_shares(u) for u in self.units}
            self._scores = {u.name: self.sensitivity(u) for u in self.units}
            # read at every step of the eps search: computed once
            self._alive = self._alive_roots()
            self._order = {n: torch.sort(v, descending=True, stable=True).indices for n, v in self._scores.items()}

    def keep_at(self, eps: float) -> dict:
        """Unit name -> channels kept at relative error ``eps`` (alive channels only, at least one)."""
        self._ensure_shares()
        keep = {}
        for u in self.units:
            n_alive = int(self._alive[u.group].sum())
            shares = self._shares[u.name]
            if not shares:  # nothing reads these channels: nothing to measure them by
                keep[u.name] = n_alive
                continue
            k = 1
            for p, total, alpha in shares:
                if total > 0:
                    k = max(k, math.ceil(expected_unique(p, sample_complexity(eps, alpha, total)) - 1e-9))
            keep[u.name] = max(1, min(n_alive, k))
        return keep

    def masks_for(self, keep: dict) -> dict:
        """Stripe masks keeping, of each unit, the ``keep[unit]`` highest-sensitivity alive channels
        (an int) or the given root indices (a tensor); earlier pruned stripes stay pruned."""
        self._ensure_shares()
        masks = {n: m.clone() for n, m in self._base.items()}
        for u in self.units:
            if isinstance(keep[u.name], Tensor):
                pruned = torch.ones(u.size, dtype=torch.bool)
                pruned[keep[u.name]] = False
                pruned = pruned.nonzero().flatten()
            else:
                pruned = self._order[u.name][keep[u.name]:]
            if len(pruned):
                u.remove(masks, self.convs, pruned)
        return masks

    def _search_eps(self) -> None:
        goal = self.target_flops_reduction if self.target_flops_reduction is not None else self.ratio
        self._shares = self._base = None
        self._ensure_shares()
        lo, hi = math.log(self.eps_range[0]), math.log(self.eps_range[1])
        reaches = lambda log_eps: self.target_metric(self.masks_for(self.keep_at(math.exp(log_eps)))) >= goal - 1e-12  # noqa: E731
        bar = Progress(None, "PFP eps search", self.verbose, every=20)
        try:
            if reaches(lo):
                hi = lo
            elif not reaches(hi):
                most = self.target_metric(self.masks_for(self.keep_at(self.eps_range[1])))
                warnings.warn(f"PFP: the target {goal} cannot be reached (at most {most:.4f}, at the largest eps "
                              f"{self.eps_range[1]:g}); pruning as much as allowed", stacklevel=3)
                lo = hi
            for _ in range(self.eps_iters):
                if hi - lo < 1e-9:
                    break
                mid = 0.5 * (lo + hi)
                if reaches(mid):
                    hi = mid
                else:
                    lo = mid
                bar.update(1, eps=math.exp(hi))
        finally:
            bar.close()
        self.eps = math.exp(hi)
        self.unit_keep = self.keep_at(self.eps)

    # --------------------------------------------------------------------------------- api
    def prune(self, data=None) -> dict:
        """Take the sensitivities on ``data`` (training batches), search ``ε``, prune; returns the masks."""
        if self.phase == "done":
            return self.masks()
        self.score(data)
        self._search_eps()
        if self.sampling == "random":
            self.hold(self.masks_for(self._sample_and_reweight()))
        else:
            self.hold(self.masks_for(self.unit_keep))
        self.phase = "done"
        if self.verbose:
            note("PFP", f"eps={self.eps:.4g}, flops reduction {self.flops_reduction():.3f}")
        return self.masks()

    @torch.no_grad()
    def _sample_and_reweight(self) -> dict:
        """Draw each unit's channels (``sampling="random"``), reweight their consumers; returns
        unit name -> kept root indices and sets ``draws`` and ``unit_keep``."""
        generator = torch.Generator().manual_seed(self.seed)
        kept = {}
        for u in self.units:
            alive = self._alive[u.group]
            n_alive = int(alive.sum())
            if self.unit_keep[u.name] >= n_alive:  # nothing to prune: no draw, no reweighting
                kept[u.name] = alive.nonzero().flatten()
                continue
            p = self._scores[u.name].clamp(min=0.0) * alive
            if not bool(p.any()):  # no consumer measured them: every alive channel alike
                p = alive.double()
            counts, m = sample_channels(p, self.unit_keep[u.name], generator)
            self.draws[u.name] = (counts, m)
            kept[u.name] = counts.nonzero().flatten()
            gamma = counts.double() / (m * (p / p.sum())).clamp(min=1e-300)
            for name, idx, ridx in self.graph.groups[u.group].consumers:
                w = self.graph.modules[name].weight
                g = gamma[ridx].to(w.device, w.dtype)
                shape = (1, -1) + (1,) * (w.dim() - 2)
                keep = counts[ridx] > 0  # pruned channels: their weights no longer matter
                w[:, idx[keep].to(w.device)] *= g[keep.to(g.device)].view(shape)
            self.unit_keep[u.name] = len(kept[u.name])
        return kept

    @property
    def unit_rates(self) -> dict:
        return {u.name: 1.0 - self.unit_keep[u.name] / u.size for u in self.units if u.name in self.unit_keep}

    def report(self, exported=None) -> dict:
        rep = super().report(exported)
        rep.update({"eps": self.eps, "unit_rates": self.unit_rates, "samples": self.points_seen})
        return rep

    # --------------------------------------------------------------------------- checkpoint
    def _extra_state(self) -> dict:
        return {"phase": self.phase, "points_seen": self.points_seen, "batches_scored": self.batches_scored,
                "sens": {k: (None if v is None else v.clone()) for k, v in self.sens.items()},
                "score_generator": self._score_gen_state, "eps": self.eps, "unit_keep": dict(self.unit_keep),
                "draws": {k: (c.clone(), m) for k, (c, m) in self.draws.items()}}

    def _load_extra_state(self, extra: dict) -> None:
        if not extra:
            return
        self.phase = extra["phase"]
        self.points_seen, self.batches_scored = int(extra["points_seen"]), int(extra["batches_scored"])
        self.sens = {k: (None if v is None else v.double()) for k, v in extra["sens"].items()}
        self._score_gen_state = extra.get("score_generator")
        self.eps, self.unit_keep = extra["eps"], dict(extra["unit_keep"])
        self.draws = {k: (c.clone(), int(m)) for k, (c, m) in extra.get("draws", {}).items()}
        self._shares = self._scores = self._base = None
