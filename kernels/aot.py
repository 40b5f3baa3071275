"""Compile the Triton kernels for a GPU architecture on a machine without a GPU.

The Triton interpreter checks what the kernels compute, not whether they compile for a GPU or
how they compile. This module closes that gap: it records the launches the host code of the
``triton`` backend makes for a given call (run on CPU tensors, nothing is executed), rebuilds the
specialisation Triton's JIT would derive from those arguments (integers equal to 1 become
constants, pointers and integers divisible by 16 get the divisibility hint, except for the
integers a kernel exempts with ``do_not_specialize``), and compiles every
autotuning configuration with ``triton.compile`` for the requested target (``sm_90`` by default;
ptxas ships with Triton). Each compiled variant reports what decides its speed: registers,
spill bytes, shared memory, whether the main loop uses tensor cores (``wgmma`` on sm_90,
``mma.sync`` before), whether its global loads are pipelined (``cp.async``), and a digest of its
instructions: a change to the kernels' source that leaves every digest as it was leaves the code
the GPU runs as it was (how a refactor is checked without a GPU).

Command line: ``python -m stripeconv.kernels.aot [--arch 90] [--every-candidate]`` prints that table
for a set of representative layers.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import inspect
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional

import torch

__all__ = ["Launch", "Variant", "capture_launches", "specialisation", "tuned_configs", "compile_launch",
           "compile_call", "ptx_code_digest", "copies_in_flight", "loop_instructions", "StubDriver", "stub_driver"]


@dataclass
class Launch:
    """One kernel launch as the host code issued it."""
    kernel: Any               # the (autotuned) JIT function
    args: tuple
    kwargs: dict

    @property
    def name(self) -> str:
        return _jit_fn(self.kernel).__name__


@dataclass
class Variant:
    """One autotuning configuration of a launch, compiled for ``arch``."""
    kernel: str
    arch: int
    config: dict
    registers: int
    spill_bytes: int
    shared_bytes: int
    tensor_cores: str          # "wgmma", "mma" or "none"
    async_copies: int          # cp.async / bulk copies in the PTX: the loads the pipeliner staged
    dtype: str = ""            # element type of the first pointer argument (the activations)
    constexprs: dict = field(default_factory=dict)
    code_digest: str = ""      # of the PTX instructions, without debug info (:func:`ptx_code_digest`)
    copies_in_flight: Optional[int] = None  # :func:`copies_in_flight` of the main loop (None: no staged copies)
    loop_instructions: Optional[int] = None  # :func:`loop_instructions` of the cubin (None: no MMA loop)

    def row(self) -> str:
        cfg = " ".join(f"{k}={v}" for k, v in self.config.items())
        return (f"{self.kernel:<22} sm_{self.arch} {cfg:<38} regs {self.registers:>3}  spill {self.spill_bytes:>5} B  "
                f"smem {self.shared_bytes:>6} B  {self.tensor_cores:<5}  async loads {self.async_copies:>2}  "
                f"in flight {'-' if self.copies_in_flight is None else self.copies_in_flight}  "
                f"loop {'-' if self.loop_instructions is None else self.loop_instructions}")


def _jit_fn(kernel):
    """The JITFunction under an Autotuner (or the function itself)."""
    from triton.runtime.jit import JITFunction

    while not isinstance(kernel, JITFunction):
        kernel = kernel.fn
    return kernel


class _Recorder:
    """Stands in for a kernel: ``kernel[grid](*args, **kwargs)`` records the launch."""

    def __init__(self, kernel, sink: list):
        self._kernel, self._sink = kernel, sink

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self._sink.append(Launch(self._kernel, args, kwargs))
        return launch


@contextlib.contextmanager
def _recording(sink: list) -> Iterator[None]:
    from ..backends import _triton_runtime as runtime

    real = runtime.check_kernels()

    class Namespace:
        tl = real.tl

    ns = Namespace()
    for name in dir(real):
        if name.startswith("stripe_") and name.endswith("_kernel"):
            setattr(ns, name, _Recorder(getattr(real, name), sink))
    saved = runtime._kernels
    runtime._kernels = ns
    try:
        yield
    finally:
        runtime._kernels = saved


def capture_launches(call: Callable[[], Any], sm_count: int = 132, every_candidate: bool = False,
                     tma: bool = True) -> list[Launch]:
    """Run ``call`` (host code of the triton backend on CPU tensors) and return its launches.

    ``sm_count`` stands in for the GPU's multiprocessor count, which sizes the split-K of grad
    weight (132: an H100 / H200), and ``tma`` for whether it copies tensor boxes (sm_90 and later:
    the TMA forward is a candidate). On CPU tensors the host code launches only its first stripe
    candidate (tile width); with ``every_candidate`` it launches each one, as the first call on a
    GPU does while it times them.
    """
    from ..backends import _triton_runtime as runtime, gpu_select
    from ..backends import triton_backend as host

    def each_candidate(key, candidates, device, captured=None):
        stripes = [name for name in candidates if name != "dense"]
        for name in stripes:
            candidates[name]()
        return stripes[0], True

    sink: list[Launch] = []
    saved = runtime.num_sms, gpu_select.choice, host._settled, runtime.tma_capable
    runtime.num_sms, runtime.tma_capable = (lambda device: sm_count), (lambda device: tma)
    if every_candidate:  # and no settled calls, which would launch their one choice
        gpu_select.choice, host._settled = each_candidate, {}
    try:
        with _recording(sink):
            call()
    finally:
        runtime.num_sms, gpu_select.choice, host._settled, runtime.tma_capable = saved
    return sink


class _StubLauncher:
    """Stands in for a compiled kernel's launcher: appends each call (Triton's launcher arguments) to the
    list of the innermost :func:`stub_driver` (compiled kernels outlive it in their JIT function's cache)."""

    sinks: list[list] = []

    def __init__(self, src, metadata):
        pass

    def __call__(self, *call) -> None:
        if self.sinks and self.sinks[-1] is not None:
            self.sinks[-1].append(call)


class _StubUtils:
    def __init__(self, sm_count: int):
        self._sm_count = sm_count
        from triton.compiler.compiler import CompiledKernel

        # (module, function, registers, spills[, max threads]): triton >= 3.3 asks for the fifth
        self._loaded = (1, 1, 0, 0, 1024) if "n_max_threads" in inspect.getsource(CompiledKernel._init_handles) \
            else (1, 1, 0, 0)

    def load_binary(self, name, kernel, shared, device):
        return self._loaded

    def get_device_properties(self, device) -> dict:
        return {"max_shared_mem": 232448, "multiprocessor_count": self._sm_count, "max_num_regs": 65536,
                "warpSize": 32}

    def unload_module(self, module) -> None:
        pass


class StubDriver:
    """Triton's active driver on a machine without a GPU (see :func:`stub_driver`)."""

    def __init__(self, arch: int, sm_count: int):
        from triton.backends.compiler import GPUTarget

        self.utils = _StubUtils(sm_count)
        self.launcher_cls = _StubLauncher
        self.target = GPUTarget("cuda", arch, 32)
        self.device, self.stream = 0, 0

    def get_current_device(self) -> int:
        return self.device

    def get_current_stream(self, device) -> int:
        return self.stream

    def get_current_target(self):
        return self.target

    def get_active_torch_device(self) -> torch.device:
        return torch.device("cpu")

    @staticmethod
    def is_active() -> bool:
        return True


@contextlib.contextmanager
def stub_driver(arch: int = 90, sm_count: int = 132, keep_calls: bool = True) -> Iterator[tuple[StubDriver, list]]:
    """Triton's runtime with the GPU driver stubbed out: ``kernel[grid](...)`` on CPU tensors binds,
    specialises, compiles (for ``sm_<arch>``, with the bundled ptxas) and looks kernels up exactly as
    on a GPU, and the compiled kernel's launcher appends its call to the yielded list instead of
    launching (``keep_calls=False``: does nothing, for timing, as the calls hold their tensors).
    Yields (the driver, whose ``device`` and ``stream`` can be changed, the list). For checking and
    timing the host side of launches; autotuners that benchmark cannot run under it."""
    from triton.runtime import driver

    sink: list = []
    saved = dict(vars(driver))
    stub = StubDriver(arch, sm_count)
    driver.set_active(stub)
    _StubLauncher.sinks.append(sink if keep_calls else None)
    try:
        yield stub, sink
    finally:
        _StubLauncher.sinks.pop()
        vars(driver).clear()
        vars(driver).update(saved)


_TYPE_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.float64: "fp64",
               torch.int32: "i32", torch.int64: "i64", torch.bool: "i1", torch.int8: "i8"}


