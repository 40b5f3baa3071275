"""CPMC: the three criteria against a hand computation (own filter + next-layer columns, depthwise and
linear consumers, residual groups), the normalisation and importance, the global ranking, the
targets, residual export, fine-tuning, arguments and checkpoints."""
import copy
import math

import pytest
import torch
from torch import nn

from stripeconv import pruning
from stripeconv.pruning.cpmc import CPMC

from conftest import FASHION_SIZE as SIZE, check_export, tiny_resnet, tiny_vgg

pytestmark = pytest.mark.usefixtures("one_thread")


def chain() -> nn.Module:
    """conv(1->3) -> conv(3->2, stride 2) -> avgpool -> linear(2->4), on 6x6 inputs (36 then 9 positions)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 3, 3, padding=1, bias=False), nn.BatchNorm2d(3), nn.ReLU(),
                         nn.Conv2d(3, 2, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(2), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2, 4))


CHAIN_SIZE = (1, 1, 6, 6)


def hand_criteria(model: nn.Module, p: int = 1) -> dict:
    """The criteria of ``chain()`` written out layer by layer."""
    w1, w2, wl = (model[i].weight.detach().double() for i in (0, 3, 8))
    norm = (lambda t: t.abs().sum()) if p == 1 else (lambda t: t.square().sum())
    fin = (lambda t: t) if p == 1 else (lambda t: t.sqrt())
    v1 = torch.stack([fin(norm(w1[c]) + norm(w2[:, c])) for c in range(3)])
    v2 = torch.stack([fin(norm(w2[c]) + norm(wl[:, c])) for c in range(2)])
    # own filter: 9 weights x 1 input at 36 positions; next conv: 2 filters x 9 at 9 positions
    p1, f1 = 9 * 1 + 2 * 9, 2 * 36 * 9 + 2 * 9 * 18
    # own filter: 9 x 3 inputs at 9 positions; linear column: 4 weights at 1 position
    p2, f2 = 9 * 3 + 4, 2 * 9 * 27 + 2 * 1 * 4
    return {"0": (v1, float(f1), float(p1)), "3": (v2, float(f2), float(p2))}


def test_criteria_match_hand_computation():
    model = chain()
    pr = CPMC(model, CHAIN_SIZE, ratio=0.3)
    crit = pr.criteria()
    assert sorted(crit) == ["0", "3"]
    for name, (v, f, q) in hand_criteria(model).items():
        torch.testing.assert_close(crit[name]["weight"], v)
        assert crit[name]["flops"].tolist() == [f] * len(v)
        assert crit[name]["params"].tolist() == [q] * len(v)
    pr2 = CPMC(model, CHAIN_SIZE, ratio=0.3, p=2)
    for name, (v, _, _) in hand_criteria(model, p=2).items():
        torch.testing.assert_close(pr2.criteria()[name]["weight"], v)


@pytest.mark.parametrize("normalization", ["layer", "global"])
@pytest.mark.parametrize("log_costs", [True, False])
def test_importance_is_the_normalised_combination(normalization, log_costs):
    model = chain()
    a, b, c = 0.7, 1.3, 0.4
    pr = CPMC(model, CHAIN_SIZE, ratio=0.3, alpha=a, beta=b, gamma=c, normalization=normalization,
              log_costs=log_costs)
    hand = hand_criteria(model)
    g = (lambda x: math.log2(1 + x)) if log_costs else (lambda x: x)
    v_all = max(float(v.max()) for v, _, _ in hand.values())
    f_max = max(g(f) for _, f, _ in hand.values())
    p_max = max(g(q) for _, _, q in hand.values())
    got = pr.importance()
    for name, (v, f, q) in hand.items():
        vn = v / (float(v.max()) if normalization == "layer" else v_all)
        want = a * vn + b * (1 - g(f) / f_max) + c * (1 - g(q) / p_max)
        torch.testing.assert_close(got[name], want)


def test_next_layer_weights_change_which_channel_goes():
    """Weight dependency: the channel with the smallest own filter stays when the next layer leans on it."""
    model = chain()
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([1.0, 2.0, 3.0]).view(3, 1, 1, 1).expand(3, 1, 3, 3))
        model[3].weight.fill_(0.1)
        model[3].weight[:, 0] = 5.0  # channel 0 (smallest filter) feeds the next layer strongly
    l1 = pruning.L1Filter(copy.deepcopy(model), CHAIN_SIZE, ratios={"0": 0.34})
    l1.prune()
    assert (~l1.masks()["0"].any((1, 2))).nonzero().flatten().tolist() == [0]
    pr = CPMC(model, CHAIN_SIZE, ratios={"0": 0.34})
    pr.prune()
    assert (~pr.masks()["0"].any((1, 2))).nonzero().flatten().tolist() == [1]
    assert bool(pr.masks()["3"].all())


def test_costs_decide_between_layers():
    """With only the FLOPs criterion a channel of the costlier group goes first; with only the params
    criterion one of the other group."""
    model = chain()  # group "0": 972 FLOPs and 27 params per channel; group "3": 494 and 31
    pr = CPMC(model, CHAIN_SIZE, ratio=0.2, alpha=0.0, beta=1.0, gamma=0.0, log_costs=False)
    pr.prune()
    dead = {n: int((~m.any((1, 2))).sum()) for n, m in pr.masks().items()}
    assert dead == {"0": 1, "3": 0}
    pr = CPMC(chain(), CHAIN_SIZE, ratio=0.2, alpha=0.0, beta=0.0, gamma=1.0, log_costs=False)
    pr.prune()
    assert {n: int((~m.any((1, 2))).sum()) for n, m in pr.masks().items()} == {"0": 0, "3": 1}


def test_every_group_keeps_its_best_channel():
    """Past the channels of the costliest group the global ranking moves on: a group never vanishes."""
    pr = CPMC(chain(), CHAIN_SIZE, ratio=0.6, alpha=0.0, beta=1.0, gamma=0.0, log_costs=False)
    pr.prune()
    assert {n: int((~m.any((1, 2))).sum()) for n, m in pr.masks().items()} == {"0": 2, "3": 1}


class FlatNet(nn.Module):
    """1x1 expansion -> depthwise 3x3 -> 1x1 projection -> flatten -> linear (features of a channel: 4x4)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.expand = nn.Sequential(nn.Conv2d(1, 4, 1, bias=False), nn.BatchNorm2d(4), nn.ReLU())
        self.dw = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1, groups=4, bias=False), nn.BatchNorm2d(4), nn.ReLU())
        self.project = nn.Sequential(nn.Conv2d(4, 2, 1, bias=False), nn.BatchNorm2d(2), nn.ReLU())
        self.fc = nn.Linear(2 * 16, 3)

    def forward(self, x):
        return self.fc(self.project(self.dw(self.expand(x))).flatten(1))


