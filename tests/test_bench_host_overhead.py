"""bench/host_overhead.py runs (in a child process: it switches on Triton's interpreter before importing triton)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(tmp_path, *options) -> dict:
    """host_overhead.py with ``options`` in a child process; its JSON results (a skip where this
    triton's interpreter cannot load the kernels)."""
    pytest.importorskip("triton", reason="host_overhead.py times the Triton backend; install triton")
    out = tmp_path / "host.json"
    cmd = [sys.executable, os.path.join(ROOT, "bench", "host_overhead.py"), *options, "--json", str(out)]
    env = {**os.environ, "PYTHONPATH": ROOT}
    env.pop("STRIPECONV_BACKEND", None)
    env.pop("TRITON_INTERPRET", None)  # the script switches it on itself unless --triton-launch
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    said = proc.stderr + proc.stdout
    if "cannot load its kernels" in said or "backend 'triton' is not available" in said:
        pytest.skip(f"this triton's interpreter cannot run the kernels: {proc.stderr.strip()[-500:]}")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads(out.read_text())


CALLS = {"forward, batch 1", "grad input, batch 32", "grad weight, batch 32", "layer forward, batch 1",
         "layer forward+backward, batch 1", "dense weight, kept", "dense weight, scattered",
         "layer forward, dense hand-over", "nn.Conv2d forward, batch 1"}


@pytest.mark.parametrize("through_autotuner", [False, True])
def test_host_overhead_script(tmp_path, through_autotuner):
    results = _run(tmp_path, "--calls", "5", "--repeats", "2", *(["--through-autotuner"] if through_autotuner else []))
    assert results["launch"].startswith("through the autotuner" if through_autotuner else "settled")
    assert set(results["us"]) == CALLS
    for timing in results["us"].values():
        assert len(timing["per_depth"]) == len(results["depths"]) > 1
        assert 0 < timing["min"] == min(timing["per_depth"]) <= timing["median"] <= timing["max"]


@pytest.mark.parametrize("direct", [True, False])
def test_host_overhead_with_tritons_launch_path(tmp_path, direct):
    """--triton-launch: the kernels compile for sm_90 and launch through Triton's own path into a stubbed
    driver; settled calls reach the compiled kernels directly unless --no-direct."""
    pytest.importorskip("triton.backends.compiler", reason="this triton has no GPUTarget to compile for")
    results = _run(tmp_path, "--triton-launch", *([] if direct else ["--no-direct", "--frames"]), "--calls", "5",
                   "--repeats", "1")
    assert "Triton's launch path" in results["launch"]
    assert ("launched directly" in results["launch"]) == direct
    assert set(results["us"]) == CALLS
    for timing in results["us"].values():
        assert 0 < timing["min"] <= timing["median"] <= timing["max"]
    if not direct:  # --frames: each call's Python frames, the package's own among them
        assert set(results["frames"]) == CALLS
        for frames in results["frames"].values():
            assert 1 <= frames["most_at_one_depth"] <= frames["frames"] == sum(frames["per_depth"])
            assert frames["within_most_at_one_depth"] <= frames["within_frames"] <= frames["frames"]
        assert results["frames"]["nn.Conv2d forward, batch 1"]["within_frames"] == 0
        assert results["frames"]["forward, batch 1"]["within_frames"] > 0


def test_host_overhead_network(tmp_path):
    """--network times a whole network's forwards on the Triton backend, eager and compiled, from each call depth."""
    results = _run(tmp_path, "--network", "resnet20", "--calls", "1", "--repeats", "1")
    assert results["network"].startswith("resnet20, 18 stripe convs")
    assert set(results["ms"]) == {"eager", "compiled"}
    for timing in results["ms"].values():
        assert len(timing["per_depth"]) == len(results["depths"]) > 1
        assert 0 < timing["min"] == min(timing["per_depth"]) <= timing["median"] <= timing["max"]
