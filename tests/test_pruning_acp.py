"""ACP: DBSCAN counts against an independent textbook DBSCAN, the channel features, the budget
repair, the swarm's moves, the candidates' training, the final masks and weights, resume and errors."""
import copy
import io
import math

import pytest
import torch
from torch import nn

from stripeconv import pruning
from stripeconv.engine import is_oneshot
from stripeconv.pruning.acp import ACP, dbscan_count

from conftest import FASHION_SIZE as SIZE, check_export, tiny_resnet, tiny_vgg

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = dict(particles=3, cycles=2, fitness_steps=2, cluster_images=32, lr=0.05)


@pytest.fixture(scope="module")
def data(batches):
    return batches[:6]


@pytest.fixture(scope="module")
def val(batches):
    return batches[8:10]


@pytest.fixture(scope="module")
def pretrained_vgg(batches):
    torch.manual_seed(0)
    model = tiny_vgg()
    pruning.fit(model, None, batches[:12], 1, progress=False)
    return model


# ----------------------------------------------------------------------------------- DBSCAN
def textbook_dbscan(points: torch.Tensor, eps: float, min_samples: int) -> tuple:
    """DBSCAN as first published (Ester et al. 1996): expand clusters from unvisited core points;
    returns (clusters, noise points). Cosine distance from explicit dot products, row by row."""
    n = len(points)

    def dist(i, j):
        a, b = points[i].double(), points[j].double()
        na, nb = float(a.norm()), float(b.norm())
        if i == j:
            return 0.0
        if na == 0 or nb == 0:
            return 1.0
        return min(2.0, max(0.0, 1.0 - float(a @ b) / (na * nb)))

    def region(i):
        return [j for j in range(n) if dist(i, j) <= eps]

    label = [None] * n  # None: unvisited, -1: noise, k: cluster k
    clusters = 0
    for i in range(n):
        if label[i] is not None:
            continue
        near = region(i)
        if len(near) < min_samples:
            label[i] = -1
            continue
        label[i] = clusters
        queue = [j for j in near if j != i]
        while queue:
            j = queue.pop()
            if label[j] == -1:
                label[j] = clusters  # border point
            if label[j] is not None:
                continue
            label[j] = clusters
            more = region(j)
            if len(more) >= min_samples:
                queue.extend(more)
        clusters += 1
    return clusters, label.count(-1)


def directions(base: torch.Tensor, count: int, spread: float, gen) -> torch.Tensor:
    return base + spread * torch.randn(count, base.numel(), generator=gen)


def test_dbscan_count_on_planted_groups():
    gen = torch.Generator().manual_seed(0)
    groups = [directions(torch.eye(12)[k], 6, 1e-3, gen) for k in range(3)]
    outliers = torch.eye(12)[5:9]
    pts = torch.cat(groups + [outliers])
    assert dbscan_count(pts, eps=0.007, min_samples=5) == 3 + 4
    # too few neighbours: every point is noise
    assert dbscan_count(pts, eps=0.007, min_samples=7) == len(pts)
    # scaling a row does not change its cosine distances
    scaled = pts * torch.linspace(0.5, 3.0, len(pts))[:, None]
    assert dbscan_count(scaled, eps=0.007, min_samples=5) == 7


def test_dbscan_border_points_chains_and_zero_rows():
    # a chain of directions 0.1 rad apart: neighbours within eps, ends far apart -> one cluster
    angles = torch.arange(12, dtype=torch.float64) * 0.1
    chain = torch.stack([angles.cos(), angles.sin()], 1)
    eps = 1 - math.cos(0.1) + 1e-6  # the next-but-one neighbour is at 1 - cos(0.2), four times as far
    assert dbscan_count(chain, eps=eps, min_samples=3) == 1  # the two ends are border points, not noise
    assert textbook_dbscan(chain, eps, 3) == (1, 0)
    zeros = torch.zeros(3, 2)
    assert dbscan_count(torch.cat([chain, zeros]), eps=eps, min_samples=3) == 1 + 3  # zero rows are noise
    assert dbscan_count(torch.empty(0, 4), eps=0.1, min_samples=2) == 0


