"""The CUDA C++ backend (csrc/cuda) without a GPU, and on one when there is one.

* Emulation: the unmodified launchers and kernels compiled for the CPU against
  csrc/cuda/emulation.h (CUDA threads as OS threads, real barriers, wmma emulated with its
  alignment rules checked, poisoned shared memory), registered as ``stripeconv_cuda_emu`` and
  run through ``StripeConv2d`` with the ``cuda`` backend against the fp64 oracle: forward and
  every gradient.
* nvcc: csrc/cuda/ops.cu compiles for sm_80 and sm_90 against torch's headers, the tensor-core
  kernels use HMMA and do not spill.
* GPU: the same oracle checks on CUDA tensors when the extension was built with CUDA.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import stripeconv
from stripeconv.backends import cuda as cuda_backend
from conftest import DEGENERATE_SHAPES, check_degenerate_shape, check_double_backward
from stripeconv.packing import pack_weight, unpack_weight

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CUDA_SRC = os.path.join(ROOT, "csrc", "cuda")


def _cpu_side_check() -> None:
    """The emulation and the compile-only checks need no GPU: a GPU session with little time skips them."""
    if os.environ.get("STRIPECONV_GPU_TESTS_ONLY") == "1":
        pytest.skip("CPU-side check (emulation / nvcc compile-only), skipped with STRIPECONV_GPU_TESTS_ONLY=1")


@pytest.fixture(scope="module")
def emulated_ops(tmp_path_factory):
    """Build the CPU emulation of the CUDA kernels once per test session."""
    _cpu_side_check()
    from torch.utils import cpp_extension

    if not hasattr(torch.ops, "stripeconv_cuda_emu") or not hasattr(torch.ops.stripeconv_cuda_emu, "forward"):
        cpp_extension.load(
            name="stripeconv_cuda_emu",
            sources=[os.path.join(ROOT, "tests", "cuda_emulation", "ops_emulated.cpp")],
            extra_include_paths=[CUDA_SRC],
            extra_cflags=["-O1", "-std=c++17", "-pthread"],
            extra_ldflags=["-pthread"],
            build_directory=str(tmp_path_factory.mktemp("cuda_emu")),
            is_python_module=False,
        )
    return torch.ops.stripeconv_cuda_emu


@pytest.fixture(params=["emulated", "cuda"])
def cuda_kernels(request, monkeypatch):
    """The ``cuda`` backend on CPU tensors through the emulation, or on a GPU when there is one."""
    if request.param == "emulated":
        request.getfixturevalue("emulated_ops")
        monkeypatch.setattr(cuda_backend, "_NAMESPACE", "stripeconv_cuda_emu")
        monkeypatch.setattr(cuda_backend, "_DEVICE_TYPE", "cpu")
        device = torch.device("cpu")
    else:
        ok, reason = cuda_backend.is_available()
        if not ok:
            pytest.skip(f"CUDA kernels: {reason}")
        device = torch.device("cuda")
    stripeconv.set_backend("cuda")
    yield device
    stripeconv.set_backend(None)


def _check(device, dtype, in_ch, out_ch, size, kernel_size, density, seed=0, channels_last=False, bias=True,
           mask=None, **conv):
    """StripeConv2d on ``device``/``dtype`` against the fp64 oracle on the same rounded values.

    The mask is random with the given density unless ``mask`` is given."""
    g = torch.Generator().manual_seed(seed)
    conv64 = nn.Conv2d(in_ch, out_ch, kernel_size, bias=bias, **conv).double()
    if mask is None:
        mask = torch.rand(out_ch, *conv64.kernel_size, generator=g) < density
    with torch.no_grad():
        conv64.weight.copy_(torch.randn(conv64.weight.shape, generator=g, dtype=torch.float64).to(dtype).double())
        conv64.weight.mul_(mask[:, None])
        if bias:
            conv64.bias.copy_(torch.randn(out_ch, generator=g, dtype=torch.float64).to(dtype).double())
    x64 = torch.randn(2, in_ch, *size, generator=g, dtype=torch.float64).to(dtype).double().requires_grad_(True)
    expected = conv64(x64)
    grad_out = torch.randn(expected.shape, generator=g, dtype=torch.float64).to(dtype).double()
    expected.backward(grad_out)

    layer = stripeconv.StripeConv2d.from_conv(conv64, mask).to(device=device, dtype=dtype)
    x = x64.detach().to(device=device, dtype=dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_(True)
    got = layer(x)
    got.backward(grad_out.to(device=device, dtype=dtype))
    if channels_last:
        assert got.is_contiguous(memory_format=torch.channels_last)
    tol = {torch.float64: 1e-10, torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 2e-2}[dtype]

    def close(actual, wanted, what):
        assert actual.shape == wanted.shape, what
        if wanted.numel() == 0:
            return
        scale = wanted.abs().max().item() + 1e-12
        err = (actual.detach().double().cpu() - wanted).abs().max().item() / scale
        assert err < tol, f"{what}: max error {err:.2e} of scale {scale:.2e} (tolerance {tol:.0e})"

    close(got, expected.detach(), "output")
    close(x.grad, x64.grad, "grad input")
    close(layer.packed_weight.grad, pack_weight(conv64.weight.grad, mask), "grad weight")
    if bias:
        close(layer.bias.grad, conv64.bias.grad, "grad bias")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
def test_oracle_dtypes(cuda_kernels, dtype):
    # 24 filters in blocks of 16 (two filter blocks, one partial), 40 channels (two K steps).
    _check(cuda_kernels, dtype, 40, 24, (6, 6), 3, 0.5, padding=1)


@pytest.mark.parametrize(
    "in_ch, out_ch, size, kernel_size, density, conv, channels_last",
    [
        (8, 24, (7, 5), 3, 0.4, dict(stride=2, padding=(1, 2)), True),          # stride phases, NHWC
        (6, 6, (9, 8), (3, 2), 0.6, dict(stride=(2, 3), dilation=(2, 1), groups=3), False),
        (4, 4, (6, 6), 3, 0.7, dict(padding=1, groups=4), False),                # depthwise
        (70, 70, (15, 15), 3, 0.95, dict(padding=1), True),                     # > 64 rows per position and block
        (8, 16, (5, 6), 3, 0.0, dict(padding=1), False),                        # every stripe pruned
        (8, 16, (5, 6), 3, 1.0, dict(padding="same", dilation=2), False),       # every stripe kept
        (8, 8, (3, 3), 3, 0.5, dict(stride=4, padding=1), False),               # stride > kernel: pixels no tap reaches
    ],
)
def test_oracle_geometry(cuda_kernels, in_ch, out_ch, size, kernel_size, density, conv, channels_last):
    _check(cuda_kernels, torch.float32, in_ch, out_ch, size, kernel_size, density,
           channels_last=channels_last, **conv)


@pytest.mark.parametrize("in_channels,out_channels,size,padding", DEGENERATE_SHAPES)
def test_degenerate_shapes(cuda_kernels, in_channels, out_channels, size, padding):
    check_degenerate_shape(cuda_kernels, in_channels, out_channels, size, padding)


def test_double_backward(cuda_kernels):
    gen = torch.Generator().manual_seed(5)
    conv = nn.Conv2d(8, 16, 3, stride=2, padding=1, dilation=(1, 2)).double().to(cuda_kernels)
    mask = (torch.rand(16, 3, 3, generator=gen) < 0.5).to(cuda_kernels)
    x = torch.randn(2, 8, 7, 9, generator=gen, dtype=torch.float64).to(cuda_kernels)
    check_double_backward(conv, mask, x, atol=1e-9)


def test_oracle_many_pixels_fp16(cuda_kernels):
    # 2 x 12 x 12 = 288 output pixels: several pixel tiles and grad weight splits.
    _check(cuda_kernels, torch.float16, 16, 32, (12, 12), 3, 0.3, padding=1, bias=False)


def _structured_mask(kind: str, out_ch: int, seed: int = 5) -> torch.Tensor:
    """[out_ch, 3, 3] masks whose positions keep the same filters, or the same number of other ones."""
    g = torch.Generator().manual_seed(seed)
    if kind == "dense":
        return torch.ones(out_ch, 3, 3, dtype=torch.bool)
    if kind == "filter-pruned":  # a quarter of the filters pruned whole, the others dense
        return (torch.rand(out_ch, generator=g) >= 0.25)[:, None, None].expand(out_ch, 3, 3).clone()
    if kind == "equal-counts":  # every position keeps half the filters, a different half each
        mask = torch.zeros(out_ch, 9, dtype=torch.bool)
        for p in range(9):
            mask[torch.randperm(out_ch, generator=g)[: out_ch // 2], p] = True
        return mask.view(out_ch, 3, 3)
    if kind == "runs":  # runs of positions keep one set, then one filter is swapped for another
        kept = torch.randperm(out_ch, generator=g)[: out_ch // 2]
        mask = torch.zeros(out_ch, 9, dtype=torch.bool)
        for p in range(9):
            if p in (3, 7):
                out = kept[int(torch.randint(len(kept), (1,), generator=g))]
                others = torch.tensor([f for f in range(out_ch) if f not in set(kept.tolist())])
                kept = torch.cat([kept[kept != out], others[torch.randint(len(others), (1,), generator=g)]])
            mask[kept, p] = True
        return mask.view(out_ch, 3, 3)
    raise ValueError(kind)


@pytest.mark.parametrize("kind", ["dense", "filter-pruned", "equal-counts", "runs"])
@pytest.mark.parametrize("groups", [1, 2])
def test_oracle_chunks_of_the_same_filters(cuda_kernels, kind, groups):
    # 160 filters over 2 x 16 x 16 pixels: the forward takes all of a group's filters in one block,
    # so each position's rows span several 64-row chunk slots. Chunks that hold the same filters
    # as the chunk before them sum in registers; all others must still reach the accumulator.
    _check(cuda_kernels, torch.bfloat16, 16, 160, (16, 16), 3, None, mask=_structured_mask(kind, 160),
           padding=1, groups=groups, channels_last=True)


@pytest.mark.parametrize(
    "in_ch, conv",
    [
        (12, dict(padding=1)),                        # 12 channels: element loads (not 16-byte runs)
        (32, dict(padding=(0, 2), stride=2, groups=2)),  # 16-byte copies per group, borders zero-filled
        (72, dict(padding=2, dilation=2)),            # 3 channel steps, the last one partial
    ],
)
def test_oracle_bf16_load_paths(cuda_kernels, in_ch, conv):
    _check(cuda_kernels, torch.bfloat16, in_ch, 24, (7, 6), 3, 0.4, channels_last=True, **conv)


def _misaligned(t):
    """A copy of ``t`` (same strides) that starts 2 bytes past a 16-byte boundary."""
    storage = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)
    shifted = storage[1:].as_strided(t.shape, t.stride())
    shifted.copy_(t)
    assert shifted.data_ptr() % 16 != 0 and t.data_ptr() % 16 == 0
    return shifted


def test_misaligned_tensors_take_element_loads_with_the_same_result(cuda_kernels):
    # 16-byte copies need 16-byte aligned rows; a shifted tensor takes element loads instead, and
    # every op gives the same bits either way.
    g = torch.Generator().manual_seed(3)
    mask = (torch.rand(24, 3, 3, generator=g) < 0.5).to(cuda_kernels)
    weight = torch.randn(int(mask.sum()), 16, generator=g).to(cuda_kernels, torch.bfloat16)
    x = torch.randn(2, 16, 6, 6, generator=g).to(cuda_kernels, torch.bfloat16).contiguous(memory_format=torch.channels_last)
    dy = torch.randn(2, 24, 6, 6, generator=g).to(cuda_kernels, torch.bfloat16).contiguous(memory_format=torch.channels_last)
    conv = ([1, 1], [1, 1, 1, 1], [1, 1], 1)
    ops = cuda_backend._ops()

    y = ops.forward(x, weight, None, mask, *conv)
    assert torch.equal(y, ops.forward(_misaligned(x), _misaligned(weight), None, mask, *conv))
    dx = ops.grad_input(dy, weight, mask, list(x.shape), *conv)
    assert torch.equal(dx, ops.grad_input(dy, _misaligned(weight), mask, list(x.shape), *conv))
    dw = ops.grad_weight(dy, x, weight, mask, *conv)
    assert torch.equal(dw, ops.grad_weight(dy, _misaligned(x), weight, mask, *conv))

    x, dy, mask = x.double().cpu(), dy.double().cpu(), mask.cpu()
    w_dense = unpack_weight(weight.double().cpu(), mask)
    torch.testing.assert_close(y.double().cpu(), F.conv2d(x, w_dense, padding=1), atol=0.05, rtol=0.02)
    torch.testing.assert_close(dx.double().cpu(), torch.nn.grad.conv2d_input(x.shape, w_dense, dy, padding=1),
                               atol=0.05, rtol=0.02)
    dw_dense = torch.nn.grad.conv2d_weight(x, w_dense.shape, dy, padding=1)
    torch.testing.assert_close(dw.double().cpu(), pack_weight(dw_dense, mask), atol=0.1, rtol=0.02)


def _small_layer(device, dtype=torch.float32):
    g = torch.Generator().manual_seed(7)
    conv = nn.Conv2d(8, 16, 3, padding=1, stride=2)
    mask = torch.rand(16, 3, 3, generator=g) < 0.4
    return stripeconv.StripeConv2d.from_conv(conv, mask).to(device=device, dtype=dtype)


def _reference(layer, x):
    with torch.no_grad():
        return F.conv2d(x.double().cpu(), layer.weight.double().cpu(), layer.bias.double().cpu(), layer.stride,
                        layer.padding, layer.dilation, layer.groups)


def test_torch_compile(cuda_kernels):
    layer = _small_layer(cuda_kernels)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 8, 9, 9).to(cuda_kernels).requires_grad_(True)
    y = compiled(x)
    y.square().sum().backward()
    torch.testing.assert_close(y.double().cpu(), _reference(layer, x), atol=1e-4, rtol=1e-4)
    assert x.grad is not None and layer.packed_weight.grad is not None


def test_cuda_graph_capture(cuda_kernels):
    if cuda_kernels.type != "cuda":
        pytest.skip("CUDA graphs need a CUDA device")
    layer = _small_layer(cuda_kernels)
    static_x = torch.randn(2, 8, 9, 9, device=cuda_kernels, requires_grad=True)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up: the once-per-mask host check happens here
        layer(static_x).sum().backward()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_y = layer(static_x)
        static_y.sum().backward()
    for seed in (1, 2):
        with torch.no_grad():
            static_x.copy_(torch.randn(2, 8, 9, 9, generator=torch.Generator().manual_seed(seed)).to(cuda_kernels))
        graph.replay()
        torch.cuda.synchronize()
        torch.testing.assert_close(static_y.double().cpu(), _reference(layer, static_x), atol=1e-4, rtol=1e-4)


def test_mask_that_does_not_match_the_weight(cuda_kernels):
    mask = torch.ones(4, 3, 3, dtype=torch.bool, device=cuda_kernels)
    weight = torch.randn(35, 2, device=cuda_kernels)
    x = torch.randn(1, 2, 5, 5, device=cuda_kernels)
    with pytest.raises(ValueError, match="35 rows but stripe_mask keeps 36 stripes"):
        stripeconv.ops.stripe_conv2d(x, weight, None, mask, [1, 1], [1, 1, 1, 1], [1, 1], 1)


def test_unsupported_dtype_is_named(emulated_ops):
    mask = torch.ones(2, 1, 1, dtype=torch.bool)
    with pytest.raises(ValueError, match="expected float16, bfloat16, float32 or float64"):
        emulated_ops.forward(torch.ones(1, 2, 3, 3, dtype=torch.int32), torch.ones(2, 2, dtype=torch.int32), None,
                             mask, [1, 1], [0, 0, 0, 0], [1, 1], 1)


def test_input_smaller_than_the_kernel_is_refused(emulated_ops):
    """The raw kernels refuse it too (the op checks first). With stride 2 the numerator is -1 and a
    truncating division would give one output row."""
    mask = torch.ones(4, 3, 3, dtype=torch.bool)
    w, x = torch.randn(36, 2), torch.randn(1, 2, 2, 5)
    for stride in ([1, 1], [2, 2]):
        with pytest.raises(ValueError, match="smaller than the dilated kernel"):
            emulated_ops.forward(x, w, None, mask, stride, [0, 0, 0, 0], [1, 1], 1)
        with pytest.raises(ValueError, match="smaller than the dilated kernel"):
            emulated_ops.grad_weight(torch.randn(1, 4, 1, 2), x, w, mask, stride, [0, 0, 0, 0], [1, 1], 1)


def test_kernels_reject_wrong_device(emulated_ops):
    # Registered for CPU tensors only: a meta tensor has no kernel to run.
    mask = torch.ones(2, 1, 1, dtype=torch.bool)
    with pytest.raises(NotImplementedError):
        emulated_ops.forward(torch.ones(1, 2, 3, 3, device="meta"), torch.ones(2, 2, device="meta"), None,
                             mask.to("meta"), [1, 1], [0, 0, 0, 0], [1, 1], 1)


def test_not_available_without_cuda_build():
    ok, reason = cuda_backend.is_available()
    if torch.cuda.is_available() and ok:
        pytest.skip("the extension was built with CUDA kernels here")
    assert not ok and reason


# ------------------------------------------------------------------------------------- nvcc
def _nvcc() -> str:
    nvcc = shutil.which("nvcc") or (os.path.join(os.environ["CUDA_HOME"], "bin", "nvcc") if "CUDA_HOME" in os.environ else "")
    if not nvcc or not os.path.exists(nvcc):
        pytest.skip("nvcc not found: the CUDA sources cannot be compile-checked here")
    return nvcc


@pytest.fixture(scope="module")
def compiled_ops(tmp_path_factory):
    """csrc/cuda/ops.cu compiled (not linked) for sm_80 and sm_90 against torch's headers."""
    _cpu_side_check()
    nvcc = _nvcc()
    tmp = tmp_path_factory.mktemp("nvcc")
    # CPU wheels of torch ship the c10/cuda headers but not this generated one.
    shim = tmp / "c10" / "cuda" / "impl"
    shim.mkdir(parents=True)
    (shim / "cuda_cmake_macros.h").write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
    include = os.path.join(os.path.dirname(torch.__file__), "include")
    obj = tmp / "ops.o"
    cmd = [nvcc, "-c", "-std=c++17", "-O3", "-Xptxas", "-v",
           "-gencode", "arch=compute_80,code=sm_80", "-gencode", "arch=compute_90,code=sm_90",
           "-I", CUDA_SRC, "-I", str(tmp), "-I", include, "-I", os.path.join(include, "torch", "csrc", "api", "include"),
           f"-D_GLIBCXX_USE_CXX11_ABI={int(torch.compiled_with_cxx11_abi())}", "-diag-suppress", "3306",
           os.path.join(CUDA_SRC, "ops.cu"), "-o", str(obj)]
    run = subprocess.run(cmd, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-4000:]
    return obj, run.stderr


