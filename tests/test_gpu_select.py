"""The per-shape choice between the stripe kernels and cuDNN (stripeconv.backends.gpu_select).

The timing itself needs a GPU; here the timer is replaced so the decision logic, the cache and
the overrides are checked on any machine. The dense path's numerics are checked against the
oracle in tests/test_triton.py (cases ``dense_handover*``).
"""
from __future__ import annotations

import os

import pytest
import torch

from stripeconv.backends import gpu_select

CUDA = torch.device("cuda")


@pytest.fixture(autouse=True)
def _fresh(monkeypatch):
    gpu_select.clear()
    monkeypatch.delenv("STRIPECONV_GPU_DENSE", raising=False)
    monkeypatch.delenv("STRIPECONV_DETERMINISTIC", raising=False)
    monkeypatch.delenv("STRIPECONV_TRITON_EXCLUDE", raising=False)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    yield
    gpu_select.clear()


def _fake_timer(monkeypatch, times):
    calls = []

    def timer(fn, repeats=5):
        name = fn()
        calls.append(name)
        return times[name]
    monkeypatch.setattr(gpu_select, "_time_ms", timer)
    return calls


def _candidates():
    return {"stripe64": lambda: "stripe64", "stripe32": lambda: "stripe32", "dense": lambda: "dense"}


def test_times_once_and_caches_the_fastest(monkeypatch):
    calls = _fake_timer(monkeypatch, {"stripe64": 2.0, "stripe32": 1.5, "dense": 3.0})
    assert gpu_select.choose(("k", 1), _candidates(), CUDA) == "stripe32"
    assert sorted(calls) == ["dense", "stripe32", "stripe64"]
    assert gpu_select.choose(("k", 1), _candidates(), CUDA) == "stripe32"
    assert len(calls) == 3  # cached: no second timing
    (entry,) = gpu_select.decisions()
    assert entry["choice"] == "stripe32" and entry["times_ms"]["dense"] == 3.0


def test_a_decision_for_other_candidates_is_taken_again(monkeypatch):
    """Two layers of one shape whose masks offer different candidates may share a key: a decision naming a
    candidate the call does not have is not returned, the call's own candidates are timed."""
    calls = _fake_timer(monkeypatch, {"stripe64": 2.0, "stripe32": 1.5, "stripe_tiles": 1.0, "dense": 3.0})
    assert gpu_select.choose(("k",), _candidates(), CUDA) == "stripe32"
    others = {"stripe64": lambda: "stripe64", "stripe_tiles": lambda: "stripe_tiles", "dense": lambda: "dense"}
    assert gpu_select.choose(("k",), others, CUDA) == "stripe_tiles"
    assert sorted(calls[3:]) == ["dense", "stripe64", "stripe_tiles"]


def test_dense_wins_when_faster(monkeypatch):
    _fake_timer(monkeypatch, {"stripe64": 2.0, "stripe32": 2.5, "dense": 1.0})
    assert gpu_select.choose(("dense-wins",), _candidates(), CUDA) == "dense"


def test_overrides(monkeypatch):
    calls = _fake_timer(monkeypatch, {"stripe64": 2.0, "stripe32": 1.0, "dense": 0.5})
    monkeypatch.setenv("STRIPECONV_GPU_DENSE", "always")
    assert gpu_select.choose(("o",), _candidates(), CUDA) == "dense"
    # No dense candidate (asymmetric padding, say): "always" falls back to the stripe kernel.
    assert gpu_select.choose(("o",), {"stripe": lambda: "stripe"}, CUDA) == "stripe"
    assert calls == [] and gpu_select.decisions() == []
    monkeypatch.setenv("STRIPECONV_GPU_DENSE", "sometimes")
    with pytest.raises(ValueError, match="STRIPECONV_GPU_DENSE must be one of auto, never, always"):
        gpu_select.choose(("o",), _candidates(), CUDA)


