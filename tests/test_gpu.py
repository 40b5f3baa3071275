"""StripeConv2d on a CUDA device: torch.compile, CUDA graph capture, the dense hand-over and
fine-tuning, each checked against F.conv2d on the masked weight.

Every check runs on CPU too (graph capture excepted), so the checks themselves are exercised on
machines without a GPU; the CUDA copies are skipped there.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from stripeconv import StripeConv2d
from stripeconv.backends import gpu_select


@pytest.fixture(params=["cpu", "cuda"])
def device(request):
    if request.param == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    return torch.device(request.param)


def _layer(device, dtype=torch.float32, c=32, n=64, density=0.4, stride=1, seed=0):
    gen = torch.Generator().manual_seed(seed)
    mask = torch.rand(n, 3, 3, generator=gen) < density
    layer = StripeConv2d(c, n, 3, stride=stride, padding=1, bias=True, stripe_mask=mask)
    return layer.to(device=device, dtype=dtype)


def _oracle(layer, x):
    """F.conv2d on the masked dense weight, in fp64 on the CPU."""
    return F.conv2d(x.double().cpu(), layer.weight.double().cpu(), layer.bias.double().cpu(),
                    layer.stride, layer.padding, layer.dilation, layer.groups)


def _input(device, dtype, c=32, hw=12, batch=4, seed=1):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, c, hw, hw, generator=gen)
    return x.to(device=device, dtype=dtype).contiguous(memory_format=torch.channels_last)


def _tol(dtype):
    return {torch.float32: 2e-3, torch.bfloat16: 6e-2, torch.float16: 1e-2}[dtype]


@pytest.fixture(params=["default", "dense"])
def pinned_backend(request):
    """The device's default backend, then the dense fallback pinned."""
    import stripeconv

    stripeconv.set_backend(None if request.param == "default" else request.param)
    yield request.param
    stripeconv.set_backend(None)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_forward_backward_against_oracle(device, dtype, pinned_backend):
    layer = _layer(device, dtype)
    x = _input(device, dtype).requires_grad_()
    y = layer(x)
    gy = torch.randn_like(y)
    y.backward(gy)
    xr = x.detach().double().cpu().requires_grad_()
    wr = layer.weight.detach().double().cpu().requires_grad_()
    br = layer.bias.detach().double().cpu().requires_grad_()
    ref = F.conv2d(xr, wr, br, 1, 1)
    ref.backward(gy.double().cpu())
    tol = _tol(dtype)
    scale = lambda t: max(1.0, t.abs().max().item())  # noqa: E731
    assert (y.double().cpu() - ref).abs().max() <= tol * scale(ref)
    assert (x.grad.double().cpu() - xr.grad).abs().max() <= tol * scale(xr.grad)
    gw = layer.packed_weight.grad.double().cpu()
    from stripeconv.packing import pack_weight

    want = pack_weight(wr.grad, layer.stripe_mask.cpu())
    assert (gw - want).abs().max() <= tol * scale(want)
    assert (layer.bias.grad.double().cpu() - br.grad).abs().max() <= tol * scale(br.grad)


@pytest.mark.parametrize("choice", ["never", "always", "auto"])
def test_dense_handover_choices_agree(device, choice, monkeypatch):
    monkeypatch.setenv("STRIPECONV_GPU_DENSE", choice)
    gpu_select.clear()
    layer = _layer(device, density=0.95 if choice == "auto" else 0.5)
    x = _input(device, torch.float32)
    with torch.no_grad():
        y = layer(x)
    ref = _oracle(layer, x)
    assert (y.double().cpu() - ref).abs().max() <= 2e-3 * max(1.0, ref.abs().max().item())
    if choice == "auto" and device.type == "cuda":
        assert gpu_select.decisions(), "the first CUDA call of a shape times the candidates"


# (input channels, filters, plane, batch, stride, density, dtype): wide, narrow and 8-wide subtiles with
# TMA boxes; stride 2 (at density 1 with TMA boxes of dy); split-K at batch 1 in fp32. bench_gpu.py checks the
# same way on its layers.
VARIANT_CASES = [(64, 128, 16, 8, 1, 0.2, torch.bfloat16), (128, 64, 14, 4, 2, 0.3, torch.bfloat16),
                 (128, 128, 15, 4, 2, 1.0, torch.bfloat16), (64, 256, 8, 1, 1, 0.1, torch.float32)]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device: kernel variants are timed and "
                    "checked against cuDNN on CUDA devices only (the check itself: tests/test_gpu_select.py)")
