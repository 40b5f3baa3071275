"""reorder_filters: a model's stripe layers permuted into tile order compute what they computed, and
their tiles become runs of consecutive channels (host-side plans; the kernels' aligned stores are
checked in test_triton's reordered_* cases)."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import stripeconv
from stripeconv import StripeConv2d, models, reorder_filters, reorderable
from stripeconv.backends import _tile_clustering, triton_plans as tp


def _random_masks(model: nn.Module, density: float, gen: torch.Generator) -> dict:
    return {name: torch.rand(m.out_channels, *m.kernel_size, generator=gen) < density
            for name, m in model.named_modules()
            if isinstance(m, nn.Conv2d) and m.kernel_size != (1, 1) and m.groups == 1}


def _randomise_norms(model: nn.Module, gen: torch.Generator) -> None:
    """BatchNorm statistics and affine terms that differ per channel (a permutation that misses one shows)."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.running_mean.copy_(torch.rand(n, generator=gen) * 2 - 1)
                m.running_var.copy_(torch.rand(n, generator=gen) + 0.5)
                m.weight.copy_(torch.rand(n, generator=gen) + 0.5)
                m.bias.copy_(torch.rand(n, generator=gen) * 2 - 1)


class _Chain(nn.Module):
    """Every kind of reader the reorder follows: BN, activations (modules, functions, methods), a
    per-channel PReLU, pooling, a depthwise conv, dropout, a dense conv, flatten and a linear layer;
    plus a layer with a bias and a constant channel, and one whose output is the model's output."""

    def __init__(self, gen: torch.Generator):
        super().__init__()
        m = lambda n: torch.rand(n, 3, 3, generator=gen) < 0.35  # noqa: E731
        self.conv1 = StripeConv2d(3, 48, 3, padding=1, stripe_mask=m(48))
        self.bn1 = nn.BatchNorm2d(48)
        self.prelu = nn.PReLU(48)
        self.conv2 = StripeConv2d(48, 64, 3, padding=1, bias=False, stripe_mask=m(64))
        self.depthwise = nn.Conv2d(64, 64, 3, padding=1, groups=64)
        self.bn2 = nn.BatchNorm2d(64)
        self.conv3 = nn.Conv2d(64, 40, 1)
        self.conv4 = StripeConv2d(40, 32, 3, padding=1, stripe_mask=m(32))
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.drop = nn.Dropout(0.0)
        self.fc = nn.Linear(32 * 4, 10)
        with torch.no_grad():
            self.conv1.add_constant_channel(torch.randn(48, 3, 3, generator=gen))

    def forward(self, x):
        x = self.prelu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.depthwise(self.conv2(x)))).contiguous()
        x = self.conv4(self.conv3(F.max_pool2d(x, 2)).relu())
        return self.fc(self.drop(torch.flatten(self.pool(torch.tanh(x)), 1)))


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.allclose(a, b, rtol=1e-10, atol=1e-10)


def test_filter_order_makes_the_clustered_tiles_runs_of_consecutive_filters():
    gen = torch.Generator().manual_seed(0)
    for n, density in [(64, 0.2), (128, 0.5), (128, 0.1), (256, 0.3), (512, 0.2), (96, 0.7)]:
        mask = torch.rand(n, 3, 3, generator=gen) < density
        perm = tp.filter_order(mask)
        assert sorted(perm.tolist()) == list(range(n))
        permuted = mask[perm].contiguous()
        widths = tp.tile_widths(mask)
        # the clustered tiles of the width that computes the fewest stripes, now consecutive: exactly their work
        fewest = min(widths, key=lambda w: tp.forward_plan(mask, 1, w).computed)
        in_order = tp.cached_plan("fwd_in_order", permuted, 1, fewest, "cpu")
        assert in_order.computed == tp.forward_plan(mask, 1, fewest).computed, (n, density)
        for w in widths:  # the others: their tiles split or group those, close to a clustering of their own
            in_order = tp.cached_plan("fwd_in_order", permuted, 1, w, "cpu")
            assert in_order.aligned and in_order.computed <= 1.15 * tp.forward_plan(mask, 1, w).computed, (n, w)
        plans = tp.forward_plans(permuted, 1, "cpu")
        assert plans[0].aligned, (n, density)  # the default width's first plan stores vectors
        # the backward's tiles (the fewest stripes) are runs of channels: it reads dy in place
        best = min(plans, key=lambda p: p.computed)
        assert any(p.runs and p.computed <= 1.05 * best.computed for p in plans), (n, density)
        if n > 64 and density < 0.7:  # before the reorder, the tiles of the fewest stripes scatter their channels
            assert not min(tp.forward_plans(mask, 1, "cpu"), key=lambda p: p.computed).aligned, (n, density)


