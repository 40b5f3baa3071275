"""torch.func over StripeConv2d and the op: vmap over data and weights, batched gradients, grad, jacrev,
jvp, jacfwd, hessian, per-sample gradients and gradients of gradients, each against F.conv2d on the
masked weight."""
from __future__ import annotations

import contextlib
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, hessian, jacfwd, jacrev, jvp, vmap

import stripeconv
import stripeconv.func
from conftest import random_mask
from stripeconv.ops import transform_conv2d
from stripeconv.packing import pack_weight, unpack_weight


@contextlib.contextmanager
def _no_fallback():
    """torch's warning that an op falls back to its per-index loop is an error where the ops have
    batching rules (torch >= 2.5), and silenced where they cannot."""
    with warnings.catch_warnings():
        warnings.simplefilter("error" if stripeconv.func.HAS_BATCHING_RULES else "ignore", UserWarning)
        yield


def _layer(seed: int, **kw) -> stripeconv.StripeConv2d:
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    return stripeconv.StripeConv2d(3, 4, 3, stripe_mask=random_mask(4, (3, 3), 0.5, gen), **kw)


@pytest.mark.parametrize("in_dim", [0, 1])
def test_vmap_over_batches_and_backward(backend, in_dim):
    layer = _layer(0, padding=1, stride=2)
    x = torch.randn(5, 2, 3, 6, 7, requires_grad=True)
    y = vmap(layer, in_dims=in_dim)(x if in_dim == 0 else x.transpose(0, 1))
    xr = x.detach().clone().requires_grad_(True)
    expected = layer(xr.flatten(0, 1)).unflatten(0, (5, 2))
    torch.testing.assert_close(y, expected)  # the vmapped dimension comes first in the result
    y.square().sum().backward()
    weight_grad = layer.packed_weight.grad.clone()
    layer.zero_grad()
    expected.square().sum().backward()
    torch.testing.assert_close(x.grad, xr.grad)
    torch.testing.assert_close(weight_grad, layer.packed_weight.grad)


def test_vmap_over_weights(backend):
    """An ensemble: one input, a batch of packed weights and biases (one op call per member)."""
    layer = _layer(1, padding=(0, 1), dilation=2)
    x = torch.randn(2, 3, 8, 8)
    weights = torch.randn(4, *layer.packed_weight.shape)
    biases = torch.randn(4, 4)
    with torch.no_grad():
        got = vmap(lambda w, b: functional_call(layer, {"packed_weight": w, "bias": b}, (x,)))(weights, biases)
        for i in range(4):
            expected = functional_call(layer, {"packed_weight": weights[i], "bias": biases[i]}, (x,))
            torch.testing.assert_close(got[i], expected)


@pytest.mark.parametrize("data", ["shared", "batched"])
def test_ensemble_gradients_as_one_grouped_layer(backend, data, monkeypatch):
    """An ensemble (stacked weights and biases) with shared or per-member data: forward, and the gradients
    of every argument, against F.conv2d; each op runs once with the members side by side, also when its
    repeated shared operand is split in chunks."""
    gen = torch.Generator().manual_seed(11)
    layer = stripeconv.StripeConv2d(4, 6, (3, 2), padding=(1, 0), stride=(2, 1), dilation=(1, 2), groups=2,
                                    stripe_mask=random_mask(6, (3, 2), 0.5, gen))
    members = 3
    ws = torch.randn(members, *layer.packed_weight.shape, generator=gen)
    bs = torch.randn(members, 6, generator=gen)
    x = torch.randn(*((members,) if data == "batched" else ()), 2, 4, 7, 8, generator=gen)
    x_dim = 0 if data == "batched" else None

    def loss(conv):
        return lambda w, b, x: conv(w, b, x).sin().sum()

    def grads(conv):
        return vmap(grad(loss(conv), argnums=(0, 1, 2)), in_dims=(0, 0, x_dim))(ws, bs, x)

    want = grads(_oracle(layer))
    with _no_fallback():
        torch.testing.assert_close(vmap(_stripe(layer), in_dims=(0, 0, x_dim))(ws, bs, x),
                                   vmap(_oracle(layer), in_dims=(0, 0, x_dim))(ws, bs, x))
        for chunked in (False, True):
            if chunked:  # one member a call
                monkeypatch.setattr(stripeconv.func, "_FOLD_REPEAT_BYTES", 1)
            for g, e in zip(grads(_stripe(layer)), want):
                torch.testing.assert_close(g, e, atol=1e-4, rtol=1e-4)


