"""Each method on a small real-data run (Fashion-MNIST subset, tiny models): it prunes what it
claims, and its exported model computes the same function as its masked model."""

import pytest
import torch
from torch.utils.data import DataLoader


from stripeconv import pruning

from conftest import FASHION_SIZE as SIZE, check_export as _check_export, fashion, tiny_resnet, tiny_vgg


@pytest.fixture(scope="module")
def loader():
    ds = fashion(train=False, limit=384)  # the 10k split reads faster
    return DataLoader(ds, batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("name", ["SFP", "HFP", "GHFP", "ASFP", "SRFP", "ASRFP"])
@pytest.mark.parametrize("granularity", ["filter", "stripe"])
def test_soft_family(name, granularity, loader):
    torch.manual_seed(0)
    model = tiny_resnet() if granularity == "filter" else tiny_vgg()
    pr = pruning.METHODS[name](model, SIZE, ratio=0.5, epochs=3, granularity=granularity)
    pruning.fit(model, pr, loader, epochs=3, optimizer=torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9),
                progress=False)
    masks = pr.masks()
    for n, m in masks.items():
        units = m.flatten(1).any(1) if granularity == "filter" else m
        pruned = units.numel() - int(units.sum())
        assert pruned == int(0.5 * units.numel()), (n, pruned)
        if granularity == "filter":  # whole filters: all or none of the stripes
            assert bool((m.flatten(1).all(1) | ~m.flatten(1).any(1)).all())
        w = pr.convs[n].weight
        assert float(w.detach()[~m[:, None].expand_as(w)].abs().sum()) == 0.0  # zero after the last epoch
    _check_export(pr, next(iter(loader))[0][:8])


def test_hfp_freezes_and_sfp_regrows(loader):
    import torch.nn.functional as F
    for name in ("SFP", "HFP"):
        torch.manual_seed(0)
        model = tiny_vgg()
        model.features[1].bias.data.fill_(0.1)  # BN shift 0 with relu'(0) = 0 would block the zeroed filters' gradient
        pr = pruning.METHODS[name](model, SIZE, ratio=0.5)
        pr.end_epoch(0)  # select + zero once
        first = pr.masks()["features.0"]
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        for i, (x, y) in enumerate(loader):  # the user's own loop, with the hooks
            if i == 3:
                break
            loss = F.cross_entropy(model(x), y) + pr.penalty()
            opt.zero_grad()
            loss.backward()
            pr.after_backward()
            opt.step()
            pr.after_step()
        w = pr.convs["features.0"].weight.detach()
        zero_after = float(w[~first[:, None].expand_as(w)].abs().sum())
        if name == "HFP":
            assert zero_after == 0.0  # hard: frozen at zero
        else:
            assert zero_after > 0.0  # soft: pruned filters kept training


def test_srfp_decays_instead_of_zeroing():
    model = tiny_vgg()
    pr = pruning.SRFP(model, SIZE, ratio=0.5, epochs=4, alpha0=0.5)
    w0 = pr.convs["features.0"].weight.detach().clone()
    pr.end_epoch(0)
    m = pr.masks()["features.0"]
    w1 = pr.convs["features.0"].weight.detach()
    factor = 0.5 * (1 - 1 / 4)
    torch.testing.assert_close(w1[~m.flatten(1).any(1)], w0[~m.flatten(1).any(1)] * factor)
    torch.testing.assert_close(w1[m.flatten(1).any(1)], w0[m.flatten(1).any(1)])


@pytest.mark.parametrize("granularity", ["filter", "stripe"])
def test_l1_one_shot(granularity, loader):
    torch.manual_seed(0)
    model = tiny_resnet()
    cls = pruning.L1Filter if granularity == "filter" else pruning.L1Stripe
    pr = cls(model, SIZE, ratio=0.5)
    if granularity == "filter":  # Li et al.: residual-coupled convs are not pruned
        assert "layer1.0.conv2" not in pr.convs and "layer1.0.conv1" in pr.convs
    w = {n: c.weight.detach().clone() for n, c in pr.convs.items()}
    masks = pr.prune()
    for n, m in masks.items():
        units = m.flatten(1).any(1) if granularity == "filter" else m
        score = w[n].abs().sum((1, 2, 3)) if granularity == "filter" else w[n].abs().sum(1)
        assert int((~units).sum()) == int(0.5 * units.numel())
        assert float(score[~units].max()) <= float(score[units].min())  # the lowest L1 ones
    pruning.fit(model, pr, loader, epochs=1, optimizer=torch.optim.SGD(model.parameters(), lr=0.05), progress=False,
                max_steps_per_epoch=3)
    assert all(bool(torch.equal(pr.masks()[n], masks[n])) for n in masks)
    ex = _check_export(pr, next(iter(loader))[0][:8])
    rep = pr.report(ex)
    assert rep["flops_reduction"] > 0.2 and rep["params_reduction"] > 0.2


def test_flops_target_reached_and_reported(loader):
    model = tiny_vgg()
    pr = pruning.L1Filter(model, SIZE, target_flops_reduction=0.6)
    pr.prune()
    rep = pr.report()
    assert rep["flops_reduction"] >= 0.6 - 1e-9
    assert abs(rep["flops_reduction"] - pr.flops_reduction()) < 1e-9  # graph count == profile of the export


def test_swp_threshold_and_export(loader):
    torch.manual_seed(0)
    model = tiny_resnet()
    pr = pruning.SWP(model, SIZE, alpha=1.5, threshold=0.05)  # large alpha: a few steps must prune
    assert "conv1" not in pr.convs and "layer2.0.downsample.0" not in pr.convs  # stem and 1x1 skipped
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    pruning.fit(model, pr, loader, epochs=3, optimizer=opt, progress=False)
    masks = pr.masks()
    for n, m in masks.items():
        fs = pr.skeletons[n].detach()
        assert bool((fs[~m] == 0).all()) and bool((fs[m].abs() >= 0.05).all())
    assert sum(int((~m).sum()) for m in masks.values()) > 0
    ex = _check_export(pr, next(iter(loader))[0][:8])
    assert pr.report(ex)["flops_reduction"] > 0


def test_swp_progressive_target_grouped(loader):
    torch.manual_seed(0)
    model = tiny_vgg()
    pr = pruning.SWP(model, SIZE, target_flops_reduction=0.5, epochs=4, group_size=4)
    seen = []
    pruning.fit(model, pr, loader, epochs=4, optimizer=torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9),
                progress=False, callback=lambda r: seen.append(r["flops_reduction"]))
    assert seen[0] >= 0.25 - 1e-6 and seen[0] < 0.45   # half of the target after epoch 1 (ramp over 2 epochs)
    assert seen[1] >= 0.5 - 1e-6 and seen[-1] >= 0.5 - 1e-6
    for n, m in pr.masks().items():  # the same positions in each group of 4 filters
        g = m.reshape(-1, 4, *m.shape[1:])
        assert bool((g == g[:, :1]).all())
    _check_export(pr, next(iter(loader))[0][:8])


def test_swp_requires_epochs_for_target():
    with pytest.raises(ValueError, match="epochs"):
        pruning.SWP(tiny_vgg(), SIZE, target_flops_reduction=0.5)
    with pytest.raises(ValueError):
        pruning.SFP(tiny_vgg(), SIZE)  # no target
