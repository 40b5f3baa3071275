"""Kernel-level checks of the compiled CPU ops (torch.ops.stripeconv_cpu.*).

Every op is compared with F.conv2d (and its autograd) on the masked dense weight. The cases
cover both code paths of the acc engine in csrc/cpu/stripe_conv_cpu.cpp:
  * flat path: output row pitch == input row pitch (stride 1 with "same" padding, or a
    strided conv whose output width equals the phase-plane width ceil(W / stride_w));
  * row path: everything else (e.g. padding 0, asymmetric padding, odd strides).
`path` in each case says which one it takes; `_path` recomputes it from the geometry.
Both micro-kernel families run: the AVX-512 one (when the CPU has it) and the portable one
(STRIPECONV_CPU_ISA=generic).
"""
from __future__ import annotations

import contextlib
import math
import random

import pytest
import torch
import torch.nn.functional as F

try:
    import stripeconv._C  # noqa: F401

    HAVE_C = True
except ImportError as exc:  # pragma: no cover - depends on the build
    HAVE_C = False
    REASON = f"stripeconv._C is not built ({exc}); run `pip install --no-build-isolation -e .`"

if not HAVE_C:  # pragma: no cover
    pytest.skip(REASON, allow_module_level=True)

from stripeconv.packing import pack_weight, unpack_weight  # noqa: E402

ops = torch.ops.stripeconv_cpu


def _out_size(h, w, k, s, p, d):
    ho = (h + p[0] + p[1] - d[0] * (k[0] - 1) - 1) // s[0] + 1
    wo = (w + p[2] + p[3] - d[1] * (k[1] - 1) - 1) // s[1] + 1
    return max(ho, 0), max(wo, 0)


def _path(h, w, k, s, p, d):
    _, wo = _out_size(h, w, k, s, p, d)
    return "flat" if wo == math.ceil(w / s[1]) else "row"


