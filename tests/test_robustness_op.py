"""StripeConv2d and the stripe_conv2d ops against nn.Conv2d on random geometry, and their behaviour
on bad input, on the meta device, in 16-bit types and under second-order autograd."""
from __future__ import annotations

import copy
import io
import pickle
import random

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import stripeconv
from stripeconv import StripeConv2d
from stripeconv.packing import pack_weight

stripeconv.backends._module("cpu")  # registers torch.ops.stripeconv_cpu when the extension is built
OP = torch.ops.stripeconv


def _random_case(rng: random.Random) -> dict:
    kernel = (rng.randint(1, 4), rng.randint(1, 4))
    kind = rng.choice(["dense", "grouped", "depthwise"])
    if kind == "depthwise":
        groups = cin = rng.randint(1, 4)
        cout = cin * rng.randint(1, 2)
    else:
        groups = 1 if kind == "dense" else rng.randint(2, 3)
        cin, cout = groups * rng.randint(1, 3), groups * rng.randint(1, 3)
    stride = (rng.randint(1, 3), rng.randint(1, 3))
    padding = rng.choice([0, 1, (2, 0), (1, 3), "valid", "same"])
    if padding == "same":
        stride = (1, 1)
    return dict(
        conv=dict(in_channels=cin, out_channels=cout, kernel_size=kernel, stride=stride, padding=padding,
                  dilation=(rng.randint(1, 2), rng.randint(1, 3)), groups=groups, bias=rng.random() < 0.7,
                  padding_mode=rng.choice(["zeros", "zeros", "reflect", "replicate", "circular"])),
        shape=[rng.choice([0, 1, 3, None]), cin, rng.randint(1, 13), rng.randint(1, 13)],
        density=rng.choice([0.0, 0.4, 0.7, 1.0]),
        layout=rng.choice(["contiguous", "channels_last", "sliced", "transposed"]),
    )


def _layout(x: torch.Tensor, layout: str) -> torch.Tensor:
    if layout == "channels_last" and x.dim() == 4:
        return x.contiguous(memory_format=torch.channels_last)
    if layout == "sliced":
        wide = torch.zeros(*x.shape[:-1], 2 * x.shape[-1], dtype=x.dtype)
        wide[..., ::2] = x
        return wide[..., ::2]
    if layout == "transposed":
        return x.transpose(-1, -2).contiguous().transpose(-1, -2)
    return x


@pytest.mark.parametrize("seed", range(4))
def test_random_geometry_matches_masked_conv(backend, seed):
    """Output and input/weight/bias gradients equal nn.Conv2d on the masked weight (float64), or both raise."""
    rng = random.Random(seed)
    for case in range(12):
        torch.manual_seed(1000 * seed + case)
        c = _random_case(rng)
        conv = nn.Conv2d(**c["conv"], dtype=torch.float64)
        mask = torch.rand(conv.out_channels, *conv.kernel_size) < c["density"]
        if 0 < c["density"] < 1:
            mask[0] = False  # a filter that keeps no stripe
        with torch.no_grad():
            conv.weight.mul_(mask[:, None])
        layer = StripeConv2d.from_conv(conv, mask)
        x = torch.randn([s for s in c["shape"] if s is not None], dtype=torch.float64)
        try:
            expected = conv(x)
        except RuntimeError:
            with pytest.raises(ValueError):
                layer(x)
            continue
        xl = _layout(x.clone(), c["layout"]).requires_grad_()
        got = layer(xl)
        torch.testing.assert_close(got, expected, msg=lambda m: f"{c}: {m}")
        if expected.numel() == 0:
            continue
        grad = torch.randn_like(expected)
        xr = x.clone().requires_grad_()
        conv(xr).backward(grad)
        got.backward(grad)
        torch.testing.assert_close(xl.grad, xr.grad, msg=lambda m: f"{c}: {m}")
        torch.testing.assert_close(layer.packed_weight.grad, pack_weight(conv.weight.grad, mask))
        if conv.bias is not None:
            torch.testing.assert_close(layer.bias.grad, conv.bias.grad)