@pytest.mark.parametrize("case", VARIANT_CASES, ids=lambda s: "c{}n{}hw{}b{}s{}d{}_{}".format(
    *s[:6], str(s[6]).split(".")[-1]))
def test_every_timed_kernel_variant_agrees_with_cudnn(case, monkeypatch):
    """The first call of a shape checks every stripe-kernel variant it times against cuDNN's dense
    conv (gpu_select): on this GPU none may be rejected, in the forward and both gradients."""
    device = torch.device("cuda")
    c, n, hw, batch, stride, density, dtype = case
    monkeypatch.setenv("STRIPECONV_GPU_DENSE", "never")
    gpu_select.clear()
    layer = _layer(device, dtype, c=c, n=n, density=density, stride=stride, seed=hw)
    x = _input(device, dtype, c=c, hw=hw, batch=batch).requires_grad_()
    layer(x).square().sum().backward()
    decisions = gpu_select.decisions()
    assert {d["key"][0] for d in decisions} == {"fwd", "dgrad", "wgrad"}
    rejected = {(d["key"][0], name): error for d in decisions for name, error in d["rejected"].items()}
    assert not rejected, f"kernel variants that disagree with cuDNN: {rejected}"
    assert sum(len(d["times_ms"]) for d in decisions) > len(decisions), "more than one variant was checked"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device: the splits of one output tile race "
                    "only on a GPU (the interpreter runs programs one at a time: tests/test_triton.py, splitk_*)")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_split_k_forward_repeats_bit_for_bit(dtype):
    """The split-K forward's last split to arrive at an output tile adds the splits' partial sums in split
    order: whichever finishes last, every launch returns the same bits, and they agree with the oracle.
    A split that read another's partial sums before they were stored (the barrier and the acquire-release
    count are what prevent it) would show as a launch that differs."""
    from stripeconv.backends import _triton_forward, triton_backend as tb, triton_plans

    device = torch.device("cuda")
    gen = torch.Generator().manual_seed(3)
    for n, c, hw, density in ((512, 512, 7, 0.5), (256, 256, 4, 0.2)):
        mask = (torch.rand(n, 3, 3, generator=gen) < density).to(device)
        layer = StripeConv2d(c, n, 3, padding=1, stripe_mask=mask).to(device=device, dtype=dtype)
        x = _input(device, dtype, c=c, hw=hw, batch=1)
        plan = triton_plans.forward_plans(mask, 1, device)[0]
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        split = _triton_forward.split_k(plan, hw * hw, c, sms)
        assert split > 1, (n, hw, split)
        launch = _triton_forward.stripe_launcher(plan, x, layer.packed_weight, layer.bias, (1, 1), (1, 1, 1, 1),
                                                 (1, 1), (hw, hw), split_k=split)
        with torch.no_grad():
            first = launch(x, layer.packed_weight, layer.bias)
            torch.testing.assert_close(first.double().cpu(), _oracle(layer, x), atol=_tol(dtype), rtol=_tol(dtype))
            for _ in range(300):
                assert torch.equal(launch(x, layer.packed_weight, layer.bias), first)
    tb.clear_cache()


def test_torch_compile_fullgraph(device):
    layer = _layer(device)
    compiled = torch.compile(layer, fullgraph=True)
    x = _input(device, torch.float32).requires_grad_()
    y = compiled(x)
    y.square().sum().backward()
    ref = _oracle(layer, x)
    assert (y.double().cpu() - ref).abs().max() <= 2e-3 * max(1.0, ref.abs().max().item())
    assert layer.packed_weight.grad is not None and x.grad is not None


