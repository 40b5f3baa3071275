"""Compiled C++ CPU kernels (``stripeconv._C``), registered as ``torch.ops.stripeconv_cpu.*``."""
from __future__ import annotations

import torch

NAME = "cpu"

try:
    from .. import _C  # noqa: F401  (loading the library registers the kernels)

    _IMPORT_ERROR = ""
except ImportError as exc:  # the package still works through the reference backend
    _IMPORT_ERROR = f"the compiled extension stripeconv._C failed to load ({exc}); reinstall with pip"


if not _IMPORT_ERROR:
    from ..ops import fake_forward, fake_grad_input, fake_grad_weight

    # The kernels and the eager entry point (forward + C++ autograd) trace like the ops they serve.
    for _name, _fake in (("conv2d", fake_forward), ("forward", fake_forward), ("grad_input", fake_grad_input),
                         ("grad_weight", fake_grad_weight)):
        torch.library.register_fake(f"stripeconv_cpu::{_name}")(_fake)


def is_available() -> tuple[bool, str]:
    return (not _IMPORT_ERROR), _IMPORT_ERROR


def supports(device: torch.device) -> bool:
    return device.type == "cpu"


def eager_conv2d(input, weight, bias, mask, stride, padding, dilation, groups):
    """The forward with C++ autograd: what ``stripe_conv2d`` computes here, without the Python op layers."""
    return torch.ops.stripeconv_cpu.conv2d(input, weight, bias, mask, stride, padding, dilation, groups)


def forward(input, weight, bias, mask, stride, padding, dilation, groups):
    return torch.ops.stripeconv_cpu.forward(input, weight, bias, mask, stride, padding, dilation, groups)


def grad_input(grad_output, weight, mask, input_shape, stride, padding, dilation, groups):
    return torch.ops.stripeconv_cpu.grad_input(grad_output, weight, mask, input_shape, stride, padding, dilation, groups)


def grad_weight(grad_output, input, weight, mask, stride, padding, dilation, groups):
    return torch.ops.stripeconv_cpu.grad_weight(grad_output, input, weight, mask, stride, padding, dilation, groups)
