"""IncReg (incremental regularization) on small real-data runs: the rank-based increment has the
paper's shape, factors follow the averaged-rank update and never go negative, units are pruned at
the ceiling up to each layer's quota, export == masked model, resume is exact."""
import math

import pytest
import torch

from stripeconv import pruning
from stripeconv.pruning.increg import IncReg, rank_increment, schedule_length

from conftest import (FASHION_SIZE as SIZE, check_export, penalty_gradient, pruner_train_step,
                      resume_run, tiny_resnet, tiny_vgg)

pytestmark = pytest.mark.usefixtures("one_thread")


step = pruner_train_step


def train_step(model, pr, opt, x, y):
    pruner_train_step(model, pr, opt, x, y, after_step=False)


def units(pr, name):
    """Kept units of a layer, flattened (filters or stripes)."""
    m = pr.masks()[name]
    return (m.flatten(1).any(1) if pr.granularity == "filter" else m).reshape(-1)


@pytest.mark.parametrize("u", [0.25, 0.5])
def test_increment_shape(u):
    a = 0.1
    for remaining, n in [(1, 4), (4, 8), (8, 16), (12, 13)]:
        d = rank_increment(torch.arange(n), remaining, a, u)
        assert d.dtype == torch.float64
        assert float(d[0]) == pytest.approx(a) and int(d.argmax()) == 0  # largest for the least important unit
        assert bool((d[1:] < d[:-1]).all())  # strictly decreasing in the rank
        assert bool((d[:remaining] > 0).all()) and bool((d[remaining + 1:] < 0).all())
        assert abs(float(d[remaining])) < 1e-12  # zero at the pruning boundary
        n_c = remaining * math.log(1 / u) / math.log(2 / u)
        for x in (0.0, 0.3, n_c / 2, n_c):  # point symmetry about (N_c, u * A)
            r = torch.tensor([n_c - x, n_c + x], dtype=torch.float64)
            lo, hi = rank_increment(r, remaining, a, u).tolist()
            assert lo + hi == pytest.approx(2 * u * a)
    # with fixed ranks the lowest unit alone reaches the ceiling after ceiling / delta updates
    assert schedule_length(8, 1, 5.0) == 5 and schedule_length(8, 0, 5.0) == 0
    assert 5 < schedule_length(16, 8, 5.0) < 8 * 5
    for bad in (dict(remaining=0), dict(u=1.0), dict(u=0.0)):
        kw = dict(remaining=3, delta=a, u=u) | bad
        with pytest.raises(ValueError):
            rank_increment(torch.arange(4), **kw)


def test_factors_follow_the_averaged_rank_and_prune_at_the_ceiling(batches):
    torch.manual_seed(0)
    model = tiny_vgg()
    pr = IncReg(model, SIZE, ratio=0.5, delta=0.5, ceiling=1.5, interval=2)
    assert pr.quota == {"features.0": 4, "features.4": 8, "features.8": 8}  # floor(0.5 * filters)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    avg = {n: torch.zeros(c.out_channels, dtype=torch.float64) for n, c in pr.convs.items()}
    n_upd, seen_prune = 0, False
    for i, (x, y) in enumerate(batches):
        if i == 5:  # the penalty is a gradient term lambda_g * w_g, one factor per filter
            name = "features.4"
            added, w = penalty_gradient(model, pr, name, x, y)
            lam = pr.lambdas[name].to(w.dtype)[:, None, None, None]
            torch.testing.assert_close(added, lam * w)
            assert float(lam.max()) > 0
        train_step(model, pr, opt, x, y)
        update = pr.phase == "reg" and (pr.steps + 1) % 2 == 0
        expect = {}
        if update:  # the rule, recomputed from the weights the update sees
            n_upd += 1
            for n in pr.convs:
                if n in pr.finished:
                    continue
                alive = units(pr, n)
                idx = torch.nonzero(alive).flatten()
                s = pr.convs[n].weight.detach().abs().mean((1, 2, 3))[idx].double()
                rank = torch.empty(len(idx), dtype=torch.float64)
                rank[torch.sort(s, stable=True).indices] = torch.arange(len(idx), dtype=torch.float64)
                avg[n][idx] = ((n_upd - 1) * avg[n][idx] + rank) / n_upd
                order = idx[torch.sort(avg[n][idx], stable=True).indices]
                left = pr.quota[n] - (alive.numel() - len(idx))
                lam = pr.lambdas[n].clone()
                lam[order] = (lam[order] + rank_increment(torch.arange(len(idx)), left, 0.5, 0.25)).clamp(min=0)
                hit = order[lam[order] >= 1.5 * (1 - 1e-9)][:left]
                expect[n] = (lam, hit, alive, left)
        pr.after_step()
        assert pr.updates == n_upd
        for n, (lam, hit, alive, left) in expect.items():
            now = units(pr, n)
            assert set(torch.nonzero(alive & ~now).flatten().tolist()) == set(hit.tolist())
            seen_prune |= len(hit) > 0
            if len(hit) == left:  # quota reached: the layer stops, its kept factors go back to 0
                assert n in pr.finished and bool((pr.lambdas[n][now] == 0).all())
                torch.testing.assert_close(pr.lambdas[n][~now], lam[~now])
            else:
                torch.testing.assert_close(pr.lambdas[n], lam)
                assert bool((lam[hit] >= 1.5 * (1 - 1e-9)).all())
        for n in pr.convs:
            assert bool((pr.lambdas[n] >= 0).all())  # clipped at 0
            now = units(pr, n)
            assert now.numel() - int(now.sum()) <= pr.quota[n]
            w = pr.convs[n].weight.detach()
            assert float(w[~now].abs().sum()) == 0.0  # pruned for good: held at zero
            torch.testing.assert_close(avg[n], pr.avg_rank[n])
    assert seen_prune and pr.done and pr.phase == "finetune"
    assert pr.pruned_units() == pr.quota and set(pr.finished) == set(pr.convs)
    ex = check_export(pr, batches[0][0][:8])
    rep = pr.report(ex)
    assert rep["flops_reduction"] > 0.3 and rep["params_reduction"] > 0.3


