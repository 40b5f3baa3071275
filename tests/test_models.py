import pytest
import torch

from stripeconv import models
from stripeconv.profile import profile


@pytest.mark.parametrize("ctor,kw,size", [
    (models.vgg16_bn, dict(width=0.125), (2, 3, 32, 32)),
    (models.vgg16_bn, dict(width=0.125, in_channels=1), (2, 1, 28, 28)),
    (models.resnet20, dict(width=0.5), (2, 3, 32, 32)),
    (models.resnet8, dict(in_channels=1), (2, 1, 28, 28)),
    (models.resnet18, dict(width=0.125, in_channels=1), (2, 1, 28, 28)),
    (models.resnet50, dict(width=0.125), (2, 3, 64, 64)),
    (models.mobilenet_v2, dict(width=0.25), (2, 3, 32, 32)),
    (models.mobilenet_v2, dict(width=0.25, in_channels=1), (2, 1, 28, 28)),
])
def test_shapes(ctor, kw, size):
    m = ctor(num_classes=7, **kw).eval()
    assert m(torch.randn(size)).shape == (size[0], 7)


def test_reference_counts():
    # published counts (FLOPs = 2 x MACs): ResNet-18 1.82 GMACs / 11.69 M params, ResNet-50 4.1 GMACs / 25.56 M,
    # CIFAR VGG-16 313 M MACs, ResNet-56 ~125 M MACs (option-B adds the two projection convs)
    r18 = profile(models.resnet18(), (1, 3, 224, 224))
    assert r18.params == 11_689_512 and abs(r18.macs / 1e9 - 1.814) < 0.01
    r50 = profile(models.resnet50(), (1, 3, 224, 224))
    assert r50.params == 25_557_032 and abs(r50.macs / 1e9 - 4.09) < 0.02
    v = profile(models.vgg16_bn(), (1, 3, 32, 32))
    assert abs(v.macs / 1e6 - 313.2) < 1.0
    r56 = profile(models.resnet56(), (1, 3, 32, 32))
    assert 125e6 < r56.macs < 127e6
    assert sum(p.numel() for p in models.resnet110().parameters()) > 1.7e6
    # MobileNetV2 has torchvision's layers (3,504,872 parameters with 1000 classes); only strides differ
    assert sum(p.numel() for p in models.mobilenet_v2(num_classes=1000).parameters()) == 3_504_872
    blocks = models.mobilenet_v2().features
    assert len(blocks) == 17 and sum(b.residual for b in blocks) == 10


def test_bad_depth():
    with pytest.raises(ValueError):
        models.resnet_cifar(21)
    with pytest.raises(ValueError):
        models.vgg(17)


def test_torchvision_names():
    keys = set(models.resnet18().state_dict())
    assert {"conv1.weight", "layer1.0.conv1.weight", "layer2.0.downsample.0.weight", "fc.bias"} <= keys
