"""Out-of-bounds reads of the compiled CPU ops, caught by guard pages.

The micro-kernels load whole vectors where a chunk's reads stay inside its channel plane, and
masked vectors elsewhere; a wrong bound would read past a tensor without changing any result (the
extra lanes are dropped), so no value test can see it. Here every input (x, the packed weight,
bias, mask, grad_output) lies right after or right before an inaccessible page: a read one byte
outside the tensor faults. The ops run in a child process, which prints each case before it runs
it, so a fault names the case. Masked vector loads do not fault on their masked-off lanes.
"""
from __future__ import annotations

import ctypes
import mmap
import os
import subprocess
import sys

import pytest
import torch

try:
    import stripeconv._C  # noqa: F401
except ImportError as exc:  # pragma: no cover - depends on the build
    pytest.skip(f"stripeconv._C is not built ({exc})", allow_module_level=True)

if not sys.platform.startswith("linux"):  # pragma: no cover
    pytest.skip("guard pages via mprotect need Linux", allow_module_level=True)

PAGE = mmap.PAGESIZE
_LIBC = ctypes.CDLL(None, use_errno=True)
_LIBC.mprotect.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
_KEEP = []  # the mappings must outlive the tensors that view them


def guarded(t: torch.Tensor, side: str) -> torch.Tensor:
    """A copy of ``t`` (same strides, dense storage) whose storage ends right before an
    inaccessible page (``side="end"``) or starts right after one (``side="start"``)."""
    t = t.detach()
    span = max(t.numel(), 1) * t.element_size()
    data_pages = -(-span // PAGE)
    mm = mmap.mmap(-1, (data_pages + 2) * PAGE)
    base = ctypes.addressof(ctypes.c_char.from_buffer(mm))
    for page in (0, data_pages + 1):
        if _LIBC.mprotect(base + page * PAGE, PAGE, 0) != 0:  # PROT_NONE
            raise OSError(ctypes.get_errno(), "mprotect failed")
    _KEEP.append(mm)
    offset = PAGE if side == "start" else (data_pages + 1) * PAGE - span
    flat = torch.frombuffer(mm, dtype=t.dtype, count=max(t.numel(), 1), offset=offset)
    out = flat.as_strided(t.shape, t.stride())
    out.copy_(t)
    return out


def _run_all() -> int:
    """The child: every kernel case, both layouts, both placements, ISAs and thread counts."""
    import test_cpu_kernel as K

    ops = torch.ops.stripeconv_cpu
    os.environ["STRIPECONV_CPU_DENSE"] = "never"
    big = [dict(id="64ch_32x32_staged", b=2, c=64, n=64, h=32, w=32, k=(3, 3), s=(1, 1), p=(1, 1, 1, 1),
                d=(1, 1), density=0.5),
           dict(id="24ch_16x16", b=3, c=24, n=20, h=16, w=16, k=(3, 3), s=(1, 1), p=(1, 1, 1, 1), d=(1, 1)),
           dict(id="small_planes_stacked", b=16, c=12, n=20, h=4, w=4, k=(3, 3), s=(1, 1), p=(1, 1, 1, 1),
                d=(1, 1)),
           dict(id="s2_32x32", b=2, c=16, n=24, h=32, w=32, k=(3, 3), s=(2, 2), p=(1, 1, 1, 1), d=(1, 1))]
    cases = [c for c in K.CASES if c["b"] > 0] + big
    checked = 0
    for isa in ("simd", "generic"):
        if isa == "generic":
            os.environ["STRIPECONV_CPU_ISA"] = "generic"
        else:
            os.environ.pop("STRIPECONV_CPU_ISA", None)
        for threads in (1, 2):
            torch.set_num_threads(threads)
            for dtype in (torch.float32, torch.float64):
                for case in cases:
                    s, p, d, groups = list(case["s"]), list(case["p"]), list(case["d"]), case.get("groups", 1)
                    x, w, mask, bias = K._make(case, dtype)
                    ref = K._dense(x, w, mask, bias, s, p, d, groups)
                    gy = torch.randn(ref.shape, dtype=dtype, generator=torch.Generator().manual_seed(1))
                    gx_ref = ops.grad_input(gy, w, mask, list(x.shape), s, p, d, groups)
                    gw_ref = ops.grad_weight(gy, x, w, mask, s, p, d, groups)
                    for fmt in (torch.contiguous_format, torch.channels_last):
                        for side in ("end", "start"):
                            print(f"{case['id']} {dtype} {fmt} {side} {isa} {threads} threads", flush=True)
                            xg = guarded(x.contiguous(memory_format=fmt), side)
                            gyg = guarded(gy.contiguous(memory_format=fmt), side)
                            wg, mg = guarded(w, side), guarded(mask, side)
                            bg = guarded(bias, side) if bias is not None else None
                            y = ops.forward(xg, wg, bg, mg, s, p, d, groups)
                            torch.testing.assert_close(y, ref, **K.TOL[dtype])
                            gx = ops.grad_input(gyg, wg, mg, list(x.shape), s, p, d, groups)
                            torch.testing.assert_close(gx, gx_ref, **K.TOL[dtype])
                            gw = ops.grad_weight(gyg, xg, wg, mg, s, p, d, groups)
                            torch.testing.assert_close(gw, gw_ref, **K.TOL[dtype])
                            checked += 1
                    _KEEP.clear()
    print(f"checked {checked}", flush=True)
    return 0


def test_guard_page_placement_faults_on_a_read_past_the_end():
    """The harness itself: reading the element after a guarded tensor kills the child."""
    code = ("import sys; sys.path.insert(0, %r); import torch, test_cpu_guard_pages as G; "
            "t = G.guarded(torch.arange(10.0), 'end'); print(t.sum().item(), flush=True); "
            "import ctypes; print(ctypes.c_float.from_address(t.data_ptr() + 40).value)") % os.path.dirname(__file__)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.stdout.splitlines()[0] == "45.0"
    assert proc.returncode == -11, (proc.returncode, proc.stdout, proc.stderr[-2000:])


def test_ops_read_only_inside_their_inputs():
    proc = subprocess.run([sys.executable, __file__], capture_output=True, text=True, timeout=900)
    last = proc.stdout.strip().splitlines()[-1:] or ["(nothing printed)"]
    assert proc.returncode == 0, (f"the ops failed (exit {proc.returncode}) on {last[0]}\n"
                                  f"{proc.stderr[-3000:]}")
    assert last[0].startswith("checked ") and int(last[0].split()[1]) > 1000


if __name__ == "__main__":
    sys.exit(_run_all())
