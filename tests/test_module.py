"""StripeConv2d's API: construction, conversion, packed storage, state_dict, bad input."""
from __future__ import annotations

import copy
import io
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import stripeconv
from stripeconv import StripeConv2d
from conftest import CPU_BACKENDS
from stripeconv.packing import pack_weight, position_offsets, unpack_weight


def test_packing_round_trip_and_order():
    torch.manual_seed(0)
    weight = torch.randn(5, 3, 2, 3)
    mask = torch.rand(5, 2, 3) < 0.5
    packed = pack_weight(weight, mask)
    assert packed.shape == (int(mask.sum()), 3)
    torch.testing.assert_close(unpack_weight(packed, mask), weight * mask[:, None])
    # Position-major: the rows of position p are offsets[p]:offsets[p+1], filters ascending.
    offsets = position_offsets(mask)
    for p in range(6):
        i, j = divmod(p, 3)
        rows = packed[offsets[p]:offsets[p + 1]]
        torch.testing.assert_close(rows, weight[mask[:, i, j], :, i, j])


def test_only_kept_stripes_are_parameters():
    mask = torch.zeros(8, 3, 3, dtype=torch.bool)
    mask[:, 1, 1] = True
    mask[0] = True
    layer = StripeConv2d(4, 8, 3, padding=1, stripe_mask=mask)
    assert layer.packed_weight.shape == (8 + 8, 4)
    assert layer.num_stripes == 16
    assert layer.density == pytest.approx(16 / 72)
    assert sum(p.numel() for p in layer.parameters()) == 16 * 4 + 8
    # Training leaves pruned stripes at exactly zero: they are not stored at all.
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    layer(torch.randn(2, 4, 5, 5)).square().mean().backward()
    opt.step()
    assert torch.all(layer.weight.permute(0, 2, 3, 1)[~mask] == 0)


def test_from_conv_default_mask_keeps_nonzero_stripes():
    conv = nn.Conv2d(3, 4, 3)
    with torch.no_grad():
        conv.weight[1, :, 0, 2] = 0
        conv.weight[2] = 0
    layer = StripeConv2d.from_conv(conv)
    expected = conv.weight.ne(0).any(1)
    assert torch.equal(layer.stripe_mask, expected)
    assert layer.num_stripes == 36 - 1 - 9
    x = torch.randn(2, 3, 6, 6)
    torch.testing.assert_close(layer(x), conv(x), atol=1e-5, rtol=1e-4)


def test_to_conv_round_trip():
    layer = StripeConv2d(4, 6, (3, 5), stride=2, padding=(1, 2), dilation=(1, 2), groups=2,
                         padding_mode="reflect", stripe_mask=torch.rand(6, 3, 5) < 0.4)
    conv = layer.to_conv()
    assert isinstance(conv, nn.Conv2d) and conv.padding_mode == "reflect" and conv.groups == 2
    x = torch.randn(2, 4, 9, 11)
    torch.testing.assert_close(conv(x), layer(x), atol=1e-5, rtol=1e-4)
    back = StripeConv2d.from_conv(conv, layer.stripe_mask)
    torch.testing.assert_close(back(x), layer(x))


def test_nn_conv2d_arguments():
    for padding in [0, 2, (1, 0), "same", "valid"]:
        conv = nn.Conv2d(3, 6, (2, 3), padding=padding, bias=False)
        layer = StripeConv2d(3, 6, (2, 3), padding=padding, bias=False)
        assert layer.padding == conv.padding and layer.kernel_size == conv.kernel_size
        assert layer.bias is None
    with pytest.raises(ValueError, match="divisible by groups"):
        StripeConv2d(3, 6, 3, groups=2)
    with pytest.raises(ValueError, match="strided"):
        StripeConv2d(3, 6, 3, stride=2, padding="same")
    with pytest.raises(ValueError, match="padding_mode"):
        StripeConv2d(3, 6, 3, padding_mode="mirror")


def test_initialisation_matches_conv2d_distribution():
    torch.manual_seed(0)
    layer = StripeConv2d(64, 64, 3)
    bound = 1 / (64 * 9) ** 0.5
    assert layer.packed_weight.abs().max() <= bound + 1e-6
    assert layer.packed_weight.std() > bound / 3


def test_state_dict_round_trip_whatever_the_fresh_mask():
    torch.manual_seed(1)
    saved = StripeConv2d(4, 6, 3, padding=1, stripe_mask=torch.rand(6, 3, 3) < 0.3)
    buffer = io.BytesIO()
    torch.save(saved.state_dict(), buffer)
    buffer.seek(0)
    fresh = StripeConv2d(4, 6, 3, padding=1)  # all stripes kept: different shapes
    param = fresh.packed_weight
    fresh.load_state_dict(torch.load(buffer))
    assert fresh.packed_weight is param  # resized in place
    assert torch.equal(fresh.stripe_mask, saved.stripe_mask)
    x = torch.randn(2, 4, 7, 7)
    torch.testing.assert_close(fresh(x), saved(x))


