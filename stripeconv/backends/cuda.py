"""CUDA C++ kernels (``torch.ops.stripeconv_cuda.*``), present when the extension was built with CUDA."""
from __future__ import annotations

import torch

NAME = "cuda"


def is_available() -> tuple[bool, str]:
    if not torch.cuda.is_available():
        return False, "no CUDA device is visible to torch"
    try:
        from .. import _C  # noqa: F401
    except ImportError as exc:
        return False, f"the compiled extension stripeconv._C failed to load ({exc})"
    if not hasattr(torch.ops, "stripeconv_cuda") or not hasattr(torch.ops.stripeconv_cuda, "forward"):
        return False, "stripeconv._C was built without CUDA kernels"
    return True, ""


def supports(device: torch.device) -> bool:
    return device.type == "cuda"


def forward(input, weight, bias, mask, stride, padding, dilation, groups):
    return torch.ops.stripeconv_cuda.forward(input, weight, bias, mask, stride, padding, dilation, groups)


def grad_input(grad_output, weight, mask, input_shape, stride, padding, dilation, groups):
    return torch.ops.stripeconv_cuda.grad_input(grad_output, weight, mask, input_shape, stride, padding, dilation, groups)


def grad_weight(grad_output, input, weight, mask, stride, padding, dilation, groups):
    return torch.ops.stripeconv_cuda.grad_weight(grad_output, input, weight, mask, stride, padding, dilation, groups)
