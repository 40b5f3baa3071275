"""Messages: an interrupted eval/bench does not suggest a --resume they do not have; a pruner's KeyError is
printed once, unquoted; bench and onnx refuse an --input-size the saved model cannot take; --no-progress."""
import json
from pathlib import Path

import pytest

from stripeconv import cli

DATA = ["--dataset", "fashion-mnist-subset", "--limit-train", "64", "--limit-test", "32", "--device", "cpu",
        "--no-progress", "--quiet"]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    out = tmp_path_factory.mktemp("base")
    assert cli.main(["train", "--model", "cnn-tiny", "--epochs", "0", "--out", str(out), *DATA]) == 0
    return str(out / "model")


def test_interrupted_eval_does_not_suggest_resume(saved, capsys, monkeypatch):
    import stripeconv.engine as engine

    def interrupt(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(engine, "evaluate_model", interrupt)
    assert cli.main(["eval", saved, "--dataset", "fashion-mnist-subset"]) == 130
    err = capsys.readouterr().err
    assert "interrupted" in err and "--resume" not in err


def test_unknown_ratios_layer_message(saved, tmp_path, capsys):
    assert cli.main(["prune", "--from", saved, "--method", "L1Filter", "--target", 'ratios={"nolayer": 0.3}',
                     "--epochs", "0", "--out", str(tmp_path), *DATA]) == 2
    err = capsys.readouterr().err
    assert "error: L1Filter: ratios name layers that are not prunable: ['nolayer']" in err


def test_onnx_on_an_older_exporter_says_what_it_needs(saved, tmp_path, capsys, monkeypatch):
    pytest.importorskip("onnxscript", reason="ONNX export needs onnxscript (pip install onnxscript)")
    import stripeconv.decompose

    monkeypatch.setattr(stripeconv.decompose, "_onnx_exporter_takes_programs", lambda: False)
    assert cli.main(["onnx", saved, "-o", str(tmp_path / "m.onnx")]) == 2
    err = capsys.readouterr().err
    assert "stripeconv onnx: error: ONNX export needs torch >= 2.5" in err and "Traceback" not in err
    assert not (tmp_path / "m.onnx").exists()


def test_no_progress_hides_the_pruners_bars_too(tmp_path, capsys):
    """--no-progress: no tqdm redraws, also from a pruner's own bar (GReg1's regularisation), while the
    per-epoch lines and the pruner's notes stay, each on its own line."""
    data = [a for a in DATA if a != "--quiet"]
    assert cli.main(["prune", "--model", "cnn-tiny", "--method", "GReg1", "--target", "ratio=0.3", "--set",
                     "interval=1", "--epochs", "2", "--max-steps", "3", "--out", str(tmp_path), *data]) == 0
    err = capsys.readouterr().err
    assert "\r" not in err
    lines = err.splitlines()
    assert any(line.startswith("[prune] epoch 2/2") for line in lines)
    assert any(line.startswith("[GReg1 regularisation]") for line in lines)


@pytest.mark.parametrize("recorded", [True, False])
@pytest.mark.parametrize("command", ["bench", "onnx"])
def test_wrong_channel_count_is_a_clear_error(saved, tmp_path, capsys, command, recorded):
    if command == "onnx":
        pytest.importorskip("onnxscript", reason="ONNX export needs onnxscript (pip install onnxscript)")
    if not recorded:  # a description without the input size: the trial forward finds it
        desc = json.loads(Path(saved + ".json").read_text())
        del desc["extra"]["input_size"]
        (tmp_path / "m.json").write_text(json.dumps(desc))
        (tmp_path / "m.pt").write_bytes(Path(saved + ".pt").read_bytes())
        saved = str(tmp_path / "m")
    extra = ["--repeats", "1", "--batch-size", "1"] if command == "bench" else ["-o", str(tmp_path / "m.onnx")]
    assert cli.main([command, saved, "--input-size", "3", "28", "28", *extra]) == 2
    err = capsys.readouterr().err
    assert f"stripeconv {command}: error:" in err and "Traceback" not in err
    assert ("1-channel" in err) if recorded else ("cannot run on input" in err)