def test_convert_then_load_rebuilds_saved_pruned_model():
    def dense():
        torch.manual_seed(5)
        return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 3, stride=2))

    model = dense()
    masks = {"0": torch.rand(8, 3, 3) < 0.5, "2": torch.rand(4, 3, 3) < 0.5}
    stripeconv.convert(model, masks)
    assert isinstance(model[0], StripeConv2d) and isinstance(model[2], StripeConv2d)
    state = model.state_dict()

    rebuilt = stripeconv.convert(dense(), {"0": None, "2": None})
    rebuilt.load_state_dict(state)
    x = torch.randn(2, 3, 9, 9)
    torch.testing.assert_close(rebuilt(x), model(x))


def test_convert_matches_masked_model():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1))
    model.eval()
    masks = {"0": torch.rand(8, 3, 3) < 0.5, "3": torch.rand(4, 1, 1) < 0.5}
    x = torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        for name, mask in masks.items():
            dict(model.named_modules())[name].weight.mul_(mask[:, None])
        expected = model(x)
    torch.testing.assert_close(stripeconv.convert(model, masks)(x), expected, atol=1e-5, rtol=1e-4)


def test_convert_rejects_unknown_or_wrong_modules():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU())
    with pytest.raises(KeyError, match="no module named 'conv9'"):
        stripeconv.convert(model, {"conv9": None})
    with pytest.raises(TypeError, match="expected nn.Conv2d"):
        stripeconv.convert(model, {"1": None})


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"))]


@pytest.fixture
def no_tf32():
    """F.conv2d in IEEE fp32 on CUDA, the stripe kernels' default precision (cuDNN's default is TF32)."""
    old = torch._C._get_cudnn_allow_tf32()
    torch._C._set_cudnn_allow_tf32(False)
    yield
    torch._C._set_cudnn_allow_tf32(old)


@pytest.mark.parametrize("kw", [dict(padding=1), dict(padding=(1, 2), padding_mode="reflect", stride=2),
                                dict(padding="same", dilation=2, groups=2)])
@pytest.mark.parametrize("constant", [False, True])
def test_torch_fx_symbolic_trace(kw, constant):
    """FX tooling (graph rewrites, feature extractors) traces the layer: one op node on the layer's own
    tensors, values and gradients as the module's; the graph follows its buffers across a dtype change."""
    gen = torch.Generator().manual_seed(9)
    layer = StripeConv2d(4, 6, 3, stripe_mask=torch.rand(6, 3, 3, generator=gen) < 0.5, **kw)
    if constant:
        layer.add_constant_channel(torch.randn(6, 3, 3, generator=gen))
    model = nn.Sequential(layer, nn.ReLU())
    graph = torch.fx.symbolic_trace(model)
    ops = [n.target for n in graph.graph.nodes if n.op == "call_function" and "stripeconv" in str(n.target)]
    assert ops == [torch.ops.stripeconv.stripe_conv2d.default]
    x = torch.randn(2, 4, 9, 10, generator=gen, requires_grad=True)
    got, want = graph(x), model(x)
    torch.testing.assert_close(got, want)
    g = torch.randn(got.shape, generator=gen)
    got_grads = torch.autograd.grad(got, (x, layer.packed_weight), g)
    want_grads = torch.autograd.grad(want, (x, layer.packed_weight), g)
    for a, b in zip(got_grads, want_grads):
        torch.testing.assert_close(a, b)
    x64 = x.detach().double()
    torch.testing.assert_close(graph.to(torch.float64)(x64), model.to(torch.float64)(x64))


def test_has_every_public_attribute_of_conv2d():
    """Tools that read a conv's configuration (FLOP counters, summaries) find nn.Conv2d's attributes, with
    nn.Conv2d's values."""
    conv = nn.Conv2d(4, 6, (3, 5), stride=2, padding=(1, 2), dilation=(2, 1), groups=2, bias=False)
    layer = StripeConv2d.from_conv(conv)
    public = {a for a in dir(conv) if not a.startswith("_")}
    assert public <= set(dir(layer)), public - set(dir(layer))
    for name in ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups",
                 "padding_mode", "transposed", "output_padding"):
        assert getattr(layer, name) == getattr(conv, name), name


def test_reset_parameters_draws_like_conv2d_and_survives_to_empty():
    """``reset_parameters`` (what model-init code and meta-device flows call): nn.Conv2d's draws on the
    kept stripes, the mask kept; after ``to_empty()`` (mask without values) it still initialises, and a
    state dict then restores the layer."""
    mask = torch.rand(6, 3, 3, generator=torch.Generator().manual_seed(3)) < 0.5
    conv, layer = nn.Conv2d(4, 6, 3, padding=1), StripeConv2d(4, 6, 3, padding=1, stripe_mask=mask)
    for module in (conv, layer):
        torch.manual_seed(4)
        module.reset_parameters()
    torch.testing.assert_close(layer.weight, conv.weight * mask[:, None], rtol=0, atol=0)
    torch.testing.assert_close(layer.bias, conv.bias, rtol=0, atol=0)
    assert torch.equal(layer.stripe_mask, mask)
    with torch.device("meta"):
        lazy = StripeConv2d(4, 6, 3, padding=1, stripe_mask=mask)
    assert lazy.packed_weight.shape == layer.packed_weight.shape
    lazy = lazy.to_empty(device="cpu")
    lazy.reset_parameters()
    assert lazy.packed_weight.abs().max() <= 1 / 6  # 1 / sqrt(fan_in)
    lazy.load_state_dict(layer.state_dict())
    x = torch.randn(2, 4, 7, 7)
    torch.testing.assert_close(lazy(x), F.conv2d(x, conv.weight * mask[:, None], conv.bias, padding=1))


