"""Compiled calls on the Python backends: what ``StripeConv2d`` traces to under ``torch.compile``.

A compiled graph calls each op node through the dispatcher. The ``stripe_conv2d`` op, a
``torch.library.custom_op``, wraps its kernel in Python layers: an autograd kernel (which a
compiled graph passes through although AOTAutograd has traced the gradients already) and the
custom op's kernel wrapper. They cost more than a batch-1 layer's kernels, and on CPython 3.11 and
3.12 their frames can end just past a chunk of the interpreter's frame stack, so that every call
maps and unmaps a fresh chunk (an ``mmap`` and a ``munmap`` per layer, seen with strace).

So the module traces to three private ops instead, ``stripeconv::_compiled_conv2d``,
``_compiled_grad_input`` and ``_compiled_grad_weight``: the op's backend calls, registered as plain
kernels (``CompositeExplicitAutograd``, no Python autograd layer; fake kernels for tracing), inside
an ``autograd.Function`` that Dynamo splits into the forward and backward graphs. The public op
stays the contract for direct calls, ``torch.export``, TorchScript and ``torch.func``.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .. import backends
from ..ops import (
    _CONV_ARGS, conv2d_gradients, fake_forward, fake_grad_input, fake_grad_weight, run_forward, run_grad_input,
    run_grad_weight, setup_conv2d_context,
)

_lib = torch.library.Library("stripeconv", "FRAGMENT")
_lib.define(f"_compiled_conv2d(Tensor input, Tensor weight, Tensor? bias, Tensor stripe_mask, {_CONV_ARGS}) -> Tensor")
_lib.define(f"_compiled_grad_input(Tensor grad_output, Tensor weight, Tensor stripe_mask, SymInt[] input_shape, "
            f"{_CONV_ARGS}) -> Tensor")
_lib.define(f"_compiled_grad_weight(Tensor grad_output, Tensor input, Tensor weight, Tensor stripe_mask, "
            f"{_CONV_ARGS}) -> Tensor")


# The arguments were checked when the graph was traced (the fake kernels are the op's, checks
# included) and by the module; the backends check the mask against the weight's rows.
def _forward(input, weight, bias, stripe_mask, stride, padding, dilation, groups):
    return run_forward(backends.resolve(input.device), input, weight, bias, stripe_mask, stride, padding, dilation,
                       groups)


def _grad_input(grad_output, weight, stripe_mask, input_shape, stride, padding, dilation, groups):
    return run_grad_input(backends.resolve(grad_output.device), grad_output, weight, stripe_mask, input_shape, stride,
                          padding, dilation, groups)


def _grad_weight(grad_output, input, weight, stripe_mask, stride, padding, dilation, groups):
    return run_grad_weight(backends.resolve(input.device), grad_output, input, weight, stripe_mask, stride, padding,
                           dilation, groups)


for _name, _kernel, _fake in (("_compiled_conv2d", _forward, fake_forward),
                              ("_compiled_grad_input", _grad_input, fake_grad_input),
                              ("_compiled_grad_weight", _grad_weight, fake_grad_weight)):
    _lib.impl(_name, _kernel, "CompositeExplicitAutograd")
    torch.library.register_fake(f"stripeconv::{_name}", _fake, lib=_lib)


class _CompiledConv2d(torch.autograd.Function):
    @staticmethod
    def forward(ctx, input, weight, bias, stripe_mask, stride, padding, dilation, groups):
        setup_conv2d_context(ctx, (input, weight, bias, stripe_mask, stride, padding, dilation, groups), None)
        return torch.ops.stripeconv._compiled_conv2d(input, weight, bias, stripe_mask, stride, padding, dilation,
                                                     groups)

    @staticmethod
    def backward(ctx, grad_output):
        return conv2d_gradients(ctx, grad_output, torch.ops.stripeconv._compiled_grad_input,
                                torch.ops.stripeconv._compiled_grad_weight)


def conv2d(input: Tensor, weight: Tensor, bias, stripe_mask: Tensor, stride, padding, dilation, groups: int) -> Tensor:
    """``stripe_conv2d`` for a compiled graph, differentiable once (as compiled gradients are),
    for arguments the caller has checked."""
    return _CompiledConv2d.apply(input, weight, bias, stripe_mask, list(stride), list(padding), list(dilation),
                                 groups)
