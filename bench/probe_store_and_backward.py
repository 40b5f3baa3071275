"""GPU diagnosis of the forward's output store (scattered 2-byte stores vs vector stores, NCHW planes,
a permutation pass) and a profile of the backward kernels. Needs a CUDA GPU:

    python bench/probe_store_and_backward.py     # logs: bench/results/h100_20261123/probe_*.log
"""
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import probe_forward_store as P  # noqa: E402
from stripeconv.backends import triton_plans as tp  # noqa: E402
import stripeconv  # noqa: E402

def store_variants():
    P.section("store variants (w1 pregathered, bn128/bm128/bk64/w4/s3 and bn64)")
    for layer in ("vgg", "r50l2"):
        for d in (1.0, 0.5):
            x, mask, wd, packed = P.make(layer, d)
            dense = P.bench(lambda: F.conv2d(x, wd, None, 1, 1))
            print(f"-- {layer} d={d}: cudnn {dense*1e3:.1f} us", flush=True)
            for bn in (128, 64):
                # 2 (a false contiguity hint, timing only) faults unless the tiles happen to be aligned
                for contig in ((0, 1, 2, 3) if d == 1.0 else (0, 1, 3)):
                    t, err = P.probe_variant(x, mask, packed, bn, 128, 64, 4, 3, 1, contig, 0)
                    print(f"  bn{bn} store{contig}: {t*1e3:7.1f} us {err if contig in (0,) else ''}", flush=True)
                # contiguous into a buffer + permutation by torch
                plan = tp.forward_plan(mask, 1, bn, x.device)
                perm = plan.tile_ch.view(-1).long()
                keep = perm >= 0
                inv = torch.empty(mask.shape[0], dtype=torch.long, device=x.device)
                inv[perm[keep]] = torch.nonzero(keep).view(-1)
                B, C, H, W = x.shape
                M = B * H * W
                tmp = torch.empty(M, plan.num_tiles * bn, device=x.device, dtype=x.dtype)
                t1 = P.bench(lambda: torch.index_select(tmp, 1, inv))
                print(f"  bn{bn} + index_select permute alone: {t1*1e3:7.1f} us", flush=True)

def backward_profile():
    P.section("backward kernels: profiler, vgg and r50l2 d=0.5 / 1.0")
    from torch.profiler import ProfilerActivity, profile
    os.environ["STRIPECONV_GPU_DENSE"] = "never"
    for layer, d in (("vgg", 1.0), ("vgg", 0.5), ("r50l2", 0.5)):
        x, mask, wd, packed = P.make(layer, d)
        x.requires_grad_(True)
        w = packed.clone().requires_grad_(True)
        f = lambda: stripeconv.ops.stripe_conv2d(x, w, None, mask, [1, 1], [1, 1, 1, 1], [1, 1], 1)
        y = f(); gy = torch.randn_like(y)
        for _ in range(3):
            torch.autograd.grad(f(), (x, w), gy)
        wref = wd.detach().clone().requires_grad_(True)
        xr = x.detach().clone().requires_grad_(True)
        td = P.bench(lambda: torch.autograd.grad(F.conv2d(xr, wref, None, 1, 1), (xr, wref), gy))
        ts = P.bench(lambda: torch.autograd.grad(f(), (x, w), gy))
        print(f"-- {layer} d={d}: cudnn fwd+bwd {td*1e3:.1f} us, stripe {ts*1e3:.1f} us", flush=True)
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                torch.autograd.grad(f(), (x, w), gy)
            torch.cuda.synchronize()
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=10), flush=True)
        from stripeconv.backends import _triton_runtime
        for k in ("stripe_dgrad_kernel", "stripe_wgrad_kernel"):
            c = getattr(_triton_runtime._kernels, k).best_config
            print(k, c, flush=True)

torch.backends.cudnn.benchmark = True
stripeconv.set_backend("triton")
store_variants()
backward_profile()
print(f"done [{time.time()-P.T0:.0f} s]")