def test_never_times_only_the_stripe_kernels(monkeypatch):
    calls = _fake_timer(monkeypatch, {"stripe64": 2.0, "stripe32": 1.0, "dense": 0.5})
    monkeypatch.setenv("STRIPECONV_GPU_DENSE", "never")
    assert gpu_select.choice(("o",), _candidates(), CUDA) == ("stripe32", True)
    assert sorted(calls) == ["stripe32", "stripe64"]
    assert gpu_select.choose(("o1",), {"stripe64": lambda: 0, "dense": lambda: 0}, CUDA) == "stripe64"
    assert len(calls) == 2  # a lone stripe kernel is not timed
    # Decisions are kept per mode: "auto" times the same key again, dense included.
    monkeypatch.setenv("STRIPECONV_GPU_DENSE", "auto")
    assert gpu_select.choose(("o",), _candidates(), CUDA) == "dense"
    assert sorted((d["mode"], d["choice"], d["times_ms"] == {}) for d in gpu_select.decisions()) == [
        ("auto", "dense", False), ("never", "stripe32", False), ("never", "stripe64", True)]


def test_excluded_variants_are_neither_timed_nor_chosen(monkeypatch):
    times = {"stripe64": 2.0, "stripe64_tma": 0.5, "stripe32": 1.5, "stripe32x8": 0.4, "dense": 3.0}
    calls = _fake_timer(monkeypatch, times)
    candidates = {name: (lambda name=name: name) for name in times}
    assert gpu_select.choose(("x",), candidates, CUDA) == "stripe32x8"
    monkeypatch.setenv("STRIPECONV_TRITON_EXCLUDE", " *_tma, stripe*x* ")
    assert gpu_select.excluded() == ("*_tma", "stripe*x*")
    calls.clear()
    # Kept per exclusion: the same key is timed again without the excluded names.
    assert gpu_select.choose(("x",), candidates, CUDA) == "stripe32"
    assert sorted(calls) == ["dense", "stripe32", "stripe64"]
    assert sorted((d["excluded"], d["choice"]) for d in gpu_select.decisions()) == [
        ([], "stripe32x8"), (["*_tma", "stripe*x*"], "stripe32")]
    # Deterministic mode takes the first stripe candidate left.
    monkeypatch.setenv("STRIPECONV_TRITON_EXCLUDE", "stripe64*")
    monkeypatch.setenv("STRIPECONV_DETERMINISTIC", "1")
    assert gpu_select.choose(("y",), candidates, CUDA) == "stripe32"
    # "dense" is STRIPECONV_GPU_DENSE's to rule out; patterns that leave no stripe kernel are an error.
    monkeypatch.setenv("STRIPECONV_TRITON_EXCLUDE", "stripe*,dense")
    with pytest.raises(ValueError, match="leaves none of the stripe kernels stripe64, stripe64_tma"):
        gpu_select.choose(("z",), candidates, CUDA)


