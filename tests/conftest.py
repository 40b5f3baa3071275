"""Shared helpers: the oracle (nn.Conv2d on masked weights) and backend parametrisation."""
from __future__ import annotations

import contextlib
import os

import pytest
import torch
from torch import nn

import stripeconv
from stripeconv.packing import pack_weight

pytest_plugins = ["_test_run_report"]

# Every kernel variant the Triton backend has is offered (and so checked), also those a GPU's choice
# leaves out by default; test_triton_host.py checks the default pool.
os.environ.setdefault("STRIPECONV_TRITON_CANDIDATES", "all")

CPU_BACKENDS = [name for name in ("reference", "dense", "cpu") if name in stripeconv.available_backends()]


def pytest_report_header(config):
    return f"stripeconv backends available: {', '.join(stripeconv.available_backends())}"


@pytest.fixture(params=["reference", "dense", "cpu"])
def backend(request):
    """Run a test once per CPU backend; the compiled one skips visibly when it is not built."""
    name = request.param
    ok, reason = stripeconv.backends._module(name).is_available()
    if not ok:
        pytest.skip(f"backend {name!r} unavailable: {reason}")
    stripeconv.set_backend(name)
    yield name
    stripeconv.set_backend(None)


def random_mask(out_channels: int, kernel_size, density: float, generator=None) -> torch.Tensor:
    """Bernoulli stripe mask; density 0 and 1 are exact."""
    kh, kw = kernel_size
    return torch.rand(out_channels, kh, kw, generator=generator) < density


def masked_conv(conv: nn.Conv2d, mask: torch.Tensor) -> nn.Conv2d:
    """The oracle: the same conv with pruned stripes zeroed."""
    with torch.no_grad():
        conv.weight.mul_(mask[:, None].to(conv.weight.dtype))
    return conv


# (in_channels, out_channels, spatial size, padding) for which F.conv2d gives no usable answer: an
# error, or a [B, 0, ...] output when there is no input channel. The op's answer is defined: every
# output pixel equals its bias, or the output is empty.
DEGENERATE_SHAPES = [(0, 6, (5, 4), 1), (4, 6, (0, 5), 2), (4, 6, (3, 0), (1, 2)), (4, 0, (5, 5), 1)]


@contextlib.contextmanager
def custom_ops_refused(gradient_ops: bool = True):
    """Every call of the stripe_conv2d custom op fails (StripeConv2d's fallback; with ``gradient_ops``
    the gradient ops too): what runs inside must take the eager path."""
    from stripeconv import nn as sc_nn, ops

    def refuse(*args, **kwargs):
        raise AssertionError("the eager path called a stripe_conv2d custom op")

    names = [(sc_nn, "stripe_conv2d")]
    if gradient_ops:
        names += [(ops, "stripe_conv2d_grad_input"), (ops, "stripe_conv2d_grad_weight")]
    saved = [getattr(m, n) for m, n in names]
    for m, n in names:
        setattr(m, n, refuse)
    try:
        yield
    finally:
        for (m, n), v in zip(names, saved):
            setattr(m, n, v)


def require_compiling_triton_kernels():
    """The Triton backend module with its kernels loaded outside the interpreter, else a skip (the
    interpreter compiles nothing; triton 3.2 loads the kernels only where a GPU driver is active)."""
    import os

    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("TRITON_INTERPRET=1 in this process: the interpreter compiles nothing")
    from stripeconv.backends import _triton_runtime, triton_backend as tb

    if _triton_runtime.load_kernels() is None:
        pytest.skip(_triton_runtime._import_error)
    return tb


def require_onnx_export() -> None:
    """Skip unless ``stripeconv.export_onnx`` can run here (onnxscript, torch >= 2.5's exporter)."""
    pytest.importorskip("onnxscript", reason="ONNX export needs onnxscript (pip install onnxscript)")
    from stripeconv.decompose import _onnx_exporter_takes_programs

    if not _onnx_exporter_takes_programs():
        pytest.skip(f"torch {torch.__version__}'s ONNX exporter does not take an ExportedProgram (torch >= 2.5 does)")


