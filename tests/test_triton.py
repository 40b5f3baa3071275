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
import warnings
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

from stripeconv.backends import _triton_backward_tiles, _triton_runtime, _triton_shapes

# ------------------------------------------------------------------------------------------
# The cases
# ------------------------------------------------------------------------------------------

BASE = dict(B=2, C=16, N=32, H=7, W=7, k=(3, 3), stride=(1, 1), padding=(1, 1, 1, 1), dilation=(1, 1),
            groups=1, bias=True, density=0.5, dtype="float32", channels_last=False, block_n=16,
            empty_filters=0, via_op=False, via_module=False, via_compile=False, deterministic=False, gpu_only=False, mask_update=False,
            dense="never", double_backward=False, weight_transposed=False, int64=False, warm_call=False,
            mask_blocks=1, reordered=False, pick="", dy_in_place=False, timed_choice=False)


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
    # Few output pixels: tiles re-clustered so that the longest union of positions is shorter (more, partly
    # empty tiles; on CPU the budget is 2 * 4 "multiprocessors" over the 32-pixel blocks)
    _case("balanced_tiles", pick="_balanced", B=1, H=4, W=4, C=16, N=48, density=0.25, channels_last=True),
    _case("balanced_tiles_nchw_groups_s2", pick="_balanced", B=1, H=7, W=8, C=32, N=64, groups=2, density=0.3,
          stride=(2, 2), bias=False),
    _case("balanced_tiles_bf16_int64", pick="_balanced", dtype="bfloat16", int64=True, B=1, H=5, W=5, C=24, N=48,
          density=0.2, channels_last=True, empty_filters=6),
    # The subtile forward: groups of narrow tiles per program, each input tile loaded once for the group's
    # union and multiplied by the subtiles that keep its position (per-position bits, skipped dots).
    _case("subtiles_x4", pick="x4", N=64, density=0.3, H=6, W=6),
    _case("subtiles_x8_aligned_nhwc", pick="x8", N=128, mask_blocks=8, channels_last=True, density=0.3, H=5, W=5),
    _case("subtiles_x2_nchw_s2_uneven_k", pick="x2", N=64, block_n=32, C=24, bias=False, stride=(2, 2), H=8, W=9),
    _case("subtiles_groups", pick="x2", C=32, N=64, groups=2, density=0.4, channels_last=True, H=6, W=6),
    _case("subtiles_empty_filters_int64", pick="x4", N=64, empty_filters=20, int64=True, channels_last=True,
          H=6, W=6),
    _case("subtiles_fp16_dil2", pick="x4", dtype="float16", N=64, dilation=(2, 2), padding=(2, 2, 2, 2), H=7, W=6),
    # 8-wide subtiles (tensor-core dots 8 columns wide; STRIPECONV_TRITON_BLOCK_N=8 pins them)
    _case("subtiles_narrow8", pick="stripe8x", block_n=8, N=64, density=0.2, H=6, W=6),
    _case("subtiles_narrow8_reordered_nhwc", pick="stripe8x8_aligned", block_n=8, reordered=True, channels_last=True,
          N=64, density=0.2, H=5, W=5),
    _case("subtiles_narrow8_groups_uneven_k", pick="stripe8x", block_n=8, C=40, N=48, groups=2, bias=False,
          density=0.3, stride=(2, 2), H=7, W=8),
    _case("subtiles_narrow8_bf16_gpu", pick="stripe8x", block_n=8, dtype="bfloat16", gpu_only=True, C=64, N=128,
          density=0.2, channels_last=True, H=10, W=10),
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
    # gpu_select's timed choice on the real candidates (a stand-in timer, every candidate run here): one whose
    # result is wrong, although timed fastest, is rejected against the dense conv, and the others' results agree.
    _case("timed_choice_rejects_a_wrong_variant", timed_choice=True, channels_last=True, N=48, density=0.4, H=6,
          W=6, dense="never"),
    _case("planes", channels_last=True, pick="_planes", stride=(2, 2), H=8, W=9, N=48),
    _case("planes_int64_groups", channels_last=True, pick="_planes", int64=True, C=16, N=24, groups=2),
    # Tile order: the kernel stores each tile's columns as one run of a [pixels, tiles * BLOCK_N] buffer (padding
    # columns too), and a gather puts them in channel order (bias added by the kernel, by channel).
    _case("gathered", channels_last=True, pick="_gathered", stride=(2, 2), H=8, W=9, N=48),
    _case("gathered_int64_groups_no_bias", channels_last=True, pick="_gathered", int64=True, C=16, N=24, groups=2,
          bias=False),
    _case("gathered_bf16_empty_filters", channels_last=True, pick="_gathered", dtype="bfloat16", empty_filters=10,
          N=40, density=0.3),
    _case("gathered_settled", channels_last=True, pick="_gathered", warm_call=True, N=48, density=0.4),
    # Channel-major loop (the input through L1): every union entry of a channel block, then the next block.
    # More than 64 channels a group, so that there are several blocks (the loop order shows).
    _case("through_l1_nchw_s2_two_blocks", pick="_l1", B=1, C=80, N=32, stride=(2, 2), H=6, W=7),
    _case("through_l1_aligned_groups_int64", mask_blocks=8, channels_last=True, pick="_aligned_l1", B=1, C=160, N=32,
          groups=2, int64=True, H=5, W=5),
    _case("through_l1_gathered_bf16_dil_asym", channels_last=True, pick="_gathered_l1", dtype="bfloat16", B=1, C=136,
          N=40, dilation=(2, 1), padding=(2, 1, 0, 2), stride=(1, 2), density=0.3, empty_filters=6, H=7, W=8),
    _case("through_l1_density1_settled", pick="_l1", warm_call=True, density=1.0, B=1, C=128, N=16, H=5, W=5),
    # The tile-major weight: the packed rows gathered once into the plan's tile order (zeros for the filters of
    # a tile that do not keep a position), read a block of rows per (tile, position), kept per weight version.
    _case("tile_major_weights", channels_last=True, pick="_wtiles", N=48, density=0.4, stride=(2, 2), H=8, W=9),
    _case("tile_major_weights_gathered_groups", channels_last=True, pick="_gathered_wtiles", C=16, N=48, groups=2,
          density=0.3, bias=False),
    _case("tile_major_weights_nchw_int64_bf16", pick="_wtiles", int64=True, dtype="bfloat16", N=40, density=0.5,
          empty_filters=6),
    _case("tile_major_weights_settled", channels_last=True, pick="_wtiles", warm_call=True, N=48, density=0.4),
    _case("tile_major_weights_tma", pick="_tma_wtiles", channels_last=True, N=48, density=0.4, H=9, W=11),
    _case("tile_major_weights_tma_gathered_s2", pick="_tma_gathered_wtiles", dtype="bfloat16", channels_last=True,
          stride=(2, 2), H=8, W=10, C=32, N=96, block_n=64, density=0.4, empty_filters=12),
    # ... and the tile grad input reading it (the forward's tile-major weight: gathered dy, dy in place)
    _case("tile_major_weights_grad_input", channels_last=True, pick="dgrad_wtiles", N=64, density=0.3,
          stride=(2, 2), H=8, W=9),
    _case("tile_major_weights_grad_input_runs_groups", channels_last=True, pick="dgrad_runs_wtiles", C=32, N=64,
          groups=2, density=0.4, bias=False, dy_in_place=True),
    _case("tile_major_weights_grad_input_nchw_int64", pick="dgrad_wtiles", int64=True, N=64, density=0.3),
    # ... and the tile grad input through L1 (one-stage configurations; the kernel's loop is the same)
    _case("tiles_grad_input_l1_s2", channels_last=True, pick="dgrad_l1", N=48, density=0.4, stride=(2, 2), H=8, W=9),
    _case("tiles_grad_input_runs_l1_groups_int64", channels_last=True, pick="dgrad_runs_l1", C=32, N=64, groups=2,
          density=0.4, int64=True, bias=False, dy_in_place=True),
    _case("tiles_grad_input_l1_nchw_bf16_dil", pick="dgrad_l1", dtype="bfloat16", dilation=(2, 1),
          padding=(2, 2, 1, 1), N=40, density=0.5, empty_filters=6),
    _case("subtiles_x4_gathered", pick="x4_gathered", N=64, density=0.3, channels_last=True, H=6, W=6),
    _case("subtiles_narrow8_gathered_groups", pick="stripe8x4_gathered", block_n=8, C=32, N=64, groups=2,
          density=0.3, channels_last=True, H=5, W=6),
    _case("tma_gathered", pick="_tma_gathered", channels_last=True, H=9, W=11),
    _case("tma_gathered_s2_w64_empty_filters", pick="_tma_gathered", dtype="bfloat16", channels_last=True,
          stride=(2, 2), H=8, W=10, C=32, N=96, block_n=64, density=0.4, empty_filters=12),
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
    # Grad weight over runs of up to 3 union entries of a tile a program (dy loaded once for them; a run
    # shorter than 3 multiplies zeros for the rest and stores only its own rows)
    _case("wgrad_pos3", pick="wgrad_pos3", channels_last=True, N=48, density=0.4),
    _case("wgrad_pos3_nchw_s2_asym_dil", pick="wgrad_pos3", stride=(2, 2), padding=(1, 0, 2, 1), dilation=(2, 1),
          H=9, W=8, C=16, N=20),
    _case("wgrad_pos3_groups_int64_k5", pick="wgrad_pos3", int64=True, C=32, N=32, groups=2, k=(5, 5),
          padding=(2, 2, 2, 2), density=0.3, channels_last=True, bias=False, dy_in_place=True),
    _case("wgrad_pos3_splitk", pick="wgrad_pos3", H=20, W=20, C=16, N=16, density=0.6, channels_last=True,
          dy_in_place=True),
    _case("wgrad_pos3_runs_in_place", pick="tiles_runs_pos3", channels_last=True, N=48, density=0.4,
          dy_in_place=True),
    _case("wgrad_pos3_bf16_empty_filters", pick="wgrad_pos3", dtype="bfloat16", empty_filters=12, N=48,
          density=0.5, channels_last=True),
    # The same over the forward's widest tiles where they compute as much (128 filters: 64- and 128-wide tiles,
    # the backward's narrower; block_n 0 leaves the widths to the backend)
    _case("wgrad_wide_pos3", pick="wgrad_wide_pos3", block_n=0, density=1.0, N=128, H=5, W=5, channels_last=True,
          dy_in_place=True),
    _case("wgrad_wide_pos3_s2_asym_bf16", pick="wgrad_wide_pos3", block_n=0, density=0.9, N=128, H=8, W=7,
          stride=(2, 2), padding=(1, 0, 2, 1), dtype="bfloat16", bias=False, channels_last=True, dy_in_place=True),
    # By position: one kernel position per entry and the tiles whose unions hold it side by side (grad weight
    # loads x's tile once for them, grad input takes one product over them; padding columns of a partial
    # entry multiply and are not stored). Grad input's entries per output phase (strides 2 and 3).
    _case("wgrad_bypos", pick="wgrad_bypos", channels_last=True, N=64, density=0.5),
    _case("wgrad_bypos_splitk", pick="wgrad_bypos", H=20, W=20, N=64, density=0.6, channels_last=True),
    _case("dgrad_bypos_w32", pick="dgrad_bypos", N=64, density=0.3, channels_last=True),
    _case("dgrad_bypos_s3_nopad", pick="dgrad_bypos", stride=(3, 3), padding=(0, 0, 0, 0), H=10, W=8, N=64,
          density=0.6),
    _case("bypos_nchw_s2_asym_dil", pick="bypos", stride=(2, 2), padding=(1, 0, 2, 1), dilation=(2, 1), H=9, W=8,
          N=64, density=0.6),
    _case("bypos_groups_int64_k5", pick="bypos", int64=True, C=32, N=128, groups=2, k=(5, 5), padding=(2, 2, 2, 2),
          density=0.5, channels_last=True, bias=False, H=6, W=6, dy_in_place=True),
    _case("bypos_w32", pick="bypos", N=64, density=0.3, channels_last=True, stride=(2, 2), H=8, W=8),
    _case("bypos_tiles32_w128", pick="bypos", block_n=32, N=128, density=0.4, channels_last=True, H=5, W=6),
    _case("bypos_reordered_in_place", pick="bypos", reordered=True, channels_last=True, N=64, density=0.5,
          dy_in_place=True),
    _case("bypos_runs_in_place", pick="tiles_runs_bypos", channels_last=True, N=64, density=0.5, dy_in_place=True),
    _case("bypos_bf16_empty_filters", pick="bypos", dtype="bfloat16", empty_filters=12, N=64, density=0.6,
          channels_last=True),
    # The tile grad input with TMA boxes of dy (one group; offered for tiles of 64 filters or more over 33 channels
    # or more): each program a TH x TW rectangle of one image's input pixels of one output phase; the boxes
    # zero-fill dy's borders and the columns past its last channel.
    # Tiles of consecutive filters beside a clustered mask's tiles: dy read in place where channels_last
    _case("tiles_runs", pick="tiles_runs", channels_last=True, N=48, density=0.4, dy_in_place=True),
    _case("tiles_runs_s2_groups", pick="tiles_runs", channels_last=True, stride=(2, 2), H=8, W=9, C=32, N=64,
          groups=2, density=0.3, bias=False, dy_in_place=True),
    _case("tiles_runs_nchw_bf16", pick="tiles_runs", dtype="bfloat16", N=32, density=0.5),  # NCHW dy: gathered
    _case("tiles_runs_tma", pick="tiles_runs_tma", channels_last=True, C=48, N=128, block_n=64, density=0.4, H=9,
          W=11, dy_in_place=True),
    _case("tiles_tma", pick="tiles_tma", channels_last=True, C=48, N=96, block_n=64, density=0.4, H=9, W=11),
    _case("tiles_tma_in_place", pick="tiles_tma", reordered=True, channels_last=True, C=40, N=128, block_n=64,
          density=0.3, H=6, W=7, dy_in_place=True),
    _case("tiles_tma_nchw_dil2_asym_c80", pick="tiles_tma", dilation=(2, 2), padding=(2, 1, 0, 3), H=8, W=7, C=80,
          N=64, block_n=64),
    _case("tiles_tma_row_runs_uneven_k", pick="tiles_tma", density=1.0, channels_last=True, C=40, N=64, block_n=64,
          k=(3, 5), padding=(1, 1, 2, 2), H=5, W=6, dy_in_place=True),
    # one output pixel: channels_last dy and x of [B, C, 1, 1] keep NCHW strides, 2 bytes, which a descriptor refuses
    _case("tiles_tma_one_pixel", pick="tiles_tma", reordered=True, channels_last=True, C=64, N=64, block_n=64, B=1,
          H=3, W=1, k=(3, 1), padding=(0, 0, 0, 0), density=0.5, dy_in_place=True),
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
    # Strides above 1: phases of unequal sizes (odd planes), a phase without entries (1x1 kernel at stride 2: its
    # pixels get zeros), stride 3 with dilation.
    _case("tiles_tma_s2", pick="dgrad_tma", channels_last=True, stride=(2, 2), C=48, N=96, block_n=64, density=0.4,
          H=9, W=11),
    _case("tiles_tma_s2x1_reordered_bf16", pick="dgrad_tma", dtype="bfloat16", reordered=True, channels_last=True,
          stride=(2, 1), C=40, N=128, block_n=64, density=0.3, H=7, W=6, dy_in_place=True),
    _case("tiles_tma_s3_dil2_asym_nchw", pick="dgrad_tma", stride=(3, 3), dilation=(2, 2), padding=(2, 1, 0, 3),
          H=10, W=8, C=80, N=64, block_n=64),
    _case("tiles_tma_s2_k1_empty_phases", pick="dgrad_tma", density=1.0, channels_last=True, stride=(2, 2), k=(1, 1),
          padding=(0, 0, 0, 0), C=48, N=64, block_n=64, H=7, W=7, dy_in_place=True),
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
    _case("dense_handover_density0", dense="always", density=0.0, channels_last=True),  # nothing to scatter
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
         "wgrad_tma": {"dgrad": "tiles", "wgrad": "tiles_tma"}, "dgrad_tma": {"dgrad": "tiles_tma", "wgrad": "tiles"},
         "tiles_runs": {"dgrad": "tiles_runs", "wgrad": "tiles_runs"},
         "tiles_runs_tma": {"dgrad": "tiles_runs_tma", "wgrad": "tiles_runs_tma"},
         "wgrad_pos3": {"dgrad": "tiles", "wgrad": "tiles_pos3"},
         "wgrad_wide_pos3": {"dgrad": "tiles", "wgrad": "tiles_wide_pos3"},
         "tiles_runs_pos3": {"dgrad": "tiles_runs", "wgrad": "tiles_runs_pos3"},
         "wgrad_bypos": {"dgrad": "tiles", "wgrad": "tiles_bypos"},
         "dgrad_bypos": {"dgrad": "tiles_bypos", "wgrad": "tiles"},
         "bypos": {"dgrad": "tiles_bypos", "wgrad": "tiles_bypos"},
         "tiles_runs_bypos": {"dgrad": "tiles_runs_bypos", "wgrad": "tiles_runs_bypos"},
         "dgrad_wtiles": {"dgrad": "tiles_wtiles", "wgrad": "tiles"},
         "dgrad_runs_wtiles": {"dgrad": "tiles_runs_wtiles", "wgrad": "tiles_runs"},
         "dgrad_l1": {"dgrad": "tiles_l1", "wgrad": "tiles"},
         "dgrad_runs_l1": {"dgrad": "tiles_runs_l1", "wgrad": "tiles_runs"}}


