"""torch.jit.script: StripeConv2d and models holding it script to the same op, forward and gradients."""
from __future__ import annotations

import io
import subprocess
import sys
import warnings

import pytest
import torch
from torch import nn

import stripeconv
from conftest import check_against_oracle, random_mask, tiny_resnet
from stripeconv.pruning import L1Stripe

LAYERS = {
    "zeros": dict(padding=1),
    "same_dilated": dict(padding="same", dilation=2),
    "reflect_strided": dict(padding=(1, 2), stride=2, padding_mode="reflect"),
    "circular_groups": dict(padding=1, groups=2, padding_mode="circular"),
    "valid_no_bias": dict(padding=0, bias=False),
}


def _script(module: nn.Module) -> torch.jit.ScriptModule:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return torch.jit.script(module)


@pytest.mark.parametrize("config", list(LAYERS))
def test_scripted_layer_matches_eager(backend, config):
    gen = torch.Generator().manual_seed(len(config))
    conv = nn.Conv2d(4, 6, 3, **LAYERS[config])
    layer = stripeconv.StripeConv2d.from_conv(conv, random_mask(6, (3, 3), 0.5, gen))
    scripted = _script(layer)
    # On CPU the compiled kernels are called directly where the cpu backend is in use, else the op.
    assert ("stripeconv_cpu.conv2d" in scripted._scripted_forward.code) == (backend == "cpu")
    x = torch.randn(2, 4, 9, 8, generator=gen)
    grad_out = torch.randn_like(layer(x))
    grads = []
    for module in (layer, scripted):
        module.zero_grad()
        xg = x.clone().requires_grad_(True)
        out = module(xg)
        out.backward(grad_out)
        grads.append([out.detach(), xg.grad] + [p.grad.clone() for p in layer.parameters()])
    for eager, script in zip(*grads):
        torch.testing.assert_close(script, eager, atol=1e-6, rtol=1e-6)
    # The oracle holds for the scripted layer too: it is the same op.
    check_against_oracle(conv, layer.stripe_mask, x, atol=2e-4)


def test_scripted_layer_unbatched_constant_channel_and_shared_parameters(backend):
    torch.manual_seed(0)
    layer = stripeconv.StripeConv2d(4, 6, 3, padding=1, stripe_mask=torch.rand(6, 3, 3) < 0.6)
    layer.add_constant_channel(torch.randn(6, 3, 3))
    scripted = _script(layer)
    x = torch.randn(4, 7, 7)
    torch.testing.assert_close(scripted(x), layer(x), atol=1e-6, rtol=1e-6)
    with torch.no_grad():
        layer.packed_weight.mul_(2)  # one set of parameters: training either trains both
    torch.testing.assert_close(scripted(x), layer(x), atol=1e-6, rtol=1e-6)
    assert isinstance(layer, stripeconv.StripeConv2d)


def test_scripted_layer_rejects_wrong_channels(backend):
    scripted = _script(stripeconv.StripeConv2d(4, 6, 3))
    with pytest.raises(Exception, match="expected input with 4 channels, got 3"):
        scripted(torch.randn(1, 3, 5, 5))
    with pytest.raises(Exception, match="3-D .* or 4-D"):
        scripted(torch.randn(5, 5))


def test_pruned_model_scripts_saves_and_loads(backend):
    torch.manual_seed(0)
    pruner = L1Stripe(tiny_resnet(), ratio=0.5, input_size=(1, 1, 16, 16))
    pruner.prune()
    exported = pruner.export().eval()
    scripted = _script(exported)
    x = torch.randn(3, 1, 16, 16)
    torch.testing.assert_close(scripted(x), exported(x), atol=1e-5, rtol=1e-5)
    # Scripting leaves the eager model as it was.
    assert sum(isinstance(m, stripeconv.StripeConv2d) for m in exported.modules()) > 0
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.save(scripted, buf)
        loaded = torch.jit.load(io.BytesIO(buf.getvalue()))
    torch.testing.assert_close(loaded(x), exported(x), atol=1e-5, rtol=1e-5)


def test_saved_scripted_model_runs_in_a_fresh_process(tmp_path):
    """Importing stripeconv registers every op a saved scripted model calls (the CPU kernels too)."""
    torch.manual_seed(0)
    layer = stripeconv.StripeConv2d(4, 6, 3, padding=1, stripe_mask=torch.rand(6, 3, 3) < 0.5)
    x = torch.randn(2, 4, 7, 7)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.save(_script(layer), str(tmp_path / "layer.pt"))
    torch.save({"x": x, "y": layer(x).detach()}, tmp_path / "io.pt")
    code = ("import torch, stripeconv; m = torch.jit.load('layer.pt'); d = torch.load('io.pt'); "
            "torch.testing.assert_close(m(d['x']), d['y'], atol=1e-6, rtol=1e-6); print('ok')")
    run = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr[-2000:]


def test_scripted_layer_on_cpu_kernels_gives_clear_errors():
    scripted = _script(stripeconv.StripeConv2d(4, 6, 3))
    with pytest.raises(Exception, match="dtype"):
        scripted(torch.randn(1, 4, 5, 5, dtype=torch.float64))
    with pytest.raises(Exception, match="smaller than the dilated kernel"):
        scripted(torch.randn(1, 4, 2, 2))
