"""Host side of the Triton backend, no kernel run: availability, the tile plans and their metadata,
the launch decisions (index width, precision, settled calls, the candidates offered), and compiles
of the kernels for sm_80 / sm_90 on a machine without a GPU (registers, spills, tensor cores).

The kernels' results are checked in test_triton.py."""
from __future__ import annotations

import os
import re

import pytest

try:
    import triton  # noqa: F401
except Exception as exc:  # pragma: no cover - depends on the environment
    pytest.skip(f"triton is not importable ({exc}); the Triton backend is not tested", allow_module_level=True)

import torch

from stripeconv.backends import _triton_backward_tiles, _triton_forward, _triton_runtime, _triton_shapes

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


def _ptx_recorded(monkeypatch) -> list:
    """A list that gets the PTX of every kernel compiled from now on (``triton.compile`` wrapped)."""
    import triton

    ptx = []
    compile_ = triton.compile

    def recording(*args, **kwargs):
        compiled = compile_(*args, **kwargs)
        ptx.append(compiled.asm["ptx"])
        return compiled
    monkeypatch.setattr(triton, "compile", recording)
    return ptx


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
        w_arg, rows_arg = launch.args[1], launch.args[10]
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
    assert all(a is b for a, b in zip(first.args[6:11], second.args[6:11]))  # the plan's tables
    assert first.args[11:] == second.args[11:] and first.kwargs == second.kwargs
    x, weight = nchw(), torch.randn(int(mask.sum()), 32, generator=gen)
    launch = call(x, weight=weight)
    assert len(tb._settled) == 1
    assert torch.equal(launch.args[0], x) and launch.args[0].is_contiguous(memory_format=torch.channels_last)
    assert launch.args[1] is weight and launch.args[10] is first.args[10]

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
    assert launch.args[10] is not old_rows and torch.equal(launch.args[10], tb.forward_plans(mask, 1, "cpu")[0].w_rows)
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


def test_a_settled_call_makes_few_python_calls(settled_calls):
    """A settled call's host path stays a short chain of the package's Python functions: on CPython 3.11
    and 3.12 each one may cost an mmap and a munmap of the frame stack on every call, and the most at one
    depth set that cost where the caller's depth puts a chunk's end among them (docs/backends.md, "Host
    work and the frame stack"). bf16, as on a GPU (fp32 calls also read the TF32 setting)."""
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
    from profile_summary import python_frames

    import stripeconv

    aot, tb = settled_calls
    gen = torch.Generator().manual_seed(5)
    mask = torch.rand(32, 3, 3, generator=gen) < 0.5
    geometry = ([1, 1], [1, 1, 1, 1], [1, 1], 1)
    nhwc = lambda *shape: torch.randn(*shape, generator=gen).to(torch.bfloat16).contiguous(  # noqa: E731
        memory_format=torch.channels_last)
    x, gy, w = nhwc(2, 16, 8, 8), nhwc(2, 32, 8, 8), torch.randn(int(mask.sum()), 16, generator=gen).bfloat16()
    calls = {"forward": lambda: tb.forward(x, w, None, mask, *geometry),
             "grad input": lambda: tb.grad_input(gy, w, mask, list(x.shape), *geometry),
             "grad weight": lambda: tb.grad_weight(gy, x, w, mask, *geometry)}
    package = os.path.dirname(stripeconv.__file__)
    for name, call in calls.items():
        aot.capture_launches(call)  # settles it
        frames = {}
        aot.capture_launches(lambda: frames.update(python_frames(call, within=package)))
        # entry, call key, settings, launch closure, the launch's __call__ and its way into the (stubbed) kernel
        assert frames["within_frames"] <= 7 and frames["within_most_at_one_depth"] <= 2, (name, frames)

