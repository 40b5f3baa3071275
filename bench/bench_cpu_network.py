"""Whole-network CPU latency: a CIFAR network with random stripe masks against the dense network.

Every 3x3 conv but the stem becomes a ``StripeConv2d`` keeping a random ``--density`` of its
stripes (torch.manual_seed); the dense network has the same weights. Both run in eval mode under
no_grad, on NCHW and on channels_last input (the module converted with ``.to(memory_format=...)``),
the four cases in turn within every repeat so they see the same load. Prints, per layout, the
median and min latency and the speedup of the stripe network over the faster dense layout.

    python bench/bench_cpu_network.py --model vgg16_bn --density 0.5 --batch 64 --threads 2
    python bench/bench_cpu_network.py --model resnet56 --json bench/results/cpu_network.json
    python bench/bench_cpu_network.py --density 1 --batch 1 --dense-policies never always
    python bench/bench_cpu_network.py --model resnet56 --batch 1 --repeats 60 --fuse-batchnorm
    python bench/bench_cpu_network.py --model resnet56 --batch 64 --compile

``--fuse-batchnorm`` folds every BatchNorm into the conv before it in both networks
(``stripeconv.fuse_batchnorm``, as for deployment), so only the convs, ReLUs, additions and pooling run.

``--compile`` runs every network through ``torch.compile`` (inductor; compiled before timing),
where BatchNorm, ReLU and additions fuse into few kernels and Python's per-module cost is gone.

``--dense-policies`` also times the stripe network with ``STRIPECONV_CPU_DENSE`` (the CPU
forward's dense hand-over near density 1) set to each policy given, interleaved with the rest;
their rows are ``stripe_<layout>@<policy>``. The other rows run under the environment's setting.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

import stripeconv  # noqa: E402
from bench_cpu import machine_info, summary  # noqa: E402
from stripeconv import models  # noqa: E402
from stripeconv.nn import convert  # noqa: E402

MODELS = ("vgg16_bn", "vgg11_bn", "resnet20", "resnet56", "resnet8")


def build(name: str, density: float, width: float = 1.0):
    """(dense, stripe) copies of the CIFAR network ``name`` with random masks on its 3x3 convs."""
    torch.manual_seed(0)
    dense = getattr(models, name)(num_classes=10, width=width).eval()
    masks = {n: torch.rand(m.out_channels, 3, 3) < density for n, m in dense.named_modules()
             if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3) and m.in_channels > 3}
    return dense, convert(copy.deepcopy(dense), masks).eval(), masks


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=MODELS, default="vgg16_bn")
    parser.add_argument("--density", type=float, default=0.5)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--width", type=float, default=1.0, help="channel multiplier of the network")
    parser.add_argument("--json", metavar="PATH", help="write raw results and machine info to PATH")
    parser.add_argument("--fuse-batchnorm", action="store_true",
                        help="fold BatchNorm into the convs of both networks (deployment)")
    parser.add_argument("--compile", action="store_true", help="torch.compile every network (inductor)")
    parser.add_argument("--dense-policies", nargs="+", choices=("auto", "never", "always"), default=[],
                        help="also time the stripe network with STRIPECONV_CPU_DENSE set to each of these")
    args = parser.parse_args(argv)
    if not 0.0 < args.density <= 1.0:
        parser.error(f"--density must be in (0, 1], got {args.density}")
    if args.threads:
        torch.set_num_threads(args.threads)
    ok, reason = stripeconv.backends._module("cpu").is_available()
    if not ok:
        sys.exit(f"the cpu backend is not available: {reason}")
    previous, saved_policy = stripeconv.get_backend(), os.environ.get("STRIPECONV_CPU_DENSE")
    stripeconv.set_backend("cpu")
    try:
        dense, stripe, masks = build(args.model, args.density, args.width)
        x = torch.randn(args.batch, 3, 32, 32)
        oracle = dense_masked(dense, masks)
        if args.fuse_batchnorm:
            dense, stripe = stripeconv.fuse_batchnorm(dense), stripeconv.fuse_batchnorm(stripe)
        cl = torch.channels_last
        stripe_cl = copy.deepcopy(stripe).to(memory_format=cl)
        cases = {  # name: (network, input, STRIPECONV_CPU_DENSE; None: the environment's setting)
            "dense_nchw": (dense, x, None),
            "stripe_nchw": (stripe, x, None),
            "dense_channels_last": (copy.deepcopy(dense).to(memory_format=cl), x.contiguous(memory_format=cl), None),
            "stripe_channels_last": (stripe_cl, x.contiguous(memory_format=cl), None),
        }
        for policy in args.dense_policies:
            cases[f"stripe_nchw@{policy}"] = (stripe, x, policy)
            cases[f"stripe_channels_last@{policy}"] = (stripe_cl, x.contiguous(memory_format=cl), policy)
        if args.compile:
            compiled = {}  # one compiled module per network object: the policy rows share their network's
            cases = {k: (compiled.setdefault(id(net), torch.compile(net)), inp, policy)
                     for k, (net, inp, policy) in cases.items()}
        times = {k: [] for k in cases}
        with torch.no_grad():
            torch.testing.assert_close(cases["stripe_nchw"][0](x), oracle(x), atol=1e-3, rtol=1e-3)
            for _ in range(args.repeats + 1):  # the first round warms up
                for k, (net, inp, policy) in cases.items():
                    _set_policy(policy if policy is not None else saved_policy)
                    t = time.perf_counter()
                    net(inp)
                    times[k].append(time.perf_counter() - t)
            times = {k: v[1:] for k, v in times.items()}
    finally:
        stripeconv.set_backend(previous)
        _set_policy(saved_policy)
    res = {k: summary(v) for k, v in times.items()}
    best_dense = min(res["dense_nchw"]["median_ms"], res["dense_channels_last"]["median_ms"])
    kept = sum(int(m.sum()) for m in masks.values())
    total = sum(m.numel() for m in masks.values())
    out = {"machine": machine_info(), "args": vars(args), "stripe_layers": len(masks),
           "kept_stripes": kept, "stripes": total, "timings": res, "raw_s": times,
           "speedup_nchw": best_dense / res["stripe_nchw"]["median_ms"],
           "speedup_channels_last": best_dense / res["stripe_channels_last"]["median_ms"]}
    m = out["machine"]
    variant = "".join(f" ({what})" for flag, what in ((args.fuse_batchnorm, "BatchNorm fused"),
                                                       (args.compile, "torch.compile")) if flag)
    print(f"# {args.model}{variant}, {len(masks)} stripe layers, "
          f"density {kept / total:.3f}, batch {args.batch}, "
          f"{m['torch_threads']} threads, {m['cpu']}, torch {m['torch']}, {m['date']}")
    for k, r in res.items():
        print(f"{k:<29} median {r['median_ms']:9.2f} ms  min {r['min_ms']:9.2f} ms  iqr {r['iqr_ms']:7.2f}")
    print(f"speedup over the faster dense layout: NCHW {out['speedup_nchw']:.2f}x, "
          f"channels_last {out['speedup_channels_last']:.2f}x (1/density {total / max(kept, 1):.2f}x)")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
        print(f"# wrote {args.json}")
    return out


def _set_policy(policy) -> None:
    if policy is None:
        os.environ.pop("STRIPECONV_CPU_DENSE", None)
    else:
        os.environ["STRIPECONV_CPU_DENSE"] = policy


def dense_masked(dense: torch.nn.Module, masks: dict) -> torch.nn.Module:
    """The dense network with the pruned stripes zeroed: the stripe network's oracle."""
    net = copy.deepcopy(dense)
    mods = dict(net.named_modules())
    with torch.no_grad():
        for name, mask in masks.items():
            mods[name].weight.mul_(mask[:, None].to(mods[name].weight.dtype))
    return net


if __name__ == "__main__":
    main()
