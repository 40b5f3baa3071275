"""DSA: the keep probabilities meet their keep ratio and their implicit gradient matches finite
differences; the expected FLOPs equal the graph count for 0/1 masks; a search on real data meets
the budget with a non-uniform allocation; export == masked model; resume is exact."""
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from stripeconv import pruning
from stripeconv.pruning.dsa import DSA, keep_probabilities
from stripeconv.pruning.lbs import holdout_split

from conftest import FASHION_SIZE as SIZE, fashion, resume_run, tiny_resnet

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data():
    ds = fashion(train=True, limit=1280)
    train, val = holdout_split(ds, 256)  # keep ratios learn on held-out *training* data
    return (DataLoader(train, batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(0)),
            DataLoader(val, batch_size=64))


def _random_units(seed: int):
    g = torch.Generator().manual_seed(seed)
    importance = torch.rand(4, 12, generator=g) * 3
    valid = torch.ones(4, 12, dtype=torch.bool)
    valid[1, 9:] = False
    valid[3, 5:] = False
    importance[2, 3] = 0.0  # a dead filter has log-importance -18, not -inf
    return importance, valid


@pytest.mark.parametrize("beta2", [0.5, 1.0, 4.0])
@pytest.mark.parametrize("floor", [0.0, 0.01])
def test_keep_probabilities_meet_the_ratio_and_rank_by_importance(beta2, floor):
    importance, valid = _random_units(int(beta2 * 10))
    keep = torch.tensor([0.3, 0.75, 0.5, 0.95])
    p = keep_probabilities(keep, importance, valid, beta2, floor)
    torch.testing.assert_close((p * valid).sum(1) / valid.sum(1), keep, atol=1e-4, rtol=0)
    assert bool((p[~valid] == 0).all()) and bool((p[valid] >= floor - 1e-7).all()) and bool((p <= 1).all())
    for u in range(4):  # monotone in the importance
        n = int(valid[u].sum())
        order = torch.argsort(importance[u, :n])
        assert bool((p[u, :n][order].diff() >= -1e-6).all())


