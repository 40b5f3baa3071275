import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset


from stripeconv import models, pruning

from conftest import Recorder

SIZE = (1, 1, 16, 16)


def _loader(n=64):
    g = torch.Generator().manual_seed(0)
    return DataLoader(TensorDataset(torch.randn(n, 1, 16, 16, generator=g), torch.randint(0, 10, (n,), generator=g)),
                      batch_size=16)


def test_fit_hook_order():
    model = models.vgg(cfg=[4, "M", 4], in_channels=1)
    rec = Recorder(model, SIZE)
    log = []
    hist = pruning.fit(model, rec, _loader(32), epochs=2, eval_loader=_loader(16), callback=log.append, progress=False)
    assert rec.calls == ["penalty", "after_backward", "after_step"] * 2 + ["end_epoch0"] + \
        ["penalty", "after_backward", "after_step"] * 2 + ["end_epoch1"]
    assert len(hist) == 2 and log == hist and "eval_accuracy" in hist[0]


def test_state_dict_resume():
    torch.manual_seed(0)
    model = models.vgg(cfg=[8, "M", 8], in_channels=1)
    pr = pruning.GHFP(model, SIZE, ratio=0.5, epochs=4)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    pruning.fit(model, pr, _loader(), epochs=2, optimizer=opt, progress=False)
    state, mstate = pr.state_dict(), model.state_dict()
    model2 = models.vgg(cfg=[8, "M", 8], in_channels=1)
    model2.load_state_dict(mstate)
    pr2 = pruning.GHFP(model2, SIZE, ratio=0.5, epochs=4)
    pr2.load_state_dict(state)
    assert pr2.epoch == 2 and all(torch.equal(pr2.masks()[k], v) for k, v in pr.masks().items())
    assert all(torch.equal(pr2._frozen[k], v) for k, v in pr._frozen.items())
    pruning.fit(model2, pr2, _loader(), epochs=4, start_epoch=2, optimizer=torch.optim.SGD(model2.parameters(), lr=0.05),
                progress=False)
    assert pr2.epoch == 4


def test_swp_state_and_parameters():
    model = models.vgg(cfg=[4, "M", 4, 4], in_channels=1)
    pr = pruning.SWP(model, SIZE)
    names = [n for n, _ in model.named_parameters()]
    assert any(n.endswith("parametrizations.weight.0.fs") for n in names)  # FS trained by the user's optimizer
    sd = pr.state_dict()
    pr.load_state_dict(sd)
    plain = pr.remove()
    assert not any("parametrizations" in n for n, _ in plain.named_parameters())


def test_one_shot_not_available_for_training_methods():
    pr = pruning.Pruner(models.vgg(cfg=[4], in_channels=1), SIZE, require_target=False)
    with pytest.raises(NotImplementedError):
        pr.prune()


class _CountingL1(pruning.L1Filter):
    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.prune_calls = 0

    def prune(self, data=None):
        self.prune_calls += 1
        return super().prune(data)


def _l1_run(prune_first: bool):
    torch.manual_seed(0)
    model = models.vgg(cfg=[8, "M", 8], in_channels=1)
    pr = _CountingL1(model, SIZE, ratio=0.5)
    if prune_first:
        pr.prune()
    assert pr.has_pruned == prune_first
    pruning.fit(model, pr, _loader(), epochs=1, optimizer=torch.optim.SGD(model.parameters(), lr=0.05), progress=False)
    return model, pr


def test_fit_prunes_a_one_shot_pruner_that_has_not_pruned():
    """fit() drives one-shot methods too: unpruned, it prunes first; pruned already, it only fine-tunes."""
    model_a, auto = _l1_run(prune_first=False)
    model_b, manual = _l1_run(prune_first=True)
    assert auto.prune_calls == 1 and manual.prune_calls == 1
    assert auto.has_pruned and auto.flops_reduction() > 0.2
    for name, mask in manual.masks().items():
        assert torch.equal(auto.masks()[name], mask)
    for (name, a), b in zip(model_a.state_dict().items(), model_b.state_dict().values()):
        torch.testing.assert_close(a, b, msg=name)
