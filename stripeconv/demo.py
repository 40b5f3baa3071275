"""The end-to-end demo: ``stripeconv demo`` (or ``python -m stripeconv.demo``).

1. data: real Fashion-MNIST (the installed IDX files, a 6000 / 2000 image subset by default), or,
   when the dataset is not installed, the 2000 + 500 images shipped inside the package;
2. trains a small CNN (``cnn-small``: VGG-style, 16-32-32-64-64 channels) for a few epochs;
3. prunes it with SWP (stripe-wise pruning) to a FLOPs-reduction target (0.55 by default);
4. exports it to ``StripeConv2d`` layers (dead filters removed) and saves it with
   :func:`stripeconv.artifacts.save_pruned` (``pruned.pt`` + ``pruned.json``);
5. measures latency dense vs stripe on this device, per layer and for the whole model;
6. writes ``report.md`` (+ ``report.png`` when matplotlib is installed), ``metrics.jsonl`` and
   ``summary.json`` into ``--out`` and prints the report's main numbers.

Every training phase checkpoints each epoch: ``stripeconv demo --resume`` continues a killed demo.
"""
from __future__ import annotations

import copy
import json
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

import torch

__all__ = ["run_demo", "main", "DEMO_MODEL"]

DEMO_MODEL = "cnn-small"


def _say(msg: str, quiet: bool) -> None:
    if not quiet:
        print(msg, flush=True)


def _demo_data(data: Optional[str], train_size: Optional[int], test_size: Optional[int], seed: int, quiet: bool):
    from .data import DatasetNotFoundError, fashion_mnist
    from .data.embedded import SUBSET_PATH, fashion_mnist_subset

    try:
        tr = fashion_mnist(data, train=True, limit=train_size or 6000, seed=seed)
        te = fashion_mnist(data, train=False, limit=test_size or 2000, seed=seed)
        where = data or "the installed dataset"
        spec = {"dataset": "fashion-mnist", "data": data, "limit_train": train_size or 6000,
                "limit_test": test_size or 2000, "seed": seed}
        _say(f"data: Fashion-MNIST from {where}: {len(tr)} train / {len(te)} test images (class-balanced subsets)",
             quiet)
    except DatasetNotFoundError as e:
        if data is not None:
            raise
        tr = fashion_mnist_subset(train=True, limit=train_size)
        te = fashion_mnist_subset(train=False, limit=test_size)
        spec = {"dataset": "fashion-mnist-subset", "data": None, "limit_train": train_size, "limit_test": test_size,
                "seed": seed}
        _say(f"data: Fashion-MNIST is not installed ({str(e).split('(')[0].strip()}); using the subset shipped with "
             f"stripeconv ({SUBSET_PATH.name}): {len(tr)} train / {len(te)} test images. For the full dataset: "
             "apt-get install dataset-fashion-mnist, or --data PATH.", quiet)
    return tr, te, spec


def _step_time(model, x, y, threads: int, reps: int = 3) -> float:
    import torch.nn.functional as F

    torch.set_num_threads(threads)
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        times.append(time.perf_counter() - t)
    model.zero_grad(set_to_none=True)
    return min(times)


def pick_threads(model, dataset, quiet: bool) -> int:
    """Time a training step with torch's thread count and with one thread; keep the faster.

    On a shared machine whose cores are busy, several OpenMP threads wait for descheduled
    siblings and a step can take 5-10x longer than with one thread.
    """
    default = torch.get_num_threads()
    if default <= 1:
        return default
    x = torch.stack([dataset[i][0] for i in range(64)])
    y = torch.stack([torch.as_tensor(dataset[i][1]) for i in range(64)])
    state = copy.deepcopy(model.state_dict())
    _step_time(model, x, y, default, 1)  # warm-up
    many, one = _step_time(model, x, y, default), _step_time(model, x, y, 1)
    model.load_state_dict(state)  # BN statistics moved: put them back
    best = default if many <= one else 1
    torch.set_num_threads(best)
    _say(f"      threads: a training step takes {1e3 * many:.0f} ms with {default} threads, {1e3 * one:.0f} ms with 1 "
         f"(machine {'busy' if best == 1 else 'free'}): training with {best} (--threads N forces N)", quiet)
    return best


def _training_threads(out_dir: Path, resume: bool, model, dataset, quiet: bool) -> int:
    """The thread count of the whole run: picked once by timing, and read back on ``--resume``.

    CPU kernels sum in an order that depends on the thread count, so a run that changed it between
    epochs, or a resume that picked again under another load, would not reproduce its own numbers.
    """
    record = out_dir / "threads.json"
    if resume and record.exists():
        count = int(json.loads(record.read_text())["threads"])
        torch.set_num_threads(count)
        _say(f"      threads: {count}, as the run being resumed", quiet)
        return count
    count = pick_threads(model, dataset, quiet)
    record.write_text(json.dumps({"threads": count}) + "\n")
    return count


