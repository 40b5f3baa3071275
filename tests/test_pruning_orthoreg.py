"""OrthoReg: the orthonormality penalty, the Fisher importance, the rounds, resume and export."""
import math

import pytest
import torch
import torch.nn.functional as F

from stripeconv import pruning
from stripeconv.pruning.orthoreg import OrthoReg, round_epochs

from conftest import FASHION_SIZE as SIZE, check_export, fashion_batches, pruner_train_step, resume_run, tiny_vgg


@pytest.fixture(scope="module")
def batches():
    return fashion_batches(limit=256, batch_size=64, repeats=3)


def biased_net():
    """Convs with a bias and no BN (the bias is part of a filter's estimate and of the penalty's rows)."""
    return torch.nn.Sequential(torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(8, 6, 3),
                               torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(6, 10))


def make(model, batches, **kw):
    kw.setdefault("ratio", 0.5)
    kw.setdefault("epochs", 3)
    return OrthoReg(model, SIZE, val_data=batches[:2], **kw)


def test_round_epochs():
    assert round_epochs(3, 2) == [1, 2]
    assert round_epochs(10, 2) == [3, 7]
    assert round_epochs(9, 1) == [5]
    assert round_epochs(4, 4) == [1, 2, 3, 4]
    for e in range(1, 30):
        for r in range(1, e + 1):
            s = round_epochs(e, r)
            assert len(s) == r and all(a < b for a, b in zip(s, s[1:])) and s[0] >= 1 and s[-1] <= e
    with pytest.raises(ValueError, match="rounds <= epochs"):
        round_epochs(2, 3)


@pytest.mark.parametrize("net", [tiny_vgg, biased_net])
def test_penalty_is_the_weighted_l1_distance_of_the_smaller_gram_from_identity(batches, net):
    torch.manual_seed(0)
    model = net()
    pr = make(model, batches, strength=0.3)
    expected, weights = [], []
    for name, conv in pr.convs.items():
        w = conv.weight.detach().double().reshape(conv.out_channels, -1)
        if conv.bias is not None:
            w = torch.cat([w, conv.bias.detach().double()[:, None]], 1)
        k, fan = w.shape
        gram = torch.einsum("ia,ja->ij", w, w) if k <= fan else torch.einsum("ai,aj->ij", w, w)
        expected.append(float((gram - torch.eye(len(gram), dtype=gram.dtype)).abs().sum()))
        weights.append(math.sqrt(min(k, fan)))
    want = 0.3 * sum(e * wt / sum(weights) for e, wt in zip(expected, weights))
    got = pr.penalty()
    assert got.requires_grad
    assert float(got.detach()) == pytest.approx(want, rel=1e-5)
    assert any(c.bias is not None for c in pr.convs.values()) == (net is biased_net)
    if net is biased_net:
        return
    # orthonormal filters cost nothing
    conv = pr.convs["features.4"]
    with torch.no_grad():
        q, _ = torch.linalg.qr(torch.randn(conv.weight[0].numel(), conv.out_channels, dtype=torch.float64))
        conv.weight.copy_(q.T.reshape_as(conv.weight))
    assert pr.orthogonality()["features.4"] == pytest.approx(1.0, abs=1e-6)
    assert float(pr.penalty().detach()) < float(got.detach())
    assert pr.orthogonality()["features.0"] < 1.0


def test_penalty_trains_towards_orthonormal_filters(batches):
    torch.manual_seed(0)
    model = tiny_vgg()
    pr = make(model, batches, strength=1.0, epochs=10)
    before = float(pr.penalty().detach())
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    for _ in range(30):
        opt.zero_grad()
        pr.penalty().backward()
        opt.step()
    assert float(pr.penalty().detach()) < 0.5 * before


@pytest.mark.parametrize("net", [tiny_vgg, biased_net])
def test_scores_are_the_squared_first_order_loss_change(batches, net):
    torch.manual_seed(0)
    model = net()
    model.train()
    for granularity in ("filter", "stripe"):
        pr = make(model, batches, granularity=granularity, importance_samples=100)  # 2 batches of 64 >= 100
        got = pr.scores()
        assert model.training  # the mode is restored
        # independently: the mean-loss gradient over both batches at once (eval mode, so BN is per-sample)
        x = torch.cat([b[0] for b in batches[:2]])
        y = torch.cat([b[1] for b in batches[:2]])
        model.eval()
        model.zero_grad()
        F.cross_entropy(model(x), y).backward()
        model.train()
        for name, conv in pr.convs.items():
            change = (conv.weight.detach() * conv.weight.grad).double()
            if granularity == "filter":
                s = change.sum((1, 2, 3))
                if conv.bias is not None:
                    s = s + (conv.bias.detach() * conv.bias.grad).double()
            else:
                s = change.sum(1)
            torch.testing.assert_close(got[name].double(), s.pow(2), rtol=1e-3, atol=1e-12)
        model.zero_grad()


