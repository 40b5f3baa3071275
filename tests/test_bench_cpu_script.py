"""Smoke test of bench/bench_cpu.py: one small run writes every column it prints to its JSON."""
from __future__ import annotations

import json
import os
import sys

import pytest
import torch

pytest.importorskip("stripeconv._C", reason="stripeconv._C is not built; run `pip install --no-build-isolation -e .`")

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
import bench_cpu  # noqa: E402


def test_bench_cpu_writes_all_columns(tmp_path, monkeypatch, capsys):
    import stripeconv

    monkeypatch.setattr(bench_cpu, "LAYERS", [bench_cpu.Layer.of(8, 8, 6, 2)])
    previous = stripeconv.get_backend()
    out = tmp_path / "cpu.json"
    try:
        bench_cpu.main(["--repeats", "2", "--ref-repeats", "1", "--densities", "1.0", "0.5", "--backward",
                        "--json", str(out)])
    finally:
        stripeconv.set_backend(previous)
    printed = capsys.readouterr().out
    assert "cl x" in printed and "8->8 6x6 b2" in printed
    data = json.loads(out.read_text())
    assert data["machine"]["torch"] == torch.__version__
    rows = data["results"]
    assert [r["density"] for r in rows] == [1.0, 0.5]
    for r in rows:
        for key in ("dense_nchw", "dense_channels_last", "stripe_cpu", "stripe_cpu_channels_last", "channel_pruned",
                    "reference", "dense_fwd_bwd", "stripe_fwd_bwd", "dense_fwd_bwd_channels_last",
                    "stripe_fwd_bwd_channels_last"):
            assert r[key]["median_ms"] > 0, key
        assert r["speedup"] > 0 and r["speedup_channels_last"] > 0 and r["speedup_fwd_bwd"] > 0
        assert r["speedup_fwd_bwd_channels_last"] > 0 and r["stride"] == 1


def test_bench_cpu_times_given_layers_at_each_batch_size(tmp_path, capsys):
    import stripeconv

    previous = stripeconv.get_backend()
    out = tmp_path / "cpu.json"
    try:
        bench_cpu.main(["--layer", "4,6,5,3", "--layer", "8,4,7,1,2", "--batches", "1", "2", "--repeats", "2",
                        "--no-reference", "--densities", "0.5", "--backward", "--json", str(out)])
    finally:
        stripeconv.set_backend(previous)
    rows = json.loads(out.read_text())["results"]
    assert [(r["layer"], r["cin"], r["cout"], r["hw"], r["batch"], r["stride"]) for r in rows] == [
        ("4->6 5x5 b1", 4, 6, 5, 1, 1), ("4->6 5x5 b2", 4, 6, 5, 2, 1),
        ("8->4 7x7 s2 b1", 8, 4, 7, 1, 2), ("8->4 7x7 s2 b2", 8, 4, 7, 2, 2)]
    assert all(r["speedup_fwd_bwd_channels_last"] > 0 for r in rows)
    assert "8->4 7x7 s2 b2" in capsys.readouterr().out


@pytest.mark.parametrize("argv", [["--layer", "4,6,5"], ["--layer", "4,6,0,2"], ["--layer", "a,b,c,d"],
                                  ["--layer", "4,6,5,2,0"], ["--layer", "4,6,5,2,2,2"],
                                  ["--batches", "0"]])
def test_bench_cpu_refuses_bad_layer_specs(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        bench_cpu.main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "CIN,COUT,HW,BATCH" in err or "--batches must be positive" in err
