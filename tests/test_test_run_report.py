"""The plugin that keeps a GPU test run legible (tests/_test_run_report.py)."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap


def test_failures_show_as_they_happen_and_tests_after_a_cuda_fault_fail_at_once(tmp_path):
    (tmp_path / "test_faults.py").write_text(textwrap.dedent('''
        def test_before():
            pass

        def test_other_error():
            raise RuntimeError("some other error")

        def test_faulting():
            raise RuntimeError("CUDA error: an illegal memory access was encountered")

        def test_after():
            pass
    '''))
    env = {**os.environ, "PYTHONPATH": os.path.dirname(__file__)}
    run = subprocess.run([sys.executable, "-m", "pytest", "-p", "_test_run_report", "-p", "no:cacheprovider", "-q", "-rA",
                          "test_faults.py"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    out = run.stdout
    # each failure as it happens, before pytest's summary
    assert "failed: test_faults.py::test_other_error (call): RuntimeError: some other error" in run.stderr
    assert "PASSED test_faults.py::test_before" in out
    assert "FAILED test_faults.py::test_other_error" in out and "FAILED test_faults.py::test_faulting" in out
    assert "ERROR test_faults.py::test_after" in out
    assert "not run: an earlier test in this process, test_faults.py::test_faulting, hit a CUDA fault" in out, out
