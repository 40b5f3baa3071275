"""The Fashion-MNIST benchmark scripts (bench/fashion_fidelity.py, bench/soft_pruning_diagnosis.py)
run end to end at their --quick sizes and write what their results files promise."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"


@pytest.fixture(scope="module")
def bench_modules():
    sys.path.insert(0, str(BENCH))
    try:
        import fashion_fidelity
        import soft_pruning_diagnosis
        yield fashion_fidelity, soft_pruning_diagnosis
    finally:
        sys.path.remove(str(BENCH))


def test_fidelity_quick_run_writes_rows_and_table(bench_modules, tmp_path):
    fidelity, _ = bench_modules
    fidelity.main(["--quick", "--archs", "vgg", "--budgets", "0.5", "--methods", "L1Filter", "SFP",
                   "--out", str(tmp_path)])
    data = json.loads((tmp_path / "fashion_fidelity_quick.json").read_text())
    assert [(r["arch"], r["method"]) for r in data["rows"]] == [("vgg", "L1Filter"), ("vgg", "SFP")]
    for r in data["rows"]:
        assert 0.45 < r["flops_reduction"] < 0.6
        assert 0.0 <= r["acc_at_export"] <= 1.0 and r["acc_at_export"] == r["acc_masked"]
    table = (tmp_path / "fashion_fidelity_quick.md").read_text()
    assert "| vgg | SFP | 50% |" in table and "soft_pruning_diagnosis" in table


def test_soft_pruning_diagnosis_measures_the_zeroed_filters(bench_modules, tmp_path):
    _, diagnosis = bench_modules
    report = diagnosis.main(["--quick", "--prune-epochs", "2", "--out", str(tmp_path)])
    (saved,) = json.loads((tmp_path / "soft_pruning_diagnosis_quick.json").read_text())
    assert saved == json.loads(json.dumps(report))
    assert report["layers"], "no pruned conv was measured"
    for layer in report["layers"]:
        assert 0 < layer["zeroed"] < layer["filters"]
        for key in ("norm_ratio", "conv_std_ratio", "bn_std_ratio"):
            assert layer[key] > 0
    for key in ("acc_pretrained", "acc_before_final_zeroing", "acc_after_final_zeroing"):
        assert 0.0 <= report[key] <= 1.0