def test_set_stripe_mask_keeps_surviving_weights():
    layer = StripeConv2d(3, 4, 3)
    before = layer.weight.detach().clone()
    new_mask = torch.rand(4, 3, 3) < 0.5
    new_mask[0] = True
    layer.set_stripe_mask(new_mask & layer.stripe_mask)
    torch.testing.assert_close(layer.weight, before * new_mask[:, None])


@pytest.mark.parametrize("optimizer_name", ["sgd_momentum", "adamw_amsgrad", "adafactor"])
def test_set_stripe_mask_repacks_grad_and_optimizer_state(optimizer_name):
    """Training goes on across a mask change: the gradient and the optimizer's per-stripe state of
    stripes kept before stay theirs, new stripes start at zero, per-column state stays; the next
    step runs."""
    if optimizer_name == "adafactor" and not hasattr(torch.optim, "Adafactor"):
        pytest.skip("torch.optim.Adafactor needs torch >= 2.5")
    make_optimizer = {"sgd_momentum": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
                      "adamw_amsgrad": lambda p: torch.optim.AdamW(p, lr=0.01, amsgrad=True),
                      "adafactor": lambda p: torch.optim.Adafactor(p, lr=0.01)}[optimizer_name]
    gen = torch.Generator().manual_seed(5)
    layer = StripeConv2d(3, 4, 3, padding=1, stripe_mask=torch.rand(4, 3, 3, generator=gen) < 0.7)
    optimizer = make_optimizer(layer.parameters())
    x = torch.randn(2, 3, 6, 6, generator=gen)
    for _ in range(2):
        optimizer.zero_grad()
        layer(x).square().sum().backward()
        optimizer.step()
    layer(x).square().sum().backward()  # a gradient pending at the change
    old_mask, weight = layer.stripe_mask.clone(), layer.packed_weight
    old = {"grad": weight.grad.clone(), **{k: v.clone() for k, v in optimizer.state[weight].items() if v.dim()}}
    new_mask = torch.rand(4, 3, 3, generator=gen) < 0.5
    layer.set_stripe_mask(new_mask, optimizer=optimizer)
    assert layer.packed_weight is weight
    new = {"grad": weight.grad, **{k: v for k, v in optimizer.state[weight].items() if v.dim()}}
    assert new.keys() == old.keys() and len(new) >= 2
    for key, value in old.items():
        if value.shape[0] == 1:  # per column (Adafactor's col_var)
            torch.testing.assert_close(new[key], value, msg=key)
            continue
        want = unpack_weight(value, old_mask) * new_mask[:, None]
        torch.testing.assert_close(unpack_weight(new[key], new_mask), want, msg=key)
    optimizer.step()
    optimizer.zero_grad()
    layer(x).square().sum().backward()
    optimizer.step()
    assert weight.shape == (int(new_mask.sum()), 3) and torch.isfinite(weight).all()