def test_filter_order_keeps_groups_and_checks_its_input():
    gen = torch.Generator().manual_seed(1)
    mask = torch.rand(96, 3, 3, generator=gen) < 0.3
    perm = tp.filter_order(mask, groups=3)
    for g in range(3):
        assert sorted(perm[g * 32:(g + 1) * 32].tolist()) == list(range(g * 32, (g + 1) * 32))
    assert tp.filter_order(torch.zeros(8, 3, 3, dtype=torch.bool)).tolist() == list(range(8))
    with pytest.raises(ValueError, match=r"\[out_channels, kh, kw\] mask"):
        tp.filter_order(torch.ones(8, 9, dtype=torch.bool))
    with pytest.raises(ValueError, match="groups=3"):
        tp.filter_order(torch.ones(8, 3, 3, dtype=torch.bool), groups=3)


def test_nested_clustering_lowers_the_work_of_sparse_masks():
    """Narrow tiles split from wide clustered ones join the candidates: on random masks at density
    0.1 they compute ~14 % fewer stripes, over ten masks, than clustering at the narrow width directly."""
    direct = nested = 0
    for seed in range(10):
        mask = torch.rand(256, 3, 3, generator=torch.Generator().manual_seed(seed)) < 0.1
        pat = mask.reshape(256, -1).numpy()
        for width in (16, 32):
            direct += min(_tile_clustering.computed_stripes(pat, tiles, width)
                          for tiles in (_tile_clustering.tiles_sorted(pat, width),
                                        _tile_clustering.tiles_greedy(pat, width)))
            nested += tp.forward_plan(mask, 1, width).computed
    assert nested < 0.9 * direct


def test_set_cover_clustering_lowers_the_work_of_random_masks(monkeypatch):
    """The set-cover greedy over sets of positions fills tiles (all but the last) with each filter once and,
    on random masks of 512 filters at densities 0.1-0.3, computes ~18-32 % fewer stripes than the sort and
    the greedy growth; the forward's plans take the best of all."""
    for density, at_most in ((0.1, 0.75), (0.2, 0.8), (0.3, 0.87)):
        direct = cover = 0
        for seed in range(5):
            mask = torch.rand(512, 3, 3, generator=torch.Generator().manual_seed(seed)) < density
            pat = mask.reshape(512, -1).numpy()
            for width in (16, 32):
                tiles = _tile_clustering.tiles_by_subsets(pat, width)
                assert sorted(f for t in tiles for f in t) == list(range(512))
                assert all(len(t) == width for t in tiles[:-1]) and 0 < len(tiles[-1]) <= width
                direct += min(_tile_clustering.computed_stripes(pat, t, width)
                              for t in (_tile_clustering.tiles_sorted(pat, width),
                                        _tile_clustering.tiles_greedy(pat, width)))
                cover += _tile_clustering.computed_stripes(pat, tiles, width)
                assert tp.forward_plan(mask, 1, width).computed <= _tile_clustering.computed_stripes(pat, tiles, width)
        assert cover < at_most * direct, (density, cover / direct)
    # kernels of more than 12 positions (2**13 sets and up) leave it out
    def enumerate_sets(pat, width):
        raise AssertionError(f"set-cover clustering over {pat.shape[1]} positions")
    monkeypatch.setattr(_tile_clustering, "tiles_by_subsets", enumerate_sets)
    wide = torch.rand(64, 5, 5, generator=torch.Generator().manual_seed(0)) < 0.3
    assert 0 < tp.forward_plan(wide, 1, 16).computed <= 64 * 25
    with pytest.raises(AssertionError, match="over 9 positions"):
        tp.forward_plan(torch.rand(64, 3, 3, generator=torch.Generator().manual_seed(0)) < 0.3, 1, 16)


