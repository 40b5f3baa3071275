"""Settled Triton launches repeat the call Triton makes into the compiled kernel's launcher.

Runs the real JIT path (binding, specialisation, compilation for sm_90 with the bundled ptxas,
cache lookup) with the GPU driver stubbed out (``stripeconv.kernels.aot.stub_driver``): the
launcher records its calls instead of launching, so each test compares what a direct launch hands
the launcher with what Triton's own path hands it for the same tensors.
"""
from __future__ import annotations

import contextlib

import pytest
import torch

from conftest import require_compiling_triton_kernels
from stripeconv.backends import _triton_runtime


@pytest.fixture
def tb():
    tb = require_compiling_triton_kernels()
    pytest.importorskip("triton.backends.compiler", reason="this triton has no GPUTarget to compile for")
    return tb


@pytest.fixture
def stub():
    from stripeconv.kernels import aot

    with aot.stub_driver() as (driver, calls):
        yield driver, calls


@contextlib.contextmanager
def _through_triton_counted(jit):
    """Counts the launches that go through ``jit``'s own launch path."""
    run, count = jit.run, []

    def counted(*args, **kwargs):
        count.append(1)
        return run(*args, **kwargs)
    jit.run = counted
    try:
        yield count
    finally:
        del jit.run


def _gather_launch(tb):
    """A settled launch of the (autotuner-free) gather kernel on [2, 8, 4, 4] channels_last tensors."""
    cols = torch.arange(16, dtype=torch.int32) % 9 - 1
    strides = torch.empty(2, 8, 4, 4).to(memory_format=torch.channels_last).stride()
    constants = dict(INT64_INDEX=False, BLOCK_M=64, BLOCK_N=64)
    return _triton_runtime.TunedLaunch("stripe_gather_columns_kernel", (1, 1), constants,
                                       bound=(cols, 32, 4, 4, 16, *strides))


def _gather_tensors(offset: int = 0):
    src = torch.randn(2 * 8 * 4 * 4 + offset)[offset:].view(2, 4, 4, 8).permute(0, 3, 1, 2)
    return src, torch.empty(32, 16)


def _same_call(direct: tuple, triton: tuple) -> None:
    """The launcher got the same grid, stream, function, metadata, hooks and (by identity) arguments;
    the launch metadata, which only launch hooks read, may differ."""
    assert len(direct) == len(triton)
    for i, (a, b) in enumerate(zip(direct, triton)):
        if i == 6:
            continue
        assert a is b or (type(a) is type(b) and not isinstance(a, torch.Tensor) and a == b), (i, a, b)


def test_settled_launch_hands_the_launcher_what_triton_does(tb, stub):
    _, calls = stub
    launch = _gather_launch(tb)
    jit = _triton_runtime._kernels.stripe_gather_columns_kernel
    with _through_triton_counted(jit) as through_triton:
        for _ in range(2):  # compile, launch and keep the compiled kernel; record
            launch(*_gather_tensors())
        assert len(through_triton) == 2 and launch._fast
        tensors = _gather_tensors()
        launch(*tensors)
        assert len(through_triton) == 2 and len(calls) == 3  # launched, not through triton
        jit[launch.grid](*tensors, *launch.bound, **launch.constants)
    _same_call(calls[-2], calls[-1])
    assert calls[-2][9] is tensors[0] and calls[-2][10] is tensors[1]


def test_a_kernel_stood_in_for_gets_the_launches(tb, stub, monkeypatch):
    """A settled direct launch goes to the kernel looked up at the call: where a tool stands in for it (as
    stripeconv.kernels.aot does to record launches), the stand-in gets the launch, not the recorded kernel,
    and the real kernel is recorded anew once it is back."""
    _, calls = stub
    launch = _gather_launch(tb)
    for _ in range(3):  # compile, keep the compiled kernel, record; then launched directly
        launch(*_gather_tensors())
    assert launch._fast and len(calls) == 3
    stood_in = []

    class StandIn:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: stood_in.append(args)
    kernels = type("Kernels", (), {"stripe_gather_columns_kernel": StandIn()})()
    real = _triton_runtime._kernels
    monkeypatch.setattr(_triton_runtime, "_kernels", kernels)
    for _ in range(2):
        launch(*_gather_tensors())
    assert len(stood_in) == 2 and len(calls) == 3
    monkeypatch.setattr(_triton_runtime, "_kernels", real)
    for _ in range(3):
        launch(*_gather_tensors())
    assert len(calls) == 6 and launch._fast


