"""Smoke test of bench/bench_gpu_network.py on CPU (--cpu-smoke: the code paths, not the times)."""
from __future__ import annotations

import json
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
import bench_gpu_network  # noqa: E402


def test_network_latency_runs_eager_and_compiled_and_writes_json(tmp_path, capsys):
    res = bench_gpu_network.main(["--cpu-smoke", "--model", "resnet8", "--batches", "1,2", "--modes",
                                  "eager,compile,reduce-overhead", "--out", str(tmp_path)])
    # reduce-overhead needs CUDA graphs: the smoke run leaves it out
    assert [(r["batch"], r["mode"]) for r in res["rows"]] == [(1, "eager"), (1, "compile"), (2, "eager"),
                                                              (2, "compile")]
    for row in res["rows"]:
        assert row["dense"]["median_ms"] > 0 and row["stripe"]["median_ms"] > 0
        assert row["speedup"] == pytest.approx(row["dense"]["median_ms"] / row["stripe"]["median_ms"])
        assert row["stripe_error"] < 1e-4  # float32 against the dense network on the masked weights
    (written,) = tmp_path.glob("bench_gpu_network_resnet8_*.json")
    data = json.loads(written.read_text())
    assert data["rows"] == res["rows"] and data["stripe_layers"] == 6 and 0 < data["density"] < 1
    assert isinstance(data["dispatch_decisions"], list)  # timed choices: none on CPU
    assert "speedup" in capsys.readouterr().out


def test_budget_and_bad_modes(tmp_path):
    res = bench_gpu_network.main(["--cpu-smoke", "--model", "resnet8", "--budget-s", "0", "--out", str(tmp_path)])
    assert res["rows"] == []
    with pytest.raises(SystemExit):
        bench_gpu_network.main(["--cpu-smoke", "--modes", "eager,graphs", "--out", str(tmp_path)])


def test_reordered_network_computes_the_same(tmp_path):
    """--reorder: the stripe network with the inner conv of each block in tile order, still equal to the
    dense network on the masked weights."""
    res = bench_gpu_network.main(["--cpu-smoke", "--model", "resnet8", "--batches", "2", "--modes", "eager",
                                  "--reorder", "--out", str(tmp_path)])
    assert res["reordered_layers"] == 3  # conv1 of the one block per stage; the others feed residual sums
    assert res["rows"][0]["stripe_error"] < 1e-4


def test_profile_and_recompile_count(tmp_path, capsys):
    """--profile: per network a profile of its calls; a steady state that compiles nothing after the warm-up."""
    res = bench_gpu_network.main(["--cpu-smoke", "--model", "resnet8", "--batches", "2", "--modes", "eager,compile",
                                  "--profile", "2", "--out", str(tmp_path)])
    for row in res["rows"]:
        for name in ("dense", "stripe"):
            assert row[name]["frames_compiled_while_timing"] == 0
            prof = row[name]["profile"]
            assert prof["calls"] == 2 and prof["host_ms_per_call"] > 0 and prof["blocking"] == []
        ops = {r["name"] for r in row["stripe"]["profile"]["top_host"]}
        assert any(op.startswith("stripeconv") for op in ops), ops  # the stripe convs are where the time goes
        python = row["stripe"]["python_profile"]
        assert python["calls"] == 2 and python["own_us_per_call"] > 0
        assert python["top_own"] == sorted(python["top_own"], key=lambda r: -r["own_us_per_call"])
        functions = [r["function"] for r in python["top_own"]]
        assert row["mode"] != "eager" or any("stripeconv/" in f or "backends/" in f for f in functions), functions
    out = capsys.readouterr().out
    assert "stripe profile: host" in out and "stripe python:" in out
    with pytest.raises(SystemExit):
        bench_gpu_network.main(["--cpu-smoke", "--profile", "-1", "--out", str(tmp_path)])
