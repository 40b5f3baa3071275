"""MetaPruning: the PruningNet against an independent cropped forward, its training schedule,
the evolutionary search (window, no repeats, operators, improvement), the final masks and
weights, resume, errors and the CLI."""
import copy
import io
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from stripeconv import cli, pruning
from stripeconv.engine import is_oneshot
from stripeconv.pruning.metapruning import DEFAULT_SCALES, MetaPruning

from conftest import FASHION_SIZE as SIZE, check_export, tiny_resnet, tiny_vgg

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = dict(meta_epochs=1, population=6, parents=3, iterations=2, recalib_batches=2)


@pytest.fixture(scope="module")
def data(batches):
    return batches[:8]


@pytest.fixture(scope="module")
def val(batches):
    return batches[8:10]


def chain() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 6, 3, padding=1, bias=True), nn.BatchNorm2d(6), nn.ReLU(),
                         nn.Conv2d(6, 8, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3))


def cropped_forward(pr: MetaPruning, x: torch.Tensor, encoding: tuple) -> torch.Tensor:
    """The chain's pruned network built by slicing the generated weights, as the public code does:
    first k channels of each layer, BatchNorm without affine on batch statistics."""
    k1, k2 = pr.keep_counts(encoding).values()
    g1, g2 = pr.generators["0"], pr.generators["3"]
    w1, b1 = g1(torch.tensor([1.0, k1 / 6]))
    w2, _ = g2(torch.tensor([k1 / 6, k2 / 8]))
    h = F.conv2d(x, w1[:k1], b1[:k1], padding=1)
    h = F.relu(F.batch_norm(h, None, None, training=True))
    h = F.conv2d(h, w2[:k2, :k1], None, stride=2, padding=1)
    h = F.relu(F.batch_norm(h, None, None, training=True)).mean((2, 3))
    lin = pr.meta[8]
    return F.linear(h, lin.weight[:, :k2], lin.bias)


def test_masked_pruningnet_computes_the_cropped_network():
    model = chain()
    pr = MetaPruning(model, (1, 1, 9, 9), val_data=[], target_flops_reduction=0.3)
    assert [u.name for u in pr.units] == ["0", "3"] and pr.generated == ["0", "3"]
    x = torch.randn(5, 1, 9, 9)
    pr.meta.train()
    for encoding in [(0, 0), (10, 30), (30, 4), (17, 22)]:
        torch.testing.assert_close(pr.meta_forward(x, encoding), cropped_forward(pr, x, encoding),
                                   atol=1e-5, rtol=1e-5)


def test_generated_weights_zero_the_pruned_channels_of_tied_units():
    pr = MetaPruning(tiny_resnet(), SIZE, val_data=[], target_flops_reduction=0.4)
    encoding = tuple(range(3, 3 + 5 * len(pr.units), 5))
    kept = pr.keep_counts(encoding)
    weights = pr.generated_weights(encoding)
    for unit in pr.units:
        for name, idx, ridx in unit.members:  # every producer of a tied unit keeps the same roots
            w = weights[f"{name}.weight"]
            alive = w.flatten(1).abs().sum(1) > 0
            assert torch.equal(alive[idx], ridx < kept[unit.name]), name
        for name, idx, ridx in pr.graph.groups[unit.group].consumers:
            if f"{name}.weight" in weights:  # inputs of pruned channels carry zero weight
                w = weights[f"{name}.weight"]
                assert not bool(w[:, idx[ridx >= kept[unit.name]]].any()), name
    # a generator reads the kept fractions of its conv's input and output channels
    conv = "layer2.0.conv1"
    out_mask, in_mask = pr._channel_masks(encoding)
    plain = MetaPruning(chain(), (1, 1, 9, 9), val_data=[], target_flops_reduction=0.3)
    bias = plain.generated_weights((10, 30))["0.bias"]  # conv 0 keeps int(6 * 0.4) = 2 channels
    assert bool(bias[:2].all()) and not bool(bias[2:].any())
    w, _ = pr.generators[conv.replace(".", "/")](torch.tensor([float(in_mask[conv].mean()),
                                                               float(out_mask[conv].mean())]))
    torch.testing.assert_close(weights[f"{conv}.weight"],
                               w * (out_mask[conv][:, None] * in_mask[conv][None])[:, :, None, None])


