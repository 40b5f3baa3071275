"""Latency measurements of exported models and the Markdown report (+ plot) of a pruning run.

- :func:`measure` times a callable (warm-up, several random inputs rotated, median and spread);
- :func:`dense_counterpart` turns an exported model's ``StripeConv2d`` layers back into dense
  ``nn.Conv2d`` (same shapes, zeros at pruned stripes): what the pruned network costs without
  stripe kernels;
- :func:`model_latency` and :func:`layer_latency` compare stripe and dense on this device;
- :func:`write_report` writes ``report.md`` and, when matplotlib is installed, ``report.png``
  (per-layer stripe density and per-layer speedup).
"""
from __future__ import annotations

import copy
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import torch
from torch import nn

from .backends import triton_plans
from .nn import StripeConv2d

__all__ = ["measure", "measure_interleaved", "best_of", "LAYOUTS", "dense_counterpart", "model_latency",
           "layer_latency", "environment", "write_report",
           "plot_layers", "markdown_table"]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def measure(fn: Callable, inputs: Sequence, repeats: int = 20, warmup: int = 3,
            min_time_s: float = 0.0, device: Optional[torch.device] = None) -> dict:
    """Time ``fn(x)`` over ``inputs`` (rotated so caches do not flatter); milliseconds per call.

    Returns ``median_ms``, ``p10_ms``, ``p90_ms``, ``min_ms`` and ``runs``.
    """
    device = device or (inputs[0].device if isinstance(inputs[0], torch.Tensor) else torch.device("cpu"))
    for i in range(warmup):
        fn(inputs[i % len(inputs)])
    _sync(device)
    times: list[float] = []
    start_all = time.perf_counter()
    i = 0
    while len(times) < repeats or (time.perf_counter() - start_all) < min_time_s:
        x = inputs[i % len(inputs)]
        t = time.perf_counter()
        fn(x)
        _sync(device)
        times.append((time.perf_counter() - t) * 1e3)
        i += 1
        if len(times) >= 10 * repeats:
            break
    times.sort()
    q = lambda f: times[min(len(times) - 1, int(f * len(times)))]  # noqa: E731
    return {"median_ms": statistics.median(times), "p10_ms": q(0.1), "p90_ms": q(0.9), "min_ms": times[0],
            "runs": len(times)}


