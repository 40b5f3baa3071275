"""FunctionalityPruning: the clustering and the similarity on hand-checkable cases, repeated filters
pruned where L1 prunes unique ones, the targets, tied residual channels, export, resume, errors."""
import copy
import math

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from stripeconv import pruning
from stripeconv.engine import is_oneshot
from stripeconv.pruning.functionality import (FunctionalityPruning, Moments, agglomerate, cluster_labels, correlation,
                                              merge_rows, representatives)

from conftest import FASHION_SIZE as SIZE, check_export, fashion, tiny_resnet, tiny_vgg

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data(batches):
    return batches[:3]


# ------------------------------------------------------------------------ hand-checkable parts
def line_distances(points) -> torch.Tensor:
    p = torch.tensor(points, dtype=torch.float64)
    return (p[:, None] - p[None, :]).abs()


@pytest.mark.parametrize("linkage,heights", [
    ("average", [1.0, 2.5, 17 / 3]),  # {0,1}; {0,1}+{2}: (3+2)/2; then (7+6+4)/3
    ("single", [1.0, 2.0, 4.0]),
    ("complete", [1.0, 3.0, 7.0]),
])
def test_agglomerate_on_points_of_a_line(linkage, heights):
    merges = agglomerate(line_distances([0.0, 1.0, 3.0, 7.0]), linkage)
    assert [(a, b) for _, a, b in merges] == [(0, 1), (0, 2), (0, 3)]
    assert [h for h, _, _ in merges] == pytest.approx(heights)


def test_agglomerate_ties_labels_and_two_groups():
    # 0 and 2 close, 1 and 3 close, both pairs at distance 1: the smaller pair index merges first
    merges = agglomerate(line_distances([0.0, 10.0, 1.0, 11.0]))
    assert merges == [(1.0, 0, 2), (1.0, 1, 3), (pytest.approx(10.0), 0, 1)]
    assert cluster_labels(4, merges, 0).tolist() == [0, 1, 2, 3]
    assert cluster_labels(4, merges, 2).tolist() == [0, 1, 0, 1]
    assert cluster_labels(4, merges, 3).tolist() == [0, 0, 0, 0]
    with pytest.raises(ValueError, match="linkage must be"):
        agglomerate(line_distances([0.0, 1.0]), "ward")


def brute_force_merges(distance: torch.Tensor, linkage: str) -> list:
    """The same clustering by a search of the whole matrix at every merge (first minimum), with
    the same distance update."""
    d = 0.5 * (distance.double() + distance.double().T)
    n = d.shape[0]
    d.fill_diagonal_(math.inf)
    sizes, merges, last = torch.ones(n, dtype=torch.float64), [], -math.inf
    for _ in range(n - 1):
        a, b = sorted(divmod(int(torch.argmin(d)), n))
        last = max(float(d[a, b]), last)
        merges.append((last, a, b))
        merge_rows(d, sizes, a, b, linkage)  # the update itself is checked by hand above
    return merges


@pytest.mark.parametrize("linkage", ["average", "complete", "single"])
def test_agglomerate_equals_a_search_of_the_whole_matrix(linkage):
    """The nearest-neighbour bookkeeping gives exactly the merges (order, pairs, heights) of the
    plain search, also with many tied distances."""
    g = torch.Generator().manual_seed(0)
    for n in (1, 2, 3, 5, 8, 17, 40):
        for ties in (True, False):
            p = torch.randn(n, 3, generator=g, dtype=torch.float64)
            d = torch.cdist(p, p)
            if ties:
                d = torch.randint(0, 4, (n, n), generator=g).double()
            assert agglomerate(d, linkage) == brute_force_merges(d, linkage), (n, ties)


def test_single_linkage_tie_after_a_merge_goes_to_the_lower_column():
    """Merging 1 and 3 (single linkage) brings group {1, 3} to distance 1 from item 0, tied with
    item 2: the next merge is (0, 1), the first minimum of the matrix, not 0's old neighbour 2."""
    d = torch.tensor([[0.0, 2.0, 1.0, 1.0],
                      [2.0, 0.0, 5.0, 0.5],
                      [1.0, 5.0, 0.0, 5.0],
                      [1.0, 0.5, 5.0, 0.0]])
    merges = agglomerate(d, "single")
    assert [(a, b) for _, a, b in merges] == [(1, 3), (0, 1), (0, 2)]
    assert merges == brute_force_merges(d, "single")


