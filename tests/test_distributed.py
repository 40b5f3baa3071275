"""Multi-process training on CPU (gloo, 2 processes): same masks and weights on every rank, rank 0 writes."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

if not dist.is_available():  # pragma: no cover
    pytest.skip("torch.distributed is not available", allow_module_level=True)

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, out_dir, result_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from torch.utils.data import TensorDataset

    import stripeconv.engine as engine_mod
    from stripeconv import models, pruning
    from stripeconv.data.embedded import fashion_mnist_subset
    from stripeconv.distributed import cleanup, digest, exit_process, init_from_env, joined_process_group

    ctx = init_from_env("cpu")
    if ctx.rank != 0:  # only rank 0 may write files
        def refuse(*a, **k):
            raise AssertionError(f"rank {ctx.rank} tried to write a checkpoint")
        engine_mod.save_checkpoint = refuse
    torch.manual_seed(0)
    train = TensorDataset(*fashion_mnist_subset(train=True)[:128])
    test = fashion_mnist_subset(train=False, limit=64)
    model = models.vgg(cfg=[8, "M", 8, "M", 16], in_channels=1)
    pruner = pruning.SWP(model, input_size=(1, 1, 28, 28), target_flops_reduction=0.4, epochs=2, alpha=1e-3)
    eng = engine_mod.Engine(model, train, pruner=pruner, epochs=2, eval_data=test, batch_size=16, lr=0.05,
                            out_dir=out_dir, phase="prune", ctx=ctx, progress=False, quiet=True)
    hist = eng.run()
    res = {"rank": ctx.rank, "world": ctx.world_size, "masks": digest(pruner.masks()),
           "weights": digest(model.state_dict()), "consistent": [r.get("masks_consistent") for r in hist],
           "samples": [r["samples"] for r in hist], "eval": [r["eval_accuracy"] for r in hist],
           "log_enabled": eng.log.enabled, "joined": joined_process_group()}
    Path(result_dir, f"rank{ctx.rank}.json").write_text(json.dumps(res))
    cleanup(ctx)
    exit_process(0)  # spawned children otherwise end with interpreter shutdown, which gloo's threads can abort


def test_ddp_two_processes_identical_state(tmp_path):
    import torch.multiprocessing as mp

    out, res = tmp_path / "out", tmp_path / "res"
    res.mkdir()
    mp.spawn(_worker, args=(2, _free_port(), str(out), str(res)), nprocs=2, join=True)
    r0, r1 = (json.loads((res / f"rank{i}.json").read_text()) for i in range(2))
    assert r0["world"] == r1["world"] == 2
    assert r0["masks"] == r1["masks"] and r0["weights"] == r1["weights"]
    assert r0["consistent"] == r1["consistent"] == [True, True]  # equal before rank 0's broadcast, too
    assert r0["samples"] == [128, 128]  # the ranks' shards add up to the dataset
    assert r0["eval"] == r1["eval"]
    assert r0["log_enabled"] and not r1["log_enabled"]
    assert r0["joined"] and r1["joined"]
    assert (out / "prune.ckpt").is_file() and len((out / "metrics.jsonl").read_text().splitlines()) == 2


def _search_worker(rank, world, port, result_dir):
    """DAIS and DSA under DDP, each rank with its own held-out batches: the search variables
    (outside the DDP model) must still take the same steps on every rank."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    import torch.nn.functional as F

    from stripeconv import models, pruning
    from stripeconv.data.embedded import fashion_mnist_subset
    from stripeconv.distributed import cleanup, digest, exit_process, init_from_env, wrap_model

    ctx = init_from_env("cpu")
    x, y = fashion_mnist_subset(train=True)[:256]
    own = slice(128 + 64 * rank, 128 + 64 * (rank + 1))  # held-out batches differ between the ranks
    val = [(x[own][i:i + 16], y[own][i:i + 16]) for i in range(0, 64, 16)]
    res = {}
    for method, extra in (("DAIS", {"alpha_lr": 0.05}), ("DSA", {"alpha_lr": 0.5, "admm_every": 2})):
        torch.manual_seed(0)
        model = models.vgg(cfg=[8, "M", 8, "M", 16], in_channels=1)
        pruner = getattr(pruning, method)(model, (1, 1, 28, 28), val_data=val, target_flops_reduction=0.5,
                                          search_steps=100, **extra)
        start = digest(pruner.state_dict())
        ddp = wrap_model(model, ctx)
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        for step in range(6):
            i = 16 * (2 * step + rank)
            F.cross_entropy(ddp(x[i:i + 16]), y[i:i + 16]).backward()
            opt.step()
            opt.zero_grad()
            pruner.after_step()
        state = pruner.state_dict()
        res[method] = {"search": digest(state), "moved": digest(state) != start, "weights": digest(dict(model.named_parameters()))}
    Path(result_dir, f"rank{ctx.rank}.json").write_text(json.dumps(res))
    cleanup(ctx)
    exit_process(0)


