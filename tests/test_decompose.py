"""The stripe op spelled in ATen (stripeconv.decompose) equals the op, leaves no custom op in an
exported program, keeps dynamic shapes, and makes pruned models exportable to ONNX."""
import subprocess
import sys

import pytest
import torch
from torch import nn

import stripeconv
from stripeconv.decompose import decompositions, export_onnx, stripe_conv2d_dense

from conftest import random_mask, require_onnx_export

GEOMETRIES = [
    dict(in_ch=5, out_ch=7, k=(3, 3), stride=(1, 1), padding=(1, 1, 1, 1), dilation=(1, 1), groups=1),
    dict(in_ch=4, out_ch=6, k=(3, 3), stride=(2, 2), padding=(0, 2, 1, 0), dilation=(1, 1), groups=1),
    dict(in_ch=4, out_ch=6, k=(3, 2), stride=(1, 2), padding=(2, 2, 1, 1), dilation=(2, 1), groups=2),
    dict(in_ch=6, out_ch=6, k=(5, 5), stride=(1, 1), padding=(2, 2, 2, 2), dilation=(1, 1), groups=6),
    dict(in_ch=3, out_ch=4, k=(1, 1), stride=(1, 1), padding=(0, 0, 0, 0), dilation=(1, 1), groups=1),
]


