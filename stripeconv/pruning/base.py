"""The Pruner protocol and the stock training loop.

A pruner is attached to a model and driven by a training loop through hooks::

    pruner = stripeconv.pruning.SWP(model, input_size=(1, 3, 32, 32), target_flops_reduction=0.5, epochs=E)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)  # after the pruner
    for epoch in range(E):
        for x, y in loader:
            loss = F.cross_entropy(model(x), y) + pruner.penalty()   # extra loss (0.0 if none)
            opt.zero_grad(); loss.backward()
            pruner.after_backward()                                    # gradient edits
            opt.step()
            pruner.after_step()                                        # mask / parameter updates
        pruner.end_epoch(epoch)                                        # epoch-level pruning
    small = pruner.export()          # new model of StripeConv2d, dead filters removed
    print(pruner.report())           # FLOPs / params reduction reached

One-shot methods use ``pruner.prune(data)`` instead (then fine-tune with the same hooks, which
keep pruned stripes at zero). :func:`fit` is that loop, ready made.
"""
from __future__ import annotations

import warnings
from typing import Callable, Iterable, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from .._plain import plain_copy
from . import _checks as check
from . import criteria as C
from .graph import is_depthwise, stripe_layers

__all__ = ["Pruner", "fit", "evaluate"]


def _infer_input_size(model: nn.Module):
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            warnings.warn(f"pruning: input_size not given, assuming (1, {m.in_channels}, 32, 32)", stacklevel=4)
            return (1, m.in_channels, 32, 32)
    raise ValueError("pruning: the model has no nn.Conv2d to prune")


