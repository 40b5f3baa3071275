"""``bench`` and ``onnx`` with an ``--input-size`` the saved model cannot take: a clear error, no traceback."""
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


@pytest.mark.parametrize("recorded", [True, False])
@pytest.mark.parametrize("command", ["bench", "onnx"])
def test_wrong_channel_count_is_a_clear_error(saved, tmp_path, capsys, command, recorded):
    if command == "onnx":
        pytest.importorskip("onnxscript")
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
