"""Random geometries through every Triton candidate, each checked against the fp64 oracle.

On a GPU, :mod:`stripeconv.backends.gpu_select` times the candidates of a call (tile widths, plans,
store layouts, split-K, TMA, the tile gradients' variants) and checks each against cuDNN once; the
interpreter tests (``test_triton.py``) pin one candidate per case. This runs every candidate of every
op on random convolutions in Triton's interpreter and compares each result with ``F.conv2d`` in
fp64 on the same rounded values, so a candidate that only some geometries break shows up before a
GPU times it.

    TRITON_INTERPRET=1 python tests/fuzz_triton.py --seeds 0:20          # seeds 0..19
    TRITON_INTERPRET=1 python tests/fuzz_triton.py --seeds 7 --verbose   # one geometry, each candidate

Prints one line per geometry (its seed, the geometry, how many candidates ran) and every candidate
that failed with its error; exits 1 if any did. ``test_triton.py`` runs a few seeds in CI.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import sys
import time
import warnings
from unittest import mock

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
OPS = ("fwd", "dgrad", "wgrad")
# Largest |error| over the largest |oracle| (at least 1) a dtype may show: fp32 and 16-bit rounding of
# the inputs are in the oracle, the kernels' fp32 sums and the final rounding are not.
TOLERANCE = {torch.float64: 1e-9, torch.float32: 2e-4, torch.float16: 2e-2, torch.bfloat16: 8e-2}


def geometry(seed: int) -> dict:
    """A random convolution (small enough for the interpreter) and the settings it runs under."""
    rng = random.Random(seed)
    shape = rng.random()
    if shape < 0.15:  # 64 channels and tiles of 64 filters: the TMA grad input too
        groups, c, n = 1, 64, rng.choice((64, 128))
    elif shape < 0.6:  # 16 channels and filters a group or more: the tile backward's tensor-core kernels
        groups = rng.choice((1, 1, 2))
        c, n = groups * rng.choice((16, 32)), groups * rng.choice((16, 32, 48, 64, 80))
    else:
        groups = rng.choice((1, 1, 1, 2, 4))
        depthwise = groups > 1 and rng.random() < 0.3
        c = groups * (1 if depthwise else rng.choice((1, 3, 4, 8, 16)))
        n = (c if depthwise else groups * rng.choice((1, 4, 8, 12, 16))) * rng.choice((1, 2, 3))
    kernel = rng.choice(((1, 1), (3, 3), (3, 3), (3, 3), (5, 5), (1, 3), (3, 1), (2, 2)))
    dilation = (rng.choice((1, 1, 2)), rng.choice((1, 1, 2)))
    stride = rng.choice(((1, 1), (1, 1), (2, 2), (2, 2), (3, 3), (1, 2)))
    padding = tuple(rng.randint(0, (k - 1) * d) for k, d in zip(kernel, dilation) for _ in range(2))  # t, b, l, r
    if rng.random() < 0.5:  # symmetric, as nn.Conv2d pads: the dense candidate joins
        padding = (padding[0], padding[0], padding[2], padding[2])
    size = [rng.randint(1, 9), rng.randint(1, 9)]
    for i, (k, d) in enumerate(zip(kernel, dilation)):  # at least one output pixel
        size[i] = max(size[i], d * (k - 1) + 1 - padding[2 * i] - padding[2 * i + 1])
    return dict(seed=seed, batch=rng.choice((1, 2, 3)), in_channels=c, out_channels=n, size=tuple(size),
                kernel=kernel, stride=stride, padding=padding, dilation=dilation, groups=groups,
                density=rng.choice((0.1, 0.2, 0.3, 0.5, 0.7, 0.9, 1.0)),
                mask=rng.choice(("random", "random", "blocks", "centre", "reordered", "empty_filters")),
                dtype=rng.choice((torch.float32, torch.float32, torch.float16, torch.bfloat16, torch.float64)),
                channels_last=rng.random() < 0.7, bias=rng.random() < 0.7,
                block_n=rng.choice((None, None, "16", "32", "64")), int64=rng.random() < 0.1,
                deterministic=rng.random() < 0.15, weight_transposed=rng.random() < 0.15,
                mask_update=rng.random() < 0.3)


def describe(g: dict) -> str:
    return (f"seed {g['seed']}: {g['batch']}x{g['in_channels']}x{g['size'][0]}x{g['size'][1]} -> {g['out_channels']}, "
            f"k{g['kernel'][0]}x{g['kernel'][1]} s{g['stride'][0]}x{g['stride'][1]} pad{list(g['padding'])} "
            f"d{g['dilation'][0]}x{g['dilation'][1]} g{g['groups']}, {g['mask']} density {g['density']}, "
            f"{str(g['dtype']).replace('torch.', '')}, {'channels_last' if g['channels_last'] else 'NCHW'}"
            f"{', bias' if g['bias'] else ''}{', BLOCK_N ' + g['block_n'] if g['block_n'] else ''}"
            f"{', int64 offsets' if g['int64'] else ''}{', deterministic' if g['deterministic'] else ''}"
            f"{', packed weight transposed' if g['weight_transposed'] else ''}"
            f"{', mask written in place' if g['mask_update'] else ''}")


def make_mask(g: dict, gen: torch.Generator) -> torch.Tensor:
    n, (kh, kw) = g["out_channels"], g["kernel"]
    kind, density = g["mask"], g["density"]
    if kind == "blocks":  # consecutive filters share a pattern, as group-wise pruning leaves them
        mask = (torch.rand(-(-n // 4), kh, kw, generator=gen) < density).repeat_interleave(4, 0)[:n]
    elif kind == "centre":  # the centre kept more often than the rest
        weight = torch.full((kh, kw), density)
        weight[kh // 2, kw // 2] = min(1.0, 2 * density)
        mask = torch.rand(n, kh, kw, generator=gen) < weight
    else:
        mask = torch.rand(n, kh, kw, generator=gen) < density
    if kind == "empty_filters":
        mask[torch.randperm(n, generator=gen)[: max(1, n // 4)]] = False
    if kind == "reordered":
        from stripeconv.backends.triton_plans import filter_order

        mask = mask[filter_order(mask, g["groups"])]
    return mask.contiguous()


def oracle(x, w, bias, mask, g):
    """fp64 ``F.conv2d`` on the unpacked weight, asymmetric padding by ``F.pad``."""
    from stripeconv.packing import unpack_weight

    pt, pb, pl, pr = g["padding"]
    # (fp64 convs on CPU want NCHW-contiguous operands for their gradients)
    return F.conv2d(F.pad(x, (pl, pr, pt, pb)).contiguous(), unpack_weight(w, mask).contiguous(), bias, g["stride"], 0,
                    g["dilation"], g["groups"])


def error(result, expected: torch.Tensor, dtype, layout, what: str) -> str:
    """What is wrong with ``result`` of op ``what`` (empty: nothing); ``layout``: the memory format the op's
    result has, or None (grad weight: rows)."""
    if not isinstance(result, torch.Tensor):
        return f"{what}: returned {type(result).__name__}"
    if result.shape != expected.shape:
        return f"{what}: shape {list(result.shape)}, expected {list(expected.shape)}"
    if result.dtype != dtype:
        return f"{what}: dtype {result.dtype}, expected {dtype}"
    if layout is not None and result.numel() and not result.is_contiguous(memory_format=layout):
        return f"{what}: not in {str(layout).replace('torch.', '')}, the layout of its data"
    if not result.numel():
        return ""
    scale = max(1.0, float(expected.abs().max()))
    err = float((result.detach().double().cpu() - expected).abs().max())
    if not err <= TOLERANCE[dtype] * scale:  # nan fails too
        return f"{what}: max error {err:.3g}, expected at most {TOLERANCE[dtype] * scale:.3g}"
    return ""


@contextlib.contextmanager
def every_candidate(state: dict, failures: list, ran: list, pick: random.Random):
    """``gpu_select.choice`` runs every candidate (and captured variant) of a call and checks each against
    ``state["expected"][op]``, then settles on one of those that passed, drawn by ``pick``."""
    from stripeconv.backends import gpu_select

    choice = gpu_select.choice

    def run_all(key, candidates, device, captured=None):
        op, passed = key[0], []
        for kind, pool in (("", candidates), (" (captured)", captured or {})):
            for name, call in pool.items():
                ran.append(f"{op}:{name}{kind}")
                try:
                    msg = error(call(), state["expected"][op], state["dtype"], state["layouts"][op], op)
                except Exception as exc:  # report, keep going
                    msg = f"{op}: {type(exc).__name__}: {str(exc)[:300]}"
                if msg:
                    failures.append(f"{name}{kind}: {msg}")
                elif not kind:
                    passed.append(name)
        name = pick.choice(passed) if passed else next(iter(candidates))
        state["settled"][op] = name
        return name, True
    gpu_select.choice = run_all
    try:
        yield
    finally:
        gpu_select.choice = choice


@contextlib.contextmanager
def environment(g: dict):
    """The settings geometry ``g`` runs under (restored afterwards)."""
    from stripeconv.backends import _triton_shapes

    settings = {"STRIPECONV_GPU_DENSE": "auto", "STRIPECONV_DETERMINISTIC": "1" if g["deterministic"] else "0",
                "STRIPECONV_TRITON_CANDIDATES": "all"}
    with mock.patch.dict(os.environ, settings), contextlib.ExitStack() as stack:
        os.environ.pop("STRIPECONV_TRITON_BLOCK_N", None)
        if g["block_n"]:
            os.environ["STRIPECONV_TRITON_BLOCK_N"] = g["block_n"]
        if g["int64"]:
            stack.enter_context(mock.patch.object(_triton_shapes, "needs_int64", lambda *tensors: True))
        yield


def data(g: dict, mask: torch.Tensor, w: torch.Tensor, gen: torch.Generator) -> dict:
    """Random input, bias and grad_output for geometry ``g`` and packed rows ``w``, with what the oracle makes of
    them: the expected result of each op and the layout each op's result has."""
    from stripeconv.ops import output_memory_format

    dtype, memory_format = g["dtype"], torch.channels_last if g["channels_last"] else torch.contiguous_format
    x = torch.randn(g["batch"], g["in_channels"], *g["size"], generator=gen).to(dtype).contiguous(
        memory_format=memory_format)
    bias = torch.randn(g["out_channels"], generator=gen).to(dtype) if g["bias"] else None
    # The oracle sees the rounded values the kernels see.
    xr, wr = (t.detach().to(torch.float64, copy=True).requires_grad_() for t in (x, w))
    y = oracle(xr, wr, bias.double() if bias is not None else None, mask, g)
    gy = torch.randn(y.shape, generator=gen).to(dtype).contiguous(memory_format=memory_format)
    y.backward(gy.double().contiguous())
    return {"x": x, "bias": bias, "gy": gy, "dtype": dtype, "settled": {},
            "expected": {"fwd": y.detach(), "dgrad": xr.grad, "wgrad": wr.grad},
            "layouts": {"fwd": output_memory_format(x), "dgrad": output_memory_format(gy), "wgrad": None}}


