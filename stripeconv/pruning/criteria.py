"""Shared primitives of the pruning methods.

- layer discovery: :func:`prunable_convs`
- norms at any granularity: :func:`stripe_norms`, :func:`filter_norms`, :func:`channel_norms`,
  :func:`position_norms`
- selection: :func:`lowest_k`, :func:`select_per_layer`, :func:`select_global`, and
  :func:`select_to_target` (per-layer ratios / one ratio / a FLOPs-reduction target)
- conversion to stripe masks: :func:`filters_to_stripes`, :func:`positions_to_stripes`,
  :func:`channels_to_stripes`, :func:`units_to_stripes`
- applying masks: :func:`apply_masks`, :func:`mask_grads`, :func:`conv_bn_pairs`,
  :func:`zero_dead_bn`, :func:`dead_filters`

A stripe mask is a bool tensor ``[out, kh, kw]`` (True = kept); masks are dicts from
``model.named_modules()`` names to stripe masks. "Units" are what a method scores: filters
(``[out]``), stripes (``[out, kh, kw]``) or kernel positions (``[kh, kw]``).
"""
from __future__ import annotations

import math
import warnings
from typing import Callable, Iterable, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from .._tracing import forward_with_hooks
from ..export import apply_masks  # noqa: F401  (re-exported: zero pruned stripes in place)
from .graph import is_depthwise

__all__ = [
    "prunable_convs", "stripe_norms", "filter_norms", "channel_norms", "position_norms",
    "lowest_k", "select_per_layer", "select_global", "select_to_target", "units_to_stripes",
    "filters_to_stripes", "positions_to_stripes", "channels_to_stripes", "apply_masks", "mask_grads",
    "conv_bn_pairs", "zero_dead_bn", "dead_filters", "full_masks",
]


# ------------------------------------------------------------------------------ discovery
def prunable_convs(
    model: nn.Module,
    layers: Optional[Iterable[str]] = None,
    skip_first: bool = False,
    skip_1x1: bool = False,
    exclude: Iterable[str] = (),
    warn: bool = True,
) -> dict[str, nn.Conv2d]:
    """The ``nn.Conv2d`` layers a method may prune, by name, in model order.

    Grouped and depthwise convs are skipped: a stripe mask would be valid for them but the
    methods' criteria do not handle their coupling. A depthwise conv (one filter per channel)
    follows the conv that produces its input: its filters go with the channels pruned there.
    Other grouped convs are warned about, and the channels they read are never removed.
    ``skip_first`` skips the first conv (the stem), ``skip_1x1`` skips 1x1 convs (e.g. ResNet
    projection shortcuts, where a stripe is a whole filter); ``layers`` restricts to the given names.
    """
    wanted = _name_set("layers", layers) if layers is not None else None
    exclude = _name_set("exclude", exclude)
    out, skipped, first = {}, [], True
    for name, m in model.named_modules():
        if not isinstance(m, nn.Conv2d) or type(m).__name__ == "StripeConv2d":
            continue
        is_first, first = first, False
        if wanted is not None and name not in wanted:
            continue
        if name in exclude or (skip_first and is_first) or (skip_1x1 and m.kernel_size == (1, 1)):
            continue
        if m.groups > 1:
            if not is_depthwise(m):
                skipped.append(name)
            continue
        out[name] = m
    if skipped and warn:
        warnings.warn(f"pruning: grouped convs left unpruned, with the channels they read: {', '.join(skipped)}",
                      stacklevel=3)
    names = {n for n, _ in model.named_modules()}
    for what, given in (("layers", wanted or set()), ("exclude", exclude)):
        if given - names:
            raise KeyError(f"pruning: {what} names no module of the model: {sorted(given - names)}")
    return out


def _name_set(what: str, names: Union[str, Iterable[str]]) -> set[str]:
    """Module names as a set; one string is one name (not the characters of it)."""
    if isinstance(names, str):
        return {names}
    names = set(names)
    if not all(isinstance(n, str) for n in names):
        raise TypeError(f"pruning: {what} must be module names (str), got {sorted(map(repr, names))}")
    return names