def _five_settled_forwards(tb, stub, monkeypatch, tuner, bias) -> tuple[list, list]:
    """Five forwards of one shape (deterministic mode: the stub cannot time configurations) on fresh inputs;
    the launcher's calls and the inputs. The first three go through ``tuner``'s JIT function, the rest not."""
    from stripeconv import packing

    monkeypatch.setenv("STRIPECONV_DETERMINISTIC", "1")
    gen = torch.Generator().manual_seed(0)
    mask = torch.rand(32, 3, 3, generator=gen) < 0.5
    packed = packing.pack_weight(torch.randn(32, 16, 3, 3, generator=gen).bfloat16(), mask)
    conv = ((1, 1), (1, 1, 1, 1), (1, 1), 1)
    _, calls = stub
    inputs = [torch.randn(2, 16, 8, 8, generator=gen).bfloat16().contiguous(memory_format=torch.channels_last)
              for _ in range(5)]
    with _through_triton_counted(tuner.fn) as through_triton:
        for x in inputs:
            tb.forward(x, packed, bias, mask, *conv)
    tb.clear_cache()
    assert len(calls) == 5 and len(through_triton) == 3, "the fourth and fifth launch went through triton"
    return calls, inputs


def test_settled_forward_launches_directly(tb, stub, monkeypatch):
    """The forward's autotuned kernel (its configuration fixed by deterministic mode: the stub cannot time
    configurations), through the backend's settled calls: fresh tensors reach the launcher directly."""
    calls, inputs = _five_settled_forwards(tb, stub, monkeypatch, _triton_runtime._kernels.stripe_fwd_kernel,
                                           torch.zeros(32, dtype=torch.bfloat16))
    assert calls[-1][9] is inputs[-1] and calls[-2][9] is inputs[-2]
    # The tensors (input, weight, bias, output, split-K workspace and counts) aside, the direct launch is the third
    # one, which went through triton.
    _same_call(calls[-1][:9] + calls[-1][15:], calls[2][:9] + calls[2][15:])


def test_settled_tma_forward_launches_its_new_descriptor_directly(tb, stub, monkeypatch):
    """The TMA forward's leading arguments include the input's tensor descriptor, made anew for each call:
    from the third launch on, each new descriptor reaches the launcher as it is (triton encodes it there)."""
    monkeypatch.setattr(_triton_runtime, "tma_capable", lambda device: True)
    choice = tb.gpu_select.choice
    monkeypatch.setattr(tb.gpu_select, "choice", lambda key, candidates, device, captured=None: (
        next(name for name in candidates if name.endswith("_tma")), True) if key[0] == "fwd" else choice(
        key, candidates, device))
    calls, inputs = _five_settled_forwards(tb, stub, monkeypatch, _triton_runtime._kernels.stripe_fwd_tma_kernel, None)
    descriptors = [call[10] for call in calls]
    assert all(type(d).__name__ == "TensorDescriptor" for d in descriptors)
    assert [d.base for d in descriptors[-2:]] == inputs[-2:] and descriptors[-1] is not descriptors[-2]
    # The tensors (weight, descriptor, bias, output) aside, the direct launch is the third one, which went through triton.
    _same_call(calls[-1][:9] + calls[-1][13:], calls[2][:9] + calls[2][13:])