def check_degenerate_shape(device: torch.device, in_channels: int, out_channels: int, size, padding) -> None:
    """A 3x3 StripeConv2d on a shape without input channel, input pixel or output channel: forward and grads."""
    torch.manual_seed(0)
    layer = stripeconv.StripeConv2d(in_channels, out_channels, 3, padding=padding).to(device)
    x = torch.randn(2, in_channels, *size, device=device, requires_grad=True)
    out = layer(x)
    pad = (padding, padding) if isinstance(padding, int) else padding
    assert out.shape == (2, out_channels, size[0] + 2 * pad[0] - 2, size[1] + 2 * pad[1] - 2)
    torch.testing.assert_close(out, layer.bias.view(1, -1, 1, 1).expand_as(out).detach(), atol=0, rtol=0)
    grad_out = torch.randn_like(out)
    out.backward(grad_out)
    torch.testing.assert_close(layer.bias.grad, grad_out.sum((0, 2, 3)))
    assert layer.packed_weight.grad.shape == layer.packed_weight.shape and not layer.packed_weight.grad.any()
    assert x.grad.shape == x.shape and not (out_channels == 0 and x.grad.any())


def check_against_oracle(conv: nn.Conv2d, mask: torch.Tensor, x: torch.Tensor, atol: float, rtol: float = 1e-4):
    """Compare StripeConv2d.from_conv(conv, mask) with the masked conv: output and every gradient."""
    oracle = masked_conv(conv, mask)
    layer = stripeconv.StripeConv2d.from_conv(oracle, mask)
    x_oracle = x.detach().clone().requires_grad_(True)
    x_layer = x.detach().clone().requires_grad_(True)
    expected = oracle(x_oracle)
    got = layer(x_layer)
    torch.testing.assert_close(got, expected, atol=atol, rtol=rtol)
    if expected.numel() == 0:
        return
    grad_out = torch.randn_like(expected)
    expected.backward(grad_out)
    got.backward(grad_out)
    torch.testing.assert_close(x_layer.grad, x_oracle.grad, atol=atol, rtol=rtol)
    torch.testing.assert_close(layer.packed_weight.grad, pack_weight(oracle.weight.grad, mask), atol=atol, rtol=rtol)
    if conv.bias is not None:
        torch.testing.assert_close(layer.bias.grad, oracle.bias.grad, atol=atol, rtol=rtol)


def check_double_backward(conv: nn.Conv2d, mask: torch.Tensor, x: torch.Tensor, atol: float, rtol: float = 1e-4):
    """A gradient penalty through StripeConv2d against the same through the masked conv.

    ``||d(sum y^2)/dx||^2 + ||d(sum y^2)/dW_kept||^2`` differentiated again: its value and its
    gradients with respect to the input, the kept weights and the bias must agree. Both routes of
    the second derivative are exercised (grad_input and grad_weight differentiated w.r.t. their
    grad_output and their other argument)."""
    oracle = masked_conv(conv, mask)
    layer = stripeconv.StripeConv2d.from_conv(oracle, mask)
    keep = mask[:, None].to(oracle.weight.dtype)

    def penalty(module: nn.Module, weight: torch.Tensor, weight_mask):
        xg = x.detach().clone().requires_grad_(True)
        y = module(xg)
        gx, gw = torch.autograd.grad(y.square().sum(), (xg, weight), create_graph=True)
        loss = gx.square().sum() + (gw * weight_mask).square().sum()
        loss.backward()
        return loss.detach(), xg.grad

    expected, x_grad_expected = penalty(oracle, oracle.weight, keep)
    got, x_grad = penalty(layer, layer.packed_weight, 1.0)
    torch.testing.assert_close(got, expected, atol=atol, rtol=rtol)
    torch.testing.assert_close(x_grad, x_grad_expected, atol=atol, rtol=rtol)
    torch.testing.assert_close(layer.packed_weight.grad, pack_weight(oracle.weight.grad, mask), atol=atol, rtol=rtol)
    if conv.bias is not None:
        torch.testing.assert_close(layer.bias.grad, oracle.bias.grad, atol=atol, rtol=rtol)


# ------------------------------------------------------------------------- pruning tests
FASHION_SIZE = (1, 1, 28, 28)


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread: on the shared 2-core CI machine oversubscribed threads are far slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def fashion(train: bool = True, limit: int = 384):
    """Real Fashion-MNIST images: the installed dataset, else the subset shipped with the package."""
    from stripeconv.data import DatasetNotFoundError, fashion_mnist
    from stripeconv.data.embedded import fashion_mnist_subset

    try:
        return fashion_mnist(train=train, limit=limit)
    except DatasetNotFoundError:
        return fashion_mnist_subset(train=train, limit=limit)


