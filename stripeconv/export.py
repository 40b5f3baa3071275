"""Turn a model and its stripe masks into a smaller model of :class:`~stripeconv.StripeConv2d` layers.

:func:`export` returns a new model (the input model is not modified) that computes, in eval
mode, the same function as the *masked model* (the model with every conv weight multiplied by
its stripe mask), with:

- every masked ``nn.Conv2d`` replaced by a ``StripeConv2d`` that stores only kept stripes;
- filters that keep no stripe removed, together with everything that depends on their channel:
  the BN entries after them and the input channels (or flattened input features) of the layers
  that read them. Channels tied by residual additions are one group (found by torch-pruning's
  ``DependencyGraph``): a channel is removed only when it is dead in *every* conv that produces
  it. A depthwise conv on the way loses the filters of removed channels. Groups that touch a
  grouped conv that mixes channels, GroupNorm or LayerNorm are left whole (warned).
- the value a removed channel still carried (a dead filter outputs its bias; BN turns that into
  ``beta - mean * gamma / sqrt(var + eps)``, then the activation, residual sums, pooling... act on
  it) folded into the bias of each consuming conv / linear layer. The value is *measured* at the
  consumer's input on random inputs and must be the same constant for every sample and pixel.

Folding into the bias is exact for linear layers and for convs without zero padding. A conv with
zero padding sees the constant at interior pixels but zeros at its borders: with ``fold="exact"``
(default) the constant goes into the consumer's ``constant_channel_weight`` (see
:class:`~stripeconv.StripeConv2d`; a zero-padded consumer that is not pruned becomes a
StripeConv2d keeping every stripe), which reproduces the borders exactly at the cost of a bias;
with ``fold="interior"`` it goes into the bias (exact away from the borders, as filter-pruning
papers implicitly do). Pruners that zero the BN of dead filters (SWP) make the constant 0.

Requires ``torch-pruning`` (imported lazily).
"""
from __future__ import annotations

import warnings
from typing import Optional, Sequence, Union

import torch
from torch import Tensor, nn

from ._plain import plain_copy

__all__ = ["export", "apply_masks"]


@torch.no_grad()
def apply_masks(model: nn.Module, masks: dict) -> nn.Module:
    """Zero the weights of pruned stripes in place (``weight *= mask[:, None]``); returns ``model``."""
    modules = dict(model.named_modules())
    for name, mask in masks.items():
        conv = modules[name]
        if isinstance(conv, nn.Conv2d):
            conv.weight.mul_(mask.to(conv.weight.device, conv.weight.dtype)[:, None])
    return model


def _capture_inputs(model: nn.Module, names: set, x: Tensor, rounds: int = 2) -> dict:
    store: dict[str, list] = {n: [] for n in names}
    handles = []
    for name, m in model.named_modules():
        if name in names:
            handles.append(m.register_forward_hook(lambda mod, inp, out, name=name: store[name].append(inp[0].detach())))
    try:
        with torch.no_grad():
            for _ in range(rounds):
                model(torch.randn_like(x))
    finally:
        for h in handles:
            h.remove()
    return {n: torch.cat(v) for n, v in store.items() if v}


def _constant(values: Tensor, tol: float) -> tuple[bool, float]:
    """Is ``values`` one constant (within tol)? Returns (ok, value)."""
    lo, hi = float(values.min()), float(values.max())
    c = 0.5 * (lo + hi)
    return (hi - lo) <= tol * max(1.0, abs(c)), c


def _zero_padded(conv: nn.Module) -> bool:
    """Does ``conv`` pad its input with zeros (so a constant channel is not constant at its borders)?"""
    if not isinstance(conv, nn.Conv2d) or conv.padding_mode != "zeros":
        return False  # linear layers; reflect/replicate/circular padding keep a constant constant
    if isinstance(conv.padding, str):
        return conv.padding == "same" and conv.kernel_size != (1, 1)
    return any(conv.padding)


def export(
    model: nn.Module,
    masks: dict,
    input_size: Optional[Union[Sequence[int], Tensor]] = None,
    fold: str = "exact",
    tol: float = 1e-5,
    remove_dead: bool = True,
) -> nn.Module:
    """Export ``model`` with stripe ``masks`` (name -> bool ``[out, kh, kw]``) to a new model.

    ``input_size``: the input shape with batch (e.g. ``(1, 3, 32, 32)``) or an example tensor; it is
    needed to trace the dependency graph when some filter keeps no stripe. ``fold``: ``"exact"`` or
    ``"interior"`` (see the module docstring). ``remove_dead=False`` only converts the convs.
    The result is in eval mode; its ``state_dict`` loads into the same architecture (shapes come
    from the stored masks / tensors).
    """
    from .nn import convert

    if fold not in ("exact", "interior"):
        raise ValueError(f"fold must be 'exact' or 'interior', got {fold!r}")
    new = plain_copy(model).eval()  # masks and removals must act on real tensors, not parametrized ones
    modules = dict(new.named_modules())
    masks = {k: v.detach().to(torch.bool).cpu().clone() for k, v in masks.items()}
    for name, mask in masks.items():
        if name not in modules or not isinstance(modules[name], nn.Conv2d):
            raise KeyError(f"export: masks name {name!r} is not an nn.Conv2d of the model")
        conv = modules[name]
        exp = (conv.out_channels, *conv.kernel_size)
        if tuple(mask.shape) != exp:
            raise ValueError(f"export: mask for {name!r} has shape {list(mask.shape)}, expected {list(exp)}")
    apply_masks(new, masks)

    any_dead = any(not bool(m.reshape(m.shape[0], -1).any(1).all()) for m in masks.values())
    constant_channels: dict[str, Tensor] = {}
    if remove_dead and any_dead:
        masks, constant_channels = _remove_dead(new, masks, input_size, fold, tol)
    modules = dict(new.named_modules())
    for name in constant_channels:  # a zero-padded consumer that is not pruned still needs the term
        if name not in masks:
            conv = modules[name]
            masks[name] = torch.ones(conv.out_channels, *conv.kernel_size, dtype=torch.bool)
    convert(new, {k: v.to(modules[k].weight.device) for k, v in masks.items()})
    modules = dict(new.named_modules())
    for name, weight in constant_channels.items():
        modules[name].add_constant_channel(weight)
    return new.eval()