def _specialise(value, specialise: bool = True) -> tuple[str, Any]:
    """(signature type, constant or divisibility hint) as Triton's JIT derives them; integers in a
    kernel's ``do_not_specialize`` (``specialise=False``) get their type alone."""
    if value is None:
        return "constexpr", None
    if isinstance(value, bool):
        return "i1", None
    if isinstance(value, int):
        kind = "i32" if -2**31 <= value < 2**31 else "i64"
        if not specialise:
            return kind, None
        if value == 1:
            return "constexpr", 1
        return kind, value % 16 == 0
    if isinstance(value, float):
        return "fp32", None
    if isinstance(value, torch.Tensor):
        return "*" + _TYPE_NAMES[value.dtype], True  # torch allocations are 16-byte aligned
    if type(value).__name__ == "TensorDescriptor":  # host-side TMA descriptor: its dtype and box are compiled in
        return f"tensordesc<{_TYPE_NAMES[value.base.dtype]}[{', '.join(map(str, value.block_shape))}]>", None
    raise TypeError(f"cannot specialise an argument of type {type(value).__name__}")


def _tool(name: str) -> Optional[str]:
    import triton

    bundled = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    return bundled if os.path.exists(bundled) else shutil.which(name)


def _cuobjdump(cubin: bytes, flag: str) -> Optional[str]:
    """cuobjdump's output for ``cubin`` (None where the tool is missing)."""
    tool = _tool("cuobjdump")
    if tool is None:
        return None
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([tool, flag, f.name], capture_output=True, text=True).stdout