def test_captured_variants_decide_the_choice_under_capture(monkeypatch):
    """A candidate's captured variant (the dense hand-over scattering its weight, as a CUDA graph replays it)
    is timed beside it: the eager choice ignores it, the choice under capture takes it in place of the
    candidate's eager time."""
    times = {"stripe64": 2.0, "stripe32": 1.5, "dense": 1.0, "dense scattered": 1.8}
    calls = _fake_timer(monkeypatch, times)
    captured = {"dense": lambda: "dense scattered"}
    assert gpu_select.choose(("c",), _candidates(), CUDA, captured) == "dense"
    assert sorted(calls) == ["dense", "dense scattered", "stripe32", "stripe64"]
    assert gpu_select.captured_choice(("c",)) == "stripe32"
    (entry,) = gpu_select.decisions()
    assert entry["captured_times_ms"] == {"dense": 1.8} and entry["captured_choice"] == "stripe32"
    assert "dense scattered" not in entry["times_ms"]
    # Where the scatter costs little, dense stays the choice under capture too.
    times["dense scattered"] = 1.2
    assert gpu_select.choose(("d",), _candidates(), CUDA, captured) == "dense"
    assert gpu_select.captured_choice(("d",)) == "dense"
    # A captured variant that cannot run is no choice under capture; the candidate keeps its eager choice.
    class OutOfResources(Exception):  # not a device fault (test_a_candidate_that_cannot_run_here_is_dropped)
        pass

    def failing():
        raise OutOfResources("the scatter's launch does not fit")
    assert gpu_select.choose(("f",), _candidates(), CUDA, {"dense": failing}) == "dense"
    assert gpu_select.captured_choice(("f",)) == "stripe32"
    (entry,) = [d for d in gpu_select.decisions() if d["key"] == ("f",)]
    assert entry["captured_times_ms"] == {} and entry["captured_choice"] == "stripe32"
    # Per mode: "never" times no dense candidate, so it has no choice under capture of its own.
    monkeypatch.setenv("STRIPECONV_GPU_DENSE", "never")
    assert gpu_select.choose(("c",), _candidates(), CUDA, captured) == "stripe32"
    assert gpu_select.captured_choice(("c",)) is None
    monkeypatch.delenv("STRIPECONV_GPU_DENSE")
    # A key decided again (its choice is not among the call's candidates) for candidates without captured
    # variants forgets its choice under capture.
    times.update({"dense": 3.0, "dense scattered": 3.5, "stripe_tiles": 0.5})
    assert gpu_select.choose(("e",), _candidates(), CUDA, captured) == "stripe32"
    assert gpu_select.captured_choice(("e",)) == "stripe32"
    others = {"stripe64": lambda: "stripe64", "stripe_tiles": lambda: "stripe_tiles", "dense": lambda: "dense"}
    assert gpu_select.choose(("e",), others, CUDA) == "stripe_tiles"
    assert gpu_select.captured_choice(("e",)) is None
    gpu_select.clear()
    assert gpu_select.captured_choice(("d",)) is None


def test_settled_and_generation(monkeypatch):
    _fake_timer(monkeypatch, {"stripe64": 2.0, "stripe32": 1.0, "dense": 0.5})
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    assert gpu_select.choice(("g",), _candidates(), CUDA) == ("stripe64", False)  # undecided while capturing
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    assert gpu_select.choice(("g",), _candidates(), CUDA) == ("dense", True)
    assert gpu_select.choice(("g",), _candidates(), torch.device("cpu")) == ("dense", True)  # decided key
    assert gpu_select.choice(("h",), _candidates(), torch.device("cpu")) == ("stripe64", True)
    before = gpu_select.generation()
    gpu_select.clear()
    assert gpu_select.generation() != before and gpu_select.decisions() == []


def test_no_timing_off_gpu_or_while_capturing(monkeypatch):
    calls = _fake_timer(monkeypatch, {"stripe64": 2.0, "stripe32": 1.0, "dense": 0.5})
    assert gpu_select.choose(("cpu",), _candidates(), torch.device("cpu")) == "stripe64"
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    assert gpu_select.choose(("capturing",), _candidates(), CUDA) == "stripe64"
    assert calls == [] and gpu_select.decisions() == []


def test_block_width_candidates():
    pytest.importorskip("numpy")
    from stripeconv.backends import triton_plans as tp

    gen = torch.Generator().manual_seed(0)
    dense = torch.ones(256, 3, 3, dtype=torch.bool)
    assert tp.tile_widths(dense, 1, "cpu") == [64, 128]  # dense: wider tiles waste nothing
    random = torch.rand(256, 3, 3, generator=gen) < 0.3
    widths = tp.tile_widths(random, 1, "cpu")
    assert 32 in widths and 128 not in widths  # random: narrower tiles compute fewer stripes
    assert tp.forward_plan(random, 1, 32).computed < 0.9 * tp.forward_plan(random, 1, 64).computed
    assert tp.tile_widths(torch.ones(32, 3, 3, dtype=torch.bool), 1, "cpu") == [32]  # narrow layer
    # 45 filters: one 64-wide tile pads to 64 columns, three 16-wide tiles to 48.
    assert tp.tile_widths(torch.ones(45, 3, 3, dtype=torch.bool), 1, "cpu") == [64, 16]
    assert tp.tile_efficiency(torch.ones(45, 3, 3, dtype=torch.bool), 16) == pytest.approx(45 / 48)


