"""``stripeconv demo --resume`` with settings other than the checkpointed run's: an error, not a mixed run
whose report states the new settings."""
import pytest

from stripeconv import cli


def _demo(out, target="0.55", seed="0", train_size="256"):
    return ["demo", "--quick", "--out", str(out), "--no-progress", "--quiet", "--threads", "1", "--bench-batch", "2",
            "--test-size", "64", "--target", target, "--seed", seed, "--train-size", train_size]


@pytest.mark.parametrize("change", [{"target": "0.3"}, {"seed": "1"}, {"train_size": "300"}])
def test_demo_resume_with_other_settings_is_refused(tmp_path, capsys, monkeypatch, change):
    monkeypatch.setenv("STRIPECONV_FASHION_MNIST", str(tmp_path / "absent"))  # the shipped subset: fast
    assert cli.main(_demo(tmp_path)) == 0
    capsys.readouterr()
    assert cli.main(_demo(tmp_path, **change) + ["--resume"]) == 2
    assert "other settings" in capsys.readouterr().err
    assert cli.main(_demo(tmp_path) + ["--resume"]) == 0  # the same settings still resume