def test_reorder_filters_computes_the_same_function():
    gen = torch.Generator().manual_seed(3)
    model = _Chain(gen).double()
    _randomise_norms(model, gen)
    assert reorderable(model) == {"conv1": None, "conv2": None, "conv4": None}
    x = torch.randn(3, 3, 16, 16, generator=gen, dtype=torch.float64)
    before = {name: m.stripe_mask.clone() for name, m in model.named_modules() if isinstance(m, StripeConv2d)}
    reordered = reorder_filters(model, example_input=x)
    changed = 0
    for name, m in reordered.named_modules():
        if isinstance(m, StripeConv2d):
            # each mask is a permutation of its rows, and the in-order tiles are aligned
            rows = sorted(map(tuple, before[name].reshape(m.out_channels, -1).int().tolist()))
            assert rows == sorted(map(tuple, m.stripe_mask.reshape(m.out_channels, -1).int().tolist()))
            changed += not torch.equal(before[name], m.stripe_mask)
            assert tp.forward_plans(m.stripe_mask, 1, "cpu")[0].aligned, name
    assert changed == 3
    for name, m in model.named_modules():  # the original is untouched (a copy was reordered)
        if isinstance(m, StripeConv2d):
            assert torch.equal(before[name], m.stripe_mask)
    for train in (False, True):  # eval (running statistics) and train mode (batch statistics)
        model.train(train)
        reordered.train(train)
        xg = x.clone().requires_grad_()
        xr = x.clone().requires_grad_()
        want, got = model(xg), reordered(xr)
        assert _close(got, want), (train, (got - want).abs().max())
        gy = torch.randn(want.shape, generator=gen, dtype=torch.float64)
        want.backward(gy)
        got.backward(gy)
        assert _close(xr.grad, xg.grad)
        # the weight gradients are the original's, permuted like the weights
        assert _close(reordered.fc.weight.grad.sum(), model.fc.weight.grad.sum())


def test_reordered_model_state_dict_round_trip():
    gen = torch.Generator().manual_seed(4)
    model = _Chain(gen).double().eval()
    _randomise_norms(model, gen)
    reordered = reorder_filters(model)
    fresh = copy.deepcopy(model)  # the original masks: the state dict brings the permuted ones
    fresh.load_state_dict(reordered.state_dict())
    x = torch.randn(2, 3, 16, 16, generator=gen, dtype=torch.float64)
    assert _close(fresh(x), reordered(x)) and _close(fresh(x), model(x))


def test_reorder_filters_in_place_and_after_a_repeat():
    gen = torch.Generator().manual_seed(5)
    model = _Chain(gen).double().eval()
    x = torch.randn(2, 3, 16, 16, generator=gen, dtype=torch.float64)
    want = model(x)
    assert reorder_filters(model, inplace=True) is model
    assert _close(model(x), want)
    masks = {name: m.stripe_mask.clone() for name, m in model.named_modules() if isinstance(m, StripeConv2d)}
    reorder_filters(model, inplace=True)  # already in order: the greedy clustering may still differ a little
    assert _close(model(x), want)
    assert all(tp.forward_plans(m.stripe_mask, 1, "cpu")[0].aligned for m in model.modules()
               if isinstance(m, StripeConv2d)), masks.keys()


def test_reorder_resnet_keeps_residual_streams():
    """In a ResNet the convs whose outputs join a residual sum keep their order; the inner ones are
    reordered, and the network computes the same."""
    gen = torch.Generator().manual_seed(6)
    torch.manual_seed(6)
    model = models.resnet20().double()
    stripeconv.convert(model, _random_masks(model, 0.4, gen))
    _randomise_norms(model, gen)
    model.eval()
    reasons = reorderable(model)
    inner = {name for name in reasons if name.endswith(".conv1")}
    assert {name for name, reason in reasons.items() if reason is None} == inner
    assert all("residual sum" in reasons[name] for name in reasons if name not in inner)
    x = torch.randn(2, 3, 32, 32, generator=gen, dtype=torch.float64)
    reordered = reorder_filters(model, example_input=x)
    assert _close(reordered(x), model(x))
    layers = {name: (m, reordered.get_submodule(name)) for name, m in model.named_modules()
              if isinstance(m, StripeConv2d)}
    changed = {name for name, (a, b) in layers.items() if not torch.equal(a.stripe_mask, b.stripe_mask)}
    assert changed and changed <= inner  # 16-filter layers are one tile: nothing to reorder
    for name in inner:
        assert tp.forward_plans(layers[name][1].stripe_mask, 1, "cpu")[0].aligned, name