def test_settled_tma_grad_input_launches_its_new_descriptor_directly(tb, stub, monkeypatch):
    """The TMA grad input's descriptor of dy (read in place: filters in tile order) is new for each call, and
    reaches the launcher as it is from the third launch on."""
    from stripeconv import packing
    from stripeconv.backends.triton_plans import filter_order

    monkeypatch.setenv("STRIPECONV_DETERMINISTIC", "1")
    monkeypatch.setattr(_triton_runtime, "tma_capable", lambda device: True)
    choice = tb.gpu_select.choice
    monkeypatch.setattr(tb.gpu_select, "choice", lambda key, candidates, device, captured=None: (
        "stripe_tiles_tma", True) if key[0] == "dgrad" else choice(key, candidates, device))
    gen = torch.Generator().manual_seed(0)
    mask = torch.rand(64, 3, 3, generator=gen) < 0.9  # 64-wide tiles (offered from 64 filters over 64 channels)
    mask = mask[filter_order(mask)]
    packed = packing.pack_weight(torch.randn(64, 64, 3, 3, generator=gen).bfloat16(), mask)
    conv = ((1, 1), (1, 1, 1, 1), (1, 1), 1)
    _, calls = stub
    dys = [torch.randn(2, 64, 8, 8, generator=gen).bfloat16().contiguous(memory_format=torch.channels_last)
           for _ in range(5)]
    with _through_triton_counted(_triton_runtime._kernels.stripe_dgrad_tiles_tma_kernel.fn) as through_triton:
        for dy in dys:
            tb.grad_input(dy, packed, mask, (2, 64, 8, 8), *conv)
    tb.clear_cache()
    launches = [call for call in calls if type(call[9]).__name__ == "TensorDescriptor"]
    assert len(launches) == 5 and len(through_triton) == 3, "the fourth and fifth launch went through triton"
    assert all(call[9].base is dy for call, dy in zip(launches, dys)) and launches[-1][9] is not launches[-2][9]
    # The tensors (descriptor, weight, dx) aside, the direct launch is the third one, which went through triton.
    _same_call(launches[-1][:9] + launches[-1][12:], launches[2][:9] + launches[2][12:])


def test_settled_tma_grad_weight_launches_its_new_descriptors_directly(tb, stub, monkeypatch):
    """The TMA grad weight makes descriptors of dy (read in place) and of x for each call; both reach the
    launcher as they are from the third launch on (one configuration: the stub cannot time them)."""
    from stripeconv import packing
    from stripeconv.backends.triton_plans import filter_order

    kernel = _triton_runtime._kernels.stripe_wgrad_tiles_tma_kernel
    monkeypatch.setattr(kernel, "configs", kernel.configs[:1])
    monkeypatch.setattr(_triton_runtime, "tma_capable", lambda device: True)
    choice = tb.gpu_select.choice
    monkeypatch.setattr(tb.gpu_select, "choice", lambda key, candidates, device, captured=None: (
        "stripe_tiles_tma", True) if key[0] == "wgrad" else choice(key, candidates, device))
    gen = torch.Generator().manual_seed(0)
    mask = torch.rand(64, 3, 3, generator=gen) < 0.9
    mask = mask[filter_order(mask)]
    packed = packing.pack_weight(torch.randn(64, 32, 3, 3, generator=gen).bfloat16(), mask)
    conv = ((1, 1), (1, 1, 1, 1), (1, 1), 1)
    _, calls = stub
    dys, xs = ([torch.randn(2, c, 8, 8, generator=gen).bfloat16().contiguous(memory_format=torch.channels_last)
                for _ in range(5)] for c in (64, 32))
    with _through_triton_counted(kernel.fn) as through_triton:
        for dy, x in zip(dys, xs):
            tb.grad_weight(dy, x, packed, mask, *conv)
    tb.clear_cache()
    launches = [call for call in calls if type(call[9]).__name__ == "TensorDescriptor"]
    assert len(launches) == 5 and len(through_triton) == 3, "the fourth and fifth launch went through triton"
    assert all(call[9].base is dy and call[10].base is x for call, dy, x in zip(launches, dys, xs))
    # The tensors (two descriptors, dw) aside, the direct launch is the third one, which went through triton.
    _same_call(launches[-1][:9] + launches[-1][12:], launches[2][:9] + launches[2][12:])