def full_masks(convs: dict[str, nn.Conv2d]) -> dict[str, Tensor]:
    """A stripe mask keeping everything (all True ``[out, kh, kw]``) for each of ``convs``, on its weight's device."""
    return {n: torch.ones(c.out_channels, *c.kernel_size, dtype=torch.bool, device=c.weight.device)
            for n, c in convs.items()}


# --------------------------------------------------------------------------------- norms
def _norm(w: Tensor, dims, p: int) -> Tensor:
    return w.abs().sum(dims) if p == 1 else w.pow(2).sum(dims).sqrt()


def stripe_norms(weight: Tensor, p: int = 1) -> Tensor:
    """``[out, kh, kw]``: the Lp norm of each stripe ``weight[n, :, i, j]``."""
    return _norm(weight.detach(), 1, p)


def filter_norms(weight: Tensor, p: int = 1) -> Tensor:
    """``[out]``: the Lp norm of each filter."""
    return _norm(weight.detach(), (1, 2, 3), p)


def channel_norms(weight: Tensor, p: int = 1) -> Tensor:
    """``[in / groups]``: the Lp norm of each input channel's weights."""
    return _norm(weight.detach(), (0, 2, 3), p)


def position_norms(weight: Tensor, p: int = 1) -> Tensor:
    """``[kh, kw]``: the Lp norm of each kernel position over all filters."""
    return _norm(weight.detach(), (0, 1), p)


# ------------------------------------------------------------------------------ selection
def lowest_k(scores: Tensor, k: int, candidates: Optional[Tensor] = None) -> Tensor:
    """Bool tensor like ``scores``: True on the ``k`` lowest scores (among ``candidates``)."""
    flat = scores.reshape(-1).float().clone()
    sel = torch.zeros_like(flat, dtype=torch.bool)
    if candidates is not None:
        flat[~candidates.reshape(-1)] = math.inf
        k = min(k, int(candidates.sum()))
    k = max(0, min(int(k), flat.numel()))
    if k:
        sel[torch.topk(flat, k, largest=False).indices] = True
    return sel.reshape(scores.shape)


def _keep_floor(scores: Tensor, granularity_min: int = 1) -> int:
    return min(granularity_min, scores.numel())


def select_per_layer(scores: dict, ratios: Union[float, dict], min_keep: int = 1) -> dict[str, Tensor]:
    """Prune the lowest ``ratio`` fraction of units in every layer (``ratios``: one or per layer).
    Units scored ``inf`` (or NaN) are never pruned."""
    out = {}
    for name, s in scores.items():
        r = ratios.get(name, 0.0) if isinstance(ratios, dict) else ratios
        k = min(int(math.floor(r * s.numel() + 1e-9)), s.numel() - _keep_floor(s, min_keep))
        out[name] = lowest_k(s, k, candidates=torch.isfinite(s))
    return out


def select_global(scores: dict, k: int, min_keep: int = 1) -> dict[str, Tensor]:
    """Prune the ``k`` lowest units over all layers together (each layer keeps ``min_keep``).
    Units scored ``inf`` (or NaN) are never pruned."""
    names = list(scores)
    flat = torch.cat([scores[n].reshape(-1).float().cpu() for n in names])
    sel = lowest_k(flat, k, candidates=torch.isfinite(flat))
    out, off = {}, 0
    for n in names:
        s = scores[n]
        part = sel[off: off + s.numel()].reshape(s.shape).to(s.device)
        off += s.numel()
        keep = s.numel() - int(part.sum())
        if keep < min_keep:  # give back the best units of a layer that would vanish
            order = torch.argsort(s.reshape(-1).float(), descending=True)[: min_keep - keep]
            part.reshape(-1)[order] = False
        out[n] = part
    return out


