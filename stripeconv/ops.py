"""The stripe_conv2d op contract, registered once with ``torch.library``.

Three ops in the ``stripeconv`` namespace, with the same arguments for every backend:

``stripe_conv2d(input, weight, bias, stripe_mask, stride, padding, dilation, groups) -> output``
    ``input`` [B, C, H, W]; ``weight`` packed [S, C/groups] (see :mod:`stripeconv.packing`);
    ``bias`` [N] or None; ``stripe_mask`` bool [N, kh, kw] with ``S = stripe_mask.sum()``;
    ``stride``, ``dilation`` (sh, sw); ``padding`` (top, bottom, left, right), zeros implied.
    Computes ``F.conv2d(input, unpack(weight) , bias, ...)`` as a sum of 1x1 convolutions over
    the kept positions, with borders handled by the index ranges, never by a padded copy.
    The output has the input's memory format (NCHW or channels_last).
    A pruned stripe is absent rather than a zero weight: NaN or Inf in the input reaches every
    output that a kept stripe computes from it, while an output that sees it only through pruned
    stripes is unspecified (finite on the stripe paths, NaN = 0 * NaN on a dense hand-over).
    Shapes ``F.conv2d`` refuses or mis-shapes (no input channel, no input pixel left after
    padding, no output channel) give the defined answer: the bias everywhere, or an empty output.

``stripe_conv2d_grad_input(grad_output, weight, stripe_mask, input_shape, stride, padding, dilation, groups)``
    Gradient with respect to ``input`` (shape ``input_shape``).

``stripe_conv2d_grad_weight(grad_output, input, weight, stripe_mask, stride, padding, dilation, groups)``
    Gradient with respect to the packed ``weight`` [S, C/groups] (``weight`` gives its shape).

The gradient of ``bias`` is ``grad_output.sum((0, 2, 3))`` and is part of the autograd formula.
Each op hands its work to the backend chosen by :mod:`stripeconv.backends` for the input's
device; fake (meta) kernels make them traceable by ``torch.compile``. ``StripeConv2d`` reaches
the same backend calls and gradient formula without the ops' Python layers, in eager mode
(:func:`stripeconv.backends.eager_conv2d`) and under ``torch.compile`` (private kernel ops,
:mod:`stripeconv.backends.compiled`). The ops' vmap rules and :func:`transform_conv2d` (for
torch.func's differentiating transforms) are in :mod:`stripeconv.func`.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from . import backends

__all__ = ["stripe_conv2d", "transform_conv2d", "output_size", "check_output_size", "check_op_args"]


def output_size(
    input_hw: Sequence[int],
    kernel_size: Sequence[int],
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
) -> tuple[int, int]:
    """Output (Ho, Wo) of a conv with ``padding`` = (top, bottom, left, right)."""
    (h, w), (kh, kw), (sh, sw), (dh, dw) = input_hw, kernel_size, stride, dilation
    pt, pb, pl, pr = padding
    ho = (h + pt + pb - dh * (kh - 1) - 1) // sh + 1
    wo = (w + pl + pr - dw * (kw - 1) - 1) // sw + 1
    return ho, wo


def check_output_size(
    input_hw: Sequence[int],
    kernel_size: Sequence[int],
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
) -> None:
    """Raise ``ValueError`` when the padded input is smaller than the dilated kernel (no output pixel)."""
    ho, wo = output_size(input_hw, kernel_size, stride, padding, dilation)
    if ho < 1 or wo < 1:
        raise ValueError(
            f"input of spatial size {list(input_hw)} with padding {list(padding)} is smaller than "
            f"the dilated kernel {list(kernel_size)} (dilation {list(dilation)}): no output pixel"
        )


def _check_geometry(op: str, input_shape: Sequence[int], weight: Tensor, stripe_mask: Tensor,
                    stride, padding, dilation, groups) -> tuple[int, int, int, int]:
    """Check the shapes of a call; returns the output shape [B, N, Ho, Wo]."""
    if len(input_shape) != 4:
        raise ValueError(f"{op} expects a 4-D input [B, C, H, W], got {len(input_shape)}-D")
    if stripe_mask.dtype != torch.bool or stripe_mask.dim() != 3:
        raise ValueError(
            f"stripe_mask must be a bool tensor [out_channels, kh, kw], got {stripe_mask.dtype} "
            f"of shape {list(stripe_mask.shape)}"
        )
    if len(stride) != 2 or len(dilation) != 2 or len(padding) != 4:
        raise ValueError("stride and dilation take 2 values, padding takes 4 (top, bottom, left, right)")
    if min(stride) < 1 or min(dilation) < 1 or min(padding) < 0 or groups < 1:
        raise ValueError("stride, dilation and groups must be positive and padding non-negative")
    b, c, h, w = input_shape
    n = stripe_mask.shape[0]
    if n % groups or c % groups:
        raise ValueError(f"channels ({c} in, {n} out) must be divisible by groups={groups}")
    if weight.dim() != 2 or weight.shape[1] != c // groups:
        raise ValueError(
            f"packed weight must be [num_stripes, in_channels/groups] = [*, {c // groups}], "
            f"got {list(weight.shape)}"
        )
    check_output_size((h, w), stripe_mask.shape[1:], stride, padding, dilation)
    return (b, n, *output_size((h, w), stripe_mask.shape[1:], stride, padding, dilation))


def _check_like(op: str, reference: Tensor, **tensors: Optional[Tensor]) -> None:
    """Each tensor given must be on ``reference``'s device and, except the mask, have its dtype."""
    for name, t in tensors.items():
        if t is None:
            continue
        same_dtype = name == "stripe_mask" or t.dtype == reference.dtype
        if t.device != reference.device or not same_dtype:
            expected = f"on {reference.device}" if name == "stripe_mask" else f"{reference.dtype} on {reference.device}"
            raise ValueError(f"{op}: {name} must be {expected} like the data, got {t.dtype} on {t.device}")