SETTLED_ROUNDS = 2  # calls of the settled launches on new tensors after the candidates' sweep


def run(g: dict) -> tuple[list[str], list[str]]:
    """Every candidate of the forward and both gradients of geometry ``g``, then the launches settled on (one
    candidate that passed, drawn at random) with new tensors, as a training loop calls them: (failures,
    candidates run)."""
    from stripeconv.backends import triton_backend as tb
    from stripeconv.packing import pack_weight

    gen = torch.Generator().manual_seed(g["seed"])
    mask = make_mask(g, gen)
    dense = torch.randn(g["out_channels"], g["in_channels"] // g["groups"], *g["kernel"], generator=gen,
                        dtype=torch.float64)

    def packed():
        w = pack_weight(dense, mask).contiguous().to(g["dtype"])
        return w.t().contiguous().t() if g["weight_transposed"] else w  # the same rows, column-major
    w = packed()
    state = data(g, mask, w, gen)
    failures, ran = [], []
    args = (g["stride"], g["padding"], g["dilation"], g["groups"])

    def check(what: str, op: str, call) -> None:
        try:
            msg = error(call(), state["expected"][op], state["dtype"], state["layouts"][op], op)
        except Exception as exc:
            msg = f"{op}: {type(exc).__name__}: {str(exc)[:300]}"
        if msg:
            failures.append(f"{what} ({state['settled'].get(op, 'unsettled')}): {msg}")

    def calls(state):
        x, bias, gy = state["x"], state["bias"], state["gy"]
        return (("fwd", lambda: tb.forward(x, w, bias, mask, *args)),
                ("dgrad", lambda: tb.grad_input(gy, w, mask, list(x.shape), *args)),
                ("wgrad", lambda: tb.grad_weight(gy, x, w, mask, *args)))

    tb.clear_cache()
    with environment(g), every_candidate(state, failures, ran, random.Random(g["seed"])), \
            warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for op, call in calls(state):
            check("the first call", op, call)
        settled = state["settled"]
        for round in range(SETTLED_ROUNDS):
            if round:  # the packed rows written in place (an optimiser step): what is kept of them is made anew
                w.mul_(-0.5)
            state.update(data(g, mask, w, gen), settled=settled)  # (the dict every_candidate reads)
            (_, fwd), (_, dgrad), (_, wgrad) = calls(state)
            check(f"settled call {round + 1}", "fwd", fwd)
            check(f"settled call {round + 1}", "dgrad", dgrad)
            if round:  # grad_output written in place between the two gradients (what grad weight reuses must see it)
                state["gy"].mul_(-0.5)
                state["expected"]["wgrad"] = state["expected"]["wgrad"] * -0.5
            check(f"settled call {round + 1}", "wgrad", wgrad)
        if g["mask_update"]:  # the same mask tensor written in place (a pruning step): every plan made anew
            mask.copy_(make_mask(g, gen))
            w = packed()
            state.update(data(g, mask, w, gen))
            for op, call in calls(state):
                check("after the mask changed", op, call)
    tb.clear_cache()
    return failures, ran


