"""LBS (balanced filter pruning at a preset loss variation) on a small real-data run: the per-unit
loss-variation bound holds on the held-out split, the target is reached, residual layer groups
share indices, export == masked model, an interrupted search resumes to the same result."""
import copy

import pytest
import torch
from torch.utils.data import DataLoader


from stripeconv import models, pruning  # noqa: E402
from stripeconv.pruning.lbs import LBS, BalancedFilterPruning, holdout_split  # noqa: E402

from conftest import FASHION_SIZE as SIZE, fashion

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data():
    ds = fashion(train=True, limit=512)
    train, held_out = holdout_split(ds, 128)  # the loss variation is measured on training data held out
    assert not set(train.indices) & set(held_out.indices)
    train_dl = DataLoader(train, batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(0))
    val_dl = DataLoader(held_out, batch_size=128)
    return train_dl, val_dl


@pytest.fixture(scope="module")
def trained_resnet(data):
    torch.manual_seed(0)
    model = models.resnet8(width=0.5, in_channels=1)
    pruning.fit(model, None, data[0], epochs=1, optimizer=torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9),
                progress=False)
    return model.state_dict()


def fresh_resnet(state):
    model = models.resnet8(width=0.5, in_channels=1)
    model.load_state_dict(state)
    return model


def test_lbs_loss_bound_groups_and_export(data, trained_resnet):
    train_dl, val_dl = data
    model = fresh_resnet(trained_resnet)
    pr = LBS(model, SIZE, val_data=val_dl, target_flops_reduction=0.4, score_batches=3)
    units = {u.name: [m[0] for m in u.members] for u in pr.units}
    # residual layer groups: the stem with the stage-1 block output, projections with their stage
    assert units["conv1"] == ["conv1", "layer1.0.conv2"]
    assert units["layer2.0.downsample.0"] == ["layer2.0.conv2", "layer2.0.downsample.0"]
    assert units["layer3.0.downsample.0"] == ["layer3.0.conv2", "layer3.0.downsample.0"]
    assert pr.search(train_dl) and pr.phase == "searched"
    assert pr.flops_reduction(pr.masks_for(pr.unit_k)) >= 0.4 - 1e-9
    assert pr.delta is not None and pr.delta >= 0
    # the bound: every unit pruned alone changes the held-out loss by at most delta (measured afresh)
    base = pr.val_loss()
    for u in pr.units:
        k = pr.unit_k[u.name]
        assert k <= pr.k_max(u)
        if k:
            change = pr.val_loss(pr._factors(u, k)) - base
            assert change <= pr.delta + 1e-6, (u.name, change, pr.delta)
            assert abs(change - pr.loss_changes[u.name]) < 1e-6
        if k < pr.k_max(u) and k == pr.rate_at(u, pr.delta):  # one more channel would break the bound
            assert any(v > pr.delta for (n, kk), v in pr.cache.items() if n == u.name and kk > k)
        assert k <= pr.rate_at(u, pr.delta)  # at most the rate at delta (less where the overshoot was trimmed)
    assert sum(pr.unit_k.values()) > 0
    masks = pr.prune(train_dl)
    assert pr.phase == "done" and pr.flops_reduction() >= 0.4 - 1e-9
    # layer groups prune the same channels in every member
    dead = {n: ~m.flatten(1).any(1) for n, m in masks.items()}
    assert torch.equal(dead["conv1"], dead["layer1.0.conv2"])
    assert torch.equal(dead["layer2.0.conv2"], dead["layer2.0.downsample.0"])
    x = next(iter(train_dl))[0][:8]
    ex = pr.export()
    torch.testing.assert_close(ex(x), pr.masked_model().eval()(x), atol=1e-4, rtol=1e-4)
    rep = pr.report(ex)
    assert abs(rep["flops_reduction"] - pr.flops_reduction()) < 1e-9  # dead grouped channels really removed
    # fine-tuning keeps the masks
    pruning.fit(model, pr, train_dl, epochs=1, optimizer=torch.optim.SGD(model.parameters(), lr=0.01),
                progress=False, max_steps_per_epoch=2)
    assert all(torch.equal(pr.masks()[n], masks[n]) for n in masks)


def test_lbs_global_ratio_and_fixed_delta(data):
    train_dl, val_dl = data
    torch.manual_seed(0)
    model = models.vgg(cfg=[8, "M", 16, "M", 16], in_channels=1)
    dense = copy.deepcopy(model.state_dict())
    score = [next(iter(train_dl))] * 2
    pr = BalancedFilterPruning(model, SIZE, val_data=val_dl, ratio=0.5, score_batches=2, max_layer_rate=0.75)
    masks = pr.prune(score)
    pruned = sum(int((~m.flatten(1).any(1)).sum()) for m in masks.values())
    total = sum(m.shape[0] for m in masks.values())
    assert pruned >= 0.5 * total and all(r <= 0.75 for r in pr.unit_rates.values())
    # the paper's basic mode: a preset loss variation gives the same per-layer rates
    model2 = models.vgg(cfg=[8, "M", 16, "M", 16], in_channels=1)
    model2.load_state_dict(dense)
    fixed = LBS(model2, SIZE, val_data=val_dl, delta=pr.delta, score_batches=2, max_layer_rate=0.75)
    fixed.prune(score)
    assert fixed.unit_k == pr.unit_k
    with pytest.raises(ValueError):
        LBS(model2, SIZE, val_data=val_dl, delta=0.1, ratio=0.5)
    with pytest.raises(ValueError):
        LBS(model2, SIZE, val_data=None, ratio=0.5)


