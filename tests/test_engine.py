"""The training engine: fit's hook order, exact resume after a kill, data order, JSONL log."""
import json

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset


from stripeconv import models, pruning  # noqa: E402
from stripeconv.checkpoint import load_checkpoint  # noqa: E402
from stripeconv.data.embedded import fashion_mnist_subset  # noqa: E402
from stripeconv.engine import Engine, epoch_loader, is_oneshot  # noqa: E402

from conftest import FASHION_SIZE as SIZE, Recorder  # noqa: E402


@pytest.fixture(scope="module")
def data():
    full = fashion_mnist_subset(train=True)
    test = fashion_mnist_subset(train=False, limit=64)
    return TensorDataset(*full[:192]), test


def _model(seed=0):
    torch.manual_seed(seed)
    return models.vgg(cfg=[8, "M", 8, "M", 16], in_channels=1)


def test_engine_and_fit_train_identically(data):
    train, test = data
    loader = DataLoader(train, batch_size=64, shuffle=False)
    states = []
    for use_engine in (False, True):
        model = _model()
        rec = Recorder(model, SIZE)
        if use_engine:
            Engine(model, loader, pruner=rec, epochs=2, progress=False, quiet=True).run()
        else:
            pruning.fit(model, rec, loader, epochs=2, progress=False)
        states.append(model.state_dict())
    for k, v in states[0].items():
        assert torch.equal(v, states[1][k]), k


def test_epoch_order_is_a_function_of_seed_and_epoch(data):
    train, _ = data

    def order(seed, epoch, rank=0, world=1):
        return torch.cat([y for _, y in epoch_loader(TensorDataset(torch.arange(len(train))[:, None].float(),
                                                                    torch.arange(len(train))),
                                                     32, epoch, seed, rank, world)]).tolist()

    torch.manual_seed(123)
    a = order(0, 3)
    torch.manual_seed(456)  # the global RNG does not matter
    assert order(0, 3) == a
    assert order(0, 4) != a and order(1, 3) != a
    r0, r1 = order(0, 3, 0, 2), order(0, 3, 1, 2)
    assert not set(r0) & set(r1) and len(r0) + len(r1) == len(train)


class Stop(Exception):
    pass


def _run(method, train, test, out, epochs=3, resume=False, callback=None, loss_fn=None):
    model = _model()
    kw = {"SWP": dict(target_flops_reduction=0.4, epochs=epochs, alpha=1e-3),
          "GHFP": dict(ratio=0.4, epochs=epochs),
          "L1Stripe": dict(ratio=0.4)}[method]
    pruner = pruning.METHODS[method](model, input_size=SIZE, **kw)
    engine = Engine(model, train, pruner=pruner, epochs=epochs, eval_data=test, batch_size=32, lr=0.05,
                    out_dir=out, phase="prune", resume=resume, callback=callback, loss_fn=loss_fn,
                    prune_data=DataLoader(train, batch_size=64), progress=False, quiet=True, seed=7)
    engine.run()
    return model, pruner, engine


def _assert_same(a, b):
    (ma, pa), (mb, pb) = a, b
    for k, v in pa.masks().items():
        assert torch.equal(v, pb.masks()[k]), k
    sa, sb = ma.state_dict(), mb.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    assert pa.state_dict()["epoch"] == pb.state_dict()["epoch"] and pa.steps == pb.steps