@pytest.mark.parametrize("device,backend_name", [("cpu", name) for name in CPU_BACKENDS] + [
    pytest.param("cuda", None, marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"))])
@pytest.mark.parametrize("compiled", [False, True])
def test_set_stripe_mask_inside_a_training_loop(compiled, device, backend_name, no_tf32, monkeypatch):
    """The usual loop: the last iteration's loss (and so its graph) is alive while the next forward
    runs. Gradients after the change are F.conv2d's on the new masked weight; hooks stay. On CPU
    once per CPU backend (their eager and compiled routes differ), on CUDA with the default one."""
    monkeypatch.setattr(stripeconv.backends, "_selected", None)  # restored after the test
    stripeconv.set_backend(backend_name)
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(6)
    layer = StripeConv2d(3, 4, 3, padding=1).to(device)
    run = torch.compile(layer, backend="aot_eager") if compiled else layer
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.01, momentum=0.9)
    seen = []
    layer.packed_weight.register_hook(lambda g: seen.append(g.shape[0]))
    x = torch.randn(2, 3, 6, 6, generator=gen).to(device)
    masks = [(torch.rand(4, 3, 3, generator=gen) < d).to(device) for d in (0.7, 0.4)]
    for step in range(6):
        optimizer.zero_grad()
        loss = run(x).square().mean()
        loss.backward()
        if step % 2:
            dense = layer.weight.detach().requires_grad_()
            F.conv2d(x, dense, layer.bias.detach(), padding=1).square().mean().backward()
            torch.testing.assert_close(layer.packed_weight.grad, pack_weight(dense.grad, layer.stripe_mask),
                                       atol=1e-4, rtol=1e-4)
        optimizer.step()
        if step in (1, 3):
            layer.set_stripe_mask(masks[step // 2], optimizer=optimizer)
    assert seen == [36, 36] + [int(masks[0].sum())] * 2 + [int(masks[1].sum())] * 2


def test_load_state_dict_of_another_mask_while_a_graph_is_alive():
    """Loading a layer of another stripe count mid-run: the old gradient is dropped, and the next
    backward works although the last loss (and its graph) is alive."""
    gen = torch.Generator().manual_seed(8)
    source = StripeConv2d(3, 4, 3, padding=1, stripe_mask=torch.rand(4, 3, 3, generator=gen) < 0.5)
    layer = StripeConv2d(3, 4, 3, padding=1)
    x = torch.randn(2, 3, 6, 6, generator=gen)
    loss = layer(x).square().sum()
    loss.backward()
    layer.load_state_dict(source.state_dict())
    assert layer.packed_weight.grad is None
    loss = layer(x).square().sum()
    loss.backward()
    source(x).square().sum().backward()
    torch.testing.assert_close(layer.packed_weight.grad, source.packed_weight.grad)


@pytest.mark.parametrize("device", DEVICES)
def test_compiled_layer_with_dynamic_stripe_counts(device, no_tf32):
    """With Dynamo's parameter shapes dynamic, one graph serves every stripe count after the first
    change (otherwise each count recompiles), with the op's values and gradients."""
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(7)
    layer = StripeConv2d(3, 4, 3, padding=1).to(device)
    frames = []
    backend = lambda gm, example_inputs: frames.append(gm) or gm  # noqa: E731
    x = torch.randn(2, 3, 6, 6, generator=gen).to(device)
    with torch._dynamo.config.patch(force_parameter_static_shapes=False):
        run = torch.compile(layer, backend=backend)
        for density in (1.0, 0.7, 0.5, 0.3, 0.2):
            layer.set_stripe_mask((torch.rand(4, 3, 3, generator=gen) < density).to(device))
            layer.zero_grad()
            y = run(x)
            y.square().sum().backward()
            dense = layer.weight.detach().requires_grad_()
            want = F.conv2d(x, dense, layer.bias.detach(), padding=1)
            want.square().sum().backward()
            torch.testing.assert_close(y, want, atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(layer.packed_weight.grad, pack_weight(dense.grad, layer.stripe_mask),
                                       atol=1e-4, rtol=1e-4)
    if torch.__version__ >= (2, 6):  # torch 2.4's Dynamo recompiles per count despite the setting
        assert len(frames) <= 2, f"{len(frames)} graphs for 5 stripe counts"


def test_set_stripe_mask_refuses_optimizer_state_it_cannot_repack():
    layer = StripeConv2d(3, 4, 3)
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.1)
    optimizer.state[layer.packed_weight]["scale"] = torch.ones(layer.num_stripes, 2)
    mask = layer.stripe_mask.clone()
    with pytest.raises(ValueError, match="optimizer state 'scale' .* cannot be repacked"):
        layer.set_stripe_mask(torch.zeros(4, 3, 3, dtype=torch.bool), optimizer=optimizer)
    assert torch.equal(layer.stripe_mask, mask) and layer.packed_weight.shape == (36, 3)  # unchanged


# ----------------------------------------------------------------------------- bad input
def test_wrong_channel_count_names_expected_and_got():
    layer = StripeConv2d(4, 6, 3)
    with pytest.raises(ValueError, match="expected input with 4 channels, got 3"):
        layer(torch.randn(2, 3, 8, 8))


@pytest.mark.parametrize("shape", [(8, 8), (1, 2, 4, 8, 8), ()])
def test_wrong_ndim(shape):
    layer = StripeConv2d(4, 6, 3)
    with pytest.raises(ValueError, match="3-D .* or 4-D"):
        layer(torch.randn(shape))


def test_mask_of_wrong_shape_or_dtype():
    with pytest.raises(ValueError, match=r"shape \[out_channels, kh, kw\] = \[6, 3, 3\]"):
        StripeConv2d(4, 6, 3, stripe_mask=torch.ones(6, 3, 2, dtype=torch.bool))
    with pytest.raises(TypeError, match="torch.bool"):
        StripeConv2d(4, 6, 3, stripe_mask=torch.ones(6, 3, 3))
    layer = StripeConv2d(4, 6, 3)
    with pytest.raises(ValueError, match="shape"):
        layer.set_stripe_mask(torch.ones(5, 3, 3, dtype=torch.bool))


def test_dtype_mismatch():
    layer = StripeConv2d(4, 6, 3)
    with pytest.raises(TypeError, match="does not match the weight dtype"):
        layer(torch.randn(1, 4, 8, 8, dtype=torch.float64))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("amp", [torch.bfloat16, torch.float16])
def test_autocast_runs_like_conv2d(device, amp):
    """Under torch.autocast the layer computes in the autocast dtype from fp32 weights, as nn.Conv2d does,
    and its fp32 parameters get fp32 gradients equal to the masked conv's."""
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 12, 3, padding=1).to(device)
    mask = (torch.rand(12, 3, 3) < 0.5).to(device)
    layer = StripeConv2d.from_conv(conv, mask)
    masked = nn.Conv2d(8, 12, 3, padding=1).to(device)
    with torch.no_grad():
        masked.weight.copy_(conv.weight * mask[:, None])
        masked.bias.copy_(conv.bias)
    x = torch.randn(2, 8, 9, 9, device=device)
    with torch.autocast(device, dtype=amp):
        y, want = layer(x.to(amp)), masked(x)  # the input may already be in the autocast dtype, or not
        assert layer(x).dtype == want.dtype == y.dtype == amp
    torch.testing.assert_close(y.float(), want.float(), atol=3e-2, rtol=3e-2)
    g = torch.randn_like(y)
    y.backward(g)
    want.backward(g)
    assert layer.packed_weight.grad.dtype == torch.float32 and layer.bias.grad.dtype == torch.float32
    torch.testing.assert_close(layer.packed_weight.grad, pack_weight(masked.weight.grad, mask), atol=0.2, rtol=3e-2)
    torch.testing.assert_close(layer.bias.grad, masked.bias.grad, atol=0.2, rtol=3e-2)
    with pytest.raises(TypeError, match="does not match the weight dtype"):  # outside autocast: no silent cast
        layer(x.to(amp))


def test_checks_still_refuse_bad_input_after_good_input_passed():
    """The layer skips checks for inputs like the last one accepted; anything else is checked anew."""
    layer = StripeConv2d(4, 6, 3, padding=1)
    good = torch.randn(2, 4, 5, 5)
    layer(good)
    layer(good)
    with pytest.raises(ValueError, match="expected input with 4 channels, got 3"):
        layer(torch.randn(2, 3, 5, 5))
    with pytest.raises(ValueError, match="3-D .* or 4-D"):
        layer(torch.randn(1, 2, 4, 5, 5))
    with pytest.raises(TypeError, match="does not match the weight dtype"):
        layer(good.double())
    layer.double()  # the weight's dtype is part of what was accepted
    with pytest.raises(TypeError, match="does not match the weight dtype"):
        layer(good)
    layer(good.double())
    with pytest.raises(RuntimeError, match="weights are on cpu"):
        layer(good.double().to("meta"))
    small = StripeConv2d(4, 6, 3)
    small(torch.randn(1, 4, 3, 3))
    with pytest.raises(ValueError):  # output size 0 for a 2x2 input without padding
        small(torch.randn(1, 4, 2, 2))
    small(torch.randn(1, 4, 3, 3))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # another dtype is accepted under autocast only ...
        small(torch.randn(1, 4, 3, 3, dtype=torch.bfloat16))
    with pytest.raises(TypeError, match="does not match the weight dtype"):  # ... and is not remembered
        small(torch.randn(1, 4, 3, 3, dtype=torch.bfloat16))


def test_parametrized_weight_reaches_the_kernel():
    """A parametrization moves packed_weight out of the parameter dict; the forward must use its value."""
    from torch.nn.utils import parametrize

    class Doubled(nn.Module):
        def forward(self, w):
            return 2 * w

    torch.manual_seed(0)
    layer = StripeConv2d(4, 6, 3, padding=1, stripe_mask=torch.rand(6, 3, 3) < 0.5)
    x = torch.randn(2, 4, 6, 6)
    want = F.conv2d(x, 2 * layer.weight, layer.bias, padding=1)
    parametrize.register_parametrization(layer, "packed_weight", Doubled())
    torch.testing.assert_close(layer(x), want)
    layer(x).sum().backward()
    assert layer.parametrizations.packed_weight.original.grad is not None


def test_compiled_forward_does_not_recompile_when_eager_calls_change_the_input_shape():
    torch._dynamo.reset()
    layer = StripeConv2d(4, 6, 3, padding=1, stripe_mask=torch.rand(6, 3, 3) < 0.5)
    x, other = torch.randn(2, 4, 6, 6), torch.randn(1, 4, 7, 7)
    layer(x)  # eager: remembers x's shape
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), layer(x))
    layer(other)  # eager again, with another shape
    with torch._dynamo.config.patch(error_on_recompile=True):
        torch.testing.assert_close(compiled(x), layer(x))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_device_mismatch():
    layer = StripeConv2d(4, 6, 3)
    with pytest.raises(RuntimeError, match="weights are on"):
        layer(torch.randn(1, 4, 8, 8, device="cuda"))


def test_device_mismatch_meta():
    layer = StripeConv2d(4, 6, 3)
    with pytest.raises(RuntimeError, match="weights are on cpu"):
        layer(torch.randn(1, 4, 8, 8, device="meta"))


def test_inconsistent_state_dict():
    layer = StripeConv2d(4, 6, 3)
    state = layer.state_dict()
    state["stripe_mask"] = state["stripe_mask"].clone()
    state["stripe_mask"][0, 0, 0] = False
    with pytest.raises(RuntimeError, match="stripe_mask keeps 53 stripes, so packed_weight must be"):
        StripeConv2d(4, 6, 3).load_state_dict(state)
    state = layer.state_dict()
    state["stripe_mask"] = torch.ones(6, 3, 3)
    with pytest.raises(TypeError, match="torch.bool"):
        StripeConv2d(4, 6, 3).load_state_dict(state)


def test_op_validates_its_arguments():
    x = torch.randn(1, 4, 6, 6)
    mask = torch.ones(6, 3, 3, dtype=torch.bool)
    weight = torch.randn(54, 4)
    op = torch.ops.stripeconv.stripe_conv2d
    with pytest.raises(ValueError, match="padding takes 4"):
        op(x, weight, None, mask, [1, 1], [1, 1], [1, 1], 1)
    with pytest.raises(ValueError, match=r"\[\*, 4\]"):
        op(x, torch.randn(54, 3), None, mask, [1, 1], [1, 1, 1, 1], [1, 1], 1)


# ------------------------------------------------------------------------------ backends
def test_backend_selection():
    assert "reference" in stripeconv.available_backends()
    with pytest.raises(ValueError, match="unknown stripeconv backend 'fast'"):
        stripeconv.set_backend("fast")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="backend 'cuda' is not available"):
            stripeconv.set_backend("cuda")
    stripeconv.set_backend("reference")
    try:
        assert stripeconv.get_backend() == "reference"
        layer = StripeConv2d(2, 2, 3)
        x = torch.randn(1, 2, 5, 5)
        torch.testing.assert_close(layer(x), F.conv2d(x, layer.weight, layer.bias))
    finally:
        stripeconv.set_backend(None)
    assert stripeconv.get_backend() is None


