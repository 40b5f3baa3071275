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