def _check_grad_output(op: str, grad_output: Tensor, expected: Sequence[int]) -> None:
    if list(grad_output.shape) != list(expected):
        raise ValueError(f"{op}: grad_output must have shape {list(expected)}, got {list(grad_output.shape)}")


def check_op_args(input: Tensor, weight: Tensor, stripe_mask: Tensor, stride: Sequence[int], padding: Sequence[int],
                  dilation: Sequence[int], groups: int, bias: Optional[Tensor] = None) -> None:
    """Validate the op's arguments with messages that say what was expected."""
    _check_geometry("stripe_conv2d", input.shape, weight, stripe_mask, stride, padding, dilation, groups)
    if weight.dtype != input.dtype or weight.device != input.device:
        raise ValueError(
            f"input ({input.dtype}, {input.device}) and weight ({weight.dtype}, {weight.device}) "
            "must have the same dtype and device"
        )
    if bias is not None and list(bias.shape) != [stripe_mask.shape[0]]:
        raise ValueError(f"bias must be [out_channels] = [{stripe_mask.shape[0]}], got {list(bias.shape)}")
    _check_like("stripe_conv2d", input, bias=bias, stripe_mask=stripe_mask)


def _check_grad_input_args(grad_output: Tensor, weight: Tensor, stripe_mask: Tensor, input_shape, stride, padding,
                          dilation, groups) -> None:
    """Validate the arguments of ``stripe_conv2d_grad_input``."""
    op = "stripe_conv2d_grad_input"
    out_shape = _check_geometry(op, input_shape, weight, stripe_mask, stride, padding, dilation, groups)
    _check_grad_output(op, grad_output, out_shape)
    _check_like(op, grad_output, weight=weight, stripe_mask=stripe_mask)


def _check_grad_weight_args(grad_output: Tensor, input: Tensor, weight: Tensor, stripe_mask: Tensor, stride, padding,
                           dilation, groups) -> None:
    """Validate the arguments of ``stripe_conv2d_grad_weight``."""
    op = "stripe_conv2d_grad_weight"
    out_shape = _check_geometry(op, input.shape, weight, stripe_mask, stride, padding, dilation, groups)
    _check_grad_output(op, grad_output, out_shape)
    _check_like(op, input, grad_output=grad_output, weight=weight, stripe_mask=stripe_mask)


def output_memory_format(input: Tensor) -> torch.memory_format:
    """The op's result layout: channels_last when ``input`` is (and is not also contiguous)."""
    if input.is_contiguous(memory_format=torch.channels_last) and not input.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


# The backend calls of the three ops, with the layouts the contract promises. The ops check their
# arguments first; stripeconv.backends.eager calls these after its own checks.
def run_forward(backend, input: Tensor, weight: Tensor, bias: Optional[Tensor], stripe_mask: Tensor, stride,
                padding, dilation, groups: int) -> Tensor:
    out = backend.forward(input, weight, bias, stripe_mask, list(stride), list(padding), list(dilation), groups)
    return out.contiguous(memory_format=output_memory_format(input))


