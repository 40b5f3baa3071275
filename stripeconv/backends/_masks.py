"""What backends compute once per stripe mask: masks change rarely, and reading a device mask
on the host synchronises the device, which a steady-state call (or CUDA graph capture) must not."""
from __future__ import annotations

import collections
import threading
from typing import Any, Callable

from torch import Tensor

from ..decompose import scatter_rows

# Entries, least recently used out: a layer's plans take ~20 (each tile width on the host and on the device,
# subtile groups, the backward's), so a first step keeps those of ~50 layers between its forward and backward.
# A settled call reads none; what stays in use (the dense hand-over's index maps) is touched every step.
_SIZE = 1024
_cache: "collections.OrderedDict[tuple, tuple]" = collections.OrderedDict()
_lock = threading.Lock()


def mask_key(mask: Tensor) -> tuple:
    """Changes with the mask: another tensor, an in-place write (its version), shape or device."""
    return (mask.data_ptr(), mask._version, tuple(mask.shape), str(mask.device))


def memo(key: tuple, mask: Tensor, build: Callable[[], Any]) -> Any:
    """``build()`` once per ``key``, which holds :func:`mask_key` of ``mask``; least recently used out."""
    with _lock:
        hit = _cache.get(key)
        if hit is not None:
            _cache.move_to_end(key)
            return hit[1]
    value = build()
    with _lock:
        _cache[key] = (mask, value)  # holding the mask keeps its data_ptr from being recycled
        while len(_cache) > _SIZE:
            _cache.popitem(last=False)
    return value


def clear() -> None:
    with _lock:
        _cache.clear()


def kept_stripes(mask: Tensor) -> int:
    """``mask.sum()``, read on the host once per mask."""
    return memo(("kept", *mask_key(mask)), mask, lambda: int(mask.sum()))


def kept_rows(mask: Tensor) -> Tensor:
    """Index of each packed row in the position-major ``[kh * kw * N]`` flattening of the stripes."""
    return memo(("rows", *mask_key(mask)), mask, lambda: mask.permute(1, 2, 0).reshape(-1).nonzero().squeeze(1))


def scatter_index(mask: Tensor) -> Tensor:
    """:func:`stripeconv.decompose.scatter_rows` of ``mask``, built once per mask."""
    return memo(("scatter", *mask_key(mask)), mask, lambda: scatter_rows(mask))


def check_rows(weight: Tensor, mask: Tensor) -> None:
    """The packed weight has one row per kept stripe."""
    kept = kept_stripes(mask)
    if weight.shape[0] != kept:
        raise ValueError(f"packed weight has {weight.shape[0]} rows but stripe_mask keeps {kept} stripes")