def _resources(cubin: bytes, arch: int) -> tuple[int, int]:
    """(registers, local-memory bytes) of the kernel in ``cubin``, read with cuobjdump."""
    out = _cuobjdump(cubin, "--dump-resource-usage")
    if out is None:
        return -1, -1
    regs = re.search(r"REG:(\d+)", out)
    stack = re.search(r"STACK:(\d+)", out)
    local = re.search(r"LOCAL:(\d+)", out)
    spill = (int(stack.group(1)) if stack else 0) + (int(local.group(1)) if local else 0)
    return (int(regs.group(1)) if regs else -1), spill


def loop_instructions(cubin: bytes) -> Optional[int]:
    """SASS instructions of the main loop in ``cubin`` (the loop, closed by a backward branch, that
    holds the MMAs): what each iteration issues per warp besides the MMAs' own work. None without
    cuobjdump or without such a loop."""
    sass = _cuobjdump(cubin, "-sass")
    if sass is None:
        return None
    code = [(int(m.group(1), 16), line) for line in sass.splitlines()
            if (m := re.match(r"\s*/\*([0-9a-f]{4,})\*/\s+(.*)", line))]
    for address, line in code:
        branch = re.search(r"\bBRA\s+(?:`\()?0x([0-9a-f]+)", line)
        if branch and int(branch.group(1), 16) < address:
            body = [text for at, text in code if int(branch.group(1), 16) <= at <= address]
            if any("MMA" in text for text in body):
                return len(body)  # an inner loop closes before the loops around it
    return None


