"""Every Triton candidate (tile widths, plans, store layouts, split-K, TMA, the tile gradients' variants,
the dense hand-over) on random convolutions, in Triton's interpreter, against the fp64 oracle
(tests/fuzz_triton.py; more seeds: ``TRITON_INTERPRET=1 python tests/fuzz_triton.py --seeds 0:500``)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton", reason="triton is not importable; the Triton backend is not tested")

HERE = os.path.dirname(os.path.abspath(__file__))
SEEDS = list(range(32))
WORKERS = 2
TIMEOUT_S = 240


@pytest.fixture(scope="module")
def fuzz_results():
    import stripeconv

    root = os.path.dirname(os.path.dirname(os.path.abspath(stripeconv.__file__)))
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([root] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else []))}
    env.pop("STRIPECONV_BACKEND", None)
    procs = [subprocess.Popen([sys.executable, os.path.join(HERE, "fuzz_triton.py"), "--json", "--seeds",
                               ",".join(map(str, SEEDS[i::WORKERS]))], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(WORKERS)]
    results, logs = {}, []
    for proc in procs:
        try:
            out, err = proc.communicate(timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
        logs.append(err[-3000:])
        for line in out.splitlines():
            if line.startswith("{"):
                r = json.loads(line)
                results[r["seed"]] = r
    return results, "\n".join(logs)


@pytest.mark.parametrize("seed", SEEDS)
def test_every_candidate_agrees_with_the_oracle(seed, fuzz_results):
    results, log = fuzz_results
    if seed not in results:
        pytest.fail(f"no result for seed {seed}; the fuzzer's errors:\n{log}")
    r = results[seed]
    if "skipped" in r:
        pytest.skip(r["skipped"])
    assert r["candidates"], f"{r['geometry']}: no candidate ran"
    assert not r["failures"], f"{r['geometry']}:\n" + "\n".join(r["failures"])
