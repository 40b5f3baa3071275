"""Pure-PyTorch backend: the readable statement of the op contract and the test oracle.

For every kept position p = (i, j) the output receives a 1x1 convolution of the input window
that position sees. The window is a strided slice of the input cropped to the image, so
borders cost nothing and no padded copy of the input is made.
"""
from __future__ import annotations

from typing import Iterator, Optional, Sequence

import torch
from torch import Tensor

from ..packing import position_offsets
from ._masks import check_rows

NAME = "reference"


def is_available() -> tuple[bool, str]:
    return True, ""


def supports(device: torch.device) -> bool:
    return True


def _axis_window(pos: int, size_in: int, size_out: int, stride: int, pad: int, dil: int):
    """Output range [o0, o1) whose input index o*stride + shift lies in [0, size_in), and o0's input index."""
    shift = pos * dil - pad
    o0 = max(0, -(shift // stride))  # ceil(-shift / stride)
    o1 = min(size_out, max(o0, -((shift - size_in) // stride)))  # ceil((size_in - shift) / stride)
    return o0, o1, o0 * stride + shift


def _windows(mask: Tensor, in_hw, out_hw, stride, padding, dilation) -> Iterator[tuple]:
    """Yield (row_begin, row_end, out_slices, in_slices) for each position with kept stripes."""
    _, kh, kw = mask.shape
    offsets = position_offsets(mask).tolist()
    pt, _, pl, _ = padding
    for p in range(kh * kw):
        r0, r1 = offsets[p], offsets[p + 1]
        if r0 == r1:
            continue
        i, j = divmod(p, kw)
        h0, h1, hi0 = _axis_window(i, in_hw[0], out_hw[0], stride[0], pt, dilation[0])
        w0, w1, wi0 = _axis_window(j, in_hw[1], out_hw[1], stride[1], pl, dilation[1])
        if h0 >= h1 or w0 >= w1:
            continue
        out_sl = (slice(h0, h1), slice(w0, w1))
        in_sl = (
            slice(hi0, hi0 + (h1 - h0 - 1) * stride[0] + 1, stride[0]),
            slice(wi0, wi0 + (w1 - w0 - 1) * stride[1] + 1, stride[1]),
        )
        yield r0, r1, p, out_sl, in_sl


def _filters_by_position(mask: Tensor) -> Tensor:
    """Filter index of every packed row (position-major order)."""
    return mask.permute(1, 2, 0).nonzero()[:, 2]


def _group_splits(filters: Tensor, out_per_group: int, r0: int, r1: int) -> Iterator[tuple[int, int, int]]:
    """Split rows [r0, r1) of one position into runs of one group: (group, begin, end)."""
    groups_of_rows = (filters[r0:r1] // out_per_group).tolist()
    begin = 0
    for k in range(1, len(groups_of_rows) + 1):
        if k == len(groups_of_rows) or groups_of_rows[k] != groups_of_rows[begin]:
            yield groups_of_rows[begin], r0 + begin, r0 + k
            begin = k


def _out_hw(in_hw, mask, stride, padding, dilation):
    from ..ops import output_size

    return output_size(in_hw, mask.shape[1:], stride, padding, dilation)


def forward(
    input: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    mask: Tensor,
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    groups: int,
) -> Tensor:
    check_rows(weight, mask)  # rows are sliced per position: extra rows would go unnoticed
    b, c, h, w = input.shape
    n = mask.shape[0]
    cg, ng = c // groups, n // groups
    ho, wo = _out_hw((h, w), mask, stride, padding, dilation)
    out = input.new_zeros(b, n, ho, wo)
    if bias is not None:
        out += bias.view(1, n, 1, 1)
    filters = _filters_by_position(mask)
    for r0, r1, _, out_sl, in_sl in _windows(mask, (h, w), (ho, wo), stride, padding, dilation):
        for g, g0, g1 in _group_splits(filters, ng, r0, r1):
            x = input[:, g * cg:(g + 1) * cg, in_sl[0], in_sl[1]]
            y = torch.einsum("bchw,nc->bnhw", x, weight[g0:g1])
            out[:, filters[g0:g1], out_sl[0], out_sl[1]] += y
    return out


def grad_input(
    grad_output: Tensor,
    weight: Tensor,
    mask: Tensor,
    input_shape: Sequence[int],
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    groups: int,
) -> Tensor:
    check_rows(weight, mask)  # rows are sliced per position: extra rows would go unnoticed
    b, c, h, w = input_shape
    n = mask.shape[0]
    cg, ng = c // groups, n // groups
    ho, wo = grad_output.shape[2:]
    grad = grad_output.new_zeros(b, c, h, w)
    filters = _filters_by_position(mask)
    for r0, r1, _, out_sl, in_sl in _windows(mask, (h, w), (ho, wo), stride, padding, dilation):
        for g, g0, g1 in _group_splits(filters, ng, r0, r1):
            gy = grad_output[:, filters[g0:g1], out_sl[0], out_sl[1]]
            grad[:, g * cg:(g + 1) * cg, in_sl[0], in_sl[1]] += torch.einsum("bnhw,nc->bchw", gy, weight[g0:g1])
    return grad


def grad_weight(
    grad_output: Tensor,
    input: Tensor,
    weight: Tensor,
    mask: Tensor,
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    groups: int,
) -> Tensor:
    check_rows(weight, mask)  # rows are sliced per position: extra rows would go unnoticed
    b, c, h, w = input.shape
    n = mask.shape[0]
    cg, ng = c // groups, n // groups
    ho, wo = grad_output.shape[2:]
    grad = torch.zeros_like(weight)
    filters = _filters_by_position(mask)
    for r0, r1, _, out_sl, in_sl in _windows(mask, (h, w), (ho, wo), stride, padding, dilation):
        for g, g0, g1 in _group_splits(filters, ng, r0, r1):
            gy = grad_output[:, filters[g0:g1], out_sl[0], out_sl[1]]
            x = input[:, g * cg:(g + 1) * cg, in_sl[0], in_sl[1]]
            grad[g0:g1] = torch.einsum("bnhw,bchw->nc", gy, x)
    return grad
