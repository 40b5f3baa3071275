"""Depthwise convs pass their channels through: pruning the conv that feeds one removes the
depthwise filters of those channels too (MobileNet-style 1x1 -> depthwise -> 1x1 blocks)."""
import warnings

import pytest
import torch
from torch import nn

from stripeconv import models, pruning
from stripeconv.engine import is_oneshot
from stripeconv.pruning.graph import ChannelGraph, is_depthwise
from stripeconv.profile import profile

SIZE = (1, 1, 16, 16)


def tiny_mobilenet() -> nn.Module:
    torch.manual_seed(0)
    model = models.mobilenet_v2(in_channels=1, cfg=[(1, 8, 1, 1), (4, 8, 2, 1), (4, 16, 2, 2)], head_channels=32)
    with torch.no_grad():  # BN shifts and statistics that make every constant visible
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.bias.uniform_(-0.5, 0.5)
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    return model


def batches(n: int = 3, seed: int = 1) -> list:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, *SIZE[1:], generator=g), torch.randint(0, 10, (8,), generator=g)) for _ in range(n)]


def depthwise_names(model: nn.Module) -> list:
    return [n for n, m in model.named_modules() if is_depthwise(m)]


def test_depthwise_convs_pass_channels_through():
    model = tiny_mobilenet()
    graph = ChannelGraph(model, SIZE)
    assert sorted(graph.passthrough_of) == sorted(depthwise_names(model))
    expanded = [g for g in graph.groups if g.passthrough]
    assert expanded and all(g.blocked is None for g in expanded)
    for g in expanded:  # decided by the 1x1 expansion (or the stem), read by the 1x1 projection
        assert [p[0] for p in g.producers] and not is_depthwise(graph.modules[g.root_name])
        assert all(not is_depthwise(graph.modules[c[0]]) for c in g.consumers)


def test_group_fed_by_the_input_is_not_pruned():
    model = nn.Sequential(nn.Conv2d(3, 3, 3, padding=1, groups=3), nn.BatchNorm2d(3), nn.ReLU(),
                          nn.Conv2d(3, 4, 1))
    graph = ChannelGraph(model, (1, 3, 8, 8))
    (g,) = [g for g in graph.groups if g.passthrough]
    assert g.blocked is not None and "no conv produces" in g.blocked
    assert bool(graph.alive_roots({})[graph.groups.index(g)].all())


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_flops_count_the_removed_depthwise_filters(seed):
    model = tiny_mobilenet().eval()
    pr = pruning.L1Filter(model, SIZE, ratio=0.5)
    g = torch.Generator().manual_seed(seed)
    masks = {}
    for name, conv in pr.convs.items():  # random dead filters, at least one alive per layer
        alive = torch.rand(conv.out_channels, generator=g) < 0.6
        alive[0] = True
        masks[name] = alive[:, None, None].expand(-1, *conv.kernel_size).clone()
    pr.hold(masks)
    ex = pr.export()
    assert pr.flops() == profile(ex, SIZE).flops
    for name in depthwise_names(model):  # every depthwise conv lost the filters of its dead channels
        alive = pr.graph.alive_passthrough(masks)[name]
        assert dict(ex.named_modules())[name].out_channels == int(alive.sum())
    x = torch.randn(4, *SIZE[1:])
    torch.testing.assert_close(ex(x), pr.masked_model().eval()(x), atol=1e-5, rtol=1e-5)