class _Unusual(nn.Module):
    def __init__(self):
        super().__init__()
        mask = torch.ones(16, 3, 3, dtype=torch.bool)
        self.a = StripeConv2d(4, 16, 3, padding=1, stripe_mask=mask)
        self.b = StripeConv2d(16, 16, 3, padding=1, stripe_mask=mask)
        self.c = StripeConv2d(16, 16, 3, padding=1, stripe_mask=mask, groups=2)
        self.shared = StripeConv2d(16, 16, 3, padding=1, stripe_mask=mask)
        self.d = StripeConv2d(32, 16, 3, padding=1, stripe_mask=mask)
        self.bn = nn.BatchNorm2d(16)
        self.unused = StripeConv2d(16, 16, 3, stripe_mask=mask)

    def forward(self, x):
        a = self.a(x)
        y = self.b(a) * 2.0          # an arithmetic reader
        y = self.c(self.bn(y))       # grouped conv reads bn: b's channels cannot move
        z = self.shared(self.shared(y))
        return self.d(torch.cat([z, a], 1)).mean((2, 3))


def test_reorderable_says_why_not():
    reasons = reorderable(_Unusual())
    assert reasons["a"] == "its output is read by cat (a concatenation)"
    assert reasons["b"] == "its output is read by mul"
    assert reasons["c"] == "it is a grouped conv (groups=2): its filters stay in their groups"
    assert reasons["shared"] == "it is called more than once"
    assert reasons["d"] == "its output is read by the tensor method .mean"
    assert reasons["unused"] == "the traced forward does not call it"
    chain = nn.Sequential(StripeConv2d(4, 16, 3, stripe_mask=torch.ones(16, 3, 3, dtype=torch.bool)),
                          nn.BatchNorm2d(16), nn.Conv2d(16, 8, 3, groups=2))
    assert reorderable(chain) == {"0": "2 is a grouped conv (groups=2)"}
    assert reorderable(chain[:2]) == {"0": "it is the model's output"}


def test_reorder_filters_refuses_what_it_cannot_do():
    with pytest.raises(TypeError, match="expects an nn.Module"):
        reorder_filters(torch.ones(3))

    class Branching(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = StripeConv2d(3, 8, 3, stripe_mask=torch.ones(8, 3, 3, dtype=torch.bool))

        def forward(self, x):
            return self.conv(x) if x.sum() > 0 else x  # data-dependent control flow: not traceable

    with pytest.raises(ValueError, match="torch.fx can trace"):
        reorder_filters(Branching())


def test_reorder_filters_checks_its_result(monkeypatch):
    """With example_input, a reorder that changed the function is an error, not a silent change."""
    from stripeconv import reorder

    gen = torch.Generator().manual_seed(7)
    model = _Chain(gen).double().eval()
    monkeypatch.setattr(reorder, "_permute_inputs", lambda module, perm: None)  # the readers left behind
    with pytest.raises(RuntimeError, match="does not compute what the original computes"):
        reorder_filters(model, example_input=torch.randn(2, 3, 16, 16, generator=gen, dtype=torch.float64))


class _Flattening(nn.Module):
    """A CIFAR-style classifier head written in the common ways."""

    def __init__(self, style: str, gen: torch.Generator):
        super().__init__()
        self.style = style
        self.conv1 = StripeConv2d(3, 64, 3, padding=1, stripe_mask=torch.rand(64, 3, 3, generator=gen) < 0.3)
        self.conv2 = StripeConv2d(64, 128, 3, padding=1, stripe_mask=torch.rand(128, 3, 3, generator=gen) < 0.3)
        self.bn = nn.BatchNorm2d(128)
        self.fc = nn.Linear(128 * 4, 10)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.bn(self.conv2(F.relu(self.conv1(x))))), 4)
        if self.style == "view_size":
            x = x.view(x.size(0), -1)
        elif self.style == "reshape_shape":
            x = x.reshape(x.shape[0], -1)
        elif self.style == "flatten_method":
            x = x.flatten(1)
        else:  # a hard-coded feature count: what it splits is not known from the graph
            x = x.view(-1, 512)
        return self.fc(x)


@pytest.mark.parametrize("style", ["view_size", "reshape_shape", "flatten_method", "view_fixed"])
def test_reorder_through_the_usual_flattens(style):
    gen = torch.Generator().manual_seed(8)
    model = _Flattening(style, gen).double().eval()
    _randomise_norms(model, gen)
    reasons = reorderable(model)
    assert reasons["conv1"] is None
    if style == "view_fixed":
        assert reasons["conv2"] == "its output is read by the tensor method .view"
    else:
        assert reasons["conv2"] is None
    x = torch.randn(2, 3, 8, 8, generator=gen, dtype=torch.float64)
    reordered = reorder_filters(model, example_input=x)
    assert _close(reordered(x), model(x))
    assert not torch.equal(reordered.conv2.stripe_mask, model.conv2.stripe_mask) or style == "view_fixed"
