"""GPU benchmark of the Triton stripe conv against cuDNN, the reference and channel pruning.

    python bench/bench_gpu.py --out bench/results/            # everything (about 20 min on an H100)
    python bench/bench_gpu.py --out bench/results/ --quick    # a few layers, fewer densities
    bash bench/gpu_session.sh build test quick                # the same in 10-minute steps

For every layer, density (1, 0.7, 0.5, 0.3, 0.2, 0.1) and mask kind ("random": every stripe
kept with probability = density; "realistic": exactly density * N*K*K stripes drawn with the
centre position kept most often, then edges, then corners; with ``--masks ...,grouped`` also
"grouped": groups of 32 filters share one such pattern, as SWP with ``group_size=32`` learns) it
times, in the same dtype:

* ``dense``     cuDNN conv, channels_last, ``torch.backends.cudnn.benchmark = True``; in fp32 at the
  stripe kernels' precision (TF32 only where ``torch.backends.cuda.matmul`` allows it; cuDNN's own
  flag, TF32 by default, would time dense TF32 against IEEE stripe kernels)
* ``triton``    this project's Triton kernels (the op pinned to the triton backend with
  ``STRIPECONV_GPU_DENSE=never``: the stripe kernels always run, at the tile width
  that times fastest)
* ``stripeconv``  the op as models run it on a GPU: per shape the faster of the stripe kernels
  and cuDNN, chosen by timing once (stripeconv/backends/gpu_select.py)
* ``cuda``      the CUDA C++ kernels (csrc/cuda, position-major forward that computes no pruned
  stripe), when the extension was built with CUDA and a self-check in a child process (forward
  and gradients against the dense conv, bf16 and fp32) passes on this GPU
* ``reference`` the pure-PyTorch stripe implementation (stripeconv/backends/reference.py)
* ``published`` the inference path of the SWP authors' published code, restated: one 1x1 conv of
  every kept stripe over the whole input, then per kernel position a zero-padded shift, a strided
  slice and an indexed add into the output (index lists built once per layer, not per call)
* ``chanprune`` a dense cuDNN conv with round(N * density) output channels: the same FLOPs
  as the stripe conv, i.e. what filter/channel pruning would give at that density

forward only and forward + backward (grad input, grad weight, bias), each called as StripeConv2d
calls it in eager mode (``stripeconv.backends.eager_conv2d``: the backend's kernels under one
autograd.Function, without the custom op's Python layers). Batch-1 forwards are also timed back
to back without a cache flush between calls (``host_ms``): the latency of an eager step, host
work included, which do_bench's flush hides. do_bench times the host where a call's host work
exceeds its GPU time (small layers, and every forward+backward through autograd); ``--graphs``
also times each cell as a CUDA graph replay (``graph_ms``: GPU time alone).
Before anything is timed, every Triton kernel variant the run will launch (each tile width,
each autotuning configuration) is compiled in parallel worker processes into Triton's on-disk
cache (kernels/precompile.py; ``--no-precompile`` leaves it to the first launches, one at a
time); the JSON's ``compiled_while_timing`` counts the variants compiled after that.
Timings: ``triton.testing.do_bench`` (warm-up, L2 flushed between repetitions) on random data
(never zeros) with input buffers rotated so that one input is not reused from cache; median and
inter-quartile range are reported. The table prints the speedup over dense next to the ideal
1/density and the tile efficiency (kept stripes / stripes the forward kernel computes), and per
layer the two floors: FLOPs / peak and bytes / bandwidth.

Writes ``<out>/bench_gpu_<date>.json`` (device, versions, date, every timing; rewritten after
every layer, so a run cut short keeps what it measured) and a plot ``<out>/bench_gpu_<date>.png``
when matplotlib is importable. ``--budget-s`` stops starting new layers after that many
seconds. ``--from-json A.json B.json ...`` merges earlier runs (e.g. one per suite) and prints
the tables, the target check and the plot again without a GPU.

Each Triton column of a cell records what gpu_select chose for its calls and the time it measured
for that choice (``kernels``: fwd, and in forward + backward dgrad and wgrad); the summary ends with
where a training step's CUDA graph replay goes: the chosen candidates' shares and the rest
(``--step-rows``: row by row).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import functools
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from typing import Callable, Optional

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

# (beside this script)
from profile_summary import format_python_profile, format_summary, profile_calls, python_profile_calls  # noqa: E402

DENSITIES = (1.0, 0.7, 0.5, 0.3, 0.2, 0.1)
_T_START = time.time()  # --budget-s counts from here: imports and the CUDA self-check take slot time too

# (name, batch, C, N, H(=W), k, stride, pad)
VGG16_CIFAR = [
    ("vgg.conv1_1", 256, 3, 64, 32, 3, 1, 1),
    ("vgg.conv1_2", 256, 64, 64, 32, 3, 1, 1),
    ("vgg.conv2_1", 256, 64, 128, 16, 3, 1, 1),
    ("vgg.conv2_2", 256, 128, 128, 16, 3, 1, 1),
    ("vgg.conv3_1", 256, 128, 256, 8, 3, 1, 1),
    ("vgg.conv3_x", 256, 256, 256, 8, 3, 1, 1),   # conv3_2, conv3_3
    ("vgg.conv4_1", 256, 256, 512, 4, 3, 1, 1),
    ("vgg.conv4_x", 256, 512, 512, 4, 3, 1, 1),   # conv4_2, conv4_3
    ("vgg.conv5_x", 256, 512, 512, 2, 3, 1, 1),   # conv5_1..3
]
RESNET56_CIFAR = [
    ("r56.stage1", 256, 16, 16, 32, 3, 1, 1),
    ("r56.stage2_down", 256, 16, 32, 32, 3, 2, 1),
    ("r56.stage2", 256, 32, 32, 16, 3, 1, 1),
    ("r56.stage3_down", 256, 32, 64, 16, 3, 2, 1),
    ("r56.stage3", 256, 64, 64, 8, 3, 1, 1),
]
RESNET50_224 = [  # the 3x3 convs of the bottlenecks (torchvision v1.5: stride on the 3x3)
    ("r50.layer1", 64, 64, 64, 56, 3, 1, 1),
    ("r50.layer2_down", 64, 128, 128, 56, 3, 2, 1),
    ("r50.layer2", 64, 128, 128, 28, 3, 1, 1),
    ("r50.layer3_down", 64, 256, 256, 28, 3, 2, 1),
    ("r50.layer3", 64, 256, 256, 14, 3, 1, 1),
    ("r50.layer4_down", 64, 512, 512, 14, 3, 2, 1),
    ("r50.layer4", 64, 512, 512, 7, 3, 1, 1),
]
BATCH1 = [  # latency
    ("b1.vgg.conv2_2", 1, 128, 128, 16, 3, 1, 1),
    ("b1.vgg.conv4_x", 1, 512, 512, 4, 3, 1, 1),
    ("b1.r50.layer1", 1, 64, 64, 56, 3, 1, 1),
    ("b1.r50.layer3", 1, 256, 256, 14, 3, 1, 1),
    ("b1.r50.layer4", 1, 512, 512, 7, 3, 1, 1),
]
METHODS = ("triton", "stripeconv", "cuda", "reference", "published")  # the stripe-conv columns of a cell
SUITES = {"vgg16": VGG16_CIFAR, "resnet56": RESNET56_CIFAR, "resnet50": RESNET50_224, "batch1": BATCH1}

# Dense tensor-core peak (TFLOP/s) and HBM bandwidth (TB/s) of the SXM parts; --peak-tflops and
# --bandwidth override.
DEVICE_PEAKS = {
    "H200": {"16bit": 989.0, "tf32": 494.0, "fp32": 67.0, "bw": 4.8},
    "H100": {"16bit": 989.0, "tf32": 494.0, "fp32": 67.0, "bw": 3.35},
    "A100": {"16bit": 312.0, "tf32": 156.0, "fp32": 19.5, "bw": 2.0},
}


def _peaks(name: str, dtype: torch.dtype, args) -> tuple[float, float]:
    entry = next((v for k, v in DEVICE_PEAKS.items() if k in name), DEVICE_PEAKS["H100"])
    if dtype in (torch.float16, torch.bfloat16):
        peak = entry["16bit"]
    else:
        from stripeconv.backends._triton_runtime import tf32_matmul

        peak = entry["tf32"] if tf32_matmul() else entry["fp32"]
    return (args.peak_tflops or peak) * 1e12, (args.bandwidth or entry["bw"]) * 1e12


# ----------------------------------------------------------------------------------------------

GROUP = 32  # filters per shared pattern in "grouped" masks (SWP with group_size=32)


def make_mask(n: int, k: int, density: float, kind: str, gen: torch.Generator) -> torch.Tensor:
    """A stripe mask of ``kind``: random, realistic (centre kept more often), grouped (GROUP filters
    share a pattern), or either of the first two with ``-reordered``: its filters in the order
    ``stripeconv.reorder_filters`` gives a model's layers (tiles of consecutive channels)."""
    if kind.endswith("-reordered"):
        from stripeconv.backends.triton_plans import filter_order

        mask = make_mask(n, k, density, kind[:-len("-reordered")], gen)
        return mask[filter_order(mask)].contiguous()
    if density >= 1.0:
        return torch.ones(n, k, k, dtype=torch.bool)
    if kind == "random":
        return torch.rand(n, k, k, generator=gen) < density
    c = (k - 1) / 2
    ii, jj = torch.meshgrid(torch.arange(k), torch.arange(k), indexing="ij")
    dist = (ii - c).abs() + (jj - c).abs()
    pos_w = torch.exp(-1.2 * dist.float())  # centre 1, edges 0.30, corners 0.09 for 3x3
    if kind == "grouped":
        # Each group of GROUP filters keeps one pattern; per group floor or ceil of density * k*k
        # positions, drawn centre-first, so that the mean density is the target.
        groups = -(-n // GROUP)
        want = density * k * k
        counts = torch.full((groups,), int(want)) + (torch.rand(groups, generator=gen) < want - int(want)).long()
        mask = torch.zeros(groups, k * k, dtype=torch.bool)
        for gi in range(groups):
            if counts[gi] > 0:
                w = pos_w.reshape(-1) * (0.5 + torch.rand(k * k, generator=gen))
                mask[gi, torch.multinomial(w, int(counts[gi]), replacement=False, generator=gen)] = True
        return mask.repeat_interleave(GROUP, 0)[:n].view(n, k, k)
    if kind != "realistic":
        raise ValueError(f"mask kind must be random, realistic or grouped (the first two also "
                         f"with -reordered), got {kind!r}")
    # realistic: exactly round(density * n*k*k) stripes, centre > edges > corners
    w = pos_w.expand(n, k, k).reshape(-1) * (0.5 + torch.rand(n * k * k, generator=gen))
    keep = max(1, round(density * n * k * k))
    idx = torch.multinomial(w, keep, replacement=False, generator=gen)
    mask = torch.zeros(n * k * k, dtype=torch.bool)
    mask[idx] = True
    return mask.view(n, k, k)


def published_rows(mask: torch.Tensor) -> list:
    """(i, j, first packed row, filters keeping (i, j)) per kernel position with kept stripes."""
    rows, first = [], 0
    n, kh, kw = mask.shape
    for i in range(kh):
        for j in range(kw):
            filters = mask[:, i, j].nonzero().flatten()
            if filters.numel():
                rows.append((i, j, first, filters))
            first += filters.numel()
    return rows


def published_swp_conv(x, packed, bias, rows, n: int, stride: int, pad: int, out_hw: int):
    """The published SWP inference path: all kept stripes as one 1x1 conv at full resolution, then
    per kernel position its block of rows, zero padded, shifted and strided, added into the filters
    that keep the position (``rows`` from :func:`published_rows`)."""
    y = F.conv2d(x, packed.view(*packed.shape, 1, 1))
    out = torch.zeros(x.shape[0], n, out_hw, out_hw, dtype=x.dtype, device=x.device)
    span = stride * (out_hw - 1) + 1
    for i, j, first, filters in rows:
        block = F.pad(y[:, first:first + filters.numel()], (pad, pad, pad, pad))
        out[:, filters] += block[:, :, i:i + span:stride, j:j + span:stride]
    return out if bias is None else out + bias.view(1, -1, 1, 1)


def cell_errors(call, x, packed, bias, mask, w_dense, gy, stride: int, pad: int, backward: bool) -> dict:
    """How far one call of ``call(x)`` (with ``backward`` its gradients with respect to ``x``, the packed
    rows and the bias too) is from the oracle: F.conv2d on the masked dense weight in fp64. Each as
    the largest error over the oracle's largest magnitude (``gpu_select.disagreement``)."""
    from stripeconv.backends import gpu_select
    from stripeconv.packing import pack_weight

    with torch.enable_grad():
        y = call(x)
        got = {"out": y}
        if backward:
            got.update(zip(("grad_input", "grad_weight", "grad_bias"), torch.autograd.grad(y, (x, packed, bias), gy)))
        leaves = [t.detach().double().contiguous().requires_grad_(backward)
                  for t in (x, w_dense * mask[:, None], bias)]
        ref = F.conv2d(*leaves, stride, pad)
        want = {"out": ref}
        if backward:
            gx, gw, gb = torch.autograd.grad(ref, leaves, gy.double())
            want.update(grad_input=gx, grad_weight=pack_weight(gw, mask), grad_bias=gb)
    return {name: gpu_select.disagreement(got[name], want[name]) for name in got}


def check_cell(timing: dict, errors: dict, dtype: torch.dtype) -> None:
    """Record ``cell_errors`` in a method's timing, and ``wrong``: whether any of them strays further
    than rounding explains (``gpu_select.tolerance``). A wrong cell's speedup counts for nothing."""
    from stripeconv.backends import gpu_select

    limit = gpu_select.tolerance(dtype)
    timing["max_rel_error"] = errors
    timing["wrong"] = any(e is not None and not e <= limit for e in errors.values())


def _bench(fn, args) -> dict:
    if args.cpu_smoke:  # code-path check only: the interpreter's times mean nothing
        times = []
        for _ in range(2):
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e3)
        return {"median_ms": statistics.median(times), "q25_ms": min(times), "q75_ms": max(times),
                "iqr_ms": max(times) - min(times)}
    import triton.testing

    q25, q50, q75 = triton.testing.do_bench(fn, warmup=args.warmup_ms, rep=args.rep_ms, quantiles=[0.25, 0.5, 0.75])
    return {"median_ms": q50, "q25_ms": q25, "q75_ms": q75, "iqr_ms": q75 - q25}


