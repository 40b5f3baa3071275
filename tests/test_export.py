import copy
import warnings

import pytest
import torch
from torch import nn


import stripeconv
from stripeconv import models
from stripeconv.export import apply_masks, export
from stripeconv.nn import StripeConv2d
from stripeconv.profile import profile

from conftest import tiny_vgg


def _randomize_bn(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.rand(n, generator=g) * 2 - 1)
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
            m.bias.data.copy_(torch.rand(n, generator=g) * 2 - 1)


def _random_masks(model, dead=0.4, keep=0.5, seed=0, zero_bn=False):
    g = torch.Generator().manual_seed(seed)
    masks, convs = {}, [(n, c) for n, c in model.named_modules() if isinstance(c, nn.Conv2d) and c.groups == 1]
    for name, c in convs:
        mk = torch.rand(c.out_channels, *c.kernel_size, generator=g) < keep
        mk[torch.rand(c.out_channels, generator=g) < dead] = False
        masks[name] = mk
    if zero_bn:  # what pruners do: dead filters carry 0
        mods = dict(model.named_modules())
        for name, mk in masks.items():
            bn_name = name.replace("conv", "bn") if "conv" in name else name[:-1] + "1"
            d = ~mk.flatten(1).any(1)
            if bn_name in mods and isinstance(mods[bn_name], nn.BatchNorm2d):
                mods[bn_name].weight.data[d] = 0
                mods[bn_name].bias.data[d] = 0
    return masks


def _masked(model, masks):
    return apply_masks(copy.deepcopy(model).eval(), masks)


CASES = [
    (lambda: models.vgg(cfg=[8, 8, "M", 16, "M", 16], in_channels=1), (3, 1, 28, 28)),
    (lambda: models.resnet8(width=0.5, in_channels=1), (3, 1, 28, 28)),          # identity + projection shortcuts
    (lambda: models.resnet18(width=0.125, in_channels=1), (2, 1, 32, 32)),
    (lambda: models.resnet50(width=0.0625), (2, 3, 16, 16)),                       # bottlenecks
]


@pytest.mark.parametrize("case", range(len(CASES)))
@pytest.mark.parametrize("fold", ["exact", "interior"])
def test_export_equals_masked(case, fold):
    ctor, size = CASES[case]
    torch.manual_seed(case)
    model = ctor().eval()
    _randomize_bn(model, case)
    masks = _random_masks(model, seed=case)
    x = torch.randn(size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ex = export(model, masks, input_size=(1, *size[1:]), fold=fold)
    assert all(isinstance(m, stripeconv.StripeConv2d) for n, m in ex.named_modules() if n in masks)
    assert not any(type(m) is nn.Conv2d for m in ex.modules())
    ref = _masked(model, masks)(x)
    if fold == "exact":
        torch.testing.assert_close(ex(x), ref, atol=1e-5, rtol=1e-5)
    assert profile(ex, (1, *size[1:])).params < profile(model, (1, *size[1:]), masks=masks).params


def test_chain_removal_counts_and_constant_fold():
    # plain chain: conv-BN-ReLU-conv(pad 0)-BN-ReLU-pool-linear; dead filters with non-zero BN shift
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
                          nn.Conv2d(6, 5, 3), nn.BatchNorm2d(5), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(5, 3)).eval()
    _randomize_bn(model)
    model[1].bias.data.fill_(0.7)   # relu(beta') > 0: constants must be folded, not dropped
    model[4].bias.data.fill_(0.7)
    masks = {"0": torch.ones(6, 3, 3, dtype=torch.bool), "3": torch.ones(5, 3, 3, dtype=torch.bool)}
    masks["0"][[1, 4]] = False
    masks["3"][[0, 2]] = False
    ex = export(model, masks, input_size=(1, 2, 10, 10))
    x = torch.randn(4, 2, 10, 10)
    torch.testing.assert_close(ex(x), _masked(model, masks)(x), atol=1e-5, rtol=1e-5)
    assert ex[0].out_channels == 4 and ex[1].num_features == 4 and ex[3].in_channels == 4
    assert ex[3].out_channels == 3 and ex[8].in_features == 3
    # removed params: 2 filters of conv0 (2*2*9 + 2 bias) + 2*2 BN, conv3 loses 2 input channels of 5 filters
    # (its kept filters only) and 2 filters, BN 2*2, linear 2*3
    before = sum(p.numel() for p in model.parameters())
    after = sum(p.numel() for p in ex.parameters())
    expected = before - (2 * 18 + 2) - 4 - (5 * 2 * 9) - (2 * 4 * 9 + 2) - 4 - 2 * 3
    assert after == expected


