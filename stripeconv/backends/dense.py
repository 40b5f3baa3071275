"""Dense backend: the framework's own convolution on the unpacked, masked weight, on any device.

It computes pruned stripes as zeros, so it is never faster than the unpruned layer, and never
slower: the fallback for devices without stripe kernels (Apple MPS, Intel XPU, a CUDA machine
without triton or the CUDA extension), where the per-position loop of ``reference`` would cost
more than the dense conv it replaces. Gradients come from the framework's convolution backward.
The packed rows reach the dense weight, and the dense weight gradient the packed rows, by
gathers of fixed size; the mask is read on the host once per mask, so a call does not
synchronise the device.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from ..decompose import dense_weight, stripe_conv2d_dense
from ._masks import check_rows, kept_rows, scatter_index

NAME = "dense"


def is_available() -> tuple[bool, str]:
    return True, ""


def supports(device: torch.device) -> bool:
    return True


def _empty(shape: Sequence[int]) -> bool:
    """No work: some dimension the convolution reads or writes has size 0 (its answer is defined
    by the op contract: the bias, or zeros, and the framework's conv may refuse the shape)."""
    return any(int(s) == 0 for s in shape)


def _pads(padding: Sequence[int]) -> list[int]:
    pt, pb, pl, pr = padding
    return [pl, pr, pt, pb]


def forward(input: Tensor, weight: Tensor, bias: Optional[Tensor], mask: Tensor, stride: Sequence[int],
            padding: Sequence[int], dilation: Sequence[int], groups: int) -> Tensor:
    from ..ops import output_size

    check_rows(weight, mask)
    b, c, h, w = input.shape
    n = mask.shape[0]
    if _empty((b, c, h, w, n, weight.shape[0])):
        ho, wo = output_size((h, w), mask.shape[1:], stride, padding, dilation)
        out = input.new_zeros(b, n, ho, wo)
        return out + bias.view(1, n, 1, 1) if bias is not None else out
    return stripe_conv2d_dense(input, weight, bias, mask, stride, padding, dilation, groups, scatter_index(mask))


def conv2d_grad_input(input_shape: Sequence[int], weight: Tensor, grad_output: Tensor, stride: Sequence[int],
                      padding: Sequence[int], dilation: Sequence[int], groups: int) -> Tensor:
    """``torch.nn.grad.conv2d_input`` (the framework's grad input of a conv, ``padding`` per side of height and
    width), without its copies of ``grad_output``: the framework's backward converts grad_output to the
    memory format its input suggests, and conv2d_input's stand-in input (one element, expanded) suggests
    NCHW, so a channels_last grad_output was copied into NCHW first. Here the stand-in is an
    uninitialised input in grad_output's format."""
    from ..ops import output_memory_format

    input = torch.empty(tuple(input_shape), dtype=grad_output.dtype, device=grad_output.device,
                        memory_format=output_memory_format(grad_output))
    return torch.ops.aten.convolution_backward(grad_output, input, weight, None, list(stride), list(padding),
                                               list(dilation), False, [0, 0], groups, (True, False, False))[0]


def grad_input(grad_output: Tensor, weight: Tensor, mask: Tensor, input_shape: Sequence[int], stride: Sequence[int],
               padding: Sequence[int], dilation: Sequence[int], groups: int) -> Tensor:
    check_rows(weight, mask)
    b, c, h, w = input_shape
    if _empty((*input_shape, *grad_output.shape, weight.shape[0])):
        return grad_output.new_zeros(b, c, h, w)
    pt, pb, pl, pr = padding
    padded = (b, c, h + pt + pb, w + pl + pr)
    dense = dense_weight(weight, mask, scatter_index(mask)).to(grad_output.dtype)
    grad = conv2d_grad_input(padded, dense, grad_output, stride, (0, 0), dilation, groups)
    return grad[:, :, pt:pt + h, pl:pl + w]


def grad_weight(grad_output: Tensor, input: Tensor, weight: Tensor, mask: Tensor, stride: Sequence[int],
                padding: Sequence[int], dilation: Sequence[int], groups: int) -> Tensor:
    check_rows(weight, mask)
    if _empty((*input.shape, *grad_output.shape, weight.shape[0])):
        return torch.zeros_like(weight)
    n, kh, kw = mask.shape
    x = torch.nn.functional.pad(input, _pads(padding)) if any(padding) else input
    shape = (n, input.shape[1] // groups, kh, kw)
    dense = torch.nn.grad.conv2d_weight(x, shape, grad_output, list(stride), 0, list(dilation), groups)
    # the kept stripes in packed order: position-major, filter second
    return dense.permute(2, 3, 0, 1).reshape(-1, shape[1]).index_select(0, kept_rows(mask)).to(weight.dtype)
