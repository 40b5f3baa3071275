"""The stripe op in standard ATen ops, for exporters and runtimes that cannot carry a custom op.

A graph from :func:`torch.export.export` keeps ``stripeconv::stripe_conv2d`` as one node, which
is what ``torch.compile`` and AOTInductor want (the stripe kernels run). ONNX, and any other
target without the op, needs it spelled in ATen: :func:`decompositions` maps the op to a dense
``conv2d`` on the unpacked, masked weight, with static shapes only (no ``nonzero``), so the
graph stays exportable with dynamic batch and image sizes. What such a target runs is a dense
conv: it keeps the speed of removed filters and channels (the layer is smaller), not the speed
of pruned single stripes.

:func:`export_onnx` is ``torch.onnx.export`` of the decomposed program.
"""
from __future__ import annotations

import inspect
import io
import os
from typing import Any, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._modes import set_eval

__all__ = ["scatter_rows", "dense_weight", "stripe_conv2d_dense", "decompositions", "export_onnx"]


def scatter_rows(stripe_mask: Tensor) -> Tensor:
    """Packed row of every stripe in position-major order (the order of the packed rows), and
    ``num_stripes`` (an appended zero row) where the stripe is pruned; static shapes only."""
    kept = stripe_mask.permute(1, 2, 0).reshape(-1)
    counts = torch.cumsum(kept.to(torch.int64), 0)
    return torch.where(kept, counts - 1, counts[-1:] if kept.numel() else counts)


def dense_weight(packed: Tensor, stripe_mask: Tensor, rows: Optional[Tensor] = None) -> Tensor:
    """``[N, C/g, kh, kw]`` weight from the packed rows, zeros at pruned stripes, in ops of static
    shape: a gather through ``rows`` (:func:`scatter_rows`, which callers cache), or without
    ``rows`` a ``masked_scatter``, whose backward (a ``masked_select``) Inductor compiles right
    under torch.func transforms; the gather's (a scatter-add) it does not (torch 2.13: the
    per-sample gradients of ``vmap(grad(...))`` summed over the samples; 2.6: a codegen error)."""
    n, kh, kw = stripe_mask.shape
    if rows is None:
        kept = stripe_mask.permute(1, 2, 0).reshape(-1, 1)
        dense = packed.new_zeros(kh * kw * n, packed.shape[1]).masked_scatter(kept, packed)
    else:
        padded = torch.cat([packed, packed.new_zeros(1, packed.shape[1])])
        dense = padded.index_select(0, rows)
    return dense.view(kh, kw, n, packed.shape[1]).permute(2, 3, 0, 1)


def stripe_conv2d_dense(input: Tensor, weight: Tensor, bias: Optional[Tensor], stripe_mask: Tensor,
                        stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int],
                        groups: int, rows: Optional[Tensor] = None) -> Tensor:
    """``stripe_conv2d`` as a dense ``conv2d`` (the same arguments; ``padding`` is top, bottom, left,
    right; ``rows`` as for :func:`dense_weight`). What the layer runs under ``torch.compile`` of
    torch.func transforms."""
    pt, pb, pl, pr = padding
    dense = dense_weight(weight, stripe_mask, rows).to(input.dtype)
    if pt == pb and pl == pr:
        return F.conv2d(input, dense, bias, list(stride), [pt, pl], list(dilation), groups)
    return F.conv2d(F.pad(input, [pl, pr, pt, pb]), dense, bias, list(stride), 0, list(dilation), groups)


def decompositions() -> dict:
    """``{stripeconv::stripe_conv2d: stripe_conv2d_dense}``, for
    :meth:`torch.export.ExportedProgram.run_decompositions`."""
    from . import ops  # noqa: F401  (registers the op)

    return {torch.ops.stripeconv.stripe_conv2d.default: stripe_conv2d_dense}


def _onnx_exporter_takes_programs() -> bool:
    """Whether ``torch.onnx.export`` takes an ``ExportedProgram`` (``dynamo=True``, torch >= 2.5;
    torch 2.4 has the flag but still requires example ``args``)."""
    params = inspect.signature(torch.onnx.export).parameters
    return "dynamo" in params and "args" in params and params["args"].default is not inspect.Parameter.empty


def export_onnx(model: nn.Module, args: tuple, f: Optional[Union[str, os.PathLike, io.BytesIO]] = None, *,
                dynamic_shapes: Optional[Any] = None, **kwargs: Any) -> Any:
    """Export a model with :class:`~stripeconv.StripeConv2d` layers to ONNX (needs ``onnx`` and
    ``onnxscript``): :func:`torch.export.export` (eval mode), the stripe op decomposed by
    :func:`decompositions`, then :func:`torch.onnx.export`; ``f`` and ``kwargs`` are passed to it
    (it writes the weights to a ``.data`` file beside ``f`` unless ``external_data=False``).
    Returns its ``ONNXProgram``."""
    if not _onnx_exporter_takes_programs():
        raise RuntimeError(f"export_onnx needs the torch.export-based ONNX exporter (torch >= 2.5); this is "
                           f"torch {torch.__version__}")
    restore = set_eval(model)
    try:
        program = torch.export.export(model, tuple(args), dynamic_shapes=dynamic_shapes)
    finally:
        restore()
    program = program.run_decompositions(decompositions())
    return torch.onnx.export(program, f=f, dynamo=True, **kwargs)