@pytest.mark.parametrize("eps,min_samples", [(0.05, 2), (0.1, 3), (0.2, 5), (0.3, 4)])
def test_dbscan_count_matches_textbook_dbscan(eps, min_samples):
    gen = torch.Generator().manual_seed(int(eps * 100) + min_samples)
    centres = torch.randn(5, 4, generator=gen)
    pts = torch.cat([directions(c, 7, 0.25, gen) for c in centres] + [torch.randn(10, 4, generator=gen)])
    clusters, noise = textbook_dbscan(pts, eps, min_samples)
    assert clusters > 0 and noise > 0  # the case exercises both
    assert dbscan_count(pts, eps, min_samples) == clusters + noise
    perm = torch.randperm(len(pts), generator=gen)
    assert dbscan_count(pts[perm], eps, min_samples) == clusters + noise


# ---------------------------------------------------------------------------------- clustering
def duplicated_filters() -> nn.Module:
    """A 1x1 conv with 6 copies of one filter and 6 distinct filters, over independent channels."""
    conv = nn.Conv2d(6, 12, 1, bias=False)
    with torch.no_grad():
        conv.weight.zero_()
        conv.weight[:6, 0] = 1.0  # six identical maps
        conv.weight[:6, 1] = 1.0
        for k in range(6):
            conv.weight[6 + k, k] = 1.0  # channel k alone
    return nn.Sequential(conv, nn.BatchNorm2d(12), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(12, 3))


def test_channel_features_average_the_maps_and_identical_filters_cluster():
    model = duplicated_filters()
    gen = torch.Generator().manual_seed(1)
    data = [(torch.randn(5, 6, 4, 4, generator=gen), torch.zeros(5, dtype=torch.long)) for _ in range(3)]
    pr = ACP(model, (1, 6, 4, 4), val_data=[data[0]], cluster_images=12)
    feats = pr.channel_features(data)
    x = torch.cat([b[0] for b in data])[:12]  # the first 12 images, the last batch cut
    expected = model[0](x).mean(0).flatten(1).double()
    torch.testing.assert_close(feats[0], expected)
    few = ACP(model, (1, 6, 4, 4), val_data=[data[0]], cluster_images=100)  # only 15 images: their mean
    torch.testing.assert_close(few.channel_features(data)[0], model[0](torch.cat([b[0] for b in data])).mean(0).flatten(1).double())
    pr.cluster(data)
    assert pr.cluster_counts == {"0": 1 + 6}
    assert pr.start == (7,)  # no target: the clustering alone sets the structure


def test_tied_units_are_described_by_all_their_convs(batches):
    pr = ACP(tiny_resnet(), SIZE, val_data=batches[8:9], cluster_images=8)
    tied = [u for u in pr.units if len(u.members) > 1]
    assert tied
    feats = pr.channel_features(batches[:1])
    modules = dict(pr.model.named_modules())
    outs = {}
    hooks = [modules[n].register_forward_hook(lambda m, i, o, n=n: outs.__setitem__(n, o))
             for u in tied for n, _, _ in u.members]
    pr.model.eval()
    with torch.no_grad():
        pr.model(batches[0][0][:8])
    for h in hooks:
        h.remove()
    for u in tied:
        f = feats[pr.units.index(u)]
        offset = 0
        for name, idx, ridx in u.members:
            mean = outs[name].mean(0).flatten(1).double()
            width = mean.shape[1]
            torch.testing.assert_close(f[ridx, offset:offset + width], mean[idx])
            offset += width
        assert offset == f.shape[1]


# ------------------------------------------------------------------------------------ budget
@pytest.mark.parametrize("goal", [0.3, 0.5, 0.7])
def test_repair_lands_in_the_window(goal):
    pr = ACP(tiny_resnet(), SIZE, val_data=[None], target_flops_reduction=goal)
    gen = torch.Generator().manual_seed(int(goal * 10))
    for _ in range(5):
        counts = [int(torch.randint(1, s + 1, (), generator=gen)) for s in pr.sizes]
        fixed = pr.repair(counts)
        assert all(1 <= c <= s for c, s in zip(fixed, pr.sizes))
        assert goal <= pr.metric(fixed) <= goal + pr.tolerance
        assert pr.repair(fixed) == fixed  # inside the window nothing moves
        assert abs(pr.metric(fixed) - pr.flops_reduction(pr.masks_for(pr.kept_roots(fixed)))) < 1e-12


def test_repair_without_target_only_clips_and_unreachable_targets_fail():
    pr = ACP(tiny_vgg(), SIZE, val_data=[None])
    assert pr.repair([0, 99, 5]) == (1, 16, 5)
    pr = ACP(tiny_vgg(), SIZE, val_data=[None], target_flops_reduction=0.99)
    with pytest.raises(ValueError, match="cannot be reached"):
        pr.repair([4, 4, 4])


