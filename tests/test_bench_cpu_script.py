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

    monkeypatch.setattr(bench_cpu, "LAYERS", [("8->8 6x6 b2", 8, 8, 6, 2)])
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
                    "reference", "dense_fwd_bwd", "stripe_fwd_bwd"):
            assert r[key]["median_ms"] > 0, key
        assert r["speedup"] > 0 and r["speedup_channels_last"] > 0 and r["speedup_fwd_bwd"] > 0