@pytest.mark.parametrize("method", ["SWP", "GHFP", "L1Stripe"])
def test_kill_and_resume_gives_the_same_masks_and_weights(method, data, tmp_path):
    train, test = data
    straight = _run(method, train, test, tmp_path / "straight")[:2]

    # killed after the checkpoint of epoch 1 (an exception in the callback) ...
    def stop_after_first(record):
        if record["epoch"] == 0:
            raise Stop

    with pytest.raises(Stop):
        _run(method, train, test, tmp_path / "killed", callback=stop_after_first)
    assert load_checkpoint(tmp_path / "killed" / "prune.ckpt")["epoch"] == 1
    # ... then killed again in the middle of epoch 2 (a crash inside the step) ...
    calls = {"n": 0}

    def crashing_loss(out, y):
        calls["n"] += 1
        if calls["n"] == 3:
            raise Stop
        return torch.nn.functional.cross_entropy(out, y)

    with pytest.raises(Stop):
        _run(method, train, test, tmp_path / "killed", resume=True, loss_fn=crashing_loss)
    # ... and resumed to the end
    model, pruner, engine = _run(method, train, test, tmp_path / "killed", resume=True)
    assert engine.resumed_from == 1
    _assert_same(straight, (model, pruner))
    log = [json.loads(line) for line in (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()]
    epochs = [r["epoch"] for r in log if "train_loss" in r]
    assert epochs == [0, 1, 2]  # no duplicate records after the resumes
    assert sum(r.get("event") == "oneshot_prune" for r in log) == (1 if method == "L1Stripe" else 0)


def test_resume_of_a_finished_run_is_a_no_op(data, tmp_path):
    train, test = data
    a = _run("GHFP", train, test, tmp_path, epochs=2)
    b = _run("GHFP", train, test, tmp_path, epochs=2, resume=True)
    assert b[2].resumed_from == 2 and len(b[2].history) == 2
    _assert_same(a[:2], b[:2])


def test_a_compiled_model_checkpoints_its_module(data, tmp_path):
    """A run of a torch.compile'd model writes the module's state dict (no ``_orig_mod.`` prefix), so a
    plain model resumes it."""
    train, test = data
    model = _model()
    Engine(torch.compile(model, backend="aot_eager"), train, epochs=1, batch_size=32, lr=0.05, out_dir=tmp_path,
           phase="finetune", progress=False, quiet=True, seed=7).run()
    saved = load_checkpoint(tmp_path / "finetune.ckpt")["model"]
    assert saved.keys() == model.state_dict().keys()
    plain = _model(seed=1)
    resumed = Engine(plain, train, epochs=1, batch_size=32, lr=0.05, out_dir=tmp_path, phase="finetune",
                     resume=True, progress=False, quiet=True, seed=7)
    assert resumed.resumed_from == 1
    for key, value in model.state_dict().items():
        assert torch.equal(plain.state_dict()[key], value), key


def test_jsonl_log_and_checkpoint_contents(data, tmp_path):
    train, test = data
    model, pruner, engine = _run("SWP", train, test, tmp_path, epochs=2)
    log = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [0, 1]
    for key in ("phase", "train_loss", "train_accuracy", "lr", "flops_reduction", "density", "eval_accuracy",
                "time_s"):
        assert key in log[0]
    ck = load_checkpoint(tmp_path / "prune.ckpt")
    assert {"model", "optimizer", "scheduler", "pruner", "rng", "epoch", "history"} <= set(ck)
    assert set(ck["pruner"]["masks"]) == set(pruner.masks())


def test_is_oneshot():
    m = _model()
    assert is_oneshot(pruning.L1Filter(m, input_size=SIZE, ratio=0.2))
    assert not is_oneshot(pruning.SFP(_model(), input_size=SIZE, ratio=0.2))
    assert not is_oneshot(pruning.SWP(_model(), input_size=SIZE))


def test_progress_bar_and_lines(data, capsys):
    pytest.importorskip("tqdm")
    train, test = data
    Engine(_model(), train, epochs=1, eval_data=test, batch_size=64, progress=True, quiet=False).run()
    err = capsys.readouterr().err
    assert "train 1/1:" in err and "it/s" in err  # the tqdm bar
    assert "[train] epoch 1/1: loss" in err  # the per-epoch line
    Engine(_model(), train, epochs=1, batch_size=64, progress=False, quiet=True).run()
    assert capsys.readouterr().err == ""


def test_recalibrate_batchnorm_reestimates_running_statistics():
    from torch import nn

    from stripeconv.engine import recalibrate_batchnorm

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 1), nn.BatchNorm2d(3), nn.Dropout(0.5)).eval()
    batches = [(torch.randn(8, 2, 4, 4) * 3 + 1, torch.zeros(8)) for _ in range(5)]
    recalibrate_batchnorm(model, batches, num_batches=4)
    feats = torch.cat([model[0](x) for x, _ in batches[:4]])  # the 5th batch is not used
    bn = model[1]
    torch.testing.assert_close(bn.running_mean, feats.mean((0, 2, 3)), atol=1e-5, rtol=1e-5)
    per_batch_var = torch.stack([model[0](x).var((0, 2, 3), unbiased=True) for x, _ in batches[:4]])
    torch.testing.assert_close(bn.running_var, per_batch_var.mean(0), atol=1e-5, rtol=1e-5)
    assert bn.momentum == 0.1 and not model.training and not bn.training



def test_a_kill_in_the_first_epoch_keeps_the_one_shot_result(data, tmp_path):
    """A one-shot search (ACP, MetaPruning: minutes to hours) is checkpointed before epoch 1 starts."""
    train, test = data
    calls = {"prune": 0, "loss": 0}

    class Counting(pruning.L1Filter):
        def prune(self, data=None):
            calls["prune"] += 1
            return super().prune(data)

    def crash_in_epoch_one(out, y):
        calls["loss"] += 1
        if calls["loss"] == 2:
            raise Stop
        return torch.nn.functional.cross_entropy(out, y)

    def run(resume, loss_fn=None):
        model = _model()
        pruner = Counting(model, input_size=SIZE, ratio=0.4)
        engine = Engine(model, train, pruner=pruner, epochs=2, eval_data=test, batch_size=32, lr=0.05,
                        out_dir=tmp_path, phase="prune", resume=resume, loss_fn=loss_fn, progress=False,
                        quiet=True, seed=7)
        engine.run()
        return model, pruner

    with pytest.raises(Stop):
        run(resume=False, loss_fn=crash_in_epoch_one)
    ck = load_checkpoint(tmp_path / "prune.ckpt")
    assert calls["prune"] == 1 and ck["epoch"] == 0 and ck["oneshot_done"]
    resumed = run(resume=True)
    assert calls["prune"] == 1  # not pruned again
    calls["prune"] = 0
    straight_dir = tmp_path / "straight"
    model = _model()
    pruner = Counting(model, input_size=SIZE, ratio=0.4)
    Engine(model, train, pruner=pruner, epochs=2, eval_data=test, batch_size=32, lr=0.05, out_dir=straight_dir,
           phase="prune", progress=False, quiet=True, seed=7).run()
    _assert_same((model, pruner), resumed)