def test_best_tile_efficiency():
    from stripeconv.backends import triton_plans as tp

    gen = torch.Generator().manual_seed(3)
    patterns = torch.rand(8, 3, 3, generator=gen) < 0.4
    patterns[:, 1, 1] = True
    grouped = patterns.repeat_interleave(32, 0)  # 256 filters, one pattern per 32
    assert tp.best_tile_efficiency(grouped) == pytest.approx(1.0)
    assert tp.best_tile_efficiency(torch.ones(45, 3, 3, dtype=torch.bool)) == pytest.approx(45 / 48)
    assert tp.best_tile_efficiency(torch.zeros(64, 3, 3, dtype=torch.bool)) == 1.0
    random = torch.rand(256, 3, 3, generator=gen) < 0.3
    assert tp.best_tile_efficiency(random) == max(tp.tile_efficiency(random, w) for w in tp.tile_widths(random))


def test_a_candidate_that_cannot_run_here_is_dropped(monkeypatch):
    """A kernel that cannot run on this GPU (triton's OutOfResources, say) loses the choice; a device
    fault is raised, since it leaves the CUDA context unusable."""
    class OutOfResources(Exception):  # triton.runtime.errors.OutOfResources is no RuntimeError either
        pass

    def timer(fn, repeats=5):
        name = fn()
        if name == "stripe32":
            raise OutOfResources("out of resource: shared memory, Required: 197124, Hardware limit: 166912")
        return {"stripe64": 2.0, "dense": 3.0}[name]
    monkeypatch.setattr(gpu_select, "_time_ms", timer)
    assert gpu_select.choose(("oor",), _candidates(), CUDA) == "stripe64"

    def faulting(fn, repeats=5):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")
    monkeypatch.setattr(gpu_select, "_time_ms", faulting)
    with pytest.raises(RuntimeError, match="illegal memory access"):
        gpu_select.choose(("fault",), _candidates(), CUDA)


@pytest.fixture
def deterministic_algorithms():
    old = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(old[0], warn_only=old[1])


@pytest.mark.parametrize("switch", ["env", "torch"])
def test_deterministic_mode_times_nothing(monkeypatch, request, switch):
    """Timings vary from run to run and candidates round differently: in deterministic mode the choice
    is fixed (the first stripe candidate, dense only under "always") so every process gets the same bits."""
    calls = _fake_timer(monkeypatch, {"stripe64": 2.0, "stripe32": 1.0, "dense": 0.5})
    assert not gpu_select.deterministic()
    if switch == "env":
        monkeypatch.setenv("STRIPECONV_DETERMINISTIC", "1")
    else:
        request.getfixturevalue("deterministic_algorithms")
    assert gpu_select.deterministic()
    assert gpu_select.choice(("d",), _candidates(), CUDA) == ("stripe64", True)
    monkeypatch.setenv("STRIPECONV_GPU_DENSE", "never")
    assert gpu_select.choice(("d",), _candidates(), CUDA) == ("stripe64", True)
    monkeypatch.setenv("STRIPECONV_GPU_DENSE", "always")
    assert gpu_select.choice(("d",), _candidates(), CUDA) == ("dense", True)
    assert calls == [] and gpu_select.decisions() == []


def test_deterministic_switch_values(monkeypatch):
    for value, expected in (("0", False), ("", False), (" 0 ", False), ("1", True), ("yes", True)):
        monkeypatch.setenv("STRIPECONV_DETERMINISTIC", value)
        assert gpu_select.deterministic() is expected, value