def _warm_up(layer, static_x) -> None:
    """Two training steps on a side stream: mask metadata, autotuning and the dense/stripe choice happen here."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            layer.zero_grad(set_to_none=True)
            layer(static_x).sum().backward()
    torch.cuda.current_stream().wait_stream(side)


def _captured_step(layer, static_x):
    """A CUDA graph of one forward and backward of ``layer`` on ``static_x``, and its output tensor."""
    layer.zero_grad(set_to_none=False)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_y = layer(static_x)
        static_y.sum().backward()
    return graph, static_y


def test_cuda_graph_capture_and_replay(device):
    if device.type != "cuda":
        pytest.skip("CUDA graphs need a CUDA device")
    layer = _layer(device)
    static_x = _input(device, torch.float32).requires_grad_()
    _warm_up(layer, static_x)
    graph, static_y = _captured_step(layer, static_x)
    for seed in (5, 6):
        with torch.no_grad():
            static_x.copy_(_input(device, torch.float32, seed=seed))
        layer.packed_weight.grad.zero_()
        graph.replay()
        torch.cuda.synchronize()
        ref = _oracle(layer, static_x)
        assert (static_y.double().cpu() - ref).abs().max() <= 2e-3 * max(1.0, ref.abs().max().item())


def test_graph_replays_a_stripe_kernel_where_dense_wins_only_eagerly(monkeypatch):
    """Where the dense hand-over is timed fastest with its weight kept but slowest when it scatters the
    weight (as every replay of a CUDA graph does), the captured forward and grad input run stripe kernels:
    replays after in-place weight updates match the oracle, and eager calls still run the dense conv."""
    if not torch.cuda.is_available():
        pytest.skip("CUDA graphs need a CUDA device")
    from stripeconv.backends import triton_backend as tb

    monkeypatch.delenv("STRIPECONV_GPU_DENSE", raising=False)
    time_ms, dense_launcher = gpu_select._time_ms, tb._dense_launcher

    def timed_dense(*args, keep=True, **kwargs):
        launch = dense_launcher(*args, keep=keep, **kwargs)

        def dense(*call_args):
            return launch(*call_args)
        dense.ms = 0.0 if keep else 1e3
        return dense

    def timer(fn, repeats=5):  # dense: fastest with its weight kept, slowest scattering it; stripe kernels timed
        if fn.func.__qualname__ == "_first_grad_input.<locals>.dense":
            fn()
            return 0.0 if fn.keywords.get("keep", True) else 1e3
        if hasattr(fn.func, "ms"):
            fn()
            return fn.func.ms
        return time_ms(fn, repeats)
    monkeypatch.setattr(tb, "_dense_launcher", timed_dense)
    monkeypatch.setattr(gpu_select, "_time_ms", timer)
    tb.clear_cache()
    gpu_select.clear()
    device = torch.device("cuda")
    layer = _layer(device, seed=7)
    static_x = _input(device, torch.float32).requires_grad_()
    _warm_up(layer, static_x)
    decided = {d["key"][0]: d for d in gpu_select.decisions()}
    for op in ("fwd", "dgrad"):
        assert decided[op]["choice"] == "dense" and decided[op]["captured_choice"].startswith("stripe"), decided[op]
    graph, static_y = _captured_step(layer, static_x)
    for seed in (5, 6):
        with torch.no_grad():
            static_x.copy_(_input(device, torch.float32, seed=seed))
            layer.packed_weight.mul_(-0.5)  # what a kept dense weight would miss
        static_x.grad.zero_()
        graph.replay()
        torch.cuda.synchronize()
        ref_x = static_x.detach().double().cpu().requires_grad_()
        ref = F.conv2d(ref_x, layer.weight.detach().double().cpu(), layer.bias.detach().double().cpu(), 1, 1)
        ref.sum().backward()
        assert (static_y.double().cpu() - ref).abs().max() <= 2e-3 * max(1.0, ref.abs().max().item())
        assert (static_x.grad.double().cpu() - ref_x.grad).abs().max() <= 2e-3 * max(1.0, ref_x.grad.abs().max().item())
    with torch.no_grad():  # eager again: the dense conv on the current weight
        y = layer(static_x)
    ref = _oracle(layer, static_x)
    assert (y.double().cpu() - ref).abs().max() <= 2e-3 * max(1.0, ref.abs().max().item())
    tb.clear_cache()
    gpu_select.clear()


def test_fine_tuning_reduces_the_loss(device):
    torch.manual_seed(0)
    net = nn.Sequential(
        _layer(device, c=3, n=32, density=0.5, seed=2), nn.BatchNorm2d(32), nn.ReLU(),
        _layer(device, c=32, n=32, density=0.4, stride=2, seed=3), nn.BatchNorm2d(32), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 4),
    ).to(device)
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(64, 3, 16, 16, generator=gen).to(device).contiguous(memory_format=torch.channels_last)
    target = torch.randint(0, 4, (64,), generator=gen).to(device)
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    losses = []
    for _ in range(60):
        opt.zero_grad()
        loss = F.cross_entropy(net(x), target)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.6 * losses[0], losses
    for module in net:
        if isinstance(module, StripeConv2d):  # pruned stripes stay pruned
            assert torch.equal(module.weight[~module.stripe_mask.unsqueeze(1).expand_as(module.weight)].abs().sum(),
                               torch.zeros((), device=device))


_REPEAT_SCRIPT = """
import sys, torch
from stripeconv import StripeConv2d
device, dtype = torch.device(sys.argv[1]), getattr(torch, sys.argv[2])
torch.manual_seed(0)  # the layer's initial weights
gen = torch.Generator().manual_seed(0)
mask = torch.rand(64, 3, 3, generator=gen) < 0.4
layer = StripeConv2d(32, 64, 3, padding=1, stripe_mask=mask).to(device=device, dtype=dtype)
x = torch.randn(16, 32, 24, 24, generator=gen).to(device=device, dtype=dtype)
x = x.contiguous(memory_format=torch.channels_last).requires_grad_()
y = layer(x)
y.backward(torch.randn(y.shape, generator=gen).to(device=device, dtype=dtype))
torch.save([t.detach().cpu() for t in (y, x.grad, layer.packed_weight.grad, layer.bias.grad)], sys.argv[3])
"""


def test_deterministic_mode_repeats_bit_for_bit_across_processes(device, tmp_path):
    """STRIPECONV_DETERMINISTIC=1: two fresh processes compute the same bits (no choice by timing,
    grad weight summed in a fixed order), forward and every gradient."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "STRIPECONV_DETERMINISTIC": "1"}
    dtype = "bfloat16" if device.type == "cuda" else "float32"
    runs = []
    for i in range(2):
        out = tmp_path / f"run{i}.pt"
        subprocess.run([sys.executable, "-c", _REPEAT_SCRIPT, device.type, dtype, str(out)], env=env, check=True,
                       timeout=600)
        runs.append(torch.load(out))
    for name, a, b in zip(("forward", "grad input", "grad weight", "grad bias"), *runs):
        assert torch.equal(a, b), f"{name} differs between two processes"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reordered_model_matches_the_original(device, dtype):
    """reorder_filters on the device: the filters in tile order (aligned stores, dy read in place on a
    GPU) compute what the original model computes, forward and input gradient, in training mode."""
    import stripeconv
    from stripeconv.backends import triton_plans

    gen = torch.Generator().manual_seed(5)
    masks = [torch.rand(n, 3, 3, generator=gen) < 0.3 for n in (128, 64)]
    model = nn.Sequential(StripeConv2d(32, 128, 3, padding=1, stripe_mask=masks[0]), nn.BatchNorm2d(128), nn.ReLU(),
                          StripeConv2d(128, 64, 3, padding=1, stripe_mask=masks[1]), nn.BatchNorm2d(64), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10))
    model = model.to(device=device, dtype=dtype).to(memory_format=torch.channels_last)
    reordered = stripeconv.reorder_filters(model)
    assert triton_plans.forward_plans(reordered[0].stripe_mask, 1, device)[0].aligned
    # the tiles of the fewest stripes: runs of channels after the reorder, scattered before
    fewest = [min(triton_plans.forward_plans(m[0].stripe_mask, 1, device), key=lambda p: p.computed)
              for m in (reordered, model)]
    assert fewest[0].aligned and fewest[0].runs and not fewest[1].aligned
    x = _input(device, dtype)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = model(xa), reordered(xb)
    tol = _tol(dtype)
    assert (ya.double() - yb.double()).abs().max().item() <= tol * max(1.0, ya.abs().max().item())
    gy = torch.randn(ya.shape, generator=gen).to(device=device, dtype=dtype)
    ya.backward(gy)
    yb.backward(gy)
    assert (xa.grad.double() - xb.grad.double()).abs().max().item() <= tol * max(1.0, xa.grad.abs().max().item())


