"""CUDA C++ backend of the stripe_conv2d op (``torch.ops.stripeconv_cuda.*``, csrc/cuda).

Present when ``stripeconv._C`` was built with CUDA (a CUDA build of torch and a CUDA toolkit
at install time, or ``STRIPECONV_FORCE_CUDA=1``). Opt-in: ``stripeconv.set_backend("cuda")``
or ``STRIPECONV_BACKEND=cuda``; CUDA tensors run on ``triton`` by default.

Its forward is position-major: for each kernel position the kernel multiplies the shifted
input by the packed rows of only the filters that keep it and adds the result into a
shared-memory accumulator of a block of filters, so it computes no pruned stripe whatever the
mask (the Triton forward computes the union of a filter tile's positions); consecutive chunks of
the same filters (dense and filter-pruned blocks) sum in registers first. fp16/bf16 run on
tensor cores (wmma, fp32 accumulation), fp32 and fp64 on CUDA cores (no TF32). Grad input
splits stride phases, grad weight is split-K with a deterministic reduction. The kernels build
their metadata from the mask on the device; the backend reads the mask on the host once per
mask (to check it against the packed weight), so steady-state calls can be graph-captured.
"""
from __future__ import annotations

import torch

from ._masks import check_rows

NAME = "cuda"

# The library and device the kernels are registered for; the tests point these at the CPU
# emulation of the same kernels (tests/cuda_emulation).
_NAMESPACE = "stripeconv_cuda"
_DEVICE_TYPE = "cuda"


def _ops():
    return getattr(torch.ops, _NAMESPACE)


def is_available() -> tuple[bool, str]:
    if _DEVICE_TYPE == "cuda" and not torch.cuda.is_available():
        return False, "no CUDA device is visible to torch"
    try:
        from .. import _C  # noqa: F401  (loading the library registers the kernels)
    except ImportError as exc:
        return False, f"the compiled extension stripeconv._C failed to load ({exc})"
    if not hasattr(torch.ops, _NAMESPACE) or not hasattr(_ops(), "forward"):
        return False, ("stripeconv._C was built without CUDA kernels (install with a CUDA build of torch "
                       "and a CUDA toolkit, or STRIPECONV_FORCE_CUDA=1)")
    return True, ""


def supports(device: torch.device) -> bool:
    return device.type == _DEVICE_TYPE


def forward(input, weight, bias, mask, stride, padding, dilation, groups):
    check_rows(weight, mask)  # read from the mask once per mask
    return _ops().forward(input, weight, bias, mask, stride, padding, dilation, groups)


def grad_input(grad_output, weight, mask, input_shape, stride, padding, dilation, groups):
    check_rows(weight, mask)  # read from the mask once per mask
    return _ops().grad_input(grad_output, weight, mask, input_shape, stride, padding, dilation, groups)


def grad_weight(grad_output, input, weight, mask, stride, padding, dilation, groups):
    check_rows(weight, mask)  # read from the mask once per mask
    return _ops().grad_weight(grad_output, input, weight, mask, stride, padding, dilation, groups)