def _make(case, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    b, c, n, h, w = case["b"], case["c"], case["n"], case["h"], case["w"]
    kh, kw = case["k"]
    groups = case.get("groups", 1)
    x = torch.randn(b, c, h, w, generator=g, dtype=dtype)
    wd = torch.randn(n, c // groups, kh, kw, generator=g, dtype=dtype)
    mask = torch.rand(n, kh, kw, generator=g) < case.get("density", 0.5)
    if case.get("dead_filters"):
        mask[::3] = False  # filters with no stripe
    bias = torch.randn(n, generator=g, dtype=dtype) if case.get("bias", True) else None
    return x, pack_weight(wd, mask).contiguous(), mask, bias


def _dense(x, packed, mask, bias, s, p, d, groups):
    wm = unpack_weight(packed, mask)
    ho, wo = _out_size(x.shape[2], x.shape[3], mask.shape[1:], s, p, d)
    if ho == 0 or wo == 0:  # F.conv2d refuses empty outputs; the gradient is then zero
        return (x.sum() * 0 + wm.sum() * 0).expand(x.shape[0], mask.shape[0], ho, wo)
    xp = F.pad(x, (p[2], p[3], p[0], p[1]))
    return F.conv2d(xp, wm, bias, s, 0, d, groups)


CASES = [
    dict(id="s1_same_flat", b=2, c=8, n=16, h=10, w=10, k=(3, 3), s=(1, 1), p=(1, 1, 1, 1), d=(1, 1), path="flat"),
    dict(id="s1_multichunk_tail", b=2, c=7, n=13, h=13, w=11, k=(3, 3), s=(1, 1), p=(1, 1, 1, 1), d=(1, 1),
         path="flat"),
    dict(id="s1_8x8_flat", b=3, c=16, n=16, h=8, w=8, k=(3, 3), s=(1, 1), p=(1, 1, 1, 1), d=(1, 1), path="flat"),
    dict(id="s1_valid_row", b=2, c=8, n=16, h=10, w=13, k=(3, 3), s=(1, 1), p=(0, 0, 0, 0), d=(1, 1), path="row"),
    dict(id="s1_wide_row", b=1, c=5, n=7, h=3, w=150, k=(3, 3), s=(1, 1), p=(0, 0, 0, 0), d=(1, 1), path="row"),
    dict(id="s1_asym_pad", b=2, c=6, n=10, h=9, w=11, k=(3, 3), s=(1, 1), p=(0, 2, 2, 1), d=(1, 1), path="row"),
    dict(id="s1_asym_pad_flat", b=2, c=6, n=10, h=9, w=11, k=(3, 3), s=(1, 1), p=(2, 0, 2, 0), d=(1, 1),
         path="flat"),
    dict(id="s2_flat", b=2, c=8, n=16, h=12, w=12, k=(3, 3), s=(2, 2), p=(1, 1, 1, 1), d=(1, 1), path="flat"),
    dict(id="s2_odd", b=2, c=8, n=16, h=11, w=9, k=(3, 3), s=(2, 2), p=(1, 1, 1, 1), d=(1, 1), path="flat"),
    dict(id="s2_valid_row", b=2, c=5, n=6, h=11, w=11, k=(3, 3), s=(2, 2), p=(0, 0, 0, 0), d=(1, 1), path="row"),
    # 16 and more channels and phase rows: the 16x16 block transposes of channels_last phase planes
    dict(id="s2_wide_channels", b=2, c=32, n=24, h=34, w=34, k=(3, 3), s=(2, 2), p=(1, 1, 1, 1), d=(1, 1),
         path="flat"),
    dict(id="s1x2_wide_channels", b=1, c=16, n=32, h=6, w=35, k=(3, 3), s=(1, 2), p=(1, 1, 1, 1), d=(1, 1),
         path="flat"),
    dict(id="s3_asym", b=2, c=8, n=16, h=11, w=9, k=(3, 3), s=(3, 3), p=(1, 2, 0, 1), d=(1, 1), path="flat"),
    dict(id="s3_row", b=2, c=8, n=16, h=10, w=10, k=(3, 3), s=(3, 3), p=(0, 1, 0, 0), d=(1, 1), path="row"),
    dict(id="s1x2", b=2, c=8, n=16, h=11, w=9, k=(3, 3), s=(1, 2), p=(1, 1, 1, 1), d=(1, 1), path="flat"),
    dict(id="dil2", b=2, c=8, n=16, h=11, w=9, k=(3, 3), s=(1, 1), p=(2, 2, 2, 2), d=(2, 2), path="flat"),
    dict(id="dil2_s2", b=1, c=4, n=8, h=13, w=12, k=(3, 3), s=(2, 2), p=(1, 0, 2, 1), d=(2, 2), path="flat"),
    dict(id="dil2_s2_row", b=1, c=4, n=8, h=13, w=12, k=(3, 3), s=(2, 2), p=(1, 0, 0, 1), d=(2, 2), path="row"),
    dict(id="groups4", b=2, c=8, n=16, h=11, w=9, k=(3, 3), s=(1, 1), p=(1, 1, 1, 1), d=(1, 1), groups=4,
         path="flat"),
    dict(id="depthwise", b=2, c=8, n=8, h=11, w=9, k=(3, 3), s=(1, 1), p=(1, 1, 1, 1), d=(1, 1), groups=8,
         density=0.7, path="flat"),
    dict(id="depthwise_mult2_s2", b=2, c=6, n=12, h=10, w=9, k=(3, 3), s=(2, 2), p=(1, 1, 1, 1), d=(1, 1),
         groups=6, density=0.7, path="flat"),
    dict(id="kernel_5x3", b=2, c=5, n=9, h=9, w=10, k=(5, 3), s=(1, 1), p=(2, 2, 1, 1), d=(1, 1), path="flat"),
    dict(id="pointwise", b=2, c=9, n=11, h=5, w=7, k=(1, 1), s=(1, 1), p=(0, 0, 0, 0), d=(1, 1), density=1.0,
         path="flat"),
    dict(id="pointwise_s2_downsample", b=2, c=8, n=12, h=9, w=10, k=(1, 1), s=(2, 2), p=(0, 0, 0, 0), d=(1, 1),
         density=1.0, path="flat"),
    dict(id="pointwise_s3_empty_phases", b=2, c=4, n=6, h=7, w=8, k=(1, 1), s=(3, 3), p=(0, 0, 0, 0), d=(1, 1),
         density=1.0, path="flat"),
    dict(id="image_smaller_than_kernel", b=1, c=4, n=4, h=2, w=2, k=(3, 5), s=(1, 1), p=(1, 1, 2, 2), d=(1, 1),
         density=0.9, path="flat"),
    dict(id="image_smaller_asym", b=1, c=4, n=4, h=2, w=2, k=(3, 5), s=(1, 1), p=(0, 3, 1, 4), d=(1, 1),
         density=0.9, path="row"),
    dict(id="one_row_wide", b=3, c=5, n=7, h=1, w=70, k=(3, 3), s=(1, 1), p=(1, 1, 1, 1), d=(1, 1), path="flat"),
    dict(id="batch1_channel_splits", b=1, c=16, n=64, h=6, w=6, k=(3, 3), s=(1, 1), p=(1, 1, 1, 1), d=(1, 1),
         path="flat"),
    dict(id="dead_filters", b=2, c=8, n=12, h=7, w=7, k=(3, 3), s=(1, 1), p=(1, 1, 1, 1), d=(1, 1),
         dead_filters=True, path="flat"),
    dict(id="no_bias", b=2, c=8, n=12, h=7, w=7, k=(3, 3), s=(1, 1), p=(1, 1, 1, 1), d=(1, 1), bias=False,
         path="flat"),
    dict(id="zero_stripes", b=2, c=5, n=7, h=9, w=7, k=(3, 3), s=(1, 1), p=(1, 1, 1, 1), d=(1, 1), density=0.0,
         path="flat"),
    dict(id="full_density", b=2, c=5, n=7, h=9, w=7, k=(3, 3), s=(1, 1), p=(1, 1, 1, 1), d=(1, 1), density=1.0,
         path="flat"),
    # 4 KB planes (fp32; 8 KB fp64) and enough work per channel: NCHW images are staged in padded
    # buffers, see nchw_planes_alias
    dict(id="s1_32x32_aliasing_planes", b=2, c=16, n=24, h=32, w=32, k=(3, 3), s=(1, 1), p=(1, 1, 1, 1),
         d=(1, 1), density=0.7, path="flat"),
    dict(id="empty_batch", b=0, c=5, n=7, h=9, w=7, k=(3, 3), s=(1, 1), p=(1, 1, 1, 1), d=(1, 1), path="flat"),
]

TOL = {torch.float32: dict(atol=2e-4, rtol=1e-4), torch.float64: dict(atol=1e-10, rtol=1e-10)}


@pytest.fixture(autouse=True)
def _stripe_kernels_only(monkeypatch):
    # Near density 1 the forward may hand over to the dense conv (see kDenseDensity in
    # csrc/cpu/stripe_conv_cpu.cpp); the kernel tests pin the stripe kernels.
    monkeypatch.setenv("STRIPECONV_CPU_DENSE", "never")


@pytest.fixture(params=["simd", "generic"])
def isa(request, monkeypatch):
    if request.param == "generic":
        monkeypatch.setenv("STRIPECONV_CPU_ISA", "generic")
    else:
        monkeypatch.delenv("STRIPECONV_CPU_ISA", raising=False)
    return request.param


def _check_case(case, dtype):
    s, p, d, groups = case["s"], case["p"], case["d"], case.get("groups", 1)
    assert _path(case["h"], case["w"], case["k"], s, p, d) == case["path"]
    x, w, mask, bias = _make(case, dtype)
    # forward
    ref = _dense(x, w, mask, bias, s, p, d, groups)
    y = ops.forward(x, w, bias, mask, list(s), list(p), list(d), groups)
    assert y.shape == ref.shape and y.dtype == dtype
    torch.testing.assert_close(y, ref, **TOL[dtype])
    # backward through autograd on the dense conv
    xr = x.clone().requires_grad_()
    wr = w.clone().requires_grad_()
    out = _dense(xr, wr, mask, None, s, p, d, groups)
    gy = torch.randn(out.shape, dtype=dtype, generator=torch.Generator().manual_seed(1))
    out.backward(gy)
    gx = ops.grad_input(gy, w, mask, list(x.shape), list(s), list(p), list(d), groups)
    gw = ops.grad_weight(gy, x, w, mask, list(s), list(p), list(d), groups)
    assert gx.shape == x.shape and gw.shape == w.shape
    torch.testing.assert_close(gx, xr.grad, **TOL[dtype])
    torch.testing.assert_close(gw, wr.grad, **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("case", CASES, ids=[c["id"] for c in CASES])
def test_ops_match_dense(case, dtype, isa):
    _check_case(case, dtype)


@contextlib.contextmanager
def num_threads(n: int):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield n
    finally:
        torch.set_num_threads(before)


@pytest.fixture(params=[1, 2, 3], ids=["1thread", "2threads", "3threads"])
def threads(request):
    with num_threads(request.param) as n:
        yield n


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("case", CASES, ids=[c["id"] for c in CASES])
def test_channels_last_matches_nchw_exactly(case, dtype, threads, isa):
    """channels_last tensors take their own route through the engine: image by image on copies
    transposed in cache where the planes are stride-1 flat ones and every thread gets whole
    images (one thread; batch 2 on two threads; batch 3 on three), whole-tensor transposes
    otherwise (fewer images than threads, strided or row-path geometries). Each output element is summed in the same
    order either way, so the results equal the NCHW ones bit for bit (and the oracle). Grad weight
    reads a channels_last grad_output in place: the same sums, also bit for bit."""
    s, p, d, groups = list(case["s"]), list(case["p"]), list(case["d"]), case.get("groups", 1)
    x, w, mask, bias = _make(case, dtype)
    xcl = x.contiguous(memory_format=torch.channels_last)
    y = ops.forward(x, w, bias, mask, s, p, d, groups)
    ycl = ops.forward(xcl, w, bias, mask, s, p, d, groups)
    assert ycl.is_contiguous(memory_format=torch.channels_last) or ycl.numel() == 0
    assert torch.equal(ycl, y)
    torch.testing.assert_close(ycl, _dense(x, w, mask, bias, s, p, d, groups), **TOL[dtype])
    gy = torch.randn(y.shape, dtype=dtype, generator=torch.Generator().manual_seed(1))
    gycl = gy.contiguous(memory_format=torch.channels_last)
    gx = ops.grad_input(gy, w, mask, list(x.shape), s, p, d, groups)
    gxcl = ops.grad_input(gycl, w, mask, list(x.shape), s, p, d, groups)
    assert gxcl.is_contiguous(memory_format=torch.channels_last) or gxcl.numel() == 0
    assert torch.equal(gxcl, gx)
    xr = x.clone().requires_grad_()
    wr = w.clone().requires_grad_()
    _dense(xr, wr, mask, None, s, p, d, groups).backward(gy)
    torch.testing.assert_close(gxcl, xr.grad, **TOL[dtype])
    # grad weight reads a channels_last gy in place (pixel stride), x in either layout
    gw = ops.grad_weight(gy, x, w, mask, s, p, d, groups)
    for gy_, x_ in ((gycl, xcl), (gycl, x), (gy, xcl)):
        assert torch.equal(ops.grad_weight(gy_, x_, w, mask, s, p, d, groups), gw)
    torch.testing.assert_close(gw, wr.grad, **TOL[dtype])


SMALL_PLANES = [
    dict(id="2x2", c=16, n=24, h=2, w=2, k=(3, 3), p=(1, 1, 1, 1), d=(1, 1)),
    dict(id="4x4_bias", c=12, n=20, h=4, w=4, k=(3, 3), p=(1, 1, 1, 1), d=(1, 1), bias=True),
    dict(id="7x7", c=8, n=14, h=7, w=7, k=(3, 3), p=(1, 1, 1, 1), d=(1, 1)),
    dict(id="5x3_kernel", c=6, n=9, h=5, w=6, k=(5, 3), p=(2, 2, 1, 1), d=(1, 1)),
    dict(id="shifted_rows", c=6, n=9, h=5, w=6, k=(3, 3), p=(2, 0, 1, 1), d=(1, 1)),
    dict(id="dilation2", c=6, n=10, h=6, w=6, k=(3, 3), p=(2, 2, 2, 2), d=(2, 2)),
    dict(id="pointwise", c=10, n=12, h=3, w=3, k=(1, 1), p=(0, 0, 0, 0), d=(1, 1), density=1.0),
    dict(id="groups2", c=8, n=12, h=4, w=4, k=(3, 3), p=(1, 1, 1, 1), d=(1, 1), groups=2),
    dict(id="depthwise", c=8, n=8, h=3, w=3, k=(3, 3), p=(1, 1, 1, 1), d=(1, 1), groups=8, density=0.7),
    dict(id="shorter_output", c=6, n=8, h=5, w=5, k=(3, 3), p=(0, 1, 1, 1), d=(1, 1)),  # Ho < H: no stacks
]


@pytest.mark.parametrize("batch", [64, 12, 7])
@pytest.mark.parametrize("case", SMALL_PLANES, ids=[c["id"] for c in SMALL_PLANES])
def test_small_planes_side_by_side(case, batch, threads, isa):
    """Small planes run several images side by side in one flat plane (2x2: 32 of them per
    128-pixel chunk), in a number that divides the batch (7: none). A shift must never read a
    neighbouring image: forward and grad input match the oracle, NCHW and channels_last alike,
    and equal each other bit for bit."""
    case = dict(case, b=batch, s=(1, 1), bias=case.get("bias", False))
    s, p, d, groups = list(case["s"]), list(case["p"]), list(case["d"]), case.get("groups", 1)
    x, w, mask, bias = _make(case, torch.float32)
    ref = _dense(x, w, mask, bias, s, p, d, groups)
    gy = torch.randn(ref.shape, generator=torch.Generator().manual_seed(1))
    xr = x.clone().requires_grad_()
    _dense(xr, w, mask, None, s, p, d, groups).backward(gy)
    outs = []
    for fmt in (torch.contiguous_format, torch.channels_last):
        y = ops.forward(x.contiguous(memory_format=fmt), w, bias, mask, s, p, d, groups)
        gx = ops.grad_input(gy.contiguous(memory_format=fmt), w, mask, list(x.shape), s, p, d, groups)
        torch.testing.assert_close(y, ref, **TOL[torch.float32])
        torch.testing.assert_close(gx, xr.grad, **TOL[torch.float32])
        outs.append((y, gx))
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])


# Fewer channels_last images than threads, planes of several 128-pixel chunks: each image is cut
# into bands of chunks, one per task, each staged with the pixels its shifts reach on either side.
BANDS = [
    dict(id="32x32", b=1, c=16, n=24, h=32, w=32, k=(3, 3), p=(1, 1, 1, 1), d=(1, 1)),
    dict(id="5x3_kernel", b=1, c=6, n=9, h=20, w=17, k=(5, 3), p=(2, 2, 1, 1), d=(1, 1), density=0.3),
    dict(id="dilation2", b=1, c=6, n=10, h=24, w=24, k=(3, 3), p=(2, 2, 2, 2), d=(2, 2)),
    dict(id="shifted_rows", b=1, c=8, n=8, h=18, w=18, k=(3, 3), p=(2, 0, 1, 1), d=(1, 1)),
    dict(id="shorter_output", b=1, c=8, n=8, h=18, w=18, k=(3, 3), p=(0, 1, 1, 1), d=(1, 1)),
    dict(id="groups2_batch2", b=2, c=8, n=12, h=24, w=24, k=(3, 3), p=(1, 1, 1, 1), d=(1, 1), groups=2),
    dict(id="depthwise", b=1, c=8, n=8, h=16, w=12, k=(3, 3), p=(1, 1, 1, 1), d=(1, 1), groups=8, density=0.7),
    dict(id="weights_over_l2", b=1, c=160, n=160, h=12, w=12, k=(3, 3), p=(1, 1, 1, 1), d=(1, 1)),
    dict(id="zero_stripes", b=1, c=8, n=12, h=16, w=16, k=(3, 3), p=(1, 1, 1, 1), d=(1, 1), density=0.0),
    # one chunk per plane: the output channels are split instead (30 -> 15 + 15: partial transpose tiles)
    dict(id="8x8_split", b=1, c=32, n=64, h=8, w=8, k=(3, 3), p=(1, 1, 1, 1), d=(1, 1)),
    dict(id="5x6_uneven_split", b=1, c=30, n=30, h=5, w=6, k=(3, 3), p=(1, 1, 1, 1), d=(1, 1), density=0.7),
    # output plane taller than the input (2 chunks against 1): a band of two chunks in each split
    dict(id="taller_output_split", b=1, c=8, n=24, h=16, w=8, k=(3, 3), p=(3, 3, 1, 1), d=(1, 1)),
]


@pytest.mark.parametrize("case", BANDS, ids=[c["id"] for c in BANDS])
def test_channels_last_bands(case, threads, isa):
    """Where the threads outnumber the images, the images run in bands of chunks, and where that
    leaves threads idle, in splits of the output channels too (two threads: every case but
    groups2_batch2, which gets whole images; three: all but depthwise, zero_stripes,
    5x6_uneven_split and taller_output_split, with too few chunks and filters): forward and grad input match the oracle and equal the NCHW results bit for bit,
    seams and borders included."""
    case = dict(case, s=(1, 1))
    s, p, d, groups = list(case["s"]), list(case["p"]), list(case["d"]), case.get("groups", 1)
    assert _path(case["h"], case["w"], case["k"], case["s"], case["p"], case["d"]) == "flat"
    x, w, mask, bias = _make(case, torch.float32)
    ref = _dense(x, w, mask, bias, s, p, d, groups)
    gy = torch.randn(ref.shape, generator=torch.Generator().manual_seed(1))
    xr = x.clone().requires_grad_()
    _dense(xr, w, mask, None, s, p, d, groups).backward(gy)
    y = ops.forward(x, w, bias, mask, s, p, d, groups)
    gx = ops.grad_input(gy, w, mask, list(x.shape), s, p, d, groups)
    ycl = ops.forward(x.contiguous(memory_format=torch.channels_last), w, bias, mask, s, p, d, groups)
    gxcl = ops.grad_input(gy.contiguous(memory_format=torch.channels_last), w, mask, list(x.shape), s, p, d, groups)
    assert ycl.is_contiguous(memory_format=torch.channels_last)
    assert gxcl.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(ycl, ref, atol=1e-3, rtol=1e-4)
    torch.testing.assert_close(gxcl, xr.grad, atol=1e-3, rtol=1e-4)
    assert torch.equal(ycl, y) and torch.equal(gxcl, gx)


@pytest.mark.parametrize("hw,batch", [(2, 8), (8, 4)], ids=["2x2_stacks", "8x8_images"])
def test_staged_weights_over_l2(hw, batch, threads, isa):
    """Weights over one L2 group (160x160x3x3 at density 0.5: ~460 KB) stage every stack first and
    run the engine over all of them, group by group; the result is the same as the NCHW
    engine's, bit for bit, and the oracle's."""
    case = dict(b=batch, c=160, n=160, h=hw, w=hw, k=(3, 3), s=(1, 1), p=(1, 1, 1, 1), d=(1, 1))
    args = ([1, 1], [1, 1, 1, 1], [1, 1], 1)
    x, w, mask, bias = _make(case, torch.float32)
    assert int(mask.sum()) * 160 * 4 > 192 * 1024
    ref = _dense(x, w, mask, bias, *args)
    gy = torch.randn(ref.shape, generator=torch.Generator().manual_seed(1))
    xr = x.clone().requires_grad_()
    _dense(xr, w, mask, None, *args).backward(gy)
    outs = []
    for fmt in (torch.contiguous_format, torch.channels_last):
        y = ops.forward(x.contiguous(memory_format=fmt), w, bias, mask, *args)
        gx = ops.grad_input(gy.contiguous(memory_format=fmt), w, mask, list(x.shape), *args)
        torch.testing.assert_close(y, ref, atol=1e-3, rtol=1e-4)
        torch.testing.assert_close(gx, xr.grad, atol=1e-3, rtol=1e-4)
        outs.append((y, gx))
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])


