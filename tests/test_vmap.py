"""torch.func.vmap over StripeConv2d and the op: batched data, batched weights, batched gradients."""
from __future__ import annotations

import warnings

import pytest
import torch
from torch.func import functional_call, vmap

import stripeconv
from conftest import random_mask


def _layer(seed: int, **kw) -> stripeconv.StripeConv2d:
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    return stripeconv.StripeConv2d(3, 4, 3, stripe_mask=random_mask(4, (3, 3), 0.5, gen), **kw)


@pytest.mark.parametrize("in_dim", [0, 1])
def test_vmap_over_batches_and_backward(backend, in_dim):
    layer = _layer(0, padding=1, stride=2)
    x = torch.randn(5, 2, 3, 6, 7, requires_grad=True)
    y = vmap(layer, in_dims=in_dim)(x if in_dim == 0 else x.transpose(0, 1))
    xr = x.detach().clone().requires_grad_(True)
    expected = layer(xr.flatten(0, 1)).unflatten(0, (5, 2))
    torch.testing.assert_close(y, expected)  # the vmapped dimension comes first in the result
    y.square().sum().backward()
    weight_grad = layer.packed_weight.grad.clone()
    layer.zero_grad()
    expected.square().sum().backward()
    torch.testing.assert_close(x.grad, xr.grad)
    torch.testing.assert_close(weight_grad, layer.packed_weight.grad)


def test_vmap_over_weights(backend):
    """An ensemble: one input, a batch of packed weights and biases (one op call per member)."""
    layer = _layer(1, padding=(0, 1), dilation=2)
    x = torch.randn(2, 3, 8, 8)
    weights = torch.randn(4, *layer.packed_weight.shape)
    biases = torch.randn(4, 4)
    with torch.no_grad():
        got = vmap(lambda w, b: functional_call(layer, {"packed_weight": w, "bias": b}, (x,)))(weights, biases)
        for i in range(4):
            expected = functional_call(layer, {"packed_weight": weights[i], "bias": biases[i]}, (x,))
            torch.testing.assert_close(got[i], expected)


def test_batched_grad_outputs(backend):
    """torch.autograd.grad(is_grads_batched=True) vmaps the backward: rows of the vector-Jacobian product."""
    layer = _layer(2, padding=1)
    x = torch.randn(2, 3, 5, 6, requires_grad=True)
    y = layer(x)
    grad_outputs = torch.randn(3, *y.shape)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torch's note when an op falls back to a loop
        gx, gw = torch.autograd.grad(y, (x, layer.packed_weight), grad_outputs, is_grads_batched=True,
                                     retain_graph=True)
    for i in range(3):
        ex, ew = torch.autograd.grad(y, (x, layer.packed_weight), grad_outputs[i], retain_graph=True)
        torch.testing.assert_close(gx[i], ex)
        torch.testing.assert_close(gw[i], ew)