def run_demo(out: str = "stripeconv-demo", data: Optional[str] = None, train_size: Optional[int] = None,
             test_size: Optional[int] = None, epochs: int = 3, prune_epochs: int = 4, target: float = 0.55,
             seed: int = 0, bench_batch: int = 64, bench_threads: Optional[int] = 1, quiet: bool = False,
             progress: bool = True, resume: bool = False,
             threads: Optional[int] = None, device: Optional[str] = None, quick: bool = False,
             lr: float = 0.05, prune_lr: float = 0.02, alpha: float = 1e-4) -> dict:
    """Run the demo; returns the summary (also written to ``<out>/summary.json``)."""
    from .artifacts import save_pruned
    from .cli import build_model
    from .engine import Engine, MetricsLog, evaluate_model
    from .pruning import SWP
    from .report import LAYOUTS, dense_counterpart, environment, layer_latency, model_latency, write_report

    t_start = time.perf_counter()
    default_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    dev = torch.device("cuda" if (device in (None, "auto") and torch.cuda.is_available()) else
                       (device if device not in (None, "auto") else "cpu"))
    if quick:
        train_size, test_size = train_size or 512, test_size or 256
        epochs, prune_epochs = min(epochs, 1), min(prune_epochs, 2)
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    train, test, spec = _demo_data(data, train_size, test_size, seed, quiet)
    model, arch, arch_kwargs = build_model(DEMO_MODEL, 10, 1)
    model.to(dev)
    input_size = (1, 1, 28, 28)
    if not threads and dev.type == "cpu" and default_threads > 1:
        _training_threads(out_dir, resume, model, train, quiet)
    common = dict(batch_size=64, seed=seed, out_dir=out_dir, resume=resume, progress=progress and not quiet,
                  quiet=quiet)
    if not resume:
        MetricsLog(out_dir / "metrics.jsonl").path.unlink(missing_ok=True)

    # 1. baseline
    _say(f"[1/4] training the baseline {DEMO_MODEL} ({arch}, cfg {arch_kwargs['cfg']}) for {epochs} epochs on {dev}",
         quiet)
    # what a --resume must share with the run that wrote the checkpoints (the engine compares them): a demo
    # resumed with another --target, --seed or data size would mix two runs and report the new settings
    data_meta = {k: spec.get(k) for k in ("dataset", "limit_train", "seed")}
    base_engine = Engine(model, train, epochs=epochs, eval_data=test, phase="train", lr=lr, schedule="cosine",
                         meta={"data": data_meta, "lr": lr}, **common)
    base_engine.run()
    before = evaluate_model(model, test, dev)
    baseline = copy.deepcopy(model).eval()
    _say(f"      baseline test accuracy {before['accuracy']:.4f}", quiet)

    # 2. SWP
    _say(f"[2/4] pruning with SWP to a {target:.0%} FLOPs reduction over {prune_epochs} epochs "
         f"(alpha={alpha}, target reached at half of them, then recovery)", quiet)
    model.train()
    pruner = SWP(model, input_size=input_size, target_flops_reduction=target, epochs=prune_epochs, alpha=alpha)
    prune_engine = Engine(model, train, pruner=pruner, epochs=prune_epochs, eval_data=test, phase="prune",
                          lr=prune_lr, schedule="cosine",
                          meta={"method": "SWP", "data": data_meta, "lr": prune_lr, "target": target, "alpha": alpha},
                          **common)
    prune_engine.run()

    # 3. export + save
    exported = pruner.export().eval()
    after = evaluate_model(exported, test, dev)
    rep = pruner.report(exported)
    save_pruned(exported, out_dir / "pruned", arch, arch_kwargs, extra={
        "data": spec, "input_size": list(input_size), "num_classes": 10, "accuracy": after["accuracy"],
        "accuracy_before": before["accuracy"], "method": "SWP", "phase": "demo",
        "flops_reduction": rep["flops_reduction"], "params_reduction": rep["params_reduction"]})
    _say(f"[3/4] exported to StripeConv2d: test accuracy {after['accuracy']:.4f}, FLOPs -{rep['flops_reduction']:.1%}, "
         f"params -{rep['params_reduction']:.1%}; saved {out_dir / 'pruned'}.pt/.json", quiet)

    # 4. latency
    train_threads = torch.get_num_threads()
    if bench_threads and dev.type == "cpu":
        torch.set_num_threads(bench_threads)
    _say(f"[4/4] timing dense vs stripe on {dev} (batch {bench_batch}, {torch.get_num_threads()} CPU thread(s))", quiet)
    shape = (bench_batch, 1, 28, 28)
    reps = 10 if quick else 30
    try:
        lat = model_latency({"dense": baseline, "masked_dense": dense_counterpart(exported), "stripe": exported},
                            shape, dev, repeats=reps, layouts=LAYOUTS)
        lat.update(input_shape=list(shape), device=str(dev))
        layers = layer_latency(exported, shape, dev, repeats=reps, layouts=LAYOUTS)
        env = environment(dev)
    finally:
        torch.set_num_threads(default_threads if not threads else train_threads)
    elapsed = time.perf_counter() - t_start
    notes = [
        f"Data: {spec['dataset']} ({len(train)} training / {len(test)} test images).",
        "Accuracy 'after' is the exported StripeConv2d model's, evaluated as saved (stripeconv eval "
        f"{out_dir / 'pruned'} reproduces it).",
        "FLOPs count 2 x multiply-adds of convs and linear layers at batch 1 (stripeconv.profile).",
        f"Latency: inference without gradients, {env['threads']} CPU thread(s), medians of call-by-call interleaved "
        f"runs on random inputs. The 1-minute load average was {env.get('loadavg_1m', '?')} on "
        f"{env.get('cpu_count')} CPUs; on a shared machine multi-threaded timings are erratic (threads wait for "
        "descheduled siblings), hence the single-thread default (`stripeconv demo --bench-threads N` to change it; "
        "`stripeconv bench` times any saved model).",
        f"Demo wall time: {elapsed:.0f} s.",
    ]
    summary = {
        "title": "stripeconv demo: SWP on Fashion-MNIST",
        "description": f"A small CNN ({DEMO_MODEL}) trained for {epochs} epochs, pruned with SWP "
                       f"(stripe-wise pruning) for {prune_epochs} epochs to a {target:.0%} FLOPs-reduction target, "
                       "exported to StripeConv2d.",
        "method": "SWP", "dataset": spec["dataset"], "accuracy_before": before["accuracy"],
        "accuracy_after": after["accuracy"], "prune_report": rep, "layers": layers, "latency": lat,
        "history": base_engine.history + prune_engine.history, "environment": env, "notes": notes,
        "files": ["report.md", "report.png", "metrics.jsonl", "pruned.pt", "pruned.json", "train.ckpt", "prune.ckpt",
                  "summary.json"],
        "elapsed_s": elapsed,
    }
    written = write_report(out_dir, summary)
    if written["plot"] is None:  # no matplotlib: the report says so; do not list the missing file
        summary["files"].remove("report.png")
        written = write_report(out_dir, summary)
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    log = MetricsLog(out_dir / "metrics.jsonl")
    log.truncate("demo", 0)  # a --resume of a finished demo replaces its record
    log.write({
        "phase": "demo", "event": "done", "accuracy_before": before["accuracy"], "accuracy_after": after["accuracy"],
        "flops_reduction": rep["flops_reduction"], "params_reduction": rep["params_reduction"],
        "latency_dense_ms": lat["dense"]["median_ms"], "latency_stripe_ms": lat["stripe"]["median_ms"],
        "elapsed_s": elapsed})
    print(_console_summary(summary, written, out_dir), flush=True)
    return summary