def units_to_stripes(pruned: Tensor, out_channels: int, kernel_size: tuple[int, int]) -> Tensor:
    """Stripe mask (True = kept) from pruned units: filters [out], stripes [out, kh, kw] or positions [kh, kw]."""
    kh, kw = kernel_size
    if pruned.shape == (out_channels, kh, kw):
        return ~pruned
    if pruned.shape == (out_channels,):
        return filters_to_stripes(~pruned, kernel_size)
    if pruned.shape == (kh, kw):
        return positions_to_stripes(~pruned, out_channels)
    raise ValueError(f"cannot turn units of shape {list(pruned.shape)} into stripes of [{out_channels}, {kh}, {kw}]")


def filters_to_stripes(keep_filters: Tensor, kernel_size: tuple[int, int]) -> Tensor:
    """``[out]`` kept filters -> ``[out, kh, kw]`` stripe mask."""
    return keep_filters[:, None, None].expand(-1, *kernel_size).clone()


def positions_to_stripes(keep_positions: Tensor, out_channels: int) -> Tensor:
    """``[kh, kw]`` kept kernel positions -> ``[out, kh, kw]`` stripe mask (same for every filter)."""
    return keep_positions[None].expand(out_channels, -1, -1).clone()


def channels_to_stripes(model: nn.Module, input_size: Union[Sequence[int], Tensor], conv_name: str,
                        keep_channels: Tensor, masks: Optional[dict] = None) -> dict[str, Tensor]:
    """Prune *input* channels of ``conv_name``: returns stripe masks of the convs producing them.

    An input channel disappears when the filters producing it keep no stripe; with residual
    additions every coupled producer must drop it (found with the dependency graph). Producers
    that are not convs (e.g. the network input) cannot be pruned and raise ``ValueError``.
    """
    from .graph import ChannelGraph

    graph = ChannelGraph(model, input_size)
    masks = {k: v.clone() for k, v in (masks or {}).items()}
    if conv_name not in graph.consumer_of:
        raise ValueError(f"{conv_name!r} reads no prunable channels (its input is not produced by a conv)")
    drop = torch.nonzero(~keep_channels.cpu()).flatten()
    for gi, idx, ridx in graph.consumer_of[conv_name]:
        g = graph.groups[gi]
        sel = torch.isin(idx, drop)
        roots = ridx[sel]
        if not len(roots):
            continue
        if g.blocked:
            raise ValueError(f"channels of {conv_name!r} cannot be pruned: {g.blocked}")
        for name, pidx, pr in g.producers:
            conv = graph.modules[name]
            if not isinstance(conv, nn.Conv2d):
                raise ValueError(f"channel producer {name!r} is not a conv")
            m = masks.get(name, torch.ones(conv.out_channels, *conv.kernel_size, dtype=torch.bool))
            m[pidx[torch.isin(pr, roots)]] = False
            masks[name] = m
    return masks