def seeds(text: str) -> list[int]:
    out = []
    for part in text.split(","):
        lo, _, hi = part.partition(":")
        out.extend(range(int(lo), int(hi)) if hi else [int(lo)])
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", default="0:10", help="seeds: N, A:B (A..B-1), comma-separated (default 0:10)")
    ap.add_argument("--verbose", action="store_true", help="list every candidate run")
    ap.add_argument("--json", action="store_true", help="one JSON object a geometry (seed, geometry, candidates, "
                    "failures) instead of the text")
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") != "1":
        ap.error("run under TRITON_INTERPRET=1 (Triton's interpreter on CPU tensors)")
    torch.set_num_threads(1)
    sys.path.insert(0, HERE)
    from test_triton import _fix_interpreter_bf16_dot

    from stripeconv.backends import triton_backend

    available, unavailable = triton_backend.is_available()  # e.g. an interpreter that cannot run the kernels
    no_bf16 = _fix_interpreter_bf16_dot() if available else ""
    failed = 0
    for seed in seeds(args.seeds):
        g = geometry(seed)
        skip = unavailable if not available else (no_bf16 if g["dtype"] == torch.bfloat16 else "")
        if skip:
            print(json.dumps({"seed": seed, "skipped": skip}) if args.json else f"{describe(g)}: skipped ({skip})",
                  flush=True)
            continue
        start = time.perf_counter()
        failures, ran = run(g)
        failed += bool(failures)
        if args.json:
            print(json.dumps({"seed": seed, "geometry": describe(g), "candidates": ran, "failures": failures}),
                  flush=True)
            continue
        print(f"{describe(g)}: {len(ran)} candidates, {'FAILED' if failures else 'ok'} "
              f"({time.perf_counter() - start:.0f} s)", flush=True)
        for line in (ran if args.verbose else ()):
            print(f"    ran {line}")
        for line in failures:
            print(f"    {line}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
