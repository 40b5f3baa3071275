"""Shared helpers: the oracle (nn.Conv2d on masked weights) and backend parametrisation."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import stripeconv
from stripeconv.packing import pack_weight

CPU_BACKENDS = [name for name in ("reference", "cpu") if name in stripeconv.available_backends()]


def pytest_report_header(config):
    return f"stripeconv backends available: {', '.join(stripeconv.available_backends())}"


@pytest.fixture(params=["reference", "cpu"])
def backend(request):
    """Run a test once per CPU backend; the compiled one skips visibly when it is not built."""
    name = request.param
    ok, reason = stripeconv.backends._module(name).is_available()
    if not ok:
        pytest.skip(f"backend {name!r} unavailable: {reason}")
    stripeconv.set_backend(name)
    yield name
    stripeconv.set_backend(None)


def random_mask(out_channels: int, kernel_size, density: float, generator=None) -> torch.Tensor:
    """Bernoulli stripe mask; density 0 and 1 are exact."""
    kh, kw = kernel_size
    return torch.rand(out_channels, kh, kw, generator=generator) < density


def masked_conv(conv: nn.Conv2d, mask: torch.Tensor) -> nn.Conv2d:
    """The oracle: the same conv with pruned stripes zeroed."""
    with torch.no_grad():
        conv.weight.mul_(mask[:, None].to(conv.weight.dtype))
    return conv


def check_against_oracle(conv: nn.Conv2d, mask: torch.Tensor, x: torch.Tensor, atol: float, rtol: float = 1e-4):
    """Compare StripeConv2d.from_conv(conv, mask) with the masked conv: output and every gradient."""
    oracle = masked_conv(conv, mask)
    layer = stripeconv.StripeConv2d.from_conv(oracle, mask)
    x_oracle = x.detach().clone().requires_grad_(True)
    x_layer = x.detach().clone().requires_grad_(True)
    expected = oracle(x_oracle)
    got = layer(x_layer)
    torch.testing.assert_close(got, expected, atol=atol, rtol=rtol)
    if expected.numel() == 0:
        return
    grad_out = torch.randn_like(expected)
    expected.backward(grad_out)
    got.backward(grad_out)
    torch.testing.assert_close(x_layer.grad, x_oracle.grad, atol=atol, rtol=rtol)
    torch.testing.assert_close(layer.packed_weight.grad, pack_weight(oracle.weight.grad, mask), atol=atol, rtol=rtol)
    if conv.bias is not None:
        torch.testing.assert_close(layer.bias.grad, oracle.bias.grad, atol=atol, rtol=rtol)
