"""pytest-benchmark suite of the compiled CPU kernels (the cases of bench/bench_cpu.py).

    pytest bench/test_bench_cpu.py --benchmark-only

Not collected by the normal test command (testpaths = tests/). Every layer is timed as dense
F.conv2d (NCHW and channels_last), as a channel-pruned dense conv with the same FLOPs (forward),
and as StripeConv2d on the cpu backend at each density, forward and forward+backward
(``StripeConv2d`` in eager mode, as models run it); group names put the dense baseline next to
the stripe rows.
"""
from __future__ import annotations

import os
import sys

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

pytest.importorskip("pytest_benchmark")
try:
    import stripeconv._C  # noqa: F401
except ImportError as exc:  # pragma: no cover
    pytest.skip(f"stripeconv._C is not built ({exc})", allow_module_level=True)

import stripeconv  # noqa: E402
from bench_cpu import DENSITIES, LAYERS, make_case, make_layer  # noqa: E402

LAYER_IDS = [layer.name.replace(" ", "_").replace(">", "") for layer in LAYERS]


@pytest.fixture(autouse=True, scope="module")
def _cpu_backend():
    previous = stripeconv.get_backend()
    stripeconv.set_backend("cpu")
    yield
    stripeconv.set_backend(previous)


@pytest.mark.parametrize("fmt", ["nchw", "channels_last"])
@pytest.mark.parametrize("layer", LAYERS, ids=LAYER_IDS)
def test_dense_forward(benchmark, layer, fmt):
    name, cin, cout, hw, batch, _ = layer
    x, w, bias, _, _ = make_case(cin, cout, hw, batch, 1.0)
    if fmt == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    benchmark.group = f"forward {name}"
    benchmark(F.conv2d, x, w, bias, 1, 1)


@pytest.mark.parametrize("density", DENSITIES)
@pytest.mark.parametrize("layer", LAYERS, ids=LAYER_IDS)
def test_stripe_forward(benchmark, layer, density):
    name, cin, cout, hw, batch, _ = layer
    x, _, bias, mask, packed = make_case(cin, cout, hw, batch, density)
    benchmark.group = f"forward {name}"
    benchmark.extra_info["density"] = density
    layer = make_layer(cin, cout, mask, packed, bias)
    with torch.no_grad():
        benchmark(layer, x)


@pytest.mark.parametrize("density", [d for d in DENSITIES if d < 1.0])
@pytest.mark.parametrize("layer", LAYERS, ids=LAYER_IDS)
def test_channel_pruned_forward(benchmark, layer, density):
    """The dense conv that filter pruning to the same FLOPs leaves: round(density * out) filters."""
    name, cin, cout, hw, batch, _ = layer
    x, w, bias, _, _ = make_case(cin, cout, hw, batch, 1.0)
    kept = max(1, round(density * cout))
    w, bias = w[:kept].contiguous(), bias[:kept].contiguous()
    x = x.contiguous(memory_format=torch.channels_last)
    benchmark.group = f"forward {name}"
    benchmark.extra_info["density"] = density
    benchmark(F.conv2d, x, w, bias, 1, 1)


@pytest.mark.parametrize("layer", LAYERS, ids=LAYER_IDS)
def test_dense_forward_backward(benchmark, layer):
    name, cin, cout, hw, batch, _ = layer
    x, w, _, _, _ = make_case(cin, cout, hw, batch, 1.0)
    x = x.contiguous(memory_format=torch.channels_last).requires_grad_()
    w = w.requires_grad_()
    gy = torch.randn(batch, cout, hw, hw)
    benchmark.group = f"forward+backward {name}"
    benchmark(lambda: F.conv2d(x, w, None, 1, 1).backward(gy))


@pytest.mark.parametrize("density", DENSITIES)
@pytest.mark.parametrize("layer", LAYERS, ids=LAYER_IDS)
def test_stripe_forward_backward(benchmark, layer, density):
    name, cin, cout, hw, batch, _ = layer
    x, _, _, mask, packed = make_case(cin, cout, hw, batch, density)
    x.requires_grad_()
    layer = make_layer(cin, cout, mask, packed)
    gy = torch.randn(batch, cout, hw, hw)
    benchmark.group = f"forward+backward {name}"
    benchmark.extra_info["density"] = density
    benchmark(lambda: layer(x).backward(gy))
