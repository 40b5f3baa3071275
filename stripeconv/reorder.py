"""Permute the filters of a model's stripe layers into tile order, without changing what it computes.

The Triton forward groups a layer's filters into tiles whose kept positions overlap
(:mod:`stripeconv.backends.triton_plans`). Clustered tiles hold scattered output channels, so the
kernel stores them as 2-byte values (or through a second pass) and the backward gathers the
output gradient into tile order first. :func:`reorder_filters` permutes each layer's filters by
:func:`~stripeconv.backends.triton_plans.filter_order`, so that clustered tiles become runs of
consecutive channels (16-byte vector stores), and permutes whatever reads those channels to
match: the BatchNorm, activations and pooling on the way and the input channels of the next conv
or linear layer. A layer qualifies when its output reaches only such layers (VGG-style chains,
the inner convs of residual blocks). One whose output joins a residual sum, a concatenation or the
model's output keeps its order; :func:`reorderable` says which and why.
"""
from __future__ import annotations

import copy
import operator
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn
from torch.nn.utils import parametrize

from ._modes import set_eval
from ._tracing import StripeLeafTracer
from .backends.triton_plans import filter_order
from .nn import StripeConv2d
from .packing import pack_weight, unpack_weight

__all__ = ["reorder_filters", "reorderable"]

# Modules and functions that act on each channel alone (or on none): the channels pass through them.
_PASS_MODULES = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish, nn.Hardswish,
                 nn.Hardsigmoid, nn.Hardtanh, nn.Sigmoid, nn.Tanh, nn.Softplus, nn.Identity, nn.Dropout,
                 nn.Dropout2d, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)
_PASS_FUNCTIONS = {F.relu, F.relu_, torch.relu, torch.relu_, F.relu6, F.leaky_relu, F.elu, F.selu, F.gelu, F.silu,
                   F.mish, F.hardswish, F.hardsigmoid, F.hardtanh, torch.sigmoid, torch.tanh, F.softplus, F.dropout,
                   F.dropout2d, F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d, F.adaptive_max_pool2d}
