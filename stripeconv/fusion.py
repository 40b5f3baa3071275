"""Fold eval-mode BatchNorm into the conv before it, for inference.

``BN(conv(x)) = conv'(x)`` with every filter ``n`` scaled by ``s_n = gamma_n / sqrt(var_n + eps)``
and the bias ``b'_n = s_n (b_n - mean_n) + beta_n``. For a :class:`~stripeconv.StripeConv2d` the
kept stripes (and ``constant_channel_weight``) are scaled, so the mask and the speed are those of
the unfused layer, and one elementwise pass over every BN output is saved.
"""
from __future__ import annotations

import copy
from typing import Optional

import torch
from torch import Tensor, fx, nn

from ._plain import plain_conv
from ._tracing import StripeLeafTracer
from .nn import StripeConv2d
from .packing import pack_weight, unpack_weight

__all__ = ["fuse_batchnorm"]


def _pairs(model: nn.Module) -> list[tuple[str, str]]:
    """(conv, bn) module names where the BN is the only reader of the conv's output."""
    try:
        graph = StripeLeafTracer().trace(model)
    except Exception as exc:
        raise ValueError(
            f"fuse_batchnorm needs a model that torch.fx can trace to find conv -> BatchNorm pairs; tracing "
            f"{type(model).__name__} failed: {type(exc).__name__}: {exc}"
        ) from exc
    modules = dict(model.named_modules())
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    pairs = []
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(modules[node.target], nn.BatchNorm2d):
            continue
        source = node.args[0] if node.args else None
        if not isinstance(source, fx.Node) or source.op != "call_module":
            continue
        if not isinstance(modules[source.target], (nn.Conv2d, StripeConv2d)):
            continue
        if modules[node.target].running_mean is None:  # normalises with batch statistics even in eval mode
            continue
        # A conv output that is also read elsewhere, or a module called twice, must stay as it is.
        if len(source.users) == 1 and calls[source.target] == 1 and calls[node.target] == 1:
            pairs.append((source.target, node.target))
    return pairs


def _scale_shift(bn: nn.BatchNorm2d) -> tuple[Tensor, Tensor]:
    if bn.training:
        raise ValueError("fuse_batchnorm folds the running statistics of eval-mode BatchNorm: call model.eval() first")
    scale = torch.rsqrt(bn.running_var.double() + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight.double()
    shift = -bn.running_mean.double() * scale
    if bn.bias is not None:
        shift = shift + bn.bias.double()
    return scale, shift


@torch.no_grad()
def _fold(conv: nn.Module, bn: nn.BatchNorm2d) -> None:
    scale, shift = _scale_shift(bn)
    if conv.out_channels != bn.num_features:
        raise ValueError(f"conv has {conv.out_channels} output channels but the BatchNorm after it "
                         f"{bn.num_features}")
    if isinstance(conv, StripeConv2d):
        weight = conv.packed_weight
        dense = unpack_weight(weight.double(), conv.stripe_mask) * scale.view(-1, 1, 1, 1)
        weight.copy_(pack_weight(dense, conv.stripe_mask))
        if conv.constant_channel_weight is not None:
            conv.constant_channel_weight.mul_(scale.view(-1, 1, 1).to(conv.constant_channel_weight.dtype))
            conv._constant_map_cache = None
    else:
        weight = conv.weight
        weight.mul_(scale.view(-1, 1, 1, 1).to(weight.dtype))
    bias = shift if conv.bias is None else conv.bias.double() * scale + shift
    if conv.bias is None:
        conv.bias = nn.Parameter(bias.to(weight.dtype), requires_grad=weight.requires_grad)
    else:
        conv.bias.copy_(bias)


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def fuse_batchnorm(model: nn.Module, inplace: bool = False, example_input: Optional[Tensor] = None) -> nn.Module:
    """Fold every eval-mode ``BatchNorm2d`` that reads only a conv's output into that conv.

    Works on :class:`~stripeconv.StripeConv2d` and ``nn.Conv2d`` alike; the folded BN becomes
    ``nn.Identity`` and the model keeps its class; a conv with parametrized tensors (``weight_norm``,
    a pruner's filter skeleton) becomes a plain one holding the fused values. The model must be in eval mode and traceable
    by ``torch.fx``. Returns a fused copy unless ``inplace``. With ``example_input``, the fused
    model is checked against the original on it (a ``RuntimeError`` if they differ).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"fuse_batchnorm expects an nn.Module, got {type(model).__name__}")
    fused = model if inplace else copy.deepcopy(model)
    reference = None
    if example_input is not None:
        with torch.no_grad():
            reference = model(example_input)
    for conv_name, bn_name in _pairs(fused):
        conv = fused.get_submodule(conv_name)
        plain = plain_conv(conv)  # a parametrized weight is recomputed on access: fold into real tensors
        if plain is not conv:
            _replace(fused, conv_name, plain)
        _fold(plain, fused.get_submodule(bn_name))
        _replace(fused, bn_name, nn.Identity())
    if reference is not None:
        with torch.no_grad():
            got = fused(example_input)
        tol = 1e-3 if got.dtype in (torch.float16, torch.bfloat16) else 1e-4
        if not torch.allclose(got, reference, atol=tol * max(1.0, reference.abs().max().item()), rtol=tol):
            raise RuntimeError("fuse_batchnorm: the fused model does not compute what the original computes")
    return fused
