"""Compile the kernel variants a workload will launch, in parallel, before it runs.

Triton compiles a kernel variant the first time a launch needs it, about a second each and one
at a time, and the autotuner compiles every configuration of a new shape. A pruned network
launches a few variants per layer (tile widths, forward and both gradients), so its first steps
can spend minutes in the compiler. :func:`plan` records the launches a set of calls would make
(host code on CPU tensors, as :mod:`.aot` does) and keeps one job per distinct variant and
configuration; :func:`precompile` compiles the jobs in worker processes through Triton's own JIT
(``warmup``: the same specialisation and cache key as a real launch), which fills Triton's
on-disk cache. The first real launch then loads each variant from there.

    jobs = precompile.plan(calls, sm_count=torch.cuda.get_device_properties(0).multi_processor_count)
    stats = precompile.precompile(jobs)
"""
from __future__ import annotations

import inspect
import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional

import torch

from . import aot

__all__ = ["Job", "plan", "precompile", "compiled_count"]


@dataclass(frozen=True)
class _TensorArg:
    """A tensor argument: only its dtype enters the specialisation (allocations are 16-byte aligned)."""
    dtype: torch.dtype


@dataclass(frozen=True)
class _DescriptorArg:
    """A host-side tensor descriptor (TMA): its dtype and box enter the specialisation."""
    dtype: torch.dtype
    block_shape: tuple


@dataclass
class Job:
    """One kernel variant under one autotuning configuration; picklable for a worker process."""
    kernel: str            # attribute of stripeconv.kernels.stripe_conv
    args: tuple            # positional arguments, tensors as _TensorArg
    kwargs: dict           # constexpr arguments of the launch
    config: dict           # the configuration's kwargs, num_warps and num_stages


def _config_kwargs(config) -> dict:
    if config is None:
        return {}
    if hasattr(config, "all_kwargs"):
        return dict(config.all_kwargs())
    return {**config.kwargs, "num_warps": config.num_warps, "num_stages": config.num_stages}


def _job_arg(value):
    if isinstance(value, torch.Tensor):
        return _TensorArg(value.dtype)
    if type(value).__name__ == "TensorDescriptor":
        return _DescriptorArg(value.base.dtype, tuple(value.block_shape))
    return value


def _launch_arg(value, device: str):
    """A stand-in for a job's argument on ``device`` that Triton specialises as the recorded one."""
    if isinstance(value, _TensorArg):
        return torch.empty(16, dtype=value.dtype, device=device)
    if isinstance(value, _DescriptorArg):
        from triton.tools.tensor_descriptor import TensorDescriptor

        box = list(value.block_shape)
        base = torch.empty(box, dtype=value.dtype, device=device)
        return TensorDescriptor(base, box, list(base.stride()), box)
    return value


def plan(calls: Iterable[Callable[[], Any]], sm_count: int = 132, tma: bool = True) -> list[Job]:
    """One job per distinct compiled variant that ``calls`` would need on a GPU with ``sm_count``
    multiprocessors (that copies tensor boxes, ``tma``: sm_90 and later): every tile width the first
    call times, every autotuning configuration."""
    jobs, seen = [], set()
    for call in calls:
        for launch in aot.capture_launches(call, sm_count=sm_count, every_candidate=True, tma=tma):
            fn = aot._jit_fn(launch.kernel)
            values = dict(inspect.signature(fn.fn).bind_partial(*launch.args, **launch.kwargs).arguments)
            for config in aot.tuned_configs(launch):
                cfg = _config_kwargs(config)
                signature, constexprs, attrs = aot.specialisation(fn, {**values, **cfg})
                key = (fn.__name__, tuple(signature.items()), repr(sorted(constexprs.items())),
                       tuple(sorted(attrs)), tuple(sorted((k, v) for k, v in cfg.items() if k not in constexprs)))
                if key in seen:
                    continue
                seen.add(key)
                jobs.append(Job(fn.__name__, tuple(map(_job_arg, launch.args)), dict(launch.kwargs), cfg))
    return jobs


def _compile(job: Job, device: str = "cuda") -> float:
    """Compile ``job`` through Triton's JIT without launching it; seconds spent."""
    from ..backends import _triton_runtime as runtime

    jit = aot._jit_fn(getattr(runtime.check_kernels(), job.kernel))
    args = [_launch_arg(a, device) for a in job.args]
    start = time.perf_counter()
    jit.warmup(*args, grid=(1,), **job.kwargs, **job.config)
    return time.perf_counter() - start


def precompile(jobs: list[Job], workers: Optional[int] = None,
               compile_one: Callable[[Job], float] = _compile) -> dict:
    """Compile ``jobs`` in ``workers`` processes (default: one per CPU core this process may use,
    at most 16: each holds a CUDA context) into Triton's on-disk cache; ``workers=0`` compiles in
    this process. Returns the number of jobs, of failures (a failing variant is left to the
    autotuner, which skips configurations that do not fit), the wall time and the summed compile
    time."""
    start = time.perf_counter()
    errors: list[str] = []
    compile_s = 0.0
    if workers is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        workers = min(len(jobs), cores, 16)
    if workers <= 0 or len(jobs) <= 1:
        results = []
        for job in jobs:
            try:
                results.append(compile_one(job))
            except Exception as exc:  # noqa: BLE001 - reported, not fatal
                errors.append(f"{job.kernel}: {type(exc).__name__}: {exc}")
        compile_s = sum(results)
    else:
        # spawn: a forked child cannot use the parent's CUDA context
        # (the initializer imports this module in each worker, from a source checkout too)
        from ..backends._triton_runtime import kernels_module

        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                 initializer=kernels_module, initargs=("precompile",)) as pool:
            futures = [pool.submit(compile_one, job) for job in jobs]
            for job, future in zip(jobs, futures):
                try:
                    compile_s += future.result()
                except Exception as exc:  # noqa: BLE001
                    errors.append(f"{job.kernel}: {type(exc).__name__}: {exc}")
    return {"jobs": len(jobs), "failed": len(errors), "errors": errors[:5], "workers": workers,
            "wall_s": round(time.perf_counter() - start, 2), "compile_s": round(compile_s, 2)}


def compiled_count(cache_dir: Optional[str] = None) -> int:
    """Compiled kernels in Triton's on-disk cache (``TRITON_CACHE_DIR``, else ``~/.triton/cache``):
    the difference across a run counts the variants compiled during it."""
    default = os.path.join(os.path.expanduser("~"), ".triton", "cache")
    cache_dir = cache_dir or os.environ.get("TRITON_CACHE_DIR") or default
    if not os.path.isdir(cache_dir):
        return 0
    return sum(1 for entry in os.scandir(cache_dir) if entry.is_dir()
               and any(name.endswith(".cubin") or name.endswith(".hsaco") for name in os.listdir(entry.path)))
