"""Eager calls on the Python backends: the op's forward and gradients in one ``autograd.Function``.

``StripeConv2d`` uses it in eager mode instead of the ``stripe_conv2d`` custom op: the same backend
kernels, layouts and gradient formulas, without the custom op's Python dispatch layers, which cost
tens of microseconds a call (more than a small layer's GPU kernels, the whole of a batch-1 step).
Gradients of gradients (``create_graph=True``) and batched gradients (``is_grads_batched=True``)
go through the gradient ops, which are differentiable and have vmap rules.
"""
from __future__ import annotations

import functools
from types import ModuleType
from typing import Callable

import torch
from torch.autograd import forward_ad

from . import _functorch_active
from ..ops import conv2d_gradients, run_forward, run_grad_input, run_grad_weight, setup_conv2d_context

_legacy_batched = getattr(torch._C._functorch, "is_legacy_batchedtensor", lambda t: False)  # is_grads_batched


class _StripeConv2dFunction(torch.autograd.Function):
    # forward(ctx, ...) rather than setup_context: apply() would bind the arguments to the signature
    # (inspect.signature) on every call. The module never calls it under torch.func transforms.
    @staticmethod
    def forward(ctx, input, weight, bias, stripe_mask, stride, padding, dilation, groups, backend):
        setup_conv2d_context(ctx, (input, weight, bias, stripe_mask, stride, padding, dilation, groups), None)
        ctx.backend = backend
        return run_forward(backend, input, weight, bias, stripe_mask, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, grad_output):
        if torch.is_grad_enabled() or _functorch_active() or _legacy_batched(grad_output):
            # create_graph records the gradients, is_grads_batched vmaps them: the gradient ops do both
            return (*conv2d_gradients(ctx, grad_output), None)
        backend = ctx.backend
        grads = conv2d_gradients(ctx, grad_output, functools.partial(run_grad_input, backend),
                                 functools.partial(run_grad_weight, backend))
        return (*grads, None)


def conv2d_for(backend: ModuleType) -> Callable:
    """``stripe_conv2d`` on ``backend``, differentiable, for arguments the caller has checked."""
    def conv2d(input, weight, bias, stripe_mask, stride, padding, dilation, groups):
        if not torch.is_grad_enabled() and forward_ad._current_level < 0:  # nothing to record
            return run_forward(backend, input, weight, bias, stripe_mask, stride, padding, dilation, groups)
        return _StripeConv2dFunction.apply(input, weight, bias, stripe_mask, stride, padding, dilation, groups,
                                           backend)
    return conv2d