class Pruner:
    """Base class of the pruning methods.

    Common arguments: ``input_size`` (input shape with batch, e.g. ``(1, 3, 32, 32)``, or an example
    tensor: needed for the dependency graph and FLOPs), which layers to prune (``layers``
    names, ``skip_first``, ``skip_1x1``, ``exclude``; grouped/depthwise convs are always left out,
    and a depthwise conv loses the filters of the channels its producer loses),
    and one target: ``ratios`` (name -> fraction of units), ``ratio`` (one fraction: per layer
    with ``scope="layer"``, of all units together with ``scope="global"``) or
    ``target_flops_reduction`` (fraction of the model's FLOPs, as :func:`stripeconv.profile`
    counts them after dead channels are removed, to remove). ``zero_bn`` zeroes the BN affine
    (and conv bias) of filters that keep no stripe, so they carry 0 and export drops them exactly.

    Hooks (all no-ops unless a method overrides them): :meth:`penalty`, :meth:`after_backward`,
    :meth:`after_step`, :meth:`end_epoch`, :meth:`prune`. Results: :meth:`masks`,
    :meth:`masked_model`, :meth:`export`, :meth:`report`. Checkpoints: :meth:`state_dict`,
    :meth:`load_state_dict` (masks, schedule position and method state; model weights, including
    any parameters a method attached to the model, are in ``model.state_dict()``).
    """

    granularities = ("filter", "stripe")
    default_scope = "layer"

    def __init__(
        self,
        model: nn.Module,
        input_size: Optional[Union[Sequence[int], Tensor]] = None,
        *,
        ratio: Optional[float] = None,
        ratios: Optional[dict] = None,
        target_flops_reduction: Optional[float] = None,
        scope: Optional[str] = None,
        granularity: str = "filter",
        epochs: Optional[int] = None,
        layers: Optional[Union[str, Iterable[str]]] = None,
        skip_first: bool = False,
        skip_1x1: bool = False,
        exclude: Union[str, Iterable[str]] = (),
        zero_bn: bool = True,
        require_target: bool = True,
    ):
        owner = type(self).__name__
        if not isinstance(model, nn.Module):
            raise TypeError(f"{owner}: model must be an nn.Module, got {type(model).__name__}")
        if type(model).__name__ == "OptimizedModule" and isinstance(getattr(model, "_orig_mod", None), nn.Module):
            # its dependency graph would be traced through Dynamo, which fails inside its own checks
            raise TypeError(f"{owner}: model is a torch.compile wrapper; pass the module it runs (`._orig_mod`), and "
                            "compile the pruned or exported model instead")
        already = stripe_layers(model)
        if already:
            raise ValueError(f"{owner}: the model already has StripeConv2d layers ({already}): pruners start from a "
                             "dense model of nn.Conv2d layers (the dependency graph does not see through a "
                             "StripeConv2d, and its pruned stripes would not stay pruned); prune the dense model, "
                             "with a higher target for a smaller one")
        check.input_size(owner, input_size)
        check.choice(owner, "granularity", granularity, self.granularities)
        check.choice(owner, "scope", scope or self.default_scope, ("layer", "global"))
        given = sum(v is not None for v in (ratio, ratios, target_flops_reduction))
        if given > 1 or (require_target and given == 0):
            raise ValueError(f"{owner}: give exactly one of ratio=, ratios= or target_flops_reduction=")
        check.number(owner, "ratio", ratio, low=0.0, high=1.0, high_open=True, optional=True)
        check.number(owner, "target_flops_reduction", target_flops_reduction, low=0.0, high=1.0, high_open=True,
                     optional=True)
        check.ratio_map(owner, ratios)
        check.number(owner, "epochs", epochs, low=1, integer=True, optional=True)
        self.model = model
        self.input_size = input_size if input_size is not None else _infer_input_size(model)
        self.ratio, self.ratios, self.target_flops_reduction = ratio, ratios, target_flops_reduction
        self.scope = scope or self.default_scope
        self.granularity = granularity
        self.epochs = epochs
        self.zero_bn = zero_bn
        self.convs = C.prunable_convs(model, layers, skip_first, skip_1x1, exclude)
        if not self.convs:
            raise ValueError(f"{owner}: no conv to prune (layers={layers!r}, skip_first={skip_first}, "
                             f"skip_1x1={skip_1x1}, exclude={list(exclude)!r}; grouped and depthwise convs are "
                             "never pruned themselves)")
        if ratios:
            unknown = set(ratios) - set(self.convs)
            if unknown:
                raise KeyError(f"{type(self).__name__}: ratios name layers that are not prunable: {sorted(unknown)}")
        self._masks = C.full_masks(self.convs)
        self._frozen = C.full_masks(self.convs)  # stripes held at zero at every step
        self.epoch = 0  # epochs completed
        self.steps = 0
        self._graph = None
        self._bn_of = C.conv_bn_pairs(model, self.input_size)
        names = {m: n for n, m in model.named_modules()}
        self._bn_names = {n: names[bn] for n, bn in self._bn_of.items()}  # to find them in copies of the model
        self._has_depthwise = any(is_depthwise(m) for m in model.modules())
        self._through_cache: tuple = (None, {})

    # -------------------------------------------------------------------------- structure
    @property
    def graph(self):
        """The model's :class:`~stripeconv.pruning.graph.ChannelGraph` (built on first use)."""
        if self._graph is None:
            from .graph import ChannelGraph
            with torch.enable_grad():  # the tracer follows autograd; hooks may run under no_grad
                self._graph = ChannelGraph(self.model, self.input_size)
        return self._graph

    def leave_out_layers(self, skip_coupled: bool, ratios: Optional[dict] = None, drop_unratioed: bool = True) -> None:
        """Stop pruning some convs: with ``skip_coupled``, those whose outputs a residual addition
        ties to another conv's (unless ``ratios`` names them); with ``ratios`` and
        ``drop_unratioed``, those it gives no positive ratio."""
        from ._search import coupled_convs

        coupled = coupled_convs(self.graph) if skip_coupled else set()
        for name in list(self.convs):
            named = ratios is not None and name in ratios
            unratioed = drop_unratioed and ratios is not None and ratios.get(name, 0.0) <= 0.0
            if (name in coupled and not named) or unratioed:
                del self.convs[name], self._masks[name], self._frozen[name]

    @property
    def dense_flops(self) -> int:
        """FLOPs (batch 1) of the unpruned model, as :meth:`flops` counts them."""
        return self.graph.flops({})

    def flops(self, masks: Optional[dict] = None) -> int:
        """FLOPs (batch 1, dead channels removed) of the model under ``masks`` (default: current)."""
        return self.graph.flops(self._masks if masks is None else masks)

    def flops_reduction(self, masks: Optional[dict] = None) -> float:
        """Fraction of :attr:`dense_flops` that ``masks`` (default: current) remove."""
        return 1.0 - self.flops(masks) / self.dense_flops

    def target_metric(self, masks: dict) -> float:
        """What the target measures under ``masks``: the FLOPs reduction with
        ``target_flops_reduction``, else the pruned fraction of all prunable filters."""
        if self.target_flops_reduction is not None:
            return self.flops_reduction(masks)
        pruned = sum(int(C.dead_filters(m).sum()) for m in masks.values())
        return pruned / sum(c.out_channels for c in self.convs.values())

    def _units(self, mask: Tensor) -> Tensor:
        """Kept units of a stripe mask at this pruner's granularity: ``[out]`` for filters, the mask
        itself for stripes."""
        return mask.reshape(mask.shape[0], -1).any(1) if self.granularity == "filter" else mask

    def weight(self, name: str) -> Tensor:
        """The effective weight of a pruned conv (what the forward pass uses)."""
        return self.convs[name].weight

    def select(self, scores: dict, base_masks: Optional[dict] = None, **target) -> dict:
        """Masks pruning the lowest ``scores`` to this pruner's target (or ``target`` overrides)."""
        kw = dict(ratio=self.ratio, ratios=self.ratios, target_flops_reduction=self.target_flops_reduction,
                  scope=self.scope)
        kw.update(target)
        needs_graph = kw["target_flops_reduction"] is not None
        return C.select_to_target(
            scores, self.convs, self.flops if needs_graph else None, self.dense_flops if needs_graph else 0,
            base_masks=base_masks, **kw)

    # ------------------------------------------------------------------------------ hooks
    def penalty(self) -> Union[Tensor, float]:
        """Extra loss term to add before ``backward()``."""
        return 0.0

    def after_backward(self) -> None:
        """Gradient edits: pruned (frozen) stripes get no gradient."""
        C.mask_grads(self.convs, self._frozen)
        if self.zero_bn:
            self.zero_dead_bn(self._frozen, grads=True)

    def after_step(self) -> None:
        """After ``optimizer.step()``: keep frozen stripes (and dead BN) at zero."""
        self.steps += 1
        self._enforce(self._frozen)

    def end_epoch(self, epoch: int) -> None:
        """Called after each epoch (0-based)."""
        self.epoch = epoch + 1

    def prune(self, data=None) -> dict:
        """One-shot pruning (data-driven methods read ``data``); returns the masks."""
        raise NotImplementedError(f"{type(self).__name__} prunes during training; drive it with fit() or the hooks")

    @property
    def has_pruned(self) -> bool:
        """Whether any stripe is held at zero: after :meth:`prune` of a one-shot method, or a training
        method's first pruning decision."""
        return any(not bool(m.all()) for m in self._frozen.values())

    @torch.no_grad()
    def hold(self, masks: dict) -> None:
        """Prune to ``masks`` now and keep those stripes at zero from then on."""
        self._masks = masks
        self._frozen = {n: m.clone() for n, m in masks.items()}
        self._enforce(self._frozen)

    def _enforce(self, masks: dict) -> None:
        for name, conv in self.convs.items():
            m = masks[name]
            if not bool(m.all()):
                self._zero_weights(name, m)
        if self.zero_bn:
            self.zero_dead_bn(masks)

    def zero_dead_bn(self, masks: dict, grads: bool = False, modules: Optional[dict] = None) -> None:
        """:func:`~.criteria.zero_dead_bn` for the pruned convs under ``masks`` and for the depthwise
        convs that their dead channels pass through, so that a dead channel carries exactly 0 past
        those too. ``modules``: name -> module of a copy of :attr:`model` to act on instead."""
        if modules is None:
            convs, bn_of, modules = self.convs, self._bn_of, self.graph.modules if self._has_depthwise else {}
        else:
            convs = {n: modules[n] for n in self.convs}
            bn_of = {n: modules[b] for n, b in self._bn_names.items()}
        dead = self._dead_passthrough(masks)
        if dead:
            convs = {**convs, **{n: modules[n] for n in dead}}
            masks = {**masks, **{n: (~d)[:, None, None].expand(-1, *modules[n].kernel_size).clone()
                                 for n, d in dead.items()}}
        C.zero_dead_bn(convs, masks, bn_of, grads=grads)

    def _dead_passthrough(self, masks: dict) -> dict[str, Tensor]:
        """Depthwise conv name -> ``[out]`` bool: its channels that are dead upstream (cached per masks)."""
        if not self._has_depthwise or not masks:
            return {}
        key = (tuple(masks), torch.cat([m.reshape(-1).cpu() for m in masks.values()]))
        cached_key, cached = self._through_cache
        if cached_key is None or cached_key[0] != key[0] or not torch.equal(cached_key[1], key[1]):
            alive = self.graph.alive_passthrough(masks)
            cached = {n: ~a for n, a in alive.items() if not bool(a.all())}
            self._through_cache = (key, cached)
        return cached

    @torch.no_grad()
    def _zero_weights(self, name: str, mask: Tensor) -> None:
        w = self.convs[name].weight
        w.mul_(mask.to(w.device, w.dtype)[:, None])

    # ---------------------------------------------------------------------------- results
    def masks(self) -> dict[str, Tensor]:
        """Current stripe masks, name -> bool ``[out, kh, kw]`` (True = kept)."""
        return {k: v.clone() for k, v in self._masks.items()}

    def masked_model(self) -> nn.Module:
        """A copy of the model as pruned: masks applied, dead filters' BN zeroed (if ``zero_bn``),
        method-specific parameters folded. :meth:`export` computes the same function."""
        model = plain_copy(self.model)
        C.apply_masks(model, self._masks)
        if self.zero_bn:
            self.zero_dead_bn(self._masks, modules=dict(model.named_modules()))
        return model

    def export(self, fold: str = "exact") -> nn.Module:
        """The pruned model with StripeConv2d layers and dead filters removed (see :func:`stripeconv.export`)."""
        from ..export import export
        return export(self.masked_model(), self._masks, self.input_size, fold=fold)

    def report(self, exported: Optional[nn.Module] = None) -> dict:
        """FLOPs and params of the dense and the exported model (via :func:`stripeconv.profile`), the
        stripe density per pruned layer, and the GPU tile efficiency of every exported ``StripeConv2d``
        (kept / computed stripes of the Triton forward's filter tiles; the GPU speedup cannot exceed
        efficiency / density)."""
        from ..backends.triton_plans import best_tile_efficiency
        from ..nn import StripeConv2d
        from ..profile import profile
        from .graph import example_input

        size = tuple(example_input(self.model, self.input_size).shape[1:])
        size = (1, *size)
        dense = profile(plain_copy(self.model), size)
        exported = exported if exported is not None else self.export()
        small = profile(exported, size)
        density = {n: float(m.float().mean()) for n, m in self._masks.items()}
        efficiency = {n: best_tile_efficiency(m.stripe_mask.cpu(), m.groups) for n, m in exported.named_modules()
                      if isinstance(m, StripeConv2d) and m.num_stripes}
        return {
            "method": type(self).__name__,
            "flops_dense": dense.flops, "flops": small.flops,
            "flops_reduction": 1.0 - small.flops / dense.flops if dense.flops else 0.0,
            "params_dense": dense.params, "params": small.params,
            "params_reduction": 1.0 - small.params / dense.params if dense.params else 0.0,
            "stripe_density": density,
            "gpu_tile_efficiency": efficiency,
            "epoch": self.epoch,
        }

    # ------------------------------------------------------------------------- checkpoint
    def state_dict(self) -> dict:
        """Masks, frozen stripes, schedule position and the method's own state (not the model's weights)."""
        return {
            "masks": self.masks(),
            "frozen": {k: v.clone() for k, v in self._frozen.items()},
            "epoch": self.epoch,
            "steps": self.steps,
            "extra": self._extra_state(),
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from :meth:`state_dict`; the masks are applied to the model's weights at once."""
        for key in ("masks", "frozen"):
            missing = set(self.convs) - set(state[key])
            if missing:
                raise KeyError(f"{type(self).__name__}.load_state_dict: no {key} for {sorted(missing)}")
        dev = {n: c.weight.device for n, c in self.convs.items()}
        self._masks = {n: state["masks"][n].to(dev[n]).bool() for n in self.convs}
        self._frozen = {n: state["frozen"][n].to(dev[n]).bool() for n in self.convs}
        self.epoch, self.steps = int(state["epoch"]), int(state["steps"])
        self._load_extra_state(state.get("extra", {}))
        self._enforce(self._frozen)

    def _extra_state(self) -> dict:
        return {}

    def _load_extra_state(self, extra: dict) -> None:
        pass


def _name_of(model: nn.Module, module: nn.Module) -> str:
    for n, m in model.named_modules():
        if m is module:
            return n
    raise KeyError(module)


@torch.no_grad()
def copy_matching(model: nn.Module, state: dict) -> None:
    """Copy the entries of ``state`` whose keys ``model.state_dict()`` has into the model's tensors."""
    own = model.state_dict()
    for key, value in state.items():
        if key in own:
            own[key].copy_(value)


def evaluate(model: nn.Module, loader: Iterable, device: Optional[Union[str, torch.device]] = None,
             loss_fn: Optional[Callable] = None) -> dict:
    """Top-1 accuracy and mean loss of ``model`` on ``loader`` (a loader or a Dataset; eval mode, restored after)."""
    from ..engine import evaluate_model

    return evaluate_model(model, loader, device, loss_fn)


def fit(
    model: nn.Module,
    pruner: Optional[Pruner],
    train_loader: Iterable,
    epochs: int,
    optimizer: Optional[torch.optim.Optimizer] = None,
    scheduler: Optional[torch.optim.lr_scheduler.LRScheduler] = None,
    device: Optional[Union[str, torch.device]] = None,
    eval_loader: Optional[Iterable] = None,
    loss_fn: Optional[Callable] = None,
    start_epoch: int = 0,
    callback: Optional[Callable[[dict], None]] = None,
    progress: bool = True,
    max_steps_per_epoch: Optional[int] = None,
    **engine_kwargs,
) -> list[dict]:
    """Train ``model`` for ``epochs`` while ``pruner`` prunes it (``pruner=None``: plain training).

    A one-shot pruner (L1Filter, PFP, LBS, ...) that holds no pruned stripe yet prunes first, on
    ``train_loader`` (``pruner.prune(train_loader)``, then BN statistics re-estimated), and the epochs
    fine-tune; one that has pruned already (``pruner.prune(data)`` called before) is only fine-tuned.
    Per batch: forward, ``loss = loss_fn(out, y) + pruner.penalty()``, ``zero_grad``, backward,
    ``pruner.after_backward()``, ``optimizer.step()``, ``pruner.after_step()``; per epoch:
    ``scheduler.step()``, ``pruner.end_epoch(epoch)``, evaluation on ``eval_loader`` and
    ``callback(record)``. Without ``optimizer``: SGD(lr 0.1, momentum 0.9, weight decay 1e-4)
    with the LR divided by 10 at 50% and 75% of the epochs (SWP's CIFAR recipe), created here
    after the pruner so parameters a pruner attached are trained too. ``start_epoch`` resumes.
    A tqdm progress bar is shown when tqdm is installed and ``progress``.
    Returns the list of per-epoch records (epoch, train loss/accuracy, eval metrics, FLOPs reduction).

    ``engine_kwargs`` go to :class:`stripeconv.engine.Engine`, which runs the loop: ``out_dir=``
    and ``resume=`` for per-epoch checkpoints and a JSONL log, ``ctx=`` for DistributedDataParallel.
    """
    from ..engine import fit as engine_fit

    return engine_fit(model, pruner, train_loader, epochs, optimizer, scheduler, device, eval_loader, loss_fn,
                      start_epoch, callback, progress, max_steps_per_epoch, **engine_kwargs)
