"""Weights the Triton backend derives from the packed rows, made once per version of them: the dense
weight of the cuDNN hand-over, and the tile-major weight of the forward (:func:`tile_weight`).

Where :mod:`.gpu_select` hands a shape to cuDNN (density 1 layers, batch 1, small planes), each
call needs the dense ``[N, C/g, kh, kw]`` weight. Scattering it from the packed rows is a launch
(three with torch's ops alone: a zero row, a concatenation, a gather) and about as much host work
as a whole stripe kernel call, repeated on every call although an inference model's weights never change.

So the dense weight is kept beside the packed weight it came from, in a mapping that holds the
packed tensor weakly (its entry goes when the tensor does) and checks on each use that the tensor
still holds what it held: the same storage, strides and version counter (every in-place write, an
optimiser step included, bumps it), the same mask (:func:`._masks.mask_key`) and the same stream
(a weight scattered on one stream is not read on another before that stream has written it),
and the same layout. The weight takes the data's layout (channels_last, or NCHW for NCHW data): cuDNN
computes in channels_last where either the data or the weight is, so a channels_last weight would
make it copy NCHW data into channels_last and the op copy the result back. Training steps rebuild it once per step, and the backward's grad input reuses the forward's. As in
the CPU backend's cache, an in-place write through ``.data`` (which has a version counter of its
own) is not seen: :func:`stripeconv.backends.triton_backend.clear_cache` after such writes, or run
with ``STRIPECONV_GPU_DENSE_CACHE_MB=0``. That variable bounds the kept dense weights' memory
(default 256 MB; a weight that does not fit is scattered on every call).

Nothing is kept while a CUDA stream is being captured (a graph must replay the scatter, or it
would keep reading the weight as it was at capture, whatever an optimiser writes between
replays), nor for inference tensors (no version counter to check). So the hand-over costs a graph
replay the scatter (one launch of ``stripe_scatter_rows_kernel``) on top of cuDNN's conv:
:mod:`.gpu_select` times it that way too, and a captured call runs a stripe kernel where that is faster.
"""
from __future__ import annotations

import os
import weakref
from typing import Callable

import torch
from torch import Tensor

from . import _triton_runtime as runtime, _triton_shapes as shapes
from ._environ import raw_lookup
from ._masks import mask_key, memo
from .triton_plans import cached_plan

__all__ = ["dense_weight", "tile_weight", "clear"]

# id(packed weight) -> (weak reference to it, (data_ptr, strides, version, mask key, stream, form), derived
# weight, what the form's key points to: the mask, and the plan of a tile-major weight); holding them keeps
# their addresses from going to others while the entry can match them. One table per kind of derived weight.
# An entry goes when its weight does (the reference's callback). Keyed by id with the reference checked, not a
# torch.utils.weak.WeakIdKeyDictionary, whose lookup makes four Python calls on every settled call of the
# hand-over (docs/backends.md, "Host work and the frame stack").
_kept: dict[int, tuple] = {}
_kept_tiles: dict[int, tuple] = {}


# The current stream's handle without building a torch.cuda.Stream (CUDA builds of torch; Triton reads it so too)
_raw_stream = getattr(torch._C, "_cuda_getCurrentRawStream", None)


def _stream(weight: Tensor):
    if not weight.is_cuda:
        return None
    if _raw_stream is not None:
        return _raw_stream(weight.device.index)
    return torch.cuda.current_stream(weight.device).cuda_stream


def _scatter(weight: Tensor, mask: Tensor, device, memory_format: torch.memory_format) -> Tensor:
    """Packed rows -> dense [N, C/g, kh, kw] weight in ``memory_format``, sync-free: one launch of
    ``stripe_scatter_rows_kernel`` where the Triton kernels run, else a gather by index (both write
    [N, kh, kw, C/g] order, channels_last; NCHW takes a copy)."""
    n, kh, kw = mask.shape
    cg = weight.shape[1]
    plan = cached_plan("dense", mask, 1, 0, device)
    if weight.numel() == 0:  # every stripe pruned (or no channels): nothing to read
        dense = weight.new_zeros((n * kh * kw, cg))
    elif (weight.is_cuda or runtime.interpreting()) and runtime.load_kernels() is not None:
        dense = torch.empty((n * kh * kw, cg), dtype=weight.dtype, device=weight.device)
        _scatter_launch(mask, plan, cg, device)(weight.contiguous(), dense)
    else:
        # Every stripe kept: the scatter is a permutation of the rows, no zero row to read.
        rows = weight if weight.shape[0] == n * kh * kw else torch.cat([weight, weight.new_zeros(1, cg)])
        dense = rows.index_select(0, plan.scatter)
    dense = dense.view(n, kh, kw, cg).permute(0, 3, 1, 2)  # channels_last strides
    # NCHW: a copy with NCHW strides (where a dimension of 1 makes both layouts' conditions hold, the
    # framework reads the layout off the strides)
    return dense if memory_format == torch.channels_last else dense.clone(memory_format=torch.contiguous_format)