@pytest.mark.parametrize("padding", [1, "same", 2, (1, 0)])
@pytest.mark.parametrize("consumer_pruned", [True, False])
def test_padded_constant_folded_exactly_or_interior(padding, consumer_pruned):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                          nn.Conv2d(4, 3, 3, padding=padding)).eval()
    _randomize_bn(model)
    model[1].bias.data[0] = 1.0  # relu(BN shift) of the dead filter: a non-zero constant
    masks = {"0": torch.ones(4, 3, 3, dtype=torch.bool)}
    masks["0"][0] = False
    if consumer_pruned:
        masks["3"] = torch.rand(3, 3, 3) < 0.6
        masks["3"][1] = False  # the consumer's own dead filter goes too
    ex = export(model, masks, input_size=(1, 2, 6, 6))
    assert ex[0].out_channels == 3 and ex[3].in_channels == 3
    assert isinstance(ex[3], StripeConv2d) and ex[3].constant_channel_weight is not None
    assert ex[3].out_channels == (2 if consumer_pruned else 3)
    x = torch.randn(2, 2, 6, 6)
    want = _masked(model, masks)(x)
    if consumer_pruned:
        want = want[:, [0, 2]]
    torch.testing.assert_close(ex(x), want, atol=1e-5, rtol=1e-5)
    h = ex[:3](x)
    torch.testing.assert_close(ex[3](h[0]), ex[3](h)[0])  # unbatched input
    with pytest.raises(ValueError, match="constant_channel_weight"):
        ex[3].to_conv()
    ex2 = export(model, masks, input_size=(1, 2, 6, 6), fold="interior")
    assert ex2[0].out_channels == 3 and getattr(ex2[3], "constant_channel_weight", None) is None
    if padding == 1:
        torch.testing.assert_close(ex2(x)[..., 1:-1, 1:-1], want[..., 1:-1, 1:-1], atol=1e-5, rtol=1e-5)
        assert not torch.allclose(ex2(x), want, atol=1e-3)  # the borders differ: not exact


def test_constant_folded_into_bias_for_reflect_padding():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                          nn.Conv2d(4, 3, 3, padding=1, padding_mode="reflect")).eval()
    model[1].bias.data[0] = 1.0
    masks = {"0": torch.ones(4, 3, 3, dtype=torch.bool), "3": torch.ones(3, 3, 3, dtype=torch.bool)}
    masks["0"][0] = False
    ex = export(model, masks, input_size=(1, 2, 6, 6))
    assert ex[3].in_channels == 3 and ex[3].constant_channel_weight is None  # a bias is exact here
    x = torch.randn(2, 2, 6, 6)
    torch.testing.assert_close(ex(x), _masked(model, masks)(x), atol=1e-5, rtol=1e-5)


def test_constant_channel_state_dict_round_trip(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                          nn.Conv2d(4, 3, 3, padding=1)).eval()
    model[1].bias.data[0] = 1.0
    masks = {"0": torch.ones(4, 3, 3, dtype=torch.bool), "3": torch.rand(3, 3, 3) < 0.7}
    masks["0"][0] = False
    ex = export(model, masks, input_size=(1, 2, 6, 6))
    fresh = nn.Sequential(StripeConv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(),
                          StripeConv2d(3, 3, 3, padding=1)).eval()
    fresh.load_state_dict(ex.state_dict())
    x = torch.randn(2, 2, 6, 6)
    torch.testing.assert_close(fresh(x), ex(x))
    wrong = dict(ex.state_dict())
    wrong["3.constant_channel_weight"] = torch.zeros(3, 2, 2)
    with pytest.raises(RuntimeError, match="constant_channel_weight must be"):
        nn.Sequential(StripeConv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(),
                      StripeConv2d(3, 3, 3, padding=1)).load_state_dict(wrong)
    # the cached map follows input size changes and mask changes
    torch.testing.assert_close(ex(torch.ones(1, 2, 5, 7)), _masked(model, masks)(torch.ones(1, 2, 5, 7)),
                               atol=1e-5, rtol=1e-5)
    keep = ex[3].stripe_mask.clone()
    keep[:, 0, 0] = False
    ex[3].set_stripe_mask(keep)  # a pruned stripe reads nothing, the constant channel included
    assert bool((ex[3].constant_channel_weight[:, 0, 0] == 0).all())


