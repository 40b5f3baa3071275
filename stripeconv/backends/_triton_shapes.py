"""Launch arithmetic of the Triton backend: output sizes, tuning keys, block sizes, index width and the
memory layouts the kernels read, worked out from shapes alone (no device, no data)."""
from __future__ import annotations

import torch
from torch import Tensor

from ..ops import output_memory_format
from .triton_plans import next_pow2


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def out_hw(h, w, kh, kw, stride, padding, dilation):
    pt, pb, pl, pr = padding
    ho = (h + pt + pb - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    wo = (w + pl + pr - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    return max(ho, 0), max(wo, 0)


def conv_ints(stride, padding, dilation):
    return [int(v) for v in stride], [int(v) for v in padding], [int(v) for v in dilation]


def like_input(shape, ref: Tensor, dtype=None) -> Tensor:
    """New tensor in ``ref``'s memory format (channels_last when ``ref`` is)."""
    return torch.empty(shape, dtype=dtype or ref.dtype, device=ref.device, memory_format=output_memory_format(ref))


def meta_like(t: Tensor, copy_to_nhwc: bool) -> Tensor:
    """What a launch will see of ``t``: ``t`` itself, or (meta, no memory) its channels_last copy.

    The kernels read NHWC tiles (channels contiguous, vector loads); strided NCHW gathers cost more
    registers than they are worth, so NCHW operands are copied once per call. Outputs keep the
    caller's memory format."""
    return torch.empty(t.shape, device="meta", memory_format=torch.channels_last) if copy_to_nhwc else t


def tuning_keys(m: int, c: int, n: int, density: float, kh: int, kw: int, stride) -> dict:
    return dict(
        KEY_M=next_pow2(max(1, m)), KEY_C=c, KEY_N=n, KEY_DENSITY=int(round(density * 8)),
        KEY_CONV=((kh * 16 + kw) * 16 + stride[0]) * 16 + stride[1],
    )


def dot_block(cg: int) -> int:
    """Channel block of a tensor-core tile over ``cg`` channels: the power of two from 16 to 64 that covers them."""
    return max(16, min(64, next_pow2(cg)))


def use_dot_backward(cg: int, ng: int) -> bool:
    return cg >= 16 and ng >= 16


def needs_int64(*tensors: Tensor) -> bool:
    """Whether element offsets into any of ``tensors`` can exceed int32."""
    return any(_max_offset(t) >= 2**31 - 1 for t in tensors)


def _max_offset(t: Tensor) -> int:
    if t.numel() == 0:
        return 0
    if t.is_contiguous() or t.is_contiguous(memory_format=torch.channels_last):
        return t.numel() - 1  # dense: the offsets are 0 .. numel - 1
    return sum((d - 1) * abs(s) for d, s in zip(t.shape, t.stride()))


# The TMA forward (stripe_fwd_tma_kernel): a program's output pixels are a TH x TW rectangle of one image,
# the box of the input descriptor. Its widths, and the pixels per program (64 where an image has fewer).
TMA_WIDTHS = (8, 16, 32, 64, 128)


def channels_last_strides(shape) -> tuple[int, int, int, int]:
    """The strides of a channels_last ``[B, C, H, W]`` tensor of ``shape`` as ``.contiguous(memory_format=
    torch.channels_last)`` gives them where no dimension is 1. A tensor that is contiguous in channels_last may
    have any stride along a dimension of size 1 (``[B, C, 1, 1]`` keeps its NCHW ones); a tensor descriptor
    (TMA) wants 16-byte multiples, and these address the same elements."""
    _, c, h, w = shape
    return h * w * c, 1, w * c, c


def tma_rectangle(ho: int, wo: int) -> tuple[int, int]:
    """(BLOCK_M, TW): pixels per program and the width of their TH x TW rectangle, the one that covers the
    Ho x Wo image with the fewest padding pixels (the wider on a tie: longer rows per box)."""
    block_m = 128 if ho * wo > 64 else 64

    def covered(tw):
        th = block_m // tw
        return cdiv(ho, th) * th * cdiv(wo, tw) * tw, -tw
    return block_m, min((tw for tw in TMA_WIDTHS if tw <= block_m), key=covered)