def test_schedule_and_uniform_encodings():
    pr = MetaPruning(tiny_vgg(), SIZE, val_data=[], target_flops_reduction=0.5)
    assert DEFAULT_SCALES[0] == 0.1 and DEFAULT_SCALES[-1] == 1.0 and len(DEFAULT_SCALES) == 31
    assert [pr._lr_at(s, 100) for s in (0, 24, 25, 49, 50, 75, 99)] == pytest.approx(
        [0.1, 0.1, 0.01, 0.01, 0.001, 1e-4, 1e-4])
    draws = torch.tensor([pr.random_encoding() for _ in range(3000)])
    counts = torch.bincount(draws.flatten(), minlength=31)
    assert draws.shape == (3000, 3) and int(counts.min()) > 0.6 * 3000 * 3 / 31


def test_pruningnet_training_lowers_the_loss(data):
    torch.manual_seed(0)
    pr = MetaPruning(tiny_vgg(), SIZE, val_data=[], target_flops_reduction=0.5, meta_epochs=12)
    full = (30,) * len(pr.units)

    def loss():
        with torch.no_grad():
            return sum(float(F.cross_entropy(pr.meta_forward(x, full), y)) for x, y in data) / len(data)
    before = loss()
    params = copy.deepcopy(pr.generators.state_dict())
    assert not pr.train_pruningnet(data, max_steps=3) and pr.meta_steps == 3
    assert pr.train_pruningnet(data) and pr.meta_steps == 96 and pr.phase == "search"
    assert not torch.equal(params["features/4.fc2.weight"], pr.generators["features/4"].fc2.weight)
    for bn in (pr.meta.features[1], pr.meta.features[5]):  # BN behind generated convs: no affine, also after training
        assert torch.equal(bn.weight, torch.ones_like(bn.weight)) and torch.equal(bn.bias, torch.zeros_like(bn.bias))
    assert pr.meta.classifier.weight.requires_grad  # the rest of the network is learned with the generators
    after = loss()
    assert after < before - 0.2


def test_label_smoothing_reaches_the_loss(data, monkeypatch):
    seen = []
    real = F.cross_entropy

    def spy(*args, **kw):
        seen.append(kw.get("label_smoothing"))
        return real(*args, **kw)
    monkeypatch.setattr("stripeconv.pruning.metapruning.F.cross_entropy", spy)
    pr = MetaPruning(tiny_vgg(), SIZE, val_data=[], target_flops_reduction=0.5, label_smoothing=0.3)
    pr.train_pruningnet(data, max_steps=2)
    assert seen == [0.3, 0.3]


def error_of(encoding):
    """A known error landscape: best at scale index 20 everywhere."""
    return sum(abs(g - 20) for g in encoding) / 1000.0


def stub_search(model, monkeypatch, **kw):
    pr = MetaPruning(model, SIZE, val_data=[], target_flops_reduction=0.4, **kw)
    calls = []

    def fake(encoding, data):
        calls.append(encoding)
        return error_of(encoding)
    monkeypatch.setattr(pr, "evaluate_encoding", fake)
    pr.phase = "search"
    return pr, calls


def test_search_stays_in_the_window_never_repeats_and_improves(monkeypatch):
    pr, calls = stub_search(tiny_resnet(), monkeypatch, population=12, parents=4, iterations=6, seed=3)
    assert not pr.search(None, max_evals=17)  # stopped inside the second generation, then continued
    pr.search(None)
    assert len(calls) == len(set(calls)) == len(pr.tested) and len(pr.top) == 12
    assert all(0.4 - 1e-12 <= pr.metric(c) <= 0.43 + 1e-12 for c in calls)
    assert pr.top == sorted(pr.top, key=lambda c: (error_of(c), c)) and pr.top[0] == min(calls, key=error_of)
    first = min(error_of(c) for c in calls[:12])
    assert error_of(pr.top[0]) < first  # evolution found better than the random first population
    assert pr.phase == "chosen" and pr.iteration == 6


def test_mutation_and_crossover_operators():
    pr = MetaPruning(tiny_resnet(), SIZE, val_data=[], target_flops_reduction=0.05, tolerance=0.9,
                     mutation_prob=1.0, mutations=20, crossovers=20, population=40)
    parent = (15,) * len(pr.units)
    for child in pr._mutants([parent], set()):
        assert all(g != 15 for g in child)  # probability 1: every gene moves
    pr.mutation_prob = 0.0
    assert pr._mutants([parent], {parent}) == []  # probability 0: only the (already seen) parent
    a, b = (5,) * len(pr.units), (25,) * len(pr.units)
    children = pr._crossovers([a, b], set())
    assert children and all(set(c) <= {5, 25} for c in children)
    assert len({c for c in children}) == len(children)


