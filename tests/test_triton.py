"""Correctness of the Triton backend against F.conv2d on the masked dense weight.

On a machine without CUDA the kernels run on CPU through the Triton interpreter. The
interpreter must be switched on (TRITON_INTERPRET=1) before triton is imported, so those checks
run in worker subprocesses (this file run as a script with ``--worker``); nothing leaks into
the pytest process or the other test modules. The worker results are collected once per module
and reported as one pytest test per case. With a CUDA device the same cases (plus fp16/bf16)
also run in-process on the GPU.

Shapes are tiny: the interpreter executes every program instance in Python.
"""
from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from unittest import mock

HERE = os.path.dirname(os.path.abspath(__file__))

if __name__ != "__main__":
    import pytest

    try:
        import triton  # noqa: F401
    except Exception as exc:  # pragma: no cover - depends on the environment
        pytest.skip(f"triton is not importable ({exc}); the Triton backend is not tested", allow_module_level=True)

import torch
import torch.nn.functional as F

from stripeconv.backends import _triton_backward_tiles, _triton_forward, _triton_runtime, _triton_shapes

# ------------------------------------------------------------------------------------------
# The cases
# ------------------------------------------------------------------------------------------

BASE = dict(B=2, C=16, N=32, H=7, W=7, k=(3, 3), stride=(1, 1), padding=(1, 1, 1, 1), dilation=(1, 1),
            groups=1, bias=True, density=0.5, dtype="float32", channels_last=False, block_n=16,
            empty_filters=0, via_op=False, via_module=False, via_compile=False, deterministic=False, gpu_only=False, mask_update=False,
            dense="never", double_backward=False, weight_transposed=False, int64=False, warm_call=False,
            mask_blocks=1, reordered=False, pick="", dy_in_place=False)


def _case(name, **kw):
    unknown = set(kw) - set(BASE)
    assert not unknown, unknown
    return name, {**BASE, **kw}