def test_depthwise_and_flattened_linear_consumers_count():
    model = FlatNet()
    pr = CPMC(model, (1, 1, 4, 4), ratio=0.25)
    crit = pr.criteria()
    we, wd, wp, wl = (m.weight.detach().double() for m in (model.expand[0], model.dw[0], model.project[0], model.fc))
    v = torch.stack([we[c].abs().sum() + wd[c].abs().sum() + wp[:, c].abs().sum() for c in range(4)])
    torch.testing.assert_close(crit["expand.0"]["weight"], v)
    assert crit["expand.0"]["params"].tolist() == [1.0 + 9 + 2] * 4
    assert crit["expand.0"]["flops"].tolist() == [2.0 * 16 * (1 + 9 + 2)] * 4
    v = torch.stack([wp[c].abs().sum() + wl[:, 16 * c:16 * (c + 1)].abs().sum() for c in range(2)])
    torch.testing.assert_close(crit["project.0"]["weight"], v)
    assert crit["project.0"]["params"].tolist() == [4.0 + 3 * 16] * 2
    assert crit["project.0"]["flops"].tolist() == [2.0 * 16 * 4 + 2 * 1 * 3 * 16] * 2
    pr.prune()
    x = torch.randn(3, 1, 4, 4)
    ex = check_export(pr, x, atol=1e-5)
    assert ex.dw[0].out_channels == 4 - int((~pr.masks()["expand.0"].any((1, 2))).sum()) < 4


