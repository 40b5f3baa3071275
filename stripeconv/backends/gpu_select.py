"""Per-shape choice between the stripe kernels and cuDNN's dense conv on CUDA devices.

A stripe conv does ``density / tile_efficiency`` of the dense FLOPs, but cuDNN's dense conv runs
closer to the tensor cores' peak. Near density 1, on small planes or at batch 1, dense can win;
at low density the stripe kernels do. Like ``torch.backends.cudnn.benchmark``, the first call
of a new key times every candidate's GPU work with CUDA events (the stream is held back while the
host queues the call, so launch overhead is not counted) and caches the fastest, so each layer runs
whichever is faster on this GPU and is never much slower than the dense conv it replaces.

Before a candidate is timed, its result on the call's own tensors is compared with the dense conv's
(cuDNN on the scattered weight: the oracle the tests use; where there is no dense candidate, the
first stripe kernel's). A candidate whose result strays further than rounding explains (a kernel
variant miscompiled or mislaunched on this GPU) is left out of the choice with a warning, and
:func:`decisions` lists it, so a wrong kernel is never picked for being fast.

A key holds everything the times depend on: the op, shapes, dtype, memory format, conv
geometry, and the kept / computed stripe counts of the candidates' plans (so two masks of the
same layer with the same counts share a decision). The dense candidates scatter the packed rows
into a dense weight (and gather the dense grad weight back) through cached index tensors: no
host sync, so a cached decision is usable under CUDA graph capture. While a stream is being
captured, an undecided key takes the stripe kernels without timing.

Each timed call starts with an empty L2 cache (:func:`_l2_flush`), as a layer's call in a network, the
benchmark's timings and the kernels' autotuners do.

A candidate may do other GPU work where a CUDA graph replays it: the dense conv keeps its scattered
weight between eager calls, but in a graph it scatters on every replay (see :mod:`._dense_weights`).
The caller then passes that work as the candidate's ``captured`` variant; it is timed beside the
candidate, and the fastest under capture (:func:`captured_choice`) is kept next to the eager choice,
so a call captured into a graph can run a stripe kernel where the dense conv wins only in eager mode.

``STRIPECONV_GPU_DENSE`` overrides the choice: ``auto`` (default), ``never`` (the fastest of the
stripe kernels, never dense; the benchmarks time the kernels this way) or ``always`` (dense
wherever it applies; tests use it to check the dense path). Decisions are kept per mode.

``STRIPECONV_TRITON_CANDIDATES=all`` offers every stripe-kernel variant the backend has, also those
left out by default because they never came within 14 % of the fastest on the H100 runs of the
benchmark (``bench/results/h100_20261124``): the subtile forward (``stripe*x*``: 0 best of 918
timings, never within 1.14x) and the TMA forward storing scattered channels (``stripe*_tma`` of an
unaligned plan: 0 best of 540). :func:`every_candidate` reads it; the tests and the fuzzer set it,
so that every kernel stays checked.

``STRIPECONV_TRITON_EXCLUDE`` leaves stripe-kernel variants out of every choice: comma-separated
shell patterns over the candidates' names (``*_tma`` drops the TMA variants, ``stripe*x*`` the
subtile ones), e.g. to compare a GPU's timings with and without them or to step around a variant
that fails there. Decisions are kept per exclusion too.

In deterministic mode (:func:`deterministic`) nothing is timed: timings vary from run to run, and
candidates that sum in another order round differently, so a timed choice could give another
process other bits. The choice is then fixed: the first stripe candidate (the default tile width),
or dense under ``always``.
"""
from __future__ import annotations

import contextlib
import fnmatch
import math
import statistics
import threading
import warnings
from typing import Callable, Optional

import torch
from torch import Tensor

from ._environ import getenv, raw_lookup

__all__ = ["mode", "excluded", "every_candidate", "deterministic", "settings", "tolerance", "disagreement", "choose",
           "choice", "captured_choice", "generation", "decisions", "recording", "clear"]

