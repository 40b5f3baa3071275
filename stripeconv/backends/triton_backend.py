"""Triton GPU backend of the stripe_conv2d op (kernels in :mod:`stripeconv.kernels.stripe_conv`).

Host side of the kernels: the mask-derived metadata and the launches.

Forward metadata (see DESIGN.md section 3): filters are permuted into tiles of ``BLOCK_N`` filters
of one group, chosen so that the union of the positions kept by a tile's filters is small
(filters are clustered by their position bit pattern: greedy growth of the union, or a sort by
pattern, whichever computes fewer stripes), and tiles are sorted by work (heavy tiles first).
The kernel reads the packed ``[S, C/g]`` rows in place through a ``[T, U, BLOCK_N]`` table of
row indices (-1 where a filter does not keep a position of its tile's union: a masked load of
zeros), so a call copies no weights. *Tile efficiency* = kept stripes /
stripes computed (``sum_t |union_t| * BLOCK_N``); :func:`tile_efficiency` reports it for one
width, :func:`best_tile_efficiency` for the best of the widths :func:`tile_widths` offers.

Which runs: on CUDA every call picks, per shape, the fastest of the stripe kernels at each
offered tile width and cuDNN's dense conv on the scattered weight, timed once per key by
:mod:`stripeconv.backends.gpu_select` (``STRIPECONV_GPU_DENSE`` overrides). Once that choice is
settled, a call shaped like an earlier one (same op, shapes, strides, dtypes, mask version, conv
geometry, bias or not) skips all of this: it reuses the launch worked out for the first one.

Backward metadata: the filter of each packed row; for grad input, per (output phase, group) the
chunks of packed rows of the positions whose taps line up with that phase (this depends on
stride, padding and dilation too); for grad weight, row blocks of one (position, group). Grad
input and grad weight spend no work on pruned stripes. NCHW operands are copied to channels_last
once per call (the kernels' vector loads need contiguous channels); results keep the caller's
memory format.

All metadata depends only on the mask (and groups, block sizes, conv geometry). It is cached
per mask (:mod:`._masks`: keyed on its ``(data_ptr, _version, shape, device)``, holding a
reference so that its storage cannot be recycled for another mask while cached). Building it reads the mask on the
host once (a device sync); afterwards a call does no host sync (no ``.item()``, no
``nonzero``), which keeps the steady state usable under CUDA graph capture. Triton autotunes on
the first launch of a new (shape, density bucket) key and the dense/stripe choice times its
candidates, both of which sync: run one eager step before capturing a graph.

Precision: fp16/bf16/fp32 accumulate in fp32, fp64 in fp64. fp32 inputs use TF32 tensor cores
only when ``torch.backends.cuda.matmul.allow_tf32`` is True (the matmul flag, since the op is
a GEMM; it is False by default in PyTorch), IEEE fp32 otherwise.

Grad weight is split-K over pixels. By default the splits add into one fp32 buffer with
atomics; with ``STRIPECONV_DETERMINISTIC=1`` or ``torch.use_deterministic_algorithms(True)``
every split writes its own partial buffer and the host sums them in a fixed order.

Groups: ``groups == 1`` and groups with >= 16 filters and channels per group use the tensor
core path; depthwise and small groups use an outer-product path (correct, not tuned).
"""
from __future__ import annotations

import functools
import importlib
import importlib.util
import math
import os
import sys
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..ops import output_memory_format
from . import gpu_select
from ._masks import clear, mask_key, memo

NAME = "triton"

__all__ = [
    "NAME", "is_available", "supports", "forward", "grad_input", "grad_weight",
    "tile_efficiency", "best_tile_efficiency", "tile_widths", "forward_plan", "clear_cache",
]

_kernels = None
_import_error: Optional[str] = None


def _load_kernels():
    """Import ``stripeconv.kernels.stripe_conv`` (falls back to the source tree's kernels/)."""
    global _kernels, _import_error
    if _kernels is not None or _import_error is not None:
        return _kernels
    try:
        import triton
    except Exception as exc:  # ImportError, or a broken install
        _import_error = f"triton is not importable ({exc}); pip install 'triton>=3.2'"
        return None
    try:
        _kernels = _import_kernels()
    except Exception as exc:  # e.g. triton < 3.3 without a GPU driver: its autotuner looks for one at import
        _import_error = (f"the Triton kernels failed to load with triton {triton.__version__} "
                         f"({type(exc).__name__}: {exc})")
    return _kernels