def test_batched_grad_outputs(backend):
    """torch.autograd.grad(is_grads_batched=True) vmaps the backward: rows of the vector-Jacobian product."""
    layer = _layer(2, padding=1)
    x = torch.randn(2, 3, 5, 6, requires_grad=True)
    y = layer(x)
    grad_outputs = torch.randn(3, *y.shape)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torch's note when an op falls back to a loop
        gx, gw = torch.autograd.grad(y, (x, layer.packed_weight), grad_outputs, is_grads_batched=True,
                                     retain_graph=True)
    for i in range(3):
        ex, ew = torch.autograd.grad(y, (x, layer.packed_weight), grad_outputs[i], retain_graph=True)
        torch.testing.assert_close(gx[i], ex)
        torch.testing.assert_close(gw[i], ew)


def _oracle(layer):
    """F.conv2d on the masked weight, as a function of (packed weight, bias, input)."""
    def conv(w, b, x):
        return F.conv2d(x, unpack_weight(w, layer.stripe_mask), b, layer.stride, layer.padding, layer.dilation,
                        layer.groups)
    return conv


def _stripe(layer):
    def conv(w, b, x):
        return functional_call(layer, {"packed_weight": w, "bias": b}, (x,))
    return conv


@pytest.mark.parametrize("kw", [dict(padding=1), dict(stride=2, dilation=(1, 2), padding=(2, 1))])
def test_func_grad_of_weight_bias_and_input(backend, kw):
    layer = _layer(3, **kw)
    w, b, x = layer.packed_weight.detach(), layer.bias.detach(), torch.randn(2, 3, 7, 8)
    target = torch.randn_like(layer(x))

    def loss(conv):
        return lambda w, b, x: (conv(w, b, x) - target).square().sum()

    got = grad(loss(_stripe(layer)), argnums=(0, 1, 2))(w, b, x)
    want = grad(loss(_oracle(layer)), argnums=(0, 1, 2))(w, b, x)
    for g, e in zip(got, want):
        torch.testing.assert_close(g, e, atol=1e-4, rtol=1e-4)