def _ptxas_report(log: str) -> dict:
    """{(kernel, dtype, arch): (registers, spill bytes)} from ptxas -v."""
    report, current = {}, None
    for line in log.splitlines():
        if "Compiling entry function" in line:  # every entry resets: others' figures must not land on a kernel
            m = re.search(r"Compiling entry function '_ZN15stripeconv_cuda\d+(\w+?)I(\w+?)E\w*' for 'sm_(\d+)'", line)
            current = (m.group(1), m.group(2), m.group(3)) if m else None
        m = re.search(r"(\d+) bytes spill stores", line)
        if m and current:
            report[current] = [None, int(m.group(1))]
        m = re.search(r"Used (\d+) registers", line)
        if m and current in report:
            report[current][0] = int(m.group(1))
    return report


def test_cuda_sources_compile_for_sm80_and_sm90(compiled_ops):
    _, log = compiled_ops
    report = _ptxas_report(log)
    kernels = {"forward_kernel", "grad_input_kernel", "grad_weight_kernel"}
    for arch in ("80", "90"):
        for dtype in ("6__half", "13__nv_bfloat16", "f", "d"):
            for kernel in kernels:
                assert (kernel, dtype, arch) in report, f"{kernel}<{dtype}> missing for sm_{arch}"
            if dtype in ("6__half", "13__nv_bfloat16"):
                for kernel in kernels:  # the tensor-core tiles keep their fragments in registers
                    assert report[(kernel, dtype, arch)][1] == 0, (kernel, dtype, arch, report[(kernel, dtype, arch)])


