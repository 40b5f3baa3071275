"""GReg-1 / GReg-2 (growing regularization) on small real-data runs: the penalty grows as scheduled,
the stop tests fire, the selected units are pruned, export == masked model, resume is exact."""

import pytest
import torch


from stripeconv import pruning  # noqa: E402
from stripeconv.pruning.greg import GReg1, GReg2, stage_ratios  # noqa: E402

from conftest import (FASHION_SIZE as SIZE, check_export, penalty_gradient, pruner_train_step,
                      resume_run, tiny_resnet, tiny_vgg)

pytestmark = pytest.mark.usefixtures("one_thread")


step = pruner_train_step


def test_greg1_penalty_grows_as_scheduled(batches):
    torch.manual_seed(0)
    model = tiny_resnet()
    pr = GReg1(model, SIZE, ratio=0.5, delta=0.05, interval=2, ceiling=0.3, stabilize_steps=3)
    # filters: residual-coupled convs left out (the public code prunes the blocks' inner convs)
    assert set(pr.convs) == {"layer1.0.conv1", "layer2.0.conv1", "layer3.0.conv1"}
    w0 = {n: c.weight.detach().clone() for n, c in pr.convs.items()}
    target = pr.target
    for n, m in target.items():  # L1 selection up front: the lowest-|w| half of each layer
        keep = m.flatten(1).any(1)
        assert int((~keep).sum()) == pr.convs[n].out_channels // 2
        s = w0[n].abs().mean((1, 2, 3))
        assert float(s[~keep].max()) <= float(s[keep].min())
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    n_updates = 7  # 0.3 / 0.05 = 6 updates reach the ceiling; growth stops once lambda > ceiling
    for i, (x, y) in enumerate(batches[:20]):
        if i == 3:  # the penalty is a gradient term lambda * w on the selected units only
            name = "layer2.0.conv1"
            added, w = penalty_gradient(model, pr, name, x, y)
            lam = pr.lambdas[name].to(w.dtype)[:, None]
            torch.testing.assert_close(added, lam * w)
            assert float(lam.max()) > 0
        step(model, pr, opt, x, y)
        s = pr.steps
        k = min(s // 2, n_updates)
        for n, m in target.items():
            lam = pr.lambdas[n]
            torch.testing.assert_close(lam[~m], torch.full_like(lam[~m], k * 0.05))
            assert bool((lam[m] == 0).all())
        if s < 2 * n_updates:
            assert pr.phase == "grow"
        elif s < 2 * n_updates + 3:
            assert pr.phase == "stabilize" and pr.stab_start == 2 * n_updates
        else:
            assert pr.phase == "finetune"
    assert pr.updates == n_updates and pr.done
    masks = pr.masks()
    for n, m in masks.items():
        assert torch.equal(m, target[n])
        w = pr.convs[n].weight.detach()
        assert float(w[~m[:, None].expand_as(w)].abs().sum()) == 0.0
    ex = check_export(pr, batches[0][0][:8])
    rep = pr.report(ex)
    assert rep["flops_reduction"] > 0.1 and rep["params_reduction"] > 0.1


def test_greg2_uniform_growth_pick_and_ratio_stop(batches):
    torch.manual_seed(0)
    model = tiny_vgg()
    pr = GReg2(model, SIZE, ratio=0.5, granularity="stripe", delta=0.05, interval=1, ceiling=10.0,
               pick_delta=0.02, pick_ceiling=0.1, recover=-1e-4, mag_ratio_limit=1.0, stabilize_steps=2)
    assert pr.phase == "pick" and pr.target is None
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for i in range(4):  # uniform growth of every stripe's factor
        step(model, pr, opt, *batches[i])
        for lam in pr.lambdas.values():
            torch.testing.assert_close(lam, torch.full_like(lam, (i + 1) * 0.02))
    step(model, pr, opt, *batches[4])  # reaches pick_ceiling: units picked by L1 now
    assert pr.phase == "grow" and pr.target is not None
    scores = pr.scores()
    for n, m in pr.target.items():
        assert int((~m).sum()) == m.numel() // 2  # half of the stripes of each layer
        assert float(scores[n][~m].max()) <= float(scores[n][m].min())
    step(model, pr, opt, *batches[5])  # pruned grow by delta, kept get the negative factor; ratio >= 1 stops
    for n, m in pr.target.items():
        lam = pr.lambdas[n]
        torch.testing.assert_close(lam[~m], torch.full_like(lam[~m], 0.1 + 0.05))
        torch.testing.assert_close(lam[m], torch.full_like(lam[m], -1e-4))
    assert pr.phase == "stabilize" and all(r >= 1.0 for r in pr.magnitude_ratio().values())
    step(model, pr, opt, *batches[6])
    step(model, pr, opt, *batches[7])
    assert pr.phase == "finetune"
    pruning.fit(model, pr, batches[8:12], epochs=1, optimizer=opt, progress=False)
    for n, m in pr.masks().items():
        assert int((~m).sum()) == m.numel() // 2
    check_export(pr, batches[0][0][:8])


def test_greg_flops_target_stage_ratios_and_early_prune(batches, capfd):
    torch.manual_seed(0)
    model = tiny_vgg()
    pr = GReg1(model, SIZE, target_flops_reduction=0.5, delta=0.1, interval=1, ceiling=0.5, stabilize_steps=2,
               verbose=True)
    pruning.fit(model, pr, batches[:12], epochs=1, optimizer=torch.optim.SGD(model.parameters(), lr=0.05),
                progress=False)
    assert pr.done and pr.flops_reduction() >= 0.5 - 1e-9
    assert "GReg1 regularisation" in capfd.readouterr().err  # progress is visible (tqdm or log lines)
    # reg_steps fits the schedule into a budget; a run that ends before pruning is pruned at its last epoch
    model = tiny_vgg()
    pr = GReg2(model, SIZE, ratio=0.5, reg_steps=40, epochs=1)
    assert pr.interval == 2 and pr.stabilize_steps == 4
    with pytest.warns(UserWarning, match="pruning now"):
        pruning.fit(model, pr, batches[:6], epochs=1, optimizer=torch.optim.SGD(model.parameters(), lr=0.05),
                    progress=False)
    assert pr.done
    ex = check_export(pr, batches[0][0][:8])
    assert abs(pr.report(ex)["flops_reduction"] - pr.flops_reduction()) < 1e-9

    resnet = tiny_resnet()
    ratios = stage_ratios(resnet, SIZE, {"layer2.": 0.5, "layer3.": 0.25})
    assert ratios == {"layer2.0.conv1": 0.5, "layer3.0.conv1": 0.25}
    pr = GReg2(resnet, SIZE, ratios=ratios)
    assert set(pr.convs) == set(ratios)
    masks = pr.prune()  # ends the regularisation now (picks, prunes)
    assert pr.done and int((~masks["layer2.0.conv1"].flatten(1).any(1)).sum()) == 8
    assert int((~masks["layer3.0.conv1"].flatten(1).any(1)).sum()) == 8  # 0.25 of 32


@pytest.mark.parametrize("cls", [GReg1, GReg2])
def test_greg_resume_is_exact(cls, batches):
    kw = dict(ratio=0.5, granularity="stripe", delta=0.05, interval=2, ceiling=0.2, stabilize_steps=2,
              pick_delta=0.05, pick_ceiling=0.1)

    pr, _, pr2, _ = resume_run(lambda model: cls(model, SIZE, **kw), batches, n=20, k=7)
    assert pr.phase == pr2.phase == "finetune"
    for name in pr.convs:
        assert torch.equal(pr.lambdas[name], pr2.lambdas[name])
        assert torch.equal(pr.masks()[name], pr2.masks()[name])
    assert pr.hist_ratio == pr2.hist_ratio and pr.finished == pr2.finished
