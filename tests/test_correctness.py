"""StripeConv2d against nn.Conv2d on masked weights, forward and every gradient, per CPU backend."""
from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import stripeconv
from conftest import (DEGENERATE_SHAPES, check_against_oracle, check_degenerate_shape, check_double_backward,
                      random_mask)

ATOL = {torch.float32: 2e-4, torch.float64: 1e-10}


def run_case(
    kernel_size=3,
    stride=1,
    padding=1,
    dilation=1,
    groups=1,
    bias=True,
    padding_mode="zeros",
    density=0.5,
    in_channels=4,
    out_channels=6,
    size=(9, 8),
    batch=2,
    dtype=torch.float32,
    seed=0,
    layout="contiguous",
):
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    conv = nn.Conv2d(
        in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias, padding_mode, dtype=dtype
    )
    mask = random_mask(out_channels, conv.kernel_size, density, gen)
    x = torch.randn(batch, in_channels, *size, generator=gen, dtype=dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "non_contiguous":
        x = torch.randn(batch, in_channels, size[0], 2 * size[1], generator=gen, dtype=dtype)[..., ::2]
    check_against_oracle(conv, mask, x, atol=ATOL[dtype])


@pytest.mark.parametrize("kernel_size", [1, 2, 3, 5, 7, (1, 3), (3, 1), (3, 5)])
def test_kernel_sizes(backend, kernel_size):
    run_case(kernel_size=kernel_size, padding=0, size=(9, 10))
    run_case(kernel_size=kernel_size, padding="same", size=(7, 6))


@pytest.mark.parametrize("stride", [1, 2, 3, (1, 2)])
@pytest.mark.parametrize("padding", [0, 1, 2, (1, 0), "valid"])
def test_stride_padding(backend, stride, padding):
    run_case(stride=stride, padding=padding, size=(11, 9))


@pytest.mark.parametrize("padding", ["same", 1])
@pytest.mark.parametrize("dilation", [1, 2, (2, 1)])
def test_dilation(backend, dilation, padding):
    run_case(dilation=dilation, padding=padding, size=(10, 9))


@pytest.mark.parametrize("groups,in_channels,out_channels", [(1, 4, 6), (2, 4, 6), (4, 4, 4), (4, 4, 8)])
def test_groups_and_depthwise(backend, groups, in_channels, out_channels):
    run_case(groups=groups, in_channels=in_channels, out_channels=out_channels, density=0.6)


@pytest.mark.parametrize("padding_mode", ["zeros", "reflect", "replicate", "circular"])
@pytest.mark.parametrize("bias", [True, False])
def test_padding_modes_and_bias(backend, padding_mode, bias):
    run_case(padding_mode=padding_mode, bias=bias, padding=(2, 1))
    run_case(padding_mode=padding_mode, bias=bias, padding="same", kernel_size=(2, 4))


@pytest.mark.parametrize("density", [0.0, 0.1, 0.5, 1.0])
def test_densities(backend, density):
    run_case(density=density, out_channels=8)


def test_filters_without_stripes(backend):
    torch.manual_seed(3)
    conv = nn.Conv2d(3, 5, 3, padding=1)
    mask = torch.rand(5, 3, 3) < 0.5
    mask[1] = False
    mask[4] = False
    check_against_oracle(conv, mask, torch.randn(2, 3, 6, 6), atol=ATOL[torch.float32])


@pytest.mark.parametrize("size", [(1, 1), (2, 2), (2, 5), (3, 3), (13, 7)])
def test_spatial_sizes(backend, size):
    """Inputs smaller than the kernel (with padding they still produce output) and odd sizes."""
    run_case(kernel_size=5, padding=2, size=size)
    run_case(kernel_size=3, stride=2, padding=1, size=size)


def test_kernel_larger_than_input_raises(backend):
    """A 5x5 kernel on a 3x3 image without padding has no output pixel: an error, as in nn.Conv2d."""
    import stripeconv

    layer = stripeconv.StripeConv2d(2, 3, 5)
    with pytest.raises(ValueError, match="smaller than the dilated kernel"):
        layer(torch.randn(1, 2, 3, 3))


def test_batch_zero(backend):
    run_case(batch=0)


def test_non_finite_input_reaches_only_what_reads_it(backend, monkeypatch):
    """A NaN reaches an output through a kept stripe that reads it. The stripe kernels read no pruned
    stripe; the dense backend, like F.conv2d on the masked weight, multiplies it by zero (NaN too)."""
    monkeypatch.setenv("STRIPECONV_CPU_DENSE", "never")
    torch.manual_seed(0)
    layer = stripeconv.StripeConv2d(4, 6, 3, padding=1, stripe_mask=torch.rand(6, 3, 3) < 0.5)
    x = torch.randn(2, 4, 7, 7)
    x[0, 1, 3, 3] = float("nan")
    x[1, 2, 0, 6] = float("inf")
    bad = (~x.isfinite()).float()
    reads = layer.stripe_mask if backend != "dense" else torch.ones_like(layer.stripe_mask)
    reading = F.conv2d(bad, reads[:, None].expand(-1, 4, -1, -1).float(), padding=1) > 0
    with torch.no_grad():
        out = layer(x)
    assert reading.any() and not reading.all()
    assert torch.equal(~out.isfinite(), reading)


@pytest.mark.parametrize("layout", ["channels_last", "non_contiguous"])
def test_memory_layouts(backend, layout):
    run_case(layout=layout)
    run_case(layout=layout, stride=2, groups=2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dtypes(backend, dtype):
    run_case(dtype=dtype)
    run_case(dtype=dtype, stride=2, dilation=2, padding=3, kernel_size=(3, 5))


def test_unbatched(backend):
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3, padding=1)
    mask = torch.rand(4, 3, 3) < 0.6
    oracle = nn.Conv2d(3, 4, 3, padding=1)
    oracle.load_state_dict(conv.state_dict())
    from conftest import masked_conv
    import stripeconv

    masked_conv(oracle, mask)
    layer = stripeconv.StripeConv2d.from_conv(oracle, mask)
    x = torch.randn(3, 5, 6)
    out = layer(x)
    assert out.shape == (4, 5, 6)
    torch.testing.assert_close(out, oracle(x), atol=1e-5, rtol=1e-4)


def test_channels_last_output_layout(backend):
    import stripeconv

    layer = stripeconv.StripeConv2d(8, 8, 3, padding=1)
    x = torch.randn(2, 8, 5, 5).contiguous(memory_format=torch.channels_last)
    assert layer(x).is_contiguous(memory_format=torch.channels_last)
    assert layer(x.contiguous()).is_contiguous()


def _random_config(rng: random.Random) -> dict:
    kernel = (rng.choice([1, 2, 3, 4, 5]), rng.choice([1, 2, 3, 5]))
    groups = rng.choice([1, 1, 2, 3])
    cfg = dict(
        kernel_size=kernel,
        stride=(rng.choice([1, 2, 3]), rng.choice([1, 2])),
        dilation=(rng.choice([1, 2]), rng.choice([1, 3])),
        groups=groups,
        in_channels=groups * rng.choice([1, 2, 5]),
        out_channels=groups * rng.choice([1, 3, 4]),
        bias=rng.random() < 0.5,
        padding_mode=rng.choice(["zeros", "zeros", "reflect", "replicate", "circular"]),
        density=rng.choice([0.0, 0.05, 0.2, 0.5, 0.8, 1.0]),
        batch=rng.choice([1, 2, 3]),
        dtype=rng.choice([torch.float32, torch.float64]),
        layout=rng.choice(["contiguous", "channels_last", "non_contiguous"]),
        seed=rng.randrange(1 << 30),
    )
    cfg["padding"] = (rng.randrange(0, kernel[0] + 1), rng.randrange(0, kernel[1] + 1))
    eff = [d * (k - 1) + 1 for d, k in zip(cfg["dilation"], kernel)]
    # Non-zero padding modes need the pad smaller than the input; keep the output non-empty.
    cfg["size"] = tuple(max(e - 2 * p, p + 1, 1) + rng.randrange(0, 6) for e, p in zip(eff, cfg["padding"]))
    return cfg


@pytest.mark.parametrize("seed", range(60))
def test_random_fuzz(backend, seed):
    cfg = _random_config(random.Random(1000 + seed))
    try:
        run_case(**cfg)
    except AssertionError as err:
        raise AssertionError(f"fuzz config {cfg} failed: {err}") from err



@pytest.mark.parametrize("in_channels,out_channels,size,padding", DEGENERATE_SHAPES)
def test_degenerate_shapes(backend, in_channels, out_channels, size, padding):
    check_degenerate_shape(torch.device("cpu"), in_channels, out_channels, size, padding)


@pytest.mark.parametrize("density", [0.4, 1.0])
@pytest.mark.parametrize("dense_policy", ["never", "always"])
def test_non_finite_input_is_never_lost(backend, monkeypatch, density, dense_policy):
    """NaN/Inf reach every output that a kept stripe computes from them; other outputs are exact.

    Outputs that see a NaN pixel only through pruned stripes are unspecified (a pruned stripe is
    absent on the stripe paths, a zero weight times NaN on the dense hand-over)."""
    monkeypatch.setenv("STRIPECONV_CPU_DENSE", dense_policy)
    gen = torch.Generator().manual_seed(3)
    conv = nn.Conv2d(6, 8, 3, padding=1)
    mask = random_mask(8, (3, 3), density, gen)
    layer = stripeconv.StripeConv2d.from_conv(conv, mask)
    x = torch.randn(2, 6, 7, 7, generator=gen)
    x[0, 1, 3, 2], x[1, 4, 0, 6] = float("nan"), float("inf")
    got = layer(x)
    bad = (~x.isfinite()).any(1, keepdim=True).double()
    reached = F.conv2d(bad, mask[:, None].double(), padding=1) > 0  # a kept stripe sees a bad pixel
    assert reached.any() and (~reached).any()
    assert not got[reached].isfinite().any()
    expected = F.conv2d(x.nan_to_num(0.0, 0.0, 0.0), layer.weight.detach(), layer.bias.detach(), padding=1)
    clean = ~F.conv2d(bad, torch.ones(8, 1, 3, 3, dtype=torch.float64), padding=1).bool()  # sees no bad pixel
    torch.testing.assert_close(got[clean], expected[clean], atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("conv_args", [
    dict(padding=1),
    dict(stride=2, padding=(1, 0), dilation=(1, 2)),
    dict(padding="same", groups=2, bias=False),
    dict(padding=1, padding_mode="reflect"),
])
def test_double_backward(backend, conv_args):
    """Second derivatives (gradient penalties, create_graph=True) against the masked conv."""
    gen = torch.Generator().manual_seed(7)
    conv = nn.Conv2d(4, 6, 3, **conv_args).double()
    x = torch.randn(2, 4, 7, 6, generator=gen, dtype=torch.float64)
    check_double_backward(conv, random_mask(6, (3, 3), 0.5, gen), x, atol=1e-9)


def test_gradgradcheck_of_the_op(backend):
    """Finite differences of the gradients of each op, with asymmetric padding the module cannot express."""
    from stripeconv.ops import stripe_conv2d

    gen = torch.Generator().manual_seed(8)
    mask = random_mask(4, (3, 2), 0.5, gen)
    w = torch.randn(int(mask.sum()), 3, generator=gen, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, generator=gen, dtype=torch.float64, requires_grad=True)
    x = torch.randn(2, 3, 5, 6, generator=gen, dtype=torch.float64, requires_grad=True)

    def conv(x, w, b):
        return stripe_conv2d(x, w, b, mask, [2, 1], [1, 0, 2, 1], [1, 2], 1)

    assert torch.autograd.gradgradcheck(conv, (x, w, b))
