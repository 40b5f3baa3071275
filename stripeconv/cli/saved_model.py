"""The commands that use a saved model as it is: ``eval``, ``bench`` and ``onnx``."""
from __future__ import annotations

import json
import logging
import sys
import warnings
from pathlib import Path

import torch

from .common import CLIError, check_device, say_result
from .data import check_fits, data_spec, load_datasets


def cmd_onnx(args) -> int:
    from ..artifacts import load_pruned, read_description
    from ..decompose import _onnx_exporter_takes_programs, export_onnx

    out = Path(args.output)
    if out.is_dir():
        raise CLIError(f"--output {out} is a folder; expected a file name such as model.onnx")
    try:
        import onnxscript  # noqa: F401
    except ImportError:
        raise CLIError("ONNX export needs onnx and onnxscript: pip install onnx onnxscript") from None
    desc = read_description(args.model_path)
    chw = _input_chw(desc, args)
    model = load_pruned(args.model_path, map_location="cpu").eval()
    _check_runs(model, chw, "cpu")
    if not _onnx_exporter_takes_programs():
        raise CLIError(f"ONNX export needs torch >= 2.5 (its torch.export-based exporter); this is torch "
                       f"{torch.__version__}")
    if args.fuse_bn:
        from ..fusion import fuse_batchnorm

        model = fuse_batchnorm(model, inplace=True)
    x = torch.randn(2, *chw)
    dynamic = ({0: torch.export.Dim("batch", min=1)},) if args.dynamic_batch else None
    out.parent.mkdir(parents=True, exist_ok=True)
    # torch's exporter warns about its own internals (pytree deprecations, torchvision ops it
    # cannot register without torchvision): nothing the user can act on here
    registry_log = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = registry_log.level
    registry_log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            program = export_onnx(model, (x,), None, dynamic_shapes=dynamic, verbose=False)
    finally:
        registry_log.setLevel(level)
    batch = _name_batch_axis(program) if args.dynamic_batch else "2"
    written = _save_onnx(program, out)
    line = f"wrote {out}" + (f" and its weights {', '.join(map(str, written[1:]))} (keep them next to it)"
                             if written[1:] else "") + f" (input [{batch}, {', '.join(map(str, chw))}])"
    try:
        import onnxruntime as ort
    except ImportError:
        say_result(line + "; install onnxruntime to check it against the model")
        return 0
    session = ort.InferenceSession(str(out))
    with torch.no_grad():
        want = model(x)
    (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    err = float((torch.from_numpy(got) - want).abs().max())
    say_result(line + f"; onnxruntime vs the model on random input: max abs difference {err:.2e}")
    if not err <= 1e-4 * max(1.0, float(want.abs().max())):  # NaN fails too
        print(f"stripeconv onnx: error: the ONNX model disagrees with the saved model (max abs difference {err:.2e})",
              file=sys.stderr)
        return 1
    return 0


def _name_batch_axis(program) -> str:
    """Name the input's dynamic first dimension ``batch`` in the ONNX graph (torch.export calls it ``s77`` or the
    like, whatever the Dim's name); returns the name the graph has, which the printed input shape shows."""
    dim = program.model.graph.inputs[0].shape[0]
    if isinstance(getattr(dim, "value", None), str):
        try:
            if hasattr(program, "rename_axes"):  # public from torch 2.9
                program.rename_axes({dim.value: "batch"})
            else:
                from torch.onnx._internal.exporter._ir_passes import rename_axis
                rename_axis(program.model, {dim.value: "batch"})
        except (ImportError, AttributeError, ValueError):  # an exporter without either: the graph keeps its name
            pass
    dim = program.model.graph.inputs[0].shape[0]
    return str(getattr(dim, "value", dim))


def _save_onnx(program, out: Path) -> list[Path]:
    """Save ``program`` as one self-contained file (weights inside) when they fit protobuf's 2 GB limit; above it
    torch writes them to a separate file next to it. Returns every file written, ``out`` first."""
    import inspect

    import onnx

    if "external_data" in inspect.signature(program.save).parameters:
        program.save(out, external_data=False)  # torch still moves weights over 2 GB out of the file
    else:
        program.save(out)
    proto = onnx.load(str(out), load_external_data=False)
    external = {e.value for t in proto.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL
                for e in t.external_data if e.key == "location"}
    return [out, *(out.parent / name for name in sorted(external))]


def cmd_eval(args) -> int:
    from ..artifacts import load_pruned, read_description
    from ..engine import evaluate_model

    check_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    desc = read_description(args.model_path)
    extra = desc.get("extra", {})
    spec = data_spec(args, extra.get("data"))
    _, test, meta = load_datasets(spec, train=False)
    check_fits(desc, meta, args.model_path, spec)
    device = _device(args.device)
    model = load_pruned(args.model_path, map_location=device)
    ev = evaluate_model(model, test, device, batch_size=args.eval_batch_size)
    saved = extra.get("accuracy")
    res = {"path": str(args.model_path), "dataset": spec["dataset"], "samples": ev["samples"],
           "accuracy": ev["accuracy"], "loss": ev["loss"], "saved_accuracy": saved}
    if args.json:
        print(json.dumps(res, indent=1))
    else:
        line = f"{args.model_path}: accuracy {ev['accuracy']:.4f} (loss {ev['loss']:.4f}) on {ev['samples']} " \
               f"{spec['dataset']} test images"
        if saved is not None:
            line += f"; recorded at save time: {saved:.4f}" + (" (match)" if abs(saved - ev["accuracy"]) < 1e-9 else "")
        print(line)
    return 0


def cmd_bench(args) -> int:
    from ..artifacts import _constructor, load_pruned, read_description
    from ..report import best_of, dense_counterpart, environment, layer_latency, model_latency

    check_device(args.device)
    if args.output and Path(args.output).is_dir():  # found only after all the timing
        raise CLIError(f"--output {args.output} is a folder; expected a file name")
    if args.threads:
        torch.set_num_threads(args.threads)
    desc = read_description(args.model_path)
    chw = _input_chw(desc, args)
    device = _device(args.device)
    model = load_pruned(args.model_path, map_location=device)
    _check_runs(model, chw, device)
    torch.manual_seed(0)
    unpruned = _constructor(desc["arch"])(**desc["arch_kwargs"]).to(device).eval()
    models = {"dense": unpruned, "masked_dense": dense_counterpart(model), "stripe": model}
    if args.fuse_bn:  # every model alike: BatchNorm folded into the conv before it
        from ..fusion import fuse_batchnorm

        models = {n: fuse_batchnorm(m.eval(), inplace=True) for n, m in models.items()}
    reordered = None
    if args.reorder:  # the pruned model only: the dense ones have no tiles
        from ..reorder import reorder_filters, reorderable

        try:
            reordered = reorderable(models["stripe"])
            models["stripe"] = model = reorder_filters(models["stripe"], inplace=True)
        except ValueError as exc:
            raise CLIError(f"--reorder: {exc}") from None
    env = environment(device)
    layouts = ["nhwc"] if args.channels_last else args.layouts
    results = []
    for b in args.batch_size:
        lat = model_latency(models, (b, *chw), device, repeats=args.repeats, min_time_s=args.min_time, layouts=layouts)
        best = {n: best_of(lat, n) for n in models}
        row = {"batch": b, "timings": lat,
               **{f"{n}_ms": r["median_ms"] for n, (k, r) in best.items()},
               **{f"{n}_layout": (k.partition("@")[2] or "nchw") for n, (k, r) in best.items()},
               "speedup": best["dense"][1]["median_ms"] / best["stripe"][1]["median_ms"],
               "speedup_vs_masked_dense": best["masked_dense"][1]["median_ms"] / best["stripe"][1]["median_ms"]}
        results.append(row)
    layers = layer_latency(model, (args.batch_size[-1], *chw), device, repeats=args.repeats, layouts=layouts) \
        if args.layers else []
    out = {"path": str(args.model_path), "environment": env, "input_chw": chw, "fuse_bn": args.fuse_bn,
           "reordered": reordered, "results": results, "layers": layers}
    if args.json:
        print(json.dumps(out, indent=1))
    else:
        print(f"{args.model_path} on {device} ({env['threads']} threads, load {env.get('loadavg_1m', '?')}), "
              f"median ms, fastest of layouts {'/'.join(layouts)}{', BatchNorm folded' if args.fuse_bn else ''}:")
        if reordered is not None:
            print(f"filters in tile order in {sum(r is None for r in reordered.values())} of {len(reordered)} "
                  "StripeConv2d layers (the others feed residual sums, concatenations or the output)")
        print(f"{'batch':>6} {'dense':>14} {'dense shapes':>14} {'stripe':>14} {'speedup':>8}")
        c = lambda r, n: f"{r[n + '_ms']:.3f} {r[n + '_layout'].upper()}"  # noqa: E731
        for r in results:
            print(f"{r['batch']:>6} {c(r, 'dense'):>14} {c(r, 'masked_dense'):>14} {c(r, 'stripe'):>14} "
                  f"{r['speedup']:>7.2f}x")
        print("dense: the unpruned network; dense shapes: the pruned network's shapes as dense nn.Conv2d; "
              "speedup = dense / stripe")
        for r in layers:
            print(f"  {r['layer']:<24} density {r['density']:.3f}  dense {r['dense_ms']:.3f} ms  stripe "
                  f"{r['stripe_ms']:.3f} ms  {r['speedup']:.2f}x (1/density {r['ideal_speedup']:.2f}x, "
                  f"GPU tile eff. {r['gpu_tile_efficiency']:.2f})")
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(out, indent=1))
    return 0


