"""bench/tile_plans.py: the host-side report of the forward's tile plans for the GPU benchmark's layers."""
from __future__ import annotations

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_tile_plans_report(tmp_path):
    out = tmp_path / "plans.json"
    cmd = [sys.executable, os.path.join(ROOT, "bench", "tile_plans.py"), "--suites", "resnet56,vgg16",
           "--densities", "0.5,0.1", "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": ROOT})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    results = json.loads(out.read_text())
    rows = results["rows"]
    # one row per (filters, kernel) of the suites, density and mask kind
    assert {r["N"] for r in rows} == {16, 32, 64, 128, 256, 512}
    assert len(rows) == 6 * 2 * 2
    for r in rows:
        assert 0 < r["efficiency_direct"] <= r["efficiency"] <= 1, r
        assert r["aligned_reordered"], r  # filter_order always makes the first forward candidate aligned
        assert 1 <= r["input_reads_subtiles"] <= r["input_reads"], r  # grouping tiles never loads more
    # 512 filters in narrow tiles: groups of up to 8 tiles load each input tile several times less often
    wide = [r for r in rows if r["N"] == 512]
    assert all(r["input_reads_subtiles"] * 2 <= r["input_reads"] for r in wide), wide
    assert set(results["summary"]) == {"0.5", "0.1"}
    assert "density 0.10: mean tile efficiency" in proc.stdout

    bad = subprocess.run(cmd[:2] + ["--suites", "alexnet"], capture_output=True, text=True, timeout=60,
                         env={**os.environ, "PYTHONPATH": ROOT})
    assert bad.returncode == 2 and "unknown suite(s) alexnet" in bad.stderr