@pytest.mark.parametrize("n", [40, 300], ids=["gy_in_place", "gy_transposed"])
def test_grad_weight_channels_last_grad_output(n, threads, isa):
    """A channels_last grad_output is read in place by grad weight while a pixel tile of it stays
    small (few output channels), and transposed to NCHW otherwise; both equal the NCHW result
    bit for bit and match the oracle."""
    case = dict(b=3, c=20, n=n, h=5, w=6, k=(3, 3), s=(1, 1), p=(1, 1, 1, 1), d=(1, 1))
    args = ([1, 1], [1, 1, 1, 1], [1, 1], 1)
    x, w, mask, _ = _make(case, torch.float32)
    xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
    out = _dense(xr, wr, mask, None, *args)
    gy = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    out.backward(gy)
    gw = ops.grad_weight(gy, x, w, mask, *args)
    gw_cl = ops.grad_weight(gy.contiguous(memory_format=torch.channels_last), x, w, mask, *args)
    assert torch.equal(gw_cl, gw)
    torch.testing.assert_close(gw_cl, wr.grad, **TOL[torch.float32])


def test_random_small_geometries_both_layouts():
    """Random 'same' convs with small planes, batches, channel counts (1 included), groups and
    thread counts, fp64, NCHW and channels_last, against the oracle: the staged routes (stacks,
    channels_last images, tensors whose two layouts coincide) and the whole-tensor ones."""
    rng = random.Random(0)
    for _ in range(120):
        with num_threads(rng.choice([1, 2, 3])):
            b = rng.choice([1, 2, 3, 4, 6, 8, 12, 16, 30, 64, 5])
            groups = rng.choice([1, 1, 2])
            c, n = groups * rng.randint(1, 6), groups * rng.randint(1, 7)
            k = rng.choice([(3, 3), (1, 1), (3, 1), (5, 3)])
            case = dict(b=b, c=c, n=n, h=rng.choice([1, 2, 3, 4, 5, 7]), w=rng.choice([1, 2, 3, 4, 6, 8]), k=k,
                        groups=groups, density=rng.random(), bias=rng.random() < 0.5)
            s, p, d = [1, 1], [k[0] // 2, k[0] // 2, k[1] // 2, k[1] // 2], [1, 1]
            x, w, mask, bias = _make(case, torch.float64, seed=rng.randrange(1 << 30))
            ref = _dense(x, w, mask, bias, s, p, d, groups)
            gy = torch.randn(ref.shape, dtype=torch.float64)
            xr = x.clone().requires_grad_()
            _dense(xr, w, mask, None, s, p, d, groups).backward(gy)
            for fmt in (torch.contiguous_format, torch.channels_last):
                y = ops.forward(x.contiguous(memory_format=fmt), w, bias, mask, s, p, d, groups)
                gx = ops.grad_input(gy.contiguous(memory_format=fmt), w, mask, list(x.shape), s, p, d, groups)
                torch.testing.assert_close(y, ref, **TOL[torch.float64], msg=lambda m: f"{case} {fmt}: {m}")
                torch.testing.assert_close(gx, xr.grad, **TOL[torch.float64], msg=lambda m: f"{case} {fmt}: {m}")


def test_bfloat16_accumulates_in_fp32():
    case = dict(b=2, c=32, n=16, h=9, w=9, k=(3, 3), s=(1, 1), p=(1, 1, 1, 1), d=(1, 1))
    x, w, mask, bias = _make(case, torch.float32)
    xb, wb, bb = x.bfloat16(), w.bfloat16(), bias.bfloat16()
    ref = _dense(xb.float(), wb.float(), mask, bb.float(), (1, 1), (1, 1, 1, 1), (1, 1), 1)
    y = ops.forward(xb, wb, bb, mask, [1, 1], [1, 1, 1, 1], [1, 1], 1)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), ref, atol=0.05, rtol=0.02)
    gy = torch.randn(ref.shape).bfloat16()
    gx = ops.grad_input(gy, wb, mask, list(x.shape), [1, 1], [1, 1, 1, 1], [1, 1], 1)
    gw = ops.grad_weight(gy, xb, wb, mask, [1, 1], [1, 1, 1, 1], [1, 1], 1)
    assert gx.dtype == gw.dtype == torch.bfloat16
    xr, wr = xb.float().requires_grad_(), wb.float().requires_grad_()
    _dense(xr, wr, mask, None, (1, 1), (1, 1, 1, 1), (1, 1), 1).backward(gy.float())
    torch.testing.assert_close(gx.float(), xr.grad, atol=0.1, rtol=0.02)
    torch.testing.assert_close(gw.float(), wr.grad, atol=0.2, rtol=0.02)