def _graph_bench(fn) -> dict:
    """GPU time alone: ``fn`` captured once in a CUDA graph (after warm-up calls on a side stream,
    which settle tile plans, autotuning and the dense/stripe choice) and its replays timed. Where the
    host work of a call exceeds its GPU time, ``_bench`` times the host; this does not."""
    import triton.testing

    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                fn()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        q25, q50, q75 = triton.testing.do_bench(graph.replay, warmup=10, rep=40, quantiles=[0.25, 0.5, 0.75])
        del graph  # its memory pool goes with it
        return {"graph_ms": q50, "graph_iqr_ms": q75 - q25}
    except Exception as exc:  # keep the run going, record why
        return {"graph_error": f"{type(exc).__name__}: {exc}"}


def _host_latency_ms(fn, args) -> float:
    """Median time of a call of ``fn`` in back-to-back calls, host work included (no cache flush
    between calls to hide it behind): what an eager batch-1 step pays."""
    calls, rounds = (2, 1) if args.cpu_smoke else (100, 5)
    sync = (lambda: None) if args.cpu_smoke else torch.cuda.synchronize
    for _ in range(calls // 4 + 1):
        fn()
    sync()
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        sync()
        times.append((time.perf_counter() - start) / calls * 1e3)
    return statistics.median(times)


class Rotating:
    """Several random input buffers used in turn, so that their total exceeds the L2 cache."""

    def __init__(self, shape, dtype, device, min_bytes=128 << 20, max_count=8, requires_grad=False):
        one = math.prod(shape) * torch.finfo(dtype).bits // 8
        count = max(2, min(max_count, -(-min_bytes // max(1, one))))
        self.bufs = [torch.randn(shape, dtype=dtype, device=device).contiguous(memory_format=torch.channels_last)
                     .requires_grad_(requires_grad) for _ in range(count)]
        self.i = 0

    def next(self):
        self.i = (self.i + 1) % len(self.bufs)
        return self.bufs[self.i]


def layer_masks(layer, args, gen) -> list:
    """(target density, kind, mask) of every cell of ``layer``, in the order they are timed."""
    n, k = layer[3], layer[5]
    return [(density, kind, make_mask(n, k, density, kind, gen))
            for density in args.densities for kind in (["random"] if density >= 1.0 else args.masks)]


def precompile_calls(layer, masks, dtype, backward: bool) -> list:
    """The triton backend's host calls for every mask of ``layer``, on CPU tensors shaped and laid out
    as the benchmark's (for kernels/precompile.py to record their launches)."""
    from stripeconv.backends import triton_backend as tb
    from stripeconv.packing import pack_weight

    _, b, c, n, hw, k, s, p = layer
    ho = (hw + 2 * p - k) // s + 1
    x = torch.empty(b, c, hw, hw, dtype=dtype).contiguous(memory_format=torch.channels_last)
    gy = torch.empty(b, n, ho, ho, dtype=dtype).contiguous(memory_format=torch.channels_last)
    bias = torch.zeros(n, dtype=dtype)
    conv = ((s, s), (p, p, p, p), (1, 1), 1)
    calls = []
    for _, _, mask in masks:
        if not mask.any():
            continue
        packed = pack_weight(torch.zeros(n, c, k, k, dtype=dtype), mask)
        calls.append(functools.partial(tb.forward, x, packed, bias, mask, *conv))
        if backward:
            calls.append(functools.partial(tb.grad_input, gy, packed, mask, x.shape, *conv))
            calls.append(functools.partial(tb.grad_weight, gy, x, packed, mask, *conv))
    return calls


def plan_kernels(layers, masks, dtype, args, sm_count: int) -> list:
    """kernels/precompile.py's jobs: one per kernel variant that timing ``layers`` will compile."""
    from stripeconv.backends import triton_backend as tb

    calls = [call for layer in layers
             for call in precompile_calls(layer, masks[layer[0]], dtype, backward=not args.no_backward)]
    tma = not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] >= 9  # without a GPU: an H100's plan
    return tb.kernels_module("precompile").plan(calls, sm_count=sm_count, tma=tma)


def run_layer(layer, args, dtype, device, peaks, masks, results):
    from stripeconv import backends, ops
    from stripeconv.backends import gpu_select, triton_plans as tp
    from stripeconv.packing import pack_weight

    name, b, c, n, hw, k, s, p = layer
    ho = (hw + 2 * p - k) // s + 1
    elt = torch.finfo(dtype).bits // 8
    x_rot = Rotating((b, c, hw, hw), dtype, device, requires_grad=True)
    gy = torch.randn(b, n, ho, ho, dtype=dtype, device=device).contiguous(memory_format=torch.channels_last)
    w_dense = (torch.randn(n, c, k, k, dtype=dtype, device=device) / math.sqrt(c * k * k)).contiguous(
        memory_format=torch.channels_last).requires_grad_(True)
    bias = torch.randn(n, dtype=dtype, device=device, requires_grad=True)
    gy_n = {}  # grad_output per output-channel count, contiguous channels_last

    def _gy(n_out):
        if n_out not in gy_n:
            gy_n[n_out] = gy[:, :n_out].contiguous(memory_format=torch.channels_last)
        return gy_n[n_out]
    flops_dense = 2.0 * b * ho * ho * n * c * k * k
    peak, bw = peaks

    def floors(density, n_out=n):
        flops = flops_dense * density * n_out / n
        byts = elt * (b * c * hw * hw + b * n_out * ho * ho + n * c * k * k * density)
        return flops / peak * 1e3, byts / bw * 1e3  # ms

    def dense_fn(weight, bias_, backward):
        def fwd():
            x = x_rot.next()
            y = F.conv2d(x, weight, bias_, s, p)
            if backward:  # autograd.grad: no accumulation into .grad between repetitions
                torch.autograd.grad(y, (x, weight, bias_), gy_n[weight.shape[0]])
            return y
        return fwd

    # Cells whose host Python --profile-host records: the dense conv once per mode, and the op's columns
    # at the layer's first and last density (density 1, where the stripe kernels run, and the lowest,
    # where the choice may be cuDNN), first mask kind
    profiled_cells = ({tuple(masks[0][:2]), next((d, k) for d, k, _ in masks if d == masks[-1][0])}
                      if masks else set())

    def timed(fn, backward, host=True, column=None):
        ctx = torch.enable_grad() if backward else torch.no_grad()
        with ctx:
            t = _bench(fn, args)
            if host and b == 1 and not backward:
                t["host_ms"] = _host_latency_ms(fn, args)
            if args.graphs and not args.cpu_smoke:
                t.update(_graph_bench(fn))
            mode = "fwd+bwd" if backward else "fwd"
            if args.profile_host and column is not None:
                t["python_profile"] = python_profile_calls(fn, calls=args.profile_host)
                print(format_python_profile(t["python_profile"], title=f"  {column} {mode} python: ", rows=4),
                      flush=True)
                if backward and not args.cpu_smoke:
                    # An eager training step took 2-4x its graph replay in the 2026-11-24 run (the dense conv's
                    # 1.1x): the host's time per call, its launches and anything that waits for the GPU
                    t["device_profile"] = profile_calls(fn, calls=5, cuda=True, top=6)
                    print(format_summary(t["device_profile"], title=f"  {column} {mode} profile: "), flush=True)
            return t

    modes = [("fwd", False)] + ([] if args.no_backward else [("fwd+bwd", True)])
    _gy(n)
    dense_t = {m: timed(dense_fn(w_dense, bias, bw_), bw_, column="dense") for m, bw_ in modes}
    f_flops, f_bytes = floors(1.0)
    print(f"\n== {name}: B={b} C={c} N={n} {hw}x{hw} k={k} s={s}  (dense floors: FLOPs/peak "
          f"{f_flops * 1e3:.2f} us, bytes/bw {f_bytes * 1e3:.2f} us)")
    print(f"{'mask':>9} {'dens':>5} {'1/d':>5} {'eff':>5} {'mode':>7} | {'dense ms':>9} {'triton ms':>10} "
          f"{'(iqr)':>7} {'speedup':>7} | {'auto':>6} {'cuda':>6} | {'chanprune':>9} {'speedup':>7} | {'ref ms':>8} "
          f"{'pub ms':>8} | "
          f"{'floorF us':>9} {'floorB us':>9}")
    for density in args.densities:
        n_cp = max(1, round(n * density))
        _gy(n_cp)
        w_cp = w_dense[:n_cp].detach().clone().requires_grad_(True)
        b_cp = bias[:n_cp].detach().clone().requires_grad_(True)
        cp_t = {m: timed(dense_fn(w_cp, b_cp, bw_), bw_) for m, bw_ in modes}
        for kind, mask in [(kind, mask) for d, kind, mask in masks if d == density]:
            mask = mask.to(device)
            real_density = mask.float().mean().item()
            packed = pack_weight(w_dense.detach(), mask).contiguous().requires_grad_(True)
            widths = tp.tile_widths(mask, 1, device) if mask.any() else []
            eff_by_width = {w: tp.tile_efficiency(mask, w) for w in widths}
            eff = max(eff_by_width.values(), default=1.0)
            asked_by_method: dict = {}  # per method, op -> gpu_select's choice for this mask (fwd: in its own cell)
            for mode, backward in modes:
                entry = {"layer": name, "batch": b, "C": c, "N": n, "H": hw, "k": k, "stride": s, "pad": p,
                         "mask": kind, "density": real_density, "target_density": density, "mode": mode,
                         "tile_efficiency": eff, "tile_efficiency_by_width": eff_by_width,
                         "dense": dense_t[mode], "chanprune": cp_t[mode],
                         "chanprune_channels": n_cp}
                fl_f, fl_b = floors(real_density)
                entry["floor_flops_ms"], entry["floor_bytes_ms"] = fl_f, fl_b
                methods = [("triton", "triton", "never"), ("stripeconv", "triton", "auto")]
                if args.cuda_kernels:  # CUDA C++ kernels, when built and verified
                    methods.append(("cuda", "cuda", "never"))
                if not args.skip_reference:
                    methods.append(("reference", "reference", "never"))
                for method, backend, dense_mode in methods:
                    backends.set_backend(backend)
                    os.environ["STRIPECONV_GPU_DENSE"] = dense_mode
                    try:
                        def op_fn():
                            x = x_rot.next()
                            conv = backends.eager_conv2d(x) or ops.stripe_conv2d  # as StripeConv2d calls it
                            y = conv(x, packed, bias, mask, (s, s), (p, p, p, p), (1, 1), 1)
                            if backward:
                                torch.autograd.grad(y, (x, packed, bias), gy)
                            return y
                        with gpu_select.recording() as asked:
                            entry[method] = timed(op_fn, backward, host=method != "reference",
                                                  column=method if method in ("triton", "stripeconv")
                                                  and (density, kind) in profiled_cells else None)
                        if backend == "triton":
                            ops_asked = asked_by_method.setdefault(method, {})
                            ops_asked.update((a["key"][0], a) for a in asked)
                            entry[method]["kernels"] = chosen_kernels(ops_asked, gpu_select.decisions())

                        def op_call(x):
                            conv = backends.eager_conv2d(x) or ops.stripe_conv2d
                            return conv(x, packed, bias, mask, (s, s), (p, p, p, p), (1, 1), 1)
                        check_cell(entry[method], cell_errors(op_call, x_rot.next(), packed, bias, mask, w_dense,
                                                              gy, s, p, backward), dtype)
                    except Exception as exc:  # keep the run going, record the failure
                        entry[method] = {"error": f"{type(exc).__name__}: {exc}"}
                    finally:
                        backends.set_backend(None)
                        os.environ.pop("STRIPECONV_GPU_DENSE", None)
                if not args.skip_reference:
                    rows = published_rows(mask)

                    def published_fn():
                        x = x_rot.next()
                        y = published_swp_conv(x, packed, bias, rows, n, s, p, ho)
                        if backward:
                            torch.autograd.grad(y, (x, packed, bias), gy)
                        return y
                    try:
                        entry["published"] = timed(published_fn, backward, host=False)
                        check_cell(entry["published"], cell_errors(
                            lambda x: published_swp_conv(x, packed, bias, rows, n, s, p, ho), x_rot.next(), packed,
                            bias, mask, w_dense, gy, s, p, backward), dtype)
                    except Exception as exc:
                        entry["published"] = {"error": f"{type(exc).__name__}: {exc}"}
                results.append(entry)
                tri = entry["triton"].get("median_ms", float("nan"))
                auto = entry["stripeconv"].get("median_ms", float("nan"))
                cuda = entry.get("cuda", {}).get("median_ms", float("nan"))
                ref = entry.get("reference", {}).get("median_ms", float("nan"))
                pub = entry.get("published", {}).get("median_ms", float("nan"))
                dn = entry["dense"]["median_ms"]
                cpm = entry["chanprune"]["median_ms"]
                print(f"{kind:>9} {real_density:5.2f} {1 / max(real_density, 1e-9):5.1f} {eff:5.2f} {mode:>7} | "
                      f"{dn:9.4f} {tri:10.4f} {entry['triton'].get('iqr_ms', float('nan')):7.4f} {dn / tri:7.2f} | "
                      f"{dn / auto:6.2f} {dn / cuda:6.2f} | {cpm:9.4f} {dn / cpm:7.2f} | {ref:8.3f} {pub:8.3f} | "
                      f"{fl_f * 1e3:9.2f} {fl_b * 1e3:9.2f}" + _wrong_note(entry), flush=True)
                if args.graphs and not args.cpu_smoke:
                    g = {m: entry.get(m, {}).get("graph_ms", float("nan")) for m in ("dense", "triton", "stripeconv")}
                    print(f"{'':>9} {'':>5} {'':>5} {'':>5} {'graph':>7} | {g['dense']:9.4f} {g['triton']:10.4f} "
                          f"{'':>7} {g['dense'] / g['triton']:7.2f} | {g['dense'] / g['stripeconv']:6.2f}  "
                          f"(CUDA graph replay: GPU time only)", flush=True)


def chosen_kernels(asked: dict, decisions: list) -> dict:
    """Per op (fwd, dgrad, wgrad) of a cell, what gpu_select chose and its time there: ``asked`` maps the
    op to what :func:`gpu_select.recording` collected, ``decisions`` is :func:`gpu_select.decisions`.
    ``ms`` is None where nothing was timed (a lone candidate, deterministic mode, a CPU run)."""
    timed = {(d["mode"], tuple(d["excluded"]), d["key"]): d for d in decisions}
    return {op: _chosen(a["choice"], timed.get((a["mode"], tuple(a["excluded"]), a["key"]), {}))
            for op, a in asked.items()}


def _chosen(choice: str, decision: dict) -> dict:
    """A choice and its time in ``decision``; the choice under CUDA graph capture too, where it differs."""
    entry = {"choice": choice, "ms": decision.get("times_ms", {}).get(choice)}
    in_graph = decision.get("captured_choice")
    if in_graph not in (None, choice):
        entry.update(captured_choice=in_graph, captured_ms=decision.get("captured_times_ms", {}).get(
            in_graph, decision.get("times_ms", {}).get(in_graph)))
    return entry


_KEY_TENSOR = re.compile(r"\(\(([\d, ]+)\), torch\.\w+, (?:True|False), '[^']*'\)")


def kernels_from_decisions(row: dict, method: str, decisions: list) -> dict:
    """:func:`chosen_kernels` for a row of a run that did not record them: the decisions whose key has the
    row's shapes (input, grad_output, packed rows) and the method's mode; an op whose key is not unique
    (two masks of the same row count and other plans) is left out."""
    mode = {"triton": "never", "stripeconv": "auto"}[method]
    b, c, n, hw, k, s, p = (row[f] for f in ("batch", "C", "N", "H", "k", "stride", "pad"))
    ho = (hw + 2 * p - k) // s + 1
    rows = round(row["density"] * n * k * k)
    x, dy = (b, c, hw, hw), (b, n, ho, ho)
    want = {"fwd": [x, (rows, c)], "dgrad": [dy, (rows, c)], "wgrad": [dy, x, (rows, c)]}
    ops = ("fwd",) if row["mode"] == "fwd" else ("fwd", "dgrad", "wgrad")
    kernels = {}
    for op in ops:
        found = [d for d in decisions if d["mode"] == mode and not d.get("excluded") and d["key"].startswith(f"('{op}'")
                 and [tuple(int(v) for v in t.split(",")) for t in _KEY_TENSOR.findall(d["key"])] == want[op]]
        if len(found) == 1:
            kernels[op] = _chosen(found[0]["choice"], found[0])
    return kernels


def report_training_steps(results: list, method: str = "stripeconv", rows: bool = False) -> None:
    """Where a training step's GPU time goes: per forward+backward row with a CUDA graph time, the times
    gpu_select measured for the candidates it chose (forward, grad input, grad weight; under capture where
    that choice differs), their sum and the rest of the replay (the bias gradient and whatever else the
    step runs beside the chosen candidates).
    ``rows``: one line per row, else the medians over them."""
    cells = []
    for r in results:
        t = r.get(method, {})
        if r["mode"] != "fwd+bwd" or not t.get("graph_ms") or t.get("wrong"):
            continue
        # what the replay ran: the choice under capture where it differs from the eager one
        kernels = {op: {"choice": k.get("captured_choice", k["choice"]), "ms": k.get("captured_ms", k["ms"])}
                   for op, k in (t.get("kernels") or {}).items()}
        if not all((kernels.get(op) or {}).get("ms") for op in ("fwd", "dgrad", "wgrad")):
            continue
        cells.append((r, kernels, t["graph_ms"] * 1e3))
    if not cells:
        return
    print(f"\ntraining step ({method}, CUDA graph replay) against the times gpu_select measured for its choices, "
          f"{len(cells)} rows:")
    if rows:
        print(f"  {'layer':<16} {'mask':<9} {'dens':>4} {'cuDNN us':>8} {'step us':>7} | "
              f"{'forward':<28} {'grad input':<28} {'grad weight':<28} | {'rest us':>7}")
    shares = {"fwd": [], "dgrad": [], "wgrad": [], "rest": []}
    for r, kernels, step in cells:
        times = {op: kernels[op]["ms"] * 1e3 for op in ("fwd", "dgrad", "wgrad")}
        rest = step - sum(times.values())
        for op, v in [*times.items(), ("rest", rest)]:
            shares[op].append(v / step)
        if rows:
            chosen = " ".join(f"{kernels[op]['choice'][:20]:<20} {times[op]:6.1f} " for op in times)
            print(f"  {r['layer']:<16} {r['mask']:<9} {r['target_density']:4.2f} {r['dense']['graph_ms'] * 1e3:8.1f} "
                  f"{step:7.1f} | {chosen}| {rest:7.1f}")
    print("  median share of the step: " + ", ".join(
        f"{label} {statistics.median(shares[op]):.0%}" for op, label in
        (("fwd", "forward"), ("dgrad", "grad input"), ("wgrad", "grad weight"), ("rest", "rest"))))


def _wrong_note(entry: dict) -> str:
    bad = [f"{m} {max(e for e in entry[m]['max_rel_error'].values() if e is not None):.1e}"
           for m in METHODS if entry.get(m, {}).get("wrong")]
    return f"  WRONG RESULT: {', '.join(bad)}" if bad else ""


def report_rejected(decisions: list) -> None:
    """Print the kernel variants gpu_select left out for a wrong result (``rejected`` of its decisions)."""
    rejected = {}
    for d in decisions:
        for name, error in d.get("rejected", {}).items():
            rejected.setdefault(name, []).append((error, d["key"]))
    if not rejected:
        return
    print("\nkernel variants rejected for a result that differs from cuDNN's (never chosen; "
          "largest error over the largest magnitude):")
    for name, cases in sorted(rejected.items()):
        worst, key = max(cases, key=lambda c: c[0])
        print(f"  {name:<24} {len(cases):3d} call shapes, worst {worst:.2e}: {key}")


def candidate_family(name: str) -> str:
    """A kernel candidate's name with its tile widths left out: ``stripe64_gathered`` -> ``stripe{w}_gathered``."""
    return re.sub(r"\d+", "{w}", name)


def report_candidates(decisions: list) -> None:
    """Print, per op and candidate family over gpu_select's decisions that timed cuDNN too (the op's own
    choice, not the stripe-only column's): in how many it was timed and chosen, how often it beat cuDNN,
    and the median of its time over the fastest other candidate's, cuDNN included (under 1: it was the
    fastest; a family's best width per decision)."""
    stats = {}
    for d in decisions:
        times = d.get("times_ms") or {}
        if "dense" not in times or len(times) < 2:
            continue
        op = str(d["key"]).split("'")[1] if "'" in str(d["key"]) else "?"
        best = {}
        for name, t in times.items():
            fam = candidate_family(name)
            best[fam] = min(t, best.get(fam, math.inf))
        for fam, t in best.items():
            if fam == "dense":
                continue
            others = min((u for f, u in best.items() if f != fam), default=math.inf)
            entry = stats.setdefault((op, fam), {"timed": 0, "chosen": 0, "beats_dense": 0, "ratios": []})
            entry["timed"] += 1
            entry["chosen"] += candidate_family(d.get("choice", "")) == fam
            entry["beats_dense"] += t < times["dense"]
            entry["ratios"].append(t / others)
    if not stats:
        return
    print("\nkernel candidates in gpu_select's decisions beside cuDNN (per op; time over the fastest other "
          "candidate, median; a family's best width per decision):")
    print(f"  {'op':<6} {'candidate':<28} {'timed':>6} {'chosen':>7} {'beat cuDNN':>10} {'vs best other':>13}")
    for (op, fam), e in sorted(stats.items()):
        print(f"  {op:<6} {fam:<28} {e['timed']:6d} {e['chosen']:7d} {e['beats_dense']:10d} "
              f"{statistics.median(e['ratios']):12.2f}x")


def plot(results, path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot written (pip install matplotlib)")
        return
    layers = sorted({r["layer"] for r in results}, key=lambda s: [r["layer"] for r in results].index(s))
    modes = sorted({r["mode"] for r in results}, reverse=True)
    cols = min(4, len(layers))
    rows_n = -(-len(layers) // cols)
    fig, axes = plt.subplots(rows_n * len(modes), cols, figsize=(4 * cols, 3.2 * rows_n * len(modes)), squeeze=False)
    for mi, mode in enumerate(modes):
        for li, layer in enumerate(layers):
            ax = axes[mi * rows_n + li // cols][li % cols]
            sel = [r for r in results if r["layer"] == layer and r["mode"] == mode]
            for kind, style in (("random", "o-"), ("realistic", "s-"), ("grouped", "^-"),
                                ("random-reordered", "o:"), ("realistic-reordered", "s:")):
                pts = sorted((r["target_density"], r["dense"]["median_ms"] / r["triton"]["median_ms"])
                             for r in sel if r["mask"] == kind or (r["target_density"] >= 1 and kind == "random")
                             if "median_ms" in r["triton"] and not r["triton"].get("wrong"))
                if pts:
                    ax.plot(*zip(*pts), style, label=f"triton {kind}")
            cp = sorted({(r["target_density"], r["dense"]["median_ms"] / r["chanprune"]["median_ms"]) for r in sel})
            if cp:
                ax.plot(*zip(*cp), "k--", label="channel-pruned dense")
            ds = sorted({r["target_density"] for r in sel})
            ax.plot(ds, [1 / d for d in ds], ":", color="gray", label="1/density")
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_title(f"{layer} ({mode})", fontsize=9)
            ax.set_xlabel("density")
            ax.set_ylabel("speedup vs cuDNN")
            ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"plot written to {path}")


# Issue targets (bf16 on H100/H200): forward >= 0.85/d for d in [0.2, 1] on the ResNet-50 and VGG
# CIFAR layers, d = 1 within 5 % of cuDNN, forward+backward >= 0.7/d, batch-1 no slower than cuDNN.
# Batch-1 latency is checked twice: GPU time (do_bench) and with host work (back-to-back eager calls).
def _targets(r) -> list[tuple[str, float, str]]:
    """(target, speedup needed, timing key) that row ``r`` is checked against."""
    d, layer, mode = r["target_density"], r["layer"], r["mode"]
    if layer.startswith("b1."):
        return [("batch-1 >= 1.0x", 1.0, "median_ms"), ("batch-1 eager >= 1.0x", 1.0, "host_ms")] \
            if mode == "fwd" else []
    if not (layer.startswith("r50.") or layer.startswith("vgg.")) or d < 0.2:
        return []
    if mode == "fwd":
        return [("d=1 >= 0.95x", 0.95, "median_ms") if d >= 1.0 else ("fwd >= 0.85/d", 0.85 / d, "median_ms")]
    return [("fwd+bwd >= 0.7/d", 0.7 / d, "median_ms")]


def summarize(results: list, method: str = "stripeconv") -> None:
    """Geometric-mean speedups over layers and the target check, for ``method``."""
    def speedup(r, m, key="median_ms"):
        t, dense = r.get(m, {}).get(key), r["dense"].get(key)
        return dense / t if t and dense and not r[m].get("wrong") else None

    if not results:
        print("\nno results")
        return
    for m in METHODS:
        bad = [r for r in results if r.get(m, {}).get("wrong")]
        if bad:
            cells = ", ".join(f"{r['layer']} {r['mask']} d={r['target_density']} {r['mode']}" for r in bad)
            print(f"\n{m}: {len(bad)} cells with a wrong result (against F.conv2d on the masked weight; their times "
                  f"are left out below): {cells}")
    unchecked = sum(1 for r in results for m in ("triton", "stripeconv") if "median_ms" in r.get(m, {})
                    and "max_rel_error" not in r[m])
    if unchecked:
        print(f"\n{unchecked} timings of runs that did not check their results (older files)")
    print("\nsummary: geometric mean speedup vs cuDNN over layers (triton = kernels only, "
          "stripeconv = with the dense hand-over)")
    keys = sorted({(r["mask"], r["target_density"], r["mode"]) for r in results}, key=lambda t: (t[2], t[0], -t[1]))
    for kind, d, mode in keys:
        sel = [r for r in results if (r["mask"], r["target_density"], r["mode"]) == (kind, d, mode)]
        parts = []
        for m in ("triton", "stripeconv", "cuda", "chanprune", "reference", "published"):
            vals = [v for v in (speedup(r, m) for r in sel) if v]
            if vals:
                parts.append(f"{m} {math.exp(statistics.fmean(math.log(v) for v in vals)):5.2f}x")
        eff = statistics.fmean(r["tile_efficiency"] for r in sel)
        print(f"  {mode:>7} {kind:>9} density {d:4.2f}: {'  '.join(parts)}  ideal {1 / d:5.1f}x  "
              f"mean tile eff {eff:4.2f}")
        graph = []
        for m in ("triton", "stripeconv"):
            vals = [v for v in (speedup(r, m, "graph_ms") for r in sel) if v]
            if vals:
                graph.append(f"{m} {math.exp(statistics.fmean(math.log(v) for v in vals)):5.2f}x")
        if graph:
            print(f"  {'':>7} {'':>9} GPU time only (CUDA graph replay): {'  '.join(graph)}")
        host = [(speedup(r, "stripeconv", "host_ms"), r) for r in sel]
        if any(v for v, _ in host):
            cells = "  ".join(f"{r['layer']} {v:.2f}x ({r['dense']['host_ms'] * 1e3:.0f} us dense)" for v, r in host if v)
            print(f"  {'':>7} {'':>9} batch 1 with host work, stripeconv: {cells}")
    # Also in GPU time alone: where do_bench timed the host (forward+backward through autograd, small
    # layers), the CUDA graph replays say what the kernels reach.
    for m, timing in [(m, t) for m in ("triton", "stripeconv", "cuda") for t in ("median_ms", "graph_ms")]:
        groups: dict = {}
        for r in results:
            for name, need, key in _targets(r):
                if timing == "graph_ms" and key != "median_ms":
                    continue
                v = speedup(r, m, timing if key == "median_ms" else key)
                if v is not None:
                    groups.setdefault(name, []).append((v >= need, r, v, need))
        if not groups:
            continue
        print(f"\ntargets ({m}{', GPU time only (CUDA graph replay)' if timing == 'graph_ms' else ''}): "
              f"met / measured")
        for name, rows in groups.items():
            met = sum(ok for ok, *_ in rows)
            worst = min(rows, key=lambda t: t[2] / t[3])
            _, r, v, need = worst
            print(f"  {name:<18} {met:3d} / {len(rows):<3d}  worst: {r['layer']} {r['mask']} d={r['target_density']} "
                  f"{v:.2f}x vs {need:.2f}x")
    _rates(results, speedup)
    _floor_multiples(results)


def _rates(results: list, speedup: Callable) -> None:
    """Per target, the FLOP rate the stripe kernels need against the rate they reached, both relative
    to cuDNN's on the dense layer: speedup x density / tile efficiency. The tiles compute density /
    efficiency of the dense work, so below efficiency 0.85 the forward target asks the kernels to
    outrun cuDNN's own rate; where the measured rate falls short at equal work, the kernels are slow."""
    groups: dict = {}
    for r in results:
        scale = r.get("density", r["target_density"]) / r["tile_efficiency"]
        for name, need, key in _targets(r):
            if key == "median_ms":  # the GPU-time targets (not the eager batch-1 one)
                measured = [speedup(r, "triton", k) for k in ("median_ms", "graph_ms")]
                groups.setdefault(name, []).append([need * scale] + [v * scale if v else None for v in measured])
    if not groups:
        return
    print("\nFLOP rate vs cuDNN's (triton; speedup x density / tile efficiency), medians over the cells:")
    for name, rows in groups.items():
        needed = [row[0] for row in rows]
        line = (f"  {name:<18} needs {statistics.median(needed):5.2f}x ({sum(v > 1 for v in needed)} of "
                f"{len(rows)} cells above cuDNN's rate)")
        for label, col in (("measured", 1), ("GPU time only", 2)):
            vals = [row[col] for row in rows if row[col]]
            if vals:
                line += f", {label} {statistics.median(vals):5.2f}x"
        print(line)


def _floor(r) -> Optional[float]:
    """Row ``r``'s floor in ms: the larger of FLOPs / peak and bytes / bandwidth of its forward (at the
    mask's density), three times that for forward + backward (grad input and grad weight each do the
    forward's FLOPs and move about its bytes: dy in for y out, dx or dw out for x or w in)."""
    flops, byts = r.get("floor_flops_ms"), r.get("floor_bytes_ms")
    if not flops or not byts:
        return None
    return max(flops, byts) * (1 if r["mode"] == "fwd" else 3)


def _floor_multiples(results: list) -> None:
    """Per target and density, medians over the cells of the time the target allows, cuDNN's time and
    the stripe kernels' time (``triton``), each as a multiple of the cell's floor (:func:`_floor`); in
    GPU time (graph replays) where both were replayed, else as timed eagerly."""
    groups: dict = {}
    for r in results:
        floor = _floor(r)
        for name, need, key in _targets(r):
            if key != "median_ms" or not floor or r["layer"].startswith("b1."):  # batch 1: latency, not floors
                continue
            timing = "graph_ms" if r["dense"].get("graph_ms") and r.get("triton", {}).get("graph_ms") else "median_ms"
            dense, kernels = r["dense"].get(timing), r.get("triton", {}).get(timing)
            if not dense or not kernels or r["triton"].get("wrong"):
                continue
            groups.setdefault((name, r["target_density"]), []).append(
                (dense / need / floor, dense / floor, kernels / floor, timing == "graph_ms"))
    if not groups:
        return
    print("\ntime over the floor (max of FLOPs/peak and bytes/bandwidth; fwd+bwd: three passes), medians over "
          "the cells, GPU time where replayed:")
    for (name, d), rows in sorted(groups.items(), key=lambda kv: (kv[0][0], -kv[0][1])):
        allowed, dense, kernels = (statistics.median(row[i] for row in rows) for i in range(3))
        below = sum(row[0] < 1 for row in rows)
        print(f"  {name:<18} d={d:<4} target allows {allowed:5.2f}x, cuDNN {dense:5.2f}x, triton {kernels:5.2f}x  "
              f"({len(rows)} cells, {sum(row[3] for row in rows)} replayed"
              + (f"; {below} ask for less than the floor" if below else "") + ")")


def _write(path: str, meta: dict, results: list) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"meta": meta, "results": results}, f, indent=1)
    os.replace(tmp, path)


def _from_json(paths: list, out: str, step_rows: bool = False) -> None:
    loaded = []
    for path in paths:
        with open(path) as f:
            loaded.append((path, json.load(f)))
    # --quick runs first, so that a full run of the same layer replaces them; else command-line order
    loaded.sort(key=lambda pd: not pd[1]["meta"].get("args", {}).get("quick", False))
    rows, replaced, skipped, decisions = {}, 0, [], []
    for path, data in loaded:
        meta = data["meta"]
        print(f"{meta['date']}  {meta['device']}  torch {meta['torch']}  triton {meta['triton']}  "
              f"CUDA {meta['cuda']}  {meta['dtype']}  {len(meta.get('layers_done', []))} layers  ({path})")
        skipped += meta.get("layers_skipped", [])
        report_rejected(meta.get("dispatch_decisions", []))
        decisions += meta.get("dispatch_decisions", [])
        for r in data["results"]:
            for method in ("triton", "stripeconv"):  # runs before the cells recorded their choices
                if "median_ms" in r.get(method, {}) and "kernels" not in r[method]:
                    r[method]["kernels"] = kernels_from_decisions(r, method, meta.get("dispatch_decisions", []))
            key = (r["layer"], r["mask"], r["target_density"], r["mode"])
            replaced += key in rows
            rows[key] = r
    results = list(rows.values())
    if replaced:
        print(f"{replaced} rows measured twice: the full run's (or the later file's) kept")
    missing = sorted(set(skipped) - {r["layer"] for r in results})
    if missing:
        print(f"layers never measured (budget): {', '.join(missing)}")
    report_candidates(decisions)
    summarize(results)
    report_training_steps(results, rows=step_rows)
    plot(results, out)


def cuda_kernels_error(device: torch.device | str = "cuda") -> float:
    """Worst relative error of the CUDA C++ kernels (the op pinned to ``cuda``) against the dense
    conv in fp32, forward and grad input / weight / bias, in bf16 and fp32 on a few shapes."""
    from stripeconv import backends, ops
    from stripeconv.packing import pack_weight

    backends.set_backend("cuda")
    gen, worst = torch.Generator().manual_seed(0), 0.0
    try:
        for dtype in (torch.bfloat16, torch.float32):
            # aligned channels (16-byte loads), stride 2 with odd planes, 3 channels (element loads),
            # and masks whose positions keep the same filters (the forward sums those in registers):
            # dense, and filters pruned whole (density "filters")
            for b, c, n, hw, stride, density in ((4, 64, 96, 16, 1, 0.3), (2, 40, 64, 15, 2, 0.5),
                                                 (2, 3, 32, 9, 1, 0.7), (2, 32, 80, 12, 1, 1.0),
                                                 (2, 32, 80, 12, 1, "filters")):
                if density == "filters":
                    mask = (torch.rand(n, generator=gen) < 0.6)[:, None, None].expand(n, 3, 3).clone()
                else:
                    mask = torch.rand(n, 3, 3, generator=gen) < density
                w = torch.randn(n, c, 3, 3, generator=gen).to(dtype).double() * mask[:, None]
                x = torch.randn(b, c, hw, hw, generator=gen).to(dtype).double().requires_grad_(True)
                bias = torch.randn(n, generator=gen).to(dtype).double().requires_grad_(True)
                w.requires_grad_(True)
                y_ref = F.conv2d(x, w, bias, stride, 1)
                gy = torch.randn(y_ref.shape, generator=gen).to(dtype).double()
                y_ref.backward(gy)
                xs = x.detach().to(device, dtype).contiguous(memory_format=torch.channels_last).requires_grad_(True)
                packed = pack_weight(w.detach(), mask).to(device, dtype).requires_grad_(True)
                bs = bias.detach().to(device, dtype).requires_grad_(True)
                y = ops.stripe_conv2d(xs, packed, bs, mask.to(device), (stride, stride), (1, 1, 1, 1), (1, 1), 1)
                y.backward(gy.to(device, dtype))
                for got, want in ((y, y_ref), (xs.grad, x.grad), (packed.grad, pack_weight(w.grad, mask)),
                                  (bs.grad, bias.grad)):
                    err = (got.detach().double().cpu() - want.detach()).abs().max().item()
                    worst = max(worst, err / (want.abs().max().item() + 1e-12))
    finally:
        backends.set_backend(None)
    return worst


def verify_cuda_kernels(tolerance: float = 3e-2) -> tuple[bool, str]:
    """Whether the CUDA C++ kernels are built and agree with the dense conv on this GPU.

    Checked in a child process: a fault in a kernel would leave this process's CUDA context
    unusable for every method timed after it.
    """
    from stripeconv.backends import cuda

    ok, reason = cuda.is_available()
    if not ok:
        return False, reason
    code = (f"import sys; sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r}); "
            "import bench_gpu; print(bench_gpu.cuda_kernels_error())")
    try:
        run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return False, "the self-check did not finish in 300 s"
    lines = (run.stdout + run.stderr).strip().splitlines()
    if run.returncode != 0:
        return False, f"the self-check failed: {lines[-1] if lines else f'exit code {run.returncode}'}"
    out = run.stdout.strip().splitlines()
    try:
        worst = float(out[-1])
    except (IndexError, ValueError):  # never let the check's output end the whole benchmark
        return False, f"the self-check printed no number: {(out or lines or ['nothing'])[-1]!r}"
    if not worst < tolerance:
        return False, f"worst relative error {worst:.2e} against the dense conv (tolerance {tolerance:.0e})"
    return True, f"worst relative error {worst:.2e} against the dense conv"


def _selected_layers(args) -> list:
    if args.quick:
        args.densities = [1.0, 0.5, 0.2]
        return [VGG16_CIFAR[3], RESNET50_224[2], BATCH1[3]]
    return [layer for suite in args.suites.split(",") for layer in SUITES[suite.strip()]]


def _print_plan(args) -> None:
    """The kernel variants a run of these suites compiles (recorded on CPU, for an H100 / H200's
    132 multiprocessors): what precompiling or the first launches will cost."""
    import collections

    from stripeconv.backends import _triton_runtime

    if _triton_runtime.load_kernels() is None:
        sys.exit(f"the Triton kernels do not load: {_triton_runtime._import_error}")
    gen = torch.Generator().manual_seed(args.seed)
    layers = _selected_layers(args)
    masks = {layer[0]: layer_masks(layer, args, gen) for layer in layers}
    jobs = plan_kernels(layers, masks, getattr(torch, args.dtype), args, sm_count=132)
    counts = collections.Counter(job.kernel for job in jobs)
    print(f"{args.suites if not args.quick else 'quick'}: {len(jobs)} kernel variants to compile ("
          + ", ".join(f"{name} {count}" for name, count in sorted(counts.items())) + ")")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=os.path.join(ROOT, "bench", "results"))
    ap.add_argument("--dtype", default="bfloat16", choices=["float16", "bfloat16", "float32"])
    ap.add_argument("--suites", default="vgg16,resnet56,resnet50,batch1",
                    help="comma list of " + ", ".join(SUITES))
    ap.add_argument("--densities", default=",".join(str(d) for d in DENSITIES))
    ap.add_argument("--masks", default="random,realistic", help="comma list of random, realistic, grouped, random-reordered, realistic-reordered")
    ap.add_argument("--no-backward", action="store_true", help="forward only")
    ap.add_argument("--skip-reference", action="store_true",
                    help="do not time the pure-PyTorch reference and the published SWP code's algorithm")
    ap.add_argument("--quick", action="store_true", help="three layers, densities 1, 0.5, 0.2")
    ap.add_argument("--plan-only", action="store_true",
                    help="no GPU needed: print how many kernel variants the run would compile, and exit")
    ap.add_argument("--no-precompile", action="store_true",
                    help="let each layer compile its kernels when first launched, instead of all up front in parallel")
    ap.add_argument("--budget-s", type=float, default=None, help="start no new layer after this many seconds")
    ap.add_argument("--warmup-ms", type=int, default=25)
    ap.add_argument("--rep-ms", type=int, default=60)
    ap.add_argument("--peak-tflops", type=float, default=None)
    ap.add_argument("--bandwidth", type=float, default=None, help="TB/s")
    ap.add_argument("--graphs", action="store_true",
                    help="also time each cell as a CUDA graph replay (GPU time without host work)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tag", default="", help="added to the output file names")
    ap.add_argument("--from-json", nargs="+", default=None, metavar="JSON",
                    help="no measuring: merge these result files, print the summary and plot")
    ap.add_argument("--step-rows", action="store_true",
                    help="print the training-step breakdown (forward, grad input, grad weight, rest) row by row")
    ap.add_argument("--profile-host", type=int, default=0, metavar="CALLS",
                    help="profile the Python of CALLS calls with cProfile (python_profile in the JSON; 0: off): the "
                         "dense column once per layer and mode, the triton and stripeconv columns at each layer's "
                         "first and lowest density")
    ap.add_argument("--cpu-smoke", action="store_true",
                    help="no GPU: run two tiny layers on CPU through the Triton interpreter to check the script")
    args = ap.parse_args(argv)
    args.densities = [float(d) for d in args.densities.split(",")]
    args.masks = args.masks.split(",")
    if args.from_json:
        os.makedirs(args.out, exist_ok=True)
        _from_json(args.from_json, os.path.join(args.out, f"bench_gpu_merged{args.tag}.png"), args.step_rows)
        return
    if args.plan_only:
        _print_plan(args)
        return

    if args.cpu_smoke:
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported
    elif not torch.cuda.is_available():
        sys.exit("bench_gpu.py needs a CUDA device (none found; --cpu-smoke checks the script on CPU)")
    try:
        import triton
    except ImportError:
        sys.exit("bench_gpu.py needs triton (pip install 'triton>=3.2')")
    from stripeconv.backends import _triton_runtime, gpu_select, triton_backend as tb

    ok, reason = tb.is_available()
    if not ok:
        sys.exit(f"the Triton backend is not available: {reason}")

    torch.backends.cudnn.benchmark = True
    dtype = getattr(torch, args.dtype)
    if args.cpu_smoke:
        device, dtype, args.dtype = torch.device("cpu"), torch.float32, "float32"
        dev_name, sms = "cpu (Triton interpreter smoke run)", 0
    else:
        device = torch.device("cuda")
        props = torch.cuda.get_device_properties(device)
        dev_name, sms = props.name, props.multi_processor_count
    peaks = _peaks(dev_name, dtype, args)
    layers = _selected_layers(args)
    if args.cpu_smoke:
        layers = [("smoke.s1", 2, 16, 32, 6, 3, 1, 1), ("smoke.s2", 1, 8, 16, 7, 3, 2, 1)]
        args.densities = [1.0, 0.3]
    gen = torch.Generator().manual_seed(args.seed)
    args.cuda_kernels, cuda_check = verify_cuda_kernels() if device.type == "cuda" else (False, "no CUDA device")
    print(f"CUDA C++ kernels: {'timed' if args.cuda_kernels else 'not timed'} ({cuda_check})")
    print(f"device {dev_name} ({sms} SMs), dtype {args.dtype}, "
          f"peak {peaks[0] / 1e12:.0f} TFLOP/s, bandwidth {peaks[1] / 1e12:.2f} TB/s")
    print("speedup = dense median / method median (>1 is faster than cuDNN); auto = speedup of the op with "
          "the dense hand-over; eff = tile efficiency; floorF/floorB = FLOPs/peak and bytes/bandwidth of the "
          "stripe conv at that density (forward)")
    stamp = _dt.datetime.now().strftime("%Y%m%d_%H%M%S") + args.tag
    os.makedirs(args.out, exist_ok=True)
    jpath = os.path.join(args.out, f"bench_gpu_{stamp}.json")
    meta = {
        "date": _dt.datetime.now().isoformat(timespec="seconds"),
        "device": dev_name, "sm_count": sms,
        "torch": torch.__version__, "triton": triton.__version__, "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version(), "python": platform.python_version(),
        "dtype": args.dtype, "allow_tf32": _triton_runtime.tf32_matmul(),
        "peak_tflops": peaks[0] / 1e12, "bandwidth_tbs": peaks[1] / 1e12,
        "deterministic": gpu_select.deterministic(), "args": {k: v for k, v in vars(args).items()},
        # settled Triton launches through the compiled kernel's launcher, or (0) Triton's own path
        "triton_direct_launch": os.environ.get("STRIPECONV_TRITON_DIRECT", "1").strip() != "0",
        "triton_excluded": list(gpu_select.excluded()),  # STRIPECONV_TRITON_EXCLUDE
        "cuda_kernels": {"timed": args.cuda_kernels, "check": cuda_check},
        "layers_done": [], "layers_skipped": [],
    }
    masks = {layer[0]: layer_masks(layer, args, gen) for layer in layers}
    precompile = tb.kernels_module("precompile") if device.type == "cuda" else None
    if precompile is not None and not args.no_precompile:
        # Every kernel variant the layers will launch, compiled in parallel worker processes before
        # anything is timed (one at a time, in-process, they take most of a layer's time).
        t_plan = time.time()
        jobs = plan_kernels(layers, masks, dtype, args, sm_count=sms)
        meta["precompile"] = {"plan_s": round(time.time() - t_plan, 1), **precompile.precompile(jobs)}
        print(f"precompiled {meta['precompile']['jobs']} kernel variants in {meta['precompile']['wall_s']:.0f} s "
              f"({meta['precompile']['workers']} processes, {meta['precompile']['failed']} failed)", flush=True)
    cached_before = precompile.compiled_count() if precompile is not None else 0
    results = []
    t0, longest = _T_START, 0.0
    meta["layer_s"] = {}
    for layer in layers:
        # A layer starts only if one as long as the longest so far still ends inside the budget
        # (Triton compiles and autotunes each new layer shape: tens of seconds a layer).
        if (args.budget_s is not None and meta["layers_done"]
                and time.time() - t0 + 1.1 * longest > args.budget_s):
            meta["layers_skipped"].append(layer[0])
            continue
        t_layer = time.time()
        with _triton_runtime.dense_precision(dtype):  # fp32: cuDNN at the stripe kernels' precision
            run_layer(layer, args, dtype, device, peaks, masks[layer[0]], results)
        longest = max(longest, time.time() - t_layer)
        meta["layer_s"][layer[0]] = round(time.time() - t_layer, 1)
        meta["layers_done"].append(layer[0])
        meta["wall_s"] = time.time() - t0
        meta["dispatch_decisions"] = [{**d, "key": repr(d["key"])} for d in gpu_select.decisions()]
        if precompile is not None:  # 0 when the precompiled variants were all found in Triton's cache
            meta["compiled_while_timing"] = precompile.compiled_count() - cached_before
        _write(jpath, meta, results)
    if meta["layers_skipped"]:
        print(f"\nbudget of {args.budget_s:.0f} s reached: skipped {', '.join(meta['layers_skipped'])}")
    _write(jpath, meta, results)
    print(f"\nraw timings written to {jpath}")
    report_rejected(meta.get("dispatch_decisions", []))
    report_candidates(meta.get("dispatch_decisions", []))
    summarize(results)
    report_training_steps(results, rows=args.step_rows)
    plot(results, os.path.join(args.out, f"bench_gpu_{stamp}.png"))


if __name__ == "__main__":
    main()