def test_a_dense_choice_runs_the_fastest_stripe_kernel_under_capture(settled_calls, monkeypatch):
    """The dense hand-over keeps its scattered weight between eager calls, but a CUDA graph replays the
    scatter: where dense wins only with the weight kept, a call captured into a graph runs the stripe
    kernel that is fastest under capture, and eager calls keep running dense (forward and grad input)."""
    aot, tb = settled_calls
    from stripeconv.backends import _triton_runtime, gpu_select

    dense_launcher = tb._dense_launcher

    def timed_dense(*args, keep=True, **kwargs):  # dense: 1 ms with its weight kept, 3 ms scattering it
        launch = dense_launcher(*args, keep=keep, **kwargs)

        def dense(*call_args):
            return launch(*call_args)
        dense.ms = 1.0 if keep else 3.0
        return dense

    def timer(fn, repeats=5):  # every stripe kernel 2 ms: the first one wins
        fn()
        if fn.func.__qualname__ == "_first_grad_input.<locals>.dense":  # its captured variant passes keep=False
            return 1.0 if fn.keywords.get("keep", True) else 3.0
        return getattr(fn.func, "ms", 2.0)
    monkeypatch.setattr(tb, "_dense_launcher", timed_dense)
    monkeypatch.setattr(gpu_select, "_TIMED_DEVICES", ("cuda", "cpu"))
    monkeypatch.setattr(gpu_select, "_time_ms", timer)
    monkeypatch.setattr(gpu_select, "disagreement", lambda result, reference: 0.0)  # stubbed launches compute nothing
    capturing = []
    monkeypatch.setattr(_triton_runtime, "capturing", lambda tensor: bool(capturing))
    gpu_select.clear()

    gen = torch.Generator().manual_seed(4)
    mask = torch.rand(32, 3, 3, generator=gen) < 0.5
    geometry = ([1, 1], [1, 1, 1, 1], [1, 1], 1)
    x = torch.randn(2, 16, 8, 8, generator=gen).contiguous(memory_format=torch.channels_last)
    gy = torch.randn(2, 32, 8, 8, generator=gen).contiguous(memory_format=torch.channels_last)
    weight = torch.randn(int(mask.sum()), 16, generator=gen)

    def launches():
        return aot.capture_launches(lambda: (tb.forward(x, weight, None, mask, *geometry),
                                             tb.grad_input(gy, weight, mask, list(x.shape), *geometry)))
    launches()  # decided: every candidate timed
    decided = {d["key"][0]: d for d in gpu_select.decisions()}
    for op in ("fwd", "dgrad"):
        stripes = [name for name in decided[op]["times_ms"] if name != "dense"]
        assert decided[op]["choice"] == "dense" and decided[op]["captured_choice"] == stripes[0]
        # (and the forward's tile-major variants, whose weight a graph's replay makes anew: 2 ms as timed here)
        assert decided[op]["captured_times_ms"] == {"dense": 3.0, **{name: 2.0 for name in stripes
                                                                     if name.endswith("_wtiles")}}
    assert launches() == []  # eager: the dense conv (on CPU here), no kernel
    capturing.append(True)
    forward, dgrad = launches()
    assert forward.name == "stripe_fwd_kernel" and forward.args[0] is x and forward.args[1] is weight
    assert dgrad.name.startswith("stripe_dgrad") and dgrad.args[0] is gy
    assert len(tb._settled) == 2
    capturing.clear()
    assert launches() == []


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