def specialisation(fn, values: dict) -> tuple[dict, dict, dict]:
    """(signature, constants, attributes) that Triton's JIT compiles ``fn`` for, given every
    argument's value by name (or its default): a launch with the same three reuses the compiled kernel."""
    signature, constexprs, attrs = {}, {}, {}
    defaults = {name: p.default for name, p in inspect.signature(fn.fn).parameters.items()
                if p.default is not inspect.Parameter.empty}
    for index, param in enumerate(fn.params):
        name = param.name
        value = values[name] if name in values else defaults[name]
        if param.is_constexpr:
            signature[name] = "constexpr"
            constexprs[name] = value
            continue
        kind, hint = _specialise(value, not getattr(param, "do_not_specialize", False))
        signature[name] = kind
        if kind == "constexpr":
            constexprs[name] = hint
        elif hint is True:
            attrs[(index,)] = [["tt.divisibility", 16]]
    return signature, constexprs, attrs


def ptx_code_digest(ptx: str) -> str:
    """SHA-1 of a kernel's PTX instructions: the body up to its closing brace, without source line
    markers and comments (the DWARF sections after it and the .loc lines change with the source's
    layout, e.g. when code moves into a helper). Equal digests: the same machine code for this target."""
    lines = ptx.splitlines()
    end = next((i for i, line in enumerate(lines) if line.startswith("}")), len(lines) - 1)
    code = [line for line in lines[:end + 1] if not re.match(r"\s*(\.loc|\.file|//|\$L__)", line)]
    return hashlib.sha1("\n".join(code).encode()).hexdigest()


def _loops(ptx: str) -> Iterator[str]:
    """The body of every innermost loop in ``ptx``: from its header label to its last branch back to it."""
    for header in re.finditer(r"^(\$L__BB\d+_\d+):\s*// =>This Inner Loop Header", ptx, re.M):
        label = header.group(1)
        back = [m.end() for m in re.finditer(rf"bra(?:\.uni)?\s+{re.escape(label)};", ptx[header.end():])]
        if back:
            yield ptx[header.end():header.end() + back[-1]]


def copies_in_flight(ptx: str) -> Optional[int]:
    """Copy groups the main loop (the innermost loop that issues the MMAs) leaves in flight when it
    waits for its operands: the smallest ``cp.async.wait_group`` count in it. 0 means each iteration
    waits for every copy it staged, so loads no longer overlap the MMAs however many ``num_stages``
    asked for (what a table read that addresses the same iteration's tiles makes Triton's pipeliner
    do). None: the loop stages no copies (or there is no MMA loop)."""
    for body in _loops(ptx):
        if "mma" in body:
            waits = [int(n) for n in re.findall(r"cp\.async\.wait_group\s+(\d+)", body)]
            return min(waits) if waits else None
    return None


def tuned_configs(launch: Launch) -> list:
    """The autotuning configurations the launch's tuner would time (after its early prune), or [None]
    for a kernel without a tuner."""
    configs = getattr(launch.kernel, "configs", None)
    if not configs:
        return [None]
    prune = getattr(launch.kernel, "early_config_prune", None)
    return list(prune(configs, {}, **launch.kwargs) if prune else configs)