def test_larger_layer_fp32_all_paths():
    """A layer big enough for several chunks per image, full register tiles and both threads."""
    for case in [
        dict(b=3, c=40, n=52, h=17, w=19, k=(3, 3), s=(1, 1), p=(1, 1, 1, 1), d=(1, 1), density=0.4, path="flat"),
        dict(b=2, c=40, n=52, h=17, w=19, k=(3, 3), s=(2, 2), p=(1, 1, 1, 1), d=(1, 1), density=0.4, path="flat"),
        dict(b=2, c=24, n=30, h=9, w=80, k=(3, 3), s=(1, 1), p=(0, 0, 0, 0), d=(1, 1), density=0.3, path="row"),
    ]:
        _check_case(case, torch.float32)


def test_channels_last_and_noncontiguous_inputs():
    case = dict(b=2, c=8, n=12, h=9, w=9, k=(3, 3), s=(1, 1), p=(1, 1, 1, 1), d=(1, 1))
    x, w, mask, bias = _make(case, torch.float32)
    ref = _dense(x, w, mask, bias, (1, 1), (1, 1, 1, 1), (1, 1), 1)
    xcl = x.contiguous(memory_format=torch.channels_last)
    y = ops.forward(xcl, w, bias, mask, [1, 1], [1, 1, 1, 1], [1, 1], 1)
    assert y.is_contiguous(memory_format=torch.channels_last)  # output in the input's format
    torch.testing.assert_close(y, ref, atol=2e-4, rtol=1e-4)
    gy = torch.randn(ref.shape)
    gycl = gy.contiguous(memory_format=torch.channels_last)
    args = ([1, 1], [1, 1, 1, 1], [1, 1], 1)
    gx = ops.grad_input(gycl, w, mask, list(x.shape), *args)
    assert gx.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(gx, ops.grad_input(gy, w, mask, list(x.shape), *args), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ops.grad_weight(gycl, xcl, w, mask, *args), ops.grad_weight(gy, x, w, mask, *args),
                               atol=1e-4, rtol=1e-5)
    wt = w.t().contiguous().t()  # same values, column-major storage
    y = ops.forward(x, wt, bias, mask, [1, 1], [1, 1, 1, 1], [1, 1], 1)
    torch.testing.assert_close(y, ref, atol=2e-4, rtol=1e-4)


