"""shrink(): the smaller network without dead channels computes and trains like the full-size masked
network, and expand() puts its values back at exactly the entries they came from."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from stripeconv.pruning import criteria as C
from stripeconv.pruning import shrink

from conftest import FASHION_SIZE as SIZE, tiny_resnet, tiny_vgg

pytestmark = pytest.mark.usefixtures("one_thread")


def _masked(make, seed: int, dead_layer: bool = False):
    """A model with random stripe masks (about a third of the filters dead, a few single stripes
    pruned in the others) applied as zeros, dead BN zeroed; returns (model, masks, convs, bn_of)."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = make()
    model.train()
    with torch.no_grad():  # BN statistics and affine away from their initial values
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1, generator=g)
                m.running_var.uniform_(0.5, 1.5, generator=g)
                m.weight.normal_(1, 0.2, generator=g)
                m.bias.normal_(0, 0.2, generator=g)
    convs = {n: m for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    masks = {}
    for i, (n, c) in enumerate(convs.items()):
        alive = torch.rand(c.out_channels, generator=g) > 0.35
        if dead_layer and i == 1:
            alive[:] = False
        mask = (torch.rand(c.out_channels, *c.kernel_size, generator=g) > 0.1) & alive[:, None, None]
        masks[n] = mask
    bn_of = C.conv_bn_pairs(model, SIZE)
    with torch.no_grad():
        for n, c in convs.items():
            c.weight.mul_(masks[n][:, None])
    C.zero_dead_bn(convs, masks, bn_of)
    return model, masks, convs, bn_of


MODELS = [pytest.param(tiny_vgg, id="vgg"), pytest.param(tiny_resnet, id="resnet")]


@pytest.mark.parametrize("make", MODELS)
@pytest.mark.parametrize("mode", ["eval", "train"])
def test_the_smaller_network_computes_the_masked_one(make, mode):
    model, masks, _, _ = _masked(make, 0)
    before = copy.deepcopy(model.state_dict())
    shrunk = shrink(model, masks, SIZE)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the model is untouched
    full = sum(p.numel() for p in model.parameters())
    assert sum(p.numel() for p in shrunk.model.parameters()) < 0.8 * full
    x = torch.randn(6, *SIZE[1:])
    getattr(model, mode)()
    getattr(shrunk.model, mode)()
    with torch.no_grad():
        torch.testing.assert_close(shrunk.model(x), model(x), atol=1e-5, rtol=1e-5)
    for name, mask in shrunk.masks.items():
        conv = shrunk.model.get_submodule(name)
        assert mask.shape == (conv.out_channels, *conv.kernel_size)
        assert not bool((conv.weight.detach() * ~mask[:, None]).any())  # pruned stripes still zero there


@pytest.mark.parametrize("make", MODELS)
def test_expand_is_the_inverse_and_writes_only_the_kept_entries(make):
    model, masks, _, _ = _masked(make, 1)
    state = model.state_dict()
    shrunk = shrink(model, masks, SIZE)
    back = shrunk.expand(state)
    assert back.keys() == state.keys() and all(torch.equal(back[k], state[k]) for k in state)
    with torch.no_grad():
        for p in shrunk.model.parameters():
            p.add_(1000.0)
    moved = shrunk.expand(state)
    for name, p in shrunk.model.named_parameters():
        changed = moved[name] != state[name]
        assert int(changed.sum()) == p.numel(), name  # one full-size entry per entry of the copy
        assert torch.equal(moved[name][changed].sort().values, p.detach().reshape(-1).sort().values)
    # the masks came along: the smaller conv keeps the live filters' stripe patterns, dead ones are gone
    for name, mask in masks.items():
        live = sorted(tuple(f.flatten().tolist()) for f in mask if bool(f.any()))
        assert sorted(tuple(f.flatten().tolist()) for f in shrunk.masks[name] if bool(f.any())) == live, name

def test_a_layer_with_every_filter_dead_keeps_one_pruned_channel():
    model, masks, _, _ = _masked(tiny_vgg, 2, dead_layer=True)
    name = list(masks)[1]
    shrunk = shrink(model, masks, SIZE)
    assert shrunk.model.get_submodule(name).out_channels == 1 and not bool(shrunk.masks[name].any())
    x = torch.randn(4, *SIZE[1:])
    model.eval()
    shrunk.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(shrunk.model(x), model(x), atol=1e-5, rtol=1e-5)


def _train(model, masks, convs, bn_of, batches):
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)
    model.train()
    for x, y in batches:
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        C.mask_grads(convs, masks)
        C.zero_dead_bn(convs, masks, bn_of, grads=True)
        opt.step()
        with torch.no_grad():
            for n, c in convs.items():
                c.weight.mul_(masks[n][:, None])
        C.zero_dead_bn(convs, masks, bn_of)


@pytest.mark.parametrize("make", MODELS)
def test_training_the_smaller_network_trains_the_masked_one(make, batches):
    model, masks, convs, bn_of = _masked(make, 3)
    state = copy.deepcopy(model.state_dict())
    shrunk = shrink(model, masks, SIZE)
    names = dict(shrunk.model.named_modules())
    small_convs = {n: names[n] for n in convs}
    bn_names = {n: [k for k, m in model.named_modules() if m is bn][0] for n, bn in bn_of.items()}
    small_bn = {n: names[b] for n, b in bn_names.items()}
    _train(model, masks, convs, bn_of, batches[:3])
    _train(shrunk.model, shrunk.masks, small_convs, small_bn, batches[:3])
    trained = shrunk.expand(state)
    for name, p in model.named_parameters():  # the entries that the smaller network holds
        idx = shrunk.index[name]
        torch.testing.assert_close(trained[name].reshape(-1)[idx], p.detach().reshape(-1)[idx], atol=1e-5, rtol=1e-4,
                                   msg=name)
    # the others only read dead channels (weight decay moved them in the full-size network)
    x = batches[5][0]
    model.eval()
    shrunk.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(shrunk.model(x), model(x), atol=1e-4, rtol=1e-4)