def _import_kernels():
    try:
        return importlib.import_module("stripeconv.kernels.stripe_conv")
    except ImportError:
        # Running from a source checkout without installing: kernels/ sits beside stripeconv/.
        here = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        path = os.path.join(here, "kernels", "stripe_conv.py")
        if not os.path.exists(path):
            raise ImportError("stripeconv.kernels is missing from this install; reinstall stripeconv") from None
        spec = importlib.util.spec_from_file_location("stripeconv.kernels.stripe_conv", path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        try:
            spec.loader.exec_module(module)
        except BaseException:
            sys.modules.pop(spec.name, None)
            raise
        return module


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


_interpreter_problem: Optional[str] = None


def _check_interpreter() -> str:
    """'' when this triton's interpreter runs the kernels' loops (data-dependent bounds), else why not."""
    global _interpreter_problem
    if _interpreter_problem is None:
        n, out = torch.tensor([3], dtype=torch.int32), torch.zeros(1, dtype=torch.int32)
        try:
            _kernels.interpreter_probe[(1,)](n, out)
            _interpreter_problem = "" if int(out) == 3 else f"its probe kernel counted to {int(out)}, not 3"
        except Exception as exc:  # triton 3.6 with numpy 2: loaded scalars are 1-element arrays
            _interpreter_problem = f"{type(exc).__name__}: {exc}"
        if _interpreter_problem:
            import triton

            _interpreter_problem = (f"the Triton interpreter of triton {triton.__version__} cannot run loops whose "
                                    f"bounds are loaded values ({_interpreter_problem}); triton >= 3.7 can")
    return _interpreter_problem


def is_available() -> tuple[bool, str]:
    if _load_kernels() is None:
        return False, _import_error or "triton kernels failed to load"
    if torch.cuda.is_available():
        return True, ""
    if _interpreting():
        problem = _check_interpreter()
        return not problem, problem
    return False, "no CUDA device (set TRITON_INTERPRET=1 before importing triton to run the kernels on CPU)"


def supports(device: torch.device) -> bool:
    device = torch.device(device)
    return device.type == "cuda" or (device.type == "cpu" and _interpreting())


# ----------------------------------------------------------------------------------------------
# Metadata
# ----------------------------------------------------------------------------------------------

def _next_pow2(x: int) -> int:
    return 1 << max(0, int(x) - 1).bit_length()


def default_block_n(out_per_group: int) -> int:
    """Filters per forward tile: 64 (wgmma-sized) for wide layers, smaller for narrow ones."""
    env = os.environ.get("STRIPECONV_TRITON_BLOCK_N")
    if env:
        return int(env)
    if out_per_group >= 16:
        return min(64, _next_pow2(out_per_group))
    return max(2, _next_pow2(out_per_group))


def _tiles_greedy(pat: np.ndarray, block_n: int) -> list[list[int]]:
    """Greedy clustering: seed with the heaviest free filter, add the filters that grow the
    union least (all zero-growth filters at once)."""
    nf, npos = pat.shape
    cnt = pat.sum(1)
    free = np.ones(nf, dtype=bool)
    tiles = []
    while free.any():
        idx = np.nonzero(free)[0]
        seed = idx[np.argmax(cnt[idx])]
        union = pat[seed].copy()
        members = [int(seed)]
        free[seed] = False
        while len(members) < block_n and free.any():
            idx = np.nonzero(free)[0]
            grow = (pat[idx] & ~union).sum(1)
            zero = idx[grow == 0]
            if len(zero):
                take = zero[np.argsort(-cnt[zero], kind="stable")][: block_n - len(members)]
            else:
                score = grow * (npos + 1) - cnt[idx]  # least growth, then most kept stripes
                take = idx[[int(np.argmin(score))]]
            members.extend(int(k) for k in take)
            free[take] = False
            union |= pat[take].any(0)
        tiles.append(members)
    return tiles


def _tiles_sorted(pat: np.ndarray, block_n: int) -> list[list[int]]:
    """Sort filters by bit pattern (most frequently kept position = most significant bit)."""
    nf, npos = pat.shape
    order = np.argsort(-pat.sum(0), kind="stable")
    keys = [tuple(row) for row in pat[:, order].astype(np.int8)]
    ranked = sorted(range(nf), key=lambda k: keys[k], reverse=True)
    return [ranked[s:s + block_n] for s in range(0, nf, block_n)]


def _computed(pat: np.ndarray, tiles: list[list[int]], block_n: int) -> int:
    return sum(int(pat[t].any(0).sum()) * block_n for t in tiles)


@dataclass
class ForwardPlan:
    block_n: int
    num_tiles: int
    umax: int
    tile_pos: Tensor      # [T, UMAX] int32 positions of each tile's union (padded with 0)
    tile_npos: Tensor     # [T] int32
    tile_ch: Tensor       # [T, BLOCK_N] int32 original channel of each column, -1 = padding
    tile_grp: Tensor      # [T] int32 group of each tile
    w_rows: Tensor        # [T * UMAX * BLOCK_N] int32 packed row of each (tile, union position, column), -1 = zero
    kept: int
    computed: int
    density: float
    mask_shape: tuple

    @property
    def efficiency(self) -> float:
        return self.kept / self.computed if self.computed else 1.0


@dataclass
class GradInputPlan:
    filt: Tensor          # [S] int32 filter of each packed row
    chunk_off: Tensor     # [PHASES * G + 1] int32: chunks of (phase, group) k are off[k]..off[k+1]
    chunk_r0: Tensor      # [NC] int32 packed rows r0..r1 of one position and group
    chunk_r1: Tensor
    chunk_dh: Tensor      # [NC] int32 dy row/column read, relative to the phase pixel
    chunk_dw: Tensor
    density: float


@dataclass
class GradWeightPlan:
    filt: Tensor          # [S] int32 filter of each packed row
    block_r: int
    blk_pos: Tensor       # [NB] int32 blocks of packed rows of one (position, group)
    blk_r0: Tensor
    blk_r1: Tensor
    blk_grp: Tensor
    num_blocks: int
    density: float


def _row_ids(mask_cpu: Tensor) -> np.ndarray:
    """[P, N] packed row index of every stripe (position-major), -1 where pruned."""
    n, kh, kw = mask_cpu.shape
    pm = mask_cpu.permute(1, 2, 0).reshape(kh * kw, n).numpy()
    rid = np.cumsum(pm.reshape(-1)).reshape(pm.shape) - 1
    return np.where(pm, rid, -1)


def _build_forward(mask_cpu: Tensor, groups: int, block_n: int, device) -> ForwardPlan:
    n, kh, kw = mask_cpu.shape
    npos = kh * kw
    ng = n // groups
    pat_all = mask_cpu.reshape(n, npos).numpy().astype(bool)
    rid = _row_ids(mask_cpu)
    s = int(pat_all.sum())
    tiles = []  # (group, [filters])
    for g in range(groups):
        pat = pat_all[g * ng:(g + 1) * ng]
        cand = [_tiles_sorted(pat, block_n)]
        if ng > block_n:
            cand.append(_tiles_greedy(pat, block_n))
        best = min(cand, key=lambda tl_: _computed(pat, tl_, block_n))
        tiles.extend((g, [g * ng + k for k in sorted(t)]) for t in best)
    unions = [np.nonzero(pat_all[f].any(0))[0] for _, f in tiles]
    order = sorted(range(len(tiles)), key=lambda k: -len(unions[k]))  # heavy tiles first
    num_tiles = len(tiles)
    umax = max([1] + [len(u) for u in unions])
    tile_pos = np.zeros((num_tiles, umax), dtype=np.int32)
    tile_npos = np.zeros(num_tiles, dtype=np.int32)
    tile_ch = np.full((num_tiles, block_n), -1, dtype=np.int32)
    tile_grp = np.zeros(num_tiles, dtype=np.int32)
    w_rows = np.full((num_tiles, umax, block_n), -1, dtype=np.int32)
    computed = 0
    for t, k in enumerate(order):
        g, filters = tiles[k]
        u = unions[k]
        tile_pos[t, :len(u)] = u
        tile_npos[t] = len(u)
        tile_ch[t, :len(filters)] = filters
        tile_grp[t] = g
        if len(u):
            r = rid[np.ix_(u, filters)]  # [U, F]
            w_rows[t, :len(u), :len(filters)] = r
        computed += len(u) * block_n

    def dev(a):
        return torch.from_numpy(np.ascontiguousarray(a)).to(device)

    return ForwardPlan(
        block_n=block_n, num_tiles=num_tiles, umax=umax, tile_pos=dev(tile_pos), tile_npos=dev(tile_npos),
        tile_ch=dev(tile_ch), tile_grp=dev(tile_grp), w_rows=dev(w_rows.reshape(-1)), kept=s,
        computed=computed, density=s / max(1, n * npos), mask_shape=(n, kh, kw),
    )


def _segments(mask_cpu: Tensor, groups: int) -> tuple[np.ndarray, np.ndarray]:
    """(filter of each packed row, [P, G + 1] row offsets of each (position, group))."""
    n, kh, kw = mask_cpu.shape
    npos = kh * kw
    pm = mask_cpu.permute(1, 2, 0).reshape(npos, n).numpy().astype(bool)  # [P, N]
    filt = np.nonzero(pm)[1].astype(np.int32)  # row-major over (p, n): the packed order
    per_group = pm.reshape(npos, groups, n // groups).sum(2)  # [P, G]
    starts = np.concatenate([[0], np.cumsum(pm.sum(1))])[:-1]
    seg = np.zeros((npos, groups + 1), dtype=np.int64)
    seg[:, 0] = starts
    seg[:, 1:] = starts[:, None] + np.cumsum(per_group, 1)
    return filt, seg


def _dev(a: np.ndarray, device, dtype=np.int32) -> Tensor:
    a = np.asarray(a, dtype=dtype).reshape(-1)
    return torch.from_numpy(np.ascontiguousarray(a if len(a) else np.zeros(1, dtype))).to(device)


def _build_grad_input(mask_cpu: Tensor, groups: int, block: int, conv: tuple, device) -> GradInputPlan:
    (sh, sw), (pt, pl), (dh, dw) = conv
    n, kh, kw = mask_cpu.shape
    filt, seg = _segments(mask_cpu, groups)
    chunks, offsets = [], [0]
    for rh in range(sh):
        for rw in range(sw):
            # Taps of position (i, j) line up with this phase iff (rh + pt - i*dh) % sh == 0 (and
            # likewise for w); then they read dy at (hp + oh, wp + ow) for every phase pixel.
            for g in range(groups):
                for p in range(kh * kw):
                    i, j = divmod(p, kw)
                    th, tw = rh + pt - i * dh, rw + pl - j * dw
                    if th % sh or tw % sw:
                        continue
                    a, b = int(seg[p, g]), int(seg[p, g + 1])
                    chunks.extend((r0, min(b, r0 + block), th // sh, tw // sw) for r0 in range(a, b, block))
                offsets.append(len(chunks))
    ch = np.array(chunks, dtype=np.int64).reshape(-1, 4)
    return GradInputPlan(
        filt=_dev(filt, device), chunk_off=_dev(offsets, device), chunk_r0=_dev(ch[:, 0], device),
        chunk_r1=_dev(ch[:, 1], device), chunk_dh=_dev(ch[:, 2], device), chunk_dw=_dev(ch[:, 3], device),
        density=len(filt) / max(1, mask_cpu.numel()),
    )


def _build_grad_weight(mask_cpu: Tensor, groups: int, block: int, conv: tuple, device) -> GradWeightPlan:
    filt, seg = _segments(mask_cpu, groups)
    blocks = []
    for p in range(seg.shape[0]):
        for g in range(groups):
            a, b = int(seg[p, g]), int(seg[p, g + 1])
            blocks.extend((p, r0, min(b, r0 + block), g) for r0 in range(a, b, block))
    blk = np.array(blocks, dtype=np.int64).reshape(-1, 4)
    return GradWeightPlan(
        filt=_dev(filt, device), block_r=block, blk_pos=_dev(blk[:, 0], device), blk_r0=_dev(blk[:, 1], device),
        blk_r1=_dev(blk[:, 2], device), blk_grp=_dev(blk[:, 3], device), num_blocks=len(blk),
        density=len(filt) / max(1, mask_cpu.numel()),
    )


@dataclass
class DensePlan:
    scatter: Tensor       # [N * kh * kw] int64 packed row of each (filter, position), S = pruned
    gather: Tensor        # [S] int64 (filter, position) of each packed row


def _build_dense(mask_cpu: Tensor, groups: int, block: int, conv: tuple, device) -> DensePlan:
    n, kh, kw = mask_cpu.shape
    rid = _row_ids(mask_cpu).T.reshape(-1)  # [N * P]: (filter, position) order
    s = int(mask_cpu.sum())
    return DensePlan(scatter=_dev(np.where(rid >= 0, rid, s), device, np.int64),
                     gather=_dev(np.argsort(np.where(rid >= 0, rid, s), kind="stable")[:s], device, np.int64))


_BUILDERS = {"fwd": lambda m, g, b, conv, d: _build_forward(m, g, b, d),
             "dgrad": _build_grad_input, "wgrad": _build_grad_weight, "dense": _build_dense}


def _cached(kind: str, mask: Tensor, groups: int, block: int, device, conv: tuple = ()):
    def build():
        mask_cpu = mask.detach().to("cpu", torch.bool).contiguous()  # the one host sync per mask
        return _BUILDERS[kind](mask_cpu, groups, block, conv, device)
    return memo((kind, *mask_key(mask), groups, block, str(device), conv), mask, build)


def clear_cache() -> None:
    """Drop all cached mask metadata and settled calls."""
    clear()
    _settled.clear()


def forward_plan(mask: Tensor, groups: int = 1, block_n: Optional[int] = None, device=None) -> ForwardPlan:
    """The (cached) forward tile plan of ``mask`` (index tensors on ``device``, default the mask's)."""
    ng = mask.shape[0] // groups
    return _cached("fwd", mask, groups, block_n or default_block_n(ng), device or mask.device)


def tile_efficiency(mask: Tensor, block_n: Optional[int] = None, groups: int = 1) -> float:
    """Kept stripes / stripes computed by the forward kernel for ``mask`` (1.0 = no waste)."""
    return forward_plan(mask, groups, block_n).efficiency


# ----------------------------------------------------------------------------------------------
# Launch helpers
# ----------------------------------------------------------------------------------------------

def _precision(dtype: torch.dtype):
    tl = _kernels.tl
    if dtype == torch.float64:
        return "ieee", tl.float64
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32 and not _interpreting():
        return "tf32", tl.float32
    return "ieee", tl.float32


def _keys(m: int, c: int, n: int, density: float, kh: int, kw: int, stride) -> dict:
    return dict(
        KEY_M=_next_pow2(max(1, m)), KEY_C=c, KEY_N=n, KEY_DENSITY=int(round(density * 8)),
        KEY_CONV=((kh * 16 + kw) * 16 + stride[0]) * 16 + stride[1],
    )


def _out_hw(h, w, kh, kw, stride, padding, dilation):
    pt, pb, pl, pr = padding
    ho = (h + pt + pb - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    wo = (w + pl + pr - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    return max(ho, 0), max(wo, 0)


def _like_input(shape, ref: Tensor, dtype=None) -> Tensor:
    """New tensor in ``ref``'s memory format (channels_last when ``ref`` is)."""
    return torch.empty(shape, dtype=dtype or ref.dtype, device=ref.device, memory_format=output_memory_format(ref))


def _deterministic() -> bool:
    return os.environ.get("STRIPECONV_DETERMINISTIC", "0") not in ("", "0") or torch.are_deterministic_algorithms_enabled()


_sm_count: dict = {}


def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 4
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _sm_count:
        _sm_count[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _sm_count[idx]


def _check_kernels():
    if _load_kernels() is None:
        raise RuntimeError(f"stripeconv backend 'triton' is not available: {_import_error}")
    return _kernels


def _needs_int64(*tensors: Tensor) -> bool:
    """Whether element offsets into any of ``tensors`` can exceed int32."""
    return any(_max_offset(t) >= 2**31 - 1 for t in tensors)


def _max_offset(t: Tensor) -> int:
    if t.numel() == 0:
        return 0
    if t.is_contiguous() or t.is_contiguous(memory_format=torch.channels_last):
        return t.numel() - 1  # dense: the offsets are 0 .. numel - 1
    return sum((d - 1) * abs(s) for d, s in zip(t.shape, t.stride()))


def _conv_ints(stride, padding, dilation):
    return [int(v) for v in stride], [int(v) for v in padding], [int(v) for v in dilation]


# ----------------------------------------------------------------------------------------------
# The op's kernels
# ----------------------------------------------------------------------------------------------

def tile_widths(mask: Tensor, groups: int = 1, device=None) -> list[int]:
    """Filter-tile widths worth timing for ``mask``, the default first (64 for wide layers).

    Half and quarter widths (not below 16, the smallest tensor-core tile) join when each computes
    at least 10 % fewer stripes than the widths before it: random masks, whose tiles' position
    unions shrink with the tile, and channel counts that a wide tile pads (45 filters in one
    64-wide tile compute 64 columns, in three 16-wide tiles 48). 128 joins for dense-ish masks
    when it computes at most 5 % more than 64: wider wgmma tiles reuse each input tile more.
    """
    ng = mask.shape[0] // groups
    device = device or mask.device
    default = default_block_n(ng)
    if os.environ.get("STRIPECONV_TRITON_BLOCK_N") or default < 16:
        return [default]
    computed = lambda w: forward_plan(mask, groups, w, device).computed  # noqa: E731
    widths, best = [default], computed(default)
    for w in (default // 2, default // 4):
        if w >= 16 and computed(w) < 0.9 * best:
            widths.append(w)
            best = computed(w)
    if default == 64 and ng >= 128 and computed(128) <= 1.05 * computed(64):
        widths.append(128)
    return widths


def _forward_plans(mask: Tensor, groups: int, device) -> list[ForwardPlan]:
    """The plans of :func:`tile_widths`, in its order: one cache lookup a call instead of one a width."""
    key = ("fwd_widths", *mask_key(mask), groups, str(device), os.environ.get("STRIPECONV_TRITON_BLOCK_N"))
    return memo(key, mask, lambda: [forward_plan(mask, groups, w, device) for w in tile_widths(mask, groups, device)])


def best_tile_efficiency(mask: Tensor, groups: int = 1) -> float:
    """Kept / computed stripes of the forward kernel at the tile width that computes the fewest
    (1.0 = no waste). Host-only: needs neither triton nor a GPU."""
    if not bool(mask.any()):
        return 1.0
    computed = min(forward_plan(mask, groups, w).computed for w in tile_widths(mask, groups))
    return int(mask.sum()) / computed


class _TunedLaunch:
    """``kernel[grid](*args, **constants)`` for one settled call signature.

    The first launch goes through the autotuner, which picks (or benchmarks) the configuration for
    the signature's tuning key. Later launches pass that configuration to the JIT function
    directly: the tuner's per-launch key (a dict over every argument, the dtype of each tensor)
    costs ~20 us of host time, more than the rest of a settled call. The key is fixed for the
    signature, so the tuner would pick the same configuration again.
    """

    __slots__ = ("name", "grid", "constants", "_direct")

    def __init__(self, name: str, grid, constants: dict):
        self.name, self.grid, self.constants = name, grid, constants
        self._direct = None  # (autotuner, jit function, configuration kwargs)

    def __call__(self, *args) -> None:
        kernel = getattr(_kernels, self.name)  # looked up per call: tools may stand in for the kernels
        direct = self._direct
        if direct is not None and direct[0] is kernel:
            direct[1][self.grid](*args, **self.constants, **direct[2])
            return
        kernel[self.grid](*args, **self.constants)
        config, jit = getattr(kernel, "best_config", None), getattr(kernel, "fn", None)
        if jit is not None and hasattr(config, "all_kwargs") and getattr(config, "pre_hook", None) is None:
            self._direct = (kernel, jit, config.all_kwargs())


def _stripe_launcher(plan: ForwardPlan, input: Tensor, weight: Tensor, bias: Optional[Tensor], stride, padding,
                     dilation, out_hw) -> Callable[[Tensor, Tensor, Optional[Tensor]], Tensor]:
    """The forward on ``plan``'s tiles for every call shaped like this one (shapes, strides, dtype,
    bias or not): all launch arguments but the tensors are worked out here, once."""
    b, c, h, w = input.shape
    n, kh, kw = plan.mask_shape
    ho, wo = out_hw
    out_shape, out_format = (b, n, ho, wo), output_memory_format(input)

    if plan.kept == 0:  # every stripe pruned: the output is the bias (and a launch would have no rows to read)
        def bias_only(input, weight, bias):
            out = torch.empty(out_shape, dtype=input.dtype, device=input.device, memory_format=out_format)
            return out.zero_() if bias is None else out.copy_(bias.view(1, n, 1, 1).expand_as(out))
        return bias_only

    cg = weight.shape[1]
    m = b * ho * wo
    bn = plan.block_n
    use_dot = bn >= 16
    block_k = max(16, min(64, _next_pow2(cg))) if use_dot else 1
    copy_input = not input.is_contiguous(memory_format=torch.channels_last)
    x = _meta_like(input, copy_input)
    out = torch.empty(out_shape, device="meta", memory_format=out_format)
    tables = (plan.tile_pos, plan.tile_npos, plan.tile_ch, plan.tile_grp, plan.w_rows)
    scalars = (b, h, w, ho, wo, cg, plan.num_tiles, plan.umax, *x.stride(), *out.stride(),
               stride[0], stride[1], padding[0], padding[2], dilation[0], dilation[1], kw)
    precision, acc = _precision(input.dtype)
    constants = dict(
        **_keys(m, c, n, plan.density, kh, kw, stride),
        HAS_BIAS=bias is not None, USE_DOT=use_dot, INPUT_PRECISION=precision, ACC_DTYPE=acc,
        EVEN_K=cg % block_k == 0, INT64_INDEX=_needs_int64(x, out, torch.empty(weight.shape, device="meta")),
        BLOCK_N=bn, BLOCK_K=block_k,
    )
    kernel = _TunedLaunch("stripe_fwd_kernel", lambda meta: (triton_cdiv(m, meta["BLOCK_M"]) * plan.num_tiles,),
                          constants)

    def launch(input, weight, bias):
        x = input.contiguous(memory_format=torch.channels_last) if copy_input else input
        out = torch.empty(out_shape, dtype=input.dtype, device=input.device, memory_format=out_format)
        # The kernel addresses packed rows as row * CG; the bias pointer is unused without a bias.
        kernel(x, weight.contiguous(), out if bias is None else bias.contiguous(), out, *tables, *scalars)
        return out
    return launch


def _symmetric(padding) -> bool:
    return padding[0] == padding[1] and padding[2] == padding[3]


def _dense_weight(weight: Tensor, mask: Tensor, device) -> Tensor:
    """Packed rows -> dense [N, C/g, kh, kw] weight (memory in [N, kh, kw, C/g] order), sync-free."""
    n, kh, kw = mask.shape
    index = _cached("dense", mask, 1, 0, device).scatter
    cg = weight.shape[1]
    w_pad = torch.cat([weight, weight.new_zeros(1, cg)])
    return w_pad.index_select(0, index).view(n, kh, kw, cg).permute(0, 3, 1, 2)


def _select_key(op: str, *tensors: Tensor, extra: tuple = ()) -> tuple:
    return (op, *[(tuple(t.shape), t.dtype, t.is_contiguous(memory_format=torch.channels_last), str(t.device))
                  for t in tensors], *extra)


def _dense_launcher(mask: Tensor, stride, padding, dilation, groups: int, device) -> Callable:
    """cuDNN's dense conv on the packed rows scattered into a dense weight."""
    def launch(input, weight, bias):
        return F.conv2d(input, _dense_weight(weight, mask, device), bias, stride, (padding[0], padding[2]), dilation,
                        groups)
    return launch


# Settled calls: per call signature (op, shapes, strides, dtypes, mask version, conv geometry and
# the settings the choice depends on), what the call runs, worked out once: tile plan, stripe /
# dense choice and every launch argument but the tensors. A batch-1 layer's kernels take ~10 us,
# so the host work of a call matters. Each entry holds its mask, whose data_ptr is in the key, so
# that no other mask can take that address while the entry exists.
_SETTLED_SIZE = 1024
_settled: dict[tuple, tuple[Tensor, Callable]] = {}


def _call_key(op: str, mask: Tensor, tensors: tuple, extra: tuple) -> tuple:
    return (op, *[(t.shape, t.stride(), t.dtype, t.device) for t in tensors], mask.data_ptr(), mask._version,
            mask.shape, *extra, gpu_select.mode(), gpu_select.generation(), torch.backends.cuda.matmul.allow_tf32)


def _run_chosen(key: tuple, mask: Tensor, launchers: dict[str, Callable], select_key: tuple, args: tuple, device):
    """Run the launcher :mod:`.gpu_select` picks for ``select_key``; remember it for ``key`` once settled."""
    candidates = {name: functools.partial(launch, *args) for name, launch in launchers.items()}
    name, settled = gpu_select.choice(select_key, candidates, device)
    if settled:
        if len(_settled) >= _SETTLED_SIZE:
            _settled.clear()
        _settled[key] = (mask, launchers[name])
    return launchers[name](*args)


def forward(
    input: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    mask: Tensor,
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    groups: int,
) -> Tensor:
    key = _call_key("fwd", mask, (input,), (weight.shape, bias is None, tuple(stride), tuple(padding),
                                            tuple(dilation), groups, os.environ.get("STRIPECONV_TRITON_BLOCK_N")))
    settled = _settled.get(key)
    if settled is not None:
        return settled[1](input, weight, bias)
    _check_kernels()
    stride, padding, dilation = _conv_ints(stride, padding, dilation)
    b, c, h, w = input.shape
    n, kh, kw = mask.shape
    ho, wo = _out_hw(h, w, kh, kw, stride, padding, dilation)
    if b * n * ho * wo == 0:
        return _like_input((b, n, ho, wo), input)
    device = input.device
    launchers, counts = {}, []
    for plan in _forward_plans(mask, groups, device):
        counts.append((plan.block_n, plan.kept, plan.computed))
        launchers[f"stripe{plan.block_n}"] = _stripe_launcher(plan, input, weight, bias, stride, padding, dilation,
                                                              (ho, wo))
    if _symmetric(padding):
        launchers["dense"] = _dense_launcher(mask, stride, padding, dilation, groups, device)
    select_key = _select_key("fwd", input, weight, extra=(bias is not None, tuple(stride), tuple(padding),
                                                           tuple(dilation), groups, tuple(counts)))
    return _run_chosen(key, mask, launchers, select_key, (input, weight, bias), device)


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _use_dot_backward(cg: int, ng: int) -> bool:
    return cg >= 16 and ng >= 16


def _meta_like(t: Tensor, copy_to_nhwc: bool) -> Tensor:
    """What a launch will see of ``t``: ``t`` itself, or (meta, no memory) its channels_last copy.

    The kernels read NHWC tiles (channels contiguous, vector loads); strided NCHW gathers cost more
    registers than they are worth, so NCHW operands are copied once per call. Outputs keep the
    caller's memory format."""
    return torch.empty(t.shape, device="meta", memory_format=torch.channels_last) if copy_to_nhwc else t


def grad_input(
    grad_output: Tensor,
    weight: Tensor,
    mask: Tensor,
    input_shape: Sequence[int],
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    groups: int,
) -> Tensor:
    key = _call_key("dgrad", mask, (grad_output,), (weight.shape, tuple(input_shape), tuple(stride), tuple(padding),
                                                   tuple(dilation), groups))
    settled = _settled.get(key)
    if settled is not None:
        return settled[1](grad_output, weight)
    _check_kernels()
    stride, padding, dilation = _conv_ints(stride, padding, dilation)
    input_shape = [int(v) for v in input_shape]
    device = grad_output.device
    launchers = {"stripe": _grad_input_launcher(grad_output, weight, mask, input_shape, stride, padding, dilation,
                                                groups)}
    if _symmetric(padding) and grad_output.numel() and math.prod(input_shape):
        def dense(grad_output, weight):
            w_dense = _dense_weight(weight, mask, device)
            dx = torch.nn.grad.conv2d_input(input_shape, w_dense, grad_output, stride, (padding[0], padding[2]),
                                            dilation, groups)
            return dx.contiguous(memory_format=output_memory_format(grad_output))
        launchers["dense"] = dense
    select_key = _select_key("dgrad", grad_output, weight, extra=(tuple(input_shape), tuple(stride), tuple(padding),
                                                                  tuple(dilation), groups))
    return _run_chosen(key, mask, launchers, select_key, (grad_output, weight), device)


def _grad_input_launcher(grad_output, weight, mask, input_shape, stride, padding, dilation, groups) -> Callable:
    """Grad input by the stripe kernel for every call shaped like this one: ``launch(grad_output, weight)``."""
    b, c, h, w = input_shape
    n, kh, kw = mask.shape
    cg, ng = c // groups, n // groups
    ho, wo = grad_output.shape[2:]
    dx_shape, dx_format = (b, c, h, w), output_memory_format(grad_output)
    if math.prod(dx_shape) == 0 or grad_output.numel() == 0 or weight.shape[0] == 0:
        def no_work(grad_output, weight):
            dx = torch.empty(dx_shape, dtype=grad_output.dtype, device=grad_output.device, memory_format=dx_format)
            return dx.zero_() if dx.numel() else dx
        return no_work
    use_dot = _use_dot_backward(cg, ng)
    block_n = max(16, min(64, _next_pow2(cg))) if use_dot else min(16, _next_pow2(cg))
    block_k = 32 if use_dot else 1
    # The scalar path walks the rows of a chunk one by one: one chunk per (phase, position, group).
    chunk = block_k if use_dot else 1 << 30
    conv = (tuple(stride), (padding[0], padding[2]), tuple(dilation))
    plan = _cached("dgrad", mask, groups, chunk, grad_output.device, conv)
    ncb = triton_cdiv(cg, block_n)
    sh, sw = stride
    mp_max = b * triton_cdiv(h, sh) * triton_cdiv(w, sw)
    copy_dy = not grad_output.is_contiguous(memory_format=torch.channels_last)
    dy = _meta_like(grad_output, copy_dy)
    # Computed in NHWC (strided NCHW stores of the gathered tiles spill) and copied once if needed.
    dx = torch.empty(dx_shape, device="meta", memory_format=torch.channels_last)
    tables = (plan.chunk_off, plan.chunk_r0, plan.chunk_r1, plan.chunk_dh, plan.chunk_dw, plan.filt)
    scalars = (b, h, w, ho, wo, cg, groups, ncb, *dy.stride(), *dx.stride(), sh, sw)
    precision, acc = _precision(grad_output.dtype)
    constants = dict(
        **_keys(b * h * w, c, n, plan.density, kh, kw, stride),
        USE_DOT=use_dot, INPUT_PRECISION=precision, ACC_DTYPE=acc,
        INT64_INDEX=_needs_int64(dy, torch.empty(weight.shape, device="meta"), dx),
        BLOCK_N=block_n, BLOCK_K=block_k,
    )
    kernel = _TunedLaunch("stripe_dgrad_kernel",
                          lambda meta: (triton_cdiv(mp_max, meta["BLOCK_M"]) * groups * ncb, sh * sw), constants)

    def launch(grad_output, weight):
        dy = grad_output.contiguous(memory_format=torch.channels_last) if copy_dy else grad_output
        dx = torch.empty(dx_shape, dtype=dy.dtype, device=dy.device, memory_format=torch.channels_last)
        # The kernel addresses packed rows as row * CG.
        kernel(dy, weight.contiguous(), dx, *tables, *scalars)
        return dx if dx_format == torch.channels_last else dx.contiguous(memory_format=dx_format)
    return launch


def grad_weight(
    grad_output: Tensor,
    input: Tensor,
    weight: Tensor,
    mask: Tensor,
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    groups: int,
) -> Tensor:
    deterministic = _deterministic()
    key = _call_key("wgrad", mask, (grad_output, input), (weight.shape, weight.dtype, tuple(stride), tuple(padding),
                                                          tuple(dilation), groups, deterministic))
    settled = _settled.get(key)
    if settled is not None:
        return settled[1](grad_output, input, weight)
    _check_kernels()
    stride, padding, dilation = _conv_ints(stride, padding, dilation)
    device = input.device
    launchers = {"stripe": _grad_weight_launcher(grad_output, input, weight, mask, stride, padding, dilation, groups,
                                                 deterministic)}
    if _symmetric(padding) and weight.shape[0] and grad_output.numel() and input.numel():
        n, kh, kw = mask.shape

        def dense(grad_output, input, weight):
            dw = torch.nn.grad.conv2d_weight(input, (n, weight.shape[1], kh, kw), grad_output, stride,
                                             (padding[0], padding[2]), dilation, groups)
            gather = _cached("dense", mask, 1, 0, device).gather
            return dw.permute(0, 2, 3, 1).reshape(-1, weight.shape[1]).index_select(0, gather).to(weight.dtype)
        launchers["dense"] = dense
    select_key = _select_key("wgrad", grad_output, input, weight, extra=(tuple(stride), tuple(padding),
                                                                         tuple(dilation), groups, deterministic))
    return _run_chosen(key, mask, launchers, select_key, (grad_output, input, weight), device)


def _grad_weight_launcher(grad_output, input, weight, mask, stride, padding, dilation, groups,
                          deterministic: bool) -> Callable:
    """Grad weight by the stripe kernel for every call shaped like this one: ``launch(grad_output, input, weight)``."""
    b, c, h, w = input.shape
    n, kh, kw = mask.shape
    cg, ng = c // groups, n // groups
    ho, wo = grad_output.shape[2:]
    s = weight.shape[0]
    m = b * ho * wo
    if s == 0 or cg == 0 or m == 0:
        return lambda grad_output, input, weight: torch.zeros_like(weight, memory_format=torch.contiguous_format)
    use_dot = _use_dot_backward(cg, ng)
    block_r = 64 if use_dot else min(4, _next_pow2(ng))
    plan = _cached("wgrad", mask, groups, block_r, input.device)
    block_c = max(16, min(64, _next_pow2(cg))) if use_dot else min(4, _next_pow2(cg))
    ncb = triton_cdiv(cg, block_c)
    tiles = plan.num_blocks * ncb
    acc_torch = torch.float64 if weight.dtype == torch.float64 else torch.float32
    # Split-K over pixels so that the grid fills the GPU (>= ~4 programs per SM).
    target = 4 * _num_sms(input.device)
    split = max(1, min(triton_cdiv(target, max(1, tiles)), triton_cdiv(m, 512)))
    if deterministic:  # bound the partial buffers to ~256 MiB
        split = max(1, min(split, (256 << 20) // max(1, s * cg * 4)))
    chunk = triton_cdiv(triton_cdiv(m, split), 256) * 256
    split = triton_cdiv(m, chunk)
    atomic = split > 1 and not deterministic
    # Atomics add into one zeroed buffer; otherwise each split writes its own slice, summed below.
    buf_shape, zeroed = ((s, cg), True) if atomic or split == 1 else ((split, s, cg), False)
    copy_dy = not grad_output.is_contiguous(memory_format=torch.channels_last)
    copy_x = not input.is_contiguous(memory_format=torch.channels_last)
    dy, x = _meta_like(grad_output, copy_dy), _meta_like(input, copy_x)
    tables = (plan.blk_pos, plan.blk_r0, plan.blk_r1, plan.blk_grp, plan.filt)
    scalars = (b, h, w, ho, wo, cg, ncb, chunk, s * cg, *dy.stride(), *x.stride(),
               stride[0], stride[1], padding[0], padding[2], dilation[0], dilation[1], kw)
    precision, acc = _precision(input.dtype)
    constants = dict(
        **_keys(m, c, n, plan.density, kh, kw, stride),
        ATOMIC=atomic, USE_DOT=use_dot, INPUT_PRECISION=precision, ACC_DTYPE=acc,
        INT64_INDEX=_needs_int64(dy, x, torch.empty(buf_shape, device="meta")),
        BLOCK_R=block_r, BLOCK_C=block_c,
    )
    kernel = _TunedLaunch("stripe_wgrad_kernel", (tiles, split), constants)

    def launch(grad_output, input, weight):
        dy = grad_output.contiguous(memory_format=torch.channels_last) if copy_dy else grad_output
        x = input.contiguous(memory_format=torch.channels_last) if copy_x else input
        buf = (torch.zeros if zeroed else torch.empty)(buf_shape, dtype=acc_torch, device=weight.device)
        kernel(dy, x, buf, *tables, *scalars)
        if buf.dim() == 3:
            buf = buf.sum(0)
        return buf.to(weight.dtype)
    return launch
