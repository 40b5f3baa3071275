"""PFP: the sensitivities against a direct computation, the sample-complexity allocation, the
search over epsilon, residual units, zero-sensitivity channels, resume and export."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from stripeconv import cli, pruning
from stripeconv.pruning.pfp import (PFP, conv_input_sensitivity, draws_for_unique, expected_unique,
                                    linear_input_sensitivity, sample_channels, sample_complexity)

from conftest import FASHION_SIZE as SIZE, check_export, fashion, tiny_resnet, tiny_vgg

pytestmark = pytest.mark.usefixtures("one_thread")
EPS32 = torch.finfo(torch.float32).eps


def direct_conv_sensitivity(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """Largest share of each input channel in any output of ``conv``, one output at a time."""
    w = conv.weight.detach().double()
    n_out, n_in, kh, kw = w.shape
    if conv.padding_mode != "zeros":
        x = F.pad(x, conv._reversed_padding_repeated_twice, conv.padding_mode)
        pad = (0, 0)
    elif conv.padding == "same":
        pad = tuple(d * (k - 1) // 2 for d, k in zip(conv.dilation, conv.kernel_size))
    else:
        pad = conv.padding
    x = x.double()
    s, d = conv.stride, conv.dilation
    out_h = (x.shape[2] + 2 * pad[0] - d[0] * (kh - 1) - 1) // s[0] + 1 if conv.padding != "same" else x.shape[2]
    out_w = (x.shape[3] + 2 * pad[1] - d[1] * (kw - 1) - 1) // s[1] + 1 if conv.padding != "same" else x.shape[3]
    best = torch.zeros(n_in, dtype=torch.float64)
    points = [p for a in x for p in ([a] if bool((a >= 0).all()) else [a.clamp(min=0), (-a).clamp(min=0)])]
    for a in points:
        for oh in range(out_h):
            for ow in range(out_w):
                patch = torch.zeros(n_in, kh, kw, dtype=torch.float64)
                for i in range(kh):
                    for j in range(kw):
                        ih, iw = oh * s[0] - pad[0] + i * d[0], ow * s[1] - pad[1] + j * d[1]
                        if 0 <= ih < a.shape[1] and 0 <= iw < a.shape[2]:
                            patch[:, i, j] = a[:, ih, iw]
                for f in range(n_out):
                    for part in (w[f].clamp(min=0), (-w[f]).clamp(min=0)):
                        contrib = part * patch
                        z = float(contrib.sum())
                        if z > EPS32:
                            best = torch.maximum(best, (contrib / z).amax((1, 2)))
    return best


@pytest.mark.parametrize("kw", [
    dict(kernel_size=3, padding=1),
    dict(kernel_size=3, stride=2, padding=1, dilation=2),
    dict(kernel_size=(3, 2), padding="same"),
    dict(kernel_size=3, padding=1, padding_mode="reflect"),
    dict(kernel_size=1),
])
@pytest.mark.parametrize("max_elements", [1 << 24, 40, 1])
def test_conv_sensitivity_matches_direct_computation(kw, max_elements):
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, bias=True, **kw)  # the bias does not enter the shares
    x = torch.randn(3, 3, 6, 5)
    x[0] = x[0].abs()  # one point without negative activations
    got = conv_input_sensitivity(conv, x, max_elements=max_elements).double()
    torch.testing.assert_close(got, direct_conv_sensitivity(conv, x), atol=1e-6, rtol=1e-5)
    assert bool((got > 0).all()) and bool((got <= 1 + 1e-6).all())


@pytest.mark.parametrize("max_elements", [1 << 24, 1])
def test_linear_sensitivity_matches_direct_computation(max_elements):
    torch.manual_seed(1)
    lin = nn.Linear(5, 3)
    x = torch.randn(4, 5)
    w = lin.weight.detach().double()
    want = torch.zeros(5, dtype=torch.float64)
    for row in x.double():
        for a in (row.clamp(min=0), (-row).clamp(min=0)):
            for part in (w.clamp(min=0), (-w).clamp(min=0)):
                contrib = part * a  # [out, in]
                z = contrib.sum(1)
                ok = z > EPS32
                want = torch.maximum(want, (contrib[ok] / z[ok, None]).amax(0) if bool(ok.any()) else want)
    torch.testing.assert_close(linear_input_sensitivity(lin, x, max_elements).double(), want, atol=1e-6, rtol=1e-5)


def test_sensitivity_ignores_vanishing_denominators():
    conv = nn.Conv2d(2, 1, 1, bias=False)
    conv.weight.data = torch.tensor([[[[1.0]], [[1.0]]]])
    x = torch.zeros(1, 2, 2, 2)
    x[0, 0, 0, 0] = 1.0
    x[0, 1, 1, 1] = 1e-9  # its only output has z below float32 epsilon: the share counts 0
    assert conv_input_sensitivity(conv, x).tolist() == [1.0, 0.0]


def test_sample_complexity_and_expected_unique():
    alpha, total = 10.0, 2.0
    for eps in (0.5, 3.0, 100.0):
        assert sample_complexity(eps, alpha, total) == max(1.0, math.ceil(3 * (6 + 2 * eps) * alpha * total / eps**2))
    assert sample_complexity(1e6, alpha, total) == 1.0  # at least one sample
    assert math.isinf(sample_complexity(1e-200, alpha, total))
    p = torch.full((8,), 1 / 8, dtype=torch.float64)
    for m in (1, 3, 20):
        assert expected_unique(p, m) == pytest.approx(8 * (1 - (7 / 8) ** m))
    skewed = torch.tensor([0.5, 0.5, 0.0, 0.0], dtype=torch.float64)
    assert expected_unique(skewed, math.inf) == 2.0  # channels of probability 0 are never drawn
    assert expected_unique(torch.tensor([1.0, 0.0], dtype=torch.float64), 5) == 1.0


@pytest.fixture(scope="module")
def data():
    return DataLoader(fashion(train=True, limit=256), batch_size=64, shuffle=True,
                      generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def trained(data):
    out = {}
    for make in (tiny_vgg, tiny_resnet):
        torch.manual_seed(0)
        model = make()
        pruning.fit(model, None, data, epochs=1, progress=False,
                    optimizer=torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9))
        out[make.__name__] = model.state_dict()
    return out


def fresh(trained, make):
    model = make()
    model.load_state_dict(trained[make.__name__])
    return model


@pytest.mark.parametrize("make", [tiny_vgg, tiny_resnet])
@pytest.mark.parametrize("target", [dict(target_flops_reduction=0.5), dict(ratio=0.3)])
def test_smallest_eps_reaching_the_target_keeps_the_most_sensitive_channels(trained, data, make, target):
    model = fresh(trained, make)
    pr = PFP(model, SIZE, samples=96, **target)
    masks = pr.prune(data)
    assert pr.points_seen == 96 and pr.report()["samples"] == 96
    goal = next(iter(target.values()))
    assert pr.target_metric(masks) >= goal - 1e-12
    # epsilon is the smallest that reaches the target: a slightly smaller one does not
    smaller = pr.masks_for(pr.keep_at(pr.eps * math.exp(-1e-8)))
    assert pr.target_metric(smaller) < goal
    # the allocation is the PFP bound, unit by unit
    for u in pr.units:
        want = 1
        for p, total, alpha in pr._consumer_shares(u):
            if total > 0:
                want = max(want, math.ceil(expected_unique(p, sample_complexity(pr.eps, alpha, total)) - 1e-9))
        assert pr.unit_keep[u.name] == min(u.size, want), u.name
    # each unit keeps its highest-sensitivity channels, the same ones in every member conv
    for u in pr.units:
        score = pr.sensitivity(u)
        kept_roots = None
        for name, idx, ridx in u.members:
            alive = masks[name].flatten(1).any(1)[idx]
            roots = set(ridx[alive].tolist())
            kept_roots = roots if kept_roots is None else kept_roots
            assert roots == kept_roots, (u.name, name)
        assert len(kept_roots) == pr.unit_keep[u.name]
        dropped = set(range(u.size)) - kept_roots
        if dropped:
            assert min(float(score[i]) for i in kept_roots) >= max(float(score[i]) for i in dropped)
    check_export(pr, next(iter(data))[0][:8])


def test_draws_reach_the_allocation_and_reweighting_is_unbiased():
    g = torch.Generator().manual_seed(0)
    p = torch.tensor([0.4, 0.25, 0.15, 0.1, 0.06, 0.04, 0.0], dtype=torch.float64)
    for k in (1, 2.5, 4, 6):
        m = draws_for_unique(p, k)
        assert expected_unique(p, m) >= k - 1e-9 and (m == 1 or expected_unique(p, m - 1) < k)
    assert draws_for_unique(p, 9) == draws_for_unique(p, 6)  # capped at the channels with p > 0
    assert draws_for_unique(p, 0) == 0
    runs = [sample_channels(p, 4, g) for _ in range(4000)]
    m = runs[0][1]
    counts = torch.stack([c for c, _ in runs]).double()
    assert all(mm == m for _, mm in runs) and bool((counts.sum(1) == m).all()) and not bool(counts[:, -1].any())
    kept = (counts > 0).sum(1).double()
    assert float(kept.mean()) == pytest.approx(expected_unique(p, m), abs=0.05)  # the allocation, on average
    gamma = counts[:, :-1] / (m * p[:-1])
    torch.testing.assert_close(gamma.mean(0), torch.ones(6, dtype=torch.float64), atol=0.06, rtol=0)


@pytest.mark.parametrize("make", [tiny_vgg, tiny_resnet])
def test_random_sampling_keeps_the_draws_and_reweights_every_consumer(trained, make):
    data = list(DataLoader(fashion(train=True, limit=64), batch_size=64))  # the same points for every pruner
    model = fresh(trained, make)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    pr = PFP(model, SIZE, target_flops_reduction=0.5, samples=64, sampling="random", seed=3)
    masks = pr.prune(data)
    assert pr.draws, "nothing was sampled"
    expected = {n: w.clone() for n, w in before.items()}
    for u in pr.units:
        if u.name not in pr.draws:
            continue
        counts, m = pr.draws[u.name]
        p = pr.sensitivity(u).clamp(min=0) * pr._alive[u.group]
        q = p / p.sum()
        assert int(counts.sum()) == m and pr.unit_keep[u.name] == int((counts > 0).sum())
        for name, idx, ridx in u.members:  # the drawn channels are the kept filters
            alive = masks[name].flatten(1).any(1)[idx]
            assert torch.equal(alive, counts[ridx] > 0), (u.name, name)
        for name, idx, ridx in pr.graph.groups[u.group].consumers:
            w = expected[f"{name}.weight"]
            keep = counts[ridx] > 0
            gamma = (counts[ridx].double() / (m * q[ridx]))[keep].float()
            w[:, idx[keep]] *= gamma.view((1, -1) + (1,) * (w.dim() - 2))
    bn_conv = {[k for k, mod in model.named_modules() if mod is bn][0]: conv for conv, bn in pr._bn_of.items()}
    for name, p in model.named_parameters():  # reweighted consumers, pruned stripes and dead filters' BN at zero
        module, _, kind = name.rpartition(".")
        want = expected[name]
        if module in masks:
            alive = masks[module].flatten(1).any(1)
            want = want * (masks[module][:, None] if kind == "weight" else alive)
        elif module in bn_conv:
            want = want * masks[bn_conv[module]].flatten(1).any(1)
        torch.testing.assert_close(p.detach(), want.to(p.dtype), msg=name)
    check_export(pr, data[0][0][:8])
    again = PFP(fresh(trained, make), SIZE, target_flops_reduction=0.5, samples=64, sampling="random", seed=3)
    assert all(torch.equal(a, b) for a, b in zip(again.prune(data).values(), masks.values()))  # seeded
    restored = PFP(fresh(trained, make), SIZE, target_flops_reduction=0.5, samples=64, sampling="random", seed=3)
    restored.load_state_dict(pr.state_dict())
    assert all(torch.equal(restored.draws[k][0], c) and restored.draws[k][1] == m for k, (c, m) in pr.draws.items())


def test_random_sampling_reaches_the_target_on_average(trained):
    data = list(DataLoader(fashion(train=True, limit=64), batch_size=64))
    reached = []
    for seed in range(4):
        pr = PFP(fresh(trained, tiny_vgg), SIZE, target_flops_reduction=0.5, samples=64, sampling="random", seed=seed)
        reached.append(pr.target_metric(pr.prune(data)))
    assert len(set(reached)) > 1  # the draws differ between seeds
    assert sum(reached) / len(reached) == pytest.approx(0.5, abs=0.1)


def test_sensitivity_of_residual_units_uses_every_consumer(trained, data):
    model = fresh(trained, tiny_resnet)
    pr = PFP(model, SIZE, ratio=0.3, samples=64)
    pr.score(data)
    stem = next(u for u in pr.units if u.name == "conv1")  # read by the block convs and the shortcut stream
    consumers = {name for name, _, _ in pr.graph.groups[stem.group].consumers}
    assert len(consumers) >= 2
    shares = pr._consumer_shares(stem)
    assert len(shares) == len(pr.graph.groups[stem.group].consumers)
    for p, total, _ in shares:
        assert total > 0 and float(p.sum()) == pytest.approx(1.0)
    torch.testing.assert_close(pr.sensitivity(stem), torch.stack([p for p, _, _ in shares]).amax(0))


def test_zero_sensitivity_channels_are_pruned_first(trained, data):
    model = fresh(trained, tiny_vgg)
    with torch.no_grad():  # filters 0 and 3 of the first conv output exactly zero after BN and ReLU
        model.features[0].weight[[0, 3]] = 0
        model.features[1].weight[[0, 3]] = 0
        model.features[1].bias[[0, 3]] = 0
    pr = PFP(model, SIZE, ratio=0.01, samples=64)
    masks = pr.prune(data)
    first = pr.units[0]
    assert first.name == "features.0"
    score = pr.sensitivity(first)
    assert float(score[0]) == 0.0 and float(score[3]) == 0.0
    kept = masks["features.0"].flatten(1).any(1)
    assert not bool(kept[0]) and not bool(kept[3])


def test_score_resumes_to_the_same_masks(trained):
    def loader():  # shuffled; the same order for both runs
        return DataLoader(fashion(train=True, limit=256), batch_size=64, shuffle=True,
                          generator=torch.Generator().manual_seed(3))

    full = PFP(fresh(trained, tiny_vgg), SIZE, target_flops_reduction=0.4, samples=160)
    want = full.prune(loader())
    data = loader()
    part = PFP(fresh(trained, tiny_vgg), SIZE, target_flops_reduction=0.4, samples=160)
    assert part.score(data, max_batches=1) is False and part.points_seen == 64
    state = copy.deepcopy(part.state_dict())
    for _ in range(3):  # the loader moves on; the checkpoint rewinds it
        next(iter(data))
    resumed = PFP(fresh(trained, tiny_vgg), SIZE, target_flops_reduction=0.4, samples=160)
    resumed.load_state_dict(state)
    got = resumed.prune(data)
    assert resumed.points_seen == 160
    for name in full.sens:
        assert torch.equal(resumed.sens[name], full.sens[name]), name
    for name in want:
        assert torch.equal(got[name], want[name]), name
    assert resumed.eps == full.eps
    done = PFP(fresh(trained, tiny_vgg), SIZE, target_flops_reduction=0.4, samples=160)
    done.load_state_dict(copy.deepcopy(full.state_dict()))
    assert all(torch.equal(done.masks()[n], want[n]) for n in want)


def test_errors_are_clear(trained, data):
    model = fresh(trained, tiny_vgg)
    with pytest.raises(ValueError, match="PFP prunes filters only"):
        PFP(model, SIZE, ratio=0.5, granularity="stripe")
    with pytest.raises(ValueError, match="allocates the per-layer rates itself"):
        PFP(model, SIZE, ratios={"features.0": 0.5})
    with pytest.raises(ValueError, match="PFP: eps_range must have low < high"):
        PFP(model, SIZE, ratio=0.5, eps_range=(1.0, 1.0))
    with pytest.raises(ValueError, match="PFP.prune needs data"):
        PFP(model, SIZE, ratio=0.5).prune()
    with pytest.raises(RuntimeError, match="take the sensitivities first"):
        PFP(model, SIZE, ratio=0.5).keep_at(1.0)
    with pytest.raises(ValueError, match="PFP: data yielded no batch"):
        PFP(model, SIZE, ratio=0.5).prune([])
    pr = PFP(model, SIZE, target_flops_reduction=0.99, samples=64)
    with pytest.warns(UserWarning, match="PFP: the target 0.99 cannot be reached"):
        masks = pr.prune(data)
    assert all(int(masks[name].flatten(1).any(1).sum()) == 1 for name in masks)  # one filter left everywhere


def test_cli_lists_pfp_and_prunes_one_shot(tmp_path):
    assert "PFP" in pruning.METHODS
    params = cli.method_params(PFP)
    assert params["samples"].default == 256 and "val_data" not in params
    from stripeconv.engine import is_oneshot
    assert is_oneshot(PFP(tiny_vgg(), SIZE, ratio=0.5))


def test_alpha_follows_the_consumer_shape(trained, data):
    pr = PFP(fresh(trained, tiny_vgg), SIZE, ratio=0.3, samples=64)
    pr.score(data)
    first = pr.units[0]  # features.0, read by features.4: 3x3 kernel, 14x14 outputs after the pool
    (p, total, alpha), = pr._consumer_shares(first)
    assert alpha == pytest.approx(2 * 3.0 * math.log(8 * (14 * 14 + 1) * 9 / 1e-16))
    assert total == pytest.approx(float(pr.sens["features.4"].sum()))


def test_linear_consumer_of_a_flattened_map_takes_each_channels_largest_feature():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                          nn.Linear(4 * 5 * 5, 3))
    x = torch.randn(16, 1, 5, 5)
    pr = PFP(model, (1, 1, 5, 5), ratio=0.25, samples=16)
    pr.score([(x, None)])
    unit, = pr.units
    feats = pr.sens["4"]  # [4 * 25] features, channel-major
    (p, total, _), = pr._consumer_shares(unit)
    want = feats.view(4, 25).amax(1)
    torch.testing.assert_close(p * total, want)
    pr.prune([(x, None)])
    assert int(pr.masks()["0"].flatten(1).any(1).sum()) == 3


def test_channels_pruned_before_take_no_share(trained, data):
    model = fresh(trained, tiny_vgg)
    pr = PFP(model, SIZE, ratio=0.5, samples=64, zero_bn=False)  # dead filters still carry their BN shift
    pr._frozen["features.0"][[1, 2]] = False
    pr._enforce(pr._frozen)
    pr.score(data)
    first = pr.units[0]
    (p, total, _), = pr._consumer_shares(first)
    assert float(pr.sens["features.4"][1]) > 0  # the constant channel still feeds the next conv
    assert float(p[1]) == 0.0 and float(p[2]) == 0.0 and float(p.sum()) == pytest.approx(1.0)
    masks = pr.prune(data)
    assert not bool(masks["features.0"][[1, 2]].any())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_sensitivities_on_cuda_match_cpu():
    torch.manual_seed(0)
    conv, lin = nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.Linear(32, 10)
    x, v = torch.randn(4, 8, 17, 17), torch.randn(6, 32)
    torch.testing.assert_close(conv_input_sensitivity(conv.cuda(), x.cuda()).cpu(),
                               conv_input_sensitivity(conv.cpu(), x), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(linear_input_sensitivity(lin.cuda(), v.cuda()).cpu(),
                               linear_input_sensitivity(lin.cpu(), v), atol=1e-5, rtol=1e-4)
    model = tiny_resnet().cuda()
    pr = PFP(model, SIZE, target_flops_reduction=0.4, samples=32)
    pr.prune([(torch.randn(32, *SIZE[1:], device="cuda").relu(), None)])
    assert pr.flops_reduction() >= 0.4 - 1e-9