def test_residual_group_needs_all_dead():
    model = models.resnet8(width=0.5, in_channels=1).eval()
    masks = {n: torch.ones(c.out_channels, *c.kernel_size, dtype=torch.bool)
             for n, c in model.named_modules() if isinstance(c, nn.Conv2d)}
    # channel 0 of stage 1 is produced by conv1 (stem) and layer1.0.conv2 (identity shortcut)
    masks["layer1.0.conv2"][0] = False
    for bn in (model.layer1[0].bn2,):
        bn.weight.data[0] = 0
        bn.bias.data[0] = 0
    ex = export(model, masks, input_size=(1, 1, 28, 28))
    assert ex.layer1[0].conv2.out_channels == 8 and ex.layer1[0].conv2.stripe_mask[0].sum() == 0
    masks["conv1"][0] = False
    model.bn1.weight.data[0] = 0
    model.bn1.bias.data[0] = 0
    ex = export(model, masks, input_size=(1, 1, 28, 28))
    assert ex.conv1.out_channels == 7 and ex.layer1[0].conv2.out_channels == 7 and ex.layer1[0].conv1.in_channels == 7
    x = torch.randn(2, 1, 28, 28)
    torch.testing.assert_close(ex(x), _masked(model, masks)(x), atol=1e-5, rtol=1e-5)


def test_zero_bn_masks_remove_everything_dead_vgg():
    model = models.vgg(cfg=[8, 8, "M", 16], in_channels=1).eval()
    _randomize_bn(model)
    masks = _random_masks(model, dead=0.5, seed=3)
    mods = dict(model.named_modules())
    for name, mk in masks.items():
        bn = mods[name[:-1] + str(int(name[-1]) + 1)]
        d = ~mk.flatten(1).any(1)
        bn.weight.data[d] = 0
        bn.bias.data[d] = 0
    ex = export(model, masks, input_size=(1, 1, 28, 28))
    for name, mk in masks.items():
        alive = int(mk.flatten(1).any(1).sum())
        assert mods[name].out_channels - int((~mk.flatten(1).any(1)).sum()) == alive
        assert dict(ex.named_modules())[name].out_channels == alive
    x = torch.randn(2, 1, 28, 28)
    torch.testing.assert_close(ex(x), _masked(model, masks)(x), atol=1e-5, rtol=1e-5)
    # the exported state_dict loads into a copy of the exported architecture
    ex2 = copy.deepcopy(ex)
    ex2.load_state_dict(ex.state_dict())
    torch.testing.assert_close(ex2(x), ex(x))


def _depthwise_block(groups: int = 8, stem_bias: bool = False) -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=stem_bias), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, padding=1, groups=groups), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 4, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2)).eval()


def test_depthwise_conv_loses_the_filters_of_removed_channels():
    model = _depthwise_block()
    masks = {"0": torch.ones(8, 3, 3, dtype=torch.bool), "6": torch.ones(4, 1, 1, dtype=torch.bool)}
    masks["0"][[1, 4, 6]] = False
    masks["6"][1] = False
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ex = export(model, masks, input_size=(1, 3, 8, 8))
    # a dead filter carries 0, the depthwise conv turns it into its bias, BN into a constant that
    # the 1x1 conv takes into its bias: the channel goes from all three layers
    assert ex[0].out_channels == 5 and ex[1].num_features == 5
    assert (ex[3].in_channels, ex[3].out_channels, ex[3].groups) == (5, 5, 5) and ex[4].num_features == 5
    assert ex[6].in_channels == 5 and ex[6].out_channels == 3 and ex[9].in_features == 3
    kept = [0, 2, 3, 5, 7]
    torch.testing.assert_close(ex[3].weight, model[3].weight[kept])
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(ex(x), _masked(model, masks)(x), atol=1e-5, rtol=1e-5)
    assert profile(ex, (1, 3, 8, 8)).flops < profile(_masked(model, {"6": masks["6"]}), (1, 3, 8, 8)).flops


