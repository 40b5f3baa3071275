"""Autotuning configurations and keys of the kernels, and how the tuner times them."""
from __future__ import annotations

import inspect
import os

import triton


INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def _cfg(block_m: int, warps: int, stages: int) -> "triton.Config":
    return triton.Config({"BLOCK_M": block_m}, num_warps=warps, num_stages=stages)


if INTERPRET:
    # One config: the interpreter runs programs one by one in Python, so few large programs
    # are fastest, and a single config skips benchmarking.
    FWD_CONFIGS = [_cfg(128, 4, 1)]
    SUB_FWD_CONFIGS = [_cfg(128, 4, 1)]
    DGRAD_CONFIGS = [_cfg(128, 4, 1)]
    DGRAD_TILES_CONFIGS = DGRAD_CONFIGS
    WGRAD_CONFIGS = [_cfg(128, 4, 1)]
    WGRAD_TILES_CONFIGS = WGRAD_CONFIGS
    TMA_FWD_CONFIGS = [triton.Config({}, num_warps=4, num_stages=1)]
else:
    # The last two of the staged ones depend on the pixel count (fwd_configs_for): BLOCK_M = 256 for many,
    # 32 for few. One stage (the input through L1, no asynchronous copies) only for the channel-major loop.
    FWD_CONFIGS = [_cfg(128, 4, 3), _cfg(128, 8, 3), _cfg(64, 4, 4), _cfg(256, 8, 3), _cfg(32, 4, 4),
                   _cfg(128, 4, 1), _cfg(128, 8, 1), _cfg(64, 4, 1)]
    # SUB subtiles hold SUB * BLOCK_N <= 128 accumulator columns: a 128-wide tile's registers
    SUB_FWD_CONFIGS = [_cfg(128, 8, 3), _cfg(64, 4, 4), _cfg(64, 8, 3)]
    DGRAD_CONFIGS = [_cfg(128, 4, 3), _cfg(128, 8, 3), _cfg(64, 4, 4)]
    # ... and one stage (dy through L1) only where the launch asks for it (through_l1_configs_for)
    DGRAD_TILES_CONFIGS = DGRAD_CONFIGS + [_cfg(128, 4, 1), _cfg(128, 8, 1), _cfg(64, 4, 1)]
    WGRAD_CONFIGS = [_cfg(64, 4, 3), _cfg(128, 8, 3), _cfg(32, 4, 4)]
    # The tile grad weight's last one holds accumulators that four warps cannot (wgrad_tiles_configs_for)
    WGRAD_TILES_CONFIGS = WGRAD_CONFIGS + [_cfg(64, 8, 3)]
    # The host fixes the TMA forward's pixel rectangle (the input descriptor's box): only warps and stages vary.
    TMA_FWD_CONFIGS = [triton.Config({}, num_warps=w, num_stages=s) for w, s in ((8, 3), (4, 3), (8, 4))]

# Autotuning key: shape buckets and density bucket are passed as (otherwise unused) integer
# arguments so the key stays small; tensor dtypes are added to the key by triton itself. The
# block sizes and code paths a launch fixes are part of each kernel's key too: the forward's tile
# widths (BLOCK_N 16..128) share every KEY_*, as do grouped and ungrouped layers of one shape,
# and a configuration tuned for one of them can spill, be slow or not fit in shared memory for
# another (an OutOfResources raised outside the tuner, where nothing catches it).
TUNE_KEY = ["KEY_M", "KEY_C", "KEY_N", "KEY_DENSITY", "KEY_CONV"]
_PATH_KEY = ["USE_DOT", "INPUT_PRECISION", "INT64_INDEX"]
FWD_KEY = TUNE_KEY + _PATH_KEY + ["BLOCK_N", "BLOCK_K", "STORE", "NPOS", "ROW_RUNS", "SPLIT_K", "CHANNEL_MAJOR"]
SUB_FWD_KEY = TUNE_KEY + ["INPUT_PRECISION", "INT64_INDEX", "BLOCK_N", "BLOCK_K", "STORE", "SUB"]
DGRAD_KEY = TUNE_KEY + _PATH_KEY + ["BLOCK_N", "BLOCK_K"]
WGRAD_KEY = TUNE_KEY + _PATH_KEY + ["BLOCK_R", "BLOCK_C", "ATOMIC"]
DGRAD_TILES_KEY = TUNE_KEY + ["INPUT_PRECISION", "INT64_INDEX", "BLOCK_N", "BLOCK_T", "ROW_RUNS", "BY_POSITION", "RUN",
                               "THROUGH_L1"]
TMA_FWD_KEY = TUNE_KEY + ["INPUT_PRECISION", "BLOCK_N", "BLOCK_K", "STORE", "NPOS", "ROW_RUNS", "SH", "SW", "BLOCK_M",
                          "TW"]
TMA_DGRAD_KEY = TUNE_KEY + ["INPUT_PRECISION", "BLOCK_N", "BLOCK_T", "ROW_RUNS", "BLOCK_M", "TW"]
WGRAD_TILES_KEY = TUNE_KEY + ["INPUT_PRECISION", "INT64_INDEX", "BLOCK_T", "BLOCK_C", "ATOMIC", "PER", "BY_POSITION",
                                "RUN"]
TMA_WGRAD_KEY = TUNE_KEY + ["INPUT_PRECISION", "BLOCK_T", "BLOCK_C", "ATOMIC", "SH", "SW", "DY_ROWS", "BLOCK_M", "TW"]
# The KEY_* arguments are never read, but Triton compiles a new variant of a kernel whenever an
# integer argument is 1 or changes its divisibility by 16: exempt them (half of the compiles of
# a benchmark suite). Every other integer keeps its specialisation, which decides vector widths
# and index arithmetic (Wo divisible by 16, T or G equal to 1).
UNSPECIALISED = TUNE_KEY