@pytest.mark.parametrize("beta2", [1.0, 6.0])
def test_implicit_gradient_matches_finite_differences(beta2):
    importance, valid = _random_units(3)
    keep = torch.tensor([0.3, 0.75, 0.5, 0.9], dtype=torch.float64, requires_grad=True)
    weights = torch.randn(4, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    p = keep_probabilities(keep, importance.double(), valid, beta2)
    (grad,) = torch.autograd.grad((p * weights).sum(), keep)
    for u in range(4):
        step = torch.zeros(4, dtype=torch.float64)
        step[u] = 1e-5
        with torch.no_grad():
            up = (keep_probabilities(keep + step, importance.double(), valid, beta2) * weights).sum()
            down = (keep_probabilities(keep - step, importance.double(), valid, beta2) * weights).sum()
        assert abs(float(grad[u]) - float(up - down) / 2e-5) < 1e-4 * max(1.0, abs(float(grad[u])))
    # the constraint is linear in the ratio: d sum(p) / d keep = size
    (g_sum,) = torch.autograd.grad((keep_probabilities(keep, importance.double(), valid, beta2)).sum(), keep)
    torch.testing.assert_close(g_sum, valid.sum(1).double())


@pytest.mark.parametrize("precondition", [True, False])
def test_search_meets_budget_with_a_learned_allocation(data, precondition):
    train_dl, val_dl = data
    torch.manual_seed(0)
    model = tiny_resnet()
    pr = DSA(model, SIZE, val_data=val_dl, target_flops_reduction=0.5, search_steps=100, precondition=precondition)
    assert len(pr.units) == 6  # residual-tied convs share one unit (DSA's topological groups)
    expected, evaluated = [], []
    step = pr._alpha_step

    def spy():
        step()
        expected.append(float(pr.budget_violation().detach()))
    pr._alpha_step = spy
    pruning.fit(model, pr, train_dl, epochs=4, optimizer=torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9),
                progress=False, eval_loader=DataLoader(val_dl.dataset, batch_size=128),
                callback=lambda r: evaluated.append(r))
    assert pr.done and pr.alpha_steps == 100 and pr.cursor.passes * len(val_dl) + pr.cursor.pos == 100
    assert expected[0] > 0.3 and abs(expected[-1]) < 0.05  # ADMM brought E[FLOPs] to the budget
    budget = 0.5 * pr.dense_flops
    assert 0.98 * budget <= pr.flops() <= budget, pr.correction
    keep = pr.keep_ratios().detach()
    assert float(keep.max() - keep.min()) > 0.1  # not a uniform allocation
    assert pr.allocation is not None and set(pr.allocation) == {u.name for u in pr.units}
    for u in pr.units:  # every member of a unit keeps the same root channels, as whole filters
        kept = None
        for name, idx, ridx in u.members:
            m = pr.masks()[name].flatten(1)
            assert bool((m.all(1) | ~m.any(1)).all())
            roots = set(ridx[m[idx].all(1)].tolist())
            kept = roots if kept is None else kept
            assert roots == kept
        assert abs(len(kept) / u.size - pr.allocation[u.name]) < 1e-9
    assert len(evaluated) == 4 and evaluated[-1]["eval_accuracy"] > 0.3
    x = next(iter(train_dl))[0][:8]
    ex = pr.export()
    model.eval()
    torch.testing.assert_close(ex(x), pr.masked_model().eval()(x), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(ex(x), model(x), atol=1e-4, rtol=1e-4)  # no gate left on the model
    rep = pr.report(ex)
    assert abs(rep["flops_reduction"] - pr.flops_reduction()) < 1e-9 and rep["allocation"] == pr.allocation


def test_expected_flops_and_masks(data):
    train_dl, val_dl = data
    torch.manual_seed(0)
    model = tiny_resnet()
    pr = DSA(model, SIZE, val_data=val_dl, target_flops_reduction=0.5, search_steps=50, floor=0.0)
    with torch.no_grad():
        pr.keep.fill_(1.0)
    assert abs(float(pr.expected_flops().detach()) - pr.dense_flops) <= 1e-4 * pr.dense_flops
    with torch.no_grad():
        pr.keep.copy_(torch.tensor([0.5, 0.25, 0.75, 0.5, 0.5, 0.625]))
    counts = pr.keep_counts()
    hard = pr.deterministic_masks(counts)
    assert torch.equal(hard.sum(1).long(), counts)
    exact = pr.flops(pr.unit_keeps_to_masks(hard))
    assert abs(float(pr.expected_flops(hard)) - exact) <= 1e-4 * exact  # 0/1 probabilities: the graph's count
    importance = pr.importance()
    for u in range(len(pr.units)):  # the kept channels are the most important ones
        kept, dropped = importance[u][hard[u] > 0], importance[u][(hard[u] == 0) & pr._valid[u]]
        assert dropped.numel() == 0 or float(kept.min()) >= float(dropped.max())
    # the gates: training samples 0/1 masks around the probabilities, evaluation uses the hard ones
    model.train()
    x = next(iter(train_dl))[0][:4]
    model(x)
    sampled = torch.cat(list(pr._factors_now.values()))
    assert bool(((sampled == 0) | (sampled == 1)).all()) and 0 < float(sampled.mean()) < 1
    model.eval()
    with torch.no_grad():
        gated = model(x)
        pr.correct = False
        pr.prune()
        torch.testing.assert_close(pr.masked_model().eval()(x), gated, atol=1e-4, rtol=1e-4)
    assert pr.correction["applied"] is False and torch.equal(pr.keep_counts(), counts)


def test_task_loss_reaches_the_keep_ratios(data):
    """Straight-through masks + the implicit gradient: the task loss alone moves every keep ratio."""
    train_dl, val_dl = data
    torch.manual_seed(0)
    model = tiny_resnet()
    pr = DSA(model, SIZE, val_data=val_dl, target_flops_reduction=0.5, search_steps=50)
    with torch.no_grad():
        pr.keep.fill_(0.6)
    x, y = next(iter(train_dl))
    pr._train_alpha = True
    loss = F.cross_entropy(model(x), y)
    pr._train_alpha = False
    (grad,) = torch.autograd.grad(loss, pr.keep)
    assert bool((grad != 0).all()) and bool(torch.isfinite(grad).all())


def test_resume_is_exact(data):
    train_dl, val_dl = data
    batches = [b for _, b in zip(range(16), iter(train_dl))]

    def make(model):
        return DSA(model, SIZE, val_data=val_dl, target_flops_reduction=0.5, search_steps=10, admm_every=3)

    for k in (4, 13):  # inside the search (keep ratios, dual, sampler, val position) and in fine-tuning
        pr, pr1, pr2, _ = resume_run(make, batches, 16, k, model_fn=tiny_resnet)
        assert pr2.phase == pr.phase and pr2.dual == pr.dual and torch.equal(pr.keep, pr2.keep)
        for n in pr.convs:
            assert torch.equal(pr.masks()[n], pr2.masks()[n])
        assert pr.correction == pr2.correction and pr.allocation == pr2.allocation


def test_registered_and_budget_only():
    assert pruning.METHODS["DSA"] is DSA
    with pytest.raises(ValueError, match="DSA allocates sparsity to a FLOPs budget"):
        DSA(tiny_resnet(), SIZE, val_data=[], target_flops_reduction=None, ratio=0.5, search_steps=5)