def _scatter_launch(mask: Tensor, plan, cg: int, device) -> "runtime.TunedLaunch":
    """The scatter kernel's launch for ``mask``'s dense plan and ``cg`` channels, worked out once per mask."""
    def build():
        r = plan.rows.numel()
        return runtime.TunedLaunch(
            "stripe_scatter_rows_kernel", (shapes.cdiv(r, _SCATTER_ROWS), shapes.cdiv(cg, _SCATTER_CHANNELS)),
            dict(INT64_INDEX=shapes.needs_int64(torch.empty((r, cg), device="meta")), BLOCK_R=_SCATTER_ROWS,
                 BLOCK_C=_SCATTER_CHANNELS), bound=(plan.rows, r, cg))
    return memo(("scatter_rows", *mask_key(mask), cg, str(device)), mask, build)


_SCATTER_ROWS, _SCATTER_CHANNELS = 32, 64  # a program's block of the dense weight


def dense_weight(weight: Tensor, mask: Tensor, device, keep: bool = True,
                 memory_format: torch.memory_format = torch.channels_last) -> Tensor:
    """The dense weight of the packed rows ``weight`` under ``mask`` in ``memory_format`` (the data's:
    see the module docstring), scattered on the first call and reused while ``weight`` holds the same
    values; with ``keep=False`` scattered on every call, as in a CUDA graph."""
    return _kept_or_made(_kept, weight, mask, keep, memory_format, (mask,),
                         lambda: _scatter(weight, mask, device, memory_format))


def tile_weight(weight: Tensor, mask: Tensor, plan, gather: Callable[[Tensor], Tensor], keep: bool = True) -> Tensor:
    """The packed rows ``weight`` in the tile order of the forward ``plan`` (``gather``: what makes it, see
    :func:`._triton_forward.tile_weight_gather`): row ``(t * UMAX + u) * BLOCK_N + n`` holds column ``n`` of
    tile ``t`` at its union entry ``u``, zeros where that filter does not keep the position, so that the
    forward reads a (tile, position) as one block of rows. Made on the first call and reused while ``weight``
    holds the same values, as the dense weight is (see the module docstring); with ``keep=False`` made on
    every call, as in a CUDA graph. The plan is told apart by what fixes its tiles for the mask (width,
    clustered or in order, tile and union counts), so that the forward's plan and the grad input's copy of
    it share the weight."""
    form = (plan.block_n, plan.in_order, plan.balanced, plan.num_tiles, plan.umax, plan.computed)
    return _kept_or_made(_kept_tiles, weight, mask, keep, form, (mask,), lambda: gather(weight))


def _kept_or_made(table: dict, weight: Tensor, mask: Tensor, keep: bool, form, holds: tuple,
                  make: Callable[[], Tensor]) -> Tensor:
    """``table``'s weight derived from ``weight`` in ``form`` while ``weight`` holds what it held when it was
    made (same storage, strides, version, mask and stream), else ``make()`` (kept where the budget allows)."""
    raw = _budget_raw(_BUDGET_KEY)
    budget = _budget[1] if raw == _budget[0] else _budget_bytes(raw)
    if not (keep and budget) or weight.is_inference() or runtime.capturing(weight):
        return make()
    state = (weight.data_ptr(), weight.stride(), weight._version, mask_key(mask), _stream(weight), form)
    key = id(weight)
    kept = table.get(key)
    if kept is not None and kept[0]() is weight:
        if kept[1] == state:
            return kept[2]
        del table[key]  # stale: its memory does not count against the budget
    with torch.no_grad():  # a constant of the kernels: the gradient comes back through the op's own backward
        derived = make()
    held = sum(entry[2].nbytes for kept_table in (_kept, _kept_tiles) for entry in kept_table.values())
    if held + derived.nbytes <= budget:
        table[key] = (weakref.ref(weight, _forgetter(table, key)), state, derived, holds)
    return derived


def _forgetter(table: dict, key: int) -> Callable[[weakref.ref], None]:
    """The callback that drops ``table[key]`` when its weight goes (unless the id went to another weight's entry)."""
    def forget(reference: weakref.ref) -> None:
        entry = table.get(key)
        if entry is not None and entry[0] is reference:
            del table[key]
    return forget


_budget_raw, (_BUDGET_KEY,) = raw_lookup(("STRIPECONV_GPU_DENSE_CACHE_MB",))
_budget = (None, 256 << 20)  # the variable's last raw value read and its bytes: parsed once per value


def _budget_bytes(raw) -> int:
    """The bytes ``STRIPECONV_GPU_DENSE_CACHE_MB`` allows (its raw value ``raw``; unset: 256 MB)."""
    global _budget
    text = os.fsdecode(raw) if isinstance(raw, bytes) else raw
    value = (text or "").strip() or "256"
    try:
        megabytes = float(value)
    except ValueError:
        raise ValueError(f"STRIPECONV_GPU_DENSE_CACHE_MB must be a number of megabytes (0 turns the cache off), "
                         f"got {value!r}") from None
    _budget = (raw, max(0, int(megabytes * (1 << 20))))
    return _budget[1]


def clear() -> None:
    """Drop every kept derived weight."""
    _kept.clear()
    _kept_tiles.clear()
