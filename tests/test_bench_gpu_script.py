"""bench/bench_gpu.py end to end on CPU (``--cpu-smoke``: the Triton interpreter on tiny layers).

The timings of a smoke run mean nothing; what is checked is that the script a GPU session
runs produces complete raw JSON, the merged summary and the target check, so that the device
time is spent measuring rather than debugging.
"""
from __future__ import annotations

import functools
import importlib.util
import json
import os
import re
import subprocess
import sys

import pytest

from conftest import require_compiling_triton_kernels

pytest.importorskip("triton", reason="bench_gpu.py imports the Triton backend; install triton")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "bench", "bench_gpu.py")


def _bench_module():
    spec = importlib.util.spec_from_file_location("bench_gpu", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@functools.lru_cache(maxsize=None)
def _interpreter_reason() -> str:
    """'' when the Triton interpreter can run the kernels here, else why not (a skip reason)."""
    code = "from stripeconv.backends import triton_backend as tb; print(tb.is_available()[1])"
    env = {**os.environ, "PYTHONPATH": ROOT, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    return proc.stdout.strip() if proc.returncode == 0 else proc.stderr[-500:]


def _require_interpreter():
    reason = _interpreter_reason()
    if reason:
        pytest.skip(reason)


def _run(*args):
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run([sys.executable, SCRIPT, *args], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def test_cpu_smoke_run_writes_complete_results(tmp_path):
    _require_interpreter()
    out = _run("--cpu-smoke", "--out", str(tmp_path), "--tag", "_smoke", "--masks", "random,realistic,grouped")
    (jpath,) = tmp_path.glob("bench_gpu_*_smoke.json")
    data = json.loads(jpath.read_text())
    meta, results = data["meta"], data["results"]
    for field in ("date", "device", "torch", "triton", "cuda", "dtype", "wall_s"):
        assert field in meta, field
    assert meta["layers_done"] == ["smoke.s1", "smoke.s2"] and meta["layers_skipped"] == []
    # 2 layers x (density 1: one mask; density 0.3: random, realistic, grouped) x 2 modes
    assert len(results) == 2 * 4 * 2
    assert {r["mask"] for r in results} == {"random", "realistic", "grouped"}
    for r in results:
        for method in ("dense", "chanprune", "triton", "stripeconv", "reference", "published"):
            assert r[method]["median_ms"] > 0, (method, r)
        eager_latency = r["batch"] == 1 and r["mode"] == "fwd"  # smoke.s2 has batch 1
        for method in ("dense", "chanprune", "triton", "stripeconv"):
            assert ("host_ms" in r[method]) == eager_latency and r[method].get("host_ms", 1) > 0, (method, r)
        assert "host_ms" not in r["reference"] and "host_ms" not in r["published"]
        for method in ("triton", "stripeconv", "reference", "published"):  # each checked against the oracle
            errors = r[method]["max_rel_error"]
            assert set(errors) == ({"out", "grad_input", "grad_weight", "grad_bias"} if r["mode"] == "fwd+bwd"
                                   else {"out"}), (method, r)
            assert not r[method]["wrong"] and all(e < 1e-4 for e in errors.values()), (method, r)
        assert 0 < r["tile_efficiency"] <= 1
        assert r["floor_flops_ms"] > 0 and r["floor_bytes_ms"] > 0
        for method in ("triton", "stripeconv"):  # what gpu_select chose for the cell's calls (untimed on CPU)
            kernels = r[method]["kernels"]
            assert set(kernels) == ({"fwd", "dgrad", "wgrad"} if r["mode"] == "fwd+bwd" else {"fwd"}), (method, r)
            assert all(k["choice"] and k["ms"] is None for k in kernels.values()), (method, r)
            assert method == "stripeconv" or "dense" not in {k["choice"] for k in kernels.values()}, r
    assert "summary: geometric mean speedup" in out
    merged = _run("--from-json", str(jpath), "--out", str(tmp_path))
    assert "fwd+bwd realistic density 0.30" in merged and "  grouped density 0.30" in merged
    # the same cells from two files are counted once
    twice = _run("--from-json", str(jpath), str(jpath), "--out", str(tmp_path))
    assert f"{len(results)} rows measured twice" in twice
    assert twice.count("fwd+bwd realistic density 0.30") == merged.count("fwd+bwd realistic density 0.30")


def test_published_swp_path_matches_the_oracle():
    """The published code's algorithm, as timed: one 1x1 conv of all kept stripes, then shifted adds."""
    import torch
    import torch.nn.functional as F
    from stripeconv.packing import pack_weight

    bench = _bench_module()
    gen = torch.Generator().manual_seed(0)
    for stride, size in ((1, 8), (2, 9), (2, 8)):
        x = torch.randn(2, 8, size, size, generator=gen)
        weight, bias = torch.randn(16, 8, 3, 3, generator=gen), torch.randn(16, generator=gen)
        mask = torch.rand(16, 3, 3, generator=gen) < 0.4
        want = F.conv2d(x, weight * mask[:, None], bias, stride, 1)
        got = bench.published_swp_conv(x, pack_weight(weight, mask), bias, bench.published_rows(mask), 16, stride, 1,
                                       want.shape[-1])
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_a_wrong_result_is_flagged_and_its_speedup_left_out(capsys):
    """A cell whose stripe conv strays from F.conv2d on the masked weight is marked wrong, however
    fast it was, and the summary and target check count only the others."""
    import torch

    bench = _bench_module()
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 8, 6, 6, generator=gen).requires_grad_(True)
    w_dense, bias = torch.randn(16, 8, 3, 3, generator=gen), torch.randn(16, generator=gen).requires_grad_(True)
    mask = torch.rand(16, 3, 3, generator=gen) < 0.5
    from stripeconv.packing import pack_weight, unpack_weight

    packed = pack_weight(w_dense, mask).requires_grad_(True)
    gy = torch.randn(2, 16, 6, 6, generator=gen)

    def right(x):
        return torch.nn.functional.conv2d(x, unpack_weight(packed, mask), bias, 1, 1)

    def one_position_missed(x):  # the centre position's stripes never added
        centre = mask.clone()
        centre[:, 1, 1] = False
        return torch.nn.functional.conv2d(x, unpack_weight(packed, mask) * centre[:, None], bias, 1, 1)
    timings = {}
    for name, call in (("right", right), ("wrong", one_position_missed)):
        timings[name] = {"median_ms": 1.0}
        bench.check_cell(timings[name], bench.cell_errors(call, x, packed, bias, mask, w_dense, gy, 1, 1, True),
                         torch.float32)
    assert not timings["right"]["wrong"] and max(timings["right"]["max_rel_error"].values()) < 1e-5
    assert timings["wrong"]["wrong"] and timings["wrong"]["max_rel_error"]["out"] > 0.1

    def row(triton):
        return {"layer": "vgg.conv2_2", "mask": "random", "target_density": 0.5, "density": 0.5, "mode": "fwd",
                "batch": 256, "tile_efficiency": 1.0, "dense": {"median_ms": 10.0}, "triton": triton,
                "stripeconv": triton}
    bench.summarize([row({**timings["wrong"], "median_ms": 0.1})])
    out = capsys.readouterr().out
    assert "triton: 1 cells with a wrong result" in out and "vgg.conv2_2 random d=0.5 fwd" in out
    assert "targets (triton)" not in out and "triton  " not in out  # 100x counted nowhere
    bench.summarize([row({**timings["right"], "median_ms": 5.0})])
    out = capsys.readouterr().out
    assert "wrong result" not in out and "triton  2.00x" in out
    assert re.search(r"fwd >= 0.85/d +1 / 1 ", out)
    bench.report_rejected([{"key": "('fwd', 1)", "rejected": {"stripe64_tma": 0.4}},
                           {"key": "('fwd', 2)", "rejected": {"stripe64_tma": 0.9}}, {"key": "k", "rejected": {}}])
    out = capsys.readouterr().out
    assert re.search(r"stripe64_tma +2 call shapes, worst 9.00e-01: \('fwd', 2\)", out)
    bench.report_rejected([{"key": "k", "rejected": {}}])
    assert capsys.readouterr().out == ""


def test_candidate_report_counts_families_beside_cudnn(capsys):
    """Per op and candidate family (widths left out): decisions timed, chosen, faster than cuDNN, and the median
    of its time over the fastest other candidate's; decisions that did not time cuDNN are left out."""
    bench = _bench_module()
    assert bench.candidate_family("stripe16x8_gathered") == "stripe{w}x{w}_gathered"
    bench.report_candidates([
        {"key": "('fwd', 1)", "times_ms": {"stripe64": 2.0, "stripe16": 1.0, "dense": 4.0}, "choice": "stripe16"},
        {"key": "('fwd', 2)", "times_ms": {"stripe64": 3.0, "stripe64_gathered": 1.0, "dense": 2.0},
         "choice": "stripe64_gathered"},
        {"key": "('fwd', 3)", "times_ms": {"stripe64": 1.0, "stripe64_gathered": 9.0}, "choice": "stripe64"},
        {"key": "('wgrad', 1)", "times_ms": {"stripe_tiles_bypos": 3.0, "dense": 1.0}, "choice": "dense"}])
    out = capsys.readouterr().out
    # stripe{w}: best width 1.0 against dense 4.0 (0.25x), then 3.0 against the gathered 1.0 (3x): median 1.625x
    assert re.search(r"fwd +stripe\{w\} +2 +1 +1 +1.62x", out), out
    assert re.search(r"fwd +stripe\{w\}_gathered +1 +1 +1 +0.50x", out), out
    assert re.search(r"wgrad +stripe_tiles_bypos +1 +0 +0 +3.00x", out), out
    bench.report_candidates([{"key": "('fwd', 3)", "times_ms": {"stripe64": 1.0, "stripe32": 2.0}}])
    assert capsys.readouterr().out == ""


def test_training_step_breakdown(capsys):
    """Forward+backward rows with a graph time and timed choices for the three ops: the times of the choices,
    their sum and the rest of the step; choices of runs that did not record them are found in the decisions
    by the key's shapes (input, grad_output, packed rows) and mode, where one key matches."""
    bench = _bench_module()
    row = {"layer": "l", "mask": "random", "target_density": 0.5, "density": 0.5, "batch": 8, "C": 16, "N": 32,
           "H": 10, "k": 3, "stride": 1, "pad": 1, "mode": "fwd+bwd", "dense": {"graph_ms": 0.2}}
    dy, x, w = (f"(({shape}), torch.bfloat16, {cl}, 'cuda:0')" for shape, cl in
                (("8, 32, 10, 10", True), ("8, 16, 10, 10", True), ("144, 16", False)))
    decisions = [
        {"key": f"('fwd', {x}, {w}, True, (1, 1))", "mode": "auto", "excluded": [], "choice": "stripe32",
         "times_ms": {"stripe32": 0.04, "dense": 0.05}},
        {"key": f"('fwd', {x}, {w}, True, (1, 1))", "mode": "never", "excluded": [], "choice": "stripe32",
         "times_ms": {"stripe32": 0.04}},
        {"key": f"('dgrad', {dy}, {w}, (8, 16, 10, 10))", "mode": "auto", "excluded": [], "choice": "dense",
         "times_ms": {"stripe_tiles": 0.09, "dense": 0.06}},
        {"key": f"('wgrad', {dy}, {x}, {w}, (1, 1))", "mode": "auto", "excluded": [], "choice": "stripe_tiles",
         "times_ms": {"stripe_tiles": 0.05, "dense": 0.07}},
        # another mask with as many rows and other plans: two keys, no answer for the triton column's grad input
        {"key": f"('dgrad', {dy}, {w}, (8, 16, 10, 10), 'a')", "mode": "never", "excluded": [], "choice": "stripe",
         "times_ms": {"stripe": 0.1}},
        {"key": f"('dgrad', {dy}, {w}, (8, 16, 10, 10), 'b')", "mode": "never", "excluded": [], "choice": "stripe",
         "times_ms": {"stripe": 0.2}},
        {"key": f"('dgrad', {dy}, {w}, (8, 16, 10, 10))", "mode": "auto", "excluded": ["*_tma"], "choice": "stripe",
         "times_ms": {"stripe": 0.01}}]  # excluded variants: another column
    auto = bench.kernels_from_decisions(row, "stripeconv", decisions)
    assert auto == {"fwd": {"choice": "stripe32", "ms": 0.04}, "dgrad": {"choice": "dense", "ms": 0.06},
                    "wgrad": {"choice": "stripe_tiles", "ms": 0.05}}
    assert set(bench.kernels_from_decisions(row, "triton", decisions)) == {"fwd"}
    assert set(bench.kernels_from_decisions({**row, "mode": "fwd"}, "stripeconv", decisions)) == {"fwd"}
    rows = [{**row, "stripeconv": {"graph_ms": 0.2, "kernels": auto}},
            {**row, "layer": "m", "stripeconv": {"graph_ms": 0.3, "kernels": auto}},
            {**row, "layer": "untimed", "stripeconv": {"graph_ms": 0.3, "kernels": {**auto, "wgrad": {
                "choice": "stripe", "ms": None}}}},
            {**row, "layer": "wrong", "stripeconv": {"graph_ms": 0.3, "wrong": True, "kernels": auto}},
            {**row, "layer": "forward", "mode": "fwd", "stripeconv": {"graph_ms": 0.1, "kernels": auto}},
            {**row, "layer": "captured", "stripeconv": {"graph_ms": 0.25, "kernels": {**auto, "dgrad": {
                "choice": "dense", "ms": 0.06, "captured_choice": "stripe_tiles", "captured_ms": 0.09}}}}]
    bench.report_training_steps(rows, rows=True)
    out = capsys.readouterr().out
    assert "3 rows:" in out, out
    assert re.search(r"captured +random .* 250.0 \| stripe32 +40.0 +stripe_tiles +90.0 .*\| +70.0", out), out
    assert re.search(r"l +random +0.50 +200.0 +200.0 \| stripe32 +40.0 +dense +60.0 +stripe_tiles +50.0 +\| +50.0", out)
    assert re.search(r"m +random .* 300.0 \|.*\| +150.0", out), out
    # shares: forward 20%, 13% and 16%, grad input 30%, 20% and 36%, grad weight 25%, 17% and 20%, rest 25%,
    # 50% and 28%
    assert "median share of the step: forward 16%, grad input 30%, grad weight 20%, rest 28%" in out, out
    bench.chosen_kernels({}, [])  # nothing asked: nothing to report
    assert bench.chosen_kernels({"fwd": {"mode": "auto", "excluded": [], "key": ("fwd", 1), "choice": "stripe16"}},
                                [{"mode": "auto", "excluded": [], "key": ("fwd", 1), "choice": "stripe16",
                                  "times_ms": {"stripe16": 0.5, "stripe32": 0.6}, "captured_choice": "stripe32"}]) == {
        "fwd": {"choice": "stripe16", "ms": 0.5, "captured_choice": "stripe32", "captured_ms": 0.6}}


def test_budget_stops_before_the_next_layer(tmp_path):
    _require_interpreter()
    out = _run("--cpu-smoke", "--out", str(tmp_path), "--budget-s", "0", "--no-backward", "--skip-reference",
               "--graphs")  # accepted; CUDA graphs are skipped without a GPU
    (jpath,) = tmp_path.glob("bench_gpu_*.json")
    meta = json.loads(jpath.read_text())["meta"]
    assert meta["layers_done"] == ["smoke.s1"] and meta["layers_skipped"] == ["smoke.s2"]
    assert "budget of 0 s reached" in out


def test_profile_host_profiles_the_first_and_lowest_density_cells(tmp_path):
    """--profile-host records cProfile's view of the host's Python (the functions with the most time of their
    own): the dense column once per layer and mode, the triton and stripeconv columns at a layer's first
    density and at the first mask kind of its lowest (where the op may hand the shape to cuDNN)."""
    _require_interpreter()
    out = _run("--cpu-smoke", "--out", str(tmp_path), "--skip-reference", "--profile-host", "2", "--masks",
               "random,realistic")
    (jpath,) = tmp_path.glob("bench_gpu_*.json")
    results = json.loads(jpath.read_text())["results"]
    for layer in ("smoke.s1", "smoke.s2"):
        for mode in ("fwd", "fwd+bwd"):
            cells = [r for r in results if r["layer"] == layer and r["mode"] == mode]
            assert [(r["target_density"], r["mask"]) for r in cells] == [(1.0, "random"), (0.3, "random"),
                                                                          (0.3, "realistic")]
            for column in ("dense", "triton", "stripeconv"):
                profiles = [r[column].get("python_profile") for r in cells]
                assert all(p is not None and p["calls"] == 2 and p["top_own"] for p in profiles[:2]), (layer, column)
                if column != "dense":  # the dense column's timing is one per layer and mode, shared by its cells
                    assert profiles[2] is None, (layer, mode, column)
    assert out.count("triton fwd+bwd python:") == 4


def test_grouped_masks_share_patterns():
    bench = _bench_module()
    gen = __import__("torch").Generator().manual_seed(0)
    mask = bench.make_mask(256, 3, 0.3, "grouped", gen)
    groups = mask.view(256 // bench.GROUP, bench.GROUP, 9)
    assert (groups == groups[:, :1]).all()  # one pattern per group
    assert abs(mask.float().mean().item() - 0.3) < 0.1
    with pytest.raises(ValueError, match="mask kind"):
        bench.make_mask(8, 3, 0.5, "striped", gen)


def test_reordered_masks_are_permuted_rows_in_tile_order():
    import torch

    from stripeconv.backends.triton_plans import forward_plans

    bench = _bench_module()
    for kind in ("random", "realistic"):
        plain = bench.make_mask(256, 3, 0.2, kind, torch.Generator().manual_seed(1))
        reordered = bench.make_mask(256, 3, 0.2, f"{kind}-reordered", torch.Generator().manual_seed(1))
        assert sorted(map(tuple, plain.reshape(256, -1).int().tolist())) == \
            sorted(map(tuple, reordered.reshape(256, -1).int().tolist()))
        assert not torch.equal(plain, reordered)
        assert forward_plans(reordered, 1, "cpu")[0].aligned and not forward_plans(plain, 1, "cpu")[0].aligned


def test_precompile_plan_covers_every_cell_of_a_layer():
    """The layer's masks are drawn once, in the order the cells are timed, and the precompile plan
    holds the kernels of every cell: forward always, both gradients unless --no-backward."""
    import argparse

    import torch

    tb = require_compiling_triton_kernels()
    bench = _bench_module()
    precompile = tb.kernels_module("precompile")
    args = argparse.Namespace(densities=[1.0, 0.5, 0.2], masks=["random", "realistic"])
    layer = ("test", 2, 32, 48, 8, 3, 2, 1)
    masks = bench.layer_masks(layer, args, torch.Generator().manual_seed(3))
    assert [(d, kind) for d, kind, _ in masks] == [(1.0, "random"), (0.5, "random"), (0.5, "realistic"),
                                                   (0.2, "random"), (0.2, "realistic")]
    gen = torch.Generator().manual_seed(3)  # the same draws as one cell after the other
    for d, kind, mask in masks:
        assert torch.equal(mask, bench.make_mask(48, 3, d, kind, gen))
    fwd = precompile.plan(bench.precompile_calls(layer, masks, torch.bfloat16, backward=False))
    both = precompile.plan(bench.precompile_calls(layer, masks, torch.bfloat16, backward=True))
    # (stride 2 over an 8x8 input: the TMA forward's and grad weight's parity view; the TMA grad input is
    # stride 1 only; the gather puts a forward's tile-order output in channel order, the row scatter makes the
    # tile-major weight)
    gathers = {"stripe_gather_columns_kernel", "stripe_scatter_rows_kernel"}
    assert {job.kernel for job in fwd} == {"stripe_fwd_kernel", "stripe_fwd_sub_kernel", "stripe_fwd_tma_kernel",
                                           *gathers}
    assert {job.kernel for job in both} == {"stripe_fwd_kernel", "stripe_fwd_sub_kernel", "stripe_fwd_tma_kernel",
                                            "stripe_dgrad_kernel", "stripe_wgrad_kernel",
                                            "stripe_dgrad_tiles_kernel", "stripe_wgrad_tiles_kernel",
                                            "stripe_wgrad_tiles_tma_kernel", *gathers}
    assert all(job.kwargs["HAS_BIAS"] for job in fwd if job.kernel not in gathers)  # (a bias)


def test_plan_only_counts_variants_without_a_gpu():
    require_compiling_triton_kernels()
    out = _run("--quick", "--plan-only")
    match = re.match(r"quick: (\d+) kernel variants to compile \((.*)\)", out)
    assert match, out
    per_kernel = dict((name, int(count)) for name, count in (part.split() for part in match.group(2).split(", ")))
    assert {"stripe_fwd_kernel", "stripe_dgrad_kernel", "stripe_wgrad_kernel"} <= set(per_kernel), out
    assert int(match.group(1)) == sum(per_kernel.values()) and min(per_kernel.values()) > 0


def test_target_check(capsys):
    bench = _bench_module()

    def row(layer, d, mode, dense, stripe):
        return {"layer": layer, "mask": "random", "target_density": d, "mode": mode, "tile_efficiency": 1.0,
                "dense": {"median_ms": dense}, "stripeconv": {"median_ms": stripe}, "triton": {"median_ms": stripe}}

    results = [
        row("r50.layer3", 1.0, "fwd", 1.0, 1.02),     # 0.98x: d=1 met
        row("r50.layer3", 0.5, "fwd", 1.0, 0.5),      # 2.0x >= 1.7x: met
        row("vgg.conv3_x", 0.2, "fwd", 1.0, 0.4),     # 2.5x < 4.25x: missed
        row("vgg.conv3_x", 0.1, "fwd", 1.0, 0.5),     # below d = 0.2: no target
        row("r56.stage3", 0.5, "fwd", 1.0, 2.0),      # ResNet-56: no target
        row("b1.r50.layer4", 0.5, "fwd", 1.0, 1.1),   # batch 1 slower than cuDNN: missed
        row("r50.layer3", 0.5, "fwd+bwd", 1.0, 0.8),  # 1.25x < 1.4x: missed
    ]
    results[5]["dense"]["host_ms"], results[5]["stripeconv"]["host_ms"] = 0.05, 0.04  # eager: 1.25x, met
    results[2]["tile_efficiency"] = 0.5
    assert bench._targets(results[3]) == [] and bench._targets(results[4]) == []
    bench.summarize(results)
    out = capsys.readouterr().out
    counts = dict(re.findall(r"^\s+(\S+(?: eager)? >= \S+)\s+(\d+ / \d+)", out, flags=re.M))
    assert counts == {"d=1 >= 0.95x": "1 / 1", "fwd >= 0.85/d": "1 / 2", "batch-1 >= 1.0x": "0 / 1",
                      "batch-1 eager >= 1.0x": "1 / 1", "fwd+bwd >= 0.7/d": "0 / 1"}, out
    assert "batch 1 with host work, stripeconv: b1.r50.layer4 1.25x (50 us dense)" in out
    # FLOP rate against cuDNN's = speedup x density / tile efficiency: needed 1.7 x 0.5 / 1 and
    # 4.25 x 0.2 / 0.5, measured 2.0 x 0.5 / 1 and 2.5 x 0.2 / 0.5
    assert re.search(r"fwd >= 0.85/d\s+needs\s+1.28x \(1 of 2 cells above cuDNN's rate\), measured\s+1.00x$", out,
                     flags=re.M), out


def test_time_over_the_floor(capsys):
    """Per target and density, the times the target allows, cuDNN's and the kernels' as multiples of the
    cell's floor: the larger of FLOPs / peak and bytes / bandwidth, three passes for forward+backward."""
    bench = _bench_module()

    def row(layer, d, mode, dense, kernels, flops_ms, bytes_ms, graph=True):
        timing = "graph_ms" if graph else "median_ms"
        return {"layer": layer, "mask": "random", "target_density": d, "mode": mode, "tile_efficiency": 1.0,
                "floor_flops_ms": flops_ms, "floor_bytes_ms": bytes_ms,
                "dense": {"median_ms": 2 * dense, timing: dense}, "triton": {"median_ms": 2 * kernels, timing: kernels}}

    results = [
        row("r50.layer3", 0.5, "fwd", 1.0, 0.5, 0.1, 0.2),           # floor 0.2: allows 1/1.7/0.2, 5x, 2.5x
        row("vgg.conv3_x", 0.5, "fwd", 1.0, 0.8, 0.25, 0.05),        # floor 0.25: 2.35x, 4x, 3.2x
        row("vgg.conv3_x", 0.2, "fwd+bwd", 3.0, 3.0, 0.1, 0.3),      # floor 0.9: 3/3.5/0.9 < 1, 3.33x, 3.33x
        row("r50.layer1", 0.2, "fwd+bwd", 1.0, 2.0, 0.1, 0.3, False),  # eager: 1/3.5/0.9, 1.11x, 2.22x
        row("b1.r50.layer4", 0.5, "fwd", 1.0, 1.0, 0.01, 0.01),      # batch 1: left out
    ]
    bench._floor_multiples(results)
    out = capsys.readouterr().out
    lines = {m.group(1) + " " + m.group(2): m.group(3) for m in
             re.finditer(r"^\s+(\S+ >= \S+)\s+d=(\S+)\s+(.*)$", out, flags=re.M)}
    assert set(lines) == {"fwd >= 0.85/d 0.5", "fwd+bwd >= 0.7/d 0.2"}, out
    assert lines["fwd >= 0.85/d 0.5"] == "target allows  2.65x, cuDNN  4.50x, triton  2.85x  (2 cells, 2 replayed)"
    # medians of (0.952, 0.317), (3.333, 1.111), (3.333, 2.222): both ask for less than their floor
    assert lines["fwd+bwd >= 0.7/d 0.2"] == ("target allows  0.63x, cuDNN  2.22x, triton  2.78x  "
                                            "(2 cells, 1 replayed; 2 ask for less than the floor)"), out