@pytest.mark.parametrize("choice", ["never", "auto", "always"])
def test_repeated_training_steps_match_the_oracle(device, choice, monkeypatch):
    """The steady state: a settled call launches its kernels directly (on a GPU, from the third launch
    on) with each step's fresh tensors; every step's forward and gradients match the oracle, also when
    a step's input is not 16-byte aligned (a variant Triton compiles apart) and for a tile backward.
    An optimiser step between steps changes the weight: nothing a call keeps (the dense hand-over's
    scattered weight under ``always``) may outlive it."""
    from stripeconv.backends import _triton_launch
    from stripeconv.packing import pack_weight

    monkeypatch.setenv("STRIPECONV_GPU_DENSE", choice)
    gpu_select.clear()
    direct = []
    launch = _triton_launch.CompiledLaunch.__call__
    monkeypatch.setattr(_triton_launch.CompiledLaunch, "__call__",
                        lambda self, tensors: direct.append(launch(self, tensors)) or direct[-1])
    layer = _layer(device, torch.bfloat16, c=64, n=64, density=0.5, seed=3)
    opt = torch.optim.SGD(layer.parameters(), lr=0.05)
    tol = _tol(torch.bfloat16)
    scale = lambda t: max(1.0, t.abs().max().item())  # noqa: E731
    for step in range(6):
        x = _input(device, torch.bfloat16, c=64, seed=10 + step)
        if step == 4:  # the same values one element into a larger buffer: not 16-byte aligned
            flat = torch.empty(x.numel() + 1, device=device, dtype=x.dtype)
            x = flat[1:].view(4, 12, 12, 64).copy_(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        x.requires_grad_()
        layer.zero_grad(set_to_none=True)
        y = layer(x)
        gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(step)).to(device, torch.bfloat16)
        y.backward(gy)
        xr = x.detach().double().cpu().requires_grad_()
        wr = layer.weight.detach().double().cpu().requires_grad_()
        ref = F.conv2d(xr, wr, layer.bias.detach().double().cpu(), 1, 1)
        ref.backward(gy.double().cpu())
        assert (y.double().cpu() - ref).abs().max() <= tol * scale(ref), f"forward, step {step}"
        assert (x.grad.double().cpu() - xr.grad).abs().max() <= tol * scale(xr.grad), f"grad input, step {step}"
        want = pack_weight(wr.grad, layer.stripe_mask.cpu())
        got = layer.packed_weight.grad.double().cpu()
        assert (got - want).abs().max() <= tol * scale(want), f"grad weight, step {step}"
        opt.step()
    if device.type == "cuda" and choice == "never":
        assert any(direct), "no settled launch went to the compiled kernel directly"