def select_to_target(
    scores: dict,
    convs: dict,
    flops_fn: Callable[[dict], int],
    dense_flops: int,
    ratio: Optional[float] = None,
    ratios: Optional[dict] = None,
    target_flops_reduction: Optional[float] = None,
    scope: str = "layer",
    base_masks: Optional[dict] = None,
    min_keep: int = 1,
) -> dict[str, Tensor]:
    """Stripe masks pruning the lowest-scored units to meet one target.

    Exactly one of ``ratios`` (name -> fraction of that layer's units), ``ratio`` (fraction:
    the same in every layer with ``scope="layer"``, of all units together with
    ``scope="global"``) or ``target_flops_reduction`` (fraction of the model's FLOPs, as
    ``flops_fn`` counts them, to remove; the per-layer ratio / global count is found by
    bisection) must be given. ``base_masks`` are already-pruned stripes kept pruned.
    """
    given = sum(v is not None for v in (ratio, ratios, target_flops_reduction))
    if given != 1:
        raise ValueError("give exactly one of ratio=, ratios= or target_flops_reduction=")
    if scope not in ("layer", "global"):
        raise ValueError(f"scope must be 'layer' or 'global', got {scope!r}")

    def masks_for(param: float) -> dict:
        if scope == "layer":
            sel = select_per_layer(scores, param if ratios is None else ratios, min_keep)
        else:
            sel = select_global(scores, int(round(param)), min_keep)
        out = {}
        for n, s in sel.items():
            m = units_to_stripes(s, convs[n].out_channels, convs[n].kernel_size)
            if base_masks is not None and n in base_masks:
                m = m & base_masks[n].to(m.device)
            out[n] = m
        return out

    total_units = sum(s.numel() for s in scores.values())
    if ratios is not None:
        return masks_for(0.0)
    if ratio is not None:
        return masks_for(ratio if scope == "layer" else ratio * total_units)
    goal = (1.0 - target_flops_reduction) * dense_flops
    lo, hi = 0.0, (1.0 if scope == "layer" else float(total_units))
    if flops_fn(masks_for(hi)) > goal:
        warnings.warn(f"target_flops_reduction={target_flops_reduction} cannot be reached by pruning these layers; "
                      "pruning as much as allowed", stacklevel=3)
        return masks_for(hi)
    for _ in range(40 if scope == "layer" else max(1, int(math.ceil(math.log2(total_units + 1))) + 1)):
        mid = 0.5 * (lo + hi) if scope == "layer" else float(int((lo + hi) // 2))
        if flops_fn(masks_for(mid)) <= goal:
            hi = mid
        else:
            lo = mid + (0 if scope == "layer" else 1)
        if scope == "global" and lo >= hi:
            break
    return masks_for(hi)


# ------------------------------------------------------------------------------- applying
@torch.no_grad()
def mask_grads(convs: dict, masks: dict) -> None:
    """Zero the gradients of pruned stripes (so optimizers do not move them, momentum aside)."""
    for name, conv in convs.items():
        w = conv.weight
        if w.grad is not None and name in masks:
            w.grad.mul_(masks[name].to(w.grad.device, w.grad.dtype)[:, None])


def conv_bn_pairs(model: nn.Module,
                  example_inputs: Optional[Union[Sequence[int], Tensor]]) -> dict[str, nn.BatchNorm2d]:
    """Conv name -> the BatchNorm2d that directly normalises its output (found by one forward pass)."""
    from .graph import example_input

    produced: dict[int, str] = {}
    pairs: dict[str, nn.BatchNorm2d] = {}
    handles = []
    names = {m: n for n, m in model.named_modules()}
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            handles.append(m.register_forward_hook(lambda mod, i, o: produced.__setitem__(id(o), names[mod])))
        elif isinstance(m, nn.BatchNorm2d):
            def pre(mod, inp):
                src = produced.get(id(inp[0]))
                if src is not None and mod.num_features == inp[0].shape[1]:
                    pairs[src] = mod
            handles.append(m.register_forward_pre_hook(pre))
    forward_with_hooks(model, example_input(model, example_inputs), handles)
    return pairs


def dead_filters(mask: Tensor) -> Tensor:
    """``[out]`` bool: filters that keep no stripe."""
    return ~mask.reshape(mask.shape[0], -1).any(1)


@torch.no_grad()
def zero_dead_bn(convs: dict, masks: dict, bn_of: dict, grads: bool = False) -> None:
    """Zero the conv bias and the BN affine of filters that keep no stripe (their grads with ``grads``).

    The channel then carries exactly 0 (after ReLU), so export removes it without any constant.
    """
    for name, conv in convs.items():
        if name not in masks:
            continue
        dead = dead_filters(masks[name]).to(conv.weight.device)
        if not bool(dead.any()):
            continue
        targets = [conv.bias] if conv.bias is not None else []
        bn = bn_of.get(name)
        if bn is not None and bn.affine:
            targets += [bn.weight, bn.bias]
        for p in targets:
            t = p.grad if grads else p
            if t is not None:
                t[dead] = 0