def test_ratio_counts_pruned_filters():
    pr = ACP(tiny_vgg(), SIZE, val_data=[None], ratio=0.5)
    fixed = pr.repair(pr.sizes)
    assert 0.5 <= 1 - sum(fixed) / sum(pr.sizes) <= 0.53


# ------------------------------------------------------------------------------------- swarm
def test_initial_particles_spread_around_the_start():
    pr = ACP(tiny_resnet(), SIZE, val_data=[None], particles=5, max_vel=1.5)
    pr.start = (4, 4, 8, 8, 16, 16)
    for i in range(5):
        pr._initial_particle(i)
        assert all(p in {min(max(1, s + k), size) for k in (-i, 0, i)}
                   for p, s, size in zip(pr.position[i], pr.start, pr.sizes))
        assert all(-1.5 <= v <= 1.5 for v in pr.velocity[i])
    assert pr.position[0] == pr.start
    assert any(p != s for p, s in zip(pr.position[4], pr.start))


@pytest.mark.parametrize("cycle,w", [(1, 0.6), (4, 0.45)])
def test_move_follows_the_velocity_rule(cycle, w):
    pr = ACP(tiny_resnet(), SIZE, val_data=[None], cycles=4, dims_per_move=4, max_vel=2.0, step=2.0, chi=0.729)
    pr.cycle = cycle
    pos, vel = (4, 5, 8, 9, 16, 20), [1.0, -1.5, 0.4, 1.9, -0.7, 0.0]
    pr.position, pr.velocity = [pos], [list(vel)]
    # layers 0-2 pulled far (their velocity clips), layers 3-5 not pulled; 4 moved layers include both
    pr.pbest, pr.gbest = [(24, -15, 28, 9, 16, 20)], (30, -10, 20, 9, 16, 20)
    state = pr.rng.get_state()
    new = pr._move(0)
    gen = torch.Generator()
    gen.set_state(state)
    dims = torch.randperm(6, generator=gen)[:4].tolist()
    r = float(torch.rand((), generator=gen, dtype=torch.float64))
    clipped = 0
    for d in range(6):
        if d in dims:
            assert new[d] == min(max(1, int(pos[d] + 2.0 * vel[d])), pr.sizes[d])
            v = 0.729 * (w * vel[d] + 2 * r * (pr.pbest[0][d] - pos[d]) + 2 * r * (pr.gbest[d] - pos[d]))
            assert pr.velocity[0][d] == pytest.approx(max(-2.0, min(2.0, v)))
            clipped += abs(v) > 2.0
        else:
            assert new[d] == pos[d] and pr.velocity[0][d] == vel[d]
    assert 0 < clipped < 4  # the case exercises the clipping and the free update


def test_swarm_climbs_a_known_landscape_and_keeps_personal_and_global_bests():
    pr = ACP(tiny_resnet(), SIZE, val_data=[None], particles=6, cycles=12, dims_per_move=3, seed=1)
    goal = (6, 2, 12, 4, 10, 28)
    visits = {i: [] for i in range(6)}

    def fake_fitness(position, data):  # a known landscape, peak at goal; ties on purpose (integer levels)
        visits[pr.next_particle].append(position)
        acc = 1.0 - sum(abs(p - g) for p, g in zip(position, goal)) // 4 / 100
        if acc > pr.gbest_fit:
            pr.gbest, pr.gbest_fit = position, acc
        pr.tested.setdefault(position, acc)
        return acc
    pr.fitness = fake_fitness
    pr.phase, pr.start = "search", (4, 4, 8, 8, 16, 16)
    assert pr.search(data=[()]) is True
    first = [v[0] for v in visits.values()]
    for i, seen in visits.items():
        assert len(seen) == 1 + 12
        best_of_i = max(seen, key=lambda p: pr.tested[p])  # the first of equals, as the swarm keeps it
        assert pr.pbest[i] == best_of_i and pr.pbest_fit[i] == pr.tested[best_of_i]
    everything = [p for seen in visits.values() for p in seen]
    assert pr.gbest_fit == max(pr.tested[p] for p in everything)
    assert pr.gbest_fit > max(pr.tested[p] for p in first)  # the swarm improved on its start


