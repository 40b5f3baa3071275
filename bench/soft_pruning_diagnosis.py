"""Why soft filter pruning (SFP, ASFP, GHFP) collapses at export in the Fashion-MNIST fidelity table.

    python bench/soft_pruning_diagnosis.py [--prune-epochs 3] [--method SFP] [--quick]

Runs the fidelity protocol of ``bench/fashion_fidelity.py`` (VGG width 0.5, 4 pretraining
epochs, -50 % FLOPs) for one soft pruner and, just before its last epoch end (the hard zeroing),
measures per pruned conv: how large the filters it is about to zero are next to the kept ones
(weight norm, conv-output std) and how loud their channels are after the BatchNorm that follows
(BN-output std). Then the accuracy of the masked model after the zeroing (and the BN
re-estimation the training loop does). GHFP freezes a growing share of its selection before the
last epoch end: the ratios are also given for the filters zeroed there that were still soft
(``soft_*``). Writes ``<out>/soft_pruning_diagnosis.json``.
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fashion_fidelity as ff  # noqa: E402

from stripeconv import pruning  # noqa: E402
from stripeconv.data import fashion_mnist  # noqa: E402


def _channel_std(t: torch.Tensor, channels: torch.Tensor) -> float:
    return float(t[:, channels].std())


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--method", default="SFP", choices=["SFP", "ASFP", "GHFP"])
    ap.add_argument("--prune-epochs", type=int, default=3)
    ap.add_argument("--budget", type=float, default=0.5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="tiny sizes, to check that the script works")
    ap.add_argument("--data-root", default=None)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = ap.parse_args(argv)
    warnings.simplefilter("ignore")
    torch.set_num_threads(2)
    train_size, test_size, pretrain_epochs, width = (512, 256, 1, 0.25) if args.quick else (12000, 2000, 4, 0.5)
    torch.manual_seed(args.seed)
    full = fashion_mnist(args.data_root, train=True, limit=train_size, seed=args.seed)
    test = torch.utils.data.DataLoader(fashion_mnist(args.data_root, train=False, limit=test_size, seed=args.seed),
                                       batch_size=256)
    train, _ = pruning.holdout_split(full, 0.1, seed=args.seed)
    base = ff.make_model("vgg", width)
    opt = ff.sgd(base, 0.05)
    pruning.fit(base, None, ff.shuffled(train, 128, args.seed), pretrain_epochs, optimizer=opt,
                scheduler=ff.cosine(opt, pretrain_epochs), progress=False)
    model = copy.deepcopy(base)
    modules = dict(model.named_modules())
    pr = pruning.METHODS[args.method](model, (1, 1, 28, 28), target_flops_reduction=args.budget,
                                      epochs=args.prune_epochs)
    report = {"method": args.method, "prune_epochs": args.prune_epochs, "budget": args.budget,
              "acc_pretrained": pruning.evaluate(base, test)["accuracy"], "layers": []}
    end_epoch = pr.end_epoch

    def measured_end_epoch(epoch: int) -> None:
        if epoch + 1 < args.prune_epochs:
            return end_epoch(epoch)
        # Measure every channel now, then let the pruner make its last (hard) selection.
        report["acc_before_final_zeroing"] = pruning.evaluate(model, test)["accuracy"]
        norms = {name: conv.weight.detach().flatten(1).norm(dim=1) for name, conv in pr.convs.items()}
        outputs, hooks = {}, []
        for name in pr.convs:  # VGG features: each conv is followed by its BatchNorm
            parent, index = name.rsplit(".", 1)
            for key in (name, f"{parent}.{int(index) + 1}"):
                hooks.append(modules[key].register_forward_hook(
                    lambda m, i, o, key=key: outputs.__setitem__(key, o.detach())))
        model.eval()
        with torch.no_grad():
            model(next(iter(ff.shuffled(train, 256, args.seed)))[0])
        for h in hooks:
            h.remove()
        model.train()
        frozen_before = {name: ~m.any(dim=(1, 2)) for name, m in pr._frozen.items()}
        end_epoch(epoch)
        for name, mask in pr.masks().items():
            zeroed = ~mask.any(dim=(1, 2))
            parent, index = name.rsplit(".", 1)
            conv_out, bn_out = outputs[name], outputs[f"{parent}.{int(index) + 1}"]
            soft = zeroed & ~frozen_before[name]

            def ratios(part: torch.Tensor, prefix: str = "") -> dict:
                if not bool(part.any()):
                    return {}
                return {f"{prefix}norm_ratio": float(norms[name][part].mean() / norms[name][~zeroed].mean()),
                        f"{prefix}conv_std_ratio": _channel_std(conv_out, part) / _channel_std(conv_out, ~zeroed),
                        f"{prefix}bn_std_ratio": _channel_std(bn_out, part) / _channel_std(bn_out, ~zeroed)}

            report["layers"].append({"conv": name, "zeroed": int(zeroed.sum()), "filters": len(zeroed),
                                     "frozen_before": int(frozen_before[name].sum()), **ratios(zeroed),
                                     **ratios(soft, "soft_")})

    pr.end_epoch = measured_end_epoch
    opt = ff.sgd(model, 0.025)
    pruning.fit(model, pr, ff.shuffled(train, 128, args.seed), args.prune_epochs, optimizer=opt,
                scheduler=ff.cosine(opt, args.prune_epochs), progress=False)
    report["acc_after_final_zeroing"] = pruning.evaluate(pr.masked_model(), test)["accuracy"]
    print(f"{args.method}, {args.prune_epochs} prune epochs: accuracy pretrained {report['acc_pretrained']:.4f}, "
          f"before the final zeroing {report['acc_before_final_zeroing']:.4f}, "
          f"after {report['acc_after_final_zeroing']:.4f}")
    print(f"{'conv':<12} {'zeroed':>7} {'frozen':>6} {'norm':>6} {'conv std':>9} {'BN std':>7} "
          f"{'soft: norm':>10} {'conv std':>9} {'BN std':>7}   (zeroed / kept)")
    for r in report["layers"]:
        soft = (f"{r['soft_norm_ratio']:10.3f} {r['soft_conv_std_ratio']:9.3f} {r['soft_bn_std_ratio']:7.3f}"
                if "soft_norm_ratio" in r else f"{'-':>10} {'-':>9} {'-':>7}")
        print(f"{r['conv']:<12} {r['zeroed']:>3}/{r['filters']:<3} {r['frozen_before']:>6} {r['norm_ratio']:6.3f} "
              f"{r['conv_std_ratio']:9.3f} {r['bn_std_ratio']:7.3f} {soft}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"soft_pruning_diagnosis{'_quick' if args.quick else ''}.json"
    runs = json.loads(path.read_text()) if path.exists() else []
    runs = [r for r in runs if (r["method"], r["prune_epochs"], r["budget"]) !=
            (args.method, args.prune_epochs, args.budget)] + [report]
    path.write_text(json.dumps(runs, indent=1))
    return report


if __name__ == "__main__":
    main()
