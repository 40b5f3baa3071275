"""Parallel precompilation of the Triton kernel variants (stripeconv.kernels.precompile).

The planner and the worker pool run on CPU; whether a real launch then loads the precompiled
variants instead of compiling them needs a GPU (skipped visibly without one).
"""
from __future__ import annotations

import functools
import subprocess
import sys
import textwrap

import pytest
import torch

from conftest import require_compiling_triton_kernels
from stripeconv.backends import _triton_runtime, triton_backend as tb


@pytest.fixture
def precompile():
    return require_compiling_triton_kernels().kernels_module("precompile")


def _calls(c=32, n=48, hw=8, density=0.5, batch=2, seed=0, stride=1):
    from stripeconv.packing import pack_weight

    gen = torch.Generator().manual_seed(seed)
    mask = torch.rand(n, 3, 3, generator=gen) < density
    packed = pack_weight(torch.randn(n, c, 3, 3, generator=gen), mask).to(torch.bfloat16)
    x = torch.randn(batch, c, hw, hw, generator=gen).to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
    ho = (hw - 1) // stride + 1
    dy = torch.randn(batch, n, ho, ho, generator=gen).to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
    conv = ((stride, stride), (1, 1, 1, 1), (1, 1), 1)
    return mask, [lambda: tb.forward(x, packed, None, mask, *conv),
                  lambda: tb.grad_input(dy, packed, mask, x.shape, *conv),
                  lambda: tb.grad_weight(dy, x, packed, mask, *conv)]


def test_plan_holds_every_tile_width_and_configuration_once(precompile):
    mask, calls = _calls()
    jobs = precompile.plan(calls)
    kernels = _triton_runtime.check_kernels()
    by_kernel = {}
    for job in jobs:
        by_kernel.setdefault(job.kernel, []).append(job)
    # (no TMA grad input: it is offered for 64 input channels and more)
    assert set(by_kernel) == {"stripe_fwd_kernel", "stripe_fwd_sub_kernel", "stripe_fwd_tma_kernel", "stripe_dgrad_kernel",
                              "stripe_wgrad_kernel", "stripe_dgrad_tiles_kernel", "stripe_wgrad_tiles_kernel",
                              "stripe_wgrad_tiles_tma_kernel", "stripe_gather_columns_kernel",
                              "stripe_scatter_rows_kernel"}  # (the forward's tile-major weight)
    # every tile width the first call on a GPU times, each under every configuration of the tuner
    widths = {plan.block_n for plan in tb.forward_plans(mask, 1, torch.device("cpu"))}
    assert len(widths) > 1
    assert {job.kwargs["BLOCK_N"] for job in by_kernel["stripe_fwd_kernel"]} == widths
    # each way of storing a tile (vector runs, scatter, NCHW planes), of reading its weights (row table or
    # tile-major), the split-K candidate (few pixels) and the channel-major loop is its own variant of a width
    variants = {(job.kwargs["BLOCK_N"], job.kwargs["STORE"], job.kwargs["SPLIT_K"], job.kwargs["ROW_RUNS"],
                 job.kwargs["CHANNEL_MAJOR"]) for job in by_kernel["stripe_fwd_kernel"]}
    channel_major = sum(variant[-1] for variant in variants)
    assert channel_major
    # (the forward's tuner times the one-stage configurations for the channel-major loop, the staged ones
    # otherwise, and of those one of the two pixel-count-specific ones: BLOCK_M 32 or 256)
    configs = kernels.stripe_fwd_kernel.configs
    one_stage = sum(c.num_stages == 1 for c in configs)
    assert len(by_kernel["stripe_fwd_kernel"]) == (channel_major * one_stage
                                                   + (len(variants) - channel_major) * (len(configs) - one_stage - 1))
    # the subtile forward of every width whose tiles it groups, under each of its configurations
    grouped = {(plan.block_n, tb.subtile_count(plan, 1)) for plan in tb.forward_plans(mask, 1, torch.device("cpu"))
               if tb.subtile_count(plan, 1) > 1}
    assert grouped and {(job.kwargs["BLOCK_N"], job.kwargs["SUB"]) for job in by_kernel["stripe_fwd_sub_kernel"]} == grouped
    sub_variants = {(job.kwargs["BLOCK_N"], job.kwargs["SUB"], job.kwargs["STORE"])
                    for job in by_kernel["stripe_fwd_sub_kernel"]}  # (a width's tiles clustered and in order)
    assert len(by_kernel["stripe_fwd_sub_kernel"]) == len(sub_variants) * len(kernels.stripe_fwd_sub_kernel.configs)
    # the TMA forward (stride 1, channels_last) of every width, its descriptor recorded by dtype and box
    tma = by_kernel["stripe_fwd_tma_kernel"]
    assert {job.kwargs["BLOCK_N"] for job in tma} == widths
    assert {job.args[1] for job in tma} == {precompile._DescriptorArg(torch.bfloat16, (1, 8, 1, 8, 32))}
    assert not any(job.kernel == "stripe_fwd_tma_kernel" for job in precompile.plan(calls, tma=False))
    assert {job.config["BLOCK_M"] for job in by_kernel["stripe_dgrad_kernel"]} == {
        c.kwargs["BLOCK_M"] for c in kernels.stripe_dgrad_kernel.configs}
    # the same calls again: nothing new
    assert len(precompile.plan(calls + calls)) == len(jobs)
    # the settled calls of this process are left as they were
    before = dict(tb._settled)
    precompile.plan(calls)
    assert tb._settled == before


