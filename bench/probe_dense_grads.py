"""GPU diagnosis of the dense candidates' gradients: cuDNN's grad input and grad weight as the op's
dense hand-over calls them, against the same convolution_backward as autograd calls it, timed the
way :mod:`stripeconv.backends.gpu_select` times candidates (cold L2, a head start) and as CUDA graph
replays, with the CUDA kernels each one runs. Needs a CUDA GPU:

    python bench/probe_dense_grads.py [--json OUT.json]

Why: in the 2026-11-24 H100 run the dense grad input the op timed for its choice took 1.3-1.7x what
the whole dense backward took in the benchmark's graph replays less the op's dense grad weight
(VGG conv1_2 at batch 256: 251 us against 191 - 64; ResNet-50 layer1 at batch 64: 208 against
152 - 54), by more the larger the layer's activations, while its forward and grad weight matched.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_gpu import _graph_bench  # noqa: E402

# (name, batch, channels in, channels out, image size, kernel, stride, padding), bf16, channels_last
LAYERS = [("vgg.conv1_2", 256, 64, 64, 32, 3, 1, 1), ("vgg.conv2_2", 256, 128, 128, 16, 3, 1, 1),
          ("r50.layer1", 64, 64, 64, 56, 3, 1, 1), ("r50.layer3", 64, 256, 256, 14, 3, 1, 1),
          ("vgg.conv4_x", 256, 512, 512, 4, 3, 1, 1)]


def kernels(fn, calls: int = 5) -> list[tuple[str, float]]:
    """The CUDA kernels of one call of ``fn`` and their mean time each (us), longest first."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    rows = [(e.key, e.device_time_total / calls) for e in prof.key_averages() if e.device_time_total > 0]
    return sorted(rows, key=lambda r: -r[1])[:8]


def probe_layer(layer: tuple) -> dict:
    from stripeconv.backends import dense, gpu_select, triton_backend
    from stripeconv.packing import pack_weight

    name, b, c, n, hw, k, s, p = layer
    dev, dt = torch.device("cuda"), torch.bfloat16
    cl = torch.channels_last
    x = torch.randn(b, c, hw, hw, device=dev, dtype=dt).contiguous(memory_format=cl)
    w = (torch.randn(n, c, k, k, device=dev, dtype=dt) / (c * k * k) ** 0.5).contiguous(memory_format=cl)
    ho = (hw + 2 * p - k) // s + 1
    gy = torch.randn(b, n, ho, ho, device=dev, dtype=dt).contiguous(memory_format=cl)
    mask = torch.ones(n, k, k, dtype=torch.bool, device=dev)
    packed = pack_weight(w, mask).contiguous()
    cb = torch.ops.aten.convolution_backward
    conv = ([s, s], [p, p], [1, 1], False, [0, 0], 1)

    def op_dense_grad_input():
        return triton_backend.grad_input(gy, packed, mask, list(x.shape), [s, s], [p, p, p, p], [1, 1], 1)

    def op_dense_grad_weight():
        return triton_backend.grad_weight(gy, x, packed, mask, [s, s], [p, p, p, p], [1, 1], 1)

    variants = {
        "autograd backward (dx, dw, db)": lambda: cb(gy, x, w, [n], *conv, (True, True, True)),
        "convolution_backward dx, real input": lambda: cb(gy, x, w, None, *conv, (True, False, False)),
        "dense.conv2d_grad_input (stand-in input)": lambda: dense.conv2d_grad_input(
            x.shape, w, gy, [s, s], [p, p], [1, 1], 1),
        "convolution_backward dw": lambda: cb(gy, x, w, None, *conv, (False, True, False)),
        "op grad input, dense candidate": op_dense_grad_input,
        "op grad weight, dense candidate": op_dense_grad_weight,
    }
    out = {"layer": name, "shape": [b, c, n, hw, k, s, p], "variants": {}}
    for label, fn in variants.items():
        cold = gpu_select._time_ms(fn, repeats=9)
        replay = _graph_bench(fn).get("graph_ms", float("nan"))
        result = fn()
        result = result[0] if isinstance(result, tuple) else result
        fmt = "channels_last" if result is not None and result.dim() == 4 and \
            result.is_contiguous(memory_format=cl) and not result.is_contiguous() else "other"
        out["variants"][label] = {"cold_us": cold * 1e3, "graph_us": replay * 1e3, "result_layout": fmt,
                                  "kernels_us": kernels(fn)}
        print(f"  {label:44s} cold {cold * 1e3:7.1f} us  graph {replay * 1e3:7.1f} us  ({fmt})", flush=True)
        for kname, t in out["variants"][label]["kernels_us"][:4]:
            print(f"      {t:7.1f} us  {kname[:110]}", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", help="write the timings and kernel lists here")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("probe_dense_grads.py needs a CUDA GPU")
    os.environ["STRIPECONV_GPU_DENSE"] = "always"  # the op's dense candidates, as its choice times them
    torch.backends.cudnn.benchmark = True
    results = []
    for layer in LAYERS:
        print(f"-- {layer[0]}: batch {layer[1]}, {layer[2]} -> {layer[3]} channels, {layer[4]}x{layer[4]}",
              flush=True)
        results.append(probe_layer(layer))
    summary = {label: statistics.median(r["variants"][label]["cold_us"] for r in results)
               for label in results[0]["variants"]}
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                       "cudnn": torch.backends.cudnn.version(), "layers": results, "median_cold_us": summary},
                      f, indent=1)


if __name__ == "__main__":
    main()