_MODES = ("auto", "never", "always")
_decisions: dict[tuple, str] = {}  # (mode, excluded, key) -> name
_times: dict[tuple, dict[str, float]] = {}
_rejected: dict[tuple, dict[str, float]] = {}  # candidates whose result disagreed: name -> disagreement
_captured: dict[tuple, str] = {}  # (mode, excluded, key) -> the choice for a call captured into a CUDA graph
_captured_times: dict[tuple, dict[str, float]] = {}  # name -> its captured variant's time
_generation = 0  # counts clear() calls: whoever caches a choice checks it
_recorders: list[list] = []  # open recording() lists
_lock = threading.Lock()
_DEVICE_FAULT = getattr(torch, "AcceleratorError", RuntimeError)  # torch >= 2.8: CUDA errors
_TIMED_DEVICES = ("cuda",)  # elsewhere the first candidate runs untimed (tests add "cpu", with a timer of their own)


def mode() -> str:
    """The dense/stripe policy from ``STRIPECONV_GPU_DENSE``: ``auto``, ``never`` or ``always``
    (read on every call, so a change of the variable takes effect at once)."""
    value = getenv("STRIPECONV_GPU_DENSE", "auto").strip().lower() or "auto"
    if value not in _MODES:
        raise ValueError(f"STRIPECONV_GPU_DENSE must be one of {', '.join(_MODES)}, got {value!r}")
    return value


def excluded() -> tuple[str, ...]:
    """The name patterns of ``STRIPECONV_TRITON_EXCLUDE`` (none by default)."""
    value = getenv("STRIPECONV_TRITON_EXCLUDE", "")
    return tuple(p for p in (part.strip() for part in value.split(",")) if p) if value else ()


def every_candidate() -> bool:
    """Whether ``STRIPECONV_TRITON_CANDIDATES`` is ``all`` (every kernel variant offered) rather than
    ``default`` (unset: the variants that were ever competitive)."""
    value = getenv("STRIPECONV_TRITON_CANDIDATES", "default").strip().lower() or "default"
    if value not in ("default", "all"):
        raise ValueError(f"STRIPECONV_TRITON_CANDIDATES must be 'default' or 'all', got {value!r}")
    return value == "all"


def _pool(candidates: dict, m: str) -> list[str]:
    patterns = excluded()
    names = [name for name in candidates
             if name == "dense" or not any(fnmatch.fnmatchcase(name, p) for p in patterns)]
    if not any(name != "dense" for name in names):
        raise ValueError(f"STRIPECONV_TRITON_EXCLUDE={','.join(patterns)!r} leaves none of the stripe kernels "
                         f"{', '.join(n for n in candidates if n != 'dense')}; expected patterns that keep at least one")
    return [name for name in names if name != "dense"] if m == "never" else names


def deterministic() -> bool:
    """Whether results must repeat bit for bit from one run to the next: with
    ``torch.use_deterministic_algorithms(True)`` or ``STRIPECONV_DETERMINISTIC=1``."""
    return (getenv("STRIPECONV_DETERMINISTIC", "0").strip() not in ("", "0")
            or torch.are_deterministic_algorithms_enabled())


# What settings() reads: the variables (the forward's tile width among them: the backward's tile plans
# follow it) and torch's deterministic flag, compared raw, parsed once per combination of values.
_SETTING_VARIABLES = ("STRIPECONV_GPU_DENSE", "STRIPECONV_TRITON_EXCLUDE", "STRIPECONV_TRITON_CANDIDATES",
                      "STRIPECONV_DETERMINISTIC", "STRIPECONV_TRITON_BLOCK_N")
_raw_get, _raw_keys = raw_lookup(_SETTING_VARIABLES)
_deterministic_flag = torch._C._get_deterministic_algorithms
_parsed_settings: dict[tuple, tuple] = {}


def settings() -> tuple:
    """Everything besides its arguments that a settled Triton call depends on, read on every call:
    :func:`mode`, :func:`excluded`, :func:`every_candidate`, :func:`deterministic`,
    ``STRIPECONV_TRITON_BLOCK_N`` and :func:`generation`. Where the values are unchanged it calls no
    Python function: each Python call of a settled call may cost the interpreter a fresh chunk of
    its frame stack (docs/backends.md, "Host work and the frame stack")."""
    raw = (*map(_raw_get, _raw_keys), _deterministic_flag())
    parsed = _parsed_settings.get(raw)
    if parsed is None:
        parsed = (mode(), excluded(), every_candidate(), deterministic(), getenv("STRIPECONV_TRITON_BLOCK_N"))
        if len(_parsed_settings) >= 64:
            _parsed_settings.clear()
        _parsed_settings[raw] = parsed
    return (*parsed, _generation)