def test_tile_backward_compiles_for_hopper_with_dy_gathered_or_in_place(monkeypatch):
    """The tile gradient kernels compile for sm_90 without spilling, both on wgmma (grad weight with the
    narrow tiles of a density-0.3 mask too), reading dy gathered into tile order for a random mask and
    in place once its filters are in tile order; the kernels by position read their dy columns (runs of a
    tile's width through a table) as 16-byte copies, as the kernels over tiles do."""
    aot = _aot()
    from stripeconv import packing
    from stripeconv.backends import triton_backend as tb
    from stripeconv.backends.triton_plans import filter_order

    ptx = _ptx_recorded(monkeypatch)

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
        # every grad input candidate over the tiles gathers dy; the last one's copy serves the first grad weight
        # candidate, and each further one (three positions a program, the TMA one where offered: only while
        # candidates are timed) gathers again
        gathers = (names.count("stripe_dgrad_tiles_kernel") + names.count("stripe_wgrad_tiles_tma_kernel")
                   + names.count("stripe_wgrad_tiles_kernel") - 1)
        assert names.count("stripe_gather_columns_kernel") == (0 if ordered else gathers), names
        tiles = [launch for launch in launches if launch.name.endswith("_tiles_kernel")]
        # (the grad input through L1 loads without staged copies: test_l1_candidates_compile_to_cached_loads...)
        through_l1 = [launch for launch in tiles if launch.kwargs.get("THROUGH_L1")]
        assert [(launch.kwargs["BLOCK_T"], launch.kwargs["ROW_RUNS"]) for launch in through_l1] == [(16, False)]
        tiles = [launch for launch in tiles if not launch.kwargs.get("THROUGH_L1")]
        assert len(tiles) == 6, names
        # (grad input over the tiles twice: weights through the row table, and the tile-major weight as row runs)
        dgrad = sorted((launch.kwargs["BY_POSITION"], launch.kwargs["BLOCK_T"], launch.kwargs["ROW_RUNS"])
                       for launch in tiles if launch.name == "stripe_dgrad_tiles_kernel")
        assert dgrad == [(False, 16, False), (False, 16, True), (True, 64, False)], dgrad
        assert names.count("stripe_scatter_rows_kernel") == 1, names  # the tile-major weight, made once
        wgrad = sorted((launch.kwargs["PER"], launch.kwargs["BY_POSITION"], launch.kwargs["BLOCK_T"])
                       for launch in tiles if launch.name == "stripe_wgrad_tiles_kernel")
        assert wgrad == [(1, False, 16), (1, True, 64), (3, False, 16)], wgrad
        for launch in tiles:
            ptx.clear()
            variants = aot.compile_launch(launch, 90)
            assert any(v.spill_bytes == 0 for v in variants), [v.row() for v in variants]
            assert all(v.tensor_cores == "wgmma" for v in variants), [v.row() for v in variants]
            assert all(v.copies_in_flight >= 1 for v in variants), [v.row() for v in variants]
            # x, dy and the weights staged by vector copies, no 2-byte loads
            copies = {int(size, 16) for text in ptx
                      for size in re.findall(r"cp\.async\.\w+\.shared\.global \[[^]]*\], \[[^]]*\], (\w+)", text)}
            assert 0x10 in copies and min(copies) >= 8, (launch.name, launch.kwargs, copies)
            assert not any(re.search(r"ld\.global(\.\w+)*\.[bu]16", text) for text in ptx), launch.kwargs
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
        from stripeconv.backends._triton_runtime import tf32_matmul

        try:
            for precision, want in (("ieee", "ieee"), ("tf32", "tf32")):
                matmul.fp32_precision = precision
                (launch,) = aot.capture_launches(call)
                assert launch.kwargs["INPUT_PRECISION"] == want
            matmul.allow_tf32 = True  # the legacy flag, then the new API over it: its last word counts
            assert tf32_matmul()
            matmul.fp32_precision = "ieee"
            assert not tf32_matmul()
            matmul.fp32_precision = "tf32"
            assert tf32_matmul()
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
    """Grad input leaves its gathered dy for grad weight: the same tensor, version, plan and capture state
    only, once; grad input itself always gathers."""
    from stripeconv.backends import triton_backend as tb

    gathers = []
    monkeypatch.setattr(_triton_backward_tiles, "gather_dy", lambda dy, launch: gathers.append(dy) or torch.zeros(1))
    monkeypatch.setattr(_triton_backward_tiles, "_last_gather", None)
    plan, other_plan = object(), object()
    dy = torch.ones(2, 3)
    first = _triton_backward_tiles.gathered_dy(dy, plan, True, None)
    kept = _triton_backward_tiles.gathered_dy(dy, plan, True, None)  # the same dy again: gathered again
    assert kept is not first and len(gathers) == 2
    # grad weight reuses the last one
    assert _triton_backward_tiles.gathered_dy(dy, plan, False, None) is kept and len(gathers) == 2
    _triton_backward_tiles.gathered_dy(dy, plan, False, None)  # taken once: a third call gathers again
    assert len(gathers) == 3 and _triton_backward_tiles._last_gather is None
    # a copy gathered outside a CUDA graph capture is not read inside one, nor the other way round
    for before, after in ((False, True), (True, False)):
        monkeypatch.setattr(_triton_backward_tiles.runtime, "capturing", lambda t: before)
        _triton_backward_tiles.gathered_dy(dy, plan, True, None)
        monkeypatch.setattr(_triton_backward_tiles.runtime, "capturing", lambda t: after)
        assert _triton_backward_tiles.gathered_dy(dy, plan, False, None) is not None
    assert len(gathers) == 7
    monkeypatch.setattr(_triton_backward_tiles.runtime, "capturing", lambda t: True)  # both inside: shared
    kept = _triton_backward_tiles.gathered_dy(dy, plan, True, None)
    assert _triton_backward_tiles.gathered_dy(dy, plan, False, None) is kept and len(gathers) == 8
    monkeypatch.setattr(_triton_backward_tiles.runtime, "capturing", lambda t: False)
    gathers.clear()
    for changed in (lambda: dy.clone(), lambda: dy.add_(1)):  # another tensor, or the same one written to
        _triton_backward_tiles.gathered_dy(dy, plan, True, None)
        probe = changed()
        _triton_backward_tiles.gathered_dy(probe if probe is not dy else dy, plan, False, None)
    _triton_backward_tiles.gathered_dy(dy, plan, True, None)
    _triton_backward_tiles.gathered_dy(dy, other_plan, False, None)
    assert len(gathers) == 6 and _triton_backward_tiles._last_gather is None
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


