"""Model zoo for pruning experiments, written in the package (no torchvision dependency).

CIFAR-style networks (3x3 stem, for 32x32 or 28x28 inputs):

- :func:`vgg16_bn` / :func:`vgg` - VGG with BatchNorm, the network-slimming / SWP CIFAR variant:
  conv-BN-ReLU blocks, max pooling (``ceil_mode=True`` so 28x28 inputs work too), global average
  pooling and one linear classifier.
- :func:`resnet20`, :func:`resnet56`, :func:`resnet110` / :func:`resnet_cifar` - CIFAR ResNets
  (He et al. 2016, 3 stages of 16/32/64 channels, ``(depth - 2) / 6`` basic blocks per stage).
  Shortcuts that change shape are **option B** (1x1 conv + BN projection). Option A (zero-padded
  identity) is not offered: its channel padding is a functional op that dependency graphs (and so
  :func:`stripeconv.export`) cannot map channel by channel, while a projection is an ordinary conv.

- :func:`mobilenet_v2` - MobileNetV2 (Sandler et al. 2018) for CIFAR: inverted residual blocks
  (1x1 expansion, 3x3 depthwise, linear 1x1 projection), stride-1 stem and first stages. Pruning
  removes the expanded channels of a block together with their depthwise filters.

ImageNet-style networks (7x7 stem + max pool), module names as in torchvision so its state dicts
load: :func:`resnet18`, :func:`resnet50` / :class:`ResNet`.

Every constructor takes ``num_classes`` and ``in_channels`` (Fashion-MNIST: ``in_channels=1``),
and ``width`` (a channel multiplier, for small test models). Nothing in :mod:`stripeconv.pruning`
depends on these classes: the pruning code works on module types and the dependency graph, so
torchvision models can be pruned too.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

from torch import Tensor, nn

__all__ = [
    "VGG", "vgg", "vgg11_bn", "vgg13_bn", "vgg16_bn", "vgg19_bn",
    "CifarResNet", "resnet_cifar", "resnet8", "resnet20", "resnet56", "resnet110",
    "ResNet", "resnet18", "resnet34", "resnet50", "BasicBlock", "Bottleneck",
    "MobileNetV2", "InvertedResidual", "mobilenet_v2",
]

VGG_CFGS = {
    11: [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    13: [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    16: [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
    19: [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512, "M"],
}


def _w(channels: int, width: float) -> int:
    return max(1, int(round(channels * width)))


class VGG(nn.Module):
    """VGG with BatchNorm for small images: ``features`` (conv3x3-BN-ReLU, 'M' = 2x2 max pool),
    global average pooling, ``classifier`` (one Linear)."""

    def __init__(self, cfg: Sequence[Union[int, str]], num_classes: int = 10, in_channels: int = 3, width: float = 1.0):
        super().__init__()
        layers: list[nn.Module] = []
        c = in_channels
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2, ceil_mode=True))
            else:
                out = _w(int(v), width)
                layers += [nn.Conv2d(c, out, 3, padding=1, bias=False), nn.BatchNorm2d(out), nn.ReLU(inplace=True)]
                c = out
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(c, num_classes)
        _init(self)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.pool(self.features(x)).flatten(1))


def vgg(depth: int = 16, num_classes: int = 10, in_channels: int = 3, width: float = 1.0,
        cfg: Optional[Sequence[Union[int, str]]] = None) -> VGG:
    """CIFAR VGG-``depth`` (11/13/16/19) with BN; ``cfg`` overrides the layer list."""
    if cfg is None:
        if depth not in VGG_CFGS:
            raise ValueError(f"vgg depth must be one of {sorted(VGG_CFGS)}, got {depth}")
        cfg = VGG_CFGS[depth]
    return VGG(cfg, num_classes, in_channels, width)


def vgg11_bn(**kw) -> VGG:
    """CIFAR VGG-11 with BN; keyword arguments as for :func:`vgg`."""
    return vgg(11, **kw)


def vgg13_bn(**kw) -> VGG:
    """CIFAR VGG-13 with BN; keyword arguments as for :func:`vgg`."""
    return vgg(13, **kw)


def vgg16_bn(**kw) -> VGG:
    """CIFAR VGG-16 with BN; keyword arguments as for :func:`vgg`."""
    return vgg(16, **kw)


def vgg19_bn(**kw) -> VGG:
    """CIFAR VGG-19 with BN; keyword arguments as for :func:`vgg`."""
    return vgg(19, **kw)


class BasicBlock(nn.Module):
    """ResNet basic block: two 3x3 conv-BN (the first of stride ``stride``), plus the shortcut
    (``downsample``, or the input itself) before the last ReLU."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: Optional[nn.Module] = None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """ResNet bottleneck block: 1x1 conv-BN to ``planes``, 3x3 (stride ``stride``), 1x1 to ``planes * 4``,
    plus the shortcut (``downsample``, or the input itself) before the last ReLU."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: Optional[nn.Module] = None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