# GPU cycles the stream sleeps before each timed call (~0.5 ms): the host queues the call's kernels
# meanwhile, so the events time the GPU's work, not the host's launch path (tens of microseconds,
# more than a small layer's kernels, and in a CUDA graph or a busy stream it is hidden).
_HEAD_START_CYCLES = 1_000_000


# Bytes written to evict the L2 cache where the device does not tell its size (twice the largest L2 yet).
_FLUSH_BYTES_DEFAULT = 256 << 20


def _l2_flush() -> Callable[[], object]:
    """A function that evicts the current GPU's L2 cache: it writes a buffer twice the cache's size, as
    ``triton.testing.do_bench`` does before each run (and so before each configuration the kernels'
    autotuners time). A call timed again and again on the same tensors finds its weights and inputs in
    the L2, where a layer of a network reads them from memory: on the 2026-11-24 H100 run, at density 1,
    the chosen stripe kernels' times with a warm cache were 1.7-7.3 us (median 3.7) below their times
    in the benchmark's graph replays (which rotate inputs through more than the L2), cuDNN's a median
    1.4 us (batch 1, ResNet-50 layer3: 12.4 us warm, 17.5 replayed; cuDNN 14.0 and 15.1), so the choice
    between them was tilted towards the stripe kernels."""
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    size = 2 * int(getattr(props, "L2_cache_size", 0) or 0) or _FLUSH_BYTES_DEFAULT
    try:
        return torch.empty(size, dtype=torch.int8, device="cuda").zero_
    except torch.cuda.OutOfMemoryError:  # a model that fills the GPU: timed with what the cache holds
        return lambda: None


def _time_ms(fn: Callable[[], Tensor], repeats: int = 5) -> float:
    fn()  # warm-up: autotuning, compilation, cuDNN's own algorithm search
    sleep = getattr(torch.cuda, "_sleep", None)
    flush = _l2_flush()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        flush()  # before the head start: not timed
        if sleep is not None:
            sleep(_HEAD_START_CYCLES)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


# How far a candidate's result may stray from the reference's, as a fraction of the reference's
# largest magnitude. Candidates sum in other orders and round their fp32 sums to the output dtype,
# so 16-bit results differ by about an ulp (2**-8 relative), TF32 ones by ~1e-3; a wrong kernel (a
# position missed, a tile misread or stored twice) is off by the size of a whole term, 1e-1 or more.
_TOLERANCE = {torch.float16: 3e-2, torch.bfloat16: 3e-2}
_TOLERANCE_DEFAULT = 1e-2  # fp32, TF32 included


def tolerance(dtype: torch.dtype) -> float:
    """The disagreement (see :func:`disagreement`) beyond which a candidate of ``dtype`` is rejected."""
    return _TOLERANCE.get(dtype, _TOLERANCE_DEFAULT)


_COMPARE_CHUNK = 1 << 24  # elements compared at a time: fp32 copies of a chunk, not of a whole activation