def compile_launch(launch: Launch, arch: int = 90, configs: Optional[list] = None) -> list[Variant]:
    """Compile every autotuning configuration of ``launch`` for ``sm_<arch>``."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = _jit_fn(launch.kernel)
    bound = inspect.signature(fn.fn).bind_partial(*launch.args, **launch.kwargs)
    configs = configs if configs is not None else tuned_configs(launch)
    variants = []
    for config in configs:
        values = dict(bound.arguments)
        options = {}
        if config is not None:
            values.update(config.kwargs)
            options = {"num_warps": config.num_warps, "num_stages": config.num_stages}
        signature, constexprs, attrs = specialisation(fn, values)
        source = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
        compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)
        ptx = compiled.asm["ptx"]
        regs, spill = _resources(compiled.asm["cubin"], arch)
        tensor_cores = "wgmma" if "wgmma.mma_async" in ptx else "mma" if "mma.sync" in ptx else "none"
        asyncs = len(re.findall(r"cp\.async\.(?:ca|cg|bulk)", ptx))
        shown = {k: v for k, v in constexprs.items()
                 if k.startswith("BLOCK") or k in ("USE_DOT", "ATOMIC", "HAS_BIAS")}
        cfg = {**({"BLOCK_M": values.get("BLOCK_M")} if config is not None else {}), **options}
        dtype = next(t[1:] for t in signature.values() if t.startswith("*"))
        variants.append(Variant(fn.__name__, arch, {**cfg, **{k: v for k, v in shown.items() if k != "BLOCK_M"}},
                                regs, spill, compiled.metadata.shared, tensor_cores, asyncs, dtype, constexprs,
                                ptx_code_digest(ptx), copies_in_flight(ptx), loop_instructions(compiled.asm["cubin"])))
    return variants


def compile_call(call: Callable[[], Any], arch: int = 90, every_candidate: bool = False) -> list[Variant]:
    """Compile every kernel variant that ``call`` would launch, for ``sm_<arch>`` (with
    ``every_candidate``, those of every candidate the first call on a GPU times), each once."""
    variants, seen = [], set()
    for launch in capture_launches(call, every_candidate=every_candidate, tma=arch >= 90):
        for variant in compile_launch(launch, arch):
            if (variant.kernel, variant.row(), variant.code_digest) not in seen:
                seen.add((variant.kernel, variant.row(), variant.code_digest))
                variants.append(variant)
    return variants


def layer_calls(c: int, n: int, h: int, stride: int = 1, density: float = 0.5, groups: int = 1,
                dtype: torch.dtype = torch.bfloat16, channels_last: bool = True, bias: bool = True,
                batch: int = 2, seed: int = 0) -> list[tuple[str, Callable[[], Any]]]:
    """(label, call) for the forward, grad input and grad weight of one 3x3 layer (padding 1)."""
    from .. import packing
    from ..backends import triton_backend as host

    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(n, 3, 3, generator=g) < density
    packed = packing.pack_weight(torch.randn(n, c // groups, 3, 3, generator=g).to(dtype), mask)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(batch, c, h, h, generator=g).to(dtype).contiguous(memory_format=fmt)
    ho = (h - 1) // stride + 1
    dy = torch.randn(batch, n, ho, ho, generator=g).to(dtype).contiguous(memory_format=fmt)
    b = torch.zeros(n, dtype=dtype) if bias else None
    conv = ((stride, stride), (1, 1, 1, 1), (1, 1), groups)
    label = f"c{c} n{n} {h}x{h} s{stride} g{groups} d{density} {str(dtype)[6:]} {'nhwc' if channels_last else 'nchw'}"
    return [
        (f"fwd   {label}", lambda: host.forward(x, packed, b, mask, *conv)),
        (f"dgrad {label}", lambda: host.grad_input(dy, packed, mask, x.shape, *conv)),
        (f"wgrad {label}", lambda: host.grad_weight(dy, x, packed, mask, *conv)),
    ]


def _representative_calls(dtype: torch.dtype):
    return (layer_calls(256, 256, 14, 1, 0.5, dtype=dtype) + layer_calls(128, 128, 16, 2, 0.3, dtype=dtype)
            + layer_calls(32, 32, 8, 1, 0.5, groups=32, dtype=dtype))


def main(argv: Optional[list] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability x10 (80, 89, 90, ...)")
    parser.add_argument("--dtype", default="bfloat16", choices=["float16", "bfloat16", "float32"])
    parser.add_argument("--every-candidate", action="store_true",
                        help="every candidate gpu_select times (tile widths, subtile groups, the tile backward), "
                             "not only the first")
    args = parser.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    import datetime
    import triton

    print(f"# ahead-of-time compile for sm_{args.arch}, {args.dtype}, triton {triton.__version__}, "
          f"torch {torch.__version__}, {datetime.date.today().isoformat()}"
          f"{', every candidate' if args.every_candidate else ''} (compiled only, nothing ran on a GPU)")
    for label, call in _representative_calls(dtype):
        print(f"# {label} ({args.dtype})")
        for variant in compile_call(call, args.arch, args.every_candidate):
            print("  " + variant.row())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