def test_prune_keeps_the_first_channels_and_the_searched_weights(data, val):
    torch.manual_seed(0)
    model = tiny_resnet()
    pr = MetaPruning(model, SIZE, val_data=val, target_flops_reduction=0.4, init="generated", **SMALL)
    masks = pr.prune(data)
    best = pr.top[0]
    assert pr.best == pr.keep_counts(best) and pr.best_error == pr.tested[best]
    assert 0.4 <= pr.flops_reduction() <= 0.43 + 1e-9
    for unit in pr.units:
        for name, idx, ridx in unit.members:
            alive = masks[name].flatten(1).any(1)
            assert torch.equal(alive[idx], ridx < pr.best[unit.name]), name
    # the model is the PruningNet's network for the chosen encoding, BN recalibrated on the data
    model.eval()
    pr.recalibrate(best, data)
    pr.meta.eval()
    x = val[0][0]
    torch.testing.assert_close(model(x), pr.meta_forward(x, best), atol=1e-5, rtol=1e-5)
    correct = sum(int((model(xb).argmax(1) == yb).sum()) for xb, yb in val)
    assert 1 - correct / sum(len(yb) for _, yb in val) == pytest.approx(pr.best_error)
    rep = pr.report()
    assert rep["channels_kept"] == pr.best and rep["evaluations"] == len(pr.tested)
    check_export(pr, x)


def test_scratch_init_reinitialises_with_the_same_masks(data, val):
    torch.manual_seed(0)
    generated = MetaPruning(tiny_vgg(), SIZE, val_data=val, target_flops_reduction=0.5, init="generated", **SMALL)
    generated.prune(data)
    torch.manual_seed(0)
    model = tiny_vgg()
    scratch = MetaPruning(model, SIZE, val_data=val, target_flops_reduction=0.5, **SMALL)
    assert scratch.init == "scratch"  # the paper trains the searched network from scratch
    scratch.prune(data)
    torch.manual_seed(0)
    again_model = tiny_vgg()
    again = MetaPruning(again_model, SIZE, val_data=val, target_flops_reduction=0.5, **SMALL)
    torch.manual_seed(123)  # the re-initialisation is seeded by the pruner's seed, not the global state
    again.prune(data)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again_model.state_dict().values()))
    for n in generated.convs:
        assert torch.equal(generated.masks()[n], scratch.masks()[n])
    assert not torch.allclose(generated.model.features[4].weight, model.features[4].weight)
    assert float(model.features[5].running_mean.abs().sum()) == 0.0  # fresh BN statistics
    assert torch.equal(model.features[5].weight[scratch.masks()["features.4"].flatten(1).any(1)],
                       torch.ones(int(scratch.masks()["features.4"].flatten(1).any(1).sum())))


@pytest.mark.parametrize("stop,init", [("train", "generated"), ("search", "generated"), ("search", "scratch")])
def test_resume_ends_with_the_same_masks_and_weights(data, val, stop, init):
    kw = dict(val_data=val, target_flops_reduction=0.4, init=init, **SMALL)
    torch.manual_seed(0)
    straight_model = tiny_resnet()
    start = copy.deepcopy(straight_model.state_dict())
    straight = MetaPruning(straight_model, SIZE, **kw)
    straight.prune(data)

    torch.manual_seed(0)
    first = MetaPruning(tiny_resnet(), SIZE, **kw)
    if stop == "train":
        assert not first.train_pruningnet(data, max_steps=5)
    else:
        first.train_pruningnet(data)
        assert not first.search(data, max_evals=4)
    state = copy.deepcopy(first.state_dict())

    torch.manual_seed(7)  # generators and weights drawn differently: the checkpoint must restore them
    resumed_model = tiny_resnet()
    resumed_model.load_state_dict(start)
    resumed = MetaPruning(resumed_model, SIZE, **kw)
    resumed.load_state_dict(state)
    resumed.prune(data)
    assert resumed.tested == straight.tested and resumed.top == straight.top
    for n in straight.convs:
        assert torch.equal(resumed.masks()[n], straight.masks()[n])
    for (k, a), b in zip(straight_model.state_dict().items(), resumed_model.state_dict().values()):
        assert torch.equal(a, b), k
    done = resumed.state_dict()  # after pruning the checkpoint drops the PruningNet, and loads safely
    assert "generators" not in done["extra"] and "generators" in state["extra"]
    buf = io.BytesIO()
    torch.save(done, buf)
    buf.seek(0)
    again = MetaPruning(tiny_resnet(), SIZE, **kw)
    again.load_state_dict(torch.load(buf, weights_only=True))
    assert again.phase == "done" and again.best == straight.best and again.tested == straight.tested
    assert all(torch.equal(again.masks()[n], straight.masks()[n]) for n in straight.convs)