def disagreement(result, reference) -> Optional[float]:
    """Largest ``|result - reference|`` over the largest ``|reference|``: 0 for equal results, ``inf``
    for a wrong shape or a non-finite value the reference does not have. None where the two cannot
    be told apart this way: not tensors, empty, or a reference that itself holds inf or nan."""
    if not (isinstance(result, Tensor) and isinstance(reference, Tensor)) or reference.numel() == 0:
        return None
    if result.shape != reference.shape:
        return float("inf")
    result, reference = result.detach(), reference.detach()
    if reference.dim() == 0:
        result, reference = result.reshape(1), reference.reshape(1)
    step = max(1, _COMPARE_CHUNK // max(1, reference[0].numel()))  # slices along dim 0: views, any layout
    scale = error = reference.new_zeros((), dtype=torch.float32)
    finite = torch.ones((), dtype=torch.bool, device=reference.device)
    for start in range(0, reference.shape[0], step):
        ref = reference[start:start + step].float()
        finite &= torch.isfinite(ref).all()
        scale = torch.maximum(scale, ref.abs().amax())
        error = torch.maximum(error, (result[start:start + step].float() - ref).abs().amax())  # nan stays nan
    if not bool(finite):
        return None
    scale, error = float(scale), float(error)
    if not math.isfinite(error):
        return float("inf")
    return error / scale if scale > 0 else (0.0 if error == 0 else float("inf"))


def _device_fault(exc: Exception) -> bool:
    """Whether ``exc`` left the CUDA context unusable (not a candidate to skip, unlike triton's OutOfResources
    for a GPU with less shared memory)."""
    return isinstance(exc, _DEVICE_FAULT) or "CUDA error" in str(exc)


def _reference_result(name: str, candidates: dict) -> Optional[Tensor]:
    """The reference candidate's result (a copy: no later call may overwrite it), or None where it
    fails here; the candidate's own timing then records why."""
    try:
        result = candidates[name]()
    except Exception as exc:
        if _device_fault(exc):
            raise
        return None
    return result.detach().clone() if isinstance(result, Tensor) else result


def _warn_rejected(key: tuple, name: str, reference: str, error: float, limit: float) -> None:
    warnings.warn(f"stripeconv: the {name!r} kernel's result for {key[0] if key else 'a call'} differs from the "
                  f"{reference!r} candidate's by {error:.2e} of its largest magnitude (expected at most {limit:.0e}); "
                  f"it is left out of the choice for this shape. Please report it with the GPU, the torch and triton "
                  f"versions and this key: {key!r}. STRIPECONV_TRITON_EXCLUDE={name} leaves it out without checking.",
                  RuntimeWarning, stacklevel=4)


def choose(key: tuple, candidates: dict[str, Callable[[], Tensor]], device: torch.device,
           captured: Optional[dict[str, Callable[[], Tensor]]] = None) -> str:
    """Name of the candidate to run for ``key``; the first candidate is the stripe kernel.

    Candidates named ``dense`` are the dense conv; the rest are stripe-kernel variants.
    ``captured``: as for :func:`choice`.
    """
    return choice(key, candidates, device, captured)[0]


def choice(key: tuple, candidates: dict[str, Callable[[], Tensor]], device: torch.device,
           captured: Optional[dict[str, Callable[[], Tensor]]] = None) -> tuple[str, bool]:
    """:func:`choose`, and whether the answer is settled: every later call of ``key`` in this mode
    gets it until :func:`clear` (False only for an undecided key while a CUDA stream is captured).

    ``captured`` maps candidates to the work they do where a CUDA graph replays them, if other than
    their eager call's; when timed, the fastest under capture becomes :func:`captured_choice`."""
    m = mode()
    name, settled = _choice(m, key, candidates, device, captured)
    if _recorders:
        asked = {"mode": m, "excluded": list(excluded()), "key": key, "choice": name}
        for recorder in _recorders:
            recorder.append(asked)
    return name, settled


@contextlib.contextmanager
def recording():
    """Collect what the calls inside ask for: a list that gets, per :func:`choice` call, a dict with its
    ``mode``, ``excluded`` patterns, ``key`` and ``choice`` (match them to :func:`decisions` for the times).
    A settled call does not ask again: record from a call shape's first call on."""
    asked: list[dict] = []
    _recorders.append(asked)
    try:
        yield asked
    finally:
        del _recorders[next(i for i, r in enumerate(_recorders) if r is asked)]  # this one, not an equal one


def _choice(m: str, key: tuple, candidates: dict[str, Callable[[], Tensor]], device: torch.device,
            captured: Optional[dict[str, Callable[[], Tensor]]]) -> tuple[str, bool]:
    if m == "always" and "dense" in candidates:
        return "dense", True
    pool = _pool(candidates, m)
    # A lone stripe kernel has nothing to be timed against, but where the dense conv runs as the oracle
    # alone ("never") it is still checked once.
    if deterministic() or (len(pool) == 1 and (pool[0] == "dense" or "dense" not in candidates)):
        return pool[0], True
    slot = (m, excluded(), key)
    with _lock:
        hit = _decisions.get(slot)
    if hit in candidates:  # (a decision for other candidates under the same key is taken again)
        return hit, True
    if device.type not in _TIMED_DEVICES:
        return pool[0], True
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return pool[0], False
    times, errors, rejected, accepted, graph_times = {}, {}, {}, [], {}
    # The oracle: the dense conv, also where it is not a choice ("never"); else the first stripe kernel.
    reference_name = "dense" if "dense" in candidates else pool[0]
    # Events on the stream of the tensors' device (torch.cuda.Event records on the current device).
    other_device = device.index is not None and device.index != torch.cuda.current_device()
    with torch.cuda.device(device) if other_device else contextlib.nullcontext():
        reference = _reference_result(reference_name, candidates)
        limit = tolerance(reference.dtype) if isinstance(reference, Tensor) else 0.0
        for name in pool:
            try:
                if name != reference_name and reference is not None:
                    error = disagreement(candidates[name](), reference)
                    if error is not None and not error <= limit:
                        rejected[name] = error
                        _warn_rejected(key, name, reference_name, error, limit)
                        continue
                if len(pool) > 1:
                    times[name] = _time_ms(candidates[name])
                accepted.append(name)
                if len(pool) > 1 and captured and name in captured:
                    graph_times[name] = _captured_time_ms(captured[name])
            except Exception as exc:  # e.g. triton's OutOfResources for a GPU with less shared memory
                if _device_fault(exc):
                    raise
                errors[name] = exc
        del reference
    if not accepted:
        if errors:
            raise next(iter(errors.values()))
        raise RuntimeError(f"every stripe kernel's result for {key!r} differs from the {reference_name!r} candidate's "
                           f"({', '.join(f'{n}: {e:.2e}' for n, e in rejected.items())} of its largest magnitude; "
                           f"expected at most {limit:.0e}). STRIPECONV_GPU_DENSE=auto lets the dense conv run instead")
    best = min(times, key=times.get) if times else accepted[0]
    under_capture = {**times, **graph_times}
    with _lock:
        _decisions[slot] = best
        _times[slot] = times
        _rejected[slot] = rejected
        if graph_times:
            _captured[slot] = min(under_capture, key=under_capture.get)
            _captured_times[slot] = {name: t for name, t in graph_times.items() if math.isfinite(t)}
        else:  # a key decided again for other candidates
            _captured.pop(slot, None)
            _captured_times.pop(slot, None)
    return best, True


def _captured_time_ms(fn: Callable[[], Tensor]) -> float:
    """:func:`_time_ms` of a candidate's captured variant; inf where it cannot run (it is then no choice
    under capture, while the candidate keeps its eager time)."""
    try:
        return _time_ms(fn)
    except Exception as exc:
        if _device_fault(exc):
            raise
        return math.inf


def captured_choice(key: tuple) -> Optional[str]:
    """The candidate to run for ``key`` where a CUDA graph captures the call, in the current mode, if it
    was timed apart from the eager choice (see :func:`choice`'s ``captured``); None where it was not."""
    with _lock:
        return _captured.get((mode(), excluded(), key))


def generation() -> int:
    """Changes whenever :func:`clear` forgets the decisions."""
    return _generation


def decisions() -> list[dict]:
    """Every timed decision so far: the key, the mode, the excluded name patterns, the candidates'
    median times (ms), the candidates rejected for a wrong result (name -> disagreement, see
    :func:`disagreement`) and the choice; where candidates had captured variants, also their times
    (``captured_times_ms``) and the choice under CUDA graph capture (``captured_choice``)."""
    with _lock:
        entries = []
        for slot, name in _decisions.items():
            entry = {"key": slot[2], "mode": slot[0], "excluded": list(slot[1]), "times_ms": dict(_times[slot]),
                     "rejected": dict(_rejected.get(slot, {})), "choice": name}
            if slot in _captured:
                entry.update(captured_times_ms=dict(_captured_times[slot]), captured_choice=_captured[slot])
            entries.append(entry)
        return entries


def clear() -> None:
    """Forget every decision (the next call of each key times again)."""
    global _generation
    with _lock:
        _decisions.clear()
        _times.clear()
        _rejected.clear()
        _captured.clear()
        _captured_times.clear()
        _generation += 1