def dense_counterpart(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose ``StripeConv2d`` layers are dense ``nn.Conv2d`` of the same shape.

    It is the speed reference: a folded constant channel (``constant_channel_weight``, a
    bias-sized term) is left out, so outputs may differ at zero-padded borders.
    """
    model = copy.deepcopy(model)
    for name, m in list(model.named_modules()):
        if isinstance(m, StripeConv2d):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child,
                    m.to_conv(ignore_constant_channel=True))
    return model


def _inputs(shape, device, dtype=torch.float32, count: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(tuple(shape), generator=g, dtype=dtype).to(device) for _ in range(count)]


@torch.no_grad()
def measure_interleaved(fns: dict[str, Callable], inputs: Union[Sequence, dict[str, Sequence]], repeats: int = 20,
                        warmup: int = 3, device: Optional[torch.device] = None) -> dict:
    """Time several callables, one call of each in turn (round robin).

    ``inputs``: a list of inputs shared by all callables, or a dict name -> list (e.g. the same
    tensors in another memory format). Interleaving call by call makes a change of machine load
    hit every callable alike, which matters on shared machines. Returns name -> ``median_ms``,
    ``p10_ms``, ``p90_ms``, ``min_ms``, ``runs``.
    """
    per = inputs if isinstance(inputs, dict) else {n: inputs for n in fns}
    first = next(iter(per.values()))[0]
    device = device or (first.device if isinstance(first, torch.Tensor) else torch.device("cpu"))
    for n, fn in fns.items():
        for i in range(warmup):
            fn(per[n][i % len(per[n])])
    _sync(device)
    times: dict[str, list] = {n: [] for n in fns}
    names = list(fns)
    for i in range(repeats):
        order = names if i % 2 == 0 else names[::-1]  # alternate who goes first
        for n in order:
            x = per[n][i % len(per[n])]
            t = time.perf_counter()
            fns[n](x)
            _sync(device)
            times[n].append((time.perf_counter() - t) * 1e3)
    out = {}
    for n, ts in times.items():
        ts.sort()
        q = lambda f: ts[min(len(ts) - 1, int(f * len(ts)))]  # noqa: E731
        out[n] = {"median_ms": statistics.median(ts), "p10_ms": q(0.1), "p90_ms": q(0.9), "min_ms": ts[0],
                  "runs": len(ts)}
    return out


LAYOUTS = ("nchw", "nhwc")


def _prepare(models: dict, xs: list, layouts: Sequence[str]):
    fns, inputs = {}, {}
    for name, m in models.items():
        for lay in layouts:
            key = name if lay == "nchw" else f"{name}@{lay}"
            if lay == "nhwc":
                mm = copy.deepcopy(m).to(memory_format=torch.channels_last)
                inputs[key] = [x.contiguous(memory_format=torch.channels_last) for x in xs]
            else:
                mm = m
                inputs[key] = xs
            fns[key] = mm
    return fns, inputs


def best_of(results: dict, name: str) -> tuple[str, dict]:
    """The fastest layout of ``name`` in a :func:`model_latency` result: (key, stats)."""
    keys = [k for k in results if k == name or k.startswith(name + "@")]
    k = min(keys, key=lambda k: results[k]["median_ms"])
    return k, results[k]


def model_latency(models: dict, input_shape: Sequence[int], device: Union[str, torch.device] = "cpu", repeats: int = 20,
                  warmup: int = 3, min_time_s: float = 0.0, channels_last: bool = False,
                  layouts: Optional[Sequence[str]] = None) -> dict:
    """Median latency of each model (name -> module) on random inputs of ``input_shape`` (batch included).

    ``layouts``: memory formats to time each model in, ``"nchw"`` (contiguous) and/or ``"nhwc"``
    (channels_last; result keys get ``@nhwc``); default NCHW only, or NHWC only with
    ``channels_last``. Models are timed call by call in turn (:func:`measure_interleaved`), so
    machine load drifts affect them alike. ``min_time_s`` raises the number of calls so that
    timing lasts about that long.
    """
    device = torch.device(device)
    layouts = tuple(layouts) if layouts else (("nhwc",) if channels_last else ("nchw",))
    xs = _inputs(input_shape, device)
    fns, inputs = _prepare({n: m.to(device).eval() for n, m in models.items()}, xs, layouts)
    if min_time_s > 0:
        probe = measure_interleaved(fns, inputs, repeats=2, warmup=1, device=device)
        per_round = sum(r["median_ms"] for r in probe.values()) / 1e3
        repeats = max(repeats, int(min_time_s / max(per_round, 1e-6)))
    return measure_interleaved(fns, inputs, repeats=repeats, warmup=warmup, device=device)


@torch.no_grad()
def layer_latency(model: nn.Module, input_shape: Sequence[int], device: Union[str, torch.device] = "cpu",
                  repeats: int = 20, warmup: int = 3, layouts: Sequence[str] = ("nchw",)) -> list[dict]:
    """Per ``StripeConv2d`` layer of ``model``: stripe vs dense (``to_conv()``) latency on its real input shape.

    With several ``layouts`` each side is timed in each and its fastest counts (``dense_layout``,
    ``stripe_layout`` say which).
    """
    device = torch.device(device)
    model = model.to(device).eval()
    shapes: dict[str, tuple] = {}

    def hook(name):
        def fn(mod, inp, out):
            shapes.setdefault(name, tuple(inp[0].shape))  # returns None: the output is left alone
        return fn

    handles = [m.register_forward_hook(hook(name)) for name, m in model.named_modules() if isinstance(m, StripeConv2d)]
    try:
        model(_inputs(input_shape, device, count=1)[0])
    finally:
        for h in handles:
            h.remove()
    rows = []
    modules = dict(model.named_modules())
    for name, shape in shapes.items():
        layer = modules[name]
        dense = layer.to_conv(ignore_constant_channel=True).to(device).eval()
        fns, inputs = _prepare({"dense": dense, "stripe": layer}, _inputs(shape, device, count=3, seed=1), layouts)
        r = measure_interleaved(fns, inputs, repeats, warmup, device=device)
        dk, d = best_of(r, "dense")
        sk, st = best_of(r, "stripe")
        rows.append({
            "layer": name, "in_channels": layer.in_channels, "out_channels": layer.out_channels,
            "input_shape": list(shape), "density": layer.density, "stripes": layer.num_stripes,
            "dense_ms": d["median_ms"], "stripe_ms": st["median_ms"], "speedup": d["median_ms"] / st["median_ms"],
            "ideal_speedup": 1.0 / layer.density if layer.density else float("inf"),
            "gpu_tile_efficiency": triton_plans.best_tile_efficiency(layer.stripe_mask.cpu(), layer.groups),
            "dense_layout": dk.partition("@")[2] or "nchw", "stripe_layout": sk.partition("@")[2] or "nchw",
        })
    return rows


def environment(device: Union[str, torch.device] = "cpu") -> dict:
    """What the timings depend on: device, threads, load average, versions, backend."""
    import stripeconv

    device = torch.device(device)
    env = {"device": str(device), "torch": torch.__version__, "stripeconv": stripeconv.__version__,
           "python": platform.python_version(), "machine": platform.machine(), "threads": torch.get_num_threads(),
           "cpu_count": os.cpu_count()}
    try:
        env["backend"] = stripeconv.get_backend() or "default"
    except Exception:  # pragma: no cover
        pass
    try:
        env["loadavg_1m"] = round(os.getloadavg()[0], 2)
    except OSError:  # pragma: no cover
        pass
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    return env


def markdown_table(rows: list, columns: list) -> str:
    """``columns``: (header, key, format) triples."""
    head = "| " + " | ".join(h for h, _, _ in columns) + " |"
    sep = "|" + "|".join("---" if i == 0 else "---:" for i in range(len(columns))) + "|"
    lines = [head, sep]
    for r in rows:
        cells = []
        for _, key, fmt in columns:
            v = r.get(key, "")
            cells.append(fmt.format(v) if fmt and v != "" and v is not None else str(v))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_layers(rows: list, path: Union[str, os.PathLike], title: str = "") -> Optional[Path]:
    """Bar charts of per-layer stripe density and stripe-vs-dense speedup; ``None`` without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    names = [r["layer"] for r in rows]
    xs = range(len(rows))
    fig, axes = plt.subplots(1, 2, figsize=(max(8, 1.1 * len(rows) + 4), 4))
    axes[0].bar(xs, [r["density"] for r in rows], color="tab:blue")
    axes[0].set_ylabel("kept stripes / all stripes")
    axes[0].set_ylim(0, 1)
    axes[0].set_title("stripe density per layer")
    axes[1].bar([x - 0.2 for x in xs], [r["speedup"] for r in rows], width=0.4, label="measured", color="tab:green")
    axes[1].bar([x + 0.2 for x in xs], [r["ideal_speedup"] for r in rows], width=0.4, label="1 / density",
                color="tab:gray", alpha=0.6)
    axes[1].axhline(1.0, color="k", lw=0.8)
    axes[1].set_ylabel("dense time / stripe time")
    axes[1].set_title("speedup per layer")
    axes[1].legend(loc="best", fontsize=8, framealpha=0.8)
    for ax in axes:
        ax.set_xticks(list(xs))
        ax.set_xticklabels(names, rotation=45, ha="right", fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _pct(x: Optional[float]) -> str:
    return "n/a" if x is None else f"{100 * x:.1f} %"


def write_report(out_dir: Union[str, os.PathLike], summary: dict, plot: bool = True) -> dict:
    """Write ``report.md`` (and ``report.png`` when matplotlib is there) from a run summary.

    ``summary`` keys (all optional except ``title``): ``title``, ``method``, ``dataset``,
    ``accuracy_before``, ``accuracy_after``, ``prune_report`` (:meth:`Pruner.report`),
    ``layers`` (:func:`layer_latency` rows), ``latency`` (:func:`model_latency` result with
    ``input_shape``), ``environment``, ``notes`` (list of lines), ``files``.
    Returns ``{"report": path, "plot": path or None, "plot_note": str}``.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = summary.get("layers") or []
    plot_path, plot_note = None, ""
    if plot and rows:
        plot_path = plot_layers(rows, out_dir / "report.png", summary.get("title", ""))
        if plot_path is None:
            plot_note = "matplotlib is not installed: plot skipped (pip install matplotlib)"
    L = [f"# {summary.get('title', 'stripeconv report')}", ""]
    if summary.get("description"):
        L += [summary["description"], ""]
    pr = summary.get("prune_report") or {}
    L += ["## Result", "", "| | before | after | change |", "|---|---:|---:|---:|"]
    a0, a1 = summary.get("accuracy_before"), summary.get("accuracy_after")
    if a0 is not None and a1 is not None:
        L.append(f"| test accuracy | {100 * a0:.2f} % | {100 * a1:.2f} % | {100 * (a1 - a0):+.2f} pt |")
    if pr:
        L.append(f"| FLOPs (per image) | {pr['flops_dense'] / 1e6:.2f} M | {pr['flops'] / 1e6:.2f} M | "
                 f"-{_pct(pr['flops_reduction'])} |")
        L.append(f"| parameters | {pr['params_dense']:,} | {pr['params']:,} | -{_pct(pr['params_reduction'])} |")
    lat = summary.get("latency")
    if lat and "dense" in lat and "stripe" in lat:
        (_, d), (_, st) = best_of(_timings(lat), "dense"), best_of(_timings(lat), "stripe")
        L.append(f"| latency, batch {lat['input_shape'][0]} ({lat.get('device', 'cpu')}; fastest layout of each) | "
                 f"{d['median_ms']:.2f} ms | {st['median_ms']:.2f} ms | {d['median_ms'] / st['median_ms']:.2f}x |")
    L.append("")
    if lat:
        t = _timings(lat)
        base = best_of(t, "dense")[1]["median_ms"] if "dense" in t else None
        L += ["## Whole-model latency", "",
              f"Input {tuple(lat['input_shape'])}, inference without gradients, median of call-by-call interleaved "
              "runs (p10-p90); NHWC = channels_last weights and inputs. Speedup is against the fastest dense run.", "",
              "| model | layout | median ms | p10-p90 ms | speedup |", "|---|---|---:|---:|---:|"]
        labels = {"dense": "dense: the unpruned network (nn.Conv2d)",
                  "masked_dense": "pruned shapes as dense nn.Conv2d (zeros at pruned stripes)",
                  "stripe": "exported (StripeConv2d)"}
        for key, r in t.items():
            name, _, lay = key.partition("@")
            sp = f"{base / r['median_ms']:.2f}x" if base else ""
            L.append(f"| {labels.get(name, name)} | {(lay or 'nchw').upper()} | {r['median_ms']:.2f} | "
                     f"{r['p10_ms']:.2f}-{r['p90_ms']:.2f} | {sp} |")
        L.append("")
    if rows:
        L += ["## Per layer", "",
              "Stripe density = kept stripes / all stripes of the layer; latency of the layer alone on its input "
              "shape, StripeConv2d vs the same layer as a dense nn.Conv2d, each in its fastest layout. GPU tile "
              "eff. = kept / computed stripes of the GPU forward kernel's filter tiles (1 = no waste; the GPU "
              "speedup cannot exceed eff. / density).", "",
              _layer_table(rows), ""]
    if plot_path is not None:
        L += [f"![per-layer density and speedup]({plot_path.name})", ""]
    elif plot_note:
        L += [f"_{plot_note}_", ""]
    if pr.get("stripe_density") and not rows:
        eff = pr.get("gpu_tile_efficiency") or {}
        L += ["## Stripe density per pruned layer (before removing dead filters)", "",
              "GPU tile eff. = kept / computed stripes of the GPU forward kernel's filter tiles in the exported "
              "layer (1 = no waste; the GPU speedup cannot exceed eff. / density).", "",
              "| layer | density | GPU tile eff. |", "|---|---:|---:|"]
        L += [f"| {k} | {v:.3f} | {'' if k not in eff else f'{eff[k]:.2f}'} |"
              for k, v in pr["stripe_density"].items()] + [""]
    hist = summary.get("history")
    if hist:
        L += ["## Training", "", "| phase | epoch | train loss | train acc | eval acc | FLOPs red. | density | s |",
              "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for r in hist:
            if "train_loss" not in r:
                continue
            fr = "" if "flops_reduction" not in r else f"{100 * r['flops_reduction']:.1f} %"
            de = "" if "density" not in r else f"{r['density']:.3f}"
            ev = "" if "eval_accuracy" not in r else f"{r['eval_accuracy']:.4f}"
            L.append(f"| {r.get('phase', '')} | {r['epoch'] + 1} | {r['train_loss']:.4f} | {r['train_accuracy']:.4f} | "
                     f"{ev} | {fr} | {de} | {r.get('time_s', 0):.1f} |")
        L.append("")
    env = summary.get("environment")
    if env:
        L += ["## Environment", "", "| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in env.items()] + [""]
    notes = summary.get("notes") or []
    if notes:
        L += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
    files = summary.get("files")
    if files:
        L += ["## Files", ""] + [f"- `{f}`" for f in files] + [""]
    path = out_dir / "report.md"
    path.write_text("\n".join(L))
    return {"report": path, "plot": plot_path, "plot_note": plot_note}


def _timings(lat: dict) -> dict:
    return {k: v for k, v in lat.items() if isinstance(v, dict) and "median_ms" in v}


def _layer_table(rows: list) -> str:
    lines = ["| layer | in -> out | density | dense ms | stripe ms | speedup | 1/density | GPU tile eff. |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        dl, sl = r.get("dense_layout", "nchw").upper(), r.get("stripe_layout", "nchw").upper()
        eff = r.get("gpu_tile_efficiency")
        lines.append(f"| {r['layer']} | {r['in_channels']} -> {r['out_channels']} | {r['density']:.3f} | "
                     f"{r['dense_ms']:.3f} ({dl}) | {r['stripe_ms']:.3f} ({sl}) | {r['speedup']:.2f}x | "
                     f"{r['ideal_speedup']:.2f}x | {'' if eff is None else f'{eff:.2f}'} |")
    return "\n".join(lines)