def test_per_sample_gradients_with_vmap_of_grad(backend):
    layer = _layer(4, padding=1)
    w, b, x = layer.packed_weight.detach(), layer.bias.detach(), torch.randn(5, 3, 6, 6)

    def sample_loss(conv):
        return lambda w, b, xi: conv(w, b, xi[None]).tanh().sum()

    with _no_fallback():
        got = vmap(grad(sample_loss(_stripe(layer)), argnums=(0, 1)), in_dims=(None, None, 0))(w, b, x)
    want = vmap(grad(sample_loss(_oracle(layer)), argnums=(0, 1)), in_dims=(None, None, 0))(w, b, x)
    assert got[0].shape == (5, *w.shape)
    for g, e in zip(got, want):
        torch.testing.assert_close(g, e, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("batched", ["both", "grad_output", "input", "weight_too"])
def test_grad_weight_vmap_is_one_grouped_call(backend, batched):
    """vmap of the weight gradient: V members folded into one call with V times the groups, unfolded to
    [V, S, C/groups]; each member against F.conv2d's weight gradient on the masked weight."""
    gen = torch.Generator().manual_seed(9)
    mask = random_mask(6, (3, 2), 0.5, gen)
    mask[:, 0, 0] = True  # a position every filter keeps, next to sparse ones
    mask[:, 2, 1] = False  # and one none keeps
    members, geo = 4, dict(stride=(2, 1), padding=(1, 0), dilation=(1, 2), groups=2)
    x = torch.randn(members, 3, 4, 7, 8, generator=gen)
    gy_shape = F.conv2d(x[0], torch.empty(6, 2, 3, 2), None, **geo).shape
    gy = torch.randn(members, *gy_shape, generator=gen)
    w = torch.randn(members, int(mask.sum()), 2, generator=gen)
    args = ([2, 1], [1, 1, 0, 0], [1, 2], 2)
    in_dims = {"both": (0, 0, None), "grad_output": (0, None, None), "input": (None, 0, None),
               "weight_too": (0, 0, 0)}[batched]
    pick = lambda t, d, i: t[i] if d is not None else t[0]  # noqa: E731
    op = stripeconv.ops.stripe_conv2d_grad_weight
    with _no_fallback():
        got = vmap(lambda g, x, w: op(g, x, w, mask, *args), in_dims=in_dims)(
            *(t if d is not None else t[0] for t, d in zip((gy, x, w), in_dims)))
    assert got.shape == (members, *w.shape[1:])
    for i in range(members):
        dense = torch.zeros(6, 2, 3, 2, requires_grad=True)
        out = F.conv2d(pick(x, in_dims[1], i), dense * mask[:, None], None, **geo)
        (want,) = torch.autograd.grad(out, dense, pick(gy, in_dims[0], i))
        torch.testing.assert_close(got[i], pack_weight(want, mask), atol=1e-4, rtol=1e-4)


def test_grad_weight_vmap_chunks_the_members(backend, monkeypatch):
    """An operand shared by all members is repeated per member: in chunks under a byte budget (here one
    input's worth, so one member a call), with the same result as one call."""
    if not stripeconv.func.HAS_BATCHING_RULES:
        pytest.skip(f"torch {torch.__version__} vmaps custom ops through its per-index loop (no batching rules)")
    gen = torch.Generator().manual_seed(10)
    mask = random_mask(6, (3, 3), 0.5, gen)
    x = torch.randn(2, 4, 6, 6, generator=gen)
    gy = torch.randn(5, 2, 6, 6, 6, generator=gen)
    w = torch.randn(int(mask.sum()), 4, generator=gen)
    op = stripeconv.ops.stripe_conv2d_grad_weight
    f = vmap(lambda g: op(g, x, w, mask, [1, 1], [1, 1, 1, 1], [1, 1], 1))
    whole = f(gy)
    monkeypatch.setattr(stripeconv.func, "_FOLD_REPEAT_BYTES", x.numel() * x.element_size())
    calls = []
    monkeypatch.setattr(stripeconv.func, "_unfold_members",
                        lambda folded, m, members, unfold=stripeconv.func._unfold_members: calls.append(members)
                        or unfold(folded, m, members))
    torch.testing.assert_close(f(gy), whole)
    assert calls == [1] * 5
    for i in range(5):
        torch.testing.assert_close(whole[i], op(gy[i], x, w, mask, [1, 1], [1, 1, 1, 1], [1, 1], 1))


def test_jacrev_of_the_input(backend):
    layer = _layer(5, padding=1, stride=(1, 2))
    w, b, x = layer.packed_weight.detach(), layer.bias.detach(), torch.randn(1, 3, 5, 6)
    got = jacrev(lambda x: _stripe(layer)(w, b, x))(x)
    want = jacrev(lambda x: _oracle(layer)(w, b, x))(x)
    torch.testing.assert_close(got, want)


def test_func_gradients_of_gradients(backend):
    """Second order in every argument: the gradient's gradient, e.g. a gradient penalty or a Hessian-vector product."""
    layer = _layer(6, padding=1, groups=1)
    w, b, x = layer.packed_weight.detach(), layer.bias.detach(), torch.randn(2, 3, 5, 5)

    def second(conv):
        first = grad(lambda w, x: conv(w, b, x).square().sum(), argnums=(0, 1))
        return grad(lambda w, x: sum(g.square().sum() for g in first(w, x)), argnums=(0, 1))

    got, want = second(_stripe(layer))(w, x), second(_oracle(layer))(w, x)
    for g, e in zip(got, want):
        torch.testing.assert_close(g, e, atol=1e-3, rtol=1e-4)


def test_transform_conv2d_is_the_op_under_torch_func(backend):
    """The functional form for direct calls: grouped, strided, without bias."""
    gen = torch.Generator().manual_seed(7)
    mask = random_mask(6, (3, 3), 0.5, gen)
    w = torch.randn(int(mask.sum()), 2, generator=gen)
    x = torch.randn(2, 4, 7, 7, generator=gen)
    args = (mask, [2, 1], [1, 1, 0, 2], [1, 1], 2)

    def op(w, x):
        return transform_conv2d(x, w, None, *args).square().sum()

    def oracle(w, x):
        return F.conv2d(F.pad(x, (0, 2, 1, 1)), unpack_weight(w, mask), None, (2, 1), 0, 1, 2).square().sum()

    torch.testing.assert_close(transform_conv2d(x, w, None, *args), stripeconv.ops.stripe_conv2d(x, w, None, *args))
    for g, e in zip(grad(op, argnums=(0, 1))(w, x), grad(oracle, argnums=(0, 1))(w, x)):
        torch.testing.assert_close(g, e, atol=1e-4, rtol=1e-4)


def test_jvp_jacfwd_and_hessian(backend):
    """Forward mode, alone and over reverse mode (a Hessian), in every tensor argument."""
    layer = _layer(8, padding=(1, 0), stride=(1, 2))
    w, b, x = layer.packed_weight.detach(), layer.bias.detach(), torch.randn(2, 3, 6, 7)
    tangents = (torch.randn_like(w), torch.randn_like(b), torch.randn_like(x))
    got, want = jvp(_stripe(layer), (w, b, x), tangents), jvp(_oracle(layer), (w, b, x), tangents)
    for g, e in zip(got, want):
        torch.testing.assert_close(g, e, atol=1e-4, rtol=1e-4)
    # a tangent in the bias alone
    got = jvp(lambda b: _stripe(layer)(w, b, x), (b,), tangents[1:2])[1]
    torch.testing.assert_close(got, tangents[1][:, None, None].expand_as(got))
    torch.testing.assert_close(jacfwd(lambda x: _stripe(layer)(w, b, x))(x[:1]),
                               jacfwd(lambda x: _oracle(layer)(w, b, x))(x[:1]))
    loss = lambda conv: lambda w, x: conv(w, b, x).sin().sum()  # noqa: E731
    got = hessian(loss(_stripe(layer)), argnums=(0, 1))(w, x[:1])
    want = hessian(loss(_oracle(layer)), argnums=(0, 1))(w, x[:1])
    for row_got, row_want in zip(got, want):
        for g, e in zip(row_got, row_want):
            torch.testing.assert_close(g, e, atol=1e-4, rtol=1e-4)


def test_members_side_by_side_with_empty_shapes(backend):
    """No kept stripe, no output channel, no image: the side-by-side calls keep every shape."""
    x = torch.randn(5, 3, 6, 6)
    layer = stripeconv.StripeConv2d(3, 4, 3, padding=1, stripe_mask=torch.zeros(4, 3, 3, dtype=torch.bool))
    ws, bs = torch.randn(2, 0, 3), torch.randn(2, 4)

    def loss(w, b, x):
        return functional_call(layer, {"packed_weight": w, "bias": b}, (x,)).sin().sum()

    for data in (x, x[:0]):
        gw, gb, gx = vmap(grad(loss, argnums=(0, 1, 2)), in_dims=(0, 0, None))(ws, bs, data)
        assert gw.shape == (2, 0, 3) and gx.shape == (2, *data.shape)
        torch.testing.assert_close(gb, torch.cos(bs)[:, :, None, None].expand(2, 4, 6, 6).sum((2, 3)) * len(data))
        torch.testing.assert_close(gx, torch.zeros_like(gx))
    gw, gb = vmap(grad(loss, argnums=(0, 1)), in_dims=(None, None, 0))(ws[0], bs[0], x[:, None])
    assert gw.shape == (5, 0, 3) and gb.shape == (5, 4)
    empty = stripeconv.StripeConv2d(3, 0, 3, padding=1)
    out = vmap(lambda w, b: functional_call(empty, {"packed_weight": w, "bias": b}, (x,)))(ws[:, :0],
                                                                                            torch.randn(2, 0))
    assert out.shape == (2, 5, 0, 6, 6)


@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_torch_func_transforms_under_torch_compile(compiler):
    """torch.compile of grad, vmap(grad), jacrev, jvp and hessian over the layer and over
    transform_conv2d: one graph each (fullgraph), against the transforms of F.conv2d on the masked
    weight."""
    if not stripeconv.backends._DYNAMO_TRACES_TRANSFORM_CHECKS:
        pytest.skip("compiled torch.func transforms over the layer need torch >= 2.6")
    torch._dynamo.reset()
    layer = _layer(11, stride=2, padding=(1, 2))
    w, b, x = layer.packed_weight.detach(), layer.bias.detach(), torch.randn(3, 3, 7, 8)
    stripe, oracle = _stripe(layer), _oracle(layer)
    tangents = (torch.randn_like(w), torch.randn_like(b), torch.randn_like(x))

    def transforms(conv):
        loss = lambda w, b, x: conv(w, b, x).tanh().sum()  # noqa: E731
        return {
            "grad": lambda: grad(loss, argnums=(0, 1, 2))(w, b, x),
            "per_sample": lambda: vmap(grad(lambda w, b, xi: loss(w, b, xi[None]), argnums=(0, 1)),
                                       in_dims=(None, None, 0))(w, b, x),
            "jacrev": lambda: jacrev(lambda x: conv(w, b, x))(x[:1]),
            "jvp": lambda: jvp(conv, (w, b, x), tangents),
            "hessian": lambda: hessian(lambda b: loss(w, b, x))(b),
        }

    def functional(w, b, x):  # the op's functional form, called directly
        return transform_conv2d(x, w, b, layer.stripe_mask, layer.stride, layer._pads, layer.dilation, layer.groups)

    want = {name: f() for name, f in transforms(oracle).items()}
    for name, f in [*transforms(stripe).items(), *(("functional " + n, f) for n, f in transforms(functional).items())]:
        got = torch.compile(f, fullgraph=True, backend=compiler)()
        torch.testing.assert_close(got, want[name.split()[-1]], atol=1e-4, rtol=1e-4, msg=lambda m: f"{name}: {m}")