def _projection(inplanes: int, outplanes: int, stride: int) -> nn.Module:
    return nn.Sequential(nn.Conv2d(inplanes, outplanes, 1, stride, bias=False), nn.BatchNorm2d(outplanes))


class CifarResNet(nn.Module):
    """CIFAR ResNet: 3x3 stem (16 channels), 3 stages, global pooling, ``fc``; option-B shortcuts."""

    def __init__(self, depth: int = 20, num_classes: int = 10, in_channels: int = 3, width: float = 1.0):
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n + 2 (8, 20, 32, 44, 56, 110), got {depth}")
        n = (depth - 2) // 6
        planes = [_w(16, width), _w(32, width), _w(64, width)]
        self.conv1 = nn.Conv2d(in_channels, planes[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes[0])
        self.relu = nn.ReLU(inplace=True)
        self.inplanes = planes[0]
        self.layer1 = self._make_layer(planes[0], n, 1)
        self.layer2 = self._make_layer(planes[1], n, 2)
        self.layer3 = self._make_layer(planes[2], n, 2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(planes[2], num_classes)
        _init(self)

    def _make_layer(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        down = _projection(self.inplanes, planes, stride) if stride != 1 or self.inplanes != planes else None
        layers = [BasicBlock(self.inplanes, planes, stride, down)]
        self.inplanes = planes
        layers += [BasicBlock(planes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.avgpool(x).flatten(1))


def resnet_cifar(depth: int = 20, num_classes: int = 10, in_channels: int = 3, width: float = 1.0) -> CifarResNet:
    """CIFAR ResNet-``depth`` (6n + 2) with option-B (projection) shortcuts."""
    return CifarResNet(depth, num_classes, in_channels, width)


def resnet8(**kw) -> CifarResNet:
    """CIFAR ResNet-8; keyword arguments as for :func:`resnet_cifar`."""
    return resnet_cifar(8, **kw)


def resnet20(**kw) -> CifarResNet:
    """CIFAR ResNet-20; keyword arguments as for :func:`resnet_cifar`."""
    return resnet_cifar(20, **kw)


def resnet56(**kw) -> CifarResNet:
    """CIFAR ResNet-56; keyword arguments as for :func:`resnet_cifar`."""
    return resnet_cifar(56, **kw)


def resnet110(**kw) -> CifarResNet:
    """CIFAR ResNet-110; keyword arguments as for :func:`resnet_cifar`."""
    return resnet_cifar(110, **kw)


class ResNet(nn.Module):
    """ImageNet ResNet (torchvision layout and module names: conv1, bn1, layer1..4, fc)."""

    def __init__(self, block, layers: Sequence[int], num_classes: int = 1000, in_channels: int = 3, width: float = 1.0):
        super().__init__()
        self.inplanes = _w(64, width)
        self.conv1 = nn.Conv2d(in_channels, self.inplanes, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(self.inplanes)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.layer1 = self._make_layer(block, _w(64, width), layers[0], 1)
        self.layer2 = self._make_layer(block, _w(128, width), layers[1], 2)
        self.layer3 = self._make_layer(block, _w(256, width), layers[2], 2)
        self.layer4 = self._make_layer(block, _w(512, width), layers[3], 2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(self.inplanes, num_classes)
        _init(self)

    def _make_layer(self, block, planes: int, blocks: int, stride: int) -> nn.Sequential:
        down = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            down = _projection(self.inplanes, planes * block.expansion, stride)
        layers = [block(self.inplanes, planes, stride, down)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(self.avgpool(x).flatten(1))


def resnet18(num_classes: int = 1000, in_channels: int = 3, width: float = 1.0) -> ResNet:
    """ImageNet ResNet-18 (2, 2, 2, 2 basic blocks per stage), torchvision's layout and module names."""
    return ResNet(BasicBlock, [2, 2, 2, 2], num_classes, in_channels, width)


def resnet34(num_classes: int = 1000, in_channels: int = 3, width: float = 1.0) -> ResNet:
    """ImageNet ResNet-34 (3, 4, 6, 3 basic blocks per stage), torchvision's layout and module names."""
    return ResNet(BasicBlock, [3, 4, 6, 3], num_classes, in_channels, width)


def resnet50(num_classes: int = 1000, in_channels: int = 3, width: float = 1.0) -> ResNet:
    """ImageNet ResNet-50 (3, 4, 6, 3 bottleneck blocks per stage), torchvision's layout and module names."""
    return ResNet(Bottleneck, [3, 4, 6, 3], num_classes, in_channels, width)


def _conv_bn(cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1, act: bool = True) -> nn.Sequential:
    layers = [nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
    return nn.Sequential(*layers, nn.ReLU6(inplace=True)) if act else nn.Sequential(*layers)


class InvertedResidual(nn.Module):
    """``expand`` (1x1, absent at expansion 1) -> ``depthwise`` (3x3) -> ``project`` (1x1, linear),
    plus the input when the shape is kept."""

    def __init__(self, inplanes: int, planes: int, stride: int, expansion: int):
        super().__init__()
        hidden = inplanes * expansion
        self.expand = _conv_bn(inplanes, hidden, 1) if expansion != 1 else None
        self.depthwise = _conv_bn(hidden, hidden, 3, stride, groups=hidden)
        self.project = _conv_bn(hidden, planes, 1, act=False)
        self.residual = stride == 1 and inplanes == planes

    def forward(self, x: Tensor) -> Tensor:
        out = self.expand(x) if self.expand is not None else x
        out = self.project(self.depthwise(out))
        return x + out if self.residual else out


# (expansion, channels, blocks, stride) per stage; CIFAR strides: 32x32 -> 32, 16, 8, 4
MOBILENET_V2_CFG = [(1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
                    (6, 320, 1, 1)]


class MobileNetV2(nn.Module):
    """MobileNetV2 for small images: 3x3 stem of stride 1, inverted residual ``features``, 1x1 head conv."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3, width: float = 1.0,
                 cfg: Sequence[tuple] = MOBILENET_V2_CFG, head_channels: int = 1280):
        super().__init__()
        planes = _w(32, width)
        self.stem = _conv_bn(in_channels, planes, 3)
        blocks = []
        for expansion, channels, n, stride in cfg:
            for i in range(n):
                blocks.append(InvertedResidual(planes, _w(channels, width), stride if i == 0 else 1, expansion))
                planes = _w(channels, width)
        self.features = nn.Sequential(*blocks)
        last = _w(head_channels, max(1.0, width))  # the head is not narrowed below its default
        self.head = _conv_bn(planes, last, 1)
        self.classifier = nn.Linear(last, num_classes)
        _init(self)

    def forward(self, x: Tensor) -> Tensor:
        x = self.head(self.features(self.stem(x)))
        return self.classifier(x.mean((2, 3)))


def mobilenet_v2(num_classes: int = 10, in_channels: int = 3, width: float = 1.0,
                 cfg: Optional[Sequence[tuple]] = None, head_channels: int = 1280) -> MobileNetV2:
    """CIFAR MobileNetV2; ``cfg`` overrides the stages as ``(expansion, channels, blocks, stride)``."""
    return MobileNetV2(num_classes, in_channels, width, MOBILENET_V2_CFG if cfg is None else cfg, head_channels)


def _init(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
