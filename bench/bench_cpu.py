"""CPU benchmark of the compiled stripe conv kernels against dense oneDNN convolution.

For each layer and stripe density it times, in fp32 on random data with a random stripe mask
(torch.manual_seed):
  * dense ``F.conv2d`` with NCHW input and with channels_last input (the faster one is the
    baseline);
  * ``StripeConv2d`` on the compiled CPU backend (the ``cpu`` backend pinned, NCHW input, eager:
    what a user's model runs; under no_grad for the forward);
  * the pure-PyTorch reference backend (few repeats: it is slow);
  * a channel-pruned dense conv with the same FLOPs (``round(density * out)`` filters, in the
    faster dense layout): what filter/channel pruning to this density would run instead;
  * both once more on channels_last input ("cl x": stripe over dense, each reading and writing
    channels_last tensors, as in a channels_last network);
  * optionally (--backward) forward+backward of both, through autograd, on NCHW and on
    channels_last tensors ("cl f+b x").
The stripe op and the dense baseline are timed back to back in every repeat, so both see the
same load when other processes share the machine; the speedup is the median of the per-repeat
ratios ("speedup"); "(min)" is the ratio of the fastest repeats, what the kernels do when nothing
else runs on the machine. Times are medians with the interquartile range as spread; the target
is judged on the median ratio. --quiet-wait waits for other processes to go idle first.

    python bench/bench_cpu.py                     # the three target layers, forward
    python bench/bench_cpu.py --backward --json bench/results/cpu.json
    python bench/bench_cpu.py --layer 16,32,14,64 --layer 64,64,7,64   # your own 3x3 layers
    python bench/bench_cpu.py --layer 16,32,32,1,2   # ... with stride 2 (a fifth value)
    python bench/bench_cpu.py --batches 1 8 64    # every layer at each of these batch sizes
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from typing import NamedTuple

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import stripeconv  # noqa: E402
from stripeconv import StripeConv2d  # noqa: E402
from stripeconv.backends import reference  # noqa: E402
from stripeconv.packing import pack_weight  # noqa: E402

def layer_name(cin: int, cout: int, hw: int, batch: int, stride: int = 1) -> str:
    return f"{cin}->{cout} {hw}x{hw}{f' s{stride}' if stride > 1 else ''} b{batch}"


class Layer(NamedTuple):
    """A 3x3, padding-1 conv on HW x HW planes."""
    name: str
    cin: int
    cout: int
    hw: int
    batch: int
    stride: int = 1

    @classmethod
    def of(cls, cin: int, cout: int, hw: int, batch: int, stride: int = 1) -> "Layer":
        return cls(layer_name(cin, cout, hw, batch, stride), cin, cout, hw, batch, stride)


LAYERS = [Layer.of(64, 64, 32, 16), Layer.of(256, 256, 8, 16), Layer.of(128, 128, 16, 1)]
DENSITIES = [1.0, 0.5, 0.3, 0.1]


def parse_layer(text: str) -> Layer:
    """``"CIN,COUT,HW,BATCH[,STRIDE]"`` -> a :class:`Layer`."""
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        values = []
    if len(values) not in (4, 5):
        raise argparse.ArgumentTypeError(f"expected CIN,COUT,HW,BATCH[,STRIDE] (four or five integers), got {text!r}")
    if min(values) < 1:
        raise argparse.ArgumentTypeError(f"CIN,COUT,HW,BATCH[,STRIDE] must be positive, got {text!r}")
    return Layer.of(*values)


def layers_to_run(layers, batches) -> list:
    """``layers`` (:class:`Layer` entries), each at every batch size of ``batches`` when given."""
    if not batches:
        return list(layers)
    return [Layer.of(layer.cin, layer.cout, layer.hw, b, layer.stride) for layer in layers for b in batches]


def target(batch: int, density: float) -> float:
    """Required speedup over dense: 0.7/density at batch 16, 0.5/density at batch 1; 0.9 at density 1."""
    if density >= 1.0:
        return 0.9
    return (0.5 if batch == 1 else 0.7) / density


def _cpu_busy(window: float = 0.25) -> float:
    """Fraction of the machine's CPU time used by anything over `window` seconds (Linux only)."""
    def read():
        with open("/proc/stat") as f:
            v = [int(t) for t in f.readline().split()[1:]]
        return v[3] + v[4], sum(v)  # idle + iowait, total
    try:
        i0, t0 = read()
        time.sleep(window)
        i1, t1 = read()
    except (OSError, ValueError, IndexError):
        return 0.0
    return 1.0 - (i1 - i0) / max(1, t1 - t0)


def wait_for_quiet(max_wait: float, threshold: float = 0.15) -> float:
    """On a shared machine, wait (up to max_wait s) until other processes leave the CPUs idle."""
    start = time.perf_counter()
    busy = _cpu_busy() if max_wait > 0 else 0.0
    while busy > threshold and time.perf_counter() - start < max_wait:
        busy = _cpu_busy()
    return busy


