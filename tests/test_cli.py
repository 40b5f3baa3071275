"""The ``stripeconv`` command line: help, methods, typed hyperparameters, the train -> prune -> finetune ->
eval -> bench workflow on the shipped Fashion-MNIST subset, clear data errors, kill + resume, the demo."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import require_onnx_export
from stripeconv import StripeConv2d, cli
from stripeconv.artifacts import load_pruned, read_description
from stripeconv.pruning import METHODS, SWP

ROOT = Path(__file__).resolve().parents[1]
DATA = ["--dataset", "fashion-mnist-subset", "--limit-train", "256", "--limit-test", "128", "--device", "cpu",
        "--no-progress"]
COMMANDS = ["train", "prune", "finetune", "eval", "bench", "onnx", "demo", "methods"]


@pytest.mark.parametrize("command", COMMANDS)
def test_help(command, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main([command, "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    assert f"stripeconv {command}" in text
    assert "(default: True)" not in text and "(default: False)" not in text  # a flag's default is its absence
    if command in ("train", "prune", "finetune"):
        for flag in ("--resume", "--out", "--epochs", "--quiet", "--dataset", "--data"):
            assert flag in text


def test_top_level_help_lists_commands(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    text = capsys.readouterr().out
    assert all(c in text for c in COMMANDS) and "torchrun" in text


def test_methods(capsys):
    assert cli.main(["methods"]) == 0
    text = capsys.readouterr().out
    for name in METHODS:
        assert f"{name}:" in text
    assert "alpha=1e-05" in text and "threshold=0.05" in text  # SWP defaults, read from its signature
    assert cli.main(["methods", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["SWP"]["params"]["alpha"] == 1e-05 and data["SWP"]["description"]


def test_set_is_typed_by_the_signature():
    params = cli.method_params(SWP)
    got = cli.parse_set(["alpha=1e-4", "group_size=2", "skip_first=false", "threshold=0.02", "scope=layer",
                         "ratios={\"features.3\": 0.5}"], params)
    assert got == {"alpha": 1e-4, "group_size": 2, "skip_first": False, "threshold": 0.02, "scope": "layer",
                   "ratios": {"features.3": 0.5}}
    assert isinstance(got["group_size"], int) and isinstance(got["alpha"], float)
    with pytest.raises(cli.CLIError, match="unknown hyperparameter 'alfa'"):
        cli.parse_set(["alfa=1"], params)
    with pytest.raises(cli.CLIError, match="expected a number"):
        cli.parse_set(["alpha=big"], params)
    assert cli.parse_target("0.5") == {"target_flops_reduction": 0.5}
    assert cli.parse_target("ratio=0.3") == {"ratio": 0.3}


def test_config_file(tmp_path):
    pytest.importorskip("yaml")
    cfg = tmp_path / "swp.yaml"
    cfg.write_text("method: SWP\ntarget: flops=0.4\nalpha: 2.0e-5\nepochs: 3\nlr: 0.003\n")
    args = cli.build_parser().parse_args(["prune", "--config", str(cfg), "--set", "threshold=0.01"])
    config = cli.load_config(cfg)
    cli.methods.apply_config_defaults(args, config)
    assert args.epochs == 3 and args.lr == 0.003
    kw = cli.method_kwargs(SWP, args, config)
    assert kw == {"alpha": 2e-5, "epochs": 3, "target_flops_reduction": 0.4, "threshold": 0.01}
    args = cli.build_parser().parse_args(["prune", "--config", str(cfg), "--epochs", "5"])
    cli.methods.apply_config_defaults(args, config)
    assert args.epochs == 5  # the command line wins, for the pruner's schedule too
    assert cli.method_kwargs(SWP, args, config)["epochs"] == 5
    js = tmp_path / "swp.json"
    js.write_text(json.dumps({"method": "SWP", "params": {"alpha": 3e-5}}))
    args = cli.build_parser().parse_args(["prune", "--config", str(js)])
    assert cli.method_kwargs(SWP, args, cli.load_config(js)) == {"alpha": 3e-5, "epochs": 10}


def test_workflow_train_prune_finetune_eval_bench(tmp_path, capsys, monkeypatch):
    base, pr, ft = tmp_path / "base", tmp_path / "swp", tmp_path / "ft"
    assert cli.main(["train", "--model", "cnn-tiny", "--epochs", "1", "--lr", "0.05", "--out", str(base), *DATA]) == 0
    assert (base / "model.pt").is_file() and (base / "train.ckpt").is_file()
    assert cli.main(["prune", "--from", str(base / "model"), "--method", "swp", "--target", "flops=0.4",
                     "--set", "alpha=1e-3", "--epochs", "2", "--out", str(pr), "--no-progress", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "SWP: accuracy" in out and "[prune]" not in out  # --quiet: result line only

    # the saved model loads with one call into an exported StripeConv2d model ...
    model = load_pruned(pr / "pruned")
    assert any(isinstance(m, StripeConv2d) and m.density < 1 for m in model.modules())
    desc = read_description(pr / "pruned")
    assert desc["extra"]["method"] == "SWP" and desc["extra"]["flops_reduction"] > 0.3
    # ... and `stripeconv eval` reproduces the accuracy reported when it was saved
    assert cli.main(["eval", str(pr / "pruned"), "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["samples"] == 128 and res["accuracy"] == desc["extra"]["accuracy"]
    log = [json.loads(line) for line in (pr / "metrics.jsonl").read_text().splitlines()]
    assert [r.get("epoch") for r in log if "train_loss" in r] == [0, 1]
    assert log[-1]["event"] == "saved" and log[-1]["eval_accuracy"] == res["accuracy"]
    report = (pr / "report.md").read_text()
    assert "GPU tile eff." in report  # per exported layer, next to its stripe density
    eff = [float(row.split("|")[3]) for row in report.splitlines() if row.startswith("| features.")]
    assert eff and all(0 < e <= 1 for e in eff)

    assert cli.main(["finetune", str(pr / "pruned"), "--epochs", "1", "--out", str(ft), "--no-progress",
                     "--quiet"]) == 0
    assert "finetune: accuracy" in capsys.readouterr().out
    assert cli.main(["eval", str(ft / "finetuned.pt"), "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["accuracy"] == read_description(ft / "finetuned")["extra"]["accuracy"]
    before = {n: m.stripe_mask for n, m in model.named_modules() if isinstance(m, StripeConv2d)}
    after = {n: m.stripe_mask for n, m in load_pruned(ft / "finetuned").named_modules() if isinstance(m, StripeConv2d)}
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)

    assert cli.main(["bench", str(pr / "pruned"), "--batch-size", "2", "--repeats", "2", "--layers", "--json",
                     "--output", str(tmp_path / "bench.json")]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["results"][0]["batch"] == 2 and res["results"][0]["stripe_ms"] > 0 and res["layers"]
    assert all(0 < row["gpu_tile_efficiency"] <= 1 for row in res["layers"])
    assert cli.main(["bench", str(pr / "pruned"), "--batch-size", "2", "--repeats", "2", "--fuse-bn", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["fuse_bn"] is True and res["results"][0]["stripe_ms"] > 0 and res["reordered"] is None
    assert cli.main(["bench", str(pr / "pruned"), "--batch-size", "2", "--repeats", "2", "--fuse-bn", "--reorder",
                     "--json"]) == 0
    res = json.loads(capsys.readouterr().out)  # a VGG: every conv feeds the next layer alone
    assert res["reordered"] and all(reason is None for reason in res["reordered"].values())

    # ONNX: written, and (with onnxruntime) checked against the model by the command itself
    assert cli.main(["onnx", str(pr / "pruned"), "--output", str(tmp_path), "--fuse-bn"]) == 2
    assert "is a folder" in capsys.readouterr().err
    require_onnx_export()  # the rest has passed by now
    pytest.importorskip("onnxruntime", reason="the command checks the file with onnxruntime")
    assert cli.main(["onnx", str(pr / "pruned"), "--output", str(tmp_path / "m.onnx"), "--fuse-bn"]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert (tmp_path / "m.onnx").stat().st_size > 0 and "input [batch, 1, 28, 28]" in line
    assert float(line.rsplit(" ", 1)[1]) < 1e-4, line
    import onnxruntime

    real_session = onnxruntime.InferenceSession

    class Disagreeing:  # a runtime whose outputs are off by one: the command must fail
        def __init__(self, path):
            self._session = real_session(path)

        def get_inputs(self):
            return self._session.get_inputs()

        def run(self, names, feeds):
            return [out + 1.0 for out in self._session.run(names, feeds)]

    monkeypatch.setattr(onnxruntime, "InferenceSession", Disagreeing)
    assert cli.main(["onnx", str(pr / "pruned"), "--output", str(tmp_path / "m2.onnx")]) == 1
    assert "disagrees with the saved model" in capsys.readouterr().err


@pytest.mark.parametrize("method,extra", [
    ("L1Filter", []), ("PFP", ["--set", "samples=32"]),
    ("MetaPruning", ["--set", "meta_epochs=1", "--set", "population=4", "--set", "iterations=2", "--set",
                     "recalib_batches=2"]),
    ("ACP", ["--set", "particles=2", "--set", "cycles=1", "--set", "fitness_steps=2", "--set", "cluster_images=16"])])
def test_oneshot_method_with_zero_epochs(tmp_path, capsys, method, extra):
    assert cli.main(["prune", "--model", "cnn-tiny", "--method", method, "--target", "ratio=0.5", "--epochs", "0",
                     "--out", str(tmp_path), "--quiet", *extra, *DATA]) == 0
    log = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert log[0]["event"] == "oneshot_prune" and log[-1]["event"] == "saved"
    assert log[0]["flops_reduction"] > 0


def test_oneshot_epochs_train_the_exported_network(tmp_path, capsys):
    """After a one-shot method, `prune --epochs N` trains the exported network: exactly what `prune --epochs 0`
    followed by `finetune --epochs N` computes, with both phases checkpointed."""
    base, direct, zero, ft = (tmp_path / n for n in ("base", "direct", "zero", "ft"))
    assert cli.main(["train", "--model", "cnn-tiny", "--epochs", "1", "--lr", "0.05", "--out", str(base), "--quiet",
                     *DATA]) == 0
    train = ["--lr", "0.02", "--batch-size", "32", "--quiet", "--no-progress"]
    prune = ["prune", "--from", str(base / "model"), "--method", "L1Filter", "--target", "ratio=0.5"]
    assert cli.main([*prune, "--epochs", "2", "--out", str(direct), *train]) == 0
    assert (direct / "prune.ckpt").is_file() and (direct / "retrain.ckpt").is_file()
    log = [json.loads(line) for line in (direct / "metrics.jsonl").read_text().splitlines()]
    assert [(r.get("phase"), r.get("event", r.get("epoch"))) for r in log] == [
        ("prune", "oneshot_prune"), ("retrain", 0), ("retrain", 1), ("export", "saved")]
    assert cli.main([*prune, "--epochs", "0", "--out", str(zero), *train]) == 0
    assert cli.main(["finetune", str(zero / "pruned"), "--epochs", "2", "--out", str(ft), *train]) == 0
    a = torch.load(direct / "pruned.pt", weights_only=True)
    b = torch.load(ft / "finetuned.pt", weights_only=True)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert read_description(direct / "pruned")["extra"]["accuracy"] == read_description(ft / "finetuned")["extra"][
        "accuracy"]
    # --train-full-size: the epochs train the masked full-size model, as the training-time methods do
    full = tmp_path / "full"
    assert cli.main([*prune, "--epochs", "2", "--train-full-size", "--out", str(full), *train]) == 0
    assert not (full / "retrain.ckpt").exists()
    log = [json.loads(line) for line in (full / "metrics.jsonl").read_text().splitlines()]
    assert [r.get("phase") for r in log if "train_loss" in r] == ["prune", "prune"]
    capsys.readouterr()


def test_mobilenet_prunes_its_depthwise_blocks_from_the_command_line(tmp_path, capsys):
    kwargs = json.dumps({"cfg": [[1, 8, 1, 1], [4, 8, 2, 2]], "head_channels": 16})
    assert cli.main(["prune", "--model", "mobilenet_v2", "--model-kwargs", kwargs, "--method", "L1Filter", "--target",
                     "flops=0.4", "--epochs", "1", "--out", str(tmp_path), "--quiet", *DATA]) == 0
    desc = read_description(tmp_path / "pruned")
    assert desc["arch"] == "mobilenet_v2" and desc["extra"]["flops_reduction"] > 0.39
    model = load_pruned(tmp_path / "pruned")
    widths = [m.out_channels for m in model.modules() if isinstance(m, torch.nn.Conv2d) and m.groups > 1]
    assert len(widths) == 3 and min(widths) < 32  # the expanded blocks lost depthwise filters
    capsys.readouterr()
    assert cli.main(["eval", str(tmp_path / "pruned"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["accuracy"] == desc["extra"]["accuracy"]


def test_clear_errors(tmp_path, capsys):
    assert cli.main(["train", "--dataset", "fashion-mnist", "--data", str(tmp_path / "nowhere"), "--out",
                     str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert str(tmp_path / "nowhere") in err and "apt-get install dataset-fashion-mnist" in err
    assert "fashion-mnist-subset" in err
    assert cli.main(["train", "--dataset", "cifar10", "--out", str(tmp_path)]) == 2
    assert "needs --data" in capsys.readouterr().err
    assert cli.main(["train", "--dataset", "cifar10", "--data", str(tmp_path), "--out", str(tmp_path)]) == 2
    assert "cs.toronto.edu" in capsys.readouterr().err
    assert cli.main(["prune", "--method", "nope", "--out", str(tmp_path)]) == 2
    assert "unknown pruning method" in capsys.readouterr().err
    try:
        import torchvision  # noqa: F401
    except ImportError:
        (tmp_path / "train").mkdir()
        (tmp_path / "val").mkdir()
        assert cli.main(["train", "--dataset", "imagefolder", "--data", str(tmp_path), "--out", str(tmp_path)]) == 2
        assert "torchvision" in capsys.readouterr().err


def _prune_cmd(out, method="GHFP", epochs=3):
    return [sys.executable, "-m", "stripeconv", "prune", "--model", "cnn-tiny", "--method", method, "--target",
            "ratio=0.4", "--epochs", str(epochs), "--lr", "0.05", "--out", str(out), "--threads", "1", *DATA]


@pytest.mark.parametrize("method,checkpoint", [("GHFP", "prune.ckpt"), ("L1Filter", "retrain.ckpt")])
def test_killed_process_resumes_to_the_same_result(tmp_path, method, checkpoint):
    """SIGKILL a real `stripeconv prune` after its first training checkpoint (of the exported network after a
    one-shot method), resume it: same saved model as a straight run."""
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    subprocess.run(_prune_cmd(straight, method), env=env, check=True, capture_output=True, timeout=300)
    proc = subprocess.Popen(_prune_cmd(killed, method), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while not (killed / checkpoint).exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (killed / "pruned.pt").exists()
    subprocess.run(_prune_cmd(killed, method) + ["--resume"], env=env, check=True, capture_output=True, timeout=300)
    a = torch.load(straight / "pruned.pt", weights_only=True)
    b = torch.load(killed / "pruned.pt", weights_only=True)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_demo_quick_falls_back_to_the_shipped_subset(tmp_path, capsys, monkeypatch):
    from stripeconv.demo import run_demo

    monkeypatch.setenv("STRIPECONV_FASHION_MNIST", str(tmp_path / "not-installed"))
    s = run_demo(out=str(tmp_path), quick=True, progress=False, quiet=True, bench_batch=8)
    assert s["dataset"] == "fashion-mnist-subset"
    text = capsys.readouterr().out
    assert "stripeconv demo" in text and "FLOPs" in text and "per layer" in text
    report = (tmp_path / "report.md").read_text()
    assert "Per layer" in report and "test accuracy" in report and "latency" in report
    assert 0.3 < s["prune_report"]["flops_reduction"] < 0.8
    assert (tmp_path / "metrics.jsonl").is_file() and (tmp_path / "summary.json").is_file()
    assert cli.main(["eval", str(tmp_path / "pruned"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["accuracy"] == s["accuracy_after"]


def test_budget_search_method_gets_val_split_and_search_steps(tmp_path, capsys):
    """DSA needs val_data and search_steps: the CLI holds out training data and sets half the steps."""
    assert cli.main(["prune", "--model", "cnn-tiny", "--method", "DSA", "--target", "flops=0.4", "--epochs", "2",
                     "--out", str(tmp_path), *DATA]) == 0
    out = capsys.readouterr().out
    assert "held out" in out and "search_steps=" in out
    report = json.loads((tmp_path / "prune_report.json").read_text())
    assert 0.39 <= report["flops_reduction"] <= 0.45