def test_fitness_keeps_the_first_of_equal_candidates(pretrained_vgg, data, val):
    pr = ACP(pretrained_vgg, SIZE, val_data=val, **SMALL)
    results = iter([0.5, 0.7, 0.7, 0.6])
    pr.train_candidate = lambda roots, data: (next(results), {"tag": len(pr.tested)})
    for pos in [(1, 2, 3), (2, 2, 3), (3, 2, 3), (4, 2, 3)]:
        pr.fitness(pos, data)
    assert pr.gbest == (2, 2, 3) and pr.gbest_fit == 0.7 and pr._gbest_state == {"tag": 1}


def test_candidate_training_is_seeded(data, val):
    torch.manual_seed(0)
    model = tiny_vgg()
    model.classifier = nn.Sequential(nn.Dropout(0.5), model.classifier)  # training draws random numbers
    pr = ACP(model, SIZE, val_data=val, **SMALL)
    roots = pr.kept_roots((4, 8, 8))
    runs = []
    for seed in (1, 2):
        torch.manual_seed(seed)  # the global random state does not matter
        pr.cursor, pr._cursor_state = None, None
        runs.append(pr.train_candidate(roots, data))
    assert runs[0][0] == runs[1][0] and all(torch.equal(runs[0][1][k], runs[1][1][k]) for k in runs[0][1])