def test_non_finite_inputs_propagate_along_kept_stripes(backend):
    """A NaN or inf input reaches exactly the outputs whose kept stripes read it (all of them when dense).
    The dense backend multiplies pruned stripes as zeros (0 * inf = NaN): every output whose window
    holds it, which the op contract allows."""
    torch.manual_seed(0)
    for density, stride in [(0.4, 1), (0.4, 2), (1.0, 1)]:
        mask = torch.rand(6, 3, 3) < density
        layer = StripeConv2d(4, 6, 3, padding=1, stride=stride, groups=2, stripe_mask=mask)
        x = torch.randn(2, 4, 9, 9)
        x[0, 1, 3, 3], x[1, 2, 0, 0], x[1, 3, 5, 5] = float("nan"), float("inf"), -float("inf")
        y = layer(x)
        bad = (~torch.isfinite(x)).float()
        reads = torch.ones_like(mask) if backend == "dense" else mask
        reach = F.conv2d(bad, reads[:, None].float().expand(6, 2, 3, 3), stride=stride, padding=1, groups=2) > 0
        assert torch.equal(~torch.isfinite(y), reach)
        if density == 1.0:
            expected = F.conv2d(x, layer.weight, layer.bias, stride=stride, padding=1, groups=2)
            torch.testing.assert_close(y, expected, equal_nan=True)


# ------------------------------------------------------------------------------- autograd
def test_raw_cpu_kernels_refuse_to_be_differentiated():
    """torch.ops.stripeconv_cpu.forward has no derivative: backward through it raises, it does not return None."""
    x = torch.randn(1, 2, 5, 5, requires_grad=True)
    mask = torch.ones(3, 3, 3, dtype=torch.bool)
    y = torch.ops.stripeconv_cpu.forward(x, torch.randn(27, 2), None, mask, [1, 1], [1, 1, 1, 1], [1, 1], 1)
    with pytest.raises(RuntimeError, match="not implemented"):
        y.sum().backward()


@pytest.mark.parametrize("storage", ["transposed", "sliced"])
def test_packed_weight_in_any_storage(backend, storage):
    """The op reads a packed weight by its strides: column-major or sliced storage gives the
    masked conv's output and gradients (float64, stride 2 so grad input runs its phases)."""
    torch.manual_seed(0)
    mask = torch.rand(12, 3, 3) < 0.5
    conv = nn.Conv2d(8, 12, 3, stride=2, padding=1, dtype=torch.float64)
    with torch.no_grad():
        conv.weight.mul_(mask[:, None])
    rows = pack_weight(conv.weight.detach(), mask)
    if storage == "transposed":
        weight = rows.t().contiguous().t()
    else:
        weight = torch.zeros(rows.shape[0], 2 * rows.shape[1], dtype=rows.dtype)[:, ::2]
        weight.copy_(rows)
    assert not weight.is_contiguous()
    weight.requires_grad_()
    bias = conv.bias.detach().clone().requires_grad_()
    x = torch.randn(2, 8, 9, 9, dtype=torch.float64, requires_grad=True)
    xr = x.detach().clone().requires_grad_()
    y = OP.stripe_conv2d(x, weight, bias, mask, [2, 2], [1, 1, 1, 1], [1, 1], 1)
    expected = conv(xr)
    torch.testing.assert_close(y, expected)
    gy = torch.randn_like(expected)
    y.backward(gy)
    expected.backward(gy)
    torch.testing.assert_close(x.grad, xr.grad)
    torch.testing.assert_close(weight.grad, pack_weight(conv.weight.grad, mask))
    torch.testing.assert_close(bias.grad, conv.bias.grad)


def test_only_bias_requires_grad(backend):
    """With a frozen weight and input, backward still fills the bias gradient (and nothing else)."""
    layer = StripeConv2d(3, 4, 3, padding=1, stripe_mask=torch.rand(4, 3, 3) < 0.5)
    layer.packed_weight.requires_grad_(False)
    layer(torch.randn(2, 3, 5, 5)).sum().backward()
    assert layer.packed_weight.grad is None
    torch.testing.assert_close(layer.bias.grad, torch.full((4,), 50.0))


# ------------------------------------------------------------------------------ bad input
def _args(**changes):
    torch.manual_seed(0)
    mask = torch.rand(6, 3, 3) < 0.5
    args = dict(input=torch.randn(2, 4, 8, 8), weight=torch.randn(int(mask.sum()), 4), bias=torch.randn(6),
                stripe_mask=mask, stride=[1, 1], padding=[1, 1, 1, 1], dilation=[1, 1], groups=1)
    args.update(changes)
    return args