def test_deterministic_across_runs_and_threads():
    case = dict(b=4, c=32, n=48, h=12, w=12, k=(3, 3), s=(1, 1), p=(1, 1, 1, 1), d=(1, 1), density=0.5)
    x, w, mask, bias = _make(case, torch.float32)
    gy = torch.randn(4, 48, 12, 12)
    args = ([1, 1], [1, 1, 1, 1], [1, 1], 1)

    def run():
        return (
            ops.forward(x, w, bias, mask, *args),
            ops.grad_input(gy, w, mask, list(x.shape), *args),
            ops.grad_weight(gy, x, w, mask, *args),
        )

    first = run()
    with num_threads(1):
        single = run()
    for a, b, c in zip(first, run(), single):
        assert torch.equal(a, b) and torch.equal(a, c)


def test_argument_errors_name_expected_and_got():
    x = torch.randn(2, 8, 9, 9)
    mask = torch.ones(4, 3, 3, dtype=torch.bool)
    w = torch.randn(36, 8)
    good = ([1, 1], [1, 1, 1, 1], [1, 1], 1)
    with pytest.raises(ValueError, match="36 rows but stripe_mask keeps 35"):
        m2 = mask.clone()
        m2[0, 0, 0] = False
        ops.forward(x, w, None, m2, *good)
    with pytest.raises(ValueError, match=r"packed weight must be \[num_stripes, 8\]"):
        ops.forward(x, torch.randn(36, 7), None, mask, *good)
    with pytest.raises(ValueError, match="stripe_mask must have dtype bool"):
        ops.forward(x, w, None, mask.float(), *good)
    with pytest.raises(ValueError, match="padding takes 4 values"):
        ops.forward(x, w, None, mask, [1, 1], [1, 1], [1, 1], 1)
    with pytest.raises(ValueError, match="stride must be >= 1"):
        ops.forward(x, w, None, mask, [0, 1], [1, 1, 1, 1], [1, 1], 1)
    with pytest.raises(ValueError, match="divisible by groups"):
        ops.forward(x, torch.randn(36, 2), None, mask, [1, 1], [1, 1, 1, 1], [1, 1], 3)
    with pytest.raises(ValueError, match=r"bias must be \[4\]"):
        ops.forward(x, w, torch.randn(5), mask, *good)
    with pytest.raises(ValueError, match="weight dtype"):
        ops.forward(x, w.double(), None, mask, *good)
    with pytest.raises(ValueError, match="float32, float64 or bfloat16"):
        ops.forward(x.long(), w.long(), None, mask, *good)
    with pytest.raises(ValueError, match="4-D input"):
        ops.forward(x[0], w, None, mask, *good)
    with pytest.raises(ValueError, match=r"grad_output must have shape \[2, 4, 9, 9\]"):
        ops.grad_input(torch.randn(2, 4, 8, 9), w, mask, [2, 8, 9, 9], *good)
    with pytest.raises(ValueError, match=r"grad_output must have shape \[2, 4, 9, 9\]"):
        ops.grad_weight(torch.randn(2, 5, 9, 9), x, w, mask, *good)
    # No output pixel (too few rows, or columns, for the kernel; with stride 2 as well): refused like
    # the op refuses it, whichever of the three kernels is called.
    for hw, pad in (((2, 9), [0, 0, 1, 1]), ((9, 2), [1, 1, 0, 0])):
        small = torch.randn(2, 8, *hw)
        for stride in ([1, 1], [2, 2]):
            geo = (stride, pad, [1, 1], 1)
            gy = torch.randn(2, 4, 0, 0)
            for call in (lambda: ops.forward(small, w, None, mask, *geo),
                         lambda: ops.grad_input(gy, w, mask, list(small.shape), *geo),
                         lambda: ops.grad_weight(gy, small, w, mask, *geo)):
                with pytest.raises(ValueError, match=rf"\[{hw[0]}, {hw[1]}\] with padding .* is smaller than the "
                                                     "dilated kernel"):
                    call()


