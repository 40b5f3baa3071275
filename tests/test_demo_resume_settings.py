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


def test_demo_keeps_one_thread_count_for_the_run_and_its_resume(tmp_path, monkeypatch):
    """The demo times its thread count once; --resume reads it back instead of timing again under another
    load (the CPU kernels' sums depend on the thread count, so a new pick would change the results)."""
    import torch

    from stripeconv import demo

    picks = []

    def fake_pick(model, dataset, quiet):
        picks.append(1)
        torch.set_num_threads(1)
        return 1

    monkeypatch.setattr(demo, "pick_threads", fake_pick)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert demo._training_threads(tmp_path, False, None, None, True) == 1 and picks == [1]
        torch.set_num_threads(2)
        assert demo._training_threads(tmp_path, True, None, None, True) == 1 and picks == [1]
        assert torch.get_num_threads() == 1
        (tmp_path / "threads.json").unlink()
        torch.set_num_threads(2)
        demo._training_threads(tmp_path, True, None, None, True)  # a resume without the record picks anew
        assert picks == [1, 1]
    finally:
        torch.set_num_threads(before)