CASES = dict([
    _case("k1", k=(1, 1), padding=(0, 0, 0, 0)),
    _case("k3"),
    _case("k1x3", k=(1, 3), padding=(0, 0, 1, 1)),
    _case("k5_d03", k=(5, 5), padding=(2, 2, 2, 2), density=0.3, H=8, W=6),
    _case("k3_s2", stride=(2, 2), H=8, W=8),
    _case("k3_s1x2_asym", stride=(1, 2), padding=(1, 1, 0, 2), H=6, W=9),
    _case("k3_s2_asym", stride=(2, 2), padding=(0, 2, 1, 0), H=8, W=9),
    _case("k3_s3_nopad", stride=(3, 3), padding=(0, 0, 0, 0), H=10, W=8),
    _case("dil2", dilation=(2, 2), padding=(2, 2, 2, 2)),
    _case("dil2_s2", dilation=(2, 2), stride=(2, 2), padding=(2, 1, 1, 2), H=9, W=8),
    _case("groups2_wide", C=32, N=32, groups=2),
    _case("groups2_small", C=8, N=12, groups=2, stride=(2, 2), H=8, W=8),
    _case("depthwise", C=8, N=8, groups=8),
    _case("depthwise_s2_mult2", C=8, N=16, groups=8, stride=(2, 2), H=8, W=8),
    _case("no_bias", bias=False),
    _case("density0", density=0.0),
    _case("density0_nhwc_no_bias", density=0.0, channels_last=True, bias=False, stride=(2, 2), H=8, W=8),
    _case("density1", density=1.0),
    # Density 1 and filters in blocks of alike patterns: tiles read consecutive packed rows (ROW_RUNS).
    _case("density1_cin3_nhwc", density=1.0, C=3, N=32, channels_last=True),
    _case("density1_int64_s2", density=1.0, int64=True, stride=(2, 2), H=8, W=8),
    _case("density1_groups", density=1.0, C=32, N=32, groups=2),
    _case("filter_blocks16", mask_blocks=16, N=48, channels_last=True, dtype="bfloat16"),
    _case("density01", density=0.1, N=48),
    _case("empty_filters", empty_filters=9, N=40),
    _case("partial_tile", N=20),
    _case("batch0", B=0),
    _case("empty_output", H=2, W=2, k=(5, 5), padding=(0, 0, 0, 0)),
    _case("no_input_channel", C=0),
    _case("no_input_row", H=0, padding=(2, 1, 1, 1)),
    _case("no_output_channel", N=0),
    _case("channels_last", channels_last=True, stride=(2, 2), H=8, W=8),
    _case("cin3", C=3, N=16),
    _case("block_n64", C=32, N=64, block_n=64, density=0.7),
    _case("block_n128", C=16, N=160, block_n=128, density=0.8, H=5, W=5),  # two tiles, the second partial
    _case("block_n32_s2", C=16, N=48, block_n=32, density=0.4, stride=(2, 2), H=8, W=8, channels_last=True),
    _case("splitk_atomic", H=20, W=20, C=16, N=16, density=0.4),
    _case("splitk_deterministic", H=20, W=20, C=16, N=16, density=0.4, deterministic=True),
    # Grad weight over two pixel blocks in one split (BLOCK_M = 128 under the interpreter; 210 and 180 output
    # pixels): the tile kernel advances (b, ho, wo) by BLOCK_M's own coordinates, carrying across rows and images.
    _case("wgrad_pixel_steps", B=7, H=5, W=6, C=16, N=16),
    _case("wgrad_pixel_steps_s2_int64", B=9, H=7, W=9, stride=(2, 2), C=16, N=16, int64=True, channels_last=True),
    _case("fp64", dtype="float64"),
    _case("fp64_depthwise", dtype="float64", C=4, N=4, groups=4, stride=(2, 2), H=6, W=6),
    _case("mask_update", mask_update=True),
    # The checked forward reuses the launch that a first call of the same shape settled (other data).
    _case("settled_call", warm_call=True, stride=(2, 2), H=8, W=8),
    _case("settled_call_nhwc_groups", warm_call=True, channels_last=True, C=32, N=32, groups=2, bias=False),
    # Packed rows stored column-major (a view of a transposed tensor): the kernels address rows as row * CG.
    _case("weight_transposed", weight_transposed=True, stride=(2, 2), H=8, W=8),
    # The int64-offset kernels (taken for tensors of 2**31 elements or more), forced on small tensors.
    _case("int64_offsets", int64=True, stride=(2, 2), H=8, W=9, C=16, N=20, channels_last=True),
    _case("int64_offsets_cin3", int64=True, C=3, N=16),
    _case("int64_offsets_depthwise", int64=True, C=8, N=8, groups=8),
    _case("via_op_autograd", via_op=True, channels_last=True),
    # StripeConv2d's eager path: one autograd.Function around the triton backend, no custom op.
    _case("via_module", via_module=True, channels_last=True, stride=(2, 2), H=8, W=8),
    _case("via_module_groups", via_module=True, C=8, N=12, groups=2, bias=False),
    # torch.compile'd StripeConv2d: the private ops of stripeconv.backends.compiled, no custom op.
    _case("via_compile", via_module=True, via_compile=True, channels_last=True, stride=(2, 2), H=8, W=8),
    _case("double_backward", double_backward=True, dtype="float64", C=4, N=6, H=6, W=5, stride=(2, 1)),
    # The dense cuDNN hand-over (STRIPECONV_GPU_DENSE=always): F.conv2d on the scattered weight.
    # The forward's ways to store a channels_last output (the interpreter runs only the first candidate
    # unless `pick` names another): runs of 8 consecutive channels as vectors (filters sharing their
    # pattern in blocks of 8, so that aligned tiles exist), and NCHW planes plus a copy.
    _case("aligned_runs", mask_blocks=8, channels_last=True, pick="_aligned", stride=(2, 2), H=8, W=8),
    _case("aligned_runs_groups", mask_blocks=8, channels_last=True, pick="_aligned", C=16, N=32, groups=2,
          bias=False),
    _case("aligned_runs_int64", mask_blocks=8, channels_last=True, pick="_aligned", int64=True),
    # A random mask with its filters in reorder_filters' order: the clustered tiles are runs of
    # consecutive channels, so the aligned stores (and tile backward) serve an unstructured mask.
    _case("reordered_aligned", reordered=True, channels_last=True, pick="_aligned", N=48, density=0.3),
    _case("reordered_aligned_groups", reordered=True, channels_last=True, pick="_aligned", C=16, N=64, groups=2,
          density=0.4, stride=(2, 2), H=8, W=8),
    # ... and the tile backward reads dy in place (no gathered copy): every tile is a run of channels
    _case("reordered_tiles_backward", reordered=True, channels_last=True, pick="tiles", N=64, density=0.3,
          dy_in_place=True),
    _case("reordered_tiles_backward_int64_s2", reordered=True, channels_last=True, pick="tiles", N=64,
          density=0.4, int64=True, stride=(2, 2), H=8, W=9, dy_in_place=True),
    _case("reordered_tiles_backward_groups", reordered=True, channels_last=True, pick="tiles", C=32, N=64,
          groups=2, density=0.5, bias=False, dy_in_place=True),
    _case("reordered_tiles_backward_nchw", reordered=True, pick="tiles", N=64, density=0.3),  # gathered
    # Split-K for few output pixels: programs share each tile's reduction, adding into a zeroed buffer.
    _case("splitk_forward", pick="_splitk", channels_last=True, C=32, N=32, density=0.6),
    _case("splitk_forward_nchw_bf16_s2", pick="_splitk", dtype="bfloat16", C=64, N=32, stride=(2, 2), H=8, W=9),
    _case("splitk_forward_groups_no_bias", pick="_splitk", C=32, N=32, groups=2, bias=False, channels_last=True),
    _case("splitk_forward_fp64_dense", pick="_splitk", dtype="float64", density=1.0, C=32, N=16),
    # The subtile forward: groups of narrow tiles per program, each input tile loaded once for the group's
    # union and multiplied by the subtiles that keep its position (per-position bits, skipped dots).
    _case("subtiles_x4", pick="x4", N=64, density=0.3, H=6, W=6),
    _case("subtiles_x8_aligned_nhwc", pick="x8", N=128, mask_blocks=8, channels_last=True, density=0.3, H=5, W=5),
    _case("subtiles_x2_nchw_s2_uneven_k", pick="x2", N=64, block_n=32, C=24, bias=False, stride=(2, 2), H=8, W=9),
    _case("subtiles_groups", pick="x2", C=32, N=64, groups=2, density=0.4, channels_last=True, H=6, W=6),
    _case("subtiles_empty_filters_int64", pick="x4", N=64, empty_filters=20, int64=True, channels_last=True,
          H=6, W=6),
    _case("subtiles_fp16_dil2", pick="x4", dtype="float16", N=64, dilation=(2, 2), padding=(2, 2, 2, 2), H=7, W=6),
    _case("subtiles_bf16_x8_gpu", pick="x8", dtype="bfloat16", gpu_only=True, C=64, N=128, density=0.2,
          channels_last=True, H=12, W=12),
    # The TMA forward: each program a TH x TW rectangle of one image's output pixels, its input tiles boxes of
    # the NHWC input with the borders zero-filled (negative coordinates included); stride 1 only.
    _case("tma", pick="_tma", channels_last=True, H=9, W=11),  # 8x16 rectangles: 7 of 16 columns past the edge
    _case("tma_wide_image", pick="_tma", channels_last=True, B=1, H=3, W=40, C=32, N=16, bias=False),
    _case("tma_aligned_dil2_asym", pick="_tma", mask_blocks=8, channels_last=True, dilation=(2, 2),
          padding=(2, 1, 0, 3), H=8, W=7, N=48),
    _case("tma_row_runs_uneven_k", pick="_tma", density=1.0, channels_last=True, C=24, N=32, block_n=32, k=(3, 5),
          padding=(1, 1, 2, 2), H=5, W=6),  # 24 channels in 32-wide blocks: the box zero-fills the last 8
    _case("tma_bf16_empty_filters", pick="_tma", dtype="bfloat16", channels_last=True, empty_filters=12, N=64,
          block_n=64, density=0.3, H=6, W=6),
    # 64 filters and more: the product taken transposed (the box as wgmma's B operand), fp32 and 128 wide
    _case("tma_transposed_fp32_w128", pick="_tma", channels_last=True, C=16, N=136, block_n=128, density=0.6,
          H=5, W=6),
    # Stride 2 (even input extents): boxes of the input's parity view [B, H/2, 2, W/2, 2C]
    _case("tma_s2", pick="_tma", channels_last=True, stride=(2, 2), H=8, W=10),
    _case("tma_s2x1_dil2_asym", pick="_tma", channels_last=True, stride=(2, 1), dilation=(2, 2),
          padding=(2, 1, 0, 3), H=10, W=7, N=48),
    _case("tma_s1x2_bf16_w64_k5", pick="_tma", dtype="bfloat16", channels_last=True, stride=(1, 2), k=(5, 5),
          padding=(2, 2, 2, 2), C=32, N=64, block_n=64, density=0.4, H=7, W=12),
    _case("tma_s2_row_runs_w128", pick="_tma", density=1.0, channels_last=True, stride=(2, 2), C=32, N=128,
          block_n=128, H=6, W=6, bias=False),
    # Consecutive packed rows per tile and position (ROW_RUNS), 128 filters wide
    _case("tma_row_runs_bf16_w128", pick="_tma", dtype="bfloat16", density=1.0, channels_last=True, C=48, N=128,
          block_n=128, H=5, W=6),
    _case("tma_settled_reordered", pick="_tma", warm_call=True, reordered=True, channels_last=True, N=48,
          density=0.4, k=(1, 1), padding=(0, 0, 0, 0)),
    _case("planes", channels_last=True, pick="_planes", stride=(2, 2), H=8, W=9, N=48),
    _case("planes_int64_groups", channels_last=True, pick="_planes", int64=True, C=16, N=24, groups=2),
    # The backward over the forward's filter tiles (dy gathered into tile order, contiguous loads).
    _case("tiles_backward", pick="tiles", channels_last=True, N=48, density=0.4),
    _case("tiles_backward_nchw_s2", pick="tiles", stride=(2, 2), H=8, W=9, C=16, N=20),
    _case("tiles_backward_asym_dil", pick="tiles", k=(3, 3), stride=(1, 2), padding=(1, 1, 0, 2), dilation=(2, 1),
          H=8, W=9, channels_last=True),
    _case("tiles_backward_groups", pick="tiles", C=32, N=32, groups=2, stride=(2, 2), H=8, W=8, bias=False),
    _case("tiles_backward_int64", pick="tiles", int64=True, channels_last=True, stride=(2, 2), H=8, W=8),
    _case("tiles_backward_aligned", pick="tiles", mask_blocks=8, channels_last=True, N=32, dy_in_place=True),
    _case("tiles_backward_splitk", pick="tiles", H=20, W=20, C=16, N=16, density=0.4, channels_last=True,
          dy_in_place=True),
    _case("tiles_backward_pixel_steps", pick="tiles", B=7, H=5, W=6, C=16, N=16, channels_last=True, dy_in_place=True),
    _case("tiles_backward_pixel_steps_s2", pick="tiles", B=9, H=7, W=9, stride=(2, 2), C=16, N=32, density=0.4),
    _case("tiles_backward_row_runs", pick="tiles", mask_blocks=16, N=48, channels_last=True, dy_in_place=True),
    _case("tiles_backward_row_runs_int64_s2", pick="tiles", density=1.0, int64=True, stride=(2, 2), H=8, W=8,
          channels_last=True, dy_in_place=True),
    # The tile grad input with TMA boxes of dy (stride 1, one group; offered for tiles of 64 filters or more over
    # 33 channels or more): each program a TH x TW rectangle of one image's input pixels; the boxes zero-fill
    # dy's borders and the columns past its last channel.
    _case("tiles_tma", pick="tiles_tma", channels_last=True, C=48, N=96, block_n=64, density=0.4, H=9, W=11),
    _case("tiles_tma_in_place", pick="tiles_tma", reordered=True, channels_last=True, C=40, N=128, block_n=64,
          density=0.3, H=6, W=7, dy_in_place=True),
    _case("tiles_tma_nchw_dil2_asym_c80", pick="tiles_tma", dilation=(2, 2), padding=(2, 1, 0, 3), H=8, W=7, C=80,
          N=64, block_n=64),
    _case("tiles_tma_row_runs_uneven_k", pick="tiles_tma", density=1.0, channels_last=True, C=40, N=64, block_n=64,
          k=(3, 5), padding=(1, 1, 2, 2), H=5, W=6, dy_in_place=True),
    _case("tiles_tma_partial_tile", pick="tiles_tma", density=1.0, channels_last=True, C=36, N=72, block_n=64, H=5,
          W=5),
    _case("tiles_tma_bf16_empty_filters", pick="tiles_tma", dtype="bfloat16", channels_last=True, empty_filters=12,
          C=48, N=64, block_n=64, density=0.3, H=6, W=6, dy_in_place=True),  # one tile of 64 channels in order
    _case("tiles_tma_w128_in_place_fp16", pick="tiles_tma", dtype="float16", reordered=True, channels_last=True,
          C=64, N=128, block_n=128, density=0.4, H=5, W=5, dy_in_place=True),
    _case("tiles_tma_row_runs_bf16_c72", pick="tiles_tma", dtype="bfloat16", density=1.0, channels_last=True,
          C=72, N=64, block_n=64, H=5, W=6, dy_in_place=True),  # two channel blocks, the second 8 wide
    _case("tiles_tma_settled_k1", pick="tiles_tma", warm_call=True, reordered=True, channels_last=True, C=48, N=64,
          block_n=64, density=0.4, k=(1, 1), padding=(0, 0, 0, 0), dy_in_place=True),
    # The tile grad weight with TMA boxes of dy and x (strides 1 and 2, one group; the cases above run it too):
    # rectangles of output pixels, split-K over runs of them, x's boxes in the forward's parity view.
    _case("wgrad_tma_s2", pick="wgrad_tma", channels_last=True, stride=(2, 2), H=8, W=10, N=48, density=0.4),
    _case("wgrad_tma_s2x1_dil2_asym_nchw", pick="wgrad_tma", stride=(2, 1), dilation=(2, 2), padding=(2, 1, 0, 3),
          H=10, W=7, C=24, N=32, block_n=32),
    # 24 channels in 32-wide blocks at a column stride of 2: the box of column parity 1 reaches past the channels
    _case("wgrad_tma_s1x2_c24_bf16", pick="wgrad_tma", dtype="bfloat16", channels_last=True, stride=(1, 2), k=(3, 5),
          padding=(1, 1, 2, 2), H=7, W=12, C=24, N=64, block_n=64, density=0.5, dy_in_place=True),
    _case("wgrad_tma_splitk_in_place", pick="wgrad_tma", B=3, H=20, W=20, C=16, N=16, density=0.5,
          channels_last=True, dy_in_place=True),  # 2 splits of 9 rectangles, crossing images
    _case("wgrad_tma_s2_row_runs_w128_in_place", pick="wgrad_tma", density=1.0, channels_last=True, stride=(2, 2),
          C=32, N=128, block_n=128, H=6, W=6, bias=False, dy_in_place=True),
    # Rectangles of whole rows (TW = Wo): dy's tiles are 2-d boxes of consecutive pixels, and from 64 filters on
    # the product is [filters, pixels] x [pixels, channels]
    _case("wgrad_tma_rows_w64", pick="wgrad_tma", channels_last=True, H=8, W=8, C=32, N=128, block_n=64, density=0.4),
    _case("wgrad_tma_rows_s2_in_place_w16", pick="wgrad_tma", reordered=True, channels_last=True, B=3, stride=(2, 2),
          H=16, W=16, N=32, density=0.4, dy_in_place=True),
    _case("wgrad_tma_rows_splitk_w128_bf16", pick="wgrad_tma", dtype="bfloat16", reordered=True, channels_last=True,
          B=4, H=16, W=16, C=16, N=128, block_n=128, density=0.4, dy_in_place=True),  # 2 splits of 4 rectangles
    _case("tiles_backward_fp64", pick="tiles", dtype="float64", C=16, N=16, stride=(3, 3), padding=(0, 0, 0, 0),
          H=10, W=8),
    _case("dense_handover", dense="always", channels_last=True, density=0.6),
    _case("dense_handover_groups_s2", dense="always", C=32, N=32, groups=2, stride=(2, 2), H=8, W=8),
    _case("dense_handover_via_op", dense="always", via_op=True, bias=False),
    _case("dense_handover_asym_pad", dense="always", stride=(1, 2), padding=(1, 1, 0, 2), H=6, W=9),  # stripe only
    _case("fp16", dtype="float16", gpu_only=True, C=32, N=64, block_n=64),
    _case("bf16", dtype="bfloat16", gpu_only=True, C=32, N=64, block_n=64, channels_last=True),
    _case("fp16_depthwise", dtype="float16", gpu_only=True, C=16, N=16, groups=16),
    # 16-bit in the interpreter too (the stripe kernels: on CPU the dense hand-over is torch's fp16 conv)
    _case("fp16_interp", dtype="float16", C=16, N=24, stride=(2, 1), H=7, W=6),
    _case("bf16_interp", dtype="bfloat16", C=16, N=32, block_n=32, channels_last=True, stride=(2, 2), H=8, W=8),
    _case("bf16_interp_depthwise", dtype="bfloat16", C=16, N=16, groups=16, stride=(2, 2), H=8, W=8),
    _case("fp16_interp_splitk_deterministic", dtype="float16", H=20, W=20, C=16, N=16, density=0.4,
          deterministic=True),
])

TOL = {"float64": (1e-9, 1e-9), "float32": (2e-4, 2e-4), "float16": (2e-2, 2e-2), "bfloat16": (8e-2, 5e-2)}


