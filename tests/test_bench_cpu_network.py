"""Smoke test of bench/bench_cpu_network.py on a small network."""
from __future__ import annotations

import json
import os
import sys

import pytest

pytest.importorskip("stripeconv._C", reason="stripeconv._C is not built; run `pip install --no-build-isolation -e .`")

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
import bench_cpu_network  # noqa: E402


def test_network_bench_runs_and_writes_json(tmp_path, capsys):
    import stripeconv

    before = stripeconv.get_backend()
    out = tmp_path / "net.json"
    res = bench_cpu_network.main(["--model", "resnet8", "--width", "0.5", "--batch", "3", "--repeats", "2",
                                  "--density", "0.4", "--json", str(out)])
    assert stripeconv.get_backend() == before
    data = json.loads(out.read_text())
    assert data["stripe_layers"] == res["stripe_layers"] > 0
    assert 0 < data["kept_stripes"] < data["stripes"]
    for k in ("dense_nchw", "stripe_nchw", "dense_channels_last", "stripe_channels_last"):
        assert len(data["raw_s"][k]) == 2 and data["timings"][k]["median_ms"] > 0
    assert "speedup over the faster dense layout" in capsys.readouterr().out


def test_network_bench_times_dense_policies(tmp_path, monkeypatch):
    monkeypatch.setenv("STRIPECONV_CPU_DENSE", "never")
    res = bench_cpu_network.main(["--model", "resnet8", "--width", "0.5", "--batch", "2", "--repeats", "2",
                                  "--density", "1", "--dense-policies", "always", "auto"])
    for k in ("stripe_nchw", "stripe_nchw@always", "stripe_channels_last@auto", "stripe_channels_last@always"):
        assert len(res["raw_s"][k]) == 2 and res["timings"][k]["median_ms"] > 0
    assert os.environ["STRIPECONV_CPU_DENSE"] == "never"  # the environment's setting, restored


def test_network_bench_refuses_bad_density():
    with pytest.raises(SystemExit):
        bench_cpu_network.main(["--density", "0"])


def test_network_bench_fuses_batchnorm_in_both_networks(monkeypatch, capsys):
    import stripeconv
    import torch

    fused = []

    def spy(model, *args, **kwargs):
        out = stripeconv.fusion.fuse_batchnorm(model, *args, **kwargs)
        fused.append(sum(isinstance(m, torch.nn.BatchNorm2d) for m in out.modules()))
        return out

    monkeypatch.setattr(stripeconv, "fuse_batchnorm", spy)
    res = bench_cpu_network.main(["--model", "resnet8", "--width", "0.5", "--batch", "2", "--repeats", "2",
                                  "--density", "0.5", "--fuse-batchnorm"])
    assert fused == [0, 0]  # dense and stripe network, no BatchNorm left in either
    assert res["timings"]["stripe_nchw"]["median_ms"] > 0
    assert "(BatchNorm fused)" in capsys.readouterr().out


def test_network_bench_compiles_every_network(capsys):
    res = bench_cpu_network.main(["--model", "resnet8", "--width", "0.5", "--batch", "2", "--repeats", "2",
                                  "--density", "0.5", "--compile"])
    assert all(len(res["raw_s"][k]) == 2 for k in ("dense_nchw", "stripe_nchw", "stripe_channels_last"))
    assert "(torch.compile)" in capsys.readouterr().out