def fashion_batches(limit: int = 384, batch_size: int = 64, repeats: int = 4) -> list:
    """A fixed sequence of shuffled real-image batches (24 with the defaults)."""
    from torch.utils.data import DataLoader

    dl = DataLoader(fashion(train=True, limit=limit), batch_size=batch_size, shuffle=True,
                    generator=torch.Generator().manual_seed(0))
    return [b for _ in range(repeats) for b in dl]


@pytest.fixture(scope="module")
def batches():
    """The default :func:`fashion_batches`, shared by a test module (modules may override it)."""
    return fashion_batches()


def pruner_train_step(model: nn.Module, pruner, optimizer, x: torch.Tensor, y: torch.Tensor,
                      after_step: bool = True) -> float:
    """One training step driving the pruner's hooks, as ``pruning.fit`` does; returns the loss."""
    import torch.nn.functional as F

    loss = F.cross_entropy(model(x), y) + pruner.penalty()
    optimizer.zero_grad()
    loss.backward()
    pruner.after_backward()
    optimizer.step()
    if after_step:
        pruner.after_step()
    return float(loss.detach())


def penalty_gradient(model: nn.Module, pruner, name: str, x: torch.Tensor, y: torch.Tensor) -> tuple:
    """``(added, weight)``: what ``pruner.after_backward()`` adds to conv ``name``'s weight gradient."""
    import torch.nn.functional as F

    w = pruner.convs[name].weight
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    g = w.grad.clone()
    pruner.after_backward()
    return w.grad - g, w.detach()


def resume_run(make_pruner, batches: list, n: int, k: int, model_fn=None) -> tuple:
    """Train ``model_fn()`` (default ``tiny_vgg``) with ``make_pruner(model)`` over ``batches[:n]`` once uninterrupted and once
    checkpointed after ``k`` steps and resumed in fresh objects; the weights must end identical.

    Returns ``(uninterrupted, checkpointed, resumed, state)``: the three pruners and the checkpoint.
    """
    import copy

    def make(state=None):
        torch.manual_seed(0)
        model = (model_fn or tiny_vgg)()
        if state is not None:
            model.load_state_dict(state["model"])
        pruner = make_pruner(model)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
        if state is not None:
            pruner.load_state_dict(state["pruner"])
            optimizer.load_state_dict(state["opt"])
        return model, pruner, optimizer

    model, pr, opt = make()
    for x, y in batches[:n]:
        pruner_train_step(model, pr, opt, x, y)
    model1, pr1, opt1 = make()
    for x, y in batches[:k]:
        pruner_train_step(model1, pr1, opt1, x, y)
    state = copy.deepcopy({"model": model1.state_dict(), "pruner": pr1.state_dict(), "opt": opt1.state_dict()})
    model2, pr2, opt2 = make(state)
    for x, y in batches[k:n]:
        pruner_train_step(model2, pr2, opt2, x, y)
    for key, v in model.state_dict().items():
        assert torch.equal(v, model2.state_dict()[key]), key
    return pr, pr1, pr2, state


def tiny_vgg() -> nn.Module:
    from stripeconv import models

    return models.vgg(cfg=[8, "M", 16, "M", 16], in_channels=1)


def tiny_resnet() -> nn.Module:
    from stripeconv import models

    return models.resnet8(width=0.5, in_channels=1)


def check_export(pruner, x: torch.Tensor, atol: float = 1e-4) -> nn.Module:
    """The exported model computes what the masked model computes, with StripeConv2d layers."""
    masked = pruner.masked_model().eval()
    exported = pruner.export()
    torch.testing.assert_close(exported(x), masked(x), atol=atol, rtol=1e-4)
    assert any(isinstance(m, stripeconv.StripeConv2d) for m in exported.modules())
    return exported


class Recorder(stripeconv.pruning.Pruner):
    """A pruner that records the order in which the training loop calls its hooks."""

    def __init__(self, model, input_size):
        super().__init__(model, input_size, require_target=False)
        self.calls = []

    def penalty(self):
        self.calls.append("penalty")
        return torch.zeros(())

    def after_backward(self):
        grads = [p.grad is not None for p in self.model.parameters()]
        self.calls.append("after_backward" if all(grads) else "after_backward-nograd")

    def after_step(self):
        self.calls.append("after_step")

    def end_epoch(self, epoch):
        self.calls.append(f"end_epoch{epoch}")