def test_importance_samples_caps_the_batches(batches):
    torch.manual_seed(0)
    model = tiny_vgg()
    one = OrthoReg(model, SIZE, val_data=batches[:1], ratio=0.5, epochs=3).scores()
    capped = OrthoReg(model, SIZE, val_data=batches[:3], ratio=0.5, epochs=3, importance_samples=64).scores()
    for name in one:
        torch.testing.assert_close(one[name], capped[name])


def test_rounds_prune_in_equal_steps_keep_earlier_units_and_stop_the_penalty(batches):
    torch.manual_seed(0)
    model = tiny_vgg()
    pr = make(model, batches, ratio=0.6, epochs=3, rounds=2, scope="layer")
    opt = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9)
    seen = []
    for epoch in range(3):
        for x, y in batches[epoch * 4:(epoch + 1) * 4]:
            pruner_train_step(model, pr, opt, x, y)
        pr.end_epoch(epoch)
        seen.append((pr.rounds_done, {n: m.clone() for n, m in pr.masks().items()}, pr.regularising))
    assert [s[0] for s in seen] == [1, 2, 2] and [s[2] for s in seen] == [True, False, False]
    assert pr.penalty() == 0.0
    for name, conv in pr.convs.items():
        n = conv.out_channels
        first, second = seen[0][1][name].flatten(1).any(1), seen[1][1][name].flatten(1).any(1)
        assert n - int(first.sum()) == int(0.3 * n)
        assert n - int(second.sum()) == int(0.6 * n)
        assert not bool((second & ~first).any())  # pruned in round 1 stays pruned
        assert torch.equal(seen[2][1][name], seen[1][1][name])
        w = conv.weight.detach()
        assert float(w[~second].abs().sum()) == 0.0
    check_export(pr, batches[0][0][:8])


def test_global_ranking_respects_the_per_layer_cap(batches):
    torch.manual_seed(0)
    model = tiny_vgg()
    pr = make(model, batches, ratio=0.9, rounds=1, max_layer_rate=0.5)
    pr.prune()
    for name, m in pr.masks().items():
        kept = int(m.flatten(1).any(1).sum())
        assert kept >= math.ceil(0.5 * m.shape[0]), name
    assert not pr.regularising


def test_stripes_and_flops_target(batches):
    torch.manual_seed(0)
    model = tiny_vgg()
    pr = make(model, batches, granularity="stripe", ratio=0.5, rounds=2)
    pr.prune()
    total = sum(m.numel() for m in pr.masks().values())
    kept = sum(int(m.sum()) for m in pr.masks().values())
    assert total - kept == int(0.5 * total)
    torch.manual_seed(0)
    model = tiny_vgg()
    pr = make(model, batches, ratio=None, target_flops_reduction=0.4)
    pr.prune()
    assert pr.flops_reduction() >= 0.4 - 1e-9
    check_export(pr, batches[0][0][:8])


def test_resume_is_exact(batches):
    def make_pruner(model):
        return OrthoReg(model, SIZE, val_data=batches[:1], ratio=0.5, epochs=3, rounds=2)

    resume_run(make_pruner, batches, 8, 3)  # training with the penalty resumes bit for bit
    torch.manual_seed(0)
    model = tiny_vgg()
    a = make_pruner(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for x, y in batches[:3]:
        pruner_train_step(model, a, opt, x, y)
    a.end_epoch(0)
    assert a.rounds_done == 1 and a.state_dict()["extra"] == {"rounds_done": 1}
    b = make_pruner(tiny_vgg())
    b.load_state_dict(a.state_dict())
    assert b.rounds_done == 1 and b.regularising and b.schedule == a.schedule
    for name in a.convs:
        assert torch.equal(a.masks()[name], b.masks()[name])


def test_fit_drives_it_and_the_cli_knows_it(batches):
    from stripeconv import cli
    from stripeconv.engine import is_oneshot

    torch.manual_seed(0)
    model = tiny_vgg()
    pr = make(model, batches, ratio=0.5, epochs=2, rounds=1)
    assert not is_oneshot(pr)
    pruning.fit(model, pr, batches[:6], epochs=2, optimizer=torch.optim.SGD(model.parameters(), lr=0.02),
                progress=False)
    assert pr.rounds_done == 1
    params = cli.method_params(OrthoReg)
    assert "val_data" in params and params["rounds"].default == 2