def test_cuda_kernels_are_never_a_default(monkeypatch):
    """On CUDA without triton the default is the dense conv: the cuda kernels run only when pinned."""
    from stripeconv import backends

    monkeypatch.setattr(backends._module("triton"), "is_available", lambda: (False, "no triton"))
    monkeypatch.setattr(backends._module("cuda"), "is_available", lambda: (True, ""))
    monkeypatch.setattr(backends, "_default", {})
    assert backends.resolve(torch.device("cuda")).NAME == "dense"


def _import_with_backend(name: str):
    import os
    import subprocess
    import sys

    code = "import stripeconv; print(stripeconv.get_backend())"
    env = {**os.environ, "STRIPECONV_BACKEND": name}
    env.pop("TRITON_INTERPRET", None)
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)


@pytest.mark.parametrize("name", ["reference", "dense", "cpu"])
def test_backend_env_var(name):
    out = _import_with_backend(name)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == name


def test_backend_env_var_refused_with_reason():
    bad = _import_with_backend("nope")
    assert bad.returncode != 0 and "unknown stripeconv backend 'nope'" in bad.stderr
    # A backend that cannot run here says why (not an import error); on a GPU machine it is pinned.
    triton = _import_with_backend("triton")
    if torch.cuda.is_available() and triton.returncode == 0:
        assert triton.stdout.strip() == "triton"
    else:
        assert triton.returncode != 0 and "stripeconv backend 'triton' is not available" in triton.stderr, triton.stderr


