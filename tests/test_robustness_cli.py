"""Bad input to the command line, the data loaders and the saved-model format gives a clear error (exit status 2,
no traceback) instead of a crash or a silently wrong run; --resume refuses checkpoints of another run; the JSONL
log holds one record per event after re-runs."""
import gzip
import json
import os
import pickle
import re
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from stripeconv import cli, convert, data, models
from stripeconv.artifacts import ArtifactError, load_pruned, save_pruned
from stripeconv.data.embedded import fashion_mnist_subset
from stripeconv.pruning import SWP

from cli_helpers import DATA, TINY, usage_error as _usage_error


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A trained cnn-tiny saved by `stripeconv train` (one short epoch)."""
    out = tmp_path_factory.mktemp("base")
    assert cli.main(["train", "--epochs", "1", "--out", str(out), *TINY]) == 0
    return out / "model"


# ------------------------------------------------------------------------------------- options
@pytest.mark.parametrize("target, expect", [
    ("flops=", "expected a number after 'flops='"),
    ("ratio=abc", "expected a number after 'ratio='"),
    ("ratios={bad", "neither a file nor valid JSON"),
    ("ratios=[0.5]", "expected a mapping of layer name to ratio"),
])
def test_malformed_target_is_a_usage_error(target, expect, tmp_path, capsys):
    _usage_error(["prune", "--method", "SWP", "--target", target, "--out", str(tmp_path), *TINY], capsys, expect)


def test_out_of_range_target_names_the_method_once(tmp_path, capsys):
    err = _usage_error(["prune", "--method", "SWP", "--target", "flops=1.5", "--out", str(tmp_path), *TINY], capsys,
                       "target_flops_reduction must be a number in [0.0, 1.0), got 1.5")
    assert "SWP: SWP:" not in err


@pytest.mark.parametrize("argv", [
    ["train", "--batch-size", "0"], ["train", "--epochs", "-1"], ["train", "--limit-train", "0"],
    ["train", "--limit-train", "-5"], ["train", "--limit-test", "0"], ["train", "--lr", "-1"],
    ["train", "--threads", "0"], ["train", "--width", "-1"], ["train", "--max-steps", "0"],
    ["train", "--eval-batch-size", "0"], ["train", "--workers", "-1"],
    ["prune", "--method", "LBS", "--val-split", "0"], ["prune", "--method", "LBS", "--val-split", "2.5"],
    ["bench", "MODEL", "--batch-size", "0"], ["bench", "MODEL", "--repeats", "0"], ["demo", "--target", "1.5"],
    ["demo", "--train-size", "-3"],
])
def test_out_of_range_option_values_are_usage_errors(argv, base, tmp_path, capsys):
    """Out-of-range values are refused by the parser, before any data is read or any epoch runs."""
    fast = ["--epochs", "0", *TINY, "--out", str(tmp_path)] if argv[0] in ("train", "prune") else []
    argv = [str(base) if a == "MODEL" else a for a in argv]
    _usage_error([*argv[:1], *fast, *argv[1:]], capsys, f"argument {argv[-2]}: expected")


@pytest.mark.parametrize("kwargs, expect", [
    ("{bad", "invalid JSON"), ("[1]", "expected a JSON object"), ('{"foo": 1}', "unexpected keyword argument"),
])
def test_bad_model_kwargs(kwargs, expect, tmp_path, capsys):
    _usage_error(["train", "--model-kwargs", kwargs, "--epochs", "0", "--out", str(tmp_path), *TINY], capsys, expect)


def test_model_options_conflict_with_from(base, tmp_path, capsys):
    """--model together with --from is refused (the saved model fixes the architecture)."""
    _usage_error(["prune", "--from", str(base), "--model", "cnn-small", "--method", "SWP", "--out", str(tmp_path),
                  *DATA], capsys, "cannot be combined with --from")


def test_bad_device(tmp_path, capsys):
    _usage_error(["train", "--device", "bogus", "--epochs", "0", "--out", str(tmp_path), "--model", "cnn-tiny"],
                 capsys, "--device")
    if not torch.cuda.is_available():
        _usage_error(["train", *TINY, "--epochs", "0", "--out", str(tmp_path), "--device", "cuda"], capsys,
                     "CUDA is not available")


# -------------------------------------------------------------------------------------- config
@pytest.mark.parametrize("name, text, expect", [
    ("bad.yaml", "method: SWP\nalpha: [1, 2\n", "invalid YAML"),
    ("bad.json", '{"method": "SWP",', "invalid JSON"),
    ("list.json", "[1, 2]", "expected a mapping"),
    ("typo.yaml", "method: SWP\nalpah: 1.0e-4\n", "unknown keys ['alpah']"),
    ("value.yaml", "method: SWP\nalpha: big\n", "alpha: expected a number"),
    ("option.yaml", "method: SWP\nlr: fast\n", "lr: expected a number"),
    ("choice.yaml", "method: SWP\noptimizer: rmsprop\n", "expected one of sgd, adamw"),
    ("params.yaml", "method: SWP\nparams: 3\n", "'params' must be a mapping"),
])
def test_malformed_config_file(name, text, expect, tmp_path, capsys):
    if name.endswith(".yaml"):
        pytest.importorskip("yaml")
    cfg = tmp_path / name
    cfg.write_text(text)
    _usage_error(["prune", "--config", str(cfg), "--out", str(tmp_path), *TINY], capsys, expect)


def test_config_values_are_typed_and_from_is_honoured(tmp_path):
    """YAML reads 1e-4 as a string and `target: 0.3` as a number; `from:` fills --from."""
    pytest.importorskip("yaml")
    cfg = tmp_path / "swp.yaml"
    cfg.write_text("method: SWP\nalpha: 1e-4\ntarget: 0.3\nfrom: runs/base/model\n")
    args = cli.build_parser().parse_args(["prune", "--config", str(cfg)])
    config = cli.load_config(cfg)
    cli.methods.apply_config_defaults(args, config)
    assert args.from_ == "runs/base/model"
    kw = cli.method_kwargs(SWP, args, config)
    assert kw["alpha"] == 1e-4 and isinstance(kw["alpha"], float) and kw["target_flops_reduction"] == 0.3


# ---------------------------------------------------------------------------------------- data
def _idx(path, arr, code=0x08):
    header = struct.pack(">BBBB", 0, 0, code, arr.ndim) + b"".join(struct.pack(">I", s) for s in arr.shape)
    path.write_bytes(header + arr.tobytes())


def _fashion(root, images=None, labels=None):
    root.mkdir(exist_ok=True)
    x = np.zeros((10, 28, 28), np.uint8) if images is None else images
    y = (np.arange(10) % 10).astype(np.uint8) if labels is None else labels
    for split in ("train", "t10k"):
        _idx(root / f"{split}-images-idx3-ubyte", x)
        _idx(root / f"{split}-labels-idx1-ubyte", y, 0x0D if y.dtype == np.dtype(">f4") else 0x08)
    return root


@pytest.mark.parametrize("case, expect", [
    ("label 200", "labels must be in [0, 10)"),
    ("32x32 images", "expected uint8 images of shape [N, 28, 28]"),
    ("float labels", "integer labels"),
    ("garbage header", "truncated IDX file"),
    ("no dimensions", "declares no dimensions"),
    ("cut gzip", "corrupted gzip"),
])
def test_fashion_mnist_files_are_validated(case, expect, tmp_path, capsys):
    """Out-of-range or float labels, wrong image shapes, a header claiming a huge size, a header without
    dimensions and a cut .gz each raise DatasetFormatError naming the file; the CLI reports it with status 2."""
    root = tmp_path / "fm"
    if case == "label 200":
        _fashion(root, labels=np.array([0, 1, 2, 3, 4, 5, 6, 7, 8, 200], np.uint8))
    elif case == "32x32 images":
        _fashion(root, images=np.zeros((10, 32, 32), np.uint8))
    elif case == "float labels":
        _fashion(root, labels=np.full(10, 0.5, ">f4"))
    elif case == "garbage header":
        _fashion(root)
        (root / "train-images-idx3-ubyte").write_bytes(bytes([0, 0, 8, 3]) + struct.pack(">III", *[2 ** 31] * 3))
    elif case == "no dimensions":
        _fashion(root)
        (root / "train-images-idx3-ubyte").write_bytes(bytes([0, 0, 8, 0]))
    else:
        _fashion(root)
        raw = (root / "train-images-idx3-ubyte").read_bytes()
        (root / "train-images-idx3-ubyte").unlink()
        (root / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(raw)[:40])
    with pytest.raises(data.DatasetFormatError, match=re.escape(expect)):
        data.fashion_mnist_arrays(root, train=True)
    _usage_error(["train", "--dataset", "fashion-mnist", "--data", str(root), "--model", "cnn-tiny", "--epochs", "0",
                  "--out", str(tmp_path / "out")], capsys, expect)


def _cifar(root, change=None):
    root.mkdir(exist_ok=True)
    good = {b"data": np.zeros((4, 3072), np.uint8), b"labels": [0, 1, 2, 3]}
    for i in range(1, 6):
        pickle.dump(good, open(root / f"data_batch_{i}", "wb"))
    pickle.dump({**good, **(change or {})}, open(root / "test_batch", "wb"))
    return root


@pytest.mark.parametrize("change, expect", [
    ({b"labels": [0, 1, 2, 99]}, "labels must be in [0, 10)"),
    ({b"labels": [0, 1]}, "expected 4 integer labels"),
    ({b"data": np.random.rand(4, 3072)}, "expected uint8 data"),
    ({b"data": np.zeros((4, 100), np.uint8)}, "expected uint8 data"),
])
def test_cifar_batches_are_validated(change, expect, tmp_path):
    """Float pixels, rows of the wrong width, label counts that differ from the images and labels out of range
    raise DatasetFormatError naming the batch file."""
    root = _cifar(tmp_path / "c", change)
    with pytest.raises(data.DatasetFormatError, match=re.escape(expect)):
        data.cifar_arrays(root, train=False)


def test_unreadable_cifar_batches(tmp_path, capsys):
    root = _cifar(tmp_path / "c")
    raw = (root / "test_batch").read_bytes()
    (root / "test_batch").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(pickle.UnpicklingError, match="not a readable CIFAR batch"):  # still an UnpicklingError
        data.cifar_arrays(root, train=False)
    _usage_error(["eval", "x", "--dataset", "cifar10", "--data", str(root)], capsys, "no saved model description")
    _usage_error(["train", "--dataset", "cifar10", "--data", str(root), "--model", "cnn-tiny", "--epochs", "0",
                  "--out", str(tmp_path / "out")], capsys, "not a readable CIFAR batch")
    pickle.dump([1, 2], open(root / "test_batch", "wb"))
    with pytest.raises(data.DatasetFormatError, match="expected a dict"):
        data.cifar_arrays(root, train=False)


def test_negative_limit_is_refused():
    """A negative limit is refused (as a slice bound it would keep all but the last images)."""
    with pytest.raises(ValueError, match="limit"):
        fashion_mnist_subset(train=False, limit=-5)


def test_eval_on_a_dataset_the_model_does_not_fit(base, tmp_path, capsys):
    root = _cifar(tmp_path / "c")
    _usage_error(["eval", str(base), "--dataset", "cifar10", "--data", str(root)], capsys,
                 "pass the --dataset it was trained on")


# -------------------------------------------------------------------------------- saved models
def _copy(base, dst):
    dst.mkdir()
    for ext in (".pt", ".json"):
        shutil.copy(base.with_name(base.name + ext), dst / f"model{ext}")
    return dst / "model"


@pytest.mark.parametrize("damage, expect", [
    ("truncated pt", "not a readable state dict"),
    ("missing pt", "no saved weights"),
    ("invalid json", "is not valid JSON"),
    ("no arch", "'arch' is missing"),
    ("unknown arch", "does not describe a model"),
    ("newer format", "upgrade stripeconv"),
    ("layers wrong", "do not fit the architecture"),
])
def test_damaged_saved_model(damage, expect, base, tmp_path, capsys):
    model = _copy(base, tmp_path / "m")
    pt, js = model.with_suffix(".pt"), model.with_suffix(".json")
    desc = json.loads(js.read_text())
    if damage == "truncated pt":
        pt.write_bytes(pt.read_bytes()[:500])
    elif damage == "missing pt":
        pt.unlink()
    elif damage == "invalid json":
        js.write_text(js.read_text()[:100])
    else:
        if damage == "no arch":
            del desc["arch"]
        elif damage == "unknown arch":
            desc["arch"] = "nope"
        elif damage == "newer format":
            desc["format"] = 99
        else:
            name = next(k for k, v in desc["layers"].items() if v["type"] == "Conv2d")
            desc["layers"][name]["out_channels"] += 1
        js.write_text(json.dumps(desc))
    with pytest.raises((ArtifactError, FileNotFoundError), match=expect):
        load_pruned(model)
    _usage_error(["eval", str(model)], capsys, expect)


def test_weights_whose_masks_disagree_with_the_description(tmp_path):
    """A .pt whose stripe masks keep other densities than its .json records is refused (same shapes, so the
    state dict alone would load)."""
    def pruned(density):
        torch.manual_seed(0)
        model = models.resnet8(num_classes=10, width=0.5)
        conv = model.layer1[0].conv1
        mask = torch.rand(conv.out_channels, 3, 3) < density
        mask[:, 1, 1] = True  # no dead filter: same shapes for both
        convert(model, {"layer1.0.conv1": mask})
        return model

    save_pruned(pruned(0.3), tmp_path / "a", "resnet8", {"num_classes": 10, "width": 0.5})
    save_pruned(pruned(0.8), tmp_path / "b", "resnet8", {"num_classes": 10, "width": 0.5})
    load_pruned(tmp_path / "a")
    shutil.copy(tmp_path / "b.pt", tmp_path / "a.pt")
    with pytest.raises(ArtifactError, match="disagree"):
        load_pruned(tmp_path / "a")


def test_weights_with_another_mask_of_the_same_density(tmp_path):
    """The description records each mask's digest: a .pt holding a different mask of the same density is
    refused too; a description written without digests still loads."""
    def pruned(roll):
        torch.manual_seed(0)
        model = models.resnet8(num_classes=10, width=0.5)
        conv = model.layer1[0].conv1
        mask = torch.zeros(conv.out_channels, 3, 3, dtype=torch.bool)
        mask[:, 1, 1] = True
        mask[torch.arange(conv.out_channels), 0, (torch.arange(conv.out_channels) + roll) % 3] = True
        convert(model, {"layer1.0.conv1": mask})
        return model

    save_pruned(pruned(0), tmp_path / "a", "resnet8", {"num_classes": 10, "width": 0.5})
    save_pruned(pruned(1), tmp_path / "b", "resnet8", {"num_classes": 10, "width": 0.5})
    desc_a, desc_b = (json.loads((tmp_path / f"{n}.json").read_text())["layers"]["layer1.0.conv1"] for n in "ab")
    assert desc_a["density"] == desc_b["density"] and desc_a["mask_sha256"] != desc_b["mask_sha256"]
    shutil.copy(tmp_path / "b.pt", tmp_path / "a.pt")
    with pytest.raises(ArtifactError, match="keeps other stripes in the weights than in the description"):
        load_pruned(tmp_path / "a")
    js = tmp_path / "a.json"
    desc = json.loads(js.read_text())
    for spec in desc["layers"].values():
        spec.pop("mask_sha256", None)
    js.write_text(json.dumps(desc))
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(load_pruned(tmp_path / "a")(x), load_pruned(tmp_path / "b")(x))


def test_output_paths_of_the_wrong_kind(base, tmp_path, capsys):
    """--out naming a file and bench --output naming a folder are refused before any training or timing."""
    _usage_error(["train", "--epochs", "1", "--out", str(base) + ".json", *TINY], capsys, "is a file")
    _usage_error(["bench", str(base), "--output", str(tmp_path)], capsys, "is a folder")


def test_bench_output_into_a_new_folder(base, tmp_path):
    out = tmp_path / "new" / "bench.json"
    assert cli.main(["bench", str(base), "--batch-size", "1", "--repeats", "1", "--layouts", "nchw", "--json",
                     "--output", str(out), "--device", "cpu"]) == 0
    assert json.loads(out.read_text())["results"][0]["batch"] == 1


# ---------------------------------------------------------------------------------------- resume
def _prune(out, *more):
    target = [] if "--target" in more else ["--target", "flops=0.3"]  # a repeated --target is an error
    return ["prune", "--method", "SWP", *target, "--epochs", "1", "--out", str(out), *TINY, *more]


@pytest.mark.parametrize("change, expect", [
    (["--method", "GHFP", "--target", "ratio=0.3"], "method: 'SWP' -> 'GHFP'"),
    (["--target", "flops=0.6"], "params.target_flops_reduction: 0.3 -> 0.6"),
    (["--lr", "0.5"], "training.lr"),
    (["--epochs", "2"], "a run of 1 epochs, this run has 2"),
])
def test_resume_refuses_a_checkpoint_of_another_run(change, expect, tmp_path, capsys):
    """--resume with another method, target, learning rate or epoch count is refused, naming what differs."""
    assert cli.main(_prune(tmp_path)) == 0
    _usage_error(_prune(tmp_path, "--resume", *change), capsys, expect)


def test_resume_from_a_damaged_or_foreign_checkpoint(tmp_path, capsys):
    assert cli.main(["train", "--epochs", "1", "--out", str(tmp_path), *TINY]) == 0
    ckpt = tmp_path / "train.ckpt"
    shutil.copy(ckpt, tmp_path / "prune.ckpt")
    _usage_error(_prune(tmp_path, "--resume"), capsys, "checkpoint is of phase 'train'")
    ckpt.write_bytes(ckpt.read_bytes()[:1000])
    _usage_error(["train", "--epochs", "1", "--out", str(tmp_path), "--resume", *TINY], capsys,
                 "truncated or corrupted")
    ckpt.write_bytes(b"garbage\n")
    _usage_error(["train", "--epochs", "1", "--out", str(tmp_path), "--resume", *TINY], capsys,
                 "truncated or corrupted")


def test_metrics_log_has_one_record_per_event_after_reruns(tmp_path):
    """A fresh run into a used folder replaces that command's records (one-shot and export included), and a
    --resume of a finished run does not add a second 'saved' record."""
    oneshot = ["prune", "--method", "L1Filter", "--target", "ratio=0.3", "--epochs", "1", "--out", str(tmp_path),
               *TINY]
    assert cli.main(oneshot) == 0
    assert cli.main(oneshot) == 0
    log = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r.get("event", r.get("epoch")) for r in log] == ["oneshot_prune", 0, "saved"]

    train = ["train", "--epochs", "1", "--out", str(tmp_path), *TINY]
    assert cli.main(train) == 0
    assert cli.main([*train, "--resume"]) == 0
    log = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["phase"], r.get("event", r.get("epoch"))) for r in log] == \
        [("prune", "oneshot_prune"), ("retrain", 0), ("export", "saved"), ("train", 0), ("train", "saved")]


def test_a_closed_output_pipe_ends_the_command_quietly(tmp_path):
    """``stripeconv methods | head -1``: when the reader has gone, the command stops with 141 (as if
    killed by SIGPIPE) and no traceback, instead of a BrokenPipeError."""
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before the first line is written
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    try:
        p = subprocess.run([sys.executable, "-m", "stripeconv", "methods"], stdout=write_end, stderr=subprocess.PIPE,
                           cwd=tmp_path, env=env, text=True, timeout=120)
    finally:
        os.close(write_end)
    assert p.returncode == 141, p.stderr
    assert "Traceback" not in p.stderr and "BrokenPipe" not in p.stderr, p.stderr
