"""fuse_batchnorm: eval-mode BatchNorm folded into the StripeConv2d / nn.Conv2d before it, exactly."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import stripeconv
from conftest import tiny_resnet, tiny_vgg
from stripeconv import StripeConv2d, fuse_batchnorm
from stripeconv.pruning import L1Stripe


def _randomise_bn(model: nn.Module, gen: torch.Generator) -> nn.Module:
    """BatchNorm statistics far from the identity, so that a wrong fold shows."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d) and m.track_running_stats:
                m.running_mean.copy_(torch.rand(m.num_features, generator=gen) * 2 - 1)
                m.running_var.copy_(torch.rand(m.num_features, generator=gen) * 2 + 0.2)
                if m.affine:
                    m.weight.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                    m.bias.copy_(torch.rand(m.num_features, generator=gen) * 2 - 1)
    return model.eval()


def _count(model: nn.Module, kind) -> int:
    return sum(isinstance(m, kind) for m in model.modules())


@pytest.mark.parametrize("conv_kind", ["stripe", "stripe_no_bias", "stripe_constant_channel", "dense"])
@pytest.mark.parametrize("affine", [True, False])
def test_conv_bn_pair(backend, conv_kind, affine):
    gen = torch.Generator().manual_seed(1)
    torch.manual_seed(1)
    if conv_kind == "dense":
        conv = nn.Conv2d(4, 6, 3, padding=1)
    else:
        conv = StripeConv2d(4, 6, 3, padding=1, bias=conv_kind != "stripe_no_bias",
                            stripe_mask=torch.rand(6, 3, 3, generator=gen) < 0.5)
        if conv_kind == "stripe_constant_channel":
            conv.add_constant_channel(torch.randn(6, 3, 3, generator=gen))
    model = _randomise_bn(nn.Sequential(conv, nn.BatchNorm2d(6, affine=affine), nn.ReLU()), gen)
    x = torch.randn(2, 4, 7, 7, generator=gen)
    fused = fuse_batchnorm(model)
    torch.testing.assert_close(fused(x), model(x), atol=1e-5, rtol=1e-5)
    assert isinstance(fused[1], nn.Identity) and isinstance(model[1], nn.BatchNorm2d)  # the original is kept
    if conv_kind != "dense":
        assert torch.equal(fused[0].stripe_mask, conv.stripe_mask) and fused[0].num_stripes == conv.num_stripes
        assert fused[0].bias is not None


def test_pruned_models_fuse_exactly(backend):
    gen = torch.Generator().manual_seed(2)
    for model in (tiny_vgg(), tiny_resnet()):
        pruner = L1Stripe(model, ratio=0.5, input_size=(1, 1, 16, 16))
        pruner.prune()
        exported = _randomise_bn(pruner.export(), gen)
        x = torch.randn(3, 1, 16, 16, generator=gen)
        fused = fuse_batchnorm(exported, example_input=x)
        torch.testing.assert_close(fused(x), exported(x), atol=1e-5, rtol=1e-5)
        assert _count(fused, nn.BatchNorm2d) == 0 and _count(exported, nn.BatchNorm2d) > 0
        assert _count(fused, StripeConv2d) == _count(exported, StripeConv2d)
        assert type(fused) is type(exported)


class _SharedOutput(nn.Module):
    """The conv's output is read by the BN and by the residual sum: folding would change the sum."""

    def __init__(self):
        super().__init__()
        self.conv = StripeConv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 4, 1)
        self.bn2 = nn.BatchNorm2d(4, track_running_stats=False)  # batch statistics even in eval mode

    def forward(self, x):
        y = self.conv(x)
        return self.bn2(self.conv2(self.bn(y) + y))


def test_only_foldable_pairs_are_folded(backend):
    gen = torch.Generator().manual_seed(3)
    model = _randomise_bn(_SharedOutput(), gen)
    x = torch.randn(2, 4, 5, 5, generator=gen)
    fused = fuse_batchnorm(model, inplace=True, example_input=x)
    assert fused is model
    assert isinstance(fused.bn, nn.BatchNorm2d) and isinstance(fused.bn2, nn.BatchNorm2d)


def test_inplace_and_dtype(backend):
    gen = torch.Generator().manual_seed(4)
    model = _randomise_bn(nn.Sequential(StripeConv2d(3, 5, 3, stride=2), nn.BatchNorm2d(5)), gen).double()
    x = torch.randn(2, 3, 9, 9, generator=gen, dtype=torch.float64)
    expected = model(x)
    fused = fuse_batchnorm(model, inplace=True)
    assert fused is model and isinstance(model[1], nn.Identity)
    torch.testing.assert_close(fused(x), expected, atol=1e-12, rtol=1e-12)
    assert model[0].packed_weight.dtype == torch.float64 and model[0].bias.dtype == torch.float64


@pytest.mark.parametrize("kind", ["weight_norm", "stripe"])
def test_parametrized_conv_is_folded_into_real_tensors(kind):
    from torch.nn.utils import parametrize
    from torch.nn.utils.parametrizations import weight_norm

    class Double(nn.Module):
        def forward(self, w):
            return 2 * w

    gen = torch.Generator().manual_seed(3)
    torch.manual_seed(3)
    if kind == "weight_norm":
        conv = weight_norm(nn.Conv2d(4, 6, 3, padding=1))
    else:
        conv = StripeConv2d(4, 6, 3, padding=1, stripe_mask=torch.rand(6, 3, 3, generator=gen) < 0.5)
        conv.add_constant_channel(torch.randn(6, 3, 3, generator=gen))
        parametrize.register_parametrization(conv, "packed_weight", Double())
    model = _randomise_bn(nn.Sequential(conv, nn.BatchNorm2d(6), nn.ReLU()), gen)
    x = torch.randn(2, 4, 7, 7, generator=gen)
    for inplace in (False, True):
        expected = model(x)
        fused = fuse_batchnorm(model, inplace=inplace)
        assert isinstance(fused[1], nn.Identity)
        assert not parametrize.is_parametrized(fused[0])
        torch.testing.assert_close(fused(x), expected, atol=1e-5, rtol=1e-5)


def test_errors():
    train_mode = nn.Sequential(StripeConv2d(3, 5, 3), nn.BatchNorm2d(5))
    with pytest.raises(ValueError, match="model.eval"):
        fuse_batchnorm(train_mode)

    class Dynamic(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = StripeConv2d(3, 5, 3), nn.BatchNorm2d(5)

        def forward(self, x):
            return self.bn(self.conv(x)) if x.sum() > 0 else x

    with pytest.raises(ValueError, match="torch.fx"):
        fuse_batchnorm(Dynamic().eval())
    with pytest.raises(TypeError, match="nn.Module"):
        fuse_batchnorm(torch.randn(3))


def test_example_input_catches_a_wrong_fold(monkeypatch):
    import stripeconv.fusion as fusion

    gen = torch.Generator().manual_seed(5)
    model = _randomise_bn(nn.Sequential(StripeConv2d(3, 5, 3), nn.BatchNorm2d(5)), gen)
    monkeypatch.setattr(fusion, "_scale_shift", lambda bn: (torch.ones(5, dtype=torch.float64),
                                                           torch.zeros(5, dtype=torch.float64)))
    with pytest.raises(RuntimeError, match="does not compute"):
        stripeconv.fuse_batchnorm(model, example_input=torch.randn(1, 3, 6, 6, generator=gen))