class DenseBlock(nn.Module):
    """DenseNet-style: c0 -> c1, cat(c0, c1) -> c2, cat(c0, c1, c2) -> transition t."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(2)
        block = lambda i, o, k: nn.Sequential(nn.Conv2d(i, o, k, padding=k // 2, bias=False),  # noqa: E731
                                              nn.BatchNorm2d(o), nn.ReLU())
        self.c0, self.c1, self.c2, self.t = block(1, 6, 3), block(6, 4, 3), block(10, 4, 3), block(14, 8, 1)
        self.fc = nn.Linear(8, 3)
        with torch.no_grad():  # BN shifts make a wrongly removed channel visible
            for m in self.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.bias.uniform_(-0.5, 0.5)

    def forward(self, x):
        a = self.c0(x)
        ab = torch.cat([a, self.c1(a)], 1)
        return self.fc(self.t(torch.cat([ab, self.c2(ab)], 1)).mean((2, 3)))


def test_concatenated_channels_count_every_later_reader():
    model = DenseBlock()
    pr = CPMC(model, (1, 1, 8, 8), target_flops_reduction=0.4)
    w = {n: getattr(model, n)[0].weight.detach().double() for n in ("c0", "c1", "c2", "t")}
    crit = pr.criteria()
    want = torch.stack([w["c0"][c].abs().sum() + sum(w[n][:, c].abs().sum() for n in ("c1", "c2", "t"))
                        for c in range(6)])
    torch.testing.assert_close(crit["c0.0"]["weight"], want)
    assert crit["c0.0"]["params"].tolist() == [9.0 + 4 * 9 + 4 * 9 + 8] * 6
    want = torch.stack([w["c1"][c].abs().sum() + w["c2"][:, 6 + c].abs().sum() + w["t"][:, 6 + c].abs().sum()
                        for c in range(4)])
    torch.testing.assert_close(crit["c1.0"]["weight"], want)
    pr.prune()
    assert pr.flops_reduction() >= 0.4 and sum(pr.unit_rates.values()) > 0
    model.eval()
    check_export(pr, torch.randn(3, 1, 8, 8), atol=1e-5)


def test_residual_group_criteria_are_the_union_of_its_convs():
    model = tiny_resnet()
    pr = CPMC(model, SIZE, ratio=0.3)
    stem = next(u for u in pr.units if "conv1" in [n for n, _, _ in u.members])
    assert sorted(n for n, _, _ in stem.members) == ["conv1", "layer1.0.conv2"]
    mods = dict(model.named_modules())
    w = {n: mods[n].weight.detach().double() for n in
         ("conv1", "layer1.0.conv2", "layer1.0.conv1", "layer2.0.conv1", "layer2.0.downsample.0")}
    want = torch.stack([w["conv1"][c].abs().sum() + w["layer1.0.conv2"][c].abs().sum()
                        + sum(w[n][:, c].abs().sum() for n in ("layer1.0.conv1", "layer2.0.conv1",
                                                                "layer2.0.downsample.0"))
                        for c in range(8)])
    crit = pr.criteria()[stem.name]
    torch.testing.assert_close(crit["weight"], want)
    # filters 9x1 and 9x8; columns 8x9, 16x9 and 16x1
    assert crit["params"].tolist() == [9.0 + 72 + 72 + 144 + 16] * 8
    assert crit["flops"].tolist() == [2.0 * (784 * 81 + 784 * 72 + 196 * 144 + 196 * 16)] * 8


@pytest.mark.parametrize("target", [dict(ratio=0.3), dict(target_flops_reduction=0.5)])
def test_residual_groups_stay_tied_and_export_exactly(target):
    model = tiny_resnet()
    pr = CPMC(model, SIZE, **target)
    masks = pr.prune()
    tied = [u for u in pr.units if len(u.members) > 1]
    assert tied
    pruned_any = False
    for u in tied:
        dead = [set(ridx[~masks[n].any((1, 2))[idx]].tolist()) for n, idx, ridx in u.members]
        assert all(d == dead[0] for d in dead), u.name
        pruned_any |= bool(dead[0])
    assert pruned_any  # the test exercises a pruned residual group
    model.eval()
    check_export(pr, torch.randn(4, *SIZE[1:]))


def lowest_channels(pr: CPMC, scores: dict, k: int) -> set:
    """The ``k`` lowest-scored (unit, root) pairs, each unit's best channel excluded and at most
    ``floor(max_layer_rate * size)`` of a unit."""
    flat = []
    for u in pr.units:
        s = scores[u.name]
        own = sorted((float(s[r]), u.name, r) for r in range(u.size) if r != int(torch.argmax(s)))
        flat += own[:int(math.floor(pr.max_layer_rate * u.size + 1e-9))]
    return {(n, r) for _, n, r in sorted(flat)[:k]}


def test_global_ranking_removes_the_lowest_channels():
    torch.manual_seed(3)
    model = tiny_vgg()
    pr = CPMC(model, SIZE, ratio=0.3)
    scores = pr.importance()
    masks = pr.prune()
    total = sum(c.out_channels for c in pr.convs.values())
    k = math.ceil(0.3 * total)
    dead = {(u.name, int(r)) for u in pr.units for n, idx, ridx in u.members for r in ridx[~masks[n].any((1, 2))[idx]]}
    assert dead == lowest_channels(pr, scores, k)
    assert pr.target_metric(masks) == pytest.approx(k / total)
    assert len({n for n, _ in dead}) > 1  # several layers lose channels: the ranking is global


@pytest.mark.parametrize("make", [tiny_vgg, tiny_resnet])
@pytest.mark.parametrize("target", [dict(ratio=0.4), dict(target_flops_reduction=0.45),
                                    dict(target_flops_reduction=0.3, scope="layer")])
def test_target_is_reached_by_the_fewest_channels(make, target):
    pr = CPMC(make(), SIZE, **target)
    masks = pr.prune()
    goal = next(v for k, v in target.items() if k != "scope")
    assert pr.target_metric(masks) >= goal - 1e-12
    rep = pr.report()
    if "target_flops_reduction" in target:
        assert rep["flops_reduction"] == pytest.approx(pr.flops_reduction())  # the export costs what was counted
    if target.get("scope") != "layer":  # one channel fewer misses the target
        order = pr._global_order(pr.importance())
        k = sum(int(s.sum()) for s in pr.unit_pruned.values())
        assert pr.target_metric(pr.masks_for(pr._pruned_first(order, k - 1))) < goal


def test_layer_scope_and_ratios_prune_within_each_group():
    model = tiny_vgg()
    pr = CPMC(model, SIZE, ratio=0.5, scope="layer")
    masks = pr.prune()
    assert {n: int((~m.any((1, 2))).sum()) for n, m in masks.items()} == {"features.0": 4, "features.4": 8,
                                                                          "features.8": 8}
    pr = CPMC(tiny_vgg(), SIZE, ratios={"features.4": 0.5})
    scores = pr.importance()
    masks = pr.prune()
    dead = (~masks["features.4"].any((1, 2))).nonzero().flatten()
    assert sorted(dead.tolist()) == sorted(torch.argsort(scores["features.4"])[:8].tolist())
    assert bool(masks["features.0"].all()) and bool(masks["features.8"].all())
    # convs tied by a residual addition share one group: it takes the largest ratio given to them
    pr = CPMC(tiny_resnet(), SIZE, ratios={"conv1": 0.5, "layer1.0.conv2": 0.25})
    masks = pr.prune()
    assert int((~masks["conv1"].any((1, 2))).sum()) == int((~masks["layer1.0.conv2"].any((1, 2))).sum()) == 4
    assert sum(int((~m.any((1, 2))).sum()) for m in masks.values()) == 8


def test_channels_pruned_before_stay_pruned_and_are_not_counted():
    model = tiny_vgg()
    first = CPMC(model, SIZE, ratios={"features.4": 0.25})
    first.prune()
    gone = ~first.masks()["features.4"].any((1, 2))
    pr = CPMC(model, SIZE, ratio=0.4)
    pr.hold(first.masks())
    crit = pr.criteria()
    assert torch.equal(~crit["features.4"]["alive"], gone)
    # the next layer reads fewer live channels: its own filters count fewer weights
    assert crit["features.8"]["params"][0] == 9 * (16 - int(gone.sum())) + 10
    assert bool((pr.importance()["features.4"][gone] == -1).all())
    masks = pr.prune()
    assert not bool(masks["features.4"][gone].any())
    assert pr.target_metric(masks) >= 0.4


def test_finetuning_keeps_the_pruned_channels_and_data_is_not_needed():
    model = tiny_vgg()
    pr = CPMC(model, SIZE, target_flops_reduction=0.4)
    masks = pr.prune()  # no data: the criteria are data-free
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(8, *SIZE[1:], generator=g), torch.randint(0, 10, (8,), generator=g)) for _ in range(3)]
    pruning.fit(model, pr, data, 1, progress=False)
    for name, conv in pr.convs.items():
        assert not bool(conv.weight[~masks[name].any((1, 2))].any())
    assert all(torch.equal(pr.masks()[n], masks[n]) for n in masks)
    check_export(pr, torch.randn(2, *SIZE[1:]))


def test_state_dict_round_trip():
    model = tiny_resnet()
    pr = CPMC(model, SIZE, target_flops_reduction=0.4)
    masks = pr.prune()
    state = copy.deepcopy(pr.state_dict())
    clone = copy.deepcopy(model)
    fresh = CPMC(clone, SIZE, target_flops_reduction=0.4)
    fresh.load_state_dict(state)
    assert fresh.phase == "done"
    assert all(torch.equal(fresh.masks()[n], masks[n]) for n in masks)
    imp, imp2 = pr.importance(), fresh.importance()
    assert all(torch.equal(imp[n], imp2[n]) for n in imp)
    assert all(torch.equal(fresh.prune()[n], masks[n]) for n in masks)  # not pruned again
    assert fresh.unit_rates == pr.unit_rates


@pytest.mark.parametrize("bad,exc,words", [
    (dict(granularity="stripe"), ValueError, "channels only"),
    (dict(alpha=-1.0), ValueError, "alpha must be a number >= 0.0"),
    (dict(beta="1"), TypeError, "beta must be a number"),
    (dict(gamma=math.inf), ValueError, "gamma must be a number"),
    (dict(alpha=0.0, beta=0.0, gamma=0.0), ValueError, "cannot all be 0"),
    (dict(p=3), ValueError, "p must be 1 (L1 norm) or 2"),
    (dict(normalization="max"), ValueError, "normalization must be one of ('layer', 'global')"),
    (dict(log_costs="yes"), TypeError, "log_costs must be True or False"),
    (dict(ratio=1.0), ValueError, "ratio must be a number in [0.0, 1.0)"),
    (dict(scope="net"), ValueError, "scope must be one of ('layer', 'global')"),
])
def test_bad_arguments_are_named(bad, exc, words):
    kwargs = {"ratio": 0.5, **bad}
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    with pytest.raises(exc) as info:
        CPMC(tiny_vgg(), SIZE, **kwargs)
    assert "CPMC" in str(info.value) and words in str(info.value)


class Tied(nn.Module):
    """stem -> (a + b) -> linear: ``a`` and ``b`` produce one channel group."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(1, 4, 3, padding=1)
        self.a, self.b = nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        return self.fc((self.a(x) + self.b(x)).mean((2, 3)))


