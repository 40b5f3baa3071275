"""torch.func support for the stripe ops: vmap rules, and :func:`transform_conv2d`, the op that
torch.func's grad, vjp, jacrev, jvp, jacfwd and hessian (and forward-mode AD) can differentiate."""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from .decompose import stripe_conv2d_dense
from .ops import (_grad_input_backward, _grad_weight_backward, _setup_grad_input_context,
                  _setup_grad_weight_context, conv2d_gradients, setup_conv2d_context, stripe_conv2d,
                  stripe_conv2d_grad_input, stripe_conv2d_grad_weight)
from .packing import position_offsets

__all__ = ["transform_conv2d"]


# ----------------------------------------------------------------------------- torch.func.vmap
# Only the data batched (vmap over a batch of batches): the vmapped dimension is folded into the
# batch, one call. Batched weights (ensembles) and weight gradients of batched data (per-sample
# gradients), with one mask for all: one call of a layer holding the V members side by side as V
# times the groups (member v's channels and filters form groups v*groups .. (v+1)*groups - 1).
# Batched masks: one call per index.
# torch.func.grad cannot go through custom ops with registered autograd (pytorch/pytorch#168393):
# StripeConv2d goes through _TransformConv2d under torch.func transforms instead.
def _batched(a, d) -> bool:
    return isinstance(a, Tensor) and d is not None


def _vmap_loop(op, batch_size: int, in_dims, args):
    outs = []
    for i in range(batch_size):
        outs.append(op(*(a.select(d, i) if _batched(a, d) else a for a, d in zip(args, in_dims))))
    return torch.stack(outs), 0


def _only_first_batched(in_dims, args) -> bool:
    return [_batched(a, d) for a, d in zip(args, in_dims)] == [True] + [False] * (len(args) - 1)


def _member_rows(stripe_mask: Tensor, members: int, num_stripes: int) -> Tensor:
    """``[members, S]``: where row s of member v sits in the packed weight of the side-by-side layer.

    That layer's rows are position-major like any packed weight, so position p holds the rows of
    member 0, then member 1, ...: ``members * offset[p] + v * count[p] + (s - offset[p])``. No host
    sync (the mask stays where it is)."""
    offsets = position_offsets(stripe_mask)
    counts = offsets.diff()
    position = torch.repeat_interleave(torch.arange(counts.numel(), device=counts.device), counts,
                                       output_size=num_stripes)
    rows = torch.arange(num_stripes, device=counts.device) + (members - 1) * offsets[position]
    return rows + torch.arange(members, device=counts.device)[:, None] * counts[position]


def _unfold_members(folded: Tensor, stripe_mask: Tensor, members: int) -> Tensor:
    """Packed rows of the side-by-side layer -> ``[members, S, C/groups]``."""
    num_stripes = folded.shape[0] // members
    rows = _member_rows(stripe_mask, members, num_stripes)
    return folded.index_select(0, rows.flatten()).view(members, num_stripes, folded.shape[1])


def _fold_members(weights: Tensor, stripe_mask: Tensor) -> Tensor:
    """``[members, S, C/groups]`` -> the packed weight of the side-by-side layer."""
    members, num_stripes, width = weights.shape
    rows = _member_rows(stripe_mask, members, num_stripes)
    return weights.new_empty(members * num_stripes, width).index_copy(0, rows.flatten(), weights.flatten(0, 1))


# An operand not batched is repeated per member: at most this many bytes of repeats at once.
_FOLD_REPEAT_BYTES = 256 << 20