def test_direct_launch_hands_back_where_triton_would_launch_otherwise(tb, stub):
    from stripeconv.backends import _triton_launch

    driver, calls = stub
    launch = _gather_launch(tb)
    jit = _triton_runtime._kernels.stripe_gather_columns_kernel
    for _ in range(2):
        launch(*_gather_tensors())
    assert launch._fast
    with _through_triton_counted(jit) as through_triton:
        launch(*_gather_tensors(offset=1))  # not 16-byte aligned: triton specialises on alignment
        assert len(through_triton) == 1
        launch(*_gather_tensors())
        assert len(through_triton) == 1

        src, dst = _gather_tensors()
        launch(src.double(), dst.double())  # another dtype: another compiled kernel
        assert len(through_triton) == 2

        driver.device = 1  # another current device: its own compiled kernel
        launch(*_gather_tensors())
        assert len(through_triton) == 3
        driver.device = 0

        owner, seen = _triton_launch._hook_owner(), []
        hook = owner.launch_enter_hook
        if hasattr(hook, "add"):  # a chain of hooks (triton >= 3.6)
            hook.add(seen.append)
            restore = lambda: hook.remove(seen.append)  # noqa: E731
        else:
            owner.launch_enter_hook = seen.append
            restore = lambda: setattr(owner, "launch_enter_hook", hook)  # noqa: E731
        try:
            launch(*_gather_tensors())  # a profiler's launch hook: triton passes it the launch metadata
        finally:
            restore()
        assert len(through_triton) == 4

        if hasattr(jit, "pre_run_hooks"):
            jit.pre_run_hooks.append(lambda *args, **kwargs: seen.append("pre-run"))
            try:
                launch(*_gather_tensors())
            finally:
                jit.pre_run_hooks.pop()
            assert len(through_triton) == 5 and "pre-run" in seen
        launch(*_gather_tensors())
        assert len(through_triton) == 4 + hasattr(jit, "pre_run_hooks")
    assert len(calls) == 2 + 6 + hasattr(jit, "pre_run_hooks")


def test_no_direct_launch_where_the_recorded_call_is_not_ours(tb, stub):
    """A launcher call that does not begin with the launch's own arguments (another version's layout,
    another thread's launch) leaves every launch with triton."""
    from stripeconv.backends import _triton_launch

    launch = _gather_launch(tb)
    jit = _triton_runtime._kernels.stripe_gather_columns_kernel
    tensors = _gather_tensors()
    compiled = jit[launch.grid](*tensors, *launch.bound, **launch.constants)
    other = _gather_tensors()
    assert _triton_launch.record(lambda: jit[launch.grid](*other, *launch.bound, **launch.constants), compiled, jit,
                                 tensors, launch.bound) is None

    def twice():
        jit[launch.grid](*tensors, *launch.bound, **launch.constants)
        jit[launch.grid](*tensors, *launch.bound, **launch.constants)
    assert _triton_launch.record(twice, compiled, jit, tensors, launch.bound) is None
    assert _triton_launch.record(lambda: None, object(), jit, tensors, launch.bound) is None
    fast = _triton_launch.record(lambda: jit[launch.grid](*tensors, *launch.bound, **launch.constants), compiled, jit,
                                 tensors, launch.bound)
    assert fast is not None and fast(_gather_tensors())


def test_direct_launches_can_be_switched_off(tb, stub, monkeypatch):
    monkeypatch.setenv("STRIPECONV_TRITON_DIRECT", "0")
    launch = _gather_launch(tb)
    with _through_triton_counted(_triton_runtime._kernels.stripe_gather_columns_kernel) as through_triton:
        for _ in range(4):
            launch(*_gather_tensors())
    assert len(through_triton) == 4 and launch._fast is False