@pytest.mark.parametrize("choice", ["never", "always"])
def test_settled_training_step_never_waits_for_the_device(device, choice, monkeypatch):
    """Once the first steps have settled plans, tuning and the stripe/dense choice, a forward, backward
    and optimiser step make no call that blocks the host on the device (a ``.item()``, ``nonzero``, a
    blocking copy, a stream sync): one per layer would serialise every launch with the GPU's work.
    On CUDA torch's sync debug mode raises at any such call; on CPU the profiler finds no host read
    of a tensor value either."""
    monkeypatch.setenv("STRIPECONV_GPU_DENSE", choice)
    gpu_select.clear()
    layer = _layer(device, torch.bfloat16, c=64, n=64, density=0.5, seed=4)
    opt = torch.optim.SGD(layer.parameters(), lr=0.01)
    inputs = [_input(device, torch.bfloat16, c=64, seed=20 + i).requires_grad_() for i in range(4)]
    grads = [torch.randn(4, 64, 12, 12).to(device, torch.bfloat16) for _ in range(4)]

    def step(i):
        layer(inputs[i]).backward(grads[i])
        opt.step()
        opt.zero_grad(set_to_none=True)

    for i in range(2):
        step(i)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            for i in range(2, 4):
                step(i)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        torch.cuda.synchronize()
    else:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for i in range(2, 4):
                step(i)
        reads = {e.key for e in prof.key_averages()} & {"aten::item", "aten::_local_scalar_dense", "aten::nonzero"}
        assert not reads, reads
    assert all(x.grad is not None and torch.isfinite(x.grad.float()).all() for x in inputs)
