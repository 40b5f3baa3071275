"""Fidelity of every pruning method on Fashion-MNIST (seeded, CPU).

Trains a small VGG-style net and a ResNet-20 on Fashion-MNIST, prunes each with every method at
two FLOPs budgets, and writes bench/results/fashion_fidelity.{md,json}: accuracy before/after,
FLOPs and params reduction of the exported model (stripeconv.profile), and measured CPU latency
of the exported model vs the dense model.

Full run (~30-40 min on 2 cores):  python bench/fashion_fidelity.py
Smoke run (~3 min):                python bench/fashion_fidelity.py --quick
Add or re-measure methods:         python bench/fashion_fidelity.py --methods OrthoReg --append
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import stripeconv  # noqa: E402
from stripeconv import models, pruning  # noqa: E402
from stripeconv.data import fashion_mnist  # noqa: E402
from stripeconv.profile import profile  # noqa: E402

ONE_SHOT = {"L1Filter", "L1Stripe", "LBS", "PFP", "MetaPruning", "ACP", "CPMC", "FunctionalityPruning"}
# MetaPruning's search, scaled to this benchmark (the public code: population 50, 20 iterations, 100 batches)
METAPRUNING_SEARCH = {"population": 20, "parents": 5, "iterations": 10, "recalib_batches": 20}
# ACP's swarm, scaled to this benchmark (the public code: 10 particles, 8 cycles, 3 epochs per candidate)
ACP_SEARCH = {"particles": 5, "cycles": 3, "fitness_steps": 20}


def _search_text() -> str:
    s = METAPRUNING_SEARCH
    return (f"population {s['population']}, {s['parents']} parents, {s['iterations']} iterations, "
            f"{s['recalib_batches']} BN recalibration batches")


def _acp_text() -> str:
    s = ACP_SEARCH
    return (f"{s['particles']} particles, {s['cycles']} cycles, {s['fitness_steps']} training batches per "
            f"candidate at the prune LR")


def latency_ms(models, x, reps) -> list:
    """Median forward time (ms) of each model, timed in turns (a, b, a, b, ...) so that a change of
    machine speed during the run affects them alike."""
    for m in models:
        m.eval()
    times = [[] for _ in models]
    with torch.no_grad():
        for _ in range(2):
            for m in models:
                m(x)
        for _ in range(reps):
            for m, t in zip(models, times):
                start = time.perf_counter()
                m(x)
                t.append((time.perf_counter() - start) * 1e3)
    return [statistics.median(t) for t in times]


ARCHS = ("vgg", "resnet20", "mobilenet_v2")


def make_model(arch, width):
    if arch == "vgg":
        return models.vgg(cfg=[32, 32, "M", 64, 64, "M", 128, 128, "M"], in_channels=1, width=width)
    if arch == "mobilenet_v2":
        return models.mobilenet_v2(in_channels=1, width=width)
    return models.resnet20(in_channels=1, width=width)


def parse_method(spec: str):
    """``"SWP"`` or ``"SWP:group_size=8,alpha=1e-5"`` -> (class, extra keyword arguments)."""
    name, _, rest = spec.partition(":")
    if name not in pruning.METHODS:
        raise SystemExit(f"unknown method {name!r}; expected one of {', '.join(pruning.METHODS)}")
    extra = {}
    for item in filter(None, rest.split(",")):
        key, eq, value = item.partition("=")
        if not eq:
            raise SystemExit(f"method option {item!r} in {spec!r} must be key=value")
        try:
            extra[key] = json.loads(value)
        except json.JSONDecodeError:
            extra[key] = value
    return name, pruning.METHODS[name], extra


def gpu_tile_efficiency(model, x) -> float:
    """Kept / computed stripes of the GPU forward kernel over the model's StripeConv2d layers,
    weighted by each layer's output pixels times input channels per group (its work per stripe),
    with the tile width the GPU dispatch would consider best (fewest computed stripes)."""
    from stripeconv.backends import triton_plans as tp

    kept = computed = 0.0
    hooks = []

    def hook(layer, inputs, output):
        nonlocal kept, computed
        mask = layer.stripe_mask.cpu()
        if not mask.any():
            return
        work = output.shape[-2] * output.shape[-1] * layer.in_channels // layer.groups
        kept += int(mask.sum()) * work
        computed += int(mask.sum()) / tp.best_tile_efficiency(mask, layer.groups) * work

    for module in model.modules():
        if isinstance(module, stripeconv.StripeConv2d):
            hooks.append(module.register_forward_hook(hook))
    try:
        model.eval()
        with torch.no_grad():
            model(x[:1])
    finally:
        for h in hooks:
            h.remove()
    return kept / computed if computed else 1.0


SETTINGS = ("train_size", "test_size", "pretrain_epochs", "prune_epochs", "finetune_epochs", "width", "batch_size",
            "lr", "latency_batch", "latency_reps", "threads", "seed")


def previous_rows(path: Path, args) -> list:
    """With ``--append``: the rows of an earlier run with the same settings (else an error)."""
    if not args.append or not path.exists():
        return []
    old = json.loads(path.read_text())
    differ = [k for k in SETTINGS if old["meta"]["args"].get(k) != getattr(args, k)]
    if differ:
        raise SystemExit(f"--append: {path} was measured with other settings ({', '.join(differ)}); "
                         "use the same ones or another --name")
    return old["rows"]


def merged_rows(previous: list, rows: list, archs: list) -> list:
    """Earlier rows, replaced where this run measured the same arch, method and budget; ordered by
    arch (as in ``ARCHS``), budget and the order of ``pruning.METHODS``."""
    key = lambda r: (r["arch"], r["method"], r["budget"])  # noqa: E731
    new = {key(r) for r in rows}
    every = [r for r in previous if key(r) not in new] + rows
    arch_order = {a: i for i, a in enumerate(dict.fromkeys([*ARCHS, *archs, *(r["arch"] for r in every)]))}
    method_order = {m: i for i, m in enumerate(pruning.METHODS)}
    return sorted(every, key=lambda r: (arch_order[r["arch"]], r["budget"],
                                        method_order.get(r["method"].partition(":")[0], len(method_order)), r["method"]))


def table(rows: list, args) -> str:
    lines = [f"# Fashion-MNIST pruning fidelity{' (quick)' if args.quick else ''}", "",
             f"torch {torch.__version__}, stripeconv backends {stripeconv.available_backends()}, {args.threads} threads, "
             f"train {args.train_size} / test {args.test_size}, pretrain {args.pretrain_epochs} + prune {args.prune_epochs} "
             f"epochs, then {args.finetune_epochs} fine-tuning epoch(s) of the exported model, width {args.width}, "
             f"seed {args.seed}; every training run shuffles with its own generator seeded {args.seed}, so a row "
             f"does not depend on which other rows were measured in the same run. "
             f"Pretraining: SGD at LR {args.lr}, cosine. 'dense, same epochs': the dense model trained "
             f"further exactly like the pruned ones (prune and fine-tuning epochs, same LRs), the fair "
             f"baseline for 'acc fine-tuned'. Each accuracy is measured on {args.test_size} test images: its "
             f"standard error near 85 % is {100 * math.sqrt(0.85 * 0.15 / args.test_size):.1f} points, so rows "
             f"closer than about two points are not told apart by this table. "
             f"FLOPs = 2 x multiply-adds (convs + linear). Latency: "
             f"median of {args.latency_reps} CPU forward passes, batch {args.latency_batch}, the dense and the pruned "
             f"model timed in turns (so 'dense ms' varies a little between rows). GPU tile eff.: kept / "
             f"computed stripes of the GPU forward kernel's tile plan (best tile width, work-weighted). "
             f"MetaPruning does not start from the pretrained model: its PruningNet trains from scratch for the "
             f"{args.pretrain_epochs} pretraining epochs, a search ({_search_text()}) picks the widths, and the "
             f"searched network is trained from scratch in the prune and fine-tuning epochs. "
             f"ACP's swarm is scaled down ({_acp_text()}); its best candidate then trains in the prune "
             f"epochs like the other one-shot methods. DAIS and DSA search in the first half of the prune steps "
             f"(on the held-out 10 % of the training data) and fine-tune with the channels fixed in the second. "
             f"SFP and ASFP collapse at export under this short schedule: the filters they zero regrow to a few "
             f"percent of the kept filters' output, the BatchNorm after each scales them back to full strength, "
             f"and the final zeroing removes channels the network still uses "
             f"(bench/soft_pruning_diagnosis.py, results in soft_pruning_diagnosis.md).", "",
             "| arch | method | budget | acc dense | dense, same epochs | acc at export | acc fine-tuned | FLOPs red. "
             "| params red. | dense ms | pruned ms | speedup | GPU tile eff. |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['arch']} | {r['method']} | {r['budget']:.0%} | {r['acc_dense']:.4f} | "
                     f"{r['acc_dense_same_epochs']:.4f} | {r['acc_at_export']:.4f} | {r['acc_pruned']:.4f} | "
                     f"{r['flops_reduction']:.1%} | {r['params_reduction']:.1%} | {r['latency_dense_ms']:.2f} | "
                     f"{r['latency_ms']:.2f} | {r['speedup']:.2f} | {r['gpu_tile_efficiency']:.2f} |")
    return "\n".join(lines) + "\n"


def sgd(model, lr):
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=1e-4)


def cosine(optimizer, epochs):
    return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, max(epochs, 1))


def shuffled(dataset, batch_size, seed):
    """A loader whose data order depends on the seed alone, so a run's result does not depend on
    which runs came before it in the same process."""
    return DataLoader(dataset, batch_size=batch_size, shuffle=True, generator=torch.Generator().manual_seed(seed))


def train_like_pruned(model, loader_for, args):
    """The training a pruned model gets after pretraining: prune epochs at half the LR (cosine),
    then the fine-tuning epochs at a tenth. Applied to the dense model, it gives the baseline
    with the same number of epochs."""
    opt = sgd(model, args.lr * 0.5)
    pruning.fit(model, None, loader_for(), args.prune_epochs, optimizer=opt, scheduler=cosine(opt, args.prune_epochs),
                progress=False)
    if args.finetune_epochs:
        pruning.fit(model, None, loader_for(), args.finetune_epochs, optimizer=sgd(model, args.lr * 0.1),
                    scheduler=None, progress=False)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny sizes, to check that the script works")
    ap.add_argument("--train-size", type=int, default=12000)
    ap.add_argument("--test-size", type=int, default=2000)
    ap.add_argument("--pretrain-epochs", type=int, default=4)
    ap.add_argument("--prune-epochs", type=int, default=3)
    ap.add_argument("--finetune-epochs", type=int, default=1,
                    help="epochs of fine-tuning the exported StripeConv2d model after pruning (every method alike)")
    ap.add_argument("--width", type=float, default=0.5)
    ap.add_argument("--budgets", type=float, nargs="+", default=[0.5, 0.7])
    ap.add_argument("--archs", nargs="+", choices=ARCHS, default=["vgg", "resnet20"])
    ap.add_argument("--methods", nargs="+", default=list(pruning.METHODS),
                    help="method names, optionally with options: SWP:group_size=8")
    ap.add_argument("--name", default="fashion_fidelity", help="stem of the output files")
    ap.add_argument("--append", action="store_true",
                    help="merge into an existing <name>.json measured with the same settings (rows of the same "
                         "arch, method and budget are replaced)")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--latency-batch", type=int, default=32)
    ap.add_argument("--latency-reps", type=int, default=30)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data-root", default=None)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = ap.parse_args(argv)
    if args.quick:
        args.train_size, args.test_size, args.pretrain_epochs, args.prune_epochs = 512, 256, 1, 2
        args.finetune_epochs = 1
        args.width, args.latency_reps, args.latency_batch = 0.25, 3, 8
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = args.name + ("_quick" if args.quick else "")
    previous = previous_rows(out / f"{stem}.json", args)
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    torch.manual_seed(args.seed)
    full_train = fashion_mnist(args.data_root, train=True, limit=args.train_size, seed=args.seed)
    test = fashion_mnist(args.data_root, train=False, limit=args.test_size, seed=args.seed)
    # LBS, DAIS and DSA measure losses on held-out *training* data, never on the test set; nothing trains on it.
    train, held_out = pruning.holdout_split(full_train, 0.1, seed=args.seed)
    def loader_for():
        return shuffled(train, args.batch_size, args.seed)

    train_loader = loader_for()  # for its length
    val_loader = DataLoader(held_out, batch_size=args.batch_size)
    test_loader = DataLoader(test, batch_size=256)
    size = (1, 1, 28, 28)
    xlat = test.tensors[0][: args.latency_batch]
    rows = []
    for arch in args.archs:
        torch.manual_seed(args.seed)
        base = make_model(arch, args.width)
        t0 = time.time()
        opt = sgd(base, args.lr)
        pruning.fit(base, None, loader_for(), args.pretrain_epochs, optimizer=opt,
                    scheduler=cosine(opt, args.pretrain_epochs), progress=False)
        base_acc = pruning.evaluate(base, test_loader)["accuracy"]
        longer = copy.deepcopy(base)
        torch.manual_seed(args.seed)
        train_like_pruned(longer, loader_for, args)
        same_epochs_acc = pruning.evaluate(longer, test_loader)["accuracy"]
        dense_prof = profile(base, size)
        (dense_lat,) = latency_ms([base], xlat, args.latency_reps)
        print(f"[{arch}] dense acc {base_acc:.4f} ({same_epochs_acc:.4f} trained as long as the pruned models)  {dense_prof.flops / 1e6:.2f} MFLOPs  {dense_prof.params} params  "
              f"{dense_lat:.2f} ms  (trained in {time.time() - t0:.0f}s)", flush=True)
        for budget in args.budgets:
            for spec in args.methods:
                method, cls, extra = parse_method(spec)
                torch.manual_seed(args.seed)
                model = copy.deepcopy(base)
                t0 = time.time()
                kw = {"target_flops_reduction": budget, **extra}
                if method not in ONE_SHOT:
                    kw["epochs"] = args.prune_epochs
                steps = len(train_loader) * args.prune_epochs
                if method in ("GReg1", "GReg2", "IncReg"):
                    kw["reg_steps"] = steps // 2  # regularise (+ stabilise) in about half the run, then fine-tune
                elif method in ("LBS", "OrthoReg"):
                    kw["val_data"] = val_loader
                elif method == "DAIS":
                    kw.update(val_data=val_loader, search_steps=steps // 2, alpha_lr=0.05)
                elif method == "DSA":
                    kw.update(val_data=val_loader, search_steps=steps // 2)
                elif method == "MetaPruning":  # its PruningNet trains from scratch, as long as the dense model did
                    kw = {"val_data": val_loader, "meta_epochs": args.pretrain_epochs, **METAPRUNING_SEARCH, **kw}
                elif method == "ACP":
                    kw = {"val_data": val_loader, "lr": args.lr * 0.5, **ACP_SEARCH, **kw}
                pr = cls(model, size, **kw)
                if method in ONE_SHOT:
                    pr.prune(loader_for())  # L1 ignores the data; LBS and PFP score filters on it, MetaPruning trains on it
                    if method == "ACP":
                        print(f"  ACP clustering keeps {sum(pr.cluster_counts.values())} of {sum(pr.sizes)} channels; "
                              f"best candidate {pr.best_accuracy:.4f} on val", flush=True)
                opt = sgd(model, args.lr * 0.5)
                pruning.fit(model, pr, loader_for(), args.prune_epochs, optimizer=opt,
                            scheduler=cosine(opt, args.prune_epochs), progress=False)
                ex = pr.export()
                acc_at_export = pruning.evaluate(ex, test_loader)["accuracy"]
                masked_acc = pruning.evaluate(pr.masked_model(), test_loader)["accuracy"]
                if args.finetune_epochs:  # the exported StripeConv2d model trains like any other
                    ft_opt = sgd(ex, args.lr * 0.1)
                    pruning.fit(ex, None, loader_for(), args.finetune_epochs, optimizer=ft_opt, scheduler=None,
                                progress=False)
                acc = pruning.evaluate(ex, test_loader)["accuracy"]
                p = profile(ex, size)
                row_dense_lat, lat = latency_ms([base, ex], xlat, args.latency_reps)
                row = {
                    "arch": arch, "method": spec, "budget": budget, "gpu_tile_efficiency": gpu_tile_efficiency(ex, xlat),
                    "acc_dense": base_acc, "acc_dense_same_epochs": same_epochs_acc, "acc_pruned": acc, "acc_at_export": acc_at_export, "acc_masked": masked_acc,
                    "flops_dense": dense_prof.flops, "flops": p.flops, "flops_reduction": 1 - p.flops / dense_prof.flops,
                    "params_dense": dense_prof.params, "params": p.params,
                    "params_reduction": 1 - p.params / dense_prof.params,
                    "latency_dense_ms": row_dense_lat, "latency_ms": lat, "speedup": row_dense_lat / lat,
                    "seconds": time.time() - t0,
                }
                rows.append(row)
                print(f"  {spec:8s} budget {budget:.2f}: acc {acc:.4f} (at export {acc_at_export:.4f}, masked {masked_acc:.4f})  FLOPs -{row['flops_reduction']:.1%}"
                      f"  params -{row['params_reduction']:.1%}  {lat:.2f} ms (x{row['speedup']:.2f})  [{row['seconds']:.0f}s]",
                      flush=True)
    rows = merged_rows(previous, rows, args.archs)
    meta = {"args": vars(args), "torch": torch.__version__, "backends": stripeconv.available_backends(),
            "platform": platform.platform(), "threads": args.threads}
    (out / f"{stem}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    (out / f"{stem}.md").write_text(table(rows, args))
    print(f"wrote {out / stem}.md and .json")


if __name__ == "__main__":
    main()