def test_environment_reads_see_every_change_through_os_environ(monkeypatch):
    """The settled launch path reads its variables through a cheaper lookup than os.environ.get: it
    must see the same values after every kind of change."""
    from stripeconv.backends._environ import getenv

    name = "STRIPECONV_TEST_ENVIRON_READ"
    monkeypatch.delenv(name, raising=False)
    assert getenv(name) is None and getenv(name, "fallback") == "fallback"
    monkeypatch.setenv(name, "always")
    assert getenv(name) == os.environ.get(name) == "always"
    os.environ[name] = "ñever"  # non-ASCII round-trips like os.environ's own decoding
    assert getenv(name) == os.environ[name]
    del os.environ[name]
    assert getenv(name, "auto") == "auto"
    monkeypatch.setenv("STRIPECONV_GPU_DENSE", "never")
    assert gpu_select.mode() == "never"
    monkeypatch.setenv("STRIPECONV_GPU_DENSE", "bogus")
    with pytest.raises(ValueError, match="STRIPECONV_GPU_DENSE must be one of"):
        gpu_select.mode()


def test_timing_gives_the_gpu_a_head_start(monkeypatch):
    """Each timed call starts after the stream has been put to sleep, so the host queues the call's
    kernels before the start event runs: the events time GPU work, not the host's launch path."""
    log, made = [], []

    class Event:  # made in (start, end) pairs
        def __init__(self, enable_timing=False):
            self.name = ("start", "end")[len(made) % 2]
            made.append(self)

        def record(self):
            log.append(self.name)

        def synchronize(self):
            pass

        def elapsed_time(self, other):
            return 1.0

    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "_sleep", lambda cycles: log.append(("sleep", cycles)), raising=False)
    monkeypatch.setattr(gpu_select, "_l2_flush", lambda: lambda: log.append("flush"))
    assert gpu_select._time_ms(lambda: log.append("call"), repeats=2) == 1.0
    assert log == ["call"] + ["flush", ("sleep", gpu_select._HEAD_START_CYCLES), "start", "call", "end"] * 2