def test_representative_is_the_medoid_or_the_strongest():
    labels = torch.tensor([0, 0, 0, 3, 4, 4])
    sim = torch.eye(6, dtype=torch.float64)
    for i, j, s in [(0, 1, 0.9), (0, 2, 0.5), (1, 2, 0.8), (4, 5, 0.7)]:
        sim[i, j] = sim[j, i] = s
    # mean similarity to the cluster: 0 -> 0.7, 1 -> 0.85, 2 -> 0.65; the pair {4, 5} ties
    strength = torch.tensor([1.0, 2.0, 3.0, 0.0, 5.0, 5.0])
    assert representatives(labels, sim, strength, "medoid").tolist() == [False, True, False, True, True, False]
    assert representatives(labels, sim, strength, "strongest").tolist() == [False, False, True, True, True, False]
    strength[5] = 6.0  # the tie goes to the stronger
    assert representatives(labels, sim, strength, "medoid").tolist() == [False, True, False, True, False, True]


def test_correlation_is_pearson_with_constants_apart():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(3, 50, generator=g, dtype=torch.float64)
    x = torch.cat([base, 3.0 * base[:1] + 7.0, -base[1:2], torch.full((1, 50), 2.5), torch.zeros(1, 50)])
    corr, std = correlation(x)
    want = torch.corrcoef(x[:5])
    torch.testing.assert_close(corr[:5, :5], want)
    assert corr[0, 3] == pytest.approx(1.0) and corr[1, 4] == pytest.approx(-1.0)  # scale and offset do not count
    assert corr[5, 6] == 1.0 and corr[6, 5] == 1.0  # two constant responses: the same (no) preference
    assert bool((corr[5, :5] == 0).all()) and bool((corr[:5, 6] == 0).all())
    assert std[5] == 0 and std[6] == 0 and std[3] == pytest.approx(3.0 * float(base[0].std(unbiased=False)))
    # accumulated over batches: the same
    m = Moments(7)
    for part in x.split([20, 5, 25], dim=1):
        m.update(part)
    corr2, std2 = m.correlation()
    torch.testing.assert_close(corr2, corr)
    torch.testing.assert_close(std2, std)


