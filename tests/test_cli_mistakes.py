"""The command line on the settings users get wrong: --resume compares effective settings and names a changed
method; --val-split, a repeated --target, --train-full-size, --data with the shipped subset and a missing FLOPs
target are clear errors; data hints name the command's own options; ONNX files are self-contained with a `batch`
dimension; help shows each default once; eval on a run folder lists its models; --out's default and a replaced
run are stated."""
import json
import re
import shutil

import pytest
import torch

from stripeconv import cli

from cli_helpers import DATA, TINY, usage_error as _usage_error

COMMANDS = ["train", "prune", "finetune", "eval", "bench", "onnx", "demo", "methods"]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A cnn-tiny saved by `stripeconv train` in its run folder."""
    out = tmp_path_factory.mktemp("base")
    assert cli.main(["train", "--epochs", "0", "--out", str(out), *TINY]) == 0
    return out / "model"


def _swp(out, *more):
    return ["prune", "--method", "SWP", "--target", "flops=0.3", "--epochs", "1", "--out", str(out), *TINY, *more]


# ---------------------------------------------------------------------------------------- resume
def test_resume_compares_effective_hyperparameters(tmp_path, capsys):
    """A hyperparameter spelled out at its default is the same run; another value is refused, showing the
    checkpoint's effective value (not None)."""
    assert cli.main(_swp(tmp_path)) == 0
    assert cli.main(_swp(tmp_path, "--resume", "--set", "alpha=1e-5")) == 0  # SWP's default
    _usage_error(_swp(tmp_path, "--resume", "--set", "alpha=2e-5"), capsys, "params.alpha: 1e-05 -> 2e-05")


def test_resume_with_another_method_names_the_method(base, tmp_path, capsys):
    """A one-shot method resumed on a training-time method's checkpoint: the method differs, not the epochs."""
    prune = ["prune", "--from", str(base), "--target", "flops=0.3", "--epochs", "1", "--out", str(tmp_path), *DATA]
    assert cli.main([*prune, "--method", "SWP"]) == 0
    err = _usage_error([*prune, "--method", "L1Filter", "--resume"], capsys, "method: 'SWP' -> 'L1Filter'")
    assert "epochs" not in err


# --------------------------------------------------------------------------------------- options
def test_val_split_with_a_method_that_takes_no_held_out_data(tmp_path, capsys):
    err = _usage_error(_swp(tmp_path, "--val-split", "0.2"), capsys, "--val-split: SWP")
    assert all(m in err for m in ("LBS", "DAIS", "DSA", "OrthoReg", "MetaPruning", "ACP")), err
    assert not (tmp_path / "prune.ckpt").exists()


def test_repeated_target_is_refused(tmp_path, capsys):
    _usage_error(_swp(tmp_path, "--target", "ratio=0.3"), capsys, "--target: given twice")


def test_train_full_size_with_a_training_time_method(tmp_path, capsys):
    _usage_error(_swp(tmp_path, "--train-full-size"), capsys, "--train-full-size applies to one-shot methods only")
    assert not (tmp_path / "prune.ckpt").exists()


def test_data_with_the_shipped_subset_is_refused(tmp_path, capsys):
    _usage_error(["train", "--epochs", "0", "--data", str(tmp_path), "--out", str(tmp_path), *TINY], capsys,
                 "fashion-mnist-subset is shipped with stripeconv and reads no folder")


def test_missing_flops_target_points_to_target_option(tmp_path, capsys):
    err = _usage_error(["prune", "--method", "DAIS", "--target", "ratio=0.3", "--epochs", "1", "--out", str(tmp_path),
                        *TINY], capsys, "DAIS needs --target flops=F")
    assert "--set" not in err


def test_unknown_hyperparameter_lists_no_internal_names(tmp_path, capsys):
    err = _usage_error(_swp(tmp_path, "--set", "alfa=1"), capsys, "unknown hyperparameter 'alfa'")
    assert "alpha" in err and "require_target" not in err


def test_demo_data_hint_names_the_demos_own_options(tmp_path, capsys):
    """The demo has no --dataset: its hint says what it offers instead."""
    err = _usage_error(["demo", "--data", str(tmp_path / "nowhere"), "--quick", "--out", str(tmp_path / "demo"),
                        "--no-progress", "--quiet"], capsys, "leave out --data: the demo then reads the installed")
    assert "--dataset" not in err


# ------------------------------------------------------------------------------------------ help
def _entries(text: str) -> list:
    """One string per option of a help text: its first line and the deeper-indented lines that continue it."""
    entries, open_ = [], False
    for line in text.splitlines():
        if re.match(r"^  \S", line):
            entries.append(line.strip())
            open_ = True
        elif open_ and re.match(r"^\s{3,}\S", line):
            entries[-1] += " " + line.strip()
        else:
            open_ = False
    return entries


