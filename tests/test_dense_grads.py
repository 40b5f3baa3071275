"""The framework's grad input as the dense backend and the Triton backend's cuDNN hand-over call it
(stripeconv.backends.dense.conv2d_grad_input): torch.nn.grad.conv2d_input's values, without copies of
grad_output."""
from __future__ import annotations

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from stripeconv.backends.dense import conv2d_grad_input


@pytest.fixture(params=["cpu", "cuda"])
def device(request):
    if request.param == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    return request.param


def _case(device, channels_last, stride, padding, dilation, groups, seed=0):
    gen = torch.Generator().manual_seed(seed)
    b, c, n, h, w = 3, 8, 12, 9, 10
    ho = (h + 2 * padding[0] - dilation[0] * 2 - 1) // stride[0] + 1
    wo = (w + 2 * padding[1] - dilation[1] * 2 - 1) // stride[1] + 1
    gy = torch.randn(b, n, ho, wo, generator=gen, dtype=torch.float64).to(device)
    weight = torch.randn(n, c // groups, 3, 3, generator=gen, dtype=torch.float64).to(device)
    if channels_last:
        gy, weight = (t.contiguous(memory_format=torch.channels_last) for t in (gy, weight))
    return (b, c, h, w), weight, gy


@pytest.mark.parametrize("channels_last", [True, False])
@pytest.mark.parametrize("stride,padding,dilation,groups", [
    ((1, 1), (1, 1), (1, 1), 1), ((2, 2), (1, 1), (1, 1), 1), ((2, 1), (0, 2), (1, 2), 2), ((1, 2), (2, 0), (2, 1), 4),
])
def test_values_are_conv2d_inputs(device, channels_last, stride, padding, dilation, groups):
    shape, weight, gy = _case(device, channels_last, stride, padding, dilation, groups)
    want = torch.nn.grad.conv2d_input(shape, weight, gy, stride, padding, dilation, groups)
    got = conv2d_grad_input(shape, weight, gy, stride, padding, dilation, groups)
    assert got.shape == want.shape and torch.allclose(got, want, rtol=1e-12, atol=1e-12)


def test_a_channels_last_grad_output_is_not_copied(device):
    """torch.nn.grad.conv2d_input copies a channels_last grad_output (to NCHW: its stand-in input suggests it);
    this one reads it where it is."""
    shape, weight, gy = _case(device, True, (1, 1), (1, 1), (1, 1), 1)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])

    def copies(fn) -> int:
        fn()
        with profile(activities=activities) as prof:
            fn()
        return sum(event.name == "aten::copy_" for event in prof.events())
    assert copies(lambda: torch.nn.grad.conv2d_input(shape, weight, gy, (1, 1), (1, 1))) > 0  # what it avoids
    assert copies(lambda: conv2d_grad_input(shape, weight, gy, (1, 1), (1, 1), (1, 1), 1)) == 0
