"""The packed stripe format shared by every backend.

A stripe mask ``M`` is a bool tensor ``[out_channels, kh, kw]``; ``M[n, i, j]`` keeps the
stripe ``weight[n, :, i, j]`` (a 1x1 filter over the ``in_channels // groups`` inputs of
filter ``n``'s group).

Packed weights hold only the kept stripes, one row each, as a ``[num_stripes, in_channels //
groups]`` tensor. Rows are ordered *position-major*: by kernel position ``p = i * kw + j``
first, then by filter ``n``. So the rows of one position form a contiguous block, and inside
it the filters of one group form a contiguous block too (filters are numbered group by group),
which is what the kernels iterate over. The mask alone decides the order: every backend can
rebuild the row index of a stripe from the mask without extra metadata.
"""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["pack_weight", "unpack_weight", "position_offsets", "check_stripe_mask"]


def check_stripe_mask(mask: Tensor, out_channels: int, kernel_size: tuple[int, int]) -> None:
    """Raise a clear error unless ``mask`` is a bool tensor of shape [out_channels, kh, kw]."""
    if not isinstance(mask, Tensor):
        raise TypeError(f"stripe_mask must be a torch.Tensor, got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise TypeError(f"stripe_mask must have dtype torch.bool, got {mask.dtype}")
    expected = (out_channels, *kernel_size)
    if tuple(mask.shape) != expected:
        raise ValueError(
            f"stripe_mask must have shape [out_channels, kh, kw] = {list(expected)}, "
            f"got {list(mask.shape)}"
        )


def _position_major(mask: Tensor) -> Tensor:
    # [N, kh, kw] -> [kh, kw, N]: boolean indexing then walks positions first, filters second.
    return mask.permute(1, 2, 0)


def pack_weight(weight: Tensor, mask: Tensor) -> Tensor:
    """Dense ``[N, C/g, kh, kw]`` weight -> packed ``[num_stripes, C/g]`` rows of kept stripes."""
    return weight.permute(2, 3, 0, 1)[_position_major(mask)]


def unpack_weight(packed: Tensor, mask: Tensor) -> Tensor:
    """Packed rows -> dense ``[N, C/g, kh, kw]`` weight with zeros at pruned stripes.

    Differentiable with respect to ``packed``.
    """
    n, kh, kw = mask.shape
    dense = packed.new_zeros(kh, kw, n, packed.shape[1])
    dense = dense.index_put((_position_major(mask),), packed)
    return dense.permute(2, 3, 0, 1)


def position_offsets(mask: Tensor) -> Tensor:
    """Row offsets ``[kh * kw + 1]`` (int64): rows of position p are ``offsets[p]:offsets[p+1]``."""
    counts = mask.flatten(1).sum(0)  # flatten, not reshape(n, -1): n may be 0
    return torch.cat([counts.new_zeros(1), counts.cumsum(0)])