@pytest.mark.parametrize("policy", ["always", "auto"])
def test_dense_dispatch_near_density_one(policy, monkeypatch):
    monkeypatch.setenv("STRIPECONV_CPU_DENSE", policy)
    for cl, b, hw in ((False, 2, 9), (True, 2, 9), (False, 8, 8)):  # the last: a small plane, NCHW (dense too)
        case = dict(b=b, c=16, n=24, h=hw, w=hw, k=(3, 3), s=(1, 1), p=(1, 1, 1, 1), d=(1, 1), density=1.0)
        x, w, mask, bias = _make(case, torch.float32)
        mask[0, 0, 0] = False  # density 215/216: still above the dense threshold
        w = pack_weight(torch.randn(24, 16, 3, 3), mask)
        if cl:
            x = x.contiguous(memory_format=torch.channels_last)
        ref = _dense(x, w, mask, bias, (1, 1), (1, 1, 1, 1), (1, 1), 1)
        y = ops.forward(x, w, bias, mask, [1, 1], [1, 1, 1, 1], [1, 1], 1)  # auto: dense for channels_last
        torch.testing.assert_close(y, ref, atol=2e-4, rtol=1e-4)
        assert y.is_contiguous(memory_format=torch.channels_last) == cl
    # a 1x1 conv keeping every filter hands its packed rows over as the dense weight (no copy):
    # plain and grouped, NCHW and channels_last, and a non-contiguous packed weight
    for groups, cl, transposed in ((1, True, False), (4, True, False), (1, False, False), (2, True, True)):
        mask = torch.ones(24, 1, 1, dtype=torch.bool)
        w = torch.randn(16 // groups, 24).t() if transposed else torch.randn(24, 16 // groups)
        x = torch.randn(2, 16, 5, 7)
        if cl:
            x = x.contiguous(memory_format=torch.channels_last)
        bias = torch.randn(24)
        ref = _dense(x, w, mask, bias, (1, 1), (0, 0, 0, 0), (1, 1), groups)
        y = ops.forward(x, w, bias, mask, [1, 1], [0, 0, 0, 0], [1, 1], groups)
        torch.testing.assert_close(y, ref, atol=2e-4, rtol=1e-4)
        assert y.is_contiguous(memory_format=torch.channels_last) == cl
    # asymmetric padding never goes to the dense conv, whatever the policy
    x, w, mask, bias = _make(dict(b=1, c=4, n=4, h=6, w=6, k=(3, 3), density=1.0), torch.float32)
    y = ops.forward(x, w, bias, mask, [1, 1], [0, 2, 1, 1], [1, 1], 1)
    torch.testing.assert_close(y, _dense(x, w, mask, bias, (1, 1), (0, 2, 1, 1), (1, 1), 1), atol=2e-4, rtol=1e-4)


def _ran_dense_conv(call) -> bool:
    """Whether ``call`` ran at::convolution (the dense hand-over) rather than the stripe kernel."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        call()
    return any(e.name == "aten::convolution" for e in prof.events())


@pytest.mark.parametrize("b, c, hw, channels_last, dense", [
    (4, 64, 32, True, True),     # large plane, 151 M multiply-adds: torch's channels_last conv is faster
    (1, 64, 56, True, True),
    (64, 64, 4, True, False),    # a 4x4 plane: torch's channels_last conv leaves oneDNN
    (1, 64, 8, True, False),     # 64 output pixels: too little work to repay unpacking the weight
    (2, 16, 32, True, False),    # 2048 pixels but 9 M multiply-adds
    (16, 32, 8, False, True),    # NCHW: small plane, batch >= 8
    (4, 64, 32, False, False),   # NCHW: the stripe kernel
])
def test_dense_handover_rule(b, c, hw, channels_last, dense, monkeypatch):
    """At density >= 0.9 the automatic policy picks the dense conv only for the shapes where it measured faster
    (kDenseDensity and prefers_dense_* in csrc/cpu/dense.h); ``never`` and ``always`` override it."""
    torch.manual_seed(0)
    mask = torch.ones(c, 3, 3, dtype=torch.bool)
    mask[0, 0, 0] = False  # density just below 1
    w = pack_weight(torch.randn(c, c, 3, 3), mask)
    x = torch.randn(b, c, hw, hw)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    conv = ([1, 1], [1, 1, 1, 1], [1, 1], 1)
    ref = _dense(x, w, mask, None, (1, 1), (1, 1, 1, 1), (1, 1), 1)
    for policy, want in (("auto", dense), ("never", False), ("always", True)):
        monkeypatch.setenv("STRIPECONV_CPU_DENSE", policy)
        out = []
        assert _ran_dense_conv(lambda: out.append(ops.forward(x, w, None, mask, *conv))) == want, policy
        torch.testing.assert_close(out[0], ref, atol=2e-4, rtol=1e-4)
    mask[:, 1, 1] = False  # density 8/9 < 0.9: the stripe kernel whatever the shape
    w = pack_weight(torch.randn(c, c, 3, 3), mask)
    monkeypatch.setenv("STRIPECONV_CPU_DENSE", "auto")
    assert not _ran_dense_conv(lambda: ops.forward(x, w, None, mask, *conv))


def test_dense_handover_reuses_unpacked_weight_only_while_unchanged(monkeypatch):
    """The hand-over keeps the unpacked weight between calls: every change to the packed weight or
    the mask (in place, through ``.data``, in a new tensor at a recycled address) must reach the
    output, and inference tensors (no version counter) must still work."""
    monkeypatch.setenv("STRIPECONV_CPU_DENSE", "always")
    torch.manual_seed(0)
    conv = ([1, 1], [1, 1, 1, 1], [1, 1], 1)
    mask = torch.rand(12, 3, 3) < 0.95
    w = pack_weight(torch.randn(12, 8, 3, 3), mask)
    x = torch.randn(2, 8, 7, 7)

    def check():
        torch.testing.assert_close(ops.forward(x, w, None, mask, *conv),
                                   _dense(x, w, mask, None, (1, 1), (1, 1, 1, 1), (1, 1), 1), atol=2e-4, rtol=1e-4)

    check()
    check()  # the cached weight
    w.mul_(-0.5)  # in place (an optimizer step)
    check()
    with torch.no_grad():
        w[3] = torch.randn(8)
    check()
    w.data = torch.randn(w.shape)  # a new storage behind the same tensor
    check()
    drop, add = tuple(mask.nonzero()[0]), tuple((~mask).nonzero()[0])
    mask[drop], mask[add] = False, True  # in place: the same stripe count, other stripes
    check()
    for _ in range(3):  # fresh tensors each time, so addresses may be recycled
        mask = torch.rand(12, 3, 3) < 0.95
        w = pack_weight(torch.randn(12, 8, 3, 3), mask)
        check()
    with torch.inference_mode():
        mask, w = mask.clone(), w.clone()
        check()
        w.mul_(2)
        check()
    monkeypatch.setenv("STRIPECONV_CPU_DENSE_CACHE_MB", "0")
    check()
    # a 1 MB budget holds two of these 0.4 MB weights: cycling through four evicts on every call
    monkeypatch.setenv("STRIPECONV_CPU_DENSE_CACHE_MB", "1")
    layers = [(m, pack_weight(torch.randn(96, 128, 3, 3), m)) for m in (torch.rand(96, 3, 3) < 0.95 for _ in range(4))]
    x = torch.randn(1, 128, 5, 5)
    for _ in range(2):
        for mask, w in layers:
            check()


def test_dense_handover_trains_like_the_oracle(monkeypatch):
    """SGD steps through the hand-over forward (the cached unpacked weight is rewritten every
    step) follow SGD steps through F.conv2d on the masked weight."""
    monkeypatch.setenv("STRIPECONV_CPU_DENSE", "always")
    from stripeconv import StripeConv2d

    torch.manual_seed(0)
    conv = torch.nn.Conv2d(8, 16, 3, padding=1)
    mask = torch.rand(16, 3, 3) < 0.95
    layer = StripeConv2d.from_conv(conv, mask)
    ref_w = (conv.weight.detach() * mask[:, None]).clone().requires_grad_()
    ref_b = conv.bias.detach().clone().requires_grad_()
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    ref_opt = torch.optim.SGD([ref_w, ref_b], lr=0.1)
    for step in range(4):
        x = torch.randn(4, 8, 9, 9).contiguous(memory_format=torch.channels_last)
        y, ref = layer(x), F.conv2d(x, ref_w * mask[:, None], ref_b, padding=1)
        torch.testing.assert_close(y, ref, atol=2e-4, rtol=1e-4)
        for o, out in ((opt, y), (ref_opt, ref)):
            o.zero_grad()
            out.square().mean().backward()
            o.step()
