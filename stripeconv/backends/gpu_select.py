"""Per-shape choice between the stripe kernels and cuDNN's dense conv on CUDA devices.

A stripe conv does ``density / tile_efficiency`` of the dense FLOPs, but cuDNN's dense conv runs
closer to the tensor cores' peak. Near density 1, on small planes or at batch 1, dense can win;
at low density the stripe kernels do. Like ``torch.backends.cudnn.benchmark``, the first call
of a new key times every candidate with CUDA events and caches the fastest, so each layer runs
whichever is faster on this GPU and is never much slower than the dense conv it replaces.

A key holds everything the times depend on: the op, shapes, dtype, memory format, conv
geometry, and the kept / computed stripe counts of the candidates' plans (so two masks of the
same layer with the same counts share a decision). The dense candidates scatter the packed rows
into a dense weight (and gather the dense grad weight back) through cached index tensors: no
host sync, so a cached decision is usable under CUDA graph capture. While a stream is being
captured, an undecided key takes the stripe kernels without timing.

``STRIPECONV_GPU_DENSE`` overrides the choice: ``auto`` (default), ``never`` (always the
stripe kernels; the benchmarks time the kernels this way) or ``always`` (dense wherever it
applies; tests use it to check the dense path).
"""
from __future__ import annotations

import os
import statistics
import threading
from typing import Callable

import torch
from torch import Tensor

__all__ = ["mode", "choose", "decisions", "clear"]

_MODES = ("auto", "never", "always")
_decisions: dict[tuple, str] = {}
_times: dict[tuple, dict[str, float]] = {}
_lock = threading.Lock()


def mode() -> str:
    value = os.environ.get("STRIPECONV_GPU_DENSE", "auto").strip().lower() or "auto"
    if value not in _MODES:
        raise ValueError(f"STRIPECONV_GPU_DENSE must be one of {', '.join(_MODES)}, got {value!r}")
    return value


def _time_ms(fn: Callable[[], Tensor], repeats: int = 5) -> float:
    fn()  # warm-up: autotuning, compilation, cuDNN's own algorithm search
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def choose(key: tuple, candidates: dict[str, Callable[[], Tensor]], device: torch.device) -> str:
    """Name of the candidate to run for ``key``; the first candidate is the stripe kernel.

    Candidates named ``dense`` are the dense conv; the rest are stripe-kernel variants.
    """
    names = list(candidates)
    m = mode()
    if m == "never" or len(names) == 1:
        return next((n for n in names if n != "dense"), names[0])
    if m == "always" and "dense" in candidates:
        return "dense"
    with _lock:
        hit = _decisions.get(key)
    if hit is not None:
        return hit
    if device.type != "cuda" or torch.cuda.is_current_stream_capturing():
        return names[0]
    times = {name: _time_ms(fn) for name, fn in candidates.items()}
    best = min(times, key=times.get)
    with _lock:
        _decisions[key] = best
        _times[key] = times
    return best


def decisions() -> list[dict]:
    """Every timed decision so far: the key, the candidates' median times (ms) and the choice."""
    with _lock:
        return [{"key": key, "times_ms": dict(_times[key]), "choice": choice} for key, choice in _decisions.items()]


def clear() -> None:
    """Forget every decision (the next call of each key times again)."""
    with _lock:
        _decisions.clear()
        _times.clear()
