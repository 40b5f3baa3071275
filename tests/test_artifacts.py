"""Saved pruned models: plain state_dict + JSON architecture, loaded back with one call."""
import json

import pytest
import torch


from stripeconv import StripeConv2d, models, pruning  # noqa: E402
from stripeconv.artifacts import load_pruned, read_description, save_pruned  # noqa: E402

SIZE = (1, 3, 16, 16)


def _exported(arch="resnet8", zero_bn=True, **kw):
    torch.manual_seed(0)
    model = getattr(models, arch)(num_classes=10, width=0.5, **kw)
    for m in model.modules():  # trained-looking BN: non-zero shifts
        if isinstance(m, torch.nn.BatchNorm2d):
            m.bias.data.uniform_(0.1, 0.5)
    pr = pruning.L1Stripe(model, input_size=SIZE, ratio=0.5, scope="global", zero_bn=zero_bn)
    pr.prune()
    # kill some whole filters too, so that export removes channels
    masks = pr.masks()
    name = next(iter(masks))
    masks[name][:2] = False
    pr._masks, pr._frozen = masks, {k: v.clone() for k, v in masks.items()}
    pr._enforce(pr._frozen)
    return pr.export()


@pytest.mark.parametrize("zero_bn", [True, False])
@pytest.mark.parametrize("arch", ["resnet8", "vgg11_bn"])
def test_roundtrip_same_outputs(arch, zero_bn, tmp_path):
    exported = _exported(arch, zero_bn=zero_bn)
    # a removed filter that keeps its BN shift leaves a constant that export folds into its consumers
    folded = [m for m in exported.modules() if getattr(m, "constant_channel_weight", None) is not None]
    assert bool(folded) == (not zero_bn)
    weights, meta = save_pruned(exported, tmp_path / "model.v1", arch, {"num_classes": 10, "width": 0.5},
                                extra={"accuracy": 0.5})
    assert weights.name == "model.v1.pt" and meta.name == "model.v1.json"
    # the weights are a plain state_dict of tensors
    state = torch.load(weights, weights_only=True)
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    for path in (tmp_path / "model.v1", weights, meta):
        loaded = load_pruned(path)
        assert not loaded.training
        assert sum(isinstance(m, StripeConv2d) for m in loaded.modules()) == \
            sum(isinstance(m, StripeConv2d) for m in exported.modules()) > 0
        x = torch.randn(4, 3, 16, 16)
        torch.testing.assert_close(loaded(x), exported(x))
    desc = read_description(tmp_path / "model.v1")
    assert desc["arch"] == arch and desc["extra"] == {"accuracy": 0.5}
    json.dumps(desc)  # plain JSON


def test_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no saved model description"):
        load_pruned(tmp_path / "missing")
    with pytest.raises(ValueError, match="unknown architecture"):
        save_pruned(models.resnet8(), tmp_path / "x", "not_a_model")
