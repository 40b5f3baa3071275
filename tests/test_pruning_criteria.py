import warnings

import pytest
import torch
from torch import nn


from stripeconv import models
from stripeconv.pruning import criteria as C
from stripeconv.pruning.graph import ChannelGraph
from stripeconv.profile import profile


def test_norms_and_selection():
    w = torch.arange(2 * 3 * 2 * 2, dtype=torch.float).reshape(2, 3, 2, 2) - 10
    assert C.stripe_norms(w).shape == (2, 2, 2)
    torch.testing.assert_close(C.filter_norms(w), w.abs().sum((1, 2, 3)))
    torch.testing.assert_close(C.filter_norms(w, 2), w.pow(2).sum((1, 2, 3)).sqrt())
    assert C.channel_norms(w).shape == (3,) and C.position_norms(w).shape == (2, 2)
    s = torch.tensor([3.0, 1.0, 2.0, 5.0])
    assert C.lowest_k(s, 2).tolist() == [False, True, True, False]
    assert C.lowest_k(s, 2, candidates=torch.tensor([True, False, True, True])).tolist() == [True, False, True, False]
    sel = C.select_per_layer({"a": s, "b": torch.tensor([1.0, 0.0])}, 0.5)
    assert sel["a"].sum() == 2 and sel["b"].tolist() == [False, True]
    g = C.select_global({"a": s, "b": torch.tensor([0.5, 0.1])}, 3)
    assert g["a"].tolist() == [False, True, False, False] and g["b"].tolist() == [True, True] or g["b"].sum() == 1
    assert all(int((~v).sum()) >= 1 for v in g.values())  # every layer keeps one unit


def test_unit_conversions():
    f = C.filters_to_stripes(torch.tensor([True, False]), (3, 3))
    assert f.shape == (2, 3, 3) and f[0].all() and not f[1].any()
    p = torch.zeros(3, 3, dtype=torch.bool)
    p[1, 1] = True
    assert C.positions_to_stripes(p, 4).sum() == 4
    assert C.units_to_stripes(torch.tensor([True, False]), 2, (3, 3)).sum() == 9
    assert C.units_to_stripes(~p, 4, (3, 3)).sum() == 4


def test_prunable_convs_skips():
    m = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3, groups=8), nn.Conv2d(8, 4, 1))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a depthwise conv follows its producer: nothing to warn about
        convs = C.prunable_convs(m)
    assert list(convs) == ["0", "2"]
    m = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3, groups=2), nn.Conv2d(8, 4, 1))
    with pytest.warns(UserWarning, match="grouped convs left unpruned, with the channels they read: 1"):
        convs = C.prunable_convs(m)
    assert list(convs) == ["0", "2"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert list(C.prunable_convs(m, skip_first=True, skip_1x1=True)) == []


def test_channels_to_stripes_and_flops_graph():
    model = models.resnet8(width=0.5, in_channels=1)
    keep = torch.ones(8, dtype=torch.bool)
    keep[:2] = False
    masks = C.channels_to_stripes(model, (1, 1, 16, 16), "layer1.0.conv1", keep)
    # stage-1 channels are produced by the stem and by the block's conv2 (identity shortcut)
    assert set(masks) == {"conv1", "layer1.0.conv2"}
    assert not masks["conv1"][:2].any() and masks["conv1"][2:].all()
    graph = ChannelGraph(model, (1, 1, 16, 16))
    assert graph.flops({}) == profile(model, (1, 1, 16, 16)).flops
    alive = graph.alive_inputs(masks)
    assert alive["layer1.0.conv1"].tolist() == keep.tolist()


def test_select_to_target_flops():
    model = models.vgg(cfg=[8, "M", 16, "M", 16], in_channels=1)
    graph = ChannelGraph(model, (1, 1, 16, 16))
    convs = C.prunable_convs(model)
    scores = {n: C.filter_norms(c.weight) for n, c in convs.items()}
    dense = graph.flops({})
    for scope in ("layer", "global"):
        masks = C.select_to_target(scores, convs, graph.flops, dense, target_flops_reduction=0.5, scope=scope)
        red = 1 - graph.flops(masks) / dense
        assert 0.5 <= red < 0.75, (scope, red)
    with pytest.raises(ValueError):
        C.select_to_target(scores, convs, graph.flops, dense, ratio=0.5, target_flops_reduction=0.5)