_PASS_METHODS = {"relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "contiguous"}


@dataclass
class _Chain:
    """What reads one layer's output channels: BatchNorms and depthwise convs to permute, and the layers whose input
    channels (``conv``) or flattened features (``linear``) follow the permutation."""

    norms: list = field(default_factory=list)
    depthwise: list = field(default_factory=list)  # one filter per channel: the channels pass through
    convs: list = field(default_factory=list)
    linears: list = field(default_factory=list)


def _trace(model: nn.Module) -> fx.Graph:
    try:
        return StripeLeafTracer().trace(model)
    except Exception as exc:
        raise ValueError(
            f"reorder_filters needs a model that torch.fx can trace to find what reads each layer's channels; "
            f"tracing {type(model).__name__} failed: {type(exc).__name__}: {exc}") from exc


def _flatten_start(node: fx.Node, modules: dict) -> Optional[int]:
    """The start dimension of a flatten to the last dimension; None for any other node."""
    if node.op == "call_module" and isinstance(modules[node.target], nn.Flatten):
        m = modules[node.target]
        return m.start_dim if m.end_dim == -1 else None
    if (node.op == "call_function" and node.target is torch.flatten) or \
            (node.op == "call_method" and node.target == "flatten"):
        start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
        end = node.args[2] if len(node.args) > 2 else node.kwargs.get("end_dim", -1)
        return start if end == -1 else None
    if node.op == "call_method" and node.target in ("view", "reshape") and len(node.args) == 3 \
            and node.args[2] == -1 and _batch_size_of(node.args[1], node.args[0]):
        return 1  # x.view(x.size(0), -1)
    return None


def _batch_size_of(value, tensor: fx.Node) -> bool:
    """``value`` is ``tensor.size(0)`` or ``tensor.shape[0]``."""
    if not isinstance(value, fx.Node):
        return False
    if value.op == "call_method" and value.target == "size":
        return value.args[:1] == (tensor,) and (value.args[1:] == (0,) or value.kwargs == {"dim": 0})
    if value.op == "call_function" and value.target is operator.getitem and value.args[1] == 0:
        shape = value.args[0]
        return isinstance(shape, fx.Node) and shape.op == "call_function" and shape.target is getattr \
            and shape.args == (tensor, "shape")
    return False


def _reads_batch_size(node: fx.Node, tensor: fx.Node) -> bool:
    """``node`` reads only the batch size of ``tensor`` (``tensor.size(0)``, ``tensor.shape[0]``)."""
    if _batch_size_of(node, tensor):
        return True
    return node.op == "call_function" and node.target is getattr and node.args == (tensor, "shape") \
        and all(_batch_size_of(user, tensor) for user in node.users)


def _passes_channels(node: fx.Node, modules: dict) -> bool:
    """``node`` acts on each channel alone (or on none): the channels pass through it unmixed."""
    if node.op == "call_module":
        return isinstance(modules[node.target], _PASS_MODULES + (nn.BatchNorm2d, nn.PReLU))
    if node.op == "call_function":
        return node.target in _PASS_FUNCTIONS
    return node.op == "call_method" and node.target in _PASS_METHODS


def _describe(node: fx.Node, modules: dict) -> str:
    if node.op == "output":
        return "it is the model's output"
    if node.op == "call_module":
        return f"its output is read by {node.target} ({type(modules[node.target]).__name__})"
    name = getattr(node.target, "__name__", str(node.target))
    if node.op == "call_function" and node.target in (operator.add, operator.iadd, torch.add):
        return f"its output is read by {name} (a residual sum)"
    if node.op == "call_function" and node.target in (torch.cat, torch.concat):
        return f"its output is read by {name} (a concatenation)"
    return f"its output is read by {'the tensor method .' if node.op == 'call_method' else ''}{name}"


def _readers(node: fx.Node, modules: dict, calls: dict, channels: int, chain: _Chain) -> Optional[str]:
    """Follow the users of ``node`` (a tensor whose dim 1 holds a layer's channels) into ``chain``;
    why the channels cannot be permuted, or None."""
    for user in node.users:
        if _reads_batch_size(user, node):
            continue
        others = list(user.args[1:]) + list(user.kwargs.values())
        if user.args[:1] != (node,) or any(a is node for a in others):
            return _describe(user, modules)
        module = modules.get(user.target) if user.op == "call_module" else None
        # Modules with per-channel tensors, and layers that read the channels, are permuted: once
        stateful = isinstance(module, (nn.Conv2d, StripeConv2d, nn.BatchNorm2d, nn.PReLU))
        if stateful and calls[user.target] > 1:
            return f"{user.target} is called more than once"
        if isinstance(module, (nn.Conv2d, StripeConv2d)):
            if parametrize.is_parametrized(module):
                return f"{user.target} has parametrized tensors"
            if module.groups == 1:
                chain.convs.append(user.target)
                continue
            if not module.groups == module.in_channels == module.out_channels == channels:
                return f"{user.target} is a grouped conv (groups={module.groups})"
            chain.depthwise.append(user.target)
            reason = _readers(user, modules, calls, channels, chain)
            if reason is not None:
                return reason
            continue
        flatten = _flatten_start(user, modules)
        if flatten is not None:
            reason = (_linear_readers(user, modules, calls, chain) if flatten == 1
                      else f"{user.format_node()} does not flatten from dim 1")
        elif _passes_channels(user, modules):
            if isinstance(module, nn.BatchNorm2d) and module.num_features != channels:
                return f"{user.target} normalises {module.num_features} channels, not {channels}"
            if isinstance(module, nn.BatchNorm2d) or (isinstance(module, nn.PReLU) and module.num_parameters > 1):
                chain.norms.append(user.target)
            reason = _readers(user, modules, calls, channels, chain)
        else:
            reason = _describe(user, modules)
        if reason is not None:
            return reason
    return None


def _linear_readers(node: fx.Node, modules: dict, calls: dict, chain: _Chain) -> Optional[str]:
    """The users of a flatten(1) of the channels: linear layers (their inputs are channel-major
    features), through dropout or identity."""
    for user in node.users:
        module = modules.get(user.target) if user.op == "call_module" else None
        if user.args[:1] != (node,) or len(user.args) > 1 or user.kwargs:
            return f"the flattened output is read by {user.format_node()}"
        if isinstance(module, (nn.Dropout, nn.Identity)):
            reason = _linear_readers(user, modules, calls, chain)
            if reason is not None:
                return reason
            continue
        if not isinstance(module, nn.Linear):
            return f"the flattened output is read by {user.format_node()}"
        if calls[user.target] > 1:
            return f"{user.target} is called more than once"
        if parametrize.is_parametrized(module):
            return f"{user.target} has parametrized tensors"
        chain.linears.append(user.target)
    return None


def _analyse(model: nn.Module) -> dict[str, tuple[Optional[str], _Chain]]:
    graph = _trace(model)
    modules = dict(model.named_modules())
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    result = {}
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(modules[node.target], StripeConv2d):
            continue
        layer, chain = modules[node.target], _Chain()
        if calls[node.target] > 1:
            reason = "it is called more than once"
        elif layer.groups != 1:
            reason = f"it is a grouped conv (groups={layer.groups}): its filters stay in their groups"
        elif parametrize.is_parametrized(layer):
            reason = "it has parametrized tensors"
        else:
            reason = _readers(node, modules, calls, layer.out_channels, chain)
            if reason is None and not (chain.convs or chain.linears):
                reason = "no conv or linear layer reads its output"
        result[node.target] = (reason, chain)
    for name, module in model.named_modules():  # layers the trace never reached (unused ones)
        if isinstance(module, StripeConv2d) and name not in result:
            result[name] = ("the traced forward does not call it", _Chain())
    return result


def reorderable(model: nn.Module) -> dict[str, Optional[str]]:
    """Per StripeConv2d layer of ``model`` (by name): None if :func:`reorder_filters` can permute its
    filters, else why not (e.g. ``"its output is read by add (a residual sum)"``)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"reorderable expects an nn.Module, got {type(model).__name__}")
    return {name: reason for name, (reason, _) in _analyse(model).items()}


@torch.no_grad()
def _permute_filters(layer: StripeConv2d, perm: Tensor) -> None:
    mask = layer.stripe_mask
    dense = unpack_weight(layer.packed_weight, mask)[perm]
    new_mask = mask[perm.to(mask.device)].contiguous()
    weight = layer.packed_weight
    weight.copy_(pack_weight(dense, new_mask))  # the same rows, another order: shape and Parameter kept
    weight.grad = None
    layer.stripe_mask = new_mask
    if layer.bias is not None:
        layer.bias.copy_(layer.bias[perm])
        layer.bias.grad = None
    if layer.constant_channel_weight is not None:
        layer.constant_channel_weight = layer.constant_channel_weight[perm].contiguous()
    layer._constant_map_cache = None


@torch.no_grad()
def _permute_depthwise(module: nn.Module, perm: Tensor) -> None:
    if isinstance(module, StripeConv2d):
        _permute_filters(module, perm)
        return
    _permute_norm(module, perm)  # weight [C, 1, kh, kw] and bias [C]: one entry per channel


@torch.no_grad()
def _permute_inputs(module: nn.Module, perm: Tensor) -> None:
    weight = module.packed_weight if isinstance(module, StripeConv2d) else module.weight
    weight.copy_(weight[:, perm])
    weight.grad = None


@torch.no_grad()
def _permute_norm(module: nn.Module, perm: Tensor) -> None:
    for name in ("weight", "bias", "running_mean", "running_var"):
        t = getattr(module, name, None)
        if t is not None:
            t.copy_(t[perm])
            t.grad = None


@torch.no_grad()
def _permute_features(linear: nn.Linear, perm: Tensor) -> None:
    channels = perm.numel()
    if linear.in_features % channels:
        raise ValueError(f"a linear layer with {linear.in_features} inputs reads a flatten of {channels} channels")
    per_channel = linear.in_features // channels
    index = (perm.view(-1, 1) * per_channel + torch.arange(per_channel, device=perm.device)).reshape(-1)
    linear.weight.copy_(linear.weight[:, index])
    linear.weight.grad = None


def reorder_filters(model: nn.Module, inplace: bool = False, example_input: Optional[Tensor] = None) -> nn.Module:
    """Permute the filters of every StripeConv2d that :func:`reorderable` allows into the order of
    :func:`~stripeconv.backends.triton_plans.filter_order`, and the layers that read them to match.

    The model computes the same function (up to float rounding: sums run in another order); its
    StripeConv2d layers get permuted masks. Do it before an optimizer is made, or make it again
    (the optimizer's state is not permuted). The model must be traceable by ``torch.fx``. Returns a
    reordered copy unless ``inplace``. With ``example_input``, the result is checked against the
    original on it (a ``RuntimeError`` if they differ; in eval mode, so dropout and BatchNorm
    statistics do not differ between the two runs).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"reorder_filters expects an nn.Module, got {type(model).__name__}")
    reordered = model if inplace else copy.deepcopy(model)
    reference = None
    if example_input is not None:
        reference = _eval_output(model, example_input)
    for name, (reason, chain) in _analyse(reordered).items():
        if reason is not None:
            continue
        layer = reordered.get_submodule(name)
        perm = filter_order(layer.stripe_mask)
        if torch.equal(perm, torch.arange(perm.numel())):
            continue
        perm = perm.to(layer.packed_weight.device)
        _permute_filters(layer, perm)
        for norm in chain.norms:
            _permute_norm(reordered.get_submodule(norm), perm)
        for conv in chain.depthwise:
            _permute_depthwise(reordered.get_submodule(conv), perm)
        for conv in chain.convs:
            _permute_inputs(reordered.get_submodule(conv), perm)
        for linear in chain.linears:
            _permute_features(reordered.get_submodule(linear), perm)
    if reference is not None:
        got = _eval_output(reordered, example_input)
        tol = 1e-2 if got.dtype in (torch.float16, torch.bfloat16) else 1e-4
        if not torch.allclose(got, reference, atol=tol * max(1.0, reference.abs().max().item()), rtol=tol):
            raise RuntimeError("reorder_filters: the reordered model does not compute what the original computes")
    return reordered


def _eval_output(model: nn.Module, x: Tensor) -> Tensor:
    restore = set_eval(model)
    try:
        with torch.no_grad():
            return model(x)
    finally:
        restore()