def test_dead_channels_carry_zero_past_the_depthwise_conv():
    model = tiny_mobilenet()
    pr = pruning.L1Filter(model, SIZE, ratio=0.5)
    pr.prune()
    dead = pr.graph.alive_passthrough(pr.masks())
    name = "features.1.depthwise.0"
    dw_bn = dict(model.named_modules())["features.1.depthwise.1"]
    gone = ~dead[name]
    assert bool(gone.any())
    assert bool((dw_bn.weight[gone] == 0).all()) and bool((dw_bn.bias[gone] == 0).all())
    # and they stay at zero through training, in the model and in what the hooks leave
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    pruning.fit(model, pr, batches(), 1, optimizer=opt, progress=False)
    assert bool((dw_bn.weight[gone] == 0).all()) and bool((dw_bn.bias[gone] == 0).all())
    seen = {}
    masked = pr.masked_model().eval()
    handle = dict(masked.named_modules())["features.1.depthwise"].register_forward_hook(
        lambda m, i, o: seen.setdefault("out", o))
    masked(torch.randn(2, *SIZE[1:]))
    handle.remove()
    assert bool((seen["out"][:, gone] == 0).all())


def test_without_zeroing_the_depthwise_bn_dead_channels_would_carry_constants():
    """The mutation check of the test above: the shrunk copy is exact only because dead channels
    carry 0 past the depthwise BN."""
    model = tiny_mobilenet().eval()
    pr = pruning.L1Filter(model, SIZE, ratio=0.5)
    pr.prune()
    x = torch.randn(4, *SIZE[1:])
    masked = pr.masked_model().eval()
    small = pruning.shrink(masked, pr.masks(), SIZE)
    torch.testing.assert_close(small.model.eval()(x), masked(x), atol=1e-5, rtol=1e-5)
    broken = pr.masked_model().eval()
    with torch.no_grad():
        for name in depthwise_names(model):
            bn = dict(broken.named_modules())[name[:-1] + "1"]
            bn.bias.copy_(dict(model.named_modules())[name[:-1] + "1"].bias.detach().abs() + 0.1)
    assert not torch.allclose(pruning.shrink(broken, pr.masks(), SIZE).model.eval()(x), broken(x), atol=1e-3)


def test_soft_pruning_without_zero_bn_keeps_varying_channels_and_warns():
    model = tiny_mobilenet()
    pr = pruning.SFP(model, SIZE, ratio=0.5, epochs=1)
    pruning.fit(model, pr, batches(), 1, progress=False)
    with pytest.warns(UserWarning, match="stay: what they carry"):
        ex = pr.export()
    x = torch.randn(4, *SIZE[1:])
    torch.testing.assert_close(ex(x), pr.masked_model().eval()(x), atol=1e-5, rtol=1e-5)
    assert profile(ex, SIZE).flops > pr.flops()  # the kept channels cost what the pruner counted as gone


# the smallest run of each method that prunes something on the tiny MobileNetV2
SEARCH = dict(val_data=batches(2, seed=2))
RUNS = {
    "SWP": dict(target_flops_reduction=0.4, epochs=2, skip_1x1=False),
    "L1Filter": dict(ratio=0.5),
    "L1Stripe": dict(ratio=0.5),
    "SFP": dict(ratio=0.5, epochs=2, zero_bn=True),
    "HFP": dict(ratio=0.5, epochs=2, zero_bn=True),
    "GHFP": dict(ratio=0.5, epochs=2, zero_bn=True),
    "ASFP": dict(ratio=0.5, epochs=2, zero_bn=True),
    "SRFP": dict(ratio=0.5, epochs=2, zero_bn=True),
    "ASRFP": dict(ratio=0.5, epochs=2, zero_bn=True),
    "GReg1": dict(ratio=0.5, reg_steps=3, interval=1, delta=0.5),
    "GReg2": dict(ratio=0.5, reg_steps=3, interval=1, pick_delta=0.5),
    "IncReg": dict(ratio=0.5, reg_steps=3),
    "OrthoReg": dict(ratio=0.5, epochs=2, **SEARCH),
    "PFP": dict(ratio=0.5),
    "LBS": dict(ratio=0.5, **SEARCH),
    "DAIS": dict(target_flops_reduction=0.4, search_steps=4, **SEARCH),
    "DSA": dict(target_flops_reduction=0.4, search_steps=4, **SEARCH),
    "MetaPruning": dict(target_flops_reduction=0.4, meta_epochs=1, population=4, parents=2, iterations=1,
                        recalib_batches=1, **SEARCH),
    "ACP": dict(ratio=0.5, particles=2, cycles=1, fitness_steps=1, cluster_images=16, lr=0.05, **SEARCH),
    "CPMC": dict(ratio=0.5),
    "FunctionalityPruning": dict(ratio=0.5, samples=16),
}