def test_constant_channel_under_inference_mode_and_jit_trace():
    torch.manual_seed(0)
    layer = StripeConv2d(3, 4, 3, padding=1, stripe_mask=torch.rand(4, 3, 3) < 0.5).eval()
    layer.add_constant_channel(torch.randn(4, 3, 3))
    x, x2 = torch.randn(1, 3, 6, 6), torch.randn(2, 3, 9, 7)
    with torch.inference_mode():  # the buffer becomes an inference tensor: no version counter to cache on
        loaded = StripeConv2d(3, 4, 3, padding=1)
        loaded.load_state_dict(layer.state_dict())
        torch.testing.assert_close(loaded(x), layer(x))
        loaded.constant_channel_weight.mul_(2)
        doubled = loaded(x)
    with torch.no_grad():
        layer.constant_channel_weight.mul_(2)
        torch.testing.assert_close(doubled, layer(x))
        layer.constant_channel_weight.div_(2)
    layer(x)  # a warm cache must not be baked into a trace
    traced = torch.jit.trace(layer, (x,))  # and the trace check must pass
    torch.testing.assert_close(traced(x2), layer(x2))
    with torch.no_grad():
        layer.constant_channel_weight.mul_(3)
    torch.testing.assert_close(traced(x), layer(x))


def test_constant_through_a_zero_padded_depthwise_conv_stays():
    # a dead filter with a positive bias carries a constant; the depthwise conv's zero padding
    # makes it vary at the borders, so no bias can stand in for it and the channel is kept
    model = _depthwise_block(stem_bias=True)
    with torch.no_grad():
        model[0].bias.fill_(0.5)
        model[3].weight.fill_(0.1)  # 0.45 inside, 0.2 to 0.3 at the borders
        model[3].bias.zero_()
    masks = {"0": torch.ones(8, 3, 3, dtype=torch.bool)}
    masks["0"][[1, 4]] = False
    ex = export(model, masks, input_size=(1, 3, 8, 8))
    assert ex[0].out_channels == 8 and ex[3].groups == 8
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(ex(x), _masked(model, masks)(x), atol=1e-5, rtol=1e-5)


def test_grouped_conv_group_left_whole():
    model = _depthwise_block(groups=2)
    masks = {"0": torch.ones(8, 3, 3, dtype=torch.bool), "6": torch.ones(4, 1, 1, dtype=torch.bool)}
    masks["0"][:3] = False
    masks["6"][1] = False
    with pytest.warns(UserWarning, match="grouped conv"):
        ex = export(model, masks, input_size=(1, 3, 8, 8))
    assert ex[0].out_channels == 8 and isinstance(ex[3], nn.Conv2d) and ex[3].groups == 2
    assert ex[6].out_channels == 3 and ex[9].in_features == 3
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(ex(x), _masked(model, masks)(x), atol=1e-5, rtol=1e-5)


def test_input_model_untouched_and_errors():
    model = models.vgg(cfg=[4, "M", 4], in_channels=1).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    masks = {"features.0": torch.zeros(4, 3, 3, dtype=torch.bool)}
    masks["features.0"][0, 1, 1] = True
    export(model, masks, input_size=(1, 1, 8, 8))
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, before[k])
    with pytest.raises(KeyError):
        export(model, {"nope": masks["features.0"]}, input_size=(1, 1, 8, 8))
    with pytest.raises(ValueError, match="shape"):
        export(model, {"features.0": masks["features.0"][:2]}, input_size=(1, 1, 8, 8))


def test_export_refuses_an_input_size_without_the_batch():
    model = tiny_vgg()
    masks = {n: torch.ones(m.out_channels, *m.kernel_size, dtype=torch.bool)
             for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    masks["features.0"][0] = False  # a dead filter: removing it needs the input shape
    with pytest.raises(ValueError, match=r"with the batch that is \(1, 1, 28, 28\)"):
        export(model, masks, input_size=(1, 28, 28))


@pytest.mark.parametrize("which", [0, 3])
def test_parametrized_convs_export_like_plain_ones(which):
    from torch.nn.utils.parametrizations import weight_norm

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Conv2d(8, 4, 3, padding=1)).eval()
    _randomize_bn(model)
    masks = {"0": torch.rand(8, 3, 3) < 0.6}
    masks["0"][:2] = False  # two dead filters: their channel is removed
    expected = _masked(model, masks)
    model[which] = weight_norm(model[which])
    ex = export(model, masks, input_size=(1, 3, 8, 8))
    assert ex[0].out_channels == 6 and ex[3].in_channels == 6
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(ex(x), expected(x), atol=1e-5, rtol=1e-5)