def _remove_dead(new: nn.Module, masks: dict, input_size, fold: str, tol: float) -> tuple[dict, dict]:
    """Remove dead channel groups from ``new`` in place, folding the constants they carry.

    Returns the masks of the smaller model and, per zero-padded consumer conv (with
    ``fold="exact"``), the ``[out, kh, kw]`` constant-channel weight to attach after conversion.
    """
    from .pruning.graph import ChannelGraph, example_input

    x = example_input(new, input_size)
    graph = ChannelGraph(new, x)
    tp = graph.tp
    modules = graph.modules
    roots_alive = graph.alive_roots(masks)
    dead_groups = [(gi, g) for gi, g in enumerate(graph.groups) if g.blocked is None and not bool(roots_alive[gi].all())]
    blocked = [g for g in graph.groups if g.blocked is not None and any(
        p[0] in masks and not bool(masks[p[0]].reshape(masks[p[0]].shape[0], -1).any(1).all()) for p in g.producers)]
    for g in blocked:
        warnings.warn(f"export: channels of {g.root_name} are not removed: {g.blocked}", stacklevel=3)
    if not dead_groups:
        return masks, {}

    consumers = {c[0] for _, g in dead_groups for c in g.consumers}
    inputs = _capture_inputs(new, consumers, x.expand(max(2, x.shape[0]), *x.shape[1:]).contiguous())
    plans = []  # (group, removable root idx tensor, folds)
    for gi, g in dead_groups:
        dead = ~roots_alive[gi]
        folds = []  # (consumer name, consumer idx tensor, constant values tensor)
        for name, idx, ridx in g.consumers:
            sel = dead[ridx]
            if not bool(sel.any()):
                continue
            cidx, cr = idx[sel], ridx[sel]
            X = inputs.get(name)
            layer = modules[name]
            values = torch.zeros(len(cidx))
            for k, (i, r) in enumerate(zip(cidx.tolist(), cr.tolist())):
                if X is None:
                    dead[r] = False
                    continue
                ok, c = _constant(X[:, i], tol)
                if not ok:
                    dead[r] = False
                values[k] = c
            folds.append((name, cidx, cr, values))
        varying = int((~roots_alive[gi] & ~dead).sum())
        if varying:
            warnings.warn(f"export: {varying} dead channel(s) of {g.root_name} stay: what they carry to their "
                          "consumers is not one constant (the BN shift of a dead filter through a zero-padded "
                          "depthwise conv varies at the borders); zeroing the BN of dead filters (zero_bn=True) "
                          "lets export remove them", stacklevel=3)
        if bool(dead.all()):  # never remove a whole layer: keep one channel (it carries its constant)
            dead[0] = False
        if bool(dead.any()):
            plans.append((g, dead, folds))
    constant_channels: dict[str, Tensor] = {}  # consumer -> [out, kh, kw], original out-channel order
    with torch.no_grad():
        for g, dead, folds in plans:  # fold constants into consumer biases (original indices)
            for name, cidx, cr, values in folds:
                sel = dead[cr]
                if not bool(sel.any()):
                    continue
                layer = modules[name]
                i, v = cidx[sel], values[sel].to(layer.weight.device, layer.weight.dtype)
                if bool((v == 0).all()):
                    continue
                if fold == "exact" and _zero_padded(layer):
                    term = (layer.weight[:, i] * v[None, :, None, None]).sum(1)
                    constant_channels[name] = constant_channels.get(name, 0) + term
                    continue
                if isinstance(layer, nn.Conv2d):
                    delta = (layer.weight[:, i].sum((2, 3)) * v).sum(1)
                else:
                    delta = layer.weight[:, i] @ v
                if layer.bias is None:
                    layer.bias = nn.Parameter(torch.zeros(layer.weight.shape[0], device=layer.weight.device,
                                                          dtype=layer.weight.dtype))
                layer.bias.add_(delta)
    removed: dict[str, Tensor] = {}
    for g, dead, folds in plans:
        root_handler = tp.prune_conv_out_channels if isinstance(g.root, nn.Conv2d) else tp.prune_linear_out_channels
        ridx = torch.nonzero(dead).flatten().tolist()
        group = graph.DG.get_pruning_group(g.root, root_handler, ridx)
        for item in group.items:
            mod = item.dep.target.module
            if isinstance(mod, nn.Conv2d) and graph.DG.is_out_channel_pruning_fn(item.dep.handler):
                removed[graph.names[mod]] = torch.as_tensor(list(item.idxs), dtype=torch.long)
        group.prune()
    out = {}
    for name, mask in masks.items():
        if name in removed:
            keep = torch.ones(mask.shape[0], dtype=torch.bool)
            keep[removed[name]] = False
            mask = mask[keep]
        out[name] = mask
    for name, term in constant_channels.items():  # the consumer's own dead filters are gone too
        if name in removed:
            keep = torch.ones(term.shape[0], dtype=torch.bool, device=term.device)
            keep[removed[name].to(term.device)] = False
            constant_channels[name] = term[keep]
    return out, constant_channels
