"""DAIS on a small real-data run: the indicators binarise as T anneals, the FLOPs budget is met
within 2 %, the differentiable FLOPs agree with the graph count, export == masked model, resume is exact."""
import pytest
import torch
from torch.utils.data import DataLoader


from stripeconv import pruning  # noqa: E402
from stripeconv.pruning.dais import DAIS  # noqa: E402
from stripeconv.pruning.lbs import holdout_split  # noqa: E402

from conftest import FASHION_SIZE as SIZE, fashion, resume_run, tiny_resnet

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data():
    ds = fashion(train=True, limit=512)
    train, val = holdout_split(ds, 128)  # indicators learn on held-out *training* data
    return (DataLoader(train, batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(0)),
            DataLoader(val, batch_size=64))


@pytest.mark.parametrize("target", [0.5, 0.7])
def test_dais_binarises_and_meets_budget(target, data):
    train_dl, val_dl = data
    torch.manual_seed(0)
    model = tiny_resnet()
    pr = DAIS(model, SIZE, val_data=val_dl, target_flops_reduction=target, search_steps=18, alpha_lr=0.1)
    temps, binar = [], []
    orig = pr._finalize

    def spy():
        binar.append(pr.binarization())
        orig()
    pr._finalize = spy
    pruning.fit(model, pr, train_dl, epochs=4, optimizer=torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9),
                progress=False, callback=lambda r: temps.append(pr.temperature))
    assert pr.done and pr.alpha_steps == 18 and pr.cursor.passes * len(val_dl) + pr.cursor.pos == 18
    assert temps[0] < 1.0 and temps[0] > temps[1] >= 1e-3 - 1e-12  # annealed towards 0
    assert binar[0] >= 0.95  # indicators (nearly all) binary at the end of the search
    budget = (1 - target) * pr.dense_flops
    flops = pr.flops()
    assert flops <= budget and flops >= 0.98 * budget, (flops / budget, pr.correction)
    c = pr.correction
    assert c is not None and abs(c["flops_after"] * pr.dense_flops - flops) < 1
    for n, m in pr.masks().items():  # channels: whole filters, as kept by alpha > 0 (+ correction)
        assert bool((m.flatten(1).all(1) | ~m.flatten(1).any(1)).all())
    x = next(iter(train_dl))[0][:8]
    ex = pr.export()
    torch.testing.assert_close(ex(x), pr.masked_model().eval()(x), atol=1e-4, rtol=1e-4)
    rep = pr.report(ex)
    assert abs(rep["flops_reduction"] - pr.flops_reduction()) < 1e-9 and rep["correction"] is c


def test_dais_expected_flops_and_folding(data):
    train_dl, val_dl = data
    torch.manual_seed(0)
    model = tiny_resnet()
    pr = DAIS(model, SIZE, val_data=val_dl, target_flops_reduction=0.5, search_steps=100)
    e = float(pr.expected_flops(pr.indicators()))  # soft indicators (0.57 at T = 1): fewer expected FLOPs
    assert 0.1 * pr.dense_flops < e < pr.dense_flops
    with torch.no_grad():
        for a in pr.alphas.values():
            a.fill_(50.0)  # indicators ~1: the dense count
    assert abs(float(pr.expected_flops(pr.indicators())) - pr.dense_flops) <= 1e-4 * pr.dense_flops
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for a in pr.alphas.values():
            a.copy_(torch.where(torch.rand(a.shape, generator=g) < 0.6, 1.0, -1.0))
    pr.temperature = 1e-4  # binary indicators: the differentiable count equals the graph's
    keep = {n: a.detach() > 0 for n, a in pr.alphas.items()}
    exact = pr.flops(pr.binarized_masks(keep))
    assert abs(float(pr.expected_flops(pr.indicators())) - exact) <= 1e-4 * exact
    # the residual term is zero only when coupled producers agree
    assert float(pr.residual_consistency(pr.indicators())) > 0
    # gating + folding: the soft model equals the finalized masked model when indicators are binary
    model.eval()
    x = next(iter(train_dl))[0][:8]
    with torch.no_grad():
        soft = model(x)
    pr.correct = False  # no budget correction here: compare the pure binarised model
    masks = pr.prune()
    assert pr.correction is None
    assert all(torch.equal(masks[n][:, 0, 0], keep[n]) for n in keep)
    with torch.no_grad():
        torch.testing.assert_close(pr.masked_model().eval()(x), soft, atol=1e-4, rtol=1e-4)


def test_dais_resume_is_exact(data):
    train_dl, val_dl = data
    batches = [b for _, b in zip(range(14), iter(train_dl))]

    def make(model):
        return DAIS(model, SIZE, val_data=val_dl, target_flops_reduction=0.5, search_steps=10, alpha_lr=0.1)

    for k in (3, 12):  # inside the search (alphas, Adam state, T, val position) and in fine-tuning
        pr, pr1, pr2, _ = resume_run(make, batches, 14, k, model_fn=tiny_resnet)
        assert pr2.temperature == pr.temperature
        for n in pr.alphas:
            assert torch.equal(pr.alphas[n], pr2.alphas[n])
            assert torch.equal(pr.masks()[n], pr2.masks()[n])
        assert pr.correction == pr2.correction