@pytest.mark.parametrize("command", COMMANDS)
def test_help_shows_each_default_once(command, capsys):
    with pytest.raises(SystemExit):
        cli.main([command, "--help"])
    text = capsys.readouterr().out
    assert "(default: None)" not in text
    entries = _entries(text)
    assert any(e.startswith("--") or e.startswith("-h") for e in entries)
    twice = [e for e in entries if len(re.findall("default", e, re.IGNORECASE)) > 1]
    assert not twice, twice


@pytest.mark.parametrize("command", ["train", "prune", "finetune"])
def test_out_help_states_its_default(command, capsys):
    with pytest.raises(SystemExit):
        cli.main([command, "--help"])
    out = [e for e in _entries(capsys.readouterr().out) if e.startswith("--out")]
    assert out and f"(default runs/{command})" in out[0], out


# ------------------------------------------------------------------------------------ run folders
def test_eval_on_a_run_folder_lists_its_saved_models(base, tmp_path, capsys):
    run = tmp_path / "runs" / "swp"
    run.mkdir(parents=True)
    for name in ("pruned", "model"):
        for suffix in (".pt", ".json"):
            shutil.copy(str(base) + suffix, run / (name + suffix))
    (run / "prune_report.json").write_text("{}")  # not a model: no .pt beside it
    _usage_error(["eval", str(run)], capsys, f"its saved models: {run / 'pruned'}, {run / 'model'}")
    # a trailing slash names the folder, also when a saved model sits next to it under the folder's name
    for suffix in (".pt", ".json"):
        shutil.copy(str(base) + suffix, str(run) + suffix)
    assert cli.main(["eval", str(run), "--json"]) == 0
    capsys.readouterr()
    _usage_error(["eval", str(run) + "/"], capsys, f"{run}/ is a folder, not a saved model")
    (tmp_path / "empty").mkdir()
    _usage_error(["eval", str(tmp_path / "empty")], capsys, "holds no saved model")


def test_rerun_into_a_finished_run_warns(tmp_path, capsys):
    args = ["train", "--epochs", "0", "--out", str(tmp_path), *TINY]
    assert cli.main(args) == 0
    assert "warning" not in capsys.readouterr().err
    assert cli.main(args) == 0
    err = capsys.readouterr().err
    assert "warning:" in err and f"{tmp_path / 'model'}.pt/.json" in err, err
    assert cli.main([*args, "--resume"]) == 0
    assert "warning" not in capsys.readouterr().err


def test_out_from_a_config_file_applies(tmp_path, monkeypatch, capsys):
    """`out:` in --config is used when --out is not given (not the command's default folder)."""
    monkeypatch.chdir(tmp_path)
    cfg = tmp_path / "swp.json"
    cfg.write_text(json.dumps({"method": "SWP", "target": 0.3, "epochs": 1, "out": str(tmp_path / "from-config")}))
    assert cli.main(["prune", "--config", str(cfg), *TINY]) == 0
    assert (tmp_path / "from-config" / "pruned.json").is_file() and not (tmp_path / "runs").exists()


# ------------------------------------------------------------------------------------------- onnx
def _onnx_export_available():
    from conftest import require_onnx_export

    require_onnx_export()
    return pytest.importorskip("onnx")


def test_onnx_file_is_self_contained_with_a_batch_dimension(base, tmp_path, capsys):
    onnx = _onnx_export_available()
    out = tmp_path / "m.onnx"
    assert cli.main(["onnx", str(base), "--output", str(out)]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith(f"wrote {out} (input [batch, 1, 28, 28])"), line
    assert [p.name for p in tmp_path.iterdir()] == ["m.onnx"]  # no m.onnx.data beside it
    model = onnx.load(str(out))
    assert all(t.data_location != onnx.TensorProto.EXTERNAL for t in model.graph.initializer)
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    assert model.graph.output[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    ort = pytest.importorskip("onnxruntime")
    alone = tmp_path / "copy"
    alone.mkdir()
    shutil.copy(out, alone / "m.onnx")  # the .onnx alone runs
    session = ort.InferenceSession(str(alone / "m.onnx"))
    (got,) = session.run(None, {session.get_inputs()[0].name: torch.randn(3, 1, 28, 28).numpy()})
    assert got.shape == (3, 10)


def test_onnx_names_every_file_it_writes(base, tmp_path, capsys, monkeypatch):
    """Weights over protobuf's 2 GB limit go to a file beside the .onnx (forced here): the message names it."""
    _onnx_export_available()
    real_save = torch.onnx.ONNXProgram.save

    def external_save(self, destination, **kwargs):
        return real_save(self, destination, **{**kwargs, "external_data": True})

    monkeypatch.setattr(torch.onnx.ONNXProgram, "save", external_save)
    out = tmp_path / "m.onnx"
    assert cli.main(["onnx", str(base), "--output", str(out)]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert (tmp_path / "m.onnx.data").is_file()
    assert line.startswith(f"wrote {out} and its weights {tmp_path / 'm.onnx.data'}"), line
