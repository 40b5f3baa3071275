"""Host work of one Triton-backend call, without a GPU.

Runs the backend's host side on CPU tensors with every JIT launch replaced by a no-op, so what
is timed is the Python between the caller and the kernel launch: call-signature lookup, argument
preparation, the autotuner (given the four configurations it has on a GPU, its choice already
made) and the launcher wrapper. With ``--triton-launch`` Triton's own launch path is timed as well:
the kernels compile for sm_90 as on an H100 (no interpreter) and only the driver is stubbed out
(``stripeconv.kernels.aot.stub_driver``: the compiled kernel's launcher records its call instead
of launching), so a settled call's launches go through whatever the backend does on a GPU (the
compiled kernel's launcher called directly; ``--no-direct``: every launch through the JIT
function's binding and cache lookup). What the real launcher then does (argument packing, the
driver's launch) comes on top in every mode.

    python bench/host_overhead.py                       # settled calls, as a model's steady state runs them
    python bench/host_overhead.py --through-autotuner   # every launch through the autotuner's key lookup
    python bench/host_overhead.py --triton-launch       # with Triton's launch path, as on a GPU
    python bench/host_overhead.py --triton-launch --frames   # ... and the Python frames each call pushes
    python bench/host_overhead.py --network resnet56    # a whole CIFAR network, eager and torch.compile'd

The settled calls include a layer whose shape the dense hand-over serves (``STRIPECONV_GPU_DENSE=always``:
cuDNN's conv on a GPU, the CPU conv here) next to ``nn.Conv2d`` on the same input: both run the same
conv, so their difference is the op's host work where a GPU runs cuDNN either way.

Every call is timed from a range of Python call depths (see ``DEPTHS``): per depth the fastest of
``--repeats`` runs of ``--calls`` calls; printed are the minimum, median and maximum over the
depths, in microseconds. ``--network`` times forwards (batch ``--batch``, channels_last, random masks of ``--density`` on
the 3x3 convs) in eager mode and through ``torch.compile`` (inductor, compiled before timing), in
milliseconds: the host work a GPU would wait for where its kernels take less.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time

import torch

TUNED_KERNELS = ("stripe_fwd_kernel", "stripe_fwd_sub_kernel", "stripe_fwd_tma_kernel", "stripe_dgrad_kernel",
                 "stripe_wgrad_kernel", "stripe_dgrad_tiles_kernel", "stripe_dgrad_tiles_tma_kernel",
                 "stripe_wgrad_tiles_kernel", "stripe_wgrad_tiles_tma_kernel")
PLAIN_KERNELS = ("stripe_gather_columns_kernel", "stripe_scatter_rows_kernel")  # no autotuner
GPU_CONFIGS = 4  # autotuning configurations per kernel on a GPU (kernels/_tuning.py)


def _no_launches(kernels) -> None:
    """JIT launches do nothing; the autotuners hold as many configurations as on a GPU and
    'benchmark' them without running anything (all equal: the first wins)."""
    for name in TUNED_KERNELS:
        tuner = getattr(kernels, name)
        tuner.fn.run = lambda *args, **kwargs: None
        tuner.configs = (tuner.configs * GPU_CONFIGS)[:GPU_CONFIGS]
        tuner._bench = lambda *args, config=None, **kwargs: [1.0, 1.0, 1.0]
    for name in PLAIN_KERNELS:
        getattr(kernels, name).run = lambda *args, **kwargs: None


def _triton_launches(kernels, tb, direct: bool) -> contextlib.ExitStack:
    """Triton's launch path with the driver stubbed out (kept until the returned stack closes); the
    autotuners hold one configuration (the stub cannot time any), the one a settled call would use."""
    from stripeconv.kernels import aot

    stack = contextlib.ExitStack()
    stack.enter_context(aot.stub_driver(keep_calls=False))
    for name in TUNED_KERNELS:
        tuner = getattr(kernels, name)
        tuner.configs = tuner.configs[:1]
    # CPU tensors take the kernels' GPU path
    tb.is_available, tb.supports = (lambda: (True, "")), (lambda device: True)
    if not direct:
        os.environ["STRIPECONV_TRITON_DIRECT"] = "0"  # read as each call shape settles
    return stack


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--through-autotuner", action="store_true",
                    help="launch every call through the autotuner instead of the configuration it settled on")
    ap.add_argument("--channels", type=int, default=64)
    ap.add_argument("--size", type=int, default=8, help="input height and width")
    ap.add_argument("--density", type=float, default=0.5)
    ap.add_argument("--calls", type=int, help="calls per run (default 100; --network: 10 forwards)")
    ap.add_argument("--repeats", type=int, help="runs per call depth (default 3)")
    ap.add_argument("--network", choices=("resnet20", "resnet56", "vgg16_bn"),
                    help="time this network's forward, eager and compiled, instead of single calls")
    ap.add_argument("--batch", type=int, default=1, help="batch of --network")
    ap.add_argument("--triton-launch", action="store_true",
                    help="time Triton's launch path too (kernels compiled for sm_90, the driver stubbed out)")
    ap.add_argument("--no-direct", action="store_true",
                    help="with --triton-launch: every launch through the JIT function, none to the compiled kernel")
    ap.add_argument("--frames", action="store_true",
                    help="also count the Python frames each settled call pushes (all, and stripeconv's own): "
                         "in total and at most at one depth (see profile_summary.python_frames)")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)
    if args.triton_launch and args.through_autotuner:
        ap.error("--through-autotuner times the autotuner's key lookup over four configurations, which the stubbed "
                 "driver of --triton-launch cannot benchmark")
    if args.no_direct and not args.triton_launch:
        ap.error("--no-direct needs --triton-launch")
    if args.triton_launch and os.environ.get("TRITON_INTERPRET") == "1":
        ap.error("--triton-launch compiles the kernels: unset TRITON_INTERPRET")
    if not args.triton_launch:
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported: the kernels load without a GPU
    args.calls = args.calls or (10 if args.network else 100)
    args.repeats = args.repeats or 3

    from stripeconv.backends import _triton_runtime, triton_backend as tb

    kernels = _triton_runtime.load_kernels()
    if kernels is None:
        sys.exit(f"the triton backend cannot load its kernels: {_triton_runtime._import_error}")
    stack = _triton_launches(kernels, tb, not args.no_direct) if args.triton_launch else contextlib.ExitStack()
    if not args.triton_launch:
        _no_launches(kernels)
    if args.through_autotuner:
        _triton_runtime.TunedLaunch.__call__ = (
            lambda self, *a: getattr(kernels, self.name)[self.grid](*a, *self.bound, **self.constants))
    torch.set_num_threads(1)
    with stack:
        results = network(args) if args.network else single_calls(args, tb)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return results


def _launch_label(args) -> str:
    if not args.triton_launch:
        return ("through the autotuner" if args.through_autotuner else "settled") + " (JIT launch a no-op)"
    return "settled, Triton's launch path (driver stubbed), " + (
        "every launch through the JIT function" if args.no_direct else "compiled kernel launched directly")


def _time(call, calls: int, repeats: int) -> list[float]:
    """Seconds per call of ``repeats`` runs of ``calls`` calls, after a warm-up."""
    for _ in range(max(10, calls // 10)):
        call()
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            call()
        runs.append((time.perf_counter() - start) / calls)
    return runs


def single_calls(args, tb) -> dict:
    from stripeconv.backends import _dense_weights

    gen = torch.Generator().manual_seed(0)
    c, hw = args.channels, args.size
    mask = torch.rand(c, 3, 3, generator=gen) < args.density
    weight = torch.randn(int(mask.sum()), c, generator=gen)

    def nhwc(batch):
        return torch.randn(batch, c, hw, hw, generator=gen).contiguous(memory_format=torch.channels_last)
    x1, x, gy = nhwc(1), nhwc(32), nhwc(32)
    geometry = ((1, 1), (1, 1, 1, 1), (1, 1), 1)
    layer = _layer(weight, mask)
    x1_grad, gy1 = x1.clone().requires_grad_(), nhwc(1)

    def layer_forward():
        with torch.no_grad():
            layer(x1)

    def layer_training_step():  # what autograd adds: the Function, its context and the backward's two calls
        layer(x1_grad).backward(gy1)
    calls = {
        "forward, batch 1": lambda: tb.forward(x1, weight, None, mask, *geometry),
        "grad input, batch 32": lambda: tb.grad_input(gy, weight, mask, list(x.shape), *geometry),
        "grad weight, batch 32": lambda: tb.grad_weight(gy, x, weight, mask, *geometry),
        "layer forward, batch 1": layer_forward,
        "layer forward+backward, batch 1": layer_training_step,
        # the dense hand-over's weight: kept per version of the packed rows, or scattered on every call
        "dense weight, kept": lambda: _dense_weights.dense_weight(weight, mask, weight.device),
        "dense weight, scattered": lambda: _dense_weights._scatter(weight, mask, weight.device, torch.channels_last),
    }
    from bench_cpu import machine_info  # beside this script

    results = {"layer": f"{c}->{c} 3x3 at {hw}x{hw}, density {args.density}",
               "launch": _launch_label(args),
               "machine": machine_info(), "us": {}}
    print(f"host work per call, {results['layer']}, {results['launch']}, "
          f"from {len(DEPTHS)} call depths: min / median / max over depths")
    results["depths"] = list(DEPTHS)
    # The dense hand-over settled (STRIPECONV_GPU_DENSE=always): cuDNN's conv in the op's clothes. Its
    # difference to nn.Conv2d on the same input is the op's host work (both run the same CPU conv here).
    conv = torch.nn.Conv2d(c, c, 3, padding=1, bias=False).to(memory_format=torch.channels_last)

    def conv2d_forward():
        with torch.no_grad():
            conv(x1)
    handover = {"layer forward, dense hand-over": layer_forward, "nn.Conv2d forward, batch 1": conv2d_forward}
    import stripeconv
    from profile_summary import python_frames  # beside this script

    package = os.path.dirname(stripeconv.__file__)
    previous, previous_dense = stripeconv.get_backend(), os.environ.get("STRIPECONV_GPU_DENSE")
    stripeconv.set_backend("triton")  # the layer's calls; the others call the backend directly
    try:
        for name, call in [*calls.items(), *handover.items()]:
            if name in handover:
                os.environ["STRIPECONV_GPU_DENSE"] = "always"
            best = [t * 1e6 for t in _over_depths(call, args.calls, args.repeats)]
            results["us"][name] = _spread(best)
            line = f"  {name:<32} {min(best):6.1f} / {statistics.median(best):6.1f} / {max(best):6.1f} us"
            if args.frames:
                frames = results.setdefault("frames", {})[name] = python_frames(call, within=package)
                line += (f"   {frames['frames']:3d} frames, {frames['most_at_one_depth']:2d} at one depth "
                         f"(stripeconv: {frames['within_frames']:3d}, {frames['within_most_at_one_depth']:2d})")
            print(line)
    finally:
        stripeconv.set_backend(previous)
        if previous_dense is None:
            os.environ.pop("STRIPECONV_GPU_DENSE", None)
        else:
            os.environ["STRIPECONV_GPU_DENSE"] = previous_dense
    return results


def _layer(weight, mask):
    """A StripeConv2d (channels_last, no bias) holding ``weight`` and ``mask``."""
    import stripeconv

    c = weight.shape[1]
    layer = stripeconv.StripeConv2d(c, mask.shape[0], 3, padding=1, bias=False, stripe_mask=mask)
    with torch.no_grad():
        layer.packed_weight.copy_(weight)
    return layer.to(memory_format=torch.channels_last)


def _at_depth(levels: int, call, *args):
    """``call(*args)`` from ``levels`` Python frames deeper than the caller."""
    return call(*args) if levels == 0 else _at_depth(levels - 1, call, *args)


# CPython 3.11 and 3.12 free a 16 KB chunk of the frame stack as soon as the frame that opened it
# returns, so calls that keep crossing its end at one depth map and unmap memory every time
# (CPython gh-142183; 3.13 and 3.14 keep a spare chunk). Whether a network's layers hit that
# depth is luck: calls are timed from call depths across one chunk (about 110 of these frames).
DEPTHS = range(0, 120, 2)


def _over_depths(call, calls: int, repeats: int) -> list[float]:
    """Seconds per call from each of :data:`DEPTHS`: the fastest of ``repeats`` runs of ``calls`` calls."""
    return [min(_at_depth(depth, _time, call, calls, repeats)) for depth in DEPTHS]  # the loop runs that deep


def _spread(per_depth: list[float]) -> dict:
    return {"min": min(per_depth), "median": statistics.median(per_depth), "max": max(per_depth),
            "per_depth": per_depth}


def network(args) -> dict:
    """Forward of a CIFAR network on the Triton backend, eager and compiled (no gradients), from
    each of :data:`DEPTHS`: per depth the fastest of ``--repeats`` runs of ``--calls`` forwards."""
    import gc

    import stripeconv
    from bench_cpu import machine_info  # beside this script
    from bench_cpu_network import build

    _, model, masks = build(args.network, args.density)
    model = model.to(memory_format=torch.channels_last)
    x = torch.randn(args.batch, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    previous = stripeconv.get_backend()
    stripeconv.set_backend("triton")
    results = {"network": f"{args.network}, {len(masks)} stripe convs at density {args.density}, batch {args.batch}",
               "launch": _launch_label(args), "machine": machine_info(), "depths": list(DEPTHS), "ms": {}}
    print(f"host work per forward, {results['network']}, {results['launch']}, "
          f"from {len(DEPTHS)} call depths: min / median / max over depths")
    gc.disable()  # a collection inside a timed run is the caller's cost, not the layers'
    try:
        with torch.no_grad():
            for name, run in (("eager", model), ("compiled", torch.compile(model))):
                run(x)
                best = [t * 1e3 for t in _over_depths(lambda: run(x), args.calls, args.repeats)]
                results["ms"][name] = _spread(best)
                print(f"  {name:<9} {min(best):6.2f} / {statistics.median(best):6.2f} / {max(best):6.2f} ms   "
                      f"({statistics.median(best) * 1e3 / len(masks):.0f} us per stripe conv at the median)")
    finally:
        gc.enable()
        stripeconv.set_backend(previous)
    return results


if __name__ == "__main__":
    main()