def test_ddp_search_variables_step_together(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_search_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (json.loads((tmp_path / f"rank{i}.json").read_text()) for i in range(2))
    for method in ("DAIS", "DSA"):
        assert r0[method]["moved"] and r1[method]["moved"], method
        assert r0[method]["weights"] == r1[method]["weights"], method
        assert r0[method]["search"] == r1[method]["search"], method


def _mask_change_worker(rank, world, port, result_dir):
    """A mask change under DDP: the layer warns, and a new wrapper averages the resized gradients."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    import warnings

    from stripeconv import StripeConv2d
    from stripeconv.distributed import cleanup, exit_process, init_from_env, wrap_model

    ctx = init_from_env("cpu")
    torch.manual_seed(0)
    model = torch.nn.Sequential(StripeConv2d(3, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(4, 2, 1))
    x = torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(rank))  # each rank its own batch
    ddp = wrap_model(model, ctx)  # held until its backward has run: its reducer averages the gradients
    ddp(x).square().sum().backward()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model[0].set_stripe_mask(torch.rand(4, 3, 3, generator=torch.Generator().manual_seed(1)) < 0.5)
    model.zero_grad()
    ddp = wrap_model(model, ctx)
    ddp(x).square().sum().backward()
    averaged = model[0].packed_weight.grad.clone()
    model.zero_grad()
    model(x).square().sum().backward()  # this rank's own gradient
    local = [torch.zeros_like(averaged) for _ in range(world)]
    dist.all_gather(local, model[0].packed_weight.grad)
    res = {"warned": any("wrap the model again" in str(w.message) for w in caught),
           "error": (averaged - sum(local) / world).abs().max().item(), "rows": averaged.shape[0],
           "ranks_differ": (local[0] - local[1]).abs().max().item() > 0}
    Path(result_dir, f"rank{ctx.rank}.json").write_text(json.dumps(res))
    cleanup(ctx)
    exit_process(0)


def test_mask_change_under_ddp_warns_and_a_new_wrapper_averages(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_mask_change_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        res = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert res["warned"] and res["ranks_differ"] and res["rows"] < 36
        assert res["error"] < 1e-5, res


@pytest.mark.parametrize("method,args", [("SWP", ["--target", "flops=0.3", "--set", "alpha=1e-3"]),
                                         ("L1Filter", ["--target", "ratio=0.5"])])
def test_torchrun_cli_prune(tmp_path, method, args):
    out = tmp_path / "ddp"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
           "-m", "stripeconv", "prune", "--dataset", "fashion-mnist-subset", "--limit-train", "128", "--limit-test",
           "64", "--model", "cnn-tiny", "--method", method, *args,
           "--epochs", "2", "--batch-size", "16", "--device", "cpu", "--quiet", "--out", str(out)]
    p = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    assert p.stdout.count(f"{method}: accuracy") == 1  # one result line: only rank 0 prints
    log = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    epochs = [r for r in log if "train_loss" in r]
    assert [r["epoch"] for r in epochs] == [0, 1] and all(r["world_size"] == 2 for r in epochs)
    if method == "SWP":
        assert all(r["masks_consistent"] for r in epochs)
    else:  # the one-shot masks were checked once; the epochs train the exported network on both ranks
        assert [r["masks_consistent"] for r in log if r.get("event") == "oneshot_prune"] == [True]
        assert all(r["phase"] == "retrain" for r in epochs)
    from stripeconv.artifacts import load_pruned

    model = load_pruned(out / "pruned")
    assert any(type(m).__name__ == "StripeConv2d" for m in model.modules())


def _python(*args: str, cwd=None) -> subprocess.CompletedProcess:
    """``python ARGS`` in a fresh process that imports this checkout of stripeconv."""
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def test_exit_process_flushes_and_keeps_the_code():
    """A distributed CLI run leaves through exit_process (no interpreter shutdown): buffered output
    still arrives and the exit code is the command's; atexit handlers no longer run."""
    p = _python("-c", "import atexit, sys\n"
                      "from stripeconv.distributed import exit_process, joined_process_group\n"
                      "assert not joined_process_group()\n"
                      "atexit.register(print, 'atexit ran')\n"
                      "sys.stdout.write('out without newline'); sys.stderr.write('err without newline')\n"
                      "exit_process(3)\n")
    assert p.returncode == 3, p.stderr
    assert p.stdout == "out without newline" and p.stderr == "err without newline"


def test_single_process_cli_exits_normally(tmp_path):
    """Without torchrun no process group is joined: ``python -m stripeconv`` ends by sys.exit with main's code."""
    p = _python("-m", "stripeconv", "prune", "--method", "NoSuchMethod", cwd=tmp_path)
    assert p.returncode == 2 and "NoSuchMethod" in p.stderr


def test_a_failing_rank_reports_its_error_and_exits_with_1():
    """After joining a process group, an unexpected error still leaves through exit_process: its
    traceback is printed and the exit code is 1 (not an abort during interpreter shutdown)."""
    p = _python("-c", "import stripeconv.cli as cli, stripeconv.distributed as d\n"
                      "d._joined_process_group = True\n"
                      "def fail():\n"
                      "    raise ZeroDivisionError('a rank failed')\n"
                      "cli.main = fail\n"
                      "cli.run()\n")
    assert p.returncode == 1, p.stderr
    assert "ZeroDivisionError: a rank failed" in p.stderr