def _make(c, device, gen):
    dtype = getattr(torch, c["dtype"])
    kh, kw = c["k"]
    blocks = c["mask_blocks"]  # consecutive filters sharing one pattern
    mask = (torch.rand(c["N"] // blocks, kh, kw, generator=gen) < c["density"]).repeat_interleave(blocks, 0)
    if c["empty_filters"]:
        mask[torch.randperm(c["N"], generator=gen)[: c["empty_filters"]]] = False
    if c["reordered"]:  # ordered for the case's tile width, which run_case sets the same way
        from stripeconv.backends.triton_plans import filter_order

        with mock.patch.dict(os.environ, STRIPECONV_TRITON_BLOCK_N=str(c["block_n"])):
            mask = mask[filter_order(mask, c["groups"])]
    dense = torch.randn(c["N"], c["C"] // c["groups"], kh, kw, generator=gen, dtype=torch.float64)
    x = torch.randn(c["B"], c["C"], c["H"], c["W"], generator=gen, dtype=torch.float64)
    bias = torch.randn(c["N"], generator=gen, dtype=torch.float64) if c["bias"] else None
    return mask.to(device), dense, x, bias, dtype


def _reference(x, w_packed, bias, mask, c):
    """fp64 oracle: F.conv2d on the unpacked (masked) weight, asymmetric padding via F.pad."""
    from stripeconv.packing import unpack_weight

    pt, pb, pl, pr = c["padding"]
    xp = F.pad(x, (pl, pr, pt, pb))
    (kh, kw), (dh, dw), (sh, sw) = mask.shape[1:], c["dilation"], c["stride"]
    ho = (xp.shape[2] - dh * (kh - 1) - 1) // sh + 1
    wo = (xp.shape[3] - dw * (kw - 1) - 1) // sw + 1
    if min(ho, wo, x.shape[1], x.shape[2], x.shape[3], mask.shape[0]) <= 0:
        # F.conv2d refuses these shapes (or, with no input channel, returns no output channel); the op's
        # answer is defined: an empty output, or every output pixel equal to its bias.
        out = xp.new_zeros(x.shape[0], mask.shape[0], max(ho, 0), max(wo, 0)) + 0 * (xp.sum() + w_packed.sum())
        return out if bias is None else out + bias.view(1, -1, 1, 1)
    return F.conv2d(xp, unpack_weight(w_packed, mask), bias, c["stride"], 0, c["dilation"], c["groups"])


def _close(name, got, want, dtype_name):
    atol, rtol = TOL[dtype_name]
    if got.shape != want.shape:
        return f"{name}: shape {list(got.shape)} != {list(want.shape)}"
    if got.numel() == 0:
        return ""
    got = got.detach().double().cpu()
    want = want.detach().double().cpu()
    scale = max(1.0, want.abs().max().item())
    err = (got - want).abs().max().item()
    if not err <= atol * scale + rtol * 0:
        return f"{name}: max abs error {err:.3g} > {atol * scale:.3g}"
    return ""


def _double_backward_case(c, device, gen) -> str:
    """A gradient penalty through the triton backend against the masked conv (see conftest)."""
    from conftest import check_double_backward
    from stripeconv import backends

    kh, kw = c["k"]
    pt, pb, pl, pr = c["padding"]
    assert pt == pb and pl == pr, "nn.Conv2d takes symmetric padding"
    conv = torch.nn.Conv2d(c["C"], c["N"], (kh, kw), c["stride"], (pt, pl), c["dilation"], c["groups"], c["bias"],
                           dtype=getattr(torch, c["dtype"]), device=device)
    mask = (torch.rand(c["N"], kh, kw, generator=gen) < c["density"]).to(device)
    x = torch.randn(c["B"], c["C"], c["H"], c["W"], generator=gen, dtype=conv.weight.dtype).to(device)
    backends.set_backend("triton")
    try:
        check_double_backward(conv, mask, x, atol=TOL[c["dtype"]][0])
    except AssertionError as exc:
        return f"double backward: {exc}"
    finally:
        backends.set_backend(None)
    return ""


@contextlib.contextmanager
def _tuner_runs(tb):
    """A list that grows by one for each launch made through an autotuner (settled calls skip it)."""
    runs = []
    kernels = [getattr(_triton_runtime._kernels, name) for name in ("stripe_fwd_kernel", "stripe_dgrad_kernel",
                                                                    "stripe_wgrad_kernel")]
    for kernel in kernels:
        def counted(*args, _run=kernel.run, **kwargs):
            runs.append(1)
            return _run(*args, **kwargs)
        kernel.run = counted  # kernel[grid](...) calls self.run
    try:
        yield runs
    finally:
        for kernel in kernels:
            del kernel.run


# A case's ``pick`` for the backward: the candidate each gradient runs (a forward pick names the forward's).
PICKS = {"tiles": {"dgrad": "tiles", "wgrad": "tiles"}, "tiles_tma": {"dgrad": "tiles_tma", "wgrad": "tiles_tma"},
         "wgrad_tma": {"dgrad": "tiles", "wgrad": "tiles_tma"}}


@contextlib.contextmanager
def _candidate_picked(tb, parts: dict):
    """The ops in ``parts`` (of fwd, dgrad, wgrad) run their first candidate whose name contains the op's part
    (there must be one)."""
    choice = tb.gpu_select.choice

    def pick(key, candidates, device):
        part = parts.get(key[0])
        if part is None:
            return choice(key, candidates, device)
        names = [name for name in candidates if part in name]
        assert names, f"no {key[0]} candidate named *{part}*: {sorted(candidates)}"
        return ("stripe_" + part if "stripe_" + part in names else names[0]), True
    tb.gpu_select.choice = pick
    try:
        yield
    finally:
        tb.gpu_select.choice = choice


@contextlib.contextmanager
def _gathers_counted(tb):
    """Counts the tile backward's gathers of dy into tile order (a list of their shapes)."""
    gather, shapes = _triton_backward_tiles.gather_dy, []

    def counted(grad_output, launch):
        shapes.append(tuple(grad_output.shape))
        return gather(grad_output, launch)
    _triton_backward_tiles.gather_dy = counted
    try:
        yield shapes
    finally:
        _triton_backward_tiles.gather_dy = gather


def _module_of(c, mask, w, bias):
    """A StripeConv2d with the case's geometry (symmetric padding), mask and weights."""
    from stripeconv import StripeConv2d

    pt, pb, pl, pr = c["padding"]
    assert pt == pb and pl == pr, "StripeConv2d takes symmetric padding"
    layer = StripeConv2d(c["C"], c["N"], c["k"], c["stride"], (pt, pl), c["dilation"], c["groups"],
                         bias=bias is not None, stripe_mask=mask, device=w.device, dtype=w.dtype)
    with torch.no_grad():
        layer.packed_weight.copy_(w)
        if bias is not None:
            layer.bias.copy_(bias)
    return layer


def run_case(name: str, device: str) -> str:
    """Run one case; returns '' on success or a description of the mismatch."""
    from stripeconv.backends import triton_backend as tb
    from stripeconv.packing import pack_weight

    c = CASES[name]
    gen = torch.Generator().manual_seed(sum(map(ord, name)))
    if c["double_backward"]:
        return _double_backward_case(c, device, gen)
    mask, dense, x64, bias64, dtype = _make(c, device, gen)
    mask_cpu = mask.cpu()
    w64 = pack_weight(dense, mask_cpu).contiguous()
    old_env = {k: os.environ.get(k) for k in ("STRIPECONV_TRITON_BLOCK_N", "STRIPECONV_DETERMINISTIC",
                                              "STRIPECONV_GPU_DENSE")}
    os.environ["STRIPECONV_TRITON_BLOCK_N"] = str(c["block_n"])
    os.environ["STRIPECONV_GPU_DENSE"] = c["dense"]
    os.environ["STRIPECONV_DETERMINISTIC"] = "1" if c["deterministic"] else "0"
    needs_int64 = _triton_shapes.needs_int64
    if c["int64"]:
        _triton_shapes.needs_int64 = lambda *tensors: True
    stack = contextlib.ExitStack()
    if c["pick"]:
        stack.enter_context(_candidate_picked(tb, PICKS.get(c["pick"], {"fwd": c["pick"]})))
    tuner_runs = stack.enter_context(_tuner_runs(tb)) if c["warm_call"] or c["deterministic"] else []
    gathers = stack.enter_context(_gathers_counted(tb))
    try:
        x = x64.to(device, dtype)
        if c["channels_last"]:
            x = x.contiguous(memory_format=torch.channels_last)
        w = w64.to(device, dtype)
        if c["weight_transposed"]:
            w = w.t().contiguous().t()
        bias = bias64.to(device, dtype) if bias64 is not None else None
        # The oracle sees exactly the (rounded) values the kernels see.
        xr, wr = x.double().cpu().requires_grad_(), w.double().cpu().requires_grad_()
        br = bias.double().cpu() if bias is not None else None
        ref = _reference(xr, wr, br, mask_cpu, c)
        gy64 = torch.randn(ref.shape, generator=gen, dtype=torch.float64)
        gy = gy64.to(device, dtype)
        if c["channels_last"]:
            gy = gy.contiguous(memory_format=torch.channels_last)
        ref.backward(gy.double().cpu())
        args = (c["stride"], c["padding"], c["dilation"], c["groups"])
        errors = []
        if c["via_op"] or c["via_module"]:
            from stripeconv import backends, ops

            backends.set_backend("triton")
            try:
                xg = x.detach().requires_grad_()
                if c["via_module"]:
                    from conftest import custom_ops_refused

                    layer = _module_of(c, mask, w, bias)
                    wg, bg = layer.packed_weight, layer.bias
                    run = torch.compile(layer, fullgraph=True, backend="aot_eager") if c["via_compile"] else layer
                    with custom_ops_refused():
                        y = run(xg)
                        y.backward(gy)
                else:
                    wg = w.detach().requires_grad_()
                    bg = bias.detach().requires_grad_() if bias is not None else None
                    y = ops.stripe_conv2d(xg, wg, bg, mask, *args)
                    y.backward(gy)
                if c["channels_last"] and not y.is_contiguous(memory_format=torch.channels_last):
                    errors.append("output is not channels_last for a channels_last input")
                gx, gw = xg.grad, wg.grad
                if bg is not None:
                    errors.append(_close("grad_bias", bg.grad, gy64.sum((0, 2, 3)), c["dtype"]))
            finally:
                backends.set_backend(None)
        else:
            if c["warm_call"]:
                before = len(tb._settled)
                tb.forward(torch.randn(x.shape, generator=gen).to(device, dtype).contiguous(
                    memory_format=torch.channels_last if c["channels_last"] else torch.contiguous_format),
                    torch.randn(w.shape, generator=gen).to(device, dtype), bias, mask, *args)
                if len(tb._settled) != before + 1:
                    errors.append("the first call did not settle its launch")
                runs = len(tuner_runs)
            y = tb.forward(x, w, bias, mask, *args)
            if c["warm_call"] and (len(tb._settled) != before + 1 or len(tuner_runs) != runs):
                errors.append("the second call of the same shape did not reuse the settled launch")
            if c["channels_last"] and y.numel() and not y.is_contiguous(memory_format=torch.channels_last):
                errors.append("output is not channels_last for a channels_last input")
            if c["mask_update"]:
                # Same mask tensor changed in place: the cached plan must be rebuilt.
                tb.forward(x, w, bias, mask, *args)
                with torch.no_grad():
                    mask[0] = ~mask[0]
                    mask[1:3] = True
                mask_cpu = mask.cpu()
                w64b = pack_weight(dense, mask_cpu).contiguous()
                w = w64b.to(device, dtype)
                wr = w.double().cpu().requires_grad_()
                xr = x.double().cpu().requires_grad_()
                ref = _reference(xr, wr, br, mask_cpu, c)
                ref.backward(gy.double().cpu())
                y = tb.forward(x, w, bias, mask, *args)
            if c["warm_call"]:  # the checked gradients reuse the launches these calls settle
                other = lambda t: torch.randn(t.shape, generator=gen).to(device, dtype).as_strided(  # noqa: E731
                    t.shape, t.stride())  # same strides, other values
                before = len(tb._settled)
                tb.grad_input(other(gy), other(w), mask, list(x.shape), *args)
                tb.grad_weight(other(gy), other(x), other(w), mask, *args)
                if len(tb._settled) != before + 2:
                    errors.append("the first gradient calls did not settle their launches")
                runs = len(tuner_runs)
            gx = tb.grad_input(gy, w, mask, list(x.shape), *args)
            gw = tb.grad_weight(gy, x, w, mask, *args)
            if c["warm_call"] and (len(tb._settled) != before + 2 or len(tuner_runs) != runs):
                errors.append("the gradient calls of the same shapes did not reuse the settled launches")
            if c["deterministic"]:
                gw2 = tb.grad_weight(gy, x, w, mask, *args)
                if not torch.equal(gw, gw2):
                    errors.append("deterministic grad_weight differs between two runs")
                if tuner_runs:  # a timed pick of configuration can differ in another process
                    errors.append(f"deterministic mode launched {len(tuner_runs)} kernels through the autotuner")
        if c["pick"] in PICKS and len(gathers) != (0 if c["dy_in_place"] else 1):
            errors.append(f"the tile backward gathered dy {len(gathers)} times, expected "
                          f"{'none (dy read in place)' if c['dy_in_place'] else 'once for both gradients'}")
        errors.append(_close("forward", y, ref, c["dtype"]))
        errors.append(_close("grad_input", gx, xr.grad, c["dtype"]))
        errors.append(_close("grad_weight", gw, wr.grad, c["dtype"]))
        for t, what in ((y, "forward"), (gx, "grad_input"), (gw, "grad_weight")):
            if t.dtype != dtype:
                errors.append(f"{what} dtype {t.dtype} != {dtype}")
        return "; ".join(e for e in errors if e)
    finally:
        stack.close()
        _triton_shapes.needs_int64 = needs_int64
        for k, v in old_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


# ------------------------------------------------------------------------------------------
# Worker mode: `TRITON_INTERPRET=1 python tests/test_triton.py --worker NAME...`
# ------------------------------------------------------------------------------------------

def _interpreter_bf16_dot_error() -> float:
    """Max error of the interpreter's ``tl.dot`` on bfloat16 operands (a GPU's is fp32 rounding)."""
    import triton
    import triton.language as tl

    @triton.jit
    def dot(a_ptr, b_ptr, c_ptr, n: tl.constexpr):
        i = tl.arange(0, n)
        a = tl.load(a_ptr + i[:, None] * n + i[None, :])
        b = tl.load(b_ptr + i[:, None] * n + i[None, :])
        tl.store(c_ptr + i[:, None] * n + i[None, :], tl.dot(a, b, tl.zeros((n, n), dtype=tl.float32)))

    gen = torch.Generator().manual_seed(0)
    a, b = (torch.randn(16, 16, generator=gen).to(torch.bfloat16) for _ in range(2))
    c = torch.empty(16, 16)
    dot[(1,)](a, b, c, 16)
    return float((c.double() - a.double() @ b.double()).abs().max())


def _fix_interpreter_bf16_dot() -> str:
    """Triton 3.9's interpreter multiplies the raw 16-bit patterns of bfloat16 operands in ``tl.dot``:
    widen them to fp32 first (exact products, fp32 sums, as on a GPU). Returns why bf16 cannot be
    checked in this interpreter, or "" when it can."""
    if _interpreter_bf16_dot_error() < 1e-3:
        return ""
    try:
        import numpy as np
        import triton.language as tl
        from triton.runtime import interpreter

        create_dot = interpreter.InterpreterBuilder.create_dot

        def widened(handle):
            if handle.dtype.scalar != tl.bfloat16:
                return handle
            return interpreter.TensorHandle((handle.data.astype(np.uint32) << 16).view(np.float32), tl.float32)

        interpreter.InterpreterBuilder.create_dot = lambda self, a, b, *rest: create_dot(self, widened(a),
                                                                                         widened(b), *rest)
        if _interpreter_bf16_dot_error() < 1e-3:
            return ""
    except Exception as exc:  # internals of another triton version
        return f"this triton interpreter's bfloat16 tl.dot is wrong and could not be widened ({exc})"
    return "this triton interpreter's bfloat16 tl.dot is wrong and could not be widened"


def _worker(names):
    assert os.environ.get("TRITON_INTERPRET") == "1", "the worker needs TRITON_INTERPRET=1"
    torch.set_num_threads(1)
    from stripeconv.backends import triton_backend as tb

    ok, reason = tb.is_available()
    if not ok:
        print("@@SKIP " + json.dumps({"reason": reason}), flush=True)
        return
    no_bf16 = _fix_interpreter_bf16_dot()
    for name in names:
        t0 = time.time()
        if no_bf16 and CASES[name]["dtype"] == "bfloat16":
            print("@@RESULT " + json.dumps({"name": name, "skip": no_bf16}), flush=True)
            continue
        try:
            msg = run_case(name, "cpu")
            ok = not msg
        except Exception as exc:  # report, keep going
            import traceback

            ok, msg = False, f"{type(exc).__name__}: {exc}\n{traceback.format_exc()[-3000:]}"
        print("@@RESULT " + json.dumps({"name": name, "ok": ok, "msg": msg, "secs": time.time() - t0}), flush=True)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:
        _worker(sys.argv[2:])
        sys.exit(0)


# ------------------------------------------------------------------------------------------
# pytest side
# ------------------------------------------------------------------------------------------

INTERPRETER_CASES = [n for n, c in CASES.items() if not c["gpu_only"]]
WORKERS = 2
WORKER_TIMEOUT = 170


def _package_root() -> str:
    import stripeconv.packing

    return os.path.dirname(os.path.dirname(os.path.abspath(stripeconv.packing.__file__)))


@pytest.fixture(scope="module")
def interpreter_results():
    env = dict(os.environ)
    env["TRITON_INTERPRET"] = "1"
    env["PYTHONPATH"] = os.pathsep.join([_package_root()] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env.pop("STRIPECONV_BACKEND", None)
    env["OMP_NUM_THREADS"] = "1"
    chunks = [INTERPRETER_CASES[i::WORKERS] for i in range(WORKERS)]
    procs = [
        subprocess.Popen([sys.executable, os.path.abspath(__file__), "--worker", *chunk], env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for chunk in chunks if chunk
    ]
    results, logs = {}, []
    deadline = time.time() + WORKER_TIMEOUT
    for proc in procs:
        try:
            out, _ = proc.communicate(timeout=max(1.0, deadline - time.time()))
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
        logs.append(out)
        for line in out.splitlines():
            if line.startswith("@@RESULT "):
                r = json.loads(line[len("@@RESULT "):])
                results[r["name"]] = r
            elif line.startswith("@@SKIP "):
                pytest.skip(json.loads(line[len("@@SKIP "):])["reason"])
    return results, "\n".join(logs)[-4000:]


@pytest.mark.parametrize("name", INTERPRETER_CASES)
def test_interpreter(name, interpreter_results):
    results, log = interpreter_results
    if name not in results:
        pytest.fail(f"no result from the interpreter worker for {name!r}; worker output:\n{log}")
    r = results[name]
    if r.get("skip"):
        pytest.skip(r["skip"])
    assert r["ok"], f"{name}: {r['msg']}"


@pytest.mark.parametrize("name", list(CASES))
def test_cuda(name):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("TRITON_INTERPRET=1 is set in this process; the GPU kernels are not compiled")
    if CASES[name]["pick"].endswith("_tma"):
        if not _triton_runtime.tma_capable(torch.device("cuda")) or _triton_runtime.tensor_descriptor() is None:
            pytest.skip("the TMA kernels need compute capability 9.0 and a triton with tensor descriptors")
    msg = run_case(name, "cuda")
    assert not msg, msg


# ---- metadata (host only: no kernels run) -------------------------------------------------

def _plan(mask, groups=1, block_n=16):
    from stripeconv.backends import triton_plans as tp

    return tp.forward_plan(mask, groups, block_n)


def test_availability_reason():
    from stripeconv.backends import triton_backend as tb

    ok, reason = tb.is_available()
    if _triton_runtime.load_kernels() is None:  # e.g. triton < 3.3 without a GPU driver: says why, does not raise
        assert not ok and ("failed to load" in reason or "too old" in reason)
    elif torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1":
        assert ok, reason
    else:
        assert not ok and "CUDA" in reason
        assert not tb.supports(torch.device("cpu"))
    assert tb.supports(torch.device("cuda"))


def test_too_old_triton_is_refused_with_the_version_it_needs(monkeypatch):
    import triton

    from stripeconv.backends import triton_backend as tb

    monkeypatch.setattr(triton, "__version__", "3.1.0")
    monkeypatch.setattr(_triton_runtime, "_kernels", None)
    monkeypatch.setattr(_triton_runtime, "_import_error", None)
    assert _triton_runtime.load_kernels() is None
    ok, reason = tb.is_available()
    assert not ok and "triton 3.1.0 is too old" in reason and ">= 3.2" in reason


def test_plan_permutation_and_weight_rows():
    from stripeconv.packing import pack_weight, unpack_weight

    gen = torch.Generator().manual_seed(0)
    n, c = 40, 5
    mask = torch.rand(n, 3, 3, generator=gen) < 0.4
    mask[3] = False
    plan = _plan(mask, 1, 16)
    ch = plan.tile_ch.flatten()
    assert sorted(ch[ch >= 0].tolist()) == list(range(n))
    # Rebuild the dense weight through the row table as the kernel reads it: equals the masked weight.
    dense = torch.randn(n, c, 3, 3, generator=gen)
    packed = pack_weight(dense, mask)
    rows = plan.w_rows.long().view(plan.num_tiles, plan.umax, 16)
    padding_columns = (plan.tile_ch.long() < 0)[:, None, :].expand_as(rows)
    assert (rows[padding_columns] == -1).all()
    slab = torch.where((rows >= 0)[..., None], packed[rows.clamp(min=0)], 0.0)
    rebuilt = torch.zeros(n, c, 9)
    for t in range(plan.num_tiles):
        for u in range(int(plan.tile_npos[t])):
            p = int(plan.tile_pos[t, u])
            for col in range(16):
                f = int(plan.tile_ch[t, col])
                if f >= 0:
                    rebuilt[f, :, p] = slab[t, u, col]
    torch.testing.assert_close(rebuilt.view(n, c, 3, 3), unpack_weight(packed, mask))
    # Heavy tiles first, and the efficiency is kept / computed.
    npos = plan.tile_npos.tolist()
    assert npos == sorted(npos, reverse=True)
    assert plan.kept == int(mask.sum())
    assert plan.computed == sum(npos) * 16


def test_tile_efficiency():
    from stripeconv.backends import triton_plans as tp

    # Grouped stripes: the same positions across groups of 16 filters (shuffled) -> fully efficient.
    gen = torch.Generator().manual_seed(1)
    patterns = torch.rand(4, 3, 3, generator=gen) < 0.5
    patterns[:, 1, 1] = True
    mask = patterns.repeat_interleave(16, 0)[torch.randperm(64, generator=gen)]
    assert tp.tile_efficiency(mask, block_n=16) == pytest.approx(1.0)
    # Random masks: efficiency in (density, 1]; dense mask: 1; empty mask: 1 by convention.
    rnd = torch.rand(256, 3, 3, generator=gen) < 0.3
    eff = tp.tile_efficiency(rnd, block_n=16)
    assert 0.3 * 0.9 < eff <= 1.0
    assert tp.tile_efficiency(torch.ones(32, 3, 3, dtype=torch.bool), block_n=16) == 1.0
    assert tp.tile_efficiency(torch.zeros(32, 3, 3, dtype=torch.bool), block_n=16) == 1.0


@pytest.mark.parametrize("value", ["24", "256", "0", "-4", "wide"])
def test_tile_width_variable_is_checked(value, monkeypatch):
    from stripeconv.backends import triton_plans as tp

    monkeypatch.setenv("STRIPECONV_TRITON_BLOCK_N", value)
    with pytest.raises(ValueError, match="STRIPECONV_TRITON_BLOCK_N must be a power of two from 1 to 128"):
        tp.default_block_n(64)
    monkeypatch.setenv("STRIPECONV_TRITON_BLOCK_N", "32")
    assert tp.default_block_n(64) == 32


def test_plan_cache_follows_mask_version():
    mask = torch.rand(32, 3, 3, generator=torch.Generator().manual_seed(2)) < 0.5
    p1 = _plan(mask)
    assert _plan(mask) is p1
    mask[0, 0, 0] = not bool(mask[0, 0, 0])
    p2 = _plan(mask)
    assert p2 is not p1 and p2.kept == int(mask.sum())


def test_forward_plans_follow_mask_version_and_tile_widths():
    """The per-call lookup of the forward's candidate plans is tile_widths' plans, rebuilt for a new mask."""
    from stripeconv.backends import triton_plans as tp

    mask = torch.rand(96, 3, 3, generator=torch.Generator().manual_seed(3)) < 0.3
    plans = tp.forward_plans(mask, 1, mask.device)
    assert list(dict.fromkeys(p.block_n for p in plans)) == tp.tile_widths(mask) and len(plans) > 1
    # per width the clustered tiles, and ahead of them tiles of consecutive filters where those are close
    for p in plans:
        assert p is tp.forward_plan(mask, 1, p.block_n) or (p.in_order and p.aligned), p.block_n
    assert tp.forward_plans(mask, 1, mask.device) is plans
    mask[:] = True
    plans = tp.forward_plans(mask, 1, mask.device)
    assert [p.kept for p in plans] == [96 * 9] * len(plans)


def test_int64_indexing_only_where_offsets_need_it():
    """Offsets past int32 (big or strided tensors; meta tensors cost no memory) take the int64 kernels."""
    small = torch.randn(2, 3, 4, 5)
    assert not _triton_shapes.needs_int64(small, small.contiguous(memory_format=torch.channels_last), torch.empty(0))
    assert not _triton_shapes.needs_int64(torch.zeros(1).expand(2**31 + 1))  # stride 0: one element
    assert not _triton_shapes.needs_int64(torch.empty(2**31 - 1, device="meta"))  # last offset 2**31 - 2
    assert _triton_shapes.needs_int64(small, torch.empty(2**31, device="meta"))
    assert _triton_shapes.needs_int64(torch.empty(2**16, 2**16, device="meta").t())  # transposed: not dense
    assert _triton_shapes.needs_int64(torch.empty(4, 2**30, device="meta")[::2])  # 2 rows, 2**31 apart


# ---- compile for GPUs without a GPU (catches GPU-only compile errors on CPU-only CI) ---------

def _aot():
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("TRITON_INTERPRET=1 in this process")
    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import ASTSource  # noqa: F401
    except ImportError as exc:  # pragma: no cover - other triton versions
        pytest.skip(f"no ahead-of-time compiler in this triton ({exc})")
    from stripeconv.kernels import aot

    if _triton_runtime.load_kernels() is None:
        pytest.skip(_triton_runtime._import_error)
    return aot


def _aot_calls(aot):
    """Calls whose launches cover every kernel branch: tensor-core and scalar paths, all dtypes,
    both layouts, stride 2 phases, split-K with atomics and with per-split buffers."""
    calls = aot.layer_calls(128, 128, 32, stride=2, density=0.3, dtype=torch.bfloat16, batch=8)
    calls += aot.layer_calls(64, 96, 12, density=0.5, dtype=torch.float16, channels_last=False, bias=False)
    calls += aot.layer_calls(32, 32, 8, density=0.5, groups=32, dtype=torch.bfloat16)
    calls += aot.layer_calls(24, 40, 8, density=0.5, groups=2, dtype=torch.float32)  # small groups
    calls += aot.layer_calls(32, 32, 8, density=0.7, dtype=torch.float64)
    return calls


def _check_variants(aot, label, call, arch):
    variants = aot.compile_call(call, arch)
    assert variants, f"{label}: nothing was launched"
    by_kernel = {}
    for v in variants:
        by_kernel.setdefault(v.kernel, []).append(v)
    for kernel, vs in by_kernel.items():
        # The autotuner must always have a configuration that does not spill.
        assert any(v.spill_bytes == 0 for v in vs), (label, [v.row() for v in vs])
        for v in vs:
            # fp32 in IEEE mode and fp64 have no tensor-core path; 16-bit inputs and TF32 do.
            if v.constexprs.get("USE_DOT") and (v.dtype in ("fp16", "bf16") or v.constexprs["INPUT_PRECISION"] == "tf32"):
                # a warpgroup MMA needs 64 rows: the forward's BLOCK_M = 32 (few pixels) runs mma.sync
                wgmma = arch >= 90 and (kernel != "stripe_fwd_kernel" or v.config["BLOCK_M"] >= 64)
                assert v.tensor_cores == ("wgmma" if wgmma else "mma"), (label, v.row())
            if kernel == "stripe_fwd_kernel" and v.constexprs.get("USE_DOT"):
                assert v.async_copies > 0, ("forward loads are not pipelined", label, v.row())
            if v.tensor_cores != "none" and v.async_copies:
                # The main loop leaves staged copies in flight while it multiplies: 0 would mean that every
                # iteration waits for all of its loads (one stage, whatever num_stages asks for).
                assert (v.copies_in_flight or 0) >= 1, ("each iteration waits for all its loads", label, v.row())
    return variants


def test_forward_reads_the_packed_weight_in_place():
    """The forward launch gets the caller's packed rows (no per-call weight copy) and the plan's row table."""
    aot = _aot()
    from stripeconv.backends import triton_backend as tb
    from stripeconv.packing import pack_weight

    gen = torch.Generator().manual_seed(0)
    mask = torch.rand(48, 3, 3, generator=gen) < 0.4
    packed = pack_weight(torch.randn(48, 32, 3, 3, generator=gen), mask).to(torch.bfloat16)
    x = torch.randn(2, 32, 8, 8, generator=gen).to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
    for weight in (packed, packed.t().contiguous().t()):
        (launch,) = aot.capture_launches(lambda: tb.forward(x, weight, None, mask, [1, 1], [1, 1, 1, 1], [1, 1], 1))
        w_arg, rows_arg = launch.args[1], launch.args[8]
        assert torch.equal(w_arg, packed) and w_arg.is_contiguous()
        assert (w_arg.data_ptr() == weight.data_ptr()) == weight.is_contiguous()
        plan = tb.forward_plans(mask, 1, x.device)[0]
        assert rows_arg is plan.w_rows and rows_arg.dtype == torch.int32


@pytest.fixture
def settled_calls(monkeypatch):
    """(aot, triton backend) with no settled calls and the settings that change launches unset."""
    aot = _aot()
    from stripeconv.backends import triton_backend as tb

    for name in ("STRIPECONV_TRITON_BLOCK_N", "STRIPECONV_GPU_DENSE", "STRIPECONV_DETERMINISTIC",
                 "STRIPECONV_TRITON_EXCLUDE"):
        monkeypatch.delenv(name, raising=False)
    tb.clear_cache()
    yield aot, tb
    tb.clear_cache()


def test_settled_forward_calls(settled_calls, monkeypatch):
    """A call shaped like an earlier one reuses its settled launch with the new tensors; whatever the
    launch depends on besides the tensors' values (mask contents, bias or not, the dense/stripe
    decisions, tile width, TF32) makes a new one."""
    aot, tb = settled_calls
    from stripeconv.backends import gpu_select

    gen = torch.Generator().manual_seed(1)
    mask = torch.rand(48, 3, 3, generator=gen) < 0.4
    geometry = ([2, 2], [1, 1, 1, 1], [1, 1], 1)

    def call(x, bias=None, weight=None):
        weight = torch.randn(int(mask.sum()), 32, generator=gen) if weight is None else weight
        (launch,) = aot.capture_launches(lambda: tb.forward(x, weight, bias, mask, *geometry))
        return launch

    nchw = lambda: torch.randn(2, 32, 8, 8, generator=gen)  # noqa: E731
    first, second = call(nchw()), call(nchw())
    assert len(tb._settled) == 1
    assert all(a is b for a, b in zip(first.args[4:9], second.args[4:9]))  # the plan's tables
    assert first.args[9:] == second.args[9:] and first.kwargs == second.kwargs
    x, weight = nchw(), torch.randn(int(mask.sum()), 32, generator=gen)
    launch = call(x, weight=weight)
    assert len(tb._settled) == 1
    assert torch.equal(launch.args[0], x) and launch.args[0].is_contiguous(memory_format=torch.channels_last)
    assert launch.args[1] is weight and launch.args[8] is first.args[8]

    def grows(make):
        before = len(tb._settled)
        launch = make()
        assert len(tb._settled) == before + 1
        return launch

    assert grows(lambda: call(nchw(), bias=torch.randn(48))).kwargs["HAS_BIAS"]
    assert grows(lambda: call(nchw().contiguous(memory_format=torch.channels_last))).args[0].stride()[1] == 1
    grows(lambda: call(torch.randn(3, 32, 8, 8, generator=gen)))
    gpu_select.clear()
    grows(lambda: call(nchw()))
    monkeypatch.setenv("STRIPECONV_TRITON_BLOCK_N", "16")
    assert grows(lambda: call(nchw())).kwargs["BLOCK_N"] == 16
    monkeypatch.delenv("STRIPECONV_TRITON_BLOCK_N")
    widths = tb.triton_plans.tile_widths(mask, 1, "cpu")
    assert len(widths) > 1 and first.kwargs["BLOCK_N"] == widths[0]
    monkeypatch.setenv("STRIPECONV_TRITON_EXCLUDE", f"stripe{widths[0]}*")
    assert grows(lambda: call(nchw())).kwargs["BLOCK_N"] == widths[1]
    monkeypatch.delenv("STRIPECONV_TRITON_EXCLUDE")
    tf32 = torch.backends.cuda.matmul.allow_tf32  # a torch flag, not an attribute monkeypatch can restore
    try:
        torch.backends.cuda.matmul.allow_tf32 = not tf32
        grows(lambda: call(nchw()))
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    old_rows = tb.forward_plans(mask, 1, mask.device)[0].w_rows
    with torch.no_grad():
        mask[:4] = True  # same tensor, new contents: a new plan
    launch = grows(lambda: call(nchw()))
    assert launch.args[8] is not old_rows and torch.equal(launch.args[8], tb.forward_plans(mask, 1, "cpu")[0].w_rows)
    tb.clear_cache()
    assert not tb._settled


def test_settled_gradient_calls(settled_calls, monkeypatch):
    """Grad input and grad weight reuse their settled launches too; deterministic mode makes its own."""
    aot, tb = settled_calls
    gen = torch.Generator().manual_seed(2)
    mask = torch.rand(32, 3, 3, generator=gen) < 0.5
    geometry = ([1, 1], [1, 1, 1, 1], [1, 1], 1)
    rows = int(mask.sum())
    nhwc = lambda *shape: torch.randn(*shape, generator=gen).contiguous(memory_format=torch.channels_last)  # noqa: E731

    def launches(n_calls):
        calls = []
        for _ in range(n_calls):
            gy, x, w = nhwc(4, 32, 16, 16), nhwc(4, 16, 16, 16), torch.randn(rows, 16, generator=gen)
            calls += aot.capture_launches(lambda: (tb.grad_input(gy, w, mask, list(x.shape), *geometry),
                                                   tb.grad_weight(gy, x, w, mask, *geometry)))
            assert calls[-2].args[0] is gy and calls[-2].args[1] is w and calls[-1].args[1] is x
        return calls

    first_dgrad, first_wgrad, dgrad, wgrad = launches(2)
    assert len(tb._settled) == 2
    assert dgrad.kwargs == first_dgrad.kwargs and wgrad.kwargs == first_wgrad.kwargs and wgrad.kwargs["ATOMIC"]
    assert all(a is b for a, b in zip(dgrad.args[3:9], first_dgrad.args[3:9]))  # the plan's tables
    monkeypatch.setenv("STRIPECONV_DETERMINISTIC", "1")  # no timed choices: settled anew, both
    dgrad, wgrad = launches(1)
    assert len(tb._settled) == 4 and not wgrad.kwargs["ATOMIC"] and dgrad.kwargs == first_dgrad.kwargs


def test_deterministic_launch_takes_the_first_configuration_that_fits(monkeypatch):
    """Deterministic mode never times configurations (a timed pick can differ between processes, and
    grad weight's pixel block orders its sums): a launch runs the kernel's first configuration this
    GPU can run, as the autotuner would skip one that does not fit, and later launches reuse it."""
    import types

    import triton
    from triton.runtime.errors import OutOfResources

    launched = []

    class Jit:
        def __getitem__(self, grid):
            def run(*args, **kwargs):
                launched.append((grid, args, kwargs["BLOCK_M"], kwargs["num_warps"], kwargs["ATOMIC"]))
                if kwargs["BLOCK_M"] >= too_big:
                    raise OutOfResources(300_000, 232_448, "shared memory")
            return run

    class Tuner:
        fn = Jit()
        configs = [triton.Config({"BLOCK_M": 256}, num_warps=8), triton.Config({"BLOCK_M": 64}, num_warps=4),
                   triton.Config({"BLOCK_M": 32}, num_warps=4)]

        def __getitem__(self, grid):
            raise AssertionError("a deterministic launch went through the autotuner")

    monkeypatch.setattr(_triton_runtime, "_kernels", types.SimpleNamespace(stripe_wgrad_kernel=Tuner()))
    too_big = 256
    launch = _triton_runtime.TunedLaunch("stripe_wgrad_kernel", (4, 2), {"ATOMIC": False}, fixed=True)
    launch("x")
    launch("y")
    assert launched == [((4, 2), ("x",), 256, 8, False), ((4, 2), ("x",), 64, 4, False),
                        ((4, 2), ("y",), 64, 4, False)]
    too_big = 1  # no configuration fits: the launch fails with the GPU's reason
    with pytest.raises(OutOfResources, match="shared memory"):
        _triton_runtime.TunedLaunch("stripe_wgrad_kernel", (4, 2), {"ATOMIC": False}, fixed=True)("z")


def test_compiles_for_hopper():
    aot = _aot()
    launched = set()
    for label, call in _aot_calls(aot):
        for v in _check_variants(aot, label, call, 90):
            launched.add((v.kernel, bool(v.constexprs.get("USE_DOT")), v.constexprs.get("ATOMIC")))
    # Both wgrad reductions and both paths of every kernel were compiled.
    for kernel in ("stripe_fwd_kernel", "stripe_dgrad_kernel", "stripe_wgrad_kernel"):
        assert {use_dot for k, use_dot, _ in launched if k == kernel} == {True, False}, launched
    assert {atomic for k, _, atomic in launched if k == "stripe_wgrad_kernel"} == {True, False}, launched


def test_tile_backward_compiles_for_hopper_with_dy_gathered_or_in_place():
    """The tile gradient kernels compile for sm_90 without spilling, both on wgmma (grad weight with the
    narrow tiles of a density-0.3 mask too), reading dy gathered into tile order for a random mask and
    in place once its filters are in tile order."""
    aot = _aot()
    from stripeconv import packing
    from stripeconv.backends import triton_backend as tb
    from stripeconv.backends.triton_plans import filter_order

    g = torch.Generator().manual_seed(0)
    mask = torch.rand(96, 3, 3, generator=g) < 0.3
    x = torch.randn(2, 64, 12, 12, generator=g).to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
    dy = torch.randn(2, 96, 12, 12, generator=g).to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
    conv = ((1, 1), (1, 1, 1, 1), (1, 1), 1)
    for ordered in (False, True):
        m = mask[filter_order(mask)].contiguous() if ordered else mask
        packed = packing.pack_weight(torch.randn(96, 64, 3, 3, generator=g).to(torch.bfloat16), m)
        tb.clear_cache()
        launches = aot.capture_launches(lambda: (tb.grad_input(dy, packed, m, x.shape, *conv),
                                                 tb.grad_weight(dy, x, packed, m, *conv)), every_candidate=True)
        names = [launch.name for launch in launches]
        # one gather for both gradients; a second grad weight candidate of the same call (the TMA one, where
        # offered: only while candidates are timed) gathers again
        gathers = 1 + names.count("stripe_wgrad_tiles_tma_kernel")
        assert names.count("stripe_gather_columns_kernel") == (0 if ordered else gathers), names
        tiles = [launch for launch in launches if launch.name.endswith("_tiles_kernel")]
        assert len(tiles) == 2, names
        for launch in tiles:
            variants = aot.compile_launch(launch, 90)
            assert any(v.spill_bytes == 0 for v in variants), [v.row() for v in variants]
            assert all(v.tensor_cores == "wgmma" for v in variants), [v.row() for v in variants]
            assert all(v.copies_in_flight >= 1 for v in variants), [v.row() for v in variants]
            assert launch.name != "stripe_wgrad_tiles_kernel" or launch.kwargs["BLOCK_T"] < 64, launch.kwargs
    tb.clear_cache()


def test_code_digest_follows_the_instructions_only():
    """The PTX digest ignores source line markers and debug sections, and sees every instruction."""
    aot = _aot()
    body = ".visible .entry k()\n{\n\t.loc 1 10 5\n\tadd.s32 %r1, %r2, %r3;\n\tret;\n}\n"
    moved = body.replace(".loc 1 10 5", ".loc 1 42 7") + "\t.section\t.debug_abbrev\n{\n.b8 1\n}\n"
    assert aot.ptx_code_digest(body) == aot.ptx_code_digest(moved)
    assert aot.ptx_code_digest(body) != aot.ptx_code_digest(body.replace("add.s32", "sub.s32"))
    # compiled variants: one digest per configuration, stable, and different for another code path
    calls = aot.layer_calls(32, 32, 8, density=0.5, dtype=torch.bfloat16)
    first = [v.code_digest for v in aot.compile_call(calls[0][1], 90)]
    assert len(set(first)) == len(first) > 1 and first == [v.code_digest for v in aot.compile_call(calls[0][1], 90)]
    nchw = aot.layer_calls(32, 32, 8, density=0.5, dtype=torch.bfloat16, channels_last=False)
    assert set(first).isdisjoint(v.code_digest for v in aot.compile_call(nchw[0][1], 90))  # planes store


def test_compile_call_covers_every_candidate_once():
    """With every_candidate, compile_call compiles the candidates the first GPU call times (here the tile
    backward and its dy gather beside the per-position grad input), each variant once."""
    aot = _aot()
    dgrad = aot.layer_calls(32, 32, 8, density=0.5, dtype=torch.bfloat16, channels_last=False)[1][1]
    first = {v.kernel for v in aot.compile_call(dgrad, 90)}
    every = aot.compile_call(dgrad, 90, every_candidate=True)
    assert first == {"stripe_dgrad_kernel"}
    assert {"stripe_dgrad_kernel", "stripe_dgrad_tiles_kernel", "stripe_gather_columns_kernel"} <= {v.kernel for v in every}
    assert len({(v.kernel, v.row(), v.code_digest) for v in every}) == len(every)


def test_compiles_int64_offsets_for_hopper(monkeypatch):
    """The int64-offset variants (tensors of 2**31 elements or more) compile too, on both paths."""
    aot = _aot()
    monkeypatch.setattr(_triton_shapes, "needs_int64", lambda *tensors: True)
    calls = aot.layer_calls(64, 64, 8, stride=2, density=0.5, dtype=torch.bfloat16)
    calls += aot.layer_calls(16, 16, 8, density=0.5, groups=16, dtype=torch.bfloat16)
    compiled = set()
    for label, call in calls:
        for v in _check_variants(aot, label, call, 90):
            assert v.constexprs["INT64_INDEX"] is True, (label, v.row())
            compiled.add((v.kernel, bool(v.constexprs.get("USE_DOT"))))
    assert len(compiled) == 6, compiled  # three kernels, tensor-core and scalar paths


def test_compiles_for_ampere():
    aot = _aot()
    for label, call in aot.layer_calls(128, 128, 16, stride=2, density=0.3, dtype=torch.bfloat16, batch=8):
        _check_variants(aot, label, call, 80)


def test_tf32_only_when_allowed():
    aot = _aot()
    label, call = aot.layer_calls(64, 64, 8, dtype=torch.float32)[0]
    old = torch.backends.cuda.matmul.allow_tf32
    try:
        for allow, want in ((False, "ieee"), (True, "tf32")):
            torch.backends.cuda.matmul.allow_tf32 = allow
            (launch,) = aot.capture_launches(call)
            assert launch.kwargs["INPUT_PRECISION"] == want
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old
    matmul = torch.backends.cuda.matmul
    if hasattr(matmul, "fp32_precision"):  # torch's newer API: reading allow_tf32 after it raises
        try:
            for precision, want in (("ieee", "ieee"), ("tf32", "tf32")):
                matmul.fp32_precision = precision
                (launch,) = aot.capture_launches(call)
                assert launch.kwargs["INPUT_PRECISION"] == want
        finally:
            matmul.fp32_precision = "none"
            matmul.allow_tf32 = old


def test_dense_handover_runs_fp32_at_the_stripe_kernels_precision():
    """cuDNN's fp32 convs default to TF32; the hand-over runs them at the matmul flag's precision."""
    old_matmul, old_cudnn = torch.backends.cuda.matmul.allow_tf32, torch._C._get_cudnn_allow_tf32()
    try:
        for matmul_tf32 in (False, True):
            torch.backends.cuda.matmul.allow_tf32 = matmul_tf32
            torch._C._set_cudnn_allow_tf32(not matmul_tf32)
            with _triton_runtime.dense_precision(torch.float32):
                assert torch._C._get_cudnn_allow_tf32() == matmul_tf32
            assert torch._C._get_cudnn_allow_tf32() == (not matmul_tf32)  # restored
            with _triton_runtime.dense_precision(torch.bfloat16):  # no TF32 question for 16-bit inputs
                assert torch._C._get_cudnn_allow_tf32() == (not matmul_tf32)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old_matmul
        torch._C._set_cudnn_allow_tf32(old_cudnn)


def test_tuning_keys_hold_the_tile_shape_and_code_path():
    """A configuration tuned for one tile width or code path is never reused for another."""
    from stripeconv.backends import triton_backend as tb

    sc = _triton_runtime.load_kernels()
    if sc is None:
        pytest.skip(_triton_runtime._import_error)
    for kernel, extra in ((sc.stripe_fwd_kernel, ("BLOCK_N", "BLOCK_K")), (sc.stripe_dgrad_kernel, ("BLOCK_N", "BLOCK_K")),
                          (sc.stripe_wgrad_kernel, ("BLOCK_R", "BLOCK_C", "ATOMIC"))):
        assert set(tb.kernels_module("_tuning").TUNE_KEY) | {"USE_DOT", "INPUT_PRECISION", "INT64_INDEX"} | set(extra) <= set(kernel.keys)


def test_tuning_key_arguments_compile_no_extra_variants():
    """The KEY_* arguments only key the autotuner: their values (1, multiples of 16 or not) must not make
    Triton compile another variant, while the integers that enter addresses keep their specialisation."""
    aot = _aot()
    import inspect

    def spec(launch, **changes):
        fn = aot._jit_fn(launch.kernel)
        values = dict(inspect.signature(fn.fn).bind_partial(*launch.args, **launch.kwargs).arguments)
        values.update(changes, BLOCK_M=64)
        return aot.specialisation(fn, values)

    launches = [launch for _, call in aot.layer_calls(32, 32, 8, density=0.5) for launch in aot.capture_launches(call)]
    assert {aot._jit_fn(launch.kernel).__name__ for launch in launches} == {
        "stripe_fwd_kernel", "stripe_dgrad_kernel", "stripe_wgrad_kernel"}
    for launch in launches:
        assert spec(launch, KEY_M=1, KEY_C=16, KEY_DENSITY=7) == spec(launch, KEY_M=3, KEY_C=5, KEY_DENSITY=32)
        assert spec(launch, Wo=1) != spec(launch, Wo=16) != spec(launch, Wo=7)


def test_autotuning_times_each_configuration_briefly(monkeypatch):
    """Autotuning a new shape times each configuration for ~30 ms (triton's default: 125 ms)."""
    import inspect

    import triton
    import triton.testing
    from stripeconv.backends import triton_backend as tb

    sc = _triton_runtime.load_kernels()
    if sc is None:
        pytest.skip(_triton_runtime._import_error)
    if "do_bench" not in inspect.signature(triton.autotune).parameters:
        pytest.skip(f"triton {triton.__version__} times configurations its own way")
    tuning_bench = tb.kernels_module("_tuning").tuning_bench
    for kernel in (sc.stripe_fwd_kernel, sc.stripe_dgrad_kernel, sc.stripe_wgrad_kernel):
        assert kernel.do_bench is tuning_bench
    calls = []
    monkeypatch.setattr(triton.testing, "do_bench", lambda fn, **kw: calls.append(kw) or [1.0, 0.9, 1.1])
    assert tuning_bench(lambda: None, quantiles=(0.5, 0.2, 0.8)) == [1.0, 0.9, 1.1]
    assert calls == [{"warmup": 5, "rep": 25, "quantiles": (0.5, 0.2, 0.8)}]


def test_interpreter_checked_before_cuda(monkeypatch):
    """With TRITON_INTERPRET=1 every launch runs in the interpreter, CUDA tensors too: a GPU machine whose
    interpreter cannot run the kernels reports the backend unavailable (tests skip) instead of failing."""
    from stripeconv.backends import triton_backend as tb

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(_triton_runtime, "interpreting", lambda: True)
    monkeypatch.setattr(_triton_runtime, "check_interpreter", lambda: "this interpreter cannot run the kernels")
    if _triton_runtime.load_kernels() is None:
        pytest.skip("triton kernels do not load here")
    assert tb.is_available() == (False, "this interpreter cannot run the kernels")


@pytest.mark.parametrize("width", [16, 32, 128])
def test_compiles_every_tile_width(width, monkeypatch):
    aot = _aot()
    monkeypatch.setenv("STRIPECONV_TRITON_BLOCK_N", str(width))
    label, call = aot.layer_calls(128, 256, 16, density=0.7, dtype=torch.bfloat16)[0]
    variants = _check_variants(aot, label, call, 90)
    assert {v.constexprs["BLOCK_N"] for v in variants} == {width}


def test_one_gather_of_dy_serves_both_gradients(monkeypatch):
    """Grad input leaves its gathered dy for grad weight: the same tensor, version and plan only, once."""
    from stripeconv.backends import triton_backend as tb

    gathers = []
    monkeypatch.setattr(_triton_backward_tiles, "gather_dy", lambda dy, launch: gathers.append(dy) or torch.zeros(1))
    monkeypatch.setattr(_triton_backward_tiles, "_last_gather", None)
    plan, other_plan = object(), object()
    dy = torch.ones(2, 3)
    kept = _triton_backward_tiles.gathered_dy(dy, plan, True, None)
    # grad weight reuses it
    assert _triton_backward_tiles.gathered_dy(dy, plan, False, None) is kept and len(gathers) == 1
    _triton_backward_tiles.gathered_dy(dy, plan, False, None)  # taken once: a third call gathers again
    assert len(gathers) == 2 and _triton_backward_tiles._last_gather is None
    for changed in (lambda: dy.clone(), lambda: dy.add_(1)):  # another tensor, or the same one written to
        _triton_backward_tiles.gathered_dy(dy, plan, True, None)
        probe = changed()
        _triton_backward_tiles.gathered_dy(probe if probe is not dy else dy, plan, False, None)
    _triton_backward_tiles.gathered_dy(dy, plan, True, None)
    _triton_backward_tiles.gathered_dy(dy, other_plan, False, None)
    assert len(gathers) == 8 and _triton_backward_tiles._last_gather is None
    _triton_backward_tiles.gathered_dy(dy, plan, True, None)
    tb.clear_cache()  # holds no tensor after the caches are cleared
    assert _triton_backward_tiles._last_gather is None


def test_aligned_runs_only_for_runs_of_eight_consecutive_channels():
    """The forward's vector stores rely on this: any other layout must not be called aligned."""
    import numpy as np

    from stripeconv.backends.triton_plans import _aligned_runs

    run = lambda start: list(range(start, start + 8))  # noqa: E731
    assert _aligned_runs(np.array([run(16) + run(0), run(8) + [-1] * 8]))
    assert not _aligned_runs(np.array([run(4) + run(16)]))                 # a run not starting at a multiple of 8
    assert not _aligned_runs(np.array([run(0)[:7] + [9] + run(16)]))       # a broken run
    assert not _aligned_runs(np.array([run(0) + [24, 25, 26, 27, -1, -1, -1, -1]]))  # half a run, half padding
    assert not _aligned_runs(np.array([list(range(4))]))                   # narrower than 8


def test_row_runs_only_where_every_tile_reads_consecutive_rows():
    """The forward's ROW_RUNS path reads BLOCK_N consecutive packed rows from each (tile, position)'s first
    one, unmasked: any plan with an absent stripe or a row out of sequence there must not be called so."""
    import numpy as np

    from stripeconv.backends.triton_plans import _row_runs, forward_plans

    rows = np.array([[[0, 1, 2, 3], [8, 9, 10, 11], [-1, -1, -1, -1]]])  # [T, UMAX, BLOCK_N]
    assert _row_runs(rows, np.array([2]))           # the padding position past the union is not read
    assert not _row_runs(rows, np.array([3]))
    rows[0, 1, 2] = 12
    assert not _row_runs(rows, np.array([2]))       # out of sequence
    absent = np.array([[[-1, 0, 1, 2]]])
    assert not _row_runs(absent, np.array([1]))     # an absent stripe is a zero, not the row before the next
    g = torch.Generator().manual_seed(0)
    dense = torch.ones(48, 3, 3, dtype=torch.bool)
    blocks = (torch.rand(3, 3, 3, generator=g) < 0.5).repeat_interleave(16, 0)  # blocks of 16 alike filters
    random = torch.rand(48, 3, 3, generator=g) < 0.5
    plans = forward_plans(dense, 1, "cpu")  # a 64-wide tile of 48 filters has padding columns: no rows there
    assert [plan.row_runs for plan in plans] == [plan.num_tiles * plan.block_n == 48 for plan in plans]
    assert any(plan.row_runs for plan in plans) and any(plan.row_runs for plan in forward_plans(blocks, 1, "cpu"))
    assert not any(plan.row_runs for plan in forward_plans(random, 1, "cpu"))
    assert all(plan.row_runs for plan in forward_plans(torch.ones(32, 3, 3, dtype=torch.bool), 2, "cpu"))


def test_forward_times_small_pixel_blocks_only_for_few_pixels():
    """The forward's tuner times BLOCK_M = 32 for launches over few output pixels (batch 1, small planes:
    more programs for the GPU's multiprocessors) and BLOCK_M = 256 for many, never both; the tuner itself
    prunes so, and the ahead-of-time tools compile what it would time."""
    aot = _aot()
    for batch, h, kept, dropped in ((1, 16, 32, 256), (64, 16, 256, 32)):
        label, call = aot.layer_calls(128, 128, h, density=0.5, dtype=torch.bfloat16, batch=batch)[0]
        launch = aot.capture_launches(call)[0]
        tuner = launch.kernel
        tuner.nargs = dict(zip(tuner.arg_names, launch.args))
        timed = [c.kwargs["BLOCK_M"] for c in tuner.prune_configs(dict(launch.kwargs))]
        assert kept in timed and dropped not in timed and len(timed) == len(tuner.configs) - 1, (label, timed)
        assert [c.kwargs["BLOCK_M"] for c in aot.tuned_configs(launch)] == timed


def test_copies_in_flight_reads_the_main_loop():
    """The main loop is the innermost loop with the MMAs; its smallest cp.async wait count is what stays in
    flight (loops without MMAs, and waits outside the loop, do not count)."""
    aot = _aot()

    def ptx(wait_in_mma_loop):
        return ("\tcp.async.wait_group \t0;\n"
                "$L__BB0_1:  // =>This Inner Loop Header: Depth=1\n\tcp.async.wait_group \t0;\n"
                "\tld.global.b32 %r1, [%rd1];\n\t@%p1 bra \t$L__BB0_1;\n"
                "$L__BB0_2:  // =>This Inner Loop Header: Depth=1\n"
                f"\tcp.async.wait_group \t{wait_in_mma_loop};\n\tbar.sync \t0;\n"
                "\twgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {%r2}, %rd2, %rd3, %p2, 1, 1, 0, 0;\n"
                "\tcp.async.cg.shared.global [ %r3 + 0 ], [ %rd4 + 0 ], 0x10, %r4;\n"
                "\tcp.async.wait_group \t3;\n\t@%p3 bra \t$L__BB0_2;\n"
                "\tcp.async.wait_group \t0;\n\tret;\n")

    assert aot.copies_in_flight(ptx(2)) == 2
    assert aot.copies_in_flight(ptx(0)) == 0
    assert aot.copies_in_flight(ptx(2).replace("wgmma.mma_async", "fma.rn.f32")) is None  # no MMA loop
    assert aot.copies_in_flight("\tmma.sync.aligned.m16n8k16 {%r1};\n\tret;\n") is None  # no loop
    # the SASS count of a compiled forward: its main loop, MMAs and the address work around them
    label, call = aot.layer_calls(64, 64, 8, density=1.0, dtype=torch.bfloat16)[0]
    for v in aot.compile_call(call, 90):
        if v.kernel == "stripe_fwd_kernel" and v.tensor_cores == "wgmma":
            assert 20 < v.loop_instructions < 1000, v.row()


def test_tile_grad_weight_compiles_with_and_without_atomics():
    """A single split stores each kept row once in the weight's dtype; several add atomically into fp32.
    Both compile for sm_90 on wgmma without spilling."""
    aot = _aot()
    seen = set()
    for batch in (1, 8):
        label, call = aot.layer_calls(128, 128, 16, density=0.3, dtype=torch.bfloat16, batch=batch)[2]
        launches = [launch for launch in aot.capture_launches(call, every_candidate=True)
                    if launch.name == "stripe_wgrad_tiles_kernel"]
        assert len(launches) == 1, label
        atomic = launches[0].kwargs["ATOMIC"]
        assert launches[0].args[2].dtype == (torch.float32 if atomic else torch.bfloat16)
        for v in aot.compile_launch(launches[0], 90):
            assert v.tensor_cores == "wgmma" and v.spill_bytes == 0, (label, v.row())
        seen.add(atomic)
    assert seen == {False, True}


def test_subtile_forward_is_offered_per_narrow_width_and_compiles_for_hopper():
    """Each width with several tiles per group gets a subtile candidate of up to 128 columns, from one
    filter group; its variants compile for sm_90 on wgmma without spilling (the skipped dots and the
    hand-made prefetch keep the accumulators in registers)."""
    aot = _aot()
    from stripeconv.backends import triton_backend as tb

    label, call = aot.layer_calls(128, 128, 16, density=0.2, dtype=torch.bfloat16, batch=8)[0]
    tb.clear_cache()
    launches = aot.capture_launches(call, every_candidate=True)
    subs = [launch for launch in launches if launch.name == "stripe_fwd_sub_kernel"]
    widths = {launch.kwargs["BLOCK_N"] for launch in launches if launch.name == "stripe_fwd_kernel"}
    assert len(widths) > 1 and {(launch.kwargs["BLOCK_N"], launch.kwargs["SUB"]) for launch in subs} == {
        (w, 128 // w) for w in widths}  # 128 filters: every width's tiles in one group of 128 columns
    for launch in subs:
        for v in aot.compile_launch(launch, 90):
            assert v.tensor_cores == "wgmma" and v.spill_bytes == 0, (label, v.row())


def test_subtile_groups_are_tiles_that_keep_alike_positions():
    """The subtile forward's groups hold each tile once, and reads the input once per group and position
    of its union: grouping tiles by the positions they keep reads it less often than runs of the plan's
    tiles (heaviest first), over random masks of 512 filters at densities 0.1-0.3."""
    from stripeconv.backends import triton_plans as tp

    grouped = runs = 0
    for seed, density in enumerate((0.1, 0.2, 0.3) * 2):
        mask = torch.rand(512, 3, 3, generator=torch.Generator().manual_seed(seed)) < density
        plan = tp.forward_plan(mask, 1, 16)
        sub = tp.subtile_count(plan, 1)
        groups = tp.subtile_plan(plan, mask, 1, "cpu")
        assert sub == 8 and groups.num_tiles == plan.num_tiles // sub and groups.computed == plan.computed
        assert sorted(groups.sup_ch[groups.sup_ch >= 0].tolist()) == list(range(512))
        keeps = [set(plan.tile_pos[t, :plan.tile_npos[t]].tolist()) for t in range(plan.num_tiles)]
        assert groups.x_reads == int(groups.sup_npos.sum())
        grouped += groups.x_reads
        runs += sum(len(set().union(*keeps[k:k + sub])) for k in range(0, plan.num_tiles, sub))
    assert grouped < runs


def test_split_k_forward_is_offered_for_few_pixels_and_compiles_for_hopper():
    """A batch-1 layer with a long reduction gets a split-K forward candidate (not in deterministic mode,
    not for a batch that fills the GPU); it compiles for sm_90 on the tensor cores with atomic adds."""
    aot = _aot()
    from stripeconv.backends import gpu_select
    from stripeconv.backends import triton_backend as tb

    label, call = aot.layer_calls(512, 512, 7, density=0.5, dtype=torch.bfloat16, batch=1)[0]
    tb.clear_cache()
    forwards = [launch for launch in aot.capture_launches(call, every_candidate=True) if launch.name == "stripe_fwd_kernel"]
    split = [launch for launch in forwards if launch.kwargs["SPLIT_K"] > 1]
    assert split, "no split-K candidate for 49 pixels, 512 channels"
    for launch in split:  # every width's: a configuration without spills to pick, all on the tensor cores
        variants = aot.compile_launch(launch, 90)
        assert any(v.spill_bytes == 0 for v in variants), [v.row() for v in variants]
        assert all(v.copies_in_flight >= 1 for v in variants), [v.row() for v in variants]
        assert all(v.tensor_cores == ("mma" if v.config["BLOCK_M"] < 64 else "wgmma") for v in variants)
    label, call = aot.layer_calls(128, 128, 16, density=0.5, dtype=torch.bfloat16, batch=64)[0]
    tb.clear_cache()
    assert all(launch.kwargs.get("SPLIT_K", 1) == 1 for launch in aot.capture_launches(call, every_candidate=True))
    deterministic, gpu_select.deterministic = gpu_select.deterministic, lambda: True
    try:
        tb.clear_cache()
        label, call = aot.layer_calls(512, 512, 7, density=0.5, dtype=torch.bfloat16, batch=1)[0]
        assert all(launch.kwargs.get("SPLIT_K", 1) == 1 for launch in aot.capture_launches(call, every_candidate=True))
    finally:
        gpu_select.deterministic = deterministic
        tb.clear_cache()


def test_tuners_zero_what_their_kernels_add_into():
    """A kernel that adds atomically into a buffer (split-K forward, grad weight) runs several times
    while its tuner times configurations: the tuner must zero the buffer before each run and before the
    launch whose result counts, or the first call of a shape returns a multiple of the answer."""
    import inspect

    _aot()
    kernels = _triton_runtime.check_kernels()
    adds_into = {"stripe_fwd_kernel": "out_ptr", "stripe_wgrad_kernel": "dw_ptr", "stripe_wgrad_tiles_kernel": "dw_ptr",
                 "stripe_wgrad_tiles_tma_kernel": "dw_ptr"}
    tuned = [name for name in dir(kernels) if name.endswith("_kernel") and hasattr(getattr(kernels, name), "configs")]
    for name in tuned:
        tuner = getattr(kernels, name)
        source = inspect.getsource(tuner.fn.fn)  # (_store_wgrad_tile adds atomically for the grad weights)
        atomic = "tl.atomic_add(" in source or "_store_wgrad_tile(" in source
        assert atomic == (name in adds_into), f"{name}: update this test's list of kernels that add atomically"
        if atomic:
            assert adds_into[name] in tuner.reset_to_zero, (name, tuner.reset_to_zero)


@pytest.mark.parametrize("stride, hw, c, offered", [
    ((1, 1), (7, 9), 24, True), ((2, 2), (8, 10), 32, True), ((2, 1), (8, 7), 24, True),
    ((2, 2), (7, 8), 32, False),   # odd height: no parity view
    ((1, 2), (8, 9), 32, False),   # odd width
    ((1, 2), (8, 8), 24, False),   # 24 channels in 32-wide blocks would reach into the other column parity's
    ((3, 3), (9, 9), 32, False),
])
def test_tma_forward_is_offered_for_strides_its_descriptor_can_view(stride, hw, c, offered, monkeypatch):
    if _triton_runtime.tensor_descriptor() is None:
        pytest.skip("this triton has no tensor descriptors")
    monkeypatch.setattr(_triton_runtime, "tma_capable", lambda device: True)
    mask = torch.rand(32, 3, 3, generator=torch.Generator().manual_seed(0)) < 0.5
    x = torch.empty(2, c, *hw).to(memory_format=torch.channels_last)
    weight = torch.empty(int(mask.sum()), c)
    assert _triton_forward.tma_offered(_plan(mask), x, weight, stride, 1, 2 * 32 * 4 * 4) is offered
    assert not _triton_forward.tma_offered(_plan(mask), x.contiguous(), weight, stride, 1, 2 * 32 * 4 * 4)  # NCHW


@pytest.mark.parametrize("stride, hw, groups, offered", [
    ((1, 1), (7, 9), 1, True), ((2, 2), (8, 10), 1, True),
    ((1, 2), (8, 8), 1, True),    # 48 channels in 64-wide blocks: the rows past them are not stored
    ((2, 2), (7, 8), 1, False),   # odd height: no parity view
    ((3, 3), (9, 9), 1, False), ((1, 1), (8, 8), 2, False),
])
def test_tma_grad_weight_is_offered_for_strides_its_descriptors_can_view(stride, hw, groups, offered, monkeypatch):
    if _triton_runtime.tensor_descriptor() is None:
        pytest.skip("this triton has no tensor descriptors")
    monkeypatch.setattr(_triton_runtime, "tma_capable", lambda device: True)
    mask = torch.rand(32, 3, 3, generator=torch.Generator().manual_seed(0)) < 0.5
    x = torch.empty(2, 48, *hw).to(memory_format=torch.channels_last)
    weight = torch.empty(int(mask.sum()), 48 // groups)
    conv = (stride, (1, 1, 1, 1), (1, 1))
    plan = _triton_backward_tiles.backward_tiles(mask, weight, 48, groups, *conv, torch.device("cpu"))
    assert plan is not None
    ho, wo = _triton_shapes.out_hw(*hw, 3, 3, stride, (1, 1, 1, 1), (1, 1))
    dy = torch.empty(2, 32, ho, wo).to(memory_format=torch.channels_last)
    assert _triton_backward_tiles.tma_wgrad_offered(plan, dy, x, weight, stride, groups) is offered
    # an NCHW x is copied
    assert _triton_backward_tiles.tma_wgrad_offered(plan, dy, x.contiguous(), weight, stride, groups) is offered
    assert not _triton_backward_tiles.tma_wgrad_offered(plan, dy.double(), x.double(), weight.double(), stride, groups)