def test_tensor_cores_and_async_copies_where_expected(compiled_ops):
    obj, _ = compiled_ops
    candidates = [shutil.which("cuobjdump"), os.path.join(os.path.dirname(_nvcc()), "cuobjdump")]
    try:
        import triton  # its wheel bundles the CUDA binary tools

        candidates.append(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump"))
    except ImportError:
        pass
    cuobjdump = next((c for c in candidates if c and os.path.exists(c)), None)
    if cuobjdump is None:
        pytest.skip("cuobjdump not found (neither on PATH, next to nvcc, nor in triton's wheel)")
    sass = subprocess.run([cuobjdump, "-sass", "-arch", "sm_90", str(obj)], capture_output=True, text=True, check=True).stdout
    checked = 0
    for fn in re.split(r"\n\s*Function : ", sass)[1:]:
        m = re.match(r"_ZN15stripeconv_cuda\d+(forward|grad_input|grad_weight)_kernelI(\w+?)E", fn)
        if m:
            checked += 1
            sixteen_bit = m.group(2) in ("6__half", "13__nv_bfloat16")
            # fp32 stays IEEE on CUDA cores
            assert ("HMMA" in fn) == sixteen_bit, f"{m.group(1)}<{m.group(2)}>: HMMA present is {'HMMA' in fn}"
            # 16-bit kernels load their contiguous operands by asynchronous copies (cp.async)
            assert ("LDGSTS" in fn) == sixteen_bit, f"{m.group(1)}<{m.group(2)}>: LDGSTS present is {'LDGSTS' in fn}"
    assert checked == 12


# ------------------------------------------------------------------------- benchmark self-check
def _bench_gpu():
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_gpu", os.path.join(ROOT, "bench", "bench_gpu.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_benchmark_self_check_passes_on_the_kernels(cuda_kernels):
    # bench_gpu times the CUDA kernels only after this check agrees with the dense conv.
    assert _bench_gpu().cuda_kernels_error(cuda_kernels) < 3e-2


def test_benchmark_self_check_catches_a_wrong_gradient(emulated_ops, monkeypatch):
    monkeypatch.setattr(cuda_backend, "_NAMESPACE", "stripeconv_cuda_emu")
    monkeypatch.setattr(cuda_backend, "_DEVICE_TYPE", "cpu")
    right = cuda_backend.grad_weight
    monkeypatch.setattr(cuda_backend, "grad_weight", lambda *args: right(*args) * 0.9)
    assert _bench_gpu().cuda_kernels_error("cpu") > 0.05