def test_the_cache_flush_writes_twice_the_l2(monkeypatch):
    """The flush before each timed call writes twice the device's L2 (256 MB where it does not say)."""
    made = []

    class Props:
        L2_cache_size = 50 << 20

    def empty(size, dtype=None, device=None):
        made.append((size, dtype, device))
        return torch.ones(4, dtype=dtype)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: Props())
    monkeypatch.setattr(torch, "empty", empty)
    flush = gpu_select._l2_flush()
    assert made == [(100 << 20, torch.int8, "cuda")]
    assert not flush().any()  # zeroes its buffer
    Props.L2_cache_size = 0
    gpu_select._l2_flush()
    assert made[-1][0] == gpu_select._FLUSH_BYTES_DEFAULT

    def out_of_memory(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")
    monkeypatch.setattr(torch, "empty", out_of_memory)
    assert gpu_select._l2_flush()() is None  # no room for the buffer: no flush, the timing goes on


def _tensor_candidates(results: dict):
    return {name: (lambda value=value: value.clone()) for name, value in results.items()}


def test_a_candidate_with_a_wrong_result_is_never_chosen(monkeypatch):
    """Each candidate's result is compared with the dense conv's (the oracle) before it is timed: one
    that differs by more than rounding is left out, however fast, with a warning naming it."""
    gen = torch.Generator().manual_seed(0)
    right = torch.randn(2, 8, 5, 5, generator=gen).to(torch.bfloat16)
    rounded = (right.float() * (1 + 2 ** -9)).to(torch.bfloat16)  # another summation order's rounding
    wrong = right.clone()
    wrong[:, 3] = 0  # a tile of filters never stored
    candidates = _tensor_candidates({"stripe64": rounded, "stripe32": wrong, "stripe16": right, "dense": right})
    name_of = {id(fn): name for name, fn in candidates.items()}
    times = {"stripe64": 2.0, "stripe32": 1.0, "stripe16": 1.5, "dense": 3.0}
    calls = []
    monkeypatch.setattr(gpu_select, "_time_ms",
                        lambda fn, repeats=5: calls.append(name_of[id(fn)]) or times[name_of[id(fn)]])
    with pytest.warns(RuntimeWarning, match=r"'stripe32' kernel's result for fwd differs from the 'dense'"):
        assert gpu_select.choose(("fwd", 1), candidates, CUDA) == "stripe16"
    assert "stripe32" not in calls and sorted(calls) == ["dense", "stripe16", "stripe64"]
    (entry,) = gpu_select.decisions()
    assert set(entry["rejected"]) == {"stripe32"} and entry["rejected"]["stripe32"] > 0.1
    assert "stripe32" not in entry["times_ms"]


def test_the_dense_oracle_checks_the_stripe_kernels_also_where_it_cannot_be_chosen(monkeypatch):
    """Under STRIPECONV_GPU_DENSE=never the dense conv still runs once as the oracle; if every stripe
    kernel disagrees with it, the call fails rather than return a wrong result."""
    monkeypatch.setenv("STRIPECONV_GPU_DENSE", "never")
    right = torch.linspace(-1, 1, 60).view(1, 3, 4, 5)
    timed = []
    monkeypatch.setattr(gpu_select, "_time_ms", lambda fn, repeats=5: timed.append(fn) or 1.0)
    ran = []
    candidates = {"stripe64": lambda: ran.append("stripe64") or right + 0.5,
                  "stripe32": lambda: ran.append("stripe32") or right.flip(-1),
                  "dense": lambda: ran.append("dense") or right.clone()}
    with pytest.warns(RuntimeWarning), pytest.raises(RuntimeError, match="every stripe kernel's result"):
        gpu_select.choose(("fwd", 2), candidates, CUDA)
    assert ran == ["dense", "stripe64", "stripe32"] and timed == []
    candidates["stripe32"] = lambda: right.clone()
    with pytest.warns(RuntimeWarning, match="'stripe64'"):
        assert gpu_select.choose(("fwd", 3), candidates, CUDA) == "stripe32"


def test_a_lone_stripe_kernel_is_checked_against_the_dense_oracle(monkeypatch):
    """Under "never" a shape with one stripe kernel (small channel counts offer no tile variants) is not
    timed, but the dense conv still checks it once: a wrong result fails the call instead of training on
    it, a right one settles without timing."""
    monkeypatch.setenv("STRIPECONV_GPU_DENSE", "never")
    monkeypatch.setattr(gpu_select, "_time_ms", lambda fn, repeats=5: pytest.fail("a lone candidate was timed"))
    right = torch.linspace(-1, 1, 60).view(1, 3, 4, 5)
    ran = []
    candidates = {"stripe": lambda: ran.append("stripe") or right * 2, "dense": lambda: ran.append("dense") or right}
    with pytest.warns(RuntimeWarning, match="'stripe'"), pytest.raises(RuntimeError, match="every stripe kernel"):
        gpu_select.choose(("dgrad", 1), candidates, CUDA)
    assert ran == ["dense", "stripe"]
    candidates["stripe"] = lambda: ran.append("stripe") or right + 1e-4
    assert gpu_select.choice(("dgrad", 2), candidates, CUDA) == ("stripe", True)
    assert gpu_select.choose(("dgrad", 2), candidates, CUDA) == "stripe"  # decided: nothing runs again
    assert ran == ["dense", "stripe", "dense", "stripe"]
    assert [d["times_ms"] for d in gpu_select.decisions()] == [{}]
    # Without a dense candidate (asymmetric padding) there is nothing to check it against.
    assert gpu_select.choose(("dgrad", 3), {"stripe": lambda: pytest.fail("ran")}, CUDA) == "stripe"


def test_without_a_dense_candidate_the_first_stripe_kernel_is_the_reference(monkeypatch):
    monkeypatch.setattr(gpu_select, "_time_ms", lambda fn, repeats=5: 1.0)
    right = torch.randn(4, 16)
    with pytest.warns(RuntimeWarning, match="'stripe32'.*'stripe64'"):
        assert gpu_select.choose(("dgrad",), _tensor_candidates({"stripe64": right, "stripe32": -right}),
                                 CUDA) == "stripe64"


@pytest.mark.parametrize("chunk", [1 << 24, 1])  # whole tensors, and one row of dim 0 at a time
def test_disagreement(monkeypatch, chunk):
    monkeypatch.setattr(gpu_select, "_COMPARE_CHUNK", chunk)
    big = torch.randn(6, 4, 5, 5).contiguous(memory_format=torch.channels_last)
    off = big.clone()
    off[4, 2, 3, 1] += 0.25  # in the fifth chunk of one-row chunks
    assert gpu_select.disagreement(off, big) == pytest.approx(0.25 / big.abs().max().item())
    assert gpu_select.disagreement(torch.tensor(3.0), torch.tensor(2.0)) == 0.5  # 0-d tensors
    x = torch.tensor([[1.0, -4.0], [2.0, 0.5]])
    assert gpu_select.disagreement(x.clone(), x) == 0.0
    assert gpu_select.disagreement(x + torch.tensor([[0.0, 0.0], [0.0, 0.2]]), x) == pytest.approx(0.05)
    assert gpu_select.disagreement(x.contiguous().t().contiguous().t(), x) == 0.0  # layouts do not matter
    assert gpu_select.disagreement(x.view(4), x) == float("inf")  # a wrong shape
    assert gpu_select.disagreement(torch.full_like(x, float("nan")), x) == float("inf")
    assert gpu_select.disagreement(x, torch.full_like(x, float("inf"))) is None  # inputs that overflow: no verdict
    assert gpu_select.disagreement(torch.zeros(0), torch.zeros(0)) is None
    assert gpu_select.disagreement("stripe64", "dense") is None
    zeros = torch.zeros(3)
    assert gpu_select.disagreement(zeros, zeros) == 0.0 and gpu_select.disagreement(zeros + 1, zeros) == float("inf")
    assert gpu_select.tolerance(torch.bfloat16) == gpu_select.tolerance(torch.float16) > gpu_select.tolerance(
        torch.float32)


def test_recording_collects_what_each_call_asks_for(monkeypatch):
    """A recording sees every choice asked inside it, settled by an earlier call or not, with the mode and
    exclusions its decision is kept under; nested recordings both see it, nothing is recorded outside."""
    _fake_timer(monkeypatch, {"stripe64": 2.0, "stripe32": 1.5, "dense": 3.0})
    gpu_select.choose(("before",), _candidates(), CUDA)
    with gpu_select.recording() as outer:
        gpu_select.choose(("k", 1), _candidates(), CUDA)
        monkeypatch.setenv("STRIPECONV_GPU_DENSE", "never")
        monkeypatch.setenv("STRIPECONV_TRITON_EXCLUDE", "stripe32")
        with gpu_select.recording() as inner:
            gpu_select.choose(("k", 1), _candidates(), CUDA)
        gpu_select.choose(("before",), _candidates(), CUDA)  # decided before the recording started
    gpu_select.choose(("after",), _candidates(), CUDA)
    assert [(a["key"], a["mode"], a["excluded"], a["choice"]) for a in outer] == [
        (("k", 1), "auto", [], "stripe32"), (("k", 1), "never", ["stripe32"], "stripe64"),
        (("before",), "never", ["stripe32"], "stripe64")]
    assert inner == [outer[1]]
    assert not gpu_select._recorders
    # each recorded call matches its decision's entry
    decided = {(d["mode"], tuple(d["excluded"]), d["key"]): d["choice"] for d in gpu_select.decisions()}
    assert all(decided[(a["mode"], tuple(a["excluded"]), a["key"])] == a["choice"] for a in outer)