def run_grad_input(backend, grad_output: Tensor, weight: Tensor, stripe_mask: Tensor, input_shape, stride, padding,
                   dilation, groups: int) -> Tensor:
    grad_input = backend.grad_input(grad_output, weight, stripe_mask, list(input_shape), list(stride), list(padding),
                                    list(dilation), groups)
    return grad_input.contiguous(memory_format=output_memory_format(grad_output))


def run_grad_weight(backend, grad_output: Tensor, input: Tensor, weight: Tensor, stripe_mask: Tensor, stride, padding,
                    dilation, groups: int) -> Tensor:
    return backend.grad_weight(grad_output, input, weight, stripe_mask, list(stride), list(padding), list(dilation),
                               groups).contiguous()


# Schemas spelled out: torch < 2.5 cannot infer them from this module's (postponed) annotations.
_CONV_ARGS = "int[] stride, int[] padding, int[] dilation, int groups"


@torch.library.custom_op("stripeconv::stripe_conv2d", mutates_args=(),
                         schema=f"(Tensor input, Tensor weight, Tensor? bias, Tensor stripe_mask, {_CONV_ARGS}) -> Tensor")
def stripe_conv2d(
    input: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    stripe_mask: Tensor,
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    groups: int,
) -> Tensor:
    """Stripe-pruned conv2d (see the module docstring for the contract)."""
    check_op_args(input, weight, stripe_mask, stride, padding, dilation, groups, bias)
    return run_forward(backends.resolve(input.device), input, weight, bias, stripe_mask, stride, padding, dilation,
                       groups)


@stripe_conv2d.register_fake
def fake_forward(input, weight, bias, stripe_mask, stride, padding, dilation, groups):
    """Output shape and memory format of the forward, without computing it."""
    # Also serves calls with any argument on the meta device: unchecked, real data next to a meta mask
    # would get this uninitialised tensor as its result.
    check_op_args(input, weight, stripe_mask, stride, padding, dilation, groups, bias)
    ho, wo = output_size(input.shape[2:], stripe_mask.shape[1:], stride, padding, dilation)
    out = input.new_empty(input.shape[0], stripe_mask.shape[0], ho, wo)
    return out.contiguous(memory_format=output_memory_format(input))


@torch.library.custom_op(
    "stripeconv::stripe_conv2d_grad_input", mutates_args=(),
    schema=f"(Tensor grad_output, Tensor weight, Tensor stripe_mask, int[] input_shape, {_CONV_ARGS}) -> Tensor")
def stripe_conv2d_grad_input(
    grad_output: Tensor,
    weight: Tensor,
    stripe_mask: Tensor,
    input_shape: Sequence[int],
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    groups: int,
) -> Tensor:
    """Gradient of stripe_conv2d with respect to its input."""
    _check_grad_input_args(grad_output, weight, stripe_mask, input_shape, stride, padding, dilation, groups)
    return run_grad_input(backends.resolve(grad_output.device), grad_output, weight, stripe_mask, input_shape, stride,
                          padding, dilation, groups)


@stripe_conv2d_grad_input.register_fake
def fake_grad_input(grad_output, weight, stripe_mask, input_shape, stride, padding, dilation, groups):
    _check_grad_input_args(grad_output, weight, stripe_mask, input_shape, stride, padding, dilation, groups)
    grad_input = grad_output.new_empty(list(input_shape))
    return grad_input.contiguous(memory_format=output_memory_format(grad_output))


@torch.library.custom_op(
    "stripeconv::stripe_conv2d_grad_weight", mutates_args=(),
    schema=f"(Tensor grad_output, Tensor input, Tensor weight, Tensor stripe_mask, {_CONV_ARGS}) -> Tensor")
def stripe_conv2d_grad_weight(
    grad_output: Tensor,
    input: Tensor,
    weight: Tensor,
    stripe_mask: Tensor,
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    groups: int,
) -> Tensor:
    """Gradient of stripe_conv2d with respect to its packed weight."""
    _check_grad_weight_args(grad_output, input, weight, stripe_mask, stride, padding, dilation, groups)
    return run_grad_weight(backends.resolve(input.device), grad_output, input, weight, stripe_mask, stride, padding,
                           dilation, groups)


@stripe_conv2d_grad_weight.register_fake
def fake_grad_weight(grad_output, input, weight, stripe_mask, stride, padding, dilation, groups):
    _check_grad_weight_args(grad_output, input, weight, stripe_mask, stride, padding, dilation, groups)
    return torch.empty_like(weight, memory_format=torch.contiguous_format)