def test_plan_holds_the_tma_grad_input_of_wide_tiles(precompile):
    """At density 1 over 64 channels the backward's tiles are 64 filters wide or more: the TMA grad input is
    offered, its descriptor of dy recorded with the tile width as the box's channels."""
    mask, calls = _calls(c=64, n=64, density=1.0)
    jobs = [job for job in precompile.plan(calls) if job.kernel == "stripe_dgrad_tiles_tma_kernel"]
    assert jobs and all(job.kwargs["BLOCK_T"] == job.args[0].block_shape[3] for job in jobs)
    assert {job.args[0] for job in jobs} <= {precompile._DescriptorArg(torch.bfloat16, (1, 8, 8, width))
                                             for width in (64, 128)}
    assert not any(job.kernel.endswith("_tma_kernel") for job in precompile.plan(calls, tma=False))


def test_plan_holds_the_tma_grad_weight_with_its_two_descriptors(precompile):
    """The TMA grad weight's jobs record x's box (the forward's parity view) and dy's: a 2-d box of BLOCK_M
    consecutive pixels where the rectangles are whole rows of dy (8 x 8 pixels: 8 rows of 8), else a 4-d one."""
    for hw, stride, rows in ((8, 1, True), (10, 1, False), (12, 2, False)):
        _, calls = _calls(hw=hw, stride=stride)
        jobs = [job for job in precompile.plan(calls) if job.kernel == "stripe_wgrad_tiles_tma_kernel"]
        assert jobs and {job.kwargs["DY_ROWS"] for job in jobs} == {rows}
        assert {job.kwargs["SH"] for job in jobs} == {stride}
        for job in jobs:
            dy_box, x_box = job.args[0].block_shape, job.args[1].block_shape
            block_m, tw, width = job.kwargs["BLOCK_M"], job.kwargs["TW"], job.kwargs["BLOCK_T"]
            assert x_box == (1, block_m // tw, 1, tw, 32)
            assert dy_box == ((block_m, width) if rows else (1, block_m // tw, tw, width))


def test_job_arguments_stand_in_for_tensors_and_descriptors(precompile):
    """A worker rebuilds each recorded argument as one that Triton specialises the same way: a tensor of its
    dtype, a tensor descriptor of its dtype and box."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    base = torch.empty(2, 8, 8, 32, dtype=torch.float16)
    recorded = (base, TensorDescriptor(base, list(base.shape), list(base.stride()), [1, 4, 8, 32]), 7)
    job_args = tuple(map(precompile._job_arg, recorded))
    assert job_args == (precompile._TensorArg(torch.float16), precompile._DescriptorArg(torch.float16, (1, 4, 8, 32)), 7)
    tensor, descriptor, seven = (precompile._launch_arg(a, "cpu") for a in job_args)
    assert tensor.dtype == torch.float16 and seven == 7
    assert isinstance(descriptor, TensorDescriptor) and descriptor.base.dtype == torch.float16
    assert list(descriptor.block_shape) == [1, 4, 8, 32]


def test_plan_of_a_new_geometry_adds_jobs(precompile):
    _, calls = _calls()
    _, strided = _calls(stride=2, seed=1)
    jobs, more = precompile.plan(calls), precompile.plan(calls + strided)
    assert len(more) > len(jobs)


def _fake_compile(job):
    if job.config.get("BLOCK_M") == 64:
        raise RuntimeError("out of resources")
    return 0.5


def test_precompile_counts_failures_and_time(precompile):
    _, calls = _calls()
    jobs = precompile.plan(calls)
    stats = precompile.precompile(jobs, workers=0, compile_one=_fake_compile)
    failing = sum(job.config.get("BLOCK_M") == 64 for job in jobs)
    assert 0 < failing < len(jobs)
    assert stats["jobs"] == len(jobs) and stats["failed"] == failing
    assert stats["compile_s"] == pytest.approx(0.5 * (len(jobs) - failing))
    assert "out of resources" in stats["errors"][0]


def test_precompile_in_worker_processes_reports_what_failed(precompile):
    """The spawned workers load the kernels and run each job; without a GPU driver every job fails,
    which is reported, not raised (with one, every job compiles)."""
    _, calls = _calls()
    jobs = precompile.plan(calls)[:3]
    stats = precompile.precompile(jobs, workers=2, compile_one=functools.partial(precompile._compile, device="cpu"))
    expected_failures = 0 if torch.cuda.is_available() else 3
    assert stats["workers"] == 2 and stats["jobs"] == 3 and stats["failed"] == expected_failures, stats
    assert all("BrokenProcessPool" not in error for error in stats["errors"]), stats


def test_kernels_load_from_a_source_checkout():
    """Without the installed stripeconv.kernels package, the modules load from kernels/ beside stripeconv/."""
    code = textwrap.dedent("""
        import importlib.abc, sys

        class NoInstalledKernels(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path, target=None):
                if name == "stripeconv.kernels":
                    raise ModuleNotFoundError(f"No module named {name!r}", name=name)

        sys.meta_path.insert(0, NoInstalledKernels())
        from stripeconv.backends import triton_backend as tb
        module = tb.kernels_module("precompile")
        print(module.__name__, sys.modules["stripeconv.kernels"].__path__[0].endswith("kernels"))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["stripeconv.kernels.precompile", "True"]


def test_precompiled_variants_are_loaded_not_compiled(precompile, tmp_path, monkeypatch):
    """On a GPU: after precompile, the first forward and backward of a new shape compile nothing
    (every variant its autotuning and tile-width choice launch comes from Triton's on-disk cache)."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    from stripeconv import StripeConv2d

    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("STRIPECONV_GPU_DENSE", "never")
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    mask, calls = _calls(c=48, n=80, hw=10, density=0.37, batch=3, seed=11)  # a shape no other test uses
    tma = torch.cuda.get_device_capability()[0] >= 9
    stats = precompile.precompile(precompile.plan(calls, sm_count=sms, tma=tma), workers=4)
    assert stats["failed"] == 0, stats
    compiled = precompile.compiled_count(str(tmp_path))
    assert compiled == stats["jobs"]
    layer = StripeConv2d(48, 80, 3, padding=1, bias=False, stripe_mask=mask).cuda().to(torch.bfloat16)
    x = torch.randn(3, 48, 10, 10, device="cuda", dtype=torch.bfloat16).contiguous(
        memory_format=torch.channels_last).requires_grad_(True)
    gy = torch.randn(3, 80, 10, 10, device="cuda", dtype=torch.bfloat16).contiguous(memory_format=torch.channels_last)
    layer(x).backward(gy)
    torch.cuda.synchronize()
    assert precompile.compiled_count(str(tmp_path)) == compiled