def test_errors(data):
    m = tiny_vgg()
    with pytest.raises(ValueError, match="val_data"):
        MetaPruning(m, SIZE, val_data=None, target_flops_reduction=0.5)
    with pytest.raises(ValueError, match="ratios"):
        MetaPruning(m, SIZE, val_data=[], ratios={"features.0": 0.5})
    with pytest.raises(ValueError, match="filters only"):
        MetaPruning(m, SIZE, val_data=[], target_flops_reduction=0.5, granularity="stripe")
    with pytest.raises(TypeError, match="scales"):
        MetaPruning(m, SIZE, val_data=[], target_flops_reduction=0.5, scales=[0.5])
    with pytest.raises(ValueError, match="scales"):
        MetaPruning(m, SIZE, val_data=[], target_flops_reduction=0.5, scales=[0.5, 1.5])
    with pytest.raises(ValueError, match="increasing"):
        MetaPruning(m, SIZE, val_data=[], target_flops_reduction=0.5, scales=[0.5, 0.25])
    with pytest.raises(ValueError, match="init"):
        MetaPruning(m, SIZE, val_data=[], target_flops_reduction=0.5, init="pretrained")
    with pytest.raises(ValueError, match="mutations \\+ crossovers"):
        MetaPruning(m, SIZE, val_data=[], target_flops_reduction=0.5, population=4, mutations=3, crossovers=3)
    with pytest.raises(ValueError, match="2 parents"):
        MetaPruning(m, SIZE, val_data=[], target_flops_reduction=0.5, parents=1)
    with pytest.raises(ValueError, match="init_range"):
        MetaPruning(m, SIZE, val_data=[], target_flops_reduction=0.5, init_range=(0.8, 0.4))
    pr = MetaPruning(m, SIZE, val_data=[], target_flops_reduction=0.5, meta_epochs=1)
    with pytest.raises(RuntimeError, match="PruningNet first"):
        pr.search(data)
    with pytest.raises(ValueError, match="needs data"):
        pr.prune(None)
    with pytest.raises(TypeError, match="batches \\(x, y\\)"):
        pr.train_pruningnet([torch.zeros(2, 1, 28, 28)])
    with pytest.raises(TypeError, match="length"):
        pr.train_pruningnet(iter(data))
    hard = MetaPruning(m, SIZE, val_data=[], target_flops_reduction=0.995, scales=[0.5, 1.0])
    hard.phase = "search"
    with pytest.raises(ValueError, match="cannot be reached"):
        hard.search(data)
    narrow = MetaPruning(m, SIZE, val_data=[], target_flops_reduction=0.5, init_range=(0.95, 1.0))
    narrow.phase = "search"
    with pytest.raises(ValueError, match="no random candidate"):
        narrow.search(data)
    empty_val = MetaPruning(m, SIZE, val_data=[], target_flops_reduction=0.5)
    with pytest.raises(ValueError, match="val_data yielded no batch"):
        empty_val.evaluate_encoding((30, 30, 30), data)


def test_ratio_target_counts_pruned_filters():
    pr = MetaPruning(tiny_vgg(), SIZE, val_data=[], ratio=0.5)
    encoding = (15, 15, 15)  # scale 0.55: 4 of 8, 8 of 16, 8 of 16 kept
    assert pr.keep_counts(encoding) == {"features.0": 4, "features.4": 8, "features.8": 8}
    assert pr.metric(encoding) == pytest.approx(20 / 40)
    assert math.isclose(pr.metric((30, 30, 30)), 0.0)


def test_cli_lists_metapruning_with_a_held_out_split():
    assert pruning.METHODS["MetaPruning"] is MetaPruning
    params = cli.method_params(MetaPruning)
    assert "val_data" in params and params["meta_epochs"].default == 32
    assert is_oneshot(MetaPruning(tiny_vgg(), SIZE, val_data=[], ratio=0.5))