def _member_chunks(members: int, *shared: Optional[Tensor]):
    """Ranges of members per call, so the repeats of the ``shared`` (unbatched) operands stay in budget."""
    per_member = sum(t.numel() * t.element_size() for t in shared if t is not None)
    chunk = max(1, _FOLD_REPEAT_BYTES // per_member) if per_member else members
    return [(v0, min(members, v0 + chunk)) for v0 in range(0, members, chunk)]


def _side_by_side(t: Tensor, dim: Optional[int], v0: int, v1: int) -> Tensor:
    """Data ``[B, C, H, W]`` of members v0..v1 (vmapped at ``dim``, or shared when None) -> ``[B, V*C, H, W]``,
    member-major channels."""
    t = t.movedim(dim, 0)[v0:v1].movedim(0, 1) if dim is not None else t.unsqueeze(1).expand(-1, v1 - v0, *t.shape[1:])
    return t.flatten(1, 2)


def _members_weight(weight: Tensor, dim: Optional[int], stripe_mask: Tensor, v0: int, v1: int) -> Tensor:
    per_member = weight.movedim(dim, 0)[v0:v1] if dim is not None else weight.expand(v1 - v0, *weight.shape)
    return _fold_members(per_member, stripe_mask)


def _forward_vmap(info, in_dims, input, weight, bias, stripe_mask, stride, padding, dilation, groups):
    args = (input, weight, bias, stripe_mask, stride, padding, dilation, groups)
    if _only_first_batched(in_dims, args):
        x = input.movedim(in_dims[0], 0)
        out = stripe_conv2d(x.flatten(0, 1), weight, bias, stripe_mask, stride, padding, dilation, groups)
        return out.unflatten(0, x.shape[:2]), 0
    if _batched(stripe_mask, in_dims[3]):
        return _vmap_loop(stripe_conv2d, info.batch_size, in_dims, args)
    outs = []
    for v0, v1 in _member_chunks(info.batch_size, None if _batched(input, in_dims[0]) else input):
        b = None
        if bias is not None:
            b = (bias.movedim(in_dims[2], 0)[v0:v1] if _batched(bias, in_dims[2]) else bias.expand(v1 - v0, -1))
        out = stripe_conv2d(_side_by_side(input, in_dims[0], v0, v1), _members_weight(weight, in_dims[1], stripe_mask,
                                                                                        v0, v1),
                            None if b is None else b.flatten(), stripe_mask.repeat(v1 - v0, 1, 1), stride, padding,
                            dilation, groups * (v1 - v0))
        outs.append(out.unflatten(1, (v1 - v0, -1)).movedim(1, 0))
    return (outs[0] if len(outs) == 1 else torch.cat(outs)), 0


def _grad_input_vmap(info, in_dims, grad_output, weight, stripe_mask, input_shape, stride, padding, dilation, groups):
    args = (grad_output, weight, stripe_mask, input_shape, stride, padding, dilation, groups)
    if _only_first_batched(in_dims, args):
        gy = grad_output.movedim(in_dims[0], 0)
        shape = [gy.shape[0] * input_shape[0], *input_shape[1:]]
        out = stripe_conv2d_grad_input(gy.flatten(0, 1), weight, stripe_mask, shape, stride, padding, dilation, groups)
        return out.unflatten(0, gy.shape[:2]), 0
    if _batched(stripe_mask, in_dims[2]):
        return _vmap_loop(stripe_conv2d_grad_input, info.batch_size, in_dims, args)
    outs = []
    for v0, v1 in _member_chunks(info.batch_size, None if _batched(grad_output, in_dims[0]) else grad_output):
        b, c, h, w = input_shape
        out = stripe_conv2d_grad_input(_side_by_side(grad_output, in_dims[0], v0, v1),
                                       _members_weight(weight, in_dims[1], stripe_mask, v0, v1),
                                       stripe_mask.repeat(v1 - v0, 1, 1), [b, (v1 - v0) * c, h, w], stride, padding,
                                       dilation, groups * (v1 - v0))
        outs.append(out.unflatten(1, (v1 - v0, -1)).movedim(1, 0))
    return (outs[0] if len(outs) == 1 else torch.cat(outs)), 0


def _grad_weight_vmap(info, in_dims, grad_output, input, weight, stripe_mask, stride, padding, dilation, groups):
    # Each vmapped index has its own weight gradient (per-sample gradients, batched grad outputs).
    args = (grad_output, input, weight, stripe_mask, stride, padding, dilation, groups)
    if _batched(stripe_mask, in_dims[3]) or not (_batched(grad_output, in_dims[0]) or _batched(input, in_dims[1])):
        return _vmap_loop(stripe_conv2d_grad_weight, info.batch_size, in_dims, args)
    w = weight.movedim(in_dims[2], 0)[0] if _batched(weight, in_dims[2]) else weight  # only its shape counts
    shared = [t for t, d in ((grad_output, in_dims[0]), (input, in_dims[1])) if d is None]
    parts = []
    for v0, v1 in _member_chunks(info.batch_size, *shared):
        folded = stripe_conv2d_grad_weight(_side_by_side(grad_output, in_dims[0], v0, v1),
                                           _side_by_side(input, in_dims[1], v0, v1), w.repeat(v1 - v0, 1),
                                           stripe_mask.repeat(v1 - v0, 1, 1), stride, padding, dilation,
                                           groups * (v1 - v0))
        parts.append(_unfold_members(folded, stripe_mask, v1 - v0))
    return (parts[0] if len(parts) == 1 else torch.cat(parts)), 0


# torch < 2.5 cannot register batching rules for custom ops, and torch 2.5's functorch fails an
# internal assert when forward-mode AD runs over them (a Hessian): there vmap runs torch's
# fallback, one op call per index (correct, slower, with torch's performance warning).
HAS_BATCHING_RULES = hasattr(stripe_conv2d, "register_vmap") and torch.__version__ >= (2, 6)
if HAS_BATCHING_RULES:
    stripe_conv2d.register_vmap(_forward_vmap)
    stripe_conv2d_grad_input.register_vmap(_grad_input_vmap)
    stripe_conv2d_grad_weight.register_vmap(_grad_weight_vmap)


# ----------------------------------------------------------------------------- torch.func.grad
# The three ops with their gradients as autograd.Functions with setup_context, which torch.func
# transforms (grad, vjp, jacrev, jvp, jacfwd, hessian, and vmap over them: per-sample gradients)
# and forward-mode AD go through, unlike the ops' registered autograd (pytorch/pytorch#168393).
# Forwards are the ops themselves, so under vmap their batching rules apply; backwards and
# forward-mode derivatives are these Functions again, to any order. Each op is linear in each of
# its two tensor operands, so its forward-mode derivative is the op on one tangent at a time.
class _Args:
    """The non-tensor arguments of an op as one pytree leaf: functorch's generated vmap rule
    miscounts list arguments when it pairs them with tangents (jvp under vmap, e.g. hessian)."""

    __slots__ = ("values",)

    def __init__(self, *values):
        self.values = values


def _bilinear_tangent(op, a, b, d_a, d_b):
    """Tangent of ``op(a, b)``, linear in each operand: ``op(d_a, b) + op(a, d_b)``, absent tangents left out."""
    terms = [op(d_a, b) if d_a is not None else None, op(a, d_b) if d_b is not None else None]
    terms = [t for t in terms if t is not None]
    return sum(terms[1:], terms[0]) if terms else None


class _TransformConv2d(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(input, weight, bias, stripe_mask, args):
        return stripe_conv2d(input, weight, bias, stripe_mask, *args.values)

    @staticmethod
    def setup_context(ctx, inputs, output):
        input, weight, bias, stripe_mask, args = inputs
        setup_conv2d_context(ctx, (input, weight, bias, stripe_mask, *args.values), output)
        ctx.save_for_forward(input, weight, stripe_mask)
        ctx.output_shape = output.shape

    @staticmethod
    def backward(ctx, grad_output):
        return (*conv2d_gradients(ctx, grad_output, _transform_grad_input, _transform_grad_weight)[:4], None)

    @staticmethod
    def jvp(ctx, d_input, d_weight, d_bias, *_):
        input, weight, stripe_mask = ctx.saved_tensors
        out = _bilinear_tangent(lambda x, w: transform_conv2d(x, w, None, stripe_mask, *ctx.conv_args),
                                input, weight, d_input, d_weight)
        if d_bias is not None:
            bias_term = d_bias[:, None, None]
            out = bias_term.expand(ctx.output_shape).clone() if out is None else out + bias_term
        return out


class _TransformGradInput(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(grad_output, weight, stripe_mask, args):
        return stripe_conv2d_grad_input(grad_output, weight, stripe_mask, *args.values)

    @staticmethod
    def setup_context(ctx, inputs, output):
        grad_output, weight, stripe_mask, args = inputs
        _setup_grad_input_context(ctx, (grad_output, weight, stripe_mask, *args.values), output)
        ctx.save_for_forward(grad_output, weight, stripe_mask)
        ctx.input_shape = list(args.values[0])

    @staticmethod
    def backward(ctx, grad):
        return (*_grad_input_backward(ctx, grad, transform_conv2d, _transform_grad_weight)[:3], None)

    @staticmethod
    def jvp(ctx, d_grad_output, d_weight, *_):
        grad_output, weight, stripe_mask = ctx.saved_tensors
        return _bilinear_tangent(
            lambda gy, w: _transform_grad_input(gy, w, stripe_mask, ctx.input_shape, *ctx.conv_args),
            grad_output, weight, d_grad_output, d_weight)


class _TransformGradWeight(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(grad_output, input, weight, stripe_mask, args):
        return stripe_conv2d_grad_weight(grad_output, input, weight, stripe_mask, *args.values)

    @staticmethod
    def setup_context(ctx, inputs, output):
        grad_output, input, weight, stripe_mask, args = inputs
        _setup_grad_weight_context(ctx, (grad_output, input, weight, stripe_mask, *args.values), output)
        ctx.save_for_forward(grad_output, input, weight, stripe_mask)

    @staticmethod
    def backward(ctx, grad):
        return (*_grad_weight_backward(ctx, grad, transform_conv2d, _transform_grad_input)[:2], None, None, None)

    @staticmethod
    def jvp(ctx, d_grad_output, d_input, *_):
        grad_output, input, weight, stripe_mask = ctx.saved_tensors
        return _bilinear_tangent(
            lambda gy, x: _transform_grad_weight(gy, x, weight, stripe_mask, *ctx.conv_args),
            grad_output, input, d_grad_output, d_input)


def transform_conv2d(input: Tensor, weight: Tensor, bias: Optional[Tensor], stripe_mask: Tensor, stride: Sequence[int],
                     padding: Sequence[int], dilation: Sequence[int], groups: int) -> Tensor:
    """:func:`stripe_conv2d` for calls under torch.func transforms (``torch.func.grad`` and the like) and
    forward-mode AD. Under ``torch.compile`` the dense conv of the masked weight
    (:func:`~stripeconv.decompose.stripe_conv2d_dense`): Dynamo differentiates what an
    autograd.Function's forward calls there, not its backward, and the op's registered autograd
    cannot run under the transforms (pytorch/pytorch#168393), so only standard ops give the right
    derivatives."""
    if torch.compiler.is_compiling():
        return stripe_conv2d_dense(input, weight, bias, stripe_mask, stride, padding, dilation, groups)
    return _TransformConv2d.apply(input, weight, bias, stripe_mask, _Args(stride, padding, dilation, groups))


def _transform_grad_input(grad_output, weight, stripe_mask, input_shape, stride, padding, dilation, groups):
    return _TransformGradInput.apply(grad_output, weight, stripe_mask,
                                     _Args(input_shape, stride, padding, dilation, groups))


def _transform_grad_weight(grad_output, input, weight, stripe_mask, stride, padding, dilation, groups):
    return _TransformGradWeight.apply(grad_output, input, weight, stripe_mask, _Args(stride, padding, dilation, groups))