def test_balanced_tiles_shorten_the_longest_union_within_the_budget():
    """For few output pixels every forward program runs at once and the longest tile sets the time: the
    balanced plans hold every filter once, in at most the budget's tiles, with a shorter longest union than
    the clustered plan of their width (which leaves one tile of about every position at density 0.1);
    none where the budget leaves no room or every tile already holds every position."""
    from stripeconv.backends import _tile_clustering as clustering
    from stripeconv.backends import triton_plans as tp

    g = torch.Generator().manual_seed(0)
    mask = torch.rand(512, 3, 3, generator=g) < 0.1
    clustered = {p.block_n: p for p in tp.forward_plans(mask, 1, "cpu") if not p.in_order}
    plans = tp.balanced_plans(mask, 1, "cpu", 132)
    assert {p.block_n for p in plans} == set(clustered), (sorted(clustered), [p.block_n for p in plans])
    most = int(mask.reshape(512, -1).sum(1).max())
    for plan in plans:
        base = clustered[plan.block_n]
        assert plan.balanced and not base.balanced and base.umax == 9
        assert most <= plan.umax < base.umax and base.num_tiles < plan.num_tiles <= 132
        channels = plan.tile_ch[plan.tile_ch >= 0]
        assert sorted(channels.tolist()) == list(range(512)) and plan.kept == base.kept
        assert plan.computed == int(plan.tile_npos.sum()) * plan.block_n > base.computed
        assert plan.tile_npos.tolist() == sorted(plan.tile_npos.tolist(), reverse=True)  # longest first
    assert tp.balanced_plans(mask, 1, "cpu", 8) == []  # every width's clustering has 8 tiles or more
    assert tp.balanced_plans(torch.ones(64, 3, 3, dtype=torch.bool), 1, "cpu", 132) == []
    grouped = tp.balanced_plans(torch.rand(64, 3, 3, generator=g) < 0.3, 2, "cpu", 64)
    for plan in grouped:  # a tile holds one group's filters
        for row, group in zip(plan.tile_ch.tolist(), plan.tile_grp.tolist()):
            assert {f // 32 for f in row if f >= 0} == {group}
    # the two ways: splitting a tile in two shortens it unless one filter keeps its whole union
    pat = (torch.rand(16, 9, generator=g) < 0.3).numpy()
    pat[:, 4] = True
    first, second = clustering.halves(pat)
    assert sorted(first + second) == list(range(16))
    assert max(pat[first].any(0).sum(), pat[second].any(0).sum()) < pat.any(0).sum()
    pat[:, 8] = False
    tiles = clustering.capped(pat, 1, 4, 8)  # capped sets: no tile's union wider than the fewest that fit 8 tiles
    longest = max(pat[t].any(0).sum() for t in tiles)
    assert len(tiles) <= 8 and sorted(f for t in tiles for f in t) == list(range(16)) and longest < 8
    fewest = int(pat.sum(1).max())  # no cap below what one filter keeps
    assert longest == fewest or len(clustering.tiles_by_subsets(pat, 4, int(longest) - 1)) > 8
    assert len(clustering.capped(pat, 1, 4, 16)) <= 16 and clustering.capped(pat, 1, 4, 2) is None
    pat[0] = pat.any(0)
    assert clustering.halves(pat) is None and clustering.halves(pat[:1]) is None
    pat[0, 8] = True  # a filter keeps every position: no cap below the kernel's size
    assert clustering.capped(pat, 1, 16, 16) is None


def _forward_pools_recorded(monkeypatch) -> list:
    """A list that gets the sorted candidate names of each forward choice made from now on."""
    from stripeconv.backends import gpu_select

    offered, choice = [], gpu_select.choice

    def record(key, candidates, device, captured=None):
        if key[0] == "fwd":
            offered.append(sorted(candidates))
        return choice(key, candidates, device, captured)
    monkeypatch.setattr(gpu_select, "choice", record)
    return offered


def test_balanced_tiles_are_offered_for_few_pixels_only(monkeypatch):
    """A batch-1 layer whose tiles all run at once gets the balanced forward candidates; a batch that
    fills the GPU many times over does not."""
    aot = _aot()
    from stripeconv.backends import triton_backend as tb

    offered = _forward_pools_recorded(monkeypatch)
    for batch, balanced in ((1, True), (64, False)):
        tb.clear_cache()
        offered.clear()
        label, call = aot.layer_calls(512, 512, 7, density=0.1, dtype=torch.bfloat16, batch=batch)[0]
        aot.capture_launches(call)
        assert any(name.endswith("_balanced") for name in offered[0]) == balanced, (label, offered)
    tb.clear_cache()


def test_default_pool_leaves_out_the_variants_that_never_won(monkeypatch):
    """By default the forward offers no subtile variant and no TMA variant storing scattered channels (on
    the H100 runs never within 14 % of the fastest); STRIPECONV_TRITON_CANDIDATES=all offers them, and
    the setting is part of the settled call's key."""
    aot = _aot()
    from stripeconv.backends import gpu_select
    from stripeconv.backends import triton_backend as tb

    offered = _forward_pools_recorded(monkeypatch)
    label, call = aot.layer_calls(128, 128, 16, density=0.2, dtype=torch.bfloat16, batch=16)[0]
    pools = {}
    for setting in ("default", "all"):
        monkeypatch.setenv("STRIPECONV_TRITON_CANDIDATES", setting)
        offered.clear()
        aot.capture_launches(call, tma=True)  # settles the call: a second one would not choose again
        pools[setting] = set(offered[0])
    subtile = re.compile(r"stripe\d+x\d+")
    scattered_tma = re.compile(r"stripe\d+_tma$")
    assert not [name for name in pools["default"] if subtile.match(name) or scattered_tma.match(name)], pools
    assert any(subtile.match(name) for name in pools["all"]) and any(scattered_tma.match(name) for name in pools["all"])
    assert pools["default"] < pools["all"]
    assert {name for name in pools["default"] if "_tma" in name}, pools  # the tile-order TMA forward stays
    monkeypatch.setenv("STRIPECONV_TRITON_CANDIDATES", "some")
    with pytest.raises(ValueError, match="STRIPECONV_TRITON_CANDIDATES must be 'default' or 'all', got 'some'"):
        gpu_select.every_candidate()
    tb.clear_cache()


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
        staged = sum(c.num_stages > 1 for c in tuner.configs)  # (the one-stage ones: the channel-major loop's)
        assert kept in timed and dropped not in timed and len(timed) == staged - 1, (label, timed)
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
    Both compile for sm_90 on wgmma without spilling: one and three union positions a program, and one
    position for the tiles that keep it."""
    aot = _aot()
    seen = set()
    for batch in (1, 8):
        label, call = aot.layer_calls(128, 128, 16, density=0.3, dtype=torch.bfloat16, batch=batch)[2]
        launches = [launch for launch in aot.capture_launches(call, every_candidate=True)
                    if launch.name == "stripe_wgrad_tiles_kernel"]
        # the clustered tiles (16 wide) and the tiles of consecutive filters (64 wide), each one and three positions
        # a program and by position (two and four tiles side by side)
        by_position = [launch.kwargs["BY_POSITION"] for launch in launches]
        assert sorted((launch.kwargs["RUN"] if by else launch.kwargs["BLOCK_T"], launch.kwargs["BLOCK_T"],
                       launch.kwargs["PER"]) for launch, by in zip(launches, by_position)) == [
            (16, 16, 1), (16, 16, 3), (16, 32, 1), (64, 64, 1), (64, 64, 3), (64, 128, 1)], label
        for launch in launches:
            atomic = launch.kwargs["ATOMIC"]
            assert launch.args[2].dtype == (torch.float32 if atomic else torch.bfloat16)
            for v in aot.compile_launch(launch, 90):
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
    # 128 filters: every narrower width's tiles in one group of 128 columns (the 128-wide tiles of
    # consecutive filters are a single tile); the 8-wide tiles in groups of 8
    assert len(widths) > 1 and {(launch.kwargs["BLOCK_N"], launch.kwargs["SUB"]) for launch in subs} == {
        (w, 128 // w) for w in widths if w < 128} | {(8, 8)}
    for launch in subs:
        for v in aot.compile_launch(launch, 90):
            # dots 8 columns wide: wgmma from triton 3.9 on (triton 3.6: mma.sync)
            wgmma = v.tensor_cores == "wgmma" or (launch.kwargs["BLOCK_N"] == 8 and v.tensor_cores == "mma")
            assert wgmma and v.spill_bytes == 0, (label, v.row())


def test_narrow_tiles_join_where_they_compute_fewer_stripes(monkeypatch):
    """8-wide tiles (subtile forward only) are offered where they compute at least 10 % fewer stripes than
    the offered widths: random masks at low density, not dense ones, narrow layers or a pinned width.
    filter_order orders each tile's filters into clustered runs of 8, so that after it the 8-wide tiles of
    consecutive filters (vector stores) do about the work of the clustered ones, and the wider widths'
    tiles compute what they computed before."""
    from stripeconv.backends import triton_plans as tp

    monkeypatch.delenv("STRIPECONV_TRITON_BLOCK_N", raising=False)
    kept = computed = computed_runs = 0
    for seed in range(3):
        mask = torch.rand(256, 3, 3, generator=torch.Generator().manual_seed(seed)) < 0.2
        best = min(p.computed for p in tp.forward_plans(mask, 1, "cpu"))
        (narrow,) = tp.narrow_plans(mask, 1, "cpu")
        assert narrow.block_n == 8 and narrow.computed < 0.9 * best and tp.subtile_count(narrow, 1) == 8
        reordered = mask[tp.filter_order(mask)]
        assert min(p.computed for p in tp.forward_plans(reordered, 1, "cpu")) <= best
        runs = [p for p in tp.narrow_plans(reordered, 1, "cpu") if p.aligned]
        assert runs and runs[0].in_order
        kept, computed = kept + int(mask.sum()), computed + narrow.computed
        computed_runs += runs[0].computed
    assert computed_runs <= 1.1 * computed and kept / computed > 0.6  # 16-wide tiles: ~0.5
    assert tp.narrow_plans(torch.ones(256, 3, 3, dtype=torch.bool), 1, "cpu") == []
    assert tp.narrow_plans(torch.rand(12, 3, 3, generator=torch.Generator().manual_seed(0)) < 0.2, 1, "cpu") == []
    monkeypatch.setenv("STRIPECONV_TRITON_BLOCK_N", "16")
    assert tp.narrow_plans(torch.rand(256, 3, 3, generator=torch.Generator().manual_seed(0)) < 0.2, 1, "cpu") == []


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
    label, call = aot.layer_calls(128, 128, 16, density=0.5, dtype=torch.bfloat16, batch=128)[0]
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
    """A kernel that adds atomically into a buffer (grad weight; the split-K forward's counts of arrived
    splits) runs several times while its tuner times configurations: the tuner must zero the buffer before
    each run and before the launch whose result counts, or the first call of a shape returns a multiple of
    the answer (or, for the counts, no split finds itself last)."""
    import inspect

    _aot()
    kernels = _triton_runtime.check_kernels()
    adds_into = {"stripe_fwd_kernel": "count_ptr", "stripe_wgrad_kernel": "dw_ptr",
                 "stripe_wgrad_tiles_kernel": "dw_ptr", "stripe_wgrad_tiles_tma_kernel": "dw_ptr"}
    tuned = [name for name in dir(kernels) if name.endswith("_kernel") and hasattr(getattr(kernels, name), "configs")]
    for name in tuned:
        tuner = getattr(kernels, name)
        # (_store_wgrad_tile adds atomically for the grad weights, _split_k_sum counts the forward's splits)
        source = inspect.getsource(tuner.fn.fn)
        atomic = any(call in source for call in ("tl.atomic_add(", "_store_wgrad_tile(", "_split_k_sum("))
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


def test_tiles_of_consecutive_filters_join_the_backward_where_the_clustered_tiles_gather_dy(monkeypatch):
    """Beside the tile backward over the fewest stripes, whose clustered tiles gather dy, the tiles of
    consecutive filters at the forward's first width read dy in place; where the fewest-stripe tiles are
    runs of channels already (a dense mask) nothing joins."""
    from stripeconv.backends import triton_plans as tp

    monkeypatch.delenv("STRIPECONV_TRITON_BLOCK_N", raising=False)
    conv = ((1, 1), (1, 1, 1, 1), (1, 1))
    mask = torch.rand(128, 3, 3, generator=torch.Generator().manual_seed(3)) < 0.3
    weight = torch.empty(int(mask.sum()), 64, dtype=torch.bfloat16)
    clustered = _triton_backward_tiles.backward_tiles(mask, weight, 64, 1, *conv, "cpu")
    runs = _triton_backward_tiles.backward_tiles_in_place(clustered, mask, 1, *conv, "cpu")
    assert not clustered.fwd.runs and runs.fwd.runs and runs.fwd.in_order
    assert runs.fwd.block_n == tp.forward_plans(mask, 1, "cpu")[0].block_n
    assert runs.fwd.kept == clustered.fwd.kept == int(mask.sum()) and runs.fwd.computed > clustered.fwd.computed
    signature = _triton_backward_tiles.tiles_signature(clustered, runs)
    assert signature == ((clustered.fwd.block_n, clustered.fwd.computed, False), (runs.fwd.block_n, runs.fwd.computed,
                                                                                   True))
    dense = torch.ones(128, 3, 3, dtype=torch.bool)
    weight = torch.empty(128 * 9, 64, dtype=torch.bfloat16)
    dense_tiles = _triton_backward_tiles.backward_tiles(dense, weight, 64, 1, *conv, "cpu")
    assert dense_tiles.fwd.runs
    assert _triton_backward_tiles.backward_tiles_in_place(dense_tiles, dense, 1, *conv, "cpu") is None


def test_tile_order_columns_invert_the_tiles():
    """``order_cols`` names each channel's column in tile order (the gather after a tile-order store): the
    inverse of the tile tables, for clustered, in-order, grouped, balanced and subtile plans."""
    from stripeconv.backends import triton_plans as tp

    gen = torch.Generator().manual_seed(4)
    mask = torch.rand(96, 3, 3, generator=gen) < 0.3
    mask[5] = False  # a filter without stripes still has a column (its bias)
    plans = [tp.forward_plan(mask, groups, width) for groups in (1, 2) for width in (16, 32)]
    plans += tp.forward_plans(mask, 1, "cpu") + tp.balanced_plans(mask, 2, "cpu", 64)
    for plan in plans:
        tables = [(plan.tile_ch, plan.order_cols)]
        if tp.subtile_count(plan, 1) > 1:
            sub = tp.subtile_plan(plan, mask, 1, "cpu")
            tables.append((sub.sup_ch, sub.order_cols))
        for table, cols in tables:
            assert (cols >= 0).all() and (table.flatten()[cols.long()] == torch.arange(96)).all(), plan.block_n


def test_tile_order_stores_are_offered_for_scattered_columns_and_compile_to_vector_stores(monkeypatch):
    """Where a plan's columns are in no channel order and the output is channels_last, the plain, subtile
    and TMA forwards are offered once more storing tile order (followed by the column gather); their sm_90
    compiles store 16-byte vectors, without spills, where the scattering variants store 2-byte elements."""
    aot = _aot()
    from stripeconv.backends import triton_backend as tb

    ptx = _ptx_recorded(monkeypatch)

    def launches(channels_last):
        label, call = aot.layer_calls(128, 128, 16, density=0.2, dtype=torch.bfloat16, batch=16,
                                      channels_last=channels_last)[0]
        tb.clear_cache()
        return aot.capture_launches(call, every_candidate=True, tma=True)
    assert not [launch for launch in launches(False) if launch.kwargs.get("STORE") == 3]  # NCHW: planes
    every = launches(True)
    tiled = [launch for launch in every if launch.kwargs.get("STORE") == 3]
    assert {launch.name for launch in tiled} == {"stripe_fwd_kernel", "stripe_fwd_sub_kernel", "stripe_fwd_tma_kernel"}
    assert "stripe_gather_columns_kernel" in {launch.name for launch in every}
    # as many tile-order forwards reading the row table as scattering ones (STORE 0; no split-K or balanced tiles
    # for 4096 pixels), and as many again reading the tile-major weight (plain and TMA forwards), and one
    # channel-major loop a plain scattering one that multiplies on tensor cores
    channel_major = [launch for launch in tiled if launch.kwargs.get("CHANNEL_MAJOR")]
    assert len(channel_major) == len([launch for launch in every if launch.name == "stripe_fwd_kernel"
                                      and launch.kwargs["STORE"] == 0 and launch.kwargs["SPLIT_K"] == 1
                                      and launch.kwargs["USE_DOT"]])
    by_rows = [launch for launch in tiled
               if not launch.kwargs.get("ROW_RUNS") and not launch.kwargs.get("CHANNEL_MAJOR")]
    assert len(by_rows) == len([launch for launch in every if launch.kwargs.get("STORE") == 0
                                and launch.kwargs.get("SPLIT_K", 1) == 1])
    assert len(tiled) - len(by_rows) - len(channel_major) == len([launch for launch in by_rows
                                                                  if launch.name != "stripe_fwd_sub_kernel"])
    for launch in (next(launch for launch in tiled if launch.name == name) for name in
                   ("stripe_fwd_kernel", "stripe_fwd_sub_kernel", "stripe_fwd_tma_kernel")):
        scattering = next(other for other in every if other.name == launch.name and other.kwargs.get("STORE") == 0
                          and other.kwargs["BLOCK_N"] == launch.kwargs["BLOCK_N"]
                          and other.kwargs.get("SPLIT_K", 1) == 1)
        for stored, expected in ((launch, "st.global.v4.b32"), (scattering, "st.global.b16")):
            ptx.clear()
            variant = aot.compile_launch(stored, 90, configs=aot.tuned_configs(stored)[:1])[0]
            assert variant.spill_bytes == 0, variant.row()
            stores = set(re.findall(r"st\.global(?:\.[a-z0-9]+)*", ptx[-1]))
            assert stores == {expected}, (variant.row(), stores)


def test_tile_grad_weight_times_only_configurations_that_fit_shared_memory_and_registers():
    """Three positions a program stage a dy block and three x blocks: over 128-wide tiles that exceeds a block's
    shared memory at BLOCK_M = 128 with three stages, and their three fp32 accumulators need more registers than
    four warps have to spare, so the tuner tries eight warps over 64-pixel blocks alone; narrower tiles, or one
    position a program, keep the other configurations and leave that one out."""
    from stripeconv.kernels import _tuning

    if len(_tuning.WGRAD_TILES_CONFIGS) == 1:
        pytest.skip("TRITON_INTERPRET=1 in this process: one configuration, nothing to prune")

    def kept(**kwargs):
        return [(c.kwargs["BLOCK_M"], c.num_warps, c.num_stages) for c in
                _tuning.wgrad_tiles_configs_for(_tuning.WGRAD_TILES_CONFIGS, {}, BLOCK_C=64, **kwargs)]
    every = [(c.kwargs["BLOCK_M"], c.num_warps, c.num_stages) for c in _tuning.WGRAD_TILES_CONFIGS]
    assert (64, 8, 3) in every
    assert kept(PER=1, BLOCK_T=128) == kept(PER=3, BLOCK_T=64) == kept(PER=1, BLOCK_T=64) \
        == [cfg for cfg in every if cfg != (64, 8, 3)]
    assert kept(PER=3, BLOCK_T=128) == [(64, 8, 3)]
    for m, warps, stages in kept(PER=3, BLOCK_T=128):
        assert m * stages * (128 + 3 * 64) * 2 <= 227 * 1024 and 3 * 128 * 64 <= 128 * 32 * warps


def test_forward_times_one_stage_configurations_for_the_channel_major_loop_alone():
    """The channel-major forward (``_l1`` candidates) reads the input through L1, which Triton's staged copies
    (cp.async.cg) bypass: its tuner times the one-stage configurations, every other forward launch the staged
    ones, of which BLOCK_M = 32 only for few pixels and BLOCK_M = 256 only for many."""
    from stripeconv.kernels import _tuning

    if len(_tuning.FWD_CONFIGS) == 1:
        pytest.skip("TRITON_INTERPRET=1 in this process: one configuration, nothing to prune")

    def kept(**kwargs):
        return [(c.kwargs["BLOCK_M"], c.num_warps, c.num_stages) for c in
                _tuning.fwd_configs_for(_tuning.FWD_CONFIGS, {}, **kwargs)]
    for m in (1024, 1 << 20):
        one_stage = kept(KEY_M=m, CHANNEL_MAJOR=True)
        assert one_stage and all(stages == 1 for _, _, stages in one_stage)
        staged = kept(KEY_M=m, CHANNEL_MAJOR=False)
        assert staged and all(stages > 1 for _, _, stages in staged)
        assert {block_m for block_m, _, _ in staged} & {32, 256} == ({32} if m <= _tuning.SMALL_M else {256})
    assert kept(KEY_M=1024) == kept(KEY_M=1024, CHANNEL_MAJOR=False)
    # the tile grad input's: the same split by THROUGH_L1
    dgrad = [(c.num_stages == 1, flag) for flag in (True, False)
             for c in _tuning.through_l1_configs_for(_tuning.DGRAD_TILES_CONFIGS, {}, THROUGH_L1=flag)]
    assert dgrad and all(one_stage == flag for one_stage, flag in dgrad) and {f for _, f in dgrad} == {True, False}


def test_l1_candidates_compile_to_cached_loads_and_tensor_cores(monkeypatch):
    """The ``_l1`` candidates: sm_90 compiles of every one-stage configuration load the input (dy for the tile grad
    input) with L1-cached vector loads (no cp.async, whose 16-byte copies bypass L1) and multiply with wgmma,
    without spills, for an aligned plan (in place) and a scattered one (tile order)."""
    aot = _aot()
    from stripeconv.backends import triton_backend as tb

    ptx = _ptx_recorded(monkeypatch)
    (label, call), (_, grad_input_call) = aot.layer_calls(128, 128, 16, density=0.2, dtype=torch.bfloat16,
                                                          batch=16)[:2]
    tb.clear_cache()
    major = [launch for launch in aot.capture_launches(call, every_candidate=True)
             if launch.kwargs.get("CHANNEL_MAJOR")]
    assert {launch.kwargs["STORE"] for launch in major} == {1, 3}, label
    through_l1 = [launch for launch in aot.capture_launches(grad_input_call, every_candidate=True)
                  if launch.kwargs.get("THROUGH_L1")]
    assert through_l1 and {launch.name for launch in through_l1} == {"stripe_dgrad_tiles_kernel"}
    for launch in major + through_l1:
        for variant in aot.compile_launch(launch, 90):
            assert variant.config["num_stages"] == 1 and variant.tensor_cores == "wgmma", variant.row()
            assert variant.async_copies == 0 and variant.spill_bytes == 0, variant.row()
            assert "ld.global.ca.v4" in ptx[-1], variant.row()