def _forward(op, a):
    return op(a["input"], a["weight"], a["bias"], a["stripe_mask"], a["stride"], a["padding"], a["dilation"],
              a["groups"])


@pytest.mark.parametrize("op", ["stripe_conv2d", "stripeconv_cpu.forward", "stripeconv_cpu.conv2d"])
def test_mask_on_another_device_raises(op):
    """A mask on the meta device next to CPU data raises instead of returning an uninitialised tensor."""
    fn = OP.stripe_conv2d if op == "stripe_conv2d" else getattr(torch.ops.stripeconv_cpu, op.split(".")[1])
    a = _args()
    with pytest.raises(ValueError, match="stripe_mask must be on cpu"):
        _forward(fn, {**a, "stripe_mask": a["stripe_mask"].to("meta")})


@pytest.mark.parametrize("change, message", [
    ("extra_rows", r"packed weight has \d+ rows but stripe_mask keeps \d+ stripes"),
    ("bias_dtype", "bias"),
    ("bias_shape", "bias must be"),
])
def test_op_rejects_inconsistent_weight_and_bias(backend, change, message):
    """Weight rows must match the mask and bias must be [out_channels] of the input's dtype, on every backend."""
    a = _args()
    if change == "extra_rows":
        a["weight"] = torch.randn(a["weight"].shape[0] + 2, 4)
    elif change == "bias_dtype":
        a["bias"] = a["bias"].double()
    else:
        a["bias"] = a["bias"][:, None]
    with pytest.raises(ValueError, match=message):
        _forward(OP.stripe_conv2d, a)


@pytest.mark.parametrize("change", ["bias_dtype", "bias_shape", "weight_columns"])
def test_module_rejects_swapped_tensors_after_a_good_call(backend, change):
    """The module's memo of the last accepted input does not hide a .data swap of its own tensors."""
    layer = StripeConv2d(4, 6, 3, padding=1)
    x = torch.randn(2, 4, 5, 5)
    layer(x)
    if change == "bias_dtype":
        layer.bias.data = layer.bias.data.double()
    elif change == "bias_shape":
        layer.bias.data = layer.bias.data[:5]
    else:
        layer.packed_weight.data = layer.packed_weight.data[:, :3]
    with pytest.raises(ValueError, match="bias must be|packed_weight must be"):
        layer(x)


@pytest.mark.parametrize("change, message", [
    ("grad_output_shape", r"grad_output must have shape \[2, 6, 8, 8\]"),
    ("extra_rows", r"packed weight has \d+ rows"),
    ("stride", "stride"),
    ("mask_dtype", "bool"),
])
def test_gradient_ops_validate_their_arguments(backend, change, message):
    """stripe_conv2d_grad_input / _grad_weight raise clear errors on every backend instead of computing garbage."""
    a = _args()
    grad_output, weight, mask, stride = torch.randn(2, 6, 8, 8), a["weight"], a["stripe_mask"], [1, 1]
    if change == "grad_output_shape":
        grad_output = torch.randn(2, 6, 7, 8)
    elif change == "extra_rows":
        weight = torch.randn(weight.shape[0] + 1, 4)
    elif change == "stride":
        stride = [0, 1]
    else:
        mask = mask.to(torch.uint8)
    geometry = (stride, [1, 1, 1, 1], [1, 1], 1)
    with pytest.raises(ValueError, match=message):
        OP.stripe_conv2d_grad_input(grad_output, weight, mask, [2, 4, 8, 8], *geometry)
    with pytest.raises(ValueError, match=message):
        OP.stripe_conv2d_grad_weight(grad_output, a["input"], weight, mask, *geometry)


@pytest.mark.parametrize("kwargs, name", [
    (dict(stride=0), "stride"), (dict(stride=(1, -1)), "stride"), (dict(dilation=0), "dilation"),
    (dict(kernel_size=0), "kernel_size"), (dict(padding=-1), "padding"), (dict(padding=(1, 2, 3)), "padding"),
    (dict(stride=1.5), "stride"),
])
def test_module_rejects_invalid_geometry(kwargs, name):
    """Non-positive stride/dilation/kernel, negative or malformed padding raise a ValueError naming the argument."""
    with pytest.raises(ValueError, match=name):
        StripeConv2d(**{"in_channels": 4, "out_channels": 6, "kernel_size": 3, **kwargs})