def test_ratios_naming_a_conv_that_cannot_be_pruned_is_refused():
    # with b left out, the group that a and b produce has a producer CPMC may not prune
    with pytest.raises(ValueError, match=r"CPMC: ratios names convs whose channels cannot be pruned .*\['a'\]"):
        CPMC(Tied(), SIZE, ratios={"a": 0.5}, exclude=["b"])
    pr = CPMC(Tied(), SIZE, ratios={"stem": 0.5}, exclude=["b"])
    assert [u.name for u in pr.units] == ["stem"]
    with pytest.raises(ValueError, match="CPMC: no prunable channel group"):
        CPMC(Tied(), SIZE, ratio=0.5, layers=["a"])


@pytest.mark.parametrize("cap", [0.25, 0.9])
def test_global_ranking_takes_at_most_max_layer_rate_of_a_group(cap):
    """Within a layer the cost terms are nearly constant, so they rank whole layers: a cap keeps
    the costliest group from losing all but one channel first."""
    torch.manual_seed(3)
    pr = CPMC(tiny_vgg(), SIZE, ratio=0.2 if cap < 0.5 else 0.6, max_layer_rate=cap)
    scores = pr.importance()
    masks = pr.prune()
    for u in pr.units:
        assert pr.unit_rates[u.name] <= cap + 1e-9, (u.name, pr.unit_rates[u.name])
    total = sum(c.out_channels for c in pr.convs.values())
    k = sum(int((~m.any((1, 2))).sum()) for m in masks.values())
    dead = {(u.name, int(r)) for u in pr.units for n, idx, ridx in u.members for r in ridx[~masks[n].any((1, 2))[idx]]}
    assert dead == lowest_channels(pr, scores, k) and k >= (0.2 if cap < 0.5 else 0.6) * total
    if cap < 0.5:  # the cap binds: some group sits exactly at it
        assert max(pr.unit_rates.values()) == pytest.approx(max(math.floor(cap * u.size) / u.size for u in pr.units))