# ------------------------------------------------------------------ repeated filters are pruned
def repeats_model() -> nn.Module:
    """Six filters: 0 and 1 one large-norm pattern twice, 3 a copy of 2 at twice the scale (the same
    function, another norm), 4 and 5 unique patterns of small norm."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 4, 3, padding=1), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 10))
    base = torch.randn(4, 1, 3, 3)
    with torch.no_grad():
        w, b = model[0].weight, model[0].bias
        w[0], w[1], b[0], b[1] = 3 * base[0], 3 * base[0], 0.1, 0.1
        w[2], w[3], b[2], b[3] = 2 * base[1], 4 * base[1], 0.05, 0.1
        w[4], w[5], b[4], b[5] = 0.2 * base[2], 0.2 * base[3], 0.0, 0.0
    return model


def pruned_filters(masks: dict, name: str = "0") -> set:
    return set((~masks[name].flatten(1).any(1)).nonzero().flatten().tolist())


@pytest.mark.parametrize("representation", ["response", "activation_max"])
@pytest.mark.parametrize("target", [dict(ratio=1 / 3), dict(ratio=1 / 3, scope="layer"), dict(similarity=0.999)])
def test_one_of_each_repeat_is_pruned_and_no_unique_filter(data, representation, target):
    model = repeats_model()
    pr = FunctionalityPruning(model, SIZE, layers=["0"], representation=representation, am_steps=5, samples=64,
                              **target)
    masks = pr.prune(data)
    gone = pruned_filters(masks)
    assert len(gone) == 2 and len(gone & {0, 1}) == 1 and len(gone & {2, 3}) == 1, gone
    assert sorted(map(sorted, pr.clusters["0"])) == [[0, 1], [2, 3], [4], [5]]
    sim = pr.similarity("0")
    assert float(sim[0, 1]) == pytest.approx(1.0) and float(sim[2, 3]) == pytest.approx(1.0)
    assert float(sim[4, 5]) < 0.99 and pr.cut_similarity == pytest.approx(1.0)
    # L1-norm pruning removes the two unique small filters instead
    l1 = pruning.L1Filter(repeats_model(), SIZE, layers=["0"], ratio=1 / 3)
    assert pruned_filters(l1.prune()) == {4, 5}


def test_keep_strongest_keeps_the_larger_copy(data):
    pr = FunctionalityPruning(repeats_model(), SIZE, layers=["0"], similarity=0.999, keep="strongest", samples=64)
    gone = pruned_filters(pr.prune(data))
    assert 2 in gone and 3 not in gone  # filter 3 responds twice as strongly as its copy 2


# ---------------------------------------------------------------------------------- targets
@pytest.mark.parametrize("target", [dict(ratio=0.5), dict(target_flops_reduction=0.4)])
def test_global_targets_are_reached_with_the_fewest_merges(data, target):
    torch.manual_seed(0)
    pr = FunctionalityPruning(tiny_vgg(), SIZE, samples=64, **target)
    masks = pr.prune(data)
    goal = next(iter(target.values()))
    assert pr.target_metric(masks) >= goal - 1e-12
    counts = [u.size - pr.unit_keep[u.name] for u in pr.units]
    order = pr._global_order()
    assert pr._counts_global(order, sum(counts)) == counts  # the lowest merges over the network
    assert pr.target_metric(pr.masks_for(pr._counts_global(order, sum(counts) - 1))) < goal  # and no more
    if "ratio" in target:
        assert pr.target_metric(masks) == 0.5  # 20 of 40 filters
    heights = [h for h, _, _ in order]
    assert pr.cut_similarity == pytest.approx(1.0 - heights[sum(counts) - 1])


def test_layer_scope_prunes_the_same_fraction_of_every_unit(data):
    torch.manual_seed(0)
    pr = FunctionalityPruning(tiny_vgg(), SIZE, ratio=0.3, scope="layer", samples=64)
    pr.prune(data)
    assert {u.name: u.size - pr.unit_keep[u.name] for u in pr.units} == {
        "features.0": 2, "features.4": 4, "features.8": 4}  # floor(0.3 * size)
    pr = FunctionalityPruning(tiny_vgg(), SIZE, ratios={"features.4": 0.5}, scope="layer", samples=64)
    pr.prune(data)
    assert {u.name: u.size - pr.unit_keep[u.name] for u in pr.units} == {
        "features.0": 0, "features.4": 8, "features.8": 0}
    pr = FunctionalityPruning(tiny_vgg(), SIZE, target_flops_reduction=0.3, scope="layer", samples=64)
    assert pr.flops_reduction(pr.prune(data)) >= 0.3


def test_unreachable_target_warns_and_keeps_one_filter_per_unit(data):
    pr = FunctionalityPruning(tiny_vgg(), SIZE, target_flops_reduction=0.999, samples=64)
    with pytest.warns(UserWarning, match="cannot be reached"):
        pr.prune(data)
    assert all(k == 1 for k in pr.unit_keep.values())


# ------------------------------------------------------------------- residual units and export
def test_tied_channels_share_a_similarity_and_are_pruned_together_and_export_exactly(data):
    torch.manual_seed(0)
    model = tiny_resnet()
    with torch.no_grad():  # no zero-initialised BN scale: every channel responds
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    pr = FunctionalityPruning(model, SIZE, target_flops_reduction=0.4, samples=64)
    assert is_oneshot(pr)
    tied = [u for u in pr.units if len(u.members) > 1]
    assert tied, "tiny_resnet has residual-tied channel groups"
    # the responses of the tied convs, before pruning
    outs, handles = {}, []
    modules = dict(model.named_modules())
    for u in tied:
        for name, _, _ in u.members:
            mod = pr._bn_of.get(name) or modules[name]
            handles.append(mod.register_forward_hook(
                lambda m, i, o, name=name: outs.setdefault(name, []).append(o.clone())))
    model.eval()
    with torch.no_grad():
        model(torch.cat([x for x, _ in data])[:64])
    model.train()
    for h in handles:
        h.remove()
    masks = pr.prune(data)
    # a tied channel's similarity: the mean of the correlations at the convs that produce it
    for u in tied:
        want = torch.zeros(u.size, u.size, dtype=torch.float64)
        for name, idx, ridx in u.members:
            o = torch.cat(outs[name]).double()
            corr = torch.corrcoef(o.transpose(0, 1).reshape(o.shape[1], -1))
            want[ridx[:, None], ridx[None, :]] += corr[idx][:, idx] / len(u.members)
        want.fill_diagonal_(1.0)
        torch.testing.assert_close(pr.similarity(u.name), want, atol=1e-9, rtol=1e-9)
    # every conv of a unit loses the same channels
    for u in pr.units:
        gone = {name: set(ridx[~masks[name].flatten(1).any(1)[idx]].tolist()) for name, idx, ridx in u.members}
        assert len({frozenset(v) for v in gone.values()}) == 1, (u.name, gone)
        assert len(next(iter(gone.values()))) == u.size - pr.unit_keep[u.name]
    assert pr.flops_reduction() >= 0.4
    # fine-tuning keeps them pruned; the export computes what the masked model computes
    pruning.fit(model, pr, data[:2], 1, progress=False)
    for name, m in masks.items():
        assert not bool(pr.convs[name].weight[~m.flatten(1).any(1)].any()), name
    check_export(pr, data[0][0][:8])
    rep = pr.report()
    assert rep["representation"] == "response" and rep["flops_reduction"] == pytest.approx(pr.flops_reduction())


def test_channels_pruned_before_stay_pruned_and_count(data):
    torch.manual_seed(0)
    model = tiny_vgg()
    first = pruning.L1Filter(model, SIZE, ratio=0.25, scope="layer")
    base = first.prune()
    pr = FunctionalityPruning(model, SIZE, ratio=0.5, scope="layer", samples=64)
    pr.hold(base)
    masks = pr.prune(data)
    for name in base:
        assert bool((masks[name] <= base[name]).all()), name
        assert int((~masks[name].flatten(1).any(1)).sum()) == pr.convs[name].out_channels // 2, name


# ------------------------------------------------------------------ determinism and resuming
@pytest.mark.parametrize("representation", ["response", "activation_max"])
def test_deterministic(data, representation):
    runs = []
    for _ in range(2):
        torch.manual_seed(0)
        pr = FunctionalityPruning(tiny_vgg(), SIZE, target_flops_reduction=0.4, representation=representation,
                                  am_steps=4, samples=64)
        runs.append(pr.prune(data))
    assert all(torch.equal(runs[0][n], runs[1][n]) for n in runs[0])


def test_score_resumes_to_the_same_masks():
    def loader():  # shuffled; the same order for both runs
        return DataLoader(fashion(train=True, limit=192), batch_size=64, shuffle=True,
                          generator=torch.Generator().manual_seed(3))

    def make():
        torch.manual_seed(0)
        return FunctionalityPruning(tiny_vgg(), SIZE, target_flops_reduction=0.4, samples=160)
    full = make()
    want = full.prune(loader())
    data = loader()
    part = make()
    assert part.score(data, max_batches=1) is False and part.points_seen == 64
    state = copy.deepcopy(part.state_dict())
    for _ in range(2):  # the loader moves on; the checkpoint rewinds it
        next(iter(data))
    resumed = make()
    resumed.load_state_dict(state)
    got = resumed.prune(data)
    assert resumed.points_seen == 160
    for name in full.moments:
        assert torch.equal(resumed.moments[name].s2, full.moments[name].s2), name
    assert all(torch.equal(got[n], want[n]) for n in want)
    done = make()
    done.load_state_dict(copy.deepcopy(full.state_dict()))
    assert done.phase == "done" and all(torch.equal(done.prune(None)[n], want[n]) for n in want)


# ------------------------------------------------------------------------------------ errors
@pytest.mark.parametrize("kwargs,exc,words", [
    (dict(ratio=0.5, granularity="stripe"), ValueError, "FunctionalityPruning prunes filters only"),
    (dict(ratio=0.5, similarity=0.9), ValueError, "FunctionalityPruning: give either similarity= or a target"),
    (dict(), ValueError, "give exactly one of ratio="),
    (dict(similarity=1.5), ValueError, "FunctionalityPruning: similarity must be a number in [-1.0, 1.0]"),
    (dict(ratio=0.5, representation="weights"), ValueError, "representation must be one of"),
    (dict(ratio=0.5, linkage="ward"), ValueError, "FunctionalityPruning: linkage must be one of"),
    (dict(ratio=0.5, keep="largest"), ValueError, "FunctionalityPruning: keep must be one of"),
    (dict(ratio=0.5, samples=0), ValueError, "FunctionalityPruning: samples must be an integer >= 1"),
    (dict(ratio=0.5, samples=2.5), TypeError, "FunctionalityPruning: samples must be an integer"),
    (dict(ratio=0.5, am_steps=0), ValueError, "FunctionalityPruning: am_steps must be an integer >= 1"),
    (dict(ratio=0.5, am_lr=0.0), ValueError, "FunctionalityPruning: am_lr must be a number > 0.0"),
    (dict(ratio=0.5, am_decay=1.0), ValueError, "FunctionalityPruning: am_decay must be a number in [0.0, 1.0)"),
    (dict(ratio=0.5, seed=-1), ValueError, "FunctionalityPruning: seed must be an integer >= 0"),
])
def test_bad_arguments_are_named(kwargs, exc, words):
    with pytest.raises(exc) as info:
        FunctionalityPruning(tiny_vgg(), SIZE, **kwargs)
    assert words in str(info.value)


def test_prune_needs_data_for_responses_and_not_for_activation_maximisation():
    with pytest.raises(ValueError, match=r"FunctionalityPruning.prune needs data"):
        FunctionalityPruning(tiny_vgg(), SIZE, ratio=0.5).prune()
    with pytest.raises(RuntimeError, match="describe the filters first"):
        FunctionalityPruning(tiny_vgg(), SIZE, ratio=0.5).similarity("features.0")
    pr = FunctionalityPruning(tiny_vgg(), SIZE, ratio=0.5, representation="activation_max", am_steps=2)
    masks = pr.prune()
    assert math.isclose(pr.target_metric(masks), 0.5)