def test_every_method_has_a_run():
    assert sorted(RUNS) == sorted(pruning.METHODS)


@pytest.mark.parametrize("method", sorted(RUNS))
def test_every_method_prunes_through_depthwise_convs(method):
    model = tiny_mobilenet()
    dense = profile(tiny_mobilenet(), SIZE).flops
    data = batches()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # methods' notes on small runs
        pr = pruning.METHODS[method](model, SIZE, **RUNS[method])
        if is_oneshot(pr):
            pr.prune(data)
        pruning.fit(model, pr, data, 2, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing stays behind
        ex = pr.export()
    x = torch.randn(4, *SIZE[1:])
    torch.testing.assert_close(ex(x), pr.masked_model().eval()(x), atol=1e-4, rtol=1e-4)
    small = profile(ex, SIZE).flops
    assert small == pr.flops()  # what the method counted is what the exported model costs
    removed = {n for n in depthwise_names(model) if dict(ex.named_modules())[n].out_channels
               < dict(model.named_modules())[n].out_channels}
    assert small < dense and removed, f"{method} removed no depthwise filter"


class SqueezeExcite(nn.Module):
    """An inverted residual block whose depthwise output is gated per channel by a squeeze-excitation
    branch (MobileNetV3, EfficientNet): the gate's last conv produces the same channels as the expansion."""

    def __init__(self, channels: int = 8, hidden: int = 32):
        super().__init__()
        self.expand = nn.Sequential(nn.Conv2d(channels, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU())
        self.depthwise = nn.Sequential(nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden, bias=False),
                                       nn.BatchNorm2d(hidden), nn.ReLU())
        self.squeeze, self.excite = nn.Conv2d(hidden, 8, 1), nn.Conv2d(8, hidden, 1)
        self.project = nn.Sequential(nn.Conv2d(hidden, channels, 1, bias=False), nn.BatchNorm2d(channels))

    def forward(self, x):
        y = self.depthwise(self.expand(x))
        gate = torch.sigmoid(self.excite(torch.relu(self.squeeze(y.mean((2, 3), keepdim=True)))))
        return x + self.project(y * gate)


def se_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), SqueezeExcite(), SqueezeExcite(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))


@pytest.mark.parametrize("method", ["PFP", "DAIS"])
def test_squeeze_excitation_gates_prune_with_their_channels(method):
    """The gate's conv and the expansion produce one group (tied by the product), which passes the
    depthwise conv: group-aware methods remove its channels from all of them."""
    model = se_net()
    graph = ChannelGraph(model, SIZE)
    (group,) = [g for g in graph.groups if g.passthrough and g.passthrough[0][0] == "3.depthwise.0"]
    assert sorted(p[0] for p in group.producers) == ["3.excite", "3.expand.0"] and group.blocked is None
    data = batches()
    kw = dict(val_data=data, search_steps=4) if method == "DAIS" else {}
    pr = pruning.METHODS[method](model, SIZE, target_flops_reduction=0.4, **kw)
    if is_oneshot(pr):
        pr.prune(data)
    pruning.fit(model, pr, data, 2, progress=False)
    ex = pr.export()
    x = torch.randn(4, *SIZE[1:])
    torch.testing.assert_close(ex(x), pr.masked_model().eval()(x), atol=1e-5, rtol=1e-5)
    assert profile(ex, SIZE).flops == pr.flops() and pr.flops_reduction() > 0.35
    width = {name: dict(ex.named_modules())[f"{name}.depthwise.0"].out_channels for name in ("3", "4")}
    assert min(width.values()) < 32
    for name, w in width.items():  # the gate produces exactly the channels that remain
        assert dict(ex.named_modules())[f"{name}.excite"].out_channels == w
