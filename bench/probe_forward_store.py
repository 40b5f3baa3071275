"""GPU diagnosis of the stripe forward: the op per tile width (events and CUDA graphs), a profile of
one call, and a copy of its kernel with switches (weights gathered through the row table or
pre-gathered, stores scattered by channel or contiguous, positions from the table or static) under
several block sizes. Needs a CUDA GPU:

    python bench/probe_forward_store.py [SECONDS]    # stop sweeping after SECONDS (default 400)
"""
import itertools
import os
import sys
import time

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from triton.testing import do_bench

import stripeconv
from stripeconv.backends import _triton_runtime, triton_backend as tb
from stripeconv.backends import triton_plans as tp
from stripeconv.packing import pack_weight

T0 = time.time()
DEV = "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"
torch.manual_seed(0)
DT = torch.bfloat16
LAYERS = {"vgg": (256, 128, 128, 16), "r50l2": (64, 128, 128, 28), "r50l3": (64, 256, 256, 14)}


def bench(fn):
    return do_bench(fn, warmup=25, rep=100)


@triton.jit
def probe_kernel(
    x_ptr, w_ptr, wg_ptr, out_ptr, tile_pos_ptr, tile_npos_ptr, tile_ch_ptr, w_rows_ptr,
    B, H, W, Ho, Wo, CG, T, UMAX, N,
    sxb, sxh, sxw,
    MODE_W: tl.constexpr, CONTIG_STORE: tl.constexpr, STATIC_POS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, KW: tl.constexpr, NPOS: tl.constexpr,
    GROUP_T_FAST: tl.constexpr,
):
    pid = tl.program_id(0)
    if GROUP_T_FAST:
        t = pid % T
        pid_m = pid // T
    else:
        nm = tl.cdiv(B * Ho * Wo, BLOCK_M)
        pid_m = pid % nm
        t = pid // nm
    if STATIC_POS:
        npos = NPOS
    else:
        npos = tl.load(tile_npos_ptr + t)
    M = B * Ho * Wo
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < M
    wo = offs_m % Wo
    tmp = offs_m // Wo
    ho = tmp % Ho
    b = tmp // Ho
    h_base = ho - 1
    w_base = wo - 1
    x_row = b * sxb
    offs_n = tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    KC = CG // BLOCK_K
    for it in range(0, npos * KC):
        u = it // KC
        c0 = (it - u * KC) * BLOCK_K
        if STATIC_POS:
            p = u
        else:
            p = tl.load(tile_pos_ptr + t * UMAX + u)
        i = p // KW
        j = p - i * KW
        hi = h_base + i
        wi = w_base + j
        ok = m_ok & (hi >= 0) & (hi < H) & (wi >= 0) & (wi < W)
        ck = c0 + offs_k
        xt = tl.load(x_ptr + (x_row + hi * sxh + wi * sxw)[:, None] + ck[None, :], mask=ok[:, None], other=0.0)
        if MODE_W == 0:  # packed rows gathered through the row table (the shipped kernel)
            rows = tl.load(w_rows_ptr + (t * UMAX + u) * BLOCK_N + offs_n)
            wt = tl.load(w_ptr + rows[None, :] * CG + ck[:, None], mask=(rows >= 0)[None, :], other=0.0)
        else:  # weights pre-gathered per tile: [T, UMAX, CG, BLOCK_N]
            wt = tl.load(wg_ptr + ((t * UMAX + u) * CG + ck[:, None]) * BLOCK_N + offs_n[None, :])
        acc = tl.dot(xt, wt, acc)
    if CONTIG_STORE == 1:
        ch = t * BLOCK_N + offs_n
    else:
        ch = tl.load(tile_ch_ptr + t * BLOCK_N + offs_n)
    if CONTIG_STORE == 2:  # timing only: pretend runs of 8
        ch = tl.max_contiguous(tl.multiple_of(ch, 8), 8)
    if CONTIG_STORE == 3:  # NCHW output: each column is a run of pixels
        HW = Ho * Wo
        out_ptrs = out_ptr + (b * (N * HW) + offs_m % HW)[:, None] + ch[None, :] * HW
    else:
        out_ptrs = out_ptr + offs_m[:, None] * N + ch[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & (ch >= 0)[None, :])


def make(layer, density):
    B, C, N, Hs = LAYERS[layer]
    x = torch.randn(B, C, Hs, Hs, device=DEV, dtype=DT).contiguous(memory_format=torch.channels_last)
    mask = torch.rand(N, 3, 3, device=DEV) < density
    wd = torch.randn(N, C, 3, 3, device=DEV, dtype=DT) * 0.05
    return x, mask, wd, pack_weight(wd * mask[:, None].to(DT), mask)