# A forward over few output pixels (batch 1, the late layers of a CIFAR net) has few [BLOCK_M, BLOCK_N]
# programs: at 16x16 pixels and 128 filters in 64-wide tiles, 4 of them with BLOCK_M = 128, on a GPU
# of 132 multiprocessors. There BLOCK_M = 32 (mma.sync, not wgmma) makes 4x as many; BLOCK_M = 256
# makes half as many. The tuner times either for the shapes it suits.
SMALL_M = 4096


def fwd_configs_for(configs, named_args: dict, **kwargs) -> list:
    """The forward's configurations worth timing for a launch (the autotuner's early prune): for the
    channel-major loop (``CHANNEL_MAJOR``) the one-stage ones, whose input loads go through L1 (Triton
    stages copies with cp.async.cg, which bypasses it), and the staged ones otherwise; of those, by the
    pixel count (``KEY_M``, a power of two), BLOCK_M = 32 up to :data:`SMALL_M` pixels, BLOCK_M = 256 above."""
    get = {**named_args, **kwargs}.get
    m = get("KEY_M")
    if m is None or len(configs) == 1:
        return list(configs)
    kept = _by_stages(configs, bool(get("CHANNEL_MAJOR")))
    if kept[0].num_stages > 1:
        small = m <= SMALL_M
        kept = [c for c in kept if c.kwargs["BLOCK_M"] != (256 if small else 32)]
    return kept or list(configs)


def _by_stages(configs, one_stage: bool) -> list:
    """The one-stage configurations of ``configs`` (loads through L1), or the staged ones; all of them where
    the list holds none of the kind asked for (as the tools make it)."""
    return [c for c in configs if (c.num_stages == 1) == one_stage] or list(configs)


def through_l1_configs_for(configs, named_args: dict, **kwargs) -> list:
    """The one-stage configurations for a launch that reads through L1 (``THROUGH_L1``: Triton's staged copies,
    cp.async.cg, bypass it), the staged ones for any other (the tile grad input's early prune)."""
    return _by_stages(configs, bool({**named_args, **kwargs}.get("THROUGH_L1")))


def tma_configs_for(configs, named_args: dict, **kwargs) -> list:
    """The TMA forward's configurations worth timing: 4 warps hold at most a 128 x 64 fp32 accumulator
    without spilling (the early prune)."""
    block = kwargs.get("BLOCK_M", named_args.get("BLOCK_M")) * kwargs.get("BLOCK_N", named_args.get("BLOCK_N"))
    kept = [c for c in configs if c.num_warps >= 8 or block <= 128 * 64]
    return kept or list(configs)


# Shared memory one block may use on sm_90 (227 KB); staged 16-bit operands beyond it cannot compile there.
SHARED_BYTES = 227 * 1024


# fp32 accumulator registers a thread may hold: above, sm_90 compiles of the tile grad weight spill (three
# positions over a 128-wide tile with four warps: 192 a thread, 255 registers and spills; eight warps: 96, 167)
ACCUMULATOR_REGISTERS = 128


def wgrad_tiles_configs_for(configs, named_args: dict, **kwargs) -> list:
    """The tile grad weight's configurations (the early prune) whose staged 16-bit operands (a [BLOCK_M, BLOCK_T]
    block of dy and PER [BLOCK_M, BLOCK_C] blocks of x a stage) fit a block's shared memory (three positions a
    program over 128-wide tiles do not at BLOCK_M = 128, three stages), and whose PER [BLOCK_C, BLOCK_T] fp32
    accumulators fit :data:`ACCUMULATOR_REGISTERS` a thread. Eight warps over 64-pixel blocks only where four
    do not hold the accumulators."""
    get = {**named_args, **kwargs}.get
    per, block_t, block_c = get("PER", 1), get("BLOCK_T"), get("BLOCK_C")
    if block_t is None or block_c is None:
        return list(configs)

    def fits(c) -> bool:
        staged = c.num_stages * c.kwargs["BLOCK_M"] * (block_t + per * block_c) * 2
        return staged <= SHARED_BYTES and per * block_t * block_c <= ACCUMULATOR_REGISTERS * 32 * c.num_warps
    kept = [c for c in configs if fits(c)]
    if any(c.kwargs["BLOCK_M"] == 64 and c.num_warps == 4 for c in kept):
        kept = [c for c in kept if not (c.kwargs["BLOCK_M"] == 64 and c.num_warps == 8)]
    return kept or list(configs)


def tuning_bench(fn, quantiles=None):
    """Times one configuration while autotuning. Triton's default spends 25 ms warming up and
    100 ms measuring each one; these kernels run for microseconds to a few milliseconds, so a
    fifth of that still averages tens to thousands of runs, and a new shape's first call waits
    about 4x less."""
    from triton.testing import do_bench

    return do_bench(fn, warmup=5, rep=25, quantiles=quantiles)


# Where this triton can, the best configuration per key is kept in triton's on-disk cache (a shape
# is benchmarked once per machine rather than once per process), and timed with tuning_bench.
_AUTOTUNE_PARAMS = inspect.signature(triton.autotune).parameters
_TUNE_EXTRAS = {"cache_results": True, "do_bench": tuning_bench}
_TUNE_EXTRAS = {name: value for name, value in _TUNE_EXTRAS.items() if name in _AUTOTUNE_PARAMS}
