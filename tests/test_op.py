"""The torch.library op contract: opcheck, gradcheck, torch.compile, per CPU backend."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from stripeconv import StripeConv2d
from stripeconv.packing import pack_weight

from conftest import random_mask

CONFIGS = [
    # (in, out, kernel, stride, padding (t, b, l, r), dilation, groups)
    (3, 4, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 1),
    (4, 6, (3, 2), (2, 1), (0, 1, 2, 0), (1, 2), 2),
    (4, 4, (3, 3), (2, 2), (1, 1, 1, 1), (1, 1), 4),
]


def _args(cfg, dtype, density=0.5, batch=2, size=(7, 6), seed=0):
    cin, cout, kernel, stride, padding, dilation, groups = cfg
    gen = torch.Generator().manual_seed(seed)
    mask = random_mask(cout, kernel, density, gen)
    mask[0, 0, 0] = True
    x = torch.randn(batch, cin, *size, dtype=dtype, generator=gen, requires_grad=True)
    dense = torch.randn(cout, cin // groups, *kernel, dtype=dtype, generator=gen)
    weight = pack_weight(dense, mask).requires_grad_(True)
    bias = torch.randn(cout, dtype=dtype, generator=gen, requires_grad=True)
    return x, weight, bias, mask, list(stride), list(padding), list(dilation), groups


@pytest.mark.parametrize("cfg", CONFIGS)
def test_opcheck(backend, cfg):
    args = _args(cfg, torch.float64)
    torch.library.opcheck(torch.ops.stripeconv.stripe_conv2d, args)
    no_bias = (args[0], args[1], None, *args[3:])
    torch.library.opcheck(torch.ops.stripeconv.stripe_conv2d, no_bias)


@pytest.mark.parametrize("cfg", CONFIGS)
def test_gradcheck_fp64(backend, cfg):
    x, weight, bias, mask, stride, padding, dilation, groups = _args(cfg, torch.float64, size=(5, 5))

    def fn(x, weight, bias):
        return torch.ops.stripeconv.stripe_conv2d(x, weight, bias, mask, stride, padding, dilation, groups)

    assert torch.autograd.gradcheck(fn, (x, weight, bias))


def test_torch_compile_fullgraph_forward_backward(backend):
    torch.manual_seed(0)
    torch._dynamo.reset()
    model = nn.Sequential(
        StripeConv2d(3, 8, 3, padding=1, stripe_mask=torch.rand(8, 3, 3) < 0.5),
        nn.ReLU(),
        StripeConv2d(8, 4, 3, stride=2, padding="valid", stripe_mask=torch.rand(4, 3, 3) < 0.5),
    )
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 3, 9, 9)
    torch.testing.assert_close(compiled(x), model(x))

    compiled(x).square().sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model(x).square().sum().backward()
    for got, expected in zip(grads, (p.grad for p in model.parameters())):
        torch.testing.assert_close(got, expected)


def test_torch_compile_inductor(backend):
    torch._dynamo.reset()
    layer = StripeConv2d(4, 6, 3, padding=1, stripe_mask=torch.rand(6, 3, 3) < 0.4)
    compiled = torch.compile(layer, fullgraph=True)
    x = torch.randn(2, 4, 8, 8, requires_grad=True)
    out = compiled(x)
    torch.testing.assert_close(out, layer(x))
    out.sum().backward()
    assert x.grad is not None and layer.packed_weight.grad.shape == layer.packed_weight.shape