def test_lbs_interrupted_search_resumes_identically(data, trained_resnet):
    train_dl, val_dl = data
    kw = dict(val_data=val_dl, target_flops_reduction=0.5, score_batches=2)

    def loader():  # a shuffled loader with a seeded generator: its start state is checkpointed
        return DataLoader(train_dl.dataset, batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(1))

    straight = LBS(fresh_resnet(trained_resnet), SIZE, **kw)
    expected = straight.prune(loader())

    train = loader()
    first = LBS(fresh_resnet(trained_resnet), SIZE, **kw)
    assert first.search(train, max_work=1) is False  # stopped inside the scoring
    state = copy.deepcopy(first.state_dict())
    next(iter(train))  # the loader moves on meanwhile; the checkpoint restores its order
    second = LBS(fresh_resnet(trained_resnet), SIZE, **kw)
    second.load_state_dict(state)
    assert second.search(train, max_work=12) is False  # stopped inside the search
    assert second.phase == "search" and 0 < len(second.cache) < len(straight.cache)
    state = copy.deepcopy(second.state_dict())
    third = LBS(fresh_resnet(trained_resnet), SIZE, **kw)
    third.load_state_dict(state)
    got = third.prune(train)
    assert third.delta == straight.delta and third.unit_k == straight.unit_k
    assert all(torch.equal(got[n], expected[n]) for n in expected)
    assert third.cache == straight.cache
    assert torch.equal(third.rank_sums["conv1"], straight.rank_sums["conv1"])


def test_lbs_meets_the_ratio_where_pruning_lowers_the_loss(data):
    """Where pruning any unit alone lowers the loss (here a loss that falls with the output's size; an
    untrained model can behave so), every unit would go to its maximum rate at delta = 0, far past
    the ratio; the search goes below 0 instead."""
    train_dl, val_dl = data
    torch.manual_seed(1)
    model = models.vgg(cfg=[8, "M", 8, "M", 8], in_channels=1)
    dense = copy.deepcopy(model.state_dict())
    score = [next(iter(train_dl))]
    shrinking = lambda out, y: out.square().mean()  # noqa: E731
    pr = LBS(model, SIZE, val_data=val_dl, ratio=0.5, score_batches=1, loss_fn=shrinking)
    at_zero = pr.ks_at(0.0) if pr.prune(score) is not None else None
    assert pr._metric(at_zero) > 0.75  # the overshoot a search that stops at 0 would give
    # near the ratio: above it by at most what the loss bound costs where losses are not monotone in k
    assert pr.delta < 0 and 0.5 <= pr._metric(pr.unit_k) < 0.6
    for unit in pr.units:  # the loss bound holds at the negative delta
        assert pr.loss_change(unit, pr.unit_k[unit.name]) <= pr.delta or pr.unit_k[unit.name] == 0
    fixed = LBS(models.vgg(cfg=[8, "M", 8, "M", 8], in_channels=1), SIZE, val_data=val_dl, delta=pr.delta,
                score_batches=1, loss_fn=shrinking)
    fixed.model.load_state_dict(dense)
    fixed.prune(score)
    assert fixed.unit_k == pr.ks_at(pr.delta)



def test_lbs_trim_takes_the_jump_that_lands_closest_to_the_target():
    """Two units whose rates both jumped in the last delta step, both needed for the goal: the first
    one's loss bound only holds near its maximum, the second one's everywhere. The trim cuts back the
    second one, landing on the goal, rather than the first one in model order (0.75)."""
    from types import SimpleNamespace

    pr = object.__new__(LBS)
    pr.units = [SimpleNamespace(name="a"), SimpleNamespace(name="b")]
    pr._metric = lambda ks: (ks["a"] + ks["b"]) / 20
    pr.loss_change = lambda unit, k: 1.0 if unit.name == "a" and k < 7 else 0.0
    ks = pr._trim({"a": 0, "b": 0}, {"a": 8, "b": 8}, delta=0.5, goal=0.5)
    assert ks == {"a": 8, "b": 2}
    # a jump the goal does not need falls back to the lower end of the bracket
    assert pr._trim({"a": 0, "b": 0}, {"a": 10, "b": 10}, delta=0.5, goal=0.5) == {"a": 0, "b": 10}