@pytest.mark.parametrize("geo", GEOMETRIES, ids=lambda g: f"k{g['k']}s{g['stride']}p{g['padding']}g{g['groups']}")
@pytest.mark.parametrize("density", [0.0, 0.4, 1.0])
@pytest.mark.parametrize("with_bias", [True, False])
def test_dense_spelling_equals_the_op(geo, density, with_bias):
    gen = torch.Generator().manual_seed(0)
    mask = random_mask(geo["out_ch"], geo["k"], density, gen) if 0 < density < 1 else \
        torch.full((geo["out_ch"], *geo["k"]), density > 0)
    weight = torch.randn(int(mask.sum()), geo["in_ch"] // geo["groups"], generator=gen, dtype=torch.float64)
    bias = torch.randn(geo["out_ch"], generator=gen, dtype=torch.float64) if with_bias else None
    x = torch.randn(2, geo["in_ch"], 9, 8, generator=gen, dtype=torch.float64)
    args = (list(geo["stride"]), list(geo["padding"]), list(geo["dilation"]), geo["groups"])
    want = stripeconv.ops.stripe_conv2d(x, weight, bias, mask, *args)
    torch.testing.assert_close(stripe_conv2d_dense(x, weight, bias, mask, *args), want)


def _pruned_net() -> nn.Module:
    """Two StripeConv2d layers (one with a folded constant channel), BN, a residual-free head."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                        nn.Conv2d(8, 6, 3, stride=2, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                        nn.Linear(6, 4))
    gen = torch.Generator().manual_seed(1)
    stripeconv.convert(net, {"0": random_mask(8, (3, 3), 0.5, gen), "3": random_mask(6, (3, 3), 0.4, gen)})
    net[3].add_constant_channel(torch.randn(6, 3, 3, generator=gen))
    with torch.no_grad():
        net[1].running_mean.normal_(0, 0.1)
        net[1].running_var.uniform_(0.5, 1.5)
    return net.eval()


def test_exported_program_without_the_custom_op_and_with_a_dynamic_batch():
    net = _pruned_net()
    x = torch.randn(2, 3, 12, 12)
    batch = torch.export.Dim("batch", min=1, max=64)
    program = torch.export.export(net, (x,), dynamic_shapes={"input": {0: batch}})
    assert any("stripeconv" in str(n.target) for n in program.graph.nodes)  # kept as one node by default
    flat = program.run_decompositions(decompositions())
    assert not any("stripeconv" in str(n.target) for n in flat.graph.nodes)
    for b in (1, 5):
        xb = torch.randn(b, 3, 12, 12)
        torch.testing.assert_close(program.module()(xb), net(xb))  # the folded constant channel traced too
        torch.testing.assert_close(flat.module()(xb), net(xb))


def test_aot_inductor_package_runs_the_op_in_a_fresh_process(tmp_path):
    """An exported program keeps the op; AOTInductor packages it (on CPU), and a new process that
    imports stripeconv (which registers the op) runs the package, dynamic batch included."""
    if not hasattr(torch._inductor, "aoti_compile_and_package"):
        pytest.skip("torch._inductor.aoti_compile_and_package needs torch >= 2.6")
    net = _pruned_net()
    x = torch.randn(2, 3, 12, 12)
    batch = torch.export.Dim("batch", min=1, max=64)
    program = torch.export.export(net, (x,), dynamic_shapes={"input": {0: batch}})
    package = torch._inductor.aoti_compile_and_package(program, package_path=str(tmp_path / "net.pt2"))
    xs = [torch.randn(b, 3, 12, 12) for b in (1, 5)]
    torch.save({"inputs": xs, "outputs": [net(xb) for xb in xs]}, tmp_path / "io.pt")
    script = (
        "import sys, torch, stripeconv\n"
        "io = torch.load(sys.argv[2])\n"
        "run = torch._inductor.aoti_load_package(sys.argv[1])\n"
        "for x, want in zip(io['inputs'], io['outputs']):\n"
        "    torch.testing.assert_close(run(x), want)\n"
        "print('ok')\n")
    done = subprocess.run([sys.executable, "-c", script, package, str(tmp_path / "io.pt")], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]


def test_onnx_runtime_matches_the_model(tmp_path):
    require_onnx_export()
    ort = pytest.importorskip("onnxruntime", reason="the ONNX check runs the model in onnxruntime")
    net = _pruned_net()
    path = tmp_path / "pruned.onnx"
    export_onnx(net, (torch.randn(2, 3, 12, 12),), path, dynamic_shapes={"input": {0: torch.export.Dim("batch")}})
    session = ort.InferenceSession(str(path))
    name = session.get_inputs()[0].name
    for b in (1, 3):
        x = torch.randn(b, 3, 12, 12)
        (out,) = session.run(None, {name: x.numpy()})
        torch.testing.assert_close(torch.from_numpy(out), net(x).detach(), atol=1e-5, rtol=1e-5)
    assert net.training is False and not net[0].training


def test_export_onnx_on_an_older_exporter_says_what_it_needs(monkeypatch):
    monkeypatch.setattr(stripeconv.decompose, "_onnx_exporter_takes_programs", lambda: False)
    with pytest.raises(RuntimeError, match=r"torch >= 2\.5"):
        export_onnx(_pruned_net(), (torch.randn(2, 3, 12, 12),))


def test_export_onnx_restores_training_mode():
    require_onnx_export()
    net = _pruned_net().train()
    export_onnx(net, (torch.randn(2, 3, 12, 12),))
    assert net.training


@pytest.mark.parametrize("options", [dict(padding=1, padding_mode="reflect"), dict(padding="same", dilation=2),
                                     dict(padding=(0, 2), stride=2, groups=2),
                                     dict(padding=1, padding_mode="circular", bias=False)],
                         ids=["reflect", "same-dilated", "strided-grouped", "circular-no-bias"])
def test_onnx_layer_options(options):
    require_onnx_export()
    ort = pytest.importorskip("onnxruntime", reason="the ONNX check runs the model in onnxruntime")
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, **options)
    layer = stripeconv.StripeConv2d.from_conv(conv, random_mask(6, (3, 3), 0.5, torch.Generator().manual_seed(0)))
    x = torch.randn(2, 4, 11, 9)
    program = export_onnx(layer, (x,))
    session = ort.InferenceSession(program.model_proto.SerializeToString())
    (out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    torch.testing.assert_close(torch.from_numpy(out), layer.eval()(x).detach(), atol=1e-5, rtol=1e-5)