def _time_once(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def time_pair(fa, fb, repeats: int, warmup: int = 3):
    """Time fa and fb back to back `repeats` times; returns both time lists (seconds)."""
    for _ in range(warmup):
        fa()
        fb()
    ta, tb = [], []
    for i in range(repeats):
        if i % 2:  # alternate the order so neither always runs second
            tb.append(_time_once(fb))
            ta.append(_time_once(fa))
        else:
            ta.append(_time_once(fa))
            tb.append(_time_once(fb))
    return ta, tb


def time_one(fn, repeats: int, warmup: int = 1):
    for _ in range(warmup):
        fn()
    return [_time_once(fn) for _ in range(repeats)]


def summary(ts):
    ts = sorted(ts)
    q = statistics.quantiles(ts, n=4) if len(ts) >= 2 else [ts[0]] * 3
    return {"median_ms": statistics.median(ts) * 1e3, "iqr_ms": (q[2] - q[0]) * 1e3, "min_ms": ts[0] * 1e3}


def machine_info() -> dict:
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "logical_cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def make_case(cin, cout, hw, batch, density, seed=0):
    torch.manual_seed(seed)
    x = torch.randn(batch, cin, hw, hw)
    w = torch.randn(cout, cin, 3, 3) * (2.0 / (cin * 9)) ** 0.5
    bias = torch.randn(cout)
    mask = torch.rand(cout, 3, 3) < density
    return x, w, bias, mask, pack_weight(w, mask).contiguous()


def make_layer(cin, cout, mask, packed, bias=None, stride: int = 1) -> StripeConv2d:
    """The 3x3, padding 1 ``StripeConv2d`` with these stripes (and bias, if given)."""
    layer = StripeConv2d(cin, cout, 3, stride=stride, padding=1, bias=bias is not None, stripe_mask=mask)
    with torch.no_grad():
        layer.packed_weight.copy_(packed)
        if bias is not None:
            layer.bias.copy_(bias)
    return layer


def bench_layer(layer_spec: Layer, density: float, args) -> dict:
    name, cin, cout, hw, batch, stride = layer_spec
    x, w, bias, mask, packed = make_case(cin, cout, hw, batch, density)
    xcl = x.contiguous(memory_format=torch.channels_last)
    conv_args = ([stride, stride], [1, 1, 1, 1], [1, 1], 1)

    def dense_nchw():
        return F.conv2d(x, w, bias, stride, 1)

    def dense_cl():
        return F.conv2d(xcl, w, bias, stride, 1)

    layer = make_layer(cin, cout, mask, packed, bias, stride)

    def stripe():
        with torch.no_grad():
            return layer(x)

    def stripe_cl():
        with torch.no_grad():
            return layer(xcl)

    # correctness guard: a benchmark of a wrong kernel is worthless
    expect = F.conv2d(x, w * mask[:, None], bias, stride, 1)
    torch.testing.assert_close(stripe(), expect, atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(stripe_cl(), expect, atol=1e-3, rtol=1e-3)

    busy = wait_for_quiet(args.quiet_wait)
    t_nchw, t_st1 = time_pair(dense_nchw, stripe, args.repeats)
    t_cl, t_st2 = time_pair(dense_cl, stripe, args.repeats)
    nchw, cl = summary(t_nchw), summary(t_cl)
    if nchw["median_ms"] <= cl["median_ms"]:
        t_dense, t_st, dense_fmt = t_nchw, t_st1, "nchw"
    else:
        t_dense, t_st, dense_fmt = t_cl, t_st2, "channels_last"
    ratios = [d / s for d, s in zip(t_dense, t_st)]
    # the same FLOPs as dense channels: what filter pruning to this density would run
    kept_filters = max(1, round(density * cout))
    w_ch, b_ch = w[:kept_filters].contiguous(), bias[:kept_filters].contiguous()
    x_best = x if dense_fmt == "nchw" else xcl

    def dense_best():
        return F.conv2d(x_best, w, bias, stride, 1)

    def channel_pruned():
        return F.conv2d(x_best, w_ch, b_ch, stride, 1)

    t_dense_ch, t_ch = time_pair(dense_best, channel_pruned, args.repeats)
    # a channels_last network: both convs read and write channels_last tensors
    t_cl3, t_st_cl = time_pair(dense_cl, stripe_cl, args.repeats)
    row = {
        "layer": name,
        "cin": cin,
        "cout": cout,
        "hw": hw,
        "batch": batch,
        "stride": stride,
        "density": density,
        "kept_stripes": int(mask.sum()),
        "cpu_busy_before": busy,
        "dense_nchw": nchw,
        "dense_channels_last": cl,
        "dense_best_format": dense_fmt,
        "stripe_cpu": summary(t_st),
        "speedup": statistics.median(ratios),
        # best-case ratio (min times): what the kernels do when nothing else runs on the machine
        "speedup_min": min(t_dense) / min(t_st),
        "channel_pruned_filters": kept_filters,
        "channel_pruned": summary(t_ch),
        "speedup_channel_pruned": statistics.median(d / c for d, c in zip(t_dense_ch, t_ch)),
        "stripe_cpu_channels_last": summary(t_st_cl),
        "speedup_channels_last": statistics.median(d / s for d, s in zip(t_cl3, t_st_cl)),
        "ideal": 1.0 / max(density, 1e-9),
        "target": target(batch, density),
    }
    row["meets_target"] = row["speedup"] >= row["target"]
    if not args.no_reference:
        stride, padding, dilation, groups = conv_args
        row["reference"] = summary(
            time_one(lambda: reference.forward(x, packed, bias, mask, stride, padding, dilation, groups),
                     args.ref_repeats)
        )
    if args.backward:
        gy = torch.randn(expect.shape)
        wd = w.detach().requires_grad_()
        layer_fb = make_layer(cin, cout, mask, packed, None, stride)

        def fwd_bwd_pair(x_dense, x_stripe, grad):
            xd, xs = x_dense.detach().requires_grad_(), x_stripe.detach().requires_grad_()
            return (lambda: F.conv2d(xd, wd, None, stride, 1).backward(grad),
                    lambda: layer_fb(xs).backward(grad))

        repeats = max(5, args.repeats // 2)
        t_d, t_s = time_pair(*fwd_bwd_pair(x if dense_fmt == "nchw" else xcl, x, gy), repeats)
        row["dense_fwd_bwd"] = summary(t_d)
        row["stripe_fwd_bwd"] = summary(t_s)
        row["speedup_fwd_bwd"] = statistics.median(d / s for d, s in zip(t_d, t_s))
        # a channels_last network's training step: both read and write channels_last tensors
        t_d, t_s = time_pair(*fwd_bwd_pair(xcl, xcl, gy.contiguous(memory_format=torch.channels_last)), repeats)
        row["dense_fwd_bwd_channels_last"] = summary(t_d)
        row["stripe_fwd_bwd_channels_last"] = summary(t_s)
        row["speedup_fwd_bwd_channels_last"] = statistics.median(d / s for d, s in zip(t_d, t_s))
    return row


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--ref-repeats", type=int, default=3)
    parser.add_argument("--densities", type=float, nargs="+", default=DENSITIES)
    parser.add_argument("--layer", type=parse_layer, action="append", metavar="CIN,COUT,HW,BATCH[,STRIDE]",
                        help="a 3x3, padding-1 layer to time instead of the three target layers (repeatable)")
    parser.add_argument("--batches", type=int, nargs="+", metavar="B",
                        help="time every layer at each of these batch sizes instead of its own")
    parser.add_argument("--backward", action="store_true", help="also time forward+backward")
    parser.add_argument("--no-reference", action="store_true", help="skip the slow reference backend")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--json", metavar="PATH", help="write raw results and machine info to PATH")
    parser.add_argument("--quiet-wait", type=float, default=0.0, metavar="S",
                        help="before each layer, wait up to S seconds for other processes to leave the CPUs idle")
    args = parser.parse_args(argv)
    if args.batches and min(args.batches) < 1:
        parser.error(f"--batches must be positive, got {args.batches}")
    if args.threads:
        torch.set_num_threads(args.threads)
    ok, reason = stripeconv.backends._module("cpu").is_available()
    if not ok:
        sys.exit(f"the cpu backend is not available: {reason}")
    stripeconv.set_backend("cpu")

    info = machine_info()
    print(f"# {info['cpu']}, {info['torch_threads']} threads, torch {info['torch']}, {info['date']}")
    header = (f"{'layer':<20} {'dens':>4} {'nchw ms':>8} {'cl ms':>8} {'stripe ms':>13} {'ref ms':>8} "
              f"{'speedup':>7} {'(min)':>6} {'cl x':>6} {'chan x':>6} {'1/dens':>6} {'target':>6} ok")
    if args.backward:
        header += f" {'dense f+b':>10} {'stripe f+b':>11} {'f+b x':>6} {'cl f+b x':>8}"
    print(header)
    rows = []
    for layer in layers_to_run(args.layer or LAYERS, args.batches):
        name = layer.name
        for density in args.densities:
            r = bench_layer(layer, density, args)
            rows.append(r)
            st = r["stripe_cpu"]
            ref = f"{r['reference']['median_ms']:8.2f}" if "reference" in r else f"{'-':>8}"
            line = (f"{name:<20} {density:>4.2f} {r['dense_nchw']['median_ms']:>8.3f} "
                    f"{r['dense_channels_last']['median_ms']:>8.3f} "
                    f"{st['median_ms']:>7.3f}±{st['iqr_ms']:<5.3f} {ref} {r['speedup']:>7.2f} {r['speedup_min']:>6.2f} "
                    f"{r['speedup_channels_last']:>6.2f} {r['speedup_channel_pruned']:>6.2f} {r['ideal']:>6.2f} {r['target']:>6.2f} {'yes' if r['meets_target'] else 'NO'}")
            if args.backward:
                line += (f" {r['dense_fwd_bwd']['median_ms']:>10.3f} {r['stripe_fwd_bwd']['median_ms']:>11.3f} "
                         f"{r['speedup_fwd_bwd']:>6.2f} {r['speedup_fwd_bwd_channels_last']:>8.2f}")
            print(line, flush=True)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"machine": info, "args": vars(args), "results": rows}, f, indent=1)
        print(f"# wrote {args.json}")


if __name__ == "__main__":
    main()