def test_stripes_flops_target_and_progress(batches, capfd):
    torch.manual_seed(0)
    model = tiny_vgg()
    pr = IncReg(model, SIZE, ratio=0.5, granularity="stripe", reg_steps=20, verbose=True)
    assert pr.interval == 1 and pr.expected_updates <= 16  # reg_steps: fixed-rank schedule within 80 %
    assert pr.quota == {"features.0": 36, "features.4": 72, "features.8": 72}
    assert pr.lambdas["features.4"].shape == (16, 3, 3)  # one factor per stripe
    pruning.fit(model, pr, batches[:24], epochs=1, optimizer=torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9),
                progress=False)
    assert pr.done and pr.steps == 24 and max(pr.finished.values()) <= 24
    assert "IncReg regularisation" in capfd.readouterr().err  # progress is visible (tqdm or log lines)
    assert pr.pruned_units() == pr.quota
    check_export(pr, batches[0][0][:8])
    # a FLOPs target fixes per-layer quotas by L1 once; a plain chain then reaches exactly that reduction
    model = tiny_vgg()
    pr = IncReg(model, SIZE, target_flops_reduction=0.4, delta=0.5, ceiling=2.5)
    planned = pr.flops_reduction(pr.select(pr.scores()))
    assert planned >= 0.4 - 1e-9
    pruning.fit(model, pr, batches[:24], epochs=1, optimizer=torch.optim.SGD(model.parameters(), lr=0.05),
                progress=False)
    assert pr.done and pr.flops_reduction() == pytest.approx(planned)


def test_cut_short_prunes_largest_factors_and_resnet_layers(batches):
    torch.manual_seed(0)
    model = tiny_resnet()
    pr = IncReg(model, SIZE, ratio=0.5, reg_steps=200, epochs=1)
    # filters: residual-coupled convs left out (as GReg: the blocks' inner convs)
    assert set(pr.convs) == {"layer1.0.conv1", "layer2.0.conv1", "layer3.0.conv1"}
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for x, y in batches[:6]:
        step(model, pr, opt, x, y)
    assert pr.phase == "reg"
    before = {n: (units(pr, n), pr.lambdas[n].clone()) for n in pr.convs}
    with pytest.warns(UserWarning, match="pruning now"):
        pr.end_epoch(0)
    assert pr.done and pr.pruned_units() == pr.quota
    for n, (alive, lam) in before.items():
        now = units(pr, n)
        cut = alive & ~now
        if bool(cut.any()) and bool(now.any()):  # the rest of the quota: largest factors first
            assert float(lam[cut].min()) >= float(lam[now].max())
    check_export(pr, batches[0][0][:8])
    pr.prune()  # already pruned: nothing changes
    assert pr.pruned_units() == pr.quota


def test_never_more_than_the_quota(batches):
    torch.manual_seed(0)
    model = tiny_vgg()
    pr = IncReg(model, SIZE, ratio=0.25, delta=0.1)
    for lam in pr.lambdas.values():  # every unit at the ceiling: more than the quota would qualify
        lam.fill_(pr.ceiling)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    train_step(model, pr, opt, *batches[0])
    scores = pr.scores()  # what the first update ranks by
    pr.after_step()
    assert pr.done and pr.pruned_units() == pr.quota == {"features.0": 2, "features.4": 4, "features.8": 4}
    for n, s in scores.items():  # first update: averaged rank == L1 rank, the lowest go first
        now = units(pr, n)
        assert float(s[~now].max()) <= float(s[now].min())


@pytest.mark.parametrize("kw", [dict(ratio=0.5, delta=0.5, ceiling=2.5),
                                dict(ratio=0.5, scope="global", granularity="stripe", reg_steps=30)])
def test_resume_is_exact(kw, batches):
    # built on the resumed weights: the state restores quotas and delta
    pr, pr1, pr2, state = resume_run(lambda model: IncReg(model, SIZE, **kw), batches, n=20, k=9)
    assert pr1.phase == "reg" and sum(pr1.pruned_units().values()) > 0  # mid-regularisation, some pruned
    torch.manual_seed(1)  # the state, not the weights a pruner is built on, decides quotas and delta
    other = IncReg(tiny_vgg(), SIZE, **kw)
    other.load_state_dict(state["pruner"])
    assert (other.quota, other.delta, other.interval) == (pr1.quota, pr1.delta, pr1.interval)
    for name in pr.convs:
        assert torch.equal(pr.lambdas[name], pr2.lambdas[name])
        assert torch.equal(pr.avg_rank[name], pr2.avg_rank[name])
        assert torch.equal(pr.masks()[name], pr2.masks()[name])
    assert (pr.phase, pr.updates, pr.finished, pr.quota, pr.delta) == \
        (pr2.phase, pr2.updates, pr2.finished, pr2.quota, pr2.delta)


@pytest.mark.parametrize("bad", [dict(u=1.0), dict(u=0.0), dict(delta=0.0), dict(ceiling=-1.0), dict(interval=0),
                                 dict(reg_steps=0)])
def test_bad_hyperparameters(bad):
    with pytest.raises(ValueError, match=r"IncReg: (u|delta|ceiling|interval|reg_steps) must be"):
        IncReg(tiny_vgg(), SIZE, ratio=0.5, **bad)
    with pytest.raises(ValueError, match="granularity must be one of"):
        IncReg(tiny_vgg(), SIZE, ratio=0.5, granularity="channel")
