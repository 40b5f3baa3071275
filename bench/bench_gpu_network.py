"""Whole-network latency on a GPU: a CIFAR network with random stripe masks against cuDNN, eager
and compiled.

Every 3x3 conv but the stem becomes a ``StripeConv2d`` keeping a random ``--density`` of its
stripes (the networks of ``bench_cpu_network.py``); the dense network has the same weights. Both run
in eval mode under no_grad, channels_last, in ``--dtype``, with ``cudnn.benchmark`` on, in three
ways: eager; ``torch.compile`` (default mode: the host launches every kernel of every call); and
``torch.compile(mode="reduce-overhead")`` (CUDA graphs: a call replays the recorded kernels with
no host work per layer). A time is the median over ``--rounds`` of ``--calls`` back-to-back
forwards between two synchronisations, host work included, as a serving loop pays it.

    python bench/bench_gpu_network.py                              # resnet56, batches 1 and 64, bf16
    python bench/bench_gpu_network.py --model vgg16_bn --batches 1,256
    python bench/bench_gpu_network.py --cpu-smoke                  # code paths on CPU, times meaningless

Prints, per batch and way of running, dense and stripe latency, the speedup next to 1/density, and
the stripe network's largest error against the dense network on the masked weights; writes the
raw JSON (device, versions, date, every timing, and each layer's stripe / cuDNN choice as
``dispatch_decisions``, with the choice under CUDA graph capture where it differs) to ``--out``.
Each timing records the frames torch.compile compiled while it ran (nonzero: a guard failing on
every call). ``--profile N`` profiles N calls of each network after its timing
(bench/profile_summary.py): host and device time per call, launches, the events that block the host
on the device, and the costliest ops; and the Python functions that took the most host time of their
own (cProfile), where a call's Python goes.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

import stripeconv  # noqa: E402
from stripeconv.backends import gpu_select  # noqa: E402
from bench_cpu import summary  # noqa: E402
from bench_cpu_network import MODELS, build, dense_masked  # noqa: E402
from profile_summary import format_python_profile, format_summary, profile_calls, python_profile_calls  # noqa: E402

MODES = ("eager", "compile", "reduce-overhead")


def _prepare(net: torch.nn.Module, mode: str):
    if mode == "eager":
        return net
    return torch.compile(net, mode=None if mode == "compile" else mode)


def _latency(run, x, calls: int, rounds: int, sync, step_begin) -> dict:
    """Seconds per forward in ``rounds`` runs of ``calls`` back-to-back forwards (after warm-up:
    compiling, autotuning, graph recording)."""
    for _ in range(3):
        step_begin()
        run(x)
    sync()
    frames = _compiled_frames()
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(calls):
            step_begin()
            run(x)
        sync()
        times.append((time.perf_counter() - start) / calls)
    # nonzero: torch.compile compiled again after the warm-up (a guard that fails on every call)
    return {**summary(times), "frames_compiled_while_timing": _compiled_frames() - frames}


def _max_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """Largest difference relative to the reference's largest magnitude."""
    return ((out.float() - ref.float()).abs().max() / ref.float().abs().max().clamp_min(1e-12)).item()


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=MODELS, default="resnet56")
    ap.add_argument("--density", type=float, default=0.5)
    ap.add_argument("--batches", default="1,64", help="comma list of batch sizes")
    ap.add_argument("--modes", default=",".join(MODES), help=f"comma list of {', '.join(MODES)}")
    ap.add_argument("--dtype", default="bfloat16", choices=["float16", "bfloat16", "float32"])
    ap.add_argument("--calls", type=int, default=50, help="forwards per timed round")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--budget-s", type=float, default=None, help="start no new batch after this many seconds")
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    ap.add_argument("--tag", default="", help="added to the output file name")
    ap.add_argument("--reorder", action="store_true",
                    help="the stripe network with its filters in tile order (stripeconv.reorder_filters)")
    ap.add_argument("--profile", type=int, default=0, metavar="CALLS",
                    help="after timing, profile this many calls of each network (host and device time per op, "
                         "blocking events) into the JSON and the log")
    ap.add_argument("--cpu-smoke", action="store_true",
                    help="run on CPU (float32, the modes without CUDA graphs, few calls): a check of the code paths")
    args = ap.parse_args(argv)
    start = time.perf_counter()
    batches = [int(b) for b in args.batches.split(",")]
    modes = [m for m in args.modes.split(",") if m]
    unknown = set(modes) - set(MODES)
    if unknown or not modes:
        ap.error(f"--modes takes {', '.join(MODES)}, got {args.modes!r}")
    if not 0.0 < args.density <= 1.0:
        ap.error(f"--density must be in (0, 1], got {args.density}")
    if args.profile < 0:
        ap.error(f"--profile takes a number of calls (0: off), got {args.profile}")
    if args.cpu_smoke:
        device, dtype = torch.device("cpu"), torch.float32
        modes = [m for m in modes if m != "reduce-overhead"]
        args.calls, args.rounds = min(args.calls, 2), min(args.rounds, 2)
        sync, device_name = (lambda: None), "cpu (smoke run)"
    else:
        if not torch.cuda.is_available():
            sys.exit("no CUDA device (--cpu-smoke checks the code paths on CPU)")
        device, dtype = torch.device("cuda"), getattr(torch, args.dtype)
        sync, device_name = torch.cuda.synchronize, torch.cuda.get_device_name()
    # Both networks share their classes' forward code, compiled once per network, mode and batch.
    limits = {knob: max(64, getattr(torch._dynamo.config, knob)) for knob in ("cache_size_limit", "recompile_limit")
              if hasattr(torch._dynamo.config, knob)}
    mark_step = getattr(torch.compiler, "cudagraph_mark_step_begin", lambda: None)

    dense, stripe, masks = build(args.model, args.density)
    oracle = dense_masked(dense, masks)
    reordered = 0
    if args.reorder:  # the same function: the oracle stays the reference
        reordered = sum(reason is None for reason in stripeconv.reorderable(stripe).values())
        stripe = stripeconv.reorder_filters(stripe, inplace=True)
    kept = sum(int(m.sum()) for m in masks.values())
    total = sum(m.numel() for m in masks.values())
    nets = {name: net.to(device=device, dtype=dtype, memory_format=torch.channels_last).eval()
            for name, net in (("dense", dense), ("stripe", stripe), ("oracle", oracle))}
    backend = stripeconv.backends.resolve(device).NAME
    meta = {"date": _dt.datetime.now().isoformat(timespec="seconds"), "device": device_name,
            "torch": torch.__version__, "cuda": torch.version.cuda, "python": sys.version.split()[0],
            "triton": _triton_version(), "stripe_backend": backend, "model": args.model,
            "stripe_layers": len(masks), "reordered_layers": reordered, "density": kept / total, "dtype": str(dtype).replace("torch.", ""),
            "calls": args.calls, "rounds": args.rounds,
            # settled Triton launches through the compiled kernel's launcher, or (0) Triton's own path
            "triton_direct_launch": os.environ.get("STRIPECONV_TRITON_DIRECT", "1").strip() != "0",
            "triton_excluded": list(gpu_select.excluded())}
    print(f"# {args.model}, {len(masks)} stripe layers ({reordered} with filters in tile order) at density "
          f"{kept / total:.3f} ({backend} backend), "
          f"{meta['dtype']}, channels_last, {device_name}, torch {torch.__version__}, {meta['date']}"
          + ("" if meta["triton_direct_launch"] else ", every Triton launch through its JIT function"))
    print(f"{'batch':>5} {'mode':<16} {'dense ms':>9} {'stripe ms':>10} {'speedup':>8} {'1/density':>9} {'error':>8}")
    rows = []
    os.makedirs(args.out, exist_ok=True)
    stamp = _dt.datetime.now().strftime("%Y%m%d_%H%M%S")
    path = os.path.join(args.out, f"bench_gpu_network_{args.model}_{stamp}{args.tag}.json")
    cudnn_benchmark, torch.backends.cudnn.benchmark = torch.backends.cudnn.benchmark, True
    try:
        with torch._dynamo.config.patch(**limits), torch.no_grad():
            for batch in batches:
                if args.budget_s is not None and time.perf_counter() - start > args.budget_s:
                    print(f"# budget of {args.budget_s:.0f} s spent: batch {batch} not run")
                    break
                gen = torch.Generator().manual_seed(batch)
                x = torch.randn(batch, 3, 32, 32, generator=gen).to(device=device, dtype=dtype)
                x = x.contiguous(memory_format=torch.channels_last)
                reference = nets["oracle"](x)
                for mode in modes:
                    row = {"batch": batch, "mode": mode}
                    step_begin = mark_step if mode == "reduce-overhead" else (lambda: None)
                    for name in ("dense", "stripe"):
                        run = _prepare(nets[name], mode)
                        row[name] = _latency(run, x, args.calls, args.rounds, sync, step_begin)
                        if name == "stripe":
                            step_begin()
                            row["stripe_error"] = _max_error(run(x), reference)
                        if args.profile:
                            row[name]["profile"] = profile_calls(lambda: (step_begin(), run(x)), args.profile,
                                                                 cuda=device.type == "cuda")
                            sync()
                            row[name]["python_profile"] = python_profile_calls(lambda: (step_begin(), run(x)),
                                                                               args.profile)
                            sync()
                    row["speedup"] = row["dense"]["median_ms"] / row["stripe"]["median_ms"]
                    rows.append(row)
                    print(f"{batch:>5} {mode:<16} {row['dense']['median_ms']:9.3f} {row['stripe']['median_ms']:10.3f} "
                          f"{row['speedup']:7.2f}x {total / max(kept, 1):8.2f}x {row['stripe_error']:8.1e}")
                    for name in ("dense", "stripe") if args.profile else ():
                        print(format_summary(row[name]["profile"], title=f"      {name:6s} profile: "))
                        print(format_python_profile(row[name]["python_profile"], title=f"      {name:6s} python: "))
                    _write(path, {**meta, "rows": rows})  # after every row: a run cut short keeps what it measured
    finally:
        torch.backends.cudnn.benchmark = cudnn_benchmark
    # each layer's stripe / cuDNN choice, and where it differs under CUDA graph capture (captured_choice)
    decisions = [{**d, "key": repr(d["key"])} for d in gpu_select.decisions()]
    result = {**meta, "rows": rows, "dispatch_decisions": decisions}
    _write(path, result)
    print(f"# wrote {path}")
    return result


def _compiled_frames() -> int:
    """Frames torch.compile has compiled in this process so far."""
    from torch._dynamo.utils import counters

    return int(counters["frames"]["total"])


def _write(path: str, result: dict) -> None:
    with open(path, "w") as f:
        json.dump(result, f, indent=1)


def _triton_version() -> str | None:
    try:
        import triton
    except Exception:  # not installed, or a broken install: the stripe network then runs on `dense`
        return None
    return triton.__version__


if __name__ == "__main__":
    main()