@contextlib.contextmanager
def _candidate_picked(tb, parts: dict):
    """The ops in ``parts`` (of fwd, dgrad, wgrad) run their first candidate whose name contains the op's part
    (there must be one)."""
    choice = tb.gpu_select.choice

    def pick(key, candidates, device, captured=None):
        part = parts.get(key[0])
        if part is None:
            return choice(key, candidates, device, captured)
        names = [name for name in candidates if part in name]
        assert names, f"no {key[0]} candidate named *{part}*: {sorted(candidates)}"
        return ("stripe_" + part if "stripe_" + part in names else names[0]), True
    tb.gpu_select.choice = pick
    try:
        yield
    finally:
        tb.gpu_select.choice = choice


@contextlib.contextmanager
def _wrong_planes_timed_fastest(tb):
    """gpu_select times candidates on CPU too, with a timer that runs each once and makes the forward's
    ``_planes`` variants fastest; those variants return their result with one channel zeroed."""
    select, stripe_launcher = tb.gpu_select, tb.stripe_launcher

    def wrong_planes(*args, via_planes=False, **kwargs):
        launch = stripe_launcher(*args, via_planes=via_planes, **kwargs)
        if not via_planes:
            return launch

        def wrong(*call_args):
            out = launch(*call_args).clone()
            out[:, 0] = 0
            return out
        wrong.planes = True
        return wrong

    def timer(fn, repeats=5):
        fn()
        return 0.5 if getattr(fn.func, "planes", False) else 1.0
    saved = select._TIMED_DEVICES, select._time_ms
    select._TIMED_DEVICES, select._time_ms, tb.stripe_launcher = ("cuda", "cpu"), timer, wrong_planes
    select.clear()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # the rejection's
            yield
    finally:
        (select._TIMED_DEVICES, select._time_ms), tb.stripe_launcher = saved, stripe_launcher
        select.clear()


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
    if c["block_n"]:
        os.environ["STRIPECONV_TRITON_BLOCK_N"] = str(c["block_n"])
    else:  # the backend's own widths (several, e.g. 64 and 128 for 128 filters)
        os.environ.pop("STRIPECONV_TRITON_BLOCK_N", None)
    os.environ["STRIPECONV_GPU_DENSE"] = c["dense"]
    os.environ["STRIPECONV_DETERMINISTIC"] = "1" if c["deterministic"] else "0"
    needs_int64 = _triton_shapes.needs_int64
    if c["int64"]:
        _triton_shapes.needs_int64 = lambda *tensors: True
    stack = contextlib.ExitStack()
    if c["pick"]:
        stack.enter_context(_candidate_picked(tb, PICKS.get(c["pick"], {"fwd": c["pick"]})))
    tuner_runs = stack.enter_context(_tuner_runs(tb)) if c["warm_call"] or c["deterministic"] else []
    if c["timed_choice"]:
        stack.enter_context(_wrong_planes_timed_fastest(tb))
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
        if c["timed_choice"]:
            decisions = {d["key"][0]: d for d in tb.gpu_select.decisions()}
            if set(decisions) != {"fwd", "dgrad", "wgrad"}:
                errors.append(f"timed decisions for {sorted(decisions)}, expected fwd, dgrad and wgrad")
            elif not any(name.endswith("_planes") for name in decisions["fwd"]["rejected"]) \
                    or decisions["fwd"]["choice"].endswith("_planes"):
                errors.append(f"the wrong _planes forward was not rejected: {decisions['fwd']}")
            elif any(d["rejected"] for op, d in decisions.items() if op != "fwd"):
                errors.append(f"right gradient candidates rejected: {decisions}")
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
    if "tma" in CASES[name]["pick"]:
        if not _triton_runtime.tma_capable(torch.device("cuda")) or _triton_runtime.tensor_descriptor() is None:
            pytest.skip("the TMA kernels need compute capability 9.0 and a triton with tensor descriptors")
    msg = run_case(name, "cuda")
    assert not msg, msg
