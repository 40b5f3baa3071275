"""A run resumed after its one-shot step keeps that step's record in metrics.jsonl (the step is not redone)."""
import json

import torch
from torch import nn
from torch.utils.data import TensorDataset

from stripeconv.engine import Engine
from stripeconv.pruning import L1Filter


def _records(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_oneshot_record_survives_a_resume(tmp_path):
    torch.manual_seed(0)
    data = TensorDataset(torch.randn(32, 1, 8, 8), torch.randint(0, 4, (32,)))

    def engine(epochs, resume):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                              nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))
        pruner = L1Filter(model, input_size=(1, 1, 8, 8), ratio=0.5)
        return Engine(model, data, pruner=pruner, epochs=epochs, phase="prune", out_dir=tmp_path, resume=resume,
                      prune_data=[(data.tensors[0], data.tensors[1])], progress=False, quiet=True, batch_size=16)

    engine(0, False).run()  # one-shot only: the checkpoint is written right after the step (epoch 0)
    assert [r.get("event") for r in _records(tmp_path)] == ["oneshot_prune"]
    resumed = engine(0, True)
    assert resumed.resumed_from == 0 and resumed.oneshot_done
    resumed.run()
    assert [r.get("event") for r in _records(tmp_path)] == ["oneshot_prune"]
    engine(0, False).run()  # a fresh run still starts the log over
    assert [r.get("event") for r in _records(tmp_path)] == ["oneshot_prune"]


def test_oneshot_step_reestimates_batchnorm(tmp_path):
    """Pruning filters changes what every later BatchNorm sees: after the one-shot step its running mean is
    the mean over the training batches of the pruned model's activations, also with no epoch to follow."""
    torch.manual_seed(0)
    data = TensorDataset(torch.randn(32, 1, 8, 8), torch.randint(0, 4, (32,)))
    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
                          nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))
    with torch.no_grad():
        for bn in (model[1], model[4]):  # statistics that the pruned model's activations do not have
            bn.running_mean.fill_(5.0)
            bn.running_var.fill_(9.0)
    pruner = L1Filter(model, input_size=(1, 1, 8, 8), ratio=0.5)
    Engine(model, data, pruner=pruner, epochs=0, phase="prune", progress=False, quiet=True, batch_size=16).run()
    model.eval()
    with torch.no_grad():
        inner = model[3](model[2](model[1](model[0](data.tensors[0]))))
    # (re-estimated with the BatchNorms in train mode, so batch statistics upstream: close, not equal)
    torch.testing.assert_close(model[4].running_mean, inner.mean((0, 2, 3)), atol=1e-2, rtol=0)
    torch.testing.assert_close(model[4].running_var, inner.var((0, 2, 3)), atol=5e-2, rtol=5e-2)
