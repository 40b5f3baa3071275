"""Plain convs in place of parametrized ones (``torch.nn.utils.parametrize``: weight_norm, SWP's filter
skeleton...), for the steps that edit a conv's tensors in place: a parametrized tensor is recomputed on
every access, so an in-place edit of it changes a temporary and is lost."""
from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn.utils import parametrize

from .nn import StripeConv2d

__all__ = ["plain_conv", "plain_copy"]


def plain_conv(conv: nn.Module) -> nn.Module:
    """``conv`` itself, or for a parametrized ``nn.Conv2d`` / ``StripeConv2d`` a plain module of the same
    kind and configuration holding the current effective tensors (mask, constant channel, requires_grad
    and train mode kept)."""
    if not (isinstance(conv, (nn.Conv2d, StripeConv2d)) and parametrize.is_parametrized(conv)):
        return conv
    args = (conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
            conv.groups, conv.bias is not None, conv.padding_mode)
    with torch.no_grad():
        if isinstance(conv, StripeConv2d):
            source = conv.packed_weight
            plain = StripeConv2d(*args, device=source.device, dtype=source.dtype, stripe_mask=conv.stripe_mask)
            if conv.constant_channel_weight is not None:
                plain.add_constant_channel(conv.constant_channel_weight)
            target = plain.packed_weight
        else:
            source = conv.weight
            plain = nn.Conv2d(*args, device=source.device, dtype=source.dtype)
            target = plain.weight
        target.copy_(source).requires_grad_(source.requires_grad)
        if conv.bias is not None:
            plain.bias.copy_(conv.bias).requires_grad_(conv.bias.requires_grad)
    return plain.train(conv.training)


def plain_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` whose parametrized convs are :func:`plain_conv` ones.

    (``remove_parametrizations`` is not used on copies: it deletes the property from the class that
    the copy shares with the original model.)
    """
    model = copy.deepcopy(model)
    for name, module in list(model.named_modules()):
        plain = plain_conv(module)
        if plain is not module:
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, plain)
    return model