def setup_conv2d_context(ctx, inputs, output):
    """Save what :func:`conv2d_gradients` reads."""
    input, weight, bias, stripe_mask, stride, padding, dilation, groups = inputs
    ctx.save_for_backward(input, weight, stripe_mask)
    ctx.conv_args = (list(stride), list(padding), list(dilation), groups)
    ctx.has_bias = bias is not None


def conv2d_gradients(ctx, grad_output: Tensor, grad_input_fn=None, grad_weight_fn=None) -> tuple:
    """The forward's gradients for the ``needs_input_grad`` of ``ctx`` (saved: input, weight, stripe_mask;
    ``conv_args``, ``has_bias``), by default through the differentiable gradient ops."""
    input, weight, stripe_mask = ctx.saved_tensors
    stride, padding, dilation, groups = ctx.conv_args
    grad_input = grad_weight = grad_bias = None
    if ctx.needs_input_grad[0]:
        grad_input = (grad_input_fn or stripe_conv2d_grad_input)(
            grad_output, weight, stripe_mask, list(input.shape), stride, padding, dilation, groups
        )
    if ctx.needs_input_grad[1]:
        grad_weight = (grad_weight_fn or stripe_conv2d_grad_weight)(
            grad_output, input, weight, stripe_mask, stride, padding, dilation, groups
        )
    if ctx.has_bias and ctx.needs_input_grad[2]:
        grad_bias = grad_output.sum((0, 2, 3))
    return grad_input, grad_weight, grad_bias, None, None, None, None, None


stripe_conv2d.register_autograd(conv2d_gradients, setup_context=setup_conv2d_context)


# The gradient ops are linear in each argument and adjoint to the forward, so their own gradients
# are the three ops again: derivatives of any order (e.g. gradient penalties) need nothing else.
#   grad_input(gy, W)  = F_x(W)^T gy:  d/d gy <- forward(g, W);    d/d W <- grad_weight(gy, g)
#   grad_weight(gy, x) = F_W(x)^T gy:  d/d gy <- forward(x, g);    d/d x <- grad_input(gy, g)
def _setup_grad_input_context(ctx, inputs, output):
    grad_output, weight, stripe_mask, input_shape, stride, padding, dilation, groups = inputs
    ctx.save_for_backward(grad_output, weight, stripe_mask)
    ctx.conv_args = (list(stride), list(padding), list(dilation), groups)


def _grad_input_backward(ctx, grad, conv=None, grad_weight=None):
    grad_output, weight, stripe_mask = ctx.saved_tensors
    d_grad_output = d_weight = None
    if ctx.needs_input_grad[0]:
        d_grad_output = (conv or stripe_conv2d)(grad, weight, None, stripe_mask, *ctx.conv_args)
    if ctx.needs_input_grad[1]:
        d_weight = (grad_weight or stripe_conv2d_grad_weight)(grad_output, grad, weight, stripe_mask, *ctx.conv_args)
    return d_grad_output, d_weight, None, None, None, None, None, None


def _setup_grad_weight_context(ctx, inputs, output):
    grad_output, input, weight, stripe_mask, stride, padding, dilation, groups = inputs
    ctx.save_for_backward(grad_output, input, stripe_mask)
    ctx.conv_args = (list(stride), list(padding), list(dilation), groups)


def _grad_weight_backward(ctx, grad, conv=None, grad_input=None):
    grad_output, input, stripe_mask = ctx.saved_tensors
    d_grad_output = d_input = None
    if ctx.needs_input_grad[0]:
        d_grad_output = (conv or stripe_conv2d)(input, grad, None, stripe_mask, *ctx.conv_args)
    if ctx.needs_input_grad[1]:
        d_input = (grad_input or stripe_conv2d_grad_input)(grad_output, grad, stripe_mask, list(input.shape),
                                                           *ctx.conv_args)
    return d_grad_output, d_input, None, None, None, None, None, None


stripe_conv2d_grad_input.register_autograd(_grad_input_backward, setup_context=_setup_grad_input_context)
stripe_conv2d_grad_weight.register_autograd(_grad_weight_backward, setup_context=_setup_grad_weight_context)


# torch.func support (vmap rules, and transform_conv2d for grad, jvp and the other transforms)
from .func import transform_conv2d  # noqa: E402  (imports the ops above; registers the vmap rules)
# The private ops compiled modules call, registered with the package: a compiled program that a
# cache brings back into a new process names them before any module is traced there.
from .backends import compiled as _compiled  # noqa: E402,F401