def _console_summary(s: dict, written: dict, out_dir: Path) -> str:
    from .report import best_of

    rep, lat = s["prune_report"], s["latency"]
    t = {k: v for k, v in lat.items() if isinstance(v, dict)}
    (dk, d), (mk, md), (sk, st) = (best_of(t, n) for n in ("dense", "masked_dense", "stripe"))
    lay = lambda k: (k.partition("@")[2] or "nchw").upper()  # noqa: E731
    lines = [
        "",
        "=== stripeconv demo: SWP on Fashion-MNIST ===",
        f"test accuracy     {s['accuracy_before']:.4f} (dense) -> {s['accuracy_after']:.4f} (pruned, exported)",
        f"FLOPs             {rep['flops_dense'] / 1e6:.2f} M -> {rep['flops'] / 1e6:.2f} M  "
        f"(-{rep['flops_reduction']:.1%})",
        f"parameters        {rep['params_dense']:,} -> {rep['params']:,}  (-{rep['params_reduction']:.1%})",
        f"latency, batch {lat['input_shape'][0]} on {lat['device']} ({s['environment']['threads']} thread(s), fastest "
        f"layout of each): dense {d['median_ms']:.2f} ms ({lay(dk)}), pruned shapes as dense convs "
        f"{md['median_ms']:.2f} ms ({lay(mk)}), StripeConv2d {st['median_ms']:.2f} ms ({lay(sk)})  -> "
        f"{d['median_ms'] / st['median_ms']:.2f}x vs dense",
        "per layer:        density  dense ms  stripe ms  speedup  (1/density)",
    ]
    for r in s["layers"]:
        lines.append(f"  {r['layer']:<14} {r['density']:7.3f}  {r['dense_ms']:8.3f}  {r['stripe_ms']:9.3f}  "
                     f"{r['speedup']:6.2f}x  ({r['ideal_speedup']:.2f}x)")
    lines.append(f"report: {written['report']}" + (f", plot: {written['plot']}" if written["plot"] else
                                                    f" ({written['plot_note']})" if written["plot_note"] else ""))
    lines.append(f"model:  {out_dir / 'pruned'}.pt/.json  (stripeconv.artifacts.load_pruned; "
                 f"`stripeconv eval {out_dir / 'pruned'}`)")
    lines.append(f"time:   {s['elapsed_s']:.0f} s")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``stripeconv demo`` with the options ``argv`` (default ``sys.argv[1:]``); returns its exit status."""
    from .cli import main as cli_main

    return cli_main(["demo", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