def _device(name) -> torch.device:
    """``--device``: the named device, or with ``auto`` a GPU when there is one."""
    return torch.device(name) if name not in (None, "auto") else \
        torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _input_chw(desc: dict, args) -> list:
    """``[C, H, W]``: ``--input-size``, else the input size recorded with the saved model."""
    recorded = desc.get("extra", {}).get("input_size")
    if args.input_size:
        chw = list(args.input_size)
        if recorded and len(recorded) == 4 and chw[0] != recorded[1]:
            raise CLIError(f"--input-size {' '.join(map(str, chw))}: {args.model_path} takes {recorded[1]}-channel "
                           f"images (recorded input size {' '.join(map(str, recorded[1:]))})")
        return chw
    if not recorded:
        raise CLIError("the saved model does not record its input size: pass --input-size C H W")
    return list(recorded)[1:]


def _check_runs(model, chw: list, device) -> None:
    """One forward at batch 1 before any timing or export: an input the model cannot take (wrong channel
    count, an image too small for its pooling) is the user's error, not a traceback from deep inside."""
    x = torch.randn(1, *chw, device=device)
    try:
        with torch.no_grad():
            model.eval()(x)
    except (RuntimeError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CLIError(f"the model cannot run on input [batch, {', '.join(map(str, chw))}] ({first}); "
                       "pass --input-size C H W that it accepts") from None