def test_compiled_cpu_backend_is_built():
    """The C++ kernels are part of every install: their absence is a broken build, not a skip."""
    ok, reason = stripeconv.backends._module("cpu").is_available()
    assert ok, reason
    assert "cpu" in stripeconv.available_backends()


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("bias", [True, False])
def test_eager_cpu_path_equals_the_op(channels_last, bias, monkeypatch):
    """Eager CPU calls take the compiled entry point with C++ autograd: same values and gradients as the op."""
    from stripeconv import backends

    stripeconv.set_backend(None)
    torch.manual_seed(0)
    mask = torch.rand(6, 3, 3) < 0.5
    layer = StripeConv2d(4, 6, 3, stride=(1, 2), padding=1, bias=bias, stripe_mask=mask)
    x = torch.randn(2, 4, 7, 9)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)

    calls = []
    cpu = backends.resolve(torch.device("cpu"))
    assert cpu.NAME == "cpu" and backends.eager_conv2d(x) is cpu.eager_conv2d
    monkeypatch.setattr(cpu, "eager_conv2d", lambda *a: calls.append(1) or torch.ops.stripeconv_cpu.conv2d(*a))

    def run(module_forward):
        xi = x.detach().clone().requires_grad_(True)
        out = module_forward(xi)
        gy = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
        gy = gy.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        grads = torch.autograd.grad(out, [xi] + list(layer.parameters()), gy)
        return out, grads

    eager_out, eager_grads = run(layer)
    assert calls, "the eager CPU path was not taken"
    pads = layer._pads
    op_out, op_grads = run(lambda xi: stripeconv.ops.stripe_conv2d(
        xi, layer.packed_weight, layer.bias, layer.stripe_mask, layer.stride, pads, layer.dilation, layer.groups))
    torch.testing.assert_close(eager_out, op_out, rtol=0, atol=0)
    assert eager_out.is_contiguous(memory_format=torch.channels_last) == channels_last
    for a, b in zip(eager_grads, op_grads):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert eager_grads[0].is_contiguous(memory_format=torch.channels_last) == channels_last
    oracle = F.conv2d(x, layer.weight, layer.bias, layer.stride, 1)
    torch.testing.assert_close(eager_out, oracle, rtol=1e-4, atol=1e-5)


