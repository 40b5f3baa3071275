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
def test_opcheck_compiled_route(backend, cfg):
    """The private ops compiled layers call (stripeconv.backends.compiled): schema, fake kernels and
    dynamic-shape tracing; their values and gradients match the op's. They have no autograd kernel by
    design (the autograd.Function around them differentiates), so that check is left out."""
    from stripeconv.backends import compiled

    x, weight, bias, mask, stride, padding, dilation, groups = _args(cfg, torch.float64)
    conv = (stride, padding, dilation, groups)
    x, weight, bias = x.detach(), weight.detach(), bias.detach()
    out = torch.ops.stripeconv.stripe_conv2d(x, weight, bias, mask, *conv)
    grad = torch.randn_like(out)
    checks = ("test_schema", "test_faketensor", "test_aot_dispatch_dynamic")
    for op, args in ((torch.ops.stripeconv._compiled_conv2d, (x, weight, bias, mask, *conv)),
                     (torch.ops.stripeconv._compiled_conv2d, (x, weight, None, mask, *conv)),
                     (torch.ops.stripeconv._compiled_grad_input, (grad, weight, mask, list(x.shape), *conv)),
                     (torch.ops.stripeconv._compiled_grad_weight, (grad, x, weight, mask, *conv))):
        torch.library.opcheck(op, args, test_utils=checks)
    x, weight, bias = (t.requires_grad_() for t in (x, weight, bias))
    got = compiled.conv2d(x, weight, bias, mask, *conv)
    expected = torch.ops.stripeconv.stripe_conv2d(x, weight, bias, mask, *conv)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    torch.testing.assert_close(torch.autograd.grad(got, (x, weight, bias), grad),
                               torch.autograd.grad(expected, (x, weight, bias), grad), rtol=0, atol=0)


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


@pytest.mark.parametrize("name", ["dense", "reference"])
def test_mask_is_read_on_the_host_once_per_mask_version(name, monkeypatch):
    """The kept count and row index come from the mask once (a host read syncs a device); an in-place
    change of the mask is seen, and a weight that no longer matches it is refused."""
    from stripeconv.backends import _masks, _module

    backend = _module(name)
    real_memo, builds = _masks.memo, []
    monkeypatch.setattr(_masks, "memo", lambda key, m, build: real_memo(key, m, lambda: builds.append(key[0]) or build()))
    torch.manual_seed(0)
    mask = torch.rand(6, 3, 3) < 0.5
    dense_weight = torch.randn(6, 4, 3, 3) * mask[:, None]
    w = pack_weight(dense_weight, mask)
    x, conv = torch.randn(2, 4, 7, 7), ([1, 1], [1, 1, 1, 1], [1, 1], 1)
    for _ in range(3):
        y = backend.forward(x, w, None, mask, *conv)
        gx = backend.grad_input(torch.ones_like(y), w, mask, list(x.shape), *conv)
        gw = backend.grad_weight(torch.ones_like(y), x, w, mask, *conv)
    assert builds.count("kept") == 1 and builds.count("rows") <= 1, builds
    ref = torch.nn.functional.conv2d(x.requires_grad_(), dense_weight.requires_grad_(), None, 1, 1)
    ref.backward(torch.ones_like(ref))
    torch.testing.assert_close(y, ref)
    torch.testing.assert_close(gx, x.grad)
    torch.testing.assert_close(gw, pack_weight(dense_weight.grad, mask))
    mask[0, 0, 0] = not bool(mask[0, 0, 0])  # in place: the same tensor, a new version
    with pytest.raises(ValueError, match=r"packed weight has \d+ rows but stripe_mask keeps \d+ stripes"):
        backend.forward(x, w, None, mask, *conv)