@pytest.mark.parametrize("make", [tiny_vgg, tiny_resnet], ids=["vgg", "resnet"])
def test_candidates_train_as_smaller_networks_with_the_same_result(make, data, val):
    """shrink_candidates trains the network without its pruned channels: the same accuracy and, at
    every weight that reads a kept channel, the same trained weights as the masked full-size one."""
    torch.manual_seed(0)
    model = make()
    results = {}
    for shrink in (True, False):
        pr = ACP(model, SIZE, val_data=val, shrink_candidates=shrink, **SMALL)
        roots = pr.kept_roots([max(1, s // 2) for s in pr.sizes])
        results[shrink] = pr.train_candidate(roots, data)
    assert results[True][0] == pytest.approx(results[False][0], abs=1.0 / 64)  # at most one image apart
    outputs = []
    for shrink in (True, False):
        net = copy.deepcopy(model)
        net.load_state_dict(results[shrink][1])
        with torch.no_grad():
            outputs.append(net.eval()(val[0][0]))
    torch.testing.assert_close(outputs[0], outputs[1], atol=1e-4, rtol=1e-4)


# ----------------------------------------------------------------------------------- fitness
def test_candidates_keep_the_highest_l1_filters_and_hold_pruned_ones_at_zero(pretrained_vgg, data, val):
    before = copy.deepcopy(pretrained_vgg.state_dict())
    pr = ACP(pretrained_vgg, SIZE, val_data=val, **SMALL)
    counts = (3, 6, 9)
    roots = pr.kept_roots(counts)
    for u, keep, c in zip(pr.units, roots, counts):
        w = pr.convs[u.name].weight.detach()
        assert torch.equal(keep, w.abs().sum((1, 2, 3)).topk(c).indices.sort().values)
    acc, state = pr.train_candidate(roots, data)
    model = copy.deepcopy(pretrained_vgg)
    model.load_state_dict(state)
    assert acc == pytest.approx(pruning.evaluate(model, val)["accuracy"])
    for u, keep in zip(pr.units, roots):
        dead = torch.ones(u.size, dtype=torch.bool)
        dead[keep] = False
        assert not bool(state[f"{u.name}.weight"][dead].any())
        assert bool(state[f"{u.name}.weight"][~dead].any())
        bn = pr._bn_of[u.name]
        name = [n for n, m in pretrained_vgg.named_modules() if m is bn][0]
        assert not bool(state[f"{name}.weight"][dead].any()) and not bool(state[f"{name}.bias"][dead].any())
    # the pretrained model itself is untouched until prune() ends
    assert all(torch.equal(before[k], v) for k, v in pretrained_vgg.state_dict().items())
    pos = counts
    first = pr.fitness(pos, data)
    evals = pr.evaluations
    assert pr.fitness(pos, data) == first and pr.evaluations == evals  # tested once


def test_random_selection_draws_from_the_seeded_generator():
    a = ACP(tiny_vgg(), SIZE, val_data=[None], select="random", seed=3)
    b = ACP(tiny_vgg(), SIZE, val_data=[None], select="random", seed=3)
    ra, rb = a.kept_roots((3, 5, 7)), b.kept_roots((3, 5, 7))
    assert all(torch.equal(x, y) for x, y in zip(ra, rb))
    assert [len(r) for r in ra] == [3, 5, 7]
    assert any(not torch.equal(x, y) for x, y in zip(ra, a.kept_roots((3, 5, 7))))


# ------------------------------------------------------------------------------------ result
def test_prune_keeps_the_best_candidate_and_its_trained_weights(pretrained_vgg, data, val):
    model = copy.deepcopy(pretrained_vgg)
    pr = ACP(model, SIZE, val_data=val, target_flops_reduction=0.5, **SMALL)
    assert is_oneshot(pr)
    masks = pr.prune(data)
    assert pr.evaluations == len(pr.tested) <= 3 * 3
    assert pr.best_accuracy == max(pr.tested.values())
    best = max(pr.tested, key=pr.tested.get)
    assert tuple(pr.best.values()) == best
    assert 0.5 <= pr.flops_reduction(masks)
    if pr.flops_reduction(masks) > 0.53:  # the window is not always reachable: then no channel can be added
        for j, c in enumerate(best):
            if c < pr.sizes[j]:
                assert pr.metric(best[:j] + (c + 1,) + best[j + 1:]) < 0.5
    for u in pr.units:
        assert int((~pruning.criteria.dead_filters(masks[u.name])).sum()) == pr.best[u.name]
    # the model holds the weights the best candidate reached: its validation accuracy is the best fitness
    assert pruning.evaluate(pr.masked_model(), val)["accuracy"] == pytest.approx(pr.best_accuracy)
    assert all(pr.tested[p] <= pr.tested[pr.gbest] for p in pr.pbest)
    x = val[0][0][:4]
    check_export(pr, x)
    rep = pr.report()
    assert rep["channels_kept"] == pr.best and rep["evaluations"] == pr.evaluations
    assert set(rep["cluster_counts"]) == {u.name for u in pr.units}


def _resume(model, make, data, stop_after: int):
    """Run to ``stop_after`` evaluations, checkpoint through bytes, finish in a fresh pruner."""
    first = make(copy.deepcopy(model))
    first.cluster(data)
    assert first.search(data, max_evals=stop_after) is False
    buf = io.BytesIO()
    torch.save(first.state_dict(), buf)
    buf.seek(0)
    second = make(copy.deepcopy(model))
    second.load_state_dict(torch.load(buf, weights_only=True))
    second.prune(data)
    return second


@pytest.mark.parametrize("select,stop_after", [("l1", 2), ("l1", 5), ("random", 4)])
def test_resume_ends_with_the_same_masks_and_weights(pretrained_vgg, data, val, select, stop_after):
    def make(m):
        return ACP(m, SIZE, val_data=val, target_flops_reduction=0.5, select=select, **SMALL)
    straight = make(copy.deepcopy(pretrained_vgg))
    straight.prune(data)
    resumed = _resume(pretrained_vgg, make, data, stop_after)
    assert resumed.tested == straight.tested and resumed.best == straight.best
    assert all(torch.equal(resumed.masks()[n], straight.masks()[n]) for n in straight.convs)
    a, b = resumed.model.state_dict(), straight.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    state = resumed.state_dict()
    assert state["extra"]["gbest_state"] is None  # the candidate's copy is dropped once pruned


def test_residual_network_prunes_tied_units_alike(batches):
    torch.manual_seed(0)
    model = tiny_resnet()
    pr = ACP(model, SIZE, val_data=batches[8:9], target_flops_reduction=0.4, **SMALL)
    masks = pr.prune(batches[:4])
    for u in pr.units:
        kept = [ridx[~pruning.criteria.dead_filters(masks[n])[idx]].sort().values for n, idx, ridx in u.members]
        assert all(torch.equal(k, kept[0]) for k in kept), u.name  # every producer keeps the same roots
        assert len(kept[0]) == pr.best[u.name]
    check_export(pr, batches[8][0][:4])


# ------------------------------------------------------------------------------------ errors
def test_runtime_errors_name_what_is_missing(data):
    m = tiny_vgg()
    with pytest.raises(ValueError, match="needs val_data"):
        ACP(m, SIZE, val_data=None)
    pr = ACP(m, SIZE, val_data=[None], **SMALL)
    with pytest.raises(ValueError, match="needs data"):
        pr.prune(None)
    with pytest.raises(RuntimeError, match="cluster first"):
        pr.search(data)
    with pytest.raises(ValueError, match="no image"):
        pr.cluster([])
    pr = ACP(m, SIZE, val_data=[], **SMALL)
    with pytest.raises(ValueError, match="val_data yielded no batch"):
        pr.prune(data)
