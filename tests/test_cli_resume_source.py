"""``finetune MODEL --resume`` / ``prune --from MODEL --resume`` with another model than the checkpointed run's:
an error, not the other run's weights saved under this model's name."""
import pytest

from stripeconv import cli

DATA = ["--dataset", "fashion-mnist-subset", "--limit-train", "64", "--limit-test", "32", "--device", "cpu",
        "--no-progress", "--quiet"]


@pytest.fixture(scope="module")
def two_models(tmp_path_factory):
    out = tmp_path_factory.mktemp("bases")
    for seed in ("0", "1"):  # same architecture, other weights
        assert cli.main(["train", "--model", "cnn-tiny", "--epochs", "1", "--seed", seed, "--out", str(out / seed),
                         *DATA]) == 0
    return str(out / "0" / "model"), str(out / "1" / "model")


def test_finetune_resume_from_another_model_is_refused(two_models, tmp_path, capsys):
    a, b = two_models
    assert cli.main(["finetune", a, "--epochs", "1", "--out", str(tmp_path), *DATA]) == 0
    capsys.readouterr()
    assert cli.main(["finetune", b, "--epochs", "1", "--out", str(tmp_path), "--resume", *DATA]) == 2
    assert "other settings (source:" in capsys.readouterr().err
    assert cli.main(["finetune", a + ".pt", "--epochs", "1", "--out", str(tmp_path), "--resume", *DATA]) == 0


def test_prune_resume_from_another_model_is_refused(two_models, tmp_path, capsys):
    a, b = two_models
    args = ["prune", "--method", "L1Filter", "--target", "ratio=0.3", "--epochs", "1", "--out", str(tmp_path), *DATA]
    assert cli.main(args + ["--from", a]) == 0
    capsys.readouterr()
    assert cli.main(args + ["--from", b, "--resume"]) == 2
    assert "other settings" in capsys.readouterr().err
