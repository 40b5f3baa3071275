import pytest
import torch
from torch import nn

import stripeconv
from stripeconv.profile import profile


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)          # 8x8 out
        self.bn = nn.BatchNorm2d(8)
        self.dw = nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=8, bias=False)  # 4x4 out
        self.fc = nn.Linear(8 * 16, 5)

    def forward(self, x):
        return self.fc(self.dw(torch.relu(self.bn(self.conv(x)))).flatten(1))


def test_hand_counts():
    p = profile(Tiny(), (1, 3, 8, 8))
    conv = 2 * 8 * 8 * (8 * 9) * 3        # 2 * Ho*Wo * stripes * Cin
    dw = 2 * 4 * 4 * (8 * 9) * 1          # groups=8: Cin/groups = 1
    fc = 2 * 128 * 5
    assert p.layer("conv").flops == conv and p.layer("dw").flops == dw and p.layer("fc").flops == fc
    assert p.layer("bn").flops == 0                       # BN, ReLU ignored
    assert p.flops == conv + dw + fc and p.macs == p.flops // 2
    assert p.params == (8 * 3 * 9 + 8) + 16 + 8 * 9 + (128 * 5 + 5)
    assert p.layer("conv").density == 1.0
    # batch scales FLOPs, not params
    p4 = profile(Tiny(), (4, 3, 8, 8))
    assert p4.flops == 4 * p.flops and p4.params == p.params
    assert "total" in p.table()


def test_stripe_aware_masks_and_stripeconv():
    m = Tiny()
    mask = torch.zeros(8, 3, 3, dtype=torch.bool)
    mask[:4, 1, 1] = True
    mask[0] = True                                     # filter 0 keeps all 9 -> 4 - 1 + 9 = 12 stripes
    kept = int(mask.sum())
    assert kept == 12
    p = profile(m, (1, 3, 8, 8), masks={"conv": mask})
    assert p.layer("conv").flops == 2 * 64 * kept * 3
    assert p.layer("conv").params == kept * 3 + 8
    assert p.layer("conv").density == pytest.approx(12 / 72)
    stripeconv.convert(m, {"conv": mask})
    q = profile(m, (1, 3, 8, 8))
    assert q.layer("conv").flops == p.layer("conv").flops and q.layer("conv").params == p.layer("conv").params
    assert q.layer("conv").type == "StripeConv2d" and q.flops == p.flops and q.params == p.params


def test_training_flag_restored():
    m = Tiny().train()
    profile(m, torch.zeros(1, 3, 8, 8))
    assert m.training


def test_every_module_keeps_its_own_mode():
    """A submodule held in eval mode inside a training model (frozen BatchNorm statistics) stays so
    after the library's passes that run the model in eval mode."""
    from stripeconv.engine import evaluate_model
    from stripeconv.pruning.graph import ChannelGraph

    m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.LazyLinear(2))
    m(torch.zeros(1, 3, 8, 8))
    m.train()
    m[1].eval()
    data = [(torch.randn(2, 3, 8, 8), torch.tensor([0, 1]))]
    for run in (lambda: profile(m, (1, 3, 8, 8)), lambda: evaluate_model(m, data),
                lambda: ChannelGraph(m, torch.zeros(1, 3, 8, 8))):
        run()
        assert m.training and not m[1].training and m[0].training