def probe_variant(x, mask, packed, bn, bm, bk, warps, stages, mode_w, contig, static, tfast=True):
    B, C, H, W = x.shape
    N = mask.shape[0]
    plan = tp.forward_plan(mask, 1, bn, x.device)
    T, U = plan.num_tiles, plan.umax
    rows = plan.w_rows.view(T, U, bn).long()
    wg = torch.where(rows[..., None] >= 0, packed[rows.clamp(min=0)], 0).permute(0, 1, 3, 2).contiguous()
    out = torch.empty(B, N, H, W, device=DEV, dtype=DT).contiguous(memory_format=torch.channels_last)
    M = B * H * W
    grid = (triton.cdiv(M, bm) * T,)

    def run():
        probe_kernel[grid](x, packed, wg, out, plan.tile_pos, plan.tile_npos, plan.tile_ch, plan.w_rows,
                           B, H, W, H, W, C, T, U, N, x.stride(0), x.stride(2), x.stride(3),
                           MODE_W=mode_w, CONTIG_STORE=contig, STATIC_POS=static, BLOCK_M=bm, BLOCK_N=bn,
                           BLOCK_K=bk, KW=3, NPOS=9, GROUP_T_FAST=tfast, num_warps=warps, num_stages=stages)
    try:
        run()
    except Exception as exc:  # noqa: BLE001
        return float("nan"), f"{type(exc).__name__}: {str(exc)[:80]}"
    err = ""
    if not contig:
        ref = F.conv2d(x, tp_unpack(packed, mask), None, 1, 1)
        e = (out.float() - ref.float()).abs().max().item()
        err = f"err {e:.3g}"
    return bench(run), err


def tp_unpack(packed, mask):
    from stripeconv.packing import unpack_weight
    return unpack_weight(packed, mask)


def section(title):
    print(f"\n== {title}  [{time.time() - T0:.0f} s]", flush=True)


def main():
    torch.backends.cudnn.benchmark = True
    stripeconv.set_backend("triton")
    section("op-level: dense cuDNN vs stripeconv triton (kernels only) per block_n; profiler for one call")
    for layer, d in [("vgg", 1.0), ("vgg", 0.5), ("vgg", 0.2), ("r50l2", 1.0), ("r50l3", 1.0)]:
        x, mask, wd, packed = make(layer, d)
        dense = bench(lambda: F.conv2d(x, wd, None, 1, 1))
        line = f"{layer} d={d}: cudnn {dense * 1e3:7.1f} us"
        os.environ["STRIPECONV_GPU_DENSE"] = "never"
        for bn in (32, 64, 128):
            os.environ["STRIPECONV_TRITON_BLOCK_N"] = str(bn)
            tb.clear_cache()
            f = lambda: stripeconv.ops.stripe_conv2d(x, packed, None, mask, [1, 1], [1, 1, 1, 1], [1, 1], 1)  # noqa: E731
            f()
            t = bench(f)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                f()
            tg = bench(g.replay)
            cfg = _triton_runtime._kernels.stripe_fwd_kernel.best_config
            line += f" | bn{bn} {t * 1e3:6.1f} graph {tg * 1e3:6.1f} eff {tp.forward_plan(mask, 1, bn).efficiency:.2f} " \
                    f"[{cfg.kwargs.get('BLOCK_M')},{cfg.num_warps},{cfg.num_stages}]"
        del os.environ["STRIPECONV_TRITON_BLOCK_N"]
        print(line, flush=True)
        if layer == "vgg" and d == 1.0:
            from torch.profiler import ProfilerActivity, profile
            with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
                for _ in range(5):
                    f()
                torch.cuda.synchronize()
            print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12), flush=True)

    section("probe kernel variants, vgg (B256 C128 N128 16x16), bf16 NHWC")
    for d in (1.0, 0.5):
        x, mask, wd, packed = make("vgg", d)
        dense = bench(lambda: F.conv2d(x, wd, None, 1, 1))
        print(f"-- density {d}: cudnn {dense * 1e3:.1f} us", flush=True)
        for (mode_w, contig, static) in [(0, 0, 0), (1, 0, 0), (1, 1, 0), (0, 1, 0)] + ([(1, 1, 1)] if d == 1.0 else []):
            for bn, bm, bk, warps, stages in [(128, 128, 64, 8, 3), (128, 128, 64, 4, 3), (64, 128, 64, 4, 3),
                                              (128, 128, 32, 4, 4), (128, 256, 64, 8, 3), (64, 128, 128, 4, 3)]:
                t, err = probe_variant(x, mask, packed, bn, bm, bk, warps, stages, mode_w, contig, static)
                print(f"  w{mode_w} contig{contig} static{static} bn{bn} bm{bm} bk{bk} w{warps} s{stages}: "
                      f"{t * 1e3:7.1f} us  {err}", flush=True)
        if time.time() - T0 > float(sys.argv[1] if len(sys.argv) > 1 else 400):
            break

    section("config sweep, shipped-like (w0) and pregathered (w1), vgg d=1")
    x, mask, wd, packed = make("vgg", 1.0)
    for mode_w in (0, 1):
        res = []
        for bn, bm, bk, warps, stages in itertools.product((64, 128), (64, 128, 256), (32, 64), (4, 8), (2, 3, 4)):
            if time.time() - T0 > float(sys.argv[1] if len(sys.argv) > 1 else 400):
                break
            t, err = probe_variant(x, mask, packed, bn, bm, bk, warps, stages, mode_w, 0, 0)
            res.append((t, bn, bm, bk, warps, stages, err))
        res.sort(key=lambda r: (r[0] != r[0], r[0]))
        for r in res[:8]:
            print(f"  w{mode_w}: {r[0] * 1e3:7.1f} us bn{r[1]} bm{r[2]} bk{r[3]} w{r[4]} s{r[5]} {r[6]}", flush=True)
    print(f"done [{time.time() - T0:.0f} s]")


if __name__ == "__main__":
    main()
