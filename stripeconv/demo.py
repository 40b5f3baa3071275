"""A small built-in example: prune a conv layer's stripes by magnitude and time it against dense.

Run ``python -m stripeconv.demo``. It keeps the largest-L1 stripes of a 3x3 conv at several
densities, checks the StripeConv2d output against the masked dense conv, and prints the time
of both on this machine.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

from .nn import StripeConv2d


def l1_stripe_mask(weight: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the ``density`` fraction of stripes with the largest L1 norm (whole layer)."""
    norms = weight.abs().sum(1)  # [out, kh, kw]
    keep = max(1, round(density * norms.numel()))
    threshold = norms.flatten().topk(keep).values[-1]
    return norms >= threshold


def median_ms(fn, repeats: int = 15) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


@torch.no_grad()
def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--channels", type=int, default=64)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--batch", type=int, default=16)
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    conv = nn.Conv2d(args.channels, args.channels, 3, padding=1)
    x = torch.randn(args.batch, args.channels, args.size, args.size)
    dense_ms = median_ms(lambda: F.conv2d(x, conv.weight, conv.bias, padding=1))
    print(f"3x3 conv {args.channels}->{args.channels}, input {args.batch}x{args.channels}x{args.size}x{args.size}")
    print(f"dense conv2d: {dense_ms:.2f} ms")
    print(f"{'density':>8} {'stripes':>9} {'max err':>9} {'ms':>8} {'speedup':>8} {'1/density':>9}")
    for density in (1.0, 0.5, 0.3, 0.1):
        mask = l1_stripe_mask(conv.weight, density)
        layer = StripeConv2d.from_conv(conv, mask)
        expected = F.conv2d(x, conv.weight * mask[:, None], conv.bias, padding=1)
        err = (layer(x) - expected).abs().max().item()
        ms = median_ms(lambda: layer(x))
        print(
            f"{layer.density:8.2f} {layer.num_stripes:9d} {err:9.1e} {ms:8.2f} {dense_ms / ms:8.2f} "
            f"{1 / layer.density:9.2f}"
        )


if __name__ == "__main__":
    main()
