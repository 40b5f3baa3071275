"""A compact torch.profiler summary of a few calls: where a call's host and device time go, and
whether anything in it waits for the device.

    summary = profile_calls(lambda: net(x), calls=5, cuda=True)
    print(format_summary(summary))

The summary (a JSON-ready dict) holds per call: the host time, the device time of every kernel,
the number of launches, the events that block the host on the device (stream or device
synchronisation, blocking copies, ``.item()``), and the events that took the most host and device
time. A steady-state call of a stripe network should show no blocking events: one would serialise
the host's launches with the GPU's work and cost a full round trip per layer.
"""
from __future__ import annotations

import inspect
import time
from collections import Counter
from typing import Callable

import torch

# Events that make the host wait for the device: the CUDA runtime's synchronising calls, the aten ops
# that read a device value on the host, and the caching allocator reaching the driver (cudaFree waits
# for the device; a steady-state call should allocate from the cache alone).
BLOCKING = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy ",
            "cudaMemcpy2D ", "aten::item", "aten::_local_scalar_dense", "aten::nonzero", "Memcpy DtoH",
            "cudaFree", "cudaMalloc")
LAUNCHES = ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernelEx", "cudaGraphLaunch")


def _is_blocking(name: str) -> bool:
    return any(name == b.strip() or name.startswith(b) for b in BLOCKING)


def profile_calls(fn: Callable[[], object], calls: int = 5, cuda: bool = False, top: int = 8) -> dict:
    """Profile ``calls`` back-to-back calls of ``fn`` (already warm) and summarise them per call.

    With ``cuda`` the device's activity is recorded too and the device is synchronised before and
    after (outside the profiled calls' host time)."""
    from torch.profiler import ProfilerActivity, profile

    if calls < 1:
        raise ValueError(f"calls must be at least 1, got {calls}")
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    sync()
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        host_s = time.perf_counter() - start
        sync()
    events = prof.key_averages()

    def self_device_us(e) -> float:
        return float(getattr(e, "self_device_time_total", getattr(e, "self_cuda_time_total", 0.0)))

    def row(e) -> dict:
        return {"name": e.key, "count_per_call": e.count / calls,
                "self_cpu_us_per_call": e.self_cpu_time_total / calls,
                "self_device_us_per_call": self_device_us(e) / calls}

    kernels = [e for e in events if self_device_us(e) > 0 and e.self_cpu_time_total == 0]
    return {
        "calls": calls,
        "host_ms_per_call": host_s / calls * 1e3,
        "device_ms_per_call": sum(self_device_us(e) for e in kernels) / calls / 1e3,
        "launches_per_call": sum(e.count for e in events if e.key in LAUNCHES) / calls,
        "blocking": [row(e) for e in events if _is_blocking(e.key)],
        "top_host": [row(e) for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[:top]],
        "top_device": [row(e) for e in sorted(kernels, key=lambda e: -self_device_us(e))[:top]],
    }


def python_profile_calls(fn: Callable[[], object], calls: int = 5, top: int = 12) -> dict:
    """Profile ``calls`` back-to-back calls of ``fn`` (already warm) with cProfile: the Python functions
    that took the most time of their own, per call. Where a call's host time goes inside Python (a
    launch path, a cache lookup, argument checks), which torch.profiler shows only as the op around it.
    cProfile's own cost per Python call inflates every function alike, so compare the rows, not the sum
    with the unprofiled time."""
    import cProfile
    import pstats

    if calls < 1:
        raise ValueError(f"calls must be at least 1, got {calls}")
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(calls):
        fn()
    profiler.disable()
    stats = pstats.Stats(profiler).stats  # (file, line, name) -> (primitive calls, calls, own s, cumulative s, callers)

    def row(where, entry) -> dict:
        file, line, name = where
        return {"function": f"{'/'.join(file.split('/')[-2:])}:{line}({name})", "calls_per_call": entry[1] / calls,
                "own_us_per_call": entry[2] / calls * 1e6, "cumulative_us_per_call": entry[3] / calls * 1e6}

    ranked = sorted(stats.items(), key=lambda item: -item[1][2])
    return {"calls": calls, "own_us_per_call": sum(entry[2] for entry in stats.values()) / calls * 1e6,
            "top_own": [row(where, entry) for where, entry in ranked[:top]]}


def format_python_profile(summary: dict, title: str = "", rows: "int | None" = None) -> str:
    """:func:`python_profile_calls`' result as a few lines of text for a log (the first ``rows`` functions)."""
    lines = [f"{title}{summary['own_us_per_call']:.0f} us of Python per call under cProfile"]
    for r in summary["top_own"][:rows]:
        lines.append(f"    {r['own_us_per_call']:8.1f} us own {r['cumulative_us_per_call']:9.1f} us cumulative  "
                     f"x{r['calls_per_call']:<6g} {r['function'][:90]}")
    return "\n".join(lines)


_GENERATOR_FLAGS = inspect.CO_GENERATOR | inspect.CO_COROUTINE | inspect.CO_ASYNC_GENERATOR


def python_frames(fn: Callable[[], object], within: str = "") -> dict:
    """The Python frames one call of ``fn`` pushes onto the interpreter's frame stack, by depth below the
    call (``fn``'s own frame at depth 1): how many there are, and at most how many at one depth.

    On CPython 3.11 and 3.12 the frame stack grows in 16 KB chunks, and a chunk is unmapped as soon as
    the first frame in it returns: where a call's frames cross a chunk's end, every frame that does costs
    an ``mmap`` and a ``munmap`` (CPython gh-142183), on every call. Whether they do depends on the
    caller's depth; where they do, the frames at the crossing depth set the cost, so both the count and the
    most at one depth matter. ``within``: also count apart the frames of source files under that path
    (``within_*``). A generator's resumptions push nothing (its frame lives in the generator): counted once."""
    import sys

    depths, names, mine = Counter(), Counter(), Counter()
    depth, seen = [0], set()

    def tracer(frame, event, arg):
        if event == "call":
            depth[0] += 1
            code = frame.f_code
            if code.co_flags & _GENERATOR_FLAGS:
                if id(frame) in seen:
                    return
                seen.add(id(frame))
            depths[depth[0]] += 1
            names[f"{depth[0]}:{code.co_name}"] += 1
            if within and code.co_filename.startswith(within):
                mine[depth[0]] += 1
        elif event == "return":
            depth[0] -= 1

    previous = sys.getprofile()
    sys.setprofile(tracer)
    try:
        fn()
    finally:
        sys.setprofile(previous)
    return {"frames": sum(depths.values()), "most_at_one_depth": max(depths.values(), default=0),
            "within_frames": sum(mine.values()), "within_most_at_one_depth": max(mine.values(), default=0),
            "per_depth": [depths[d] for d in range(1, max(depths, default=0) + 1)], "by_name": dict(names)}


def format_summary(summary: dict, title: str = "") -> str:
    """The summary as a few lines of text for a log."""
    lines = [f"{title}host {summary['host_ms_per_call']:.3f} ms, device {summary['device_ms_per_call']:.3f} ms, "
             f"{summary['launches_per_call']:.0f} launches per call; blocking: "
             + (", ".join(f"{r['name']} x{r['count_per_call']:g}" for r in summary["blocking"]) or "none")]
    for label, key, unit in (("host", "top_host", "self_cpu_us_per_call"),
                             ("device", "top_device", "self_device_us_per_call")):
        for r in summary[key]:
            lines.append(f"    {label:6s} {r[unit]:9.1f} us  x{r['count_per_call']:<5g} {r['name'][:90]}")
    return "\n".join(lines)
