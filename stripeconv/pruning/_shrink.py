"""A physically smaller copy of a masked model, for training, and the way back to full size.

Methods that train many candidate structures (ACP) can train each one as the network without
its dead channels instead of the full-size network with masked weights: the same function and
the same gradients, at the smaller network's cost. Every tensor of the copy knows which entries
of the full-size tensor it holds, so the trained values go back in place (:meth:`Shrunk.expand`).

The entries are found by pruning a float64 copy of the model whose every tensor holds the flat
index of each of its entries: whatever torch-pruning slices (conv filters and input channels, BN,
linear features after a flatten, residual-tied groups), the indices travel with the values.
"""
from __future__ import annotations

import copy
from typing import Optional, Sequence, Union

import torch
from torch import Tensor, nn

from .graph import ChannelGraph, example_input

__all__ = ["Shrunk", "shrink"]


class Shrunk:
    """The smaller model (``model``, plain ``nn.Conv2d`` layers, the same module names as the
    full-size one), its stripe ``masks`` (conv name -> ``[out, kh, kw]`` of the smaller conv; a
    channel that could not be removed keeps its pruned filter there) and ``index`` (tensor name
    -> the flat indices in the full-size tensor of the entries it holds, in its own order;
    integer buffers, which are not sliced, have none)."""

    def __init__(self, model: nn.Module, masks: dict, index: dict):
        self.model = model
        self.masks = masks
        self.index = index

    @torch.no_grad()
    def expand(self, full_state: dict) -> dict:
        """``full_state`` (a full-size ``state_dict``, not modified) with this model's current values
        at the entries they came from."""
        out = {k: v.clone() for k, v in full_state.items()}
        for name, value in self.model.state_dict().items():
            idx = self.index.get(name)
            if idx is None:  # not sliced (integer buffers): the same tensor
                out[name].copy_(value)
            else:
                out[name].view(-1)[idx.to(out[name].device)] = value.reshape(-1).to(out[name].dtype)
        return out


def _dead_roots(graph: ChannelGraph, masks: dict) -> list:
    """(group, root indices to remove): the dead channels of every group that can be pruned,
    always leaving one channel per group (a layer keeps at least one output)."""
    plans = []
    for g, alive in zip(graph.groups, graph.alive_roots(masks)):
        dead = ~alive
        if g.blocked is not None or not bool(dead.any()):
            continue
        if bool(dead.all()):
            dead[0] = False
        plans.append((g, torch.nonzero(dead).flatten().tolist()))
    return plans


def shrink(model: nn.Module, masks: dict, input_size: Union[Sequence[int], Tensor],
           device: Optional[torch.device] = None) -> Shrunk:
    """The dense network that ``model`` with ``masks`` (conv name -> bool ``[out, kh, kw]``) computes
    once its dead channels are removed.

    ``model`` must already carry zeros where its masks prune (and zeroed BN after dead filters,
    as :func:`~stripeconv.pruning.criteria.zero_dead_bn` leaves it), so that a removed channel
    carries 0; it is not modified. ``input_size``: the input shape with batch, or an example
    tensor. The copy lives on ``device`` (default: the model's).
    """
    device = device or next(model.parameters()).device
    index_model = copy.deepcopy(model).cpu().double()
    numbered = set()
    with torch.no_grad():
        for name, t in list(index_model.named_parameters()) + list(index_model.named_buffers()):
            if t.is_floating_point():
                t.copy_(torch.arange(t.numel(), dtype=torch.float64).view(t.shape))
                numbered.add(name)
    x = example_input(index_model, input_size)
    graph = ChannelGraph(index_model, x.detach().cpu().double())  # traces with autograd: not under no_grad
    tp = graph.tp
    for g, ridx in _dead_roots(graph, masks):
        handler = tp.prune_conv_out_channels if isinstance(g.root, nn.Conv2d) else tp.prune_linear_out_channels
        graph.DG.get_pruning_group(g.root, handler, ridx).prune()

    full = dict(model.state_dict())
    small = index_model  # now of the smaller shapes: give it the model's values
    index = {}
    tensors = dict(small.named_parameters())
    tensors.update(dict(small.named_buffers()))
    for name, t in tensors.items():
        if name not in numbered:
            t.data = full[name].detach().clone()
            continue
        idx = t.detach().reshape(-1).to(torch.long)
        index[name] = idx
        source = full[name]
        t.data = source.detach().reshape(-1)[idx.to(source.device)].view(t.shape).clone()
    small = small.to(device)

    small_masks = {}
    for name, mask in masks.items():
        weight = full[f"{name}.weight"]
        # the first entry of each smaller filter names the full-size filter it came from
        first = index[f"{name}.weight"].view(tensors[f"{name}.weight"].shape[0], -1)[:, 0]
        small_masks[name] = mask.to(torch.bool).cpu()[first // max(weight[0].numel(), 1)].clone()
    return Shrunk(small, small_masks, index)