# ------------------------------------------------------------------------- module contract
def test_load_state_dict_with_mask_but_no_packed_weight():
    """strict=False with only a new mask: stripes kept by both masks keep their weights, new ones are zero."""
    torch.manual_seed(0)
    layer = StripeConv2d(4, 6, 3, padding=1, stripe_mask=torch.rand(6, 3, 3) < 0.5)
    new_mask = torch.rand(6, 3, 3) < 0.5
    expected = pack_weight(layer.weight.detach(), new_mask)
    result = layer.load_state_dict({"stripe_mask": new_mask}, strict=False)
    assert result.missing_keys == ["packed_weight", "bias"]
    assert torch.equal(layer.stripe_mask, new_mask)
    assert torch.equal(layer.packed_weight, expected)


def test_half_precision_on_cpu_matches_conv2d():
    """.half() works on CPU like nn.Conv2d does: forward and gradients close to the float64 oracle."""
    torch.manual_seed(0)
    mask = torch.rand(8, 3, 3) < 0.5
    layer = StripeConv2d(6, 8, 3, padding=1, stride=2, stripe_mask=mask).half()
    conv = layer.to_conv().double()
    x = torch.randn(2, 6, 9, 9, dtype=torch.float64)
    xh, xd = x.half().requires_grad_(), x.clone().requires_grad_()
    y = layer(xh)
    assert y.dtype == torch.float16
    expected = conv(xd)
    torch.testing.assert_close(y.double(), expected, atol=1e-2, rtol=1e-2)
    y.backward(torch.ones_like(y))
    expected.backward(torch.ones_like(expected))
    torch.testing.assert_close(xh.grad.double(), xd.grad, atol=2e-2, rtol=1e-2)
    torch.testing.assert_close(layer.packed_weight.grad.double(), pack_weight(conv.weight.grad, mask),
                               atol=5e-2, rtol=1e-2)


def test_meta_device_construction_then_load():
    """Built on the meta device (like nn.Conv2d), the layer has the mask's shapes and loads real weights."""
    torch.manual_seed(0)
    mask = torch.rand(6, 3, 3) < 0.5
    source = StripeConv2d(4, 6, 3, padding=1, stripe_mask=mask)
    layer = StripeConv2d(4, 6, 3, padding=1, stripe_mask=mask, device="meta")
    assert layer.packed_weight.is_meta and layer.packed_weight.shape == (int(mask.sum()), 4)
    assert layer(torch.empty(2, 4, 8, 8, device="meta")).shape == (2, 6, 8, 8)
    assert StripeConv2d(4, 6, 3, device="meta").num_stripes == 54
    layer.to_empty(device="cpu")
    layer.load_state_dict(source.state_dict())
    x = torch.randn(2, 4, 8, 8)
    torch.testing.assert_close(layer(x), source(x))


def test_deepcopy_pickle_and_dtype_round_trip(backend):
    """deepcopy, pickle and .to(float64) keep the mask (bool) and compute the same layer."""
    torch.manual_seed(0)
    layer = StripeConv2d(4, 6, 3, padding=1, groups=2, stripe_mask=torch.rand(6, 3, 3) < 0.4)
    x = torch.randn(2, 4, 7, 7)
    for other in (copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))):
        assert torch.equal(other(x), layer(x))
    buf = io.BytesIO()
    torch.save(layer.state_dict(), buf)
    other = StripeConv2d(4, 6, 3, padding=1, groups=2)
    other.load_state_dict(torch.load(io.BytesIO(buf.getvalue())))
    assert torch.equal(other(x), layer(x))
    wide = copy.deepcopy(layer).to(torch.float64)
    assert wide.stripe_mask.dtype == torch.bool and wide.packed_weight.dtype == torch.float64
    torch.testing.assert_close(wide(x.double()).float(), layer(x))


def test_torch_export_with_dynamic_batch(backend):
    """torch.export traces the layer through the op; the exported program runs other batch sizes."""
    layer = StripeConv2d(3, 4, 3, padding=1, stripe_mask=torch.rand(4, 3, 3) < 0.5)
    batch = torch.export.Dim("batch")
    program = torch.export.export(layer, (torch.randn(2, 3, 6, 6),), dynamic_shapes={"input": {0: batch}})
    x = torch.randn(5, 3, 6, 6)
    torch.testing.assert_close(program.module()(x), layer(x))