def test_eager_cpu_path_gradcheck_and_fake_tensors():
    stripeconv.set_backend(None)
    torch.manual_seed(0)
    layer = StripeConv2d(3, 4, 3, padding=1, stripe_mask=torch.rand(4, 3, 3) < 0.6).double()
    x = torch.randn(2, 3, 5, 5, dtype=torch.double, requires_grad=True)
    w, b = layer.packed_weight, layer.bias
    fn = lambda x, w, b: torch.ops.stripeconv_cpu.conv2d(x, w, b, layer.stripe_mask, [1, 1], [1, 1, 1, 1], [1, 1], 1)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, w, b))
    from torch._subclasses.fake_tensor import FakeTensorMode

    layer = StripeConv2d(3, 4, 3, padding=1, stripe_mask=torch.rand(4, 3, 3) < 0.6)
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    x = mode.from_tensor(torch.randn(2, 3, 5, 5).contiguous(memory_format=torch.channels_last))
    with mode:  # shape propagation without compiling (the entry point has a fake kernel)
        out = layer(x)
        assert out.shape == (2, 4, 5, 5) and out.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("name", ["reference", "dense"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_eager_python_backend_path_equals_the_op(name, channels_last):
    """Eager calls on a Python backend run one autograd.Function around the backend, no custom op:
    the op's values, layouts and first- and second-order gradients, bit for bit."""
    from conftest import custom_ops_refused

    from stripeconv import ops

    stripeconv.set_backend(name)
    try:
        torch.manual_seed(0)
        layer = StripeConv2d(4, 6, 3, stride=(2, 1), padding=1, stripe_mask=torch.rand(6, 3, 3) < 0.5).double()
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        x = torch.randn(2, 4, 7, 9, dtype=torch.double).contiguous(memory_format=fmt)
        params = [layer.packed_weight, layer.bias]

        def run(forward, create_graph):
            xi = x.detach().clone().requires_grad_(True)
            out = forward(xi)
            gy = torch.randn(out.shape, dtype=out.dtype, generator=torch.Generator().manual_seed(1))
            grads = torch.autograd.grad(out, [xi] + params, gy.contiguous(memory_format=fmt), create_graph=create_graph)
            if create_graph:  # a gradient penalty: second-order terms through the gradient ops
                grads = grads + torch.autograd.grad(sum(g.square().sum() for g in grads), [xi] + params,
                                                    materialize_grads=True)
            return out, grads

        def op(xi):
            return ops.stripe_conv2d(xi, layer.packed_weight, layer.bias, layer.stripe_mask, layer.stride,
                                     layer._pads, layer.dilation, layer.groups)

        for create_graph in (False, True):
            want_out, want_grads = run(op, create_graph)
            with custom_ops_refused(gradient_ops=not create_graph):  # create_graph needs the gradient ops
                out, grads = run(layer, create_graph)
            torch.testing.assert_close(out, want_out, rtol=0, atol=0)
            assert out.is_contiguous(memory_format=fmt) and grads[0].is_contiguous(memory_format=fmt)
            assert len(grads) == len(want_grads)
            for a, b in zip(grads, want_grads):
                torch.testing.assert_close(a, b, rtol=0, atol=0)
        oracle = F.conv2d(x, layer.weight, layer.bias, layer.stride, 1)
        torch.testing.assert_close(out, oracle)
    finally:
        stripeconv.set_backend(None)


def test_eager_python_backend_path_leaves_fake_meta_and_traced_calls_to_the_op():
    """Fake tensors, meta tensors and jit tracing need the custom op (its fake kernel, its graph node)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from stripeconv import backends

    stripeconv.set_backend("dense")
    try:
        layer = StripeConv2d(3, 4, 3, padding=1, stripe_mask=torch.rand(4, 3, 3) < 0.6)
        x = torch.randn(2, 3, 5, 5)
        assert backends.eager_conv2d(x) is not None
        assert backends.eager_conv2d(x.to("meta")) is None
        assert copy.deepcopy(layer).to("meta")(x.to("meta")).shape == (2, 4, 5, 5)
        with FakeTensorMode(allow_non_fake_inputs=True) as mode:
            fake = mode.from_tensor(x)
            assert backends.eager_conv2d(fake) is None
            assert layer(fake).shape == (2, 4, 5, 5)
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the tracer's notes on Python-side shape checks
            traced = torch.jit.trace(layer, x)
        assert "stripeconv::stripe_conv2d" in str(traced.graph)
        torch.testing.assert_close(traced(x), layer(x))
    finally:
        stripeconv.set_backend(None)


@pytest.mark.parametrize("name", ["cpu", "dense", "reference"])
def test_forward_mode_ad_carries_the_tangent(name):
    """Dual inputs and weights, with or without grad mode: the tangent is the conv's directional derivative."""
    from torch.autograd import forward_ad

    stripeconv.set_backend(name)
    try:
        torch.manual_seed(0)
        layer = StripeConv2d(3, 4, 3, padding=1, stride=(2, 1), stripe_mask=torch.rand(4, 3, 3) < 0.5)
        x, dx = torch.randn(2, 3, 5, 6), torch.randn(2, 3, 5, 6)
        dw, db = torch.randn_like(layer.packed_weight), torch.randn_like(layer.bias)
        w, b = layer.packed_weight.detach(), layer.bias.detach()
        want = (F.conv2d(dx, unpack_weight(w, layer.stripe_mask), None, (2, 1), 1)
                + F.conv2d(x, unpack_weight(dw, layer.stripe_mask), db, (2, 1), 1))
        for grad_mode in (True, False):
            with torch.set_grad_enabled(grad_mode), forward_ad.dual_level():
                duals = {"packed_weight": forward_ad.make_dual(w, dw), "bias": forward_ad.make_dual(b, db)}
                out = torch.func.functional_call(layer, duals, (forward_ad.make_dual(x, dx),))
                primal, tangent = forward_ad.unpack_dual(out)
            torch.testing.assert_close(primal, layer(x).detach())
            torch.testing.assert_close(tangent, want, atol=1e-5, rtol=1e-5)
    finally:
        stripeconv.set_backend(None)


def test_pinned_reference_backend_skips_the_eager_cpu_path(monkeypatch):
    from stripeconv import backends

    stripeconv.set_backend("reference")
    try:
        assert backends.eager_conv2d(torch.randn(1)) is not backends._module("cpu").eager_conv2d
        calls = []
        ref = backends._module("reference")
        orig = ref.forward
        monkeypatch.setattr(ref, "forward", lambda *a: calls.append(1) or orig(*a))
        layer = StripeConv2d(3, 4, 3, padding=1)
        layer(torch.randn(1, 3, 5, 5))
        assert calls
    finally:
        stripeconv.set_backend(None)


def test_compiled_layers_call_lean_kernel_ops_and_follow_the_pinned_backend():
    """Under torch.compile, a CPU layer the cpu backend serves calls its C++ ops, as eager mode does;
    pinning a Python backend recompiles to the private ``stripeconv::_compiled_*`` ops (the backend
    calls without the custom op's Python layers), forward and backward; torch.export keeps the op."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    torch._dynamo.reset()
    graphs = []

    def record(gm, example_inputs):
        graphs.append(sorted({str(n.target).rsplit(".", 1)[0] for n in gm.graph.nodes
                              if n.op == "call_function" and str(n.target).startswith("stripeconv")}))
        return make_boxed_func(gm.forward)

    torch.manual_seed(0)
    layer = StripeConv2d(4, 6, 3, padding=1, stripe_mask=torch.rand(6, 3, 3) < 0.4)
    x = torch.randn(2, 4, 8, 8, requires_grad=True)
    compiled = torch.compile(layer, backend=aot_autograd(fw_compiler=record, bw_compiler=record), fullgraph=True)
    try:
        stripeconv.set_backend(None)
        torch.testing.assert_close(compiled(x), layer(x))
        stripeconv.set_backend("reference")
        reference = compiled(x)
        torch.testing.assert_close(reference, layer(x))
        reference.square().sum().backward()  # the backward graph is compiled when it first runs
        grads = x.grad.clone(), layer.packed_weight.grad.clone()
        x.grad, layer.packed_weight.grad = None, None
        layer(x).square().sum().backward()
        torch.testing.assert_close(grads, (x.grad, layer.packed_weight.grad))
        x.grad, layer.packed_weight.grad = None, None
        stripeconv.set_backend("cpu")
        out = compiled(x)
    finally:
        stripeconv.set_backend(None)
    if hasattr(torch.compiler, "_is_exporting_flag"):
        assert graphs[:3] == [["stripeconv_cpu.forward"], ["stripeconv._compiled_conv2d"],
                              ["stripeconv._compiled_grad_input", "stripeconv._compiled_grad_weight"]], graphs
        assert graphs[3:] == [["stripeconv_cpu.forward"]], graphs
    else:  # a torch whose compile cannot be told from export keeps the op
        assert graphs[0] == ["stripeconv.stripe_conv2d"], graphs
    out.square().sum().backward()
    grad_x, grad_w = x.grad.clone(), layer.packed_weight.grad.clone()
    x.grad, layer.packed_weight.grad = None, None
    layer(x).square().sum().backward()
    torch.testing.assert_close(grad_x, x.grad)
    torch.testing.assert_close(grad_w, layer.packed_weight.grad)
    exported = torch.export.export(layer, (x.detach(),))
    targets = {str(n.target).split(".")[0] for n in exported.graph.nodes if n.op == "call_function"}
    assert "stripeconv" in targets and "stripeconv_cpu" not in targets, targets
