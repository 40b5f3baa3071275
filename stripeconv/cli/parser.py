"""The argument parser: every command, its options and their checks."""
from __future__ import annotations

import argparse
import math
import textwrap
from typing import Optional

from .data import DATASETS
from .methods import cmd_methods
from .saved_model import cmd_bench, cmd_eval, cmd_onnx
from .training import cmd_demo, cmd_finetune, cmd_prune, cmd_train


EPILOG = """examples:
  stripeconv demo                                        # about a minute on 2 CPU cores
  stripeconv train --dataset fashion-mnist --epochs 10 --out runs/base
  stripeconv prune --from runs/base/model --method SWP --target flops=0.5 --epochs 10 --out runs/swp
  stripeconv prune --from runs/base/model --method L1Filter --target ratio=0.3 --epochs 5 --out runs/l1
  stripeconv prune --dataset cifar10 --data ~/data --model resnet56 --method SWP --set alpha=1e-5 \\
                   --set threshold=0.05 --epochs 160 --batch-size 64 --out runs/r56   # SWP from scratch
  stripeconv finetune runs/l1/pruned --epochs 5 --out runs/l1-ft
  stripeconv eval runs/swp/pruned
  stripeconv bench runs/swp/pruned --batch-size 1 64
  torchrun --nproc_per_node 2 -m stripeconv prune --from runs/base/model --method SWP --target 0.5 --out runs/ddp
  (re-run any training command with --resume to continue from its last checkpoint)
"""


def _number(kind, check, expected: str):
    """An argparse type: ``kind`` parsed and ``check``-ed, else a usage error naming what was expected."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        if not check(value):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return value

    parse.__name__ = expected  # argparse names the type in its messages
    return parse


_positive_int = _number(int, lambda v: v >= 1, "an integer >= 1")
_nonnegative_int = _number(int, lambda v: v >= 0, "an integer >= 0")
_positive_float = _number(float, lambda v: 0 < v < math.inf, "a number > 0")
_nonnegative_float = _number(float, lambda v: 0 <= v < math.inf, "a number >= 0")
_fraction = _number(float, lambda v: 0 < v < 1, "a fraction between 0 and 1")
_val_split = _number(float, lambda v: 0 < v < 1 or (1 <= v < math.inf and v == int(v)),
                     "a fraction between 0 and 1 or a whole count >= 1")


def _add_saved_model(p):
    p.add_argument("model_path", metavar="MODEL", help="saved model: path without suffix, or its .pt/.json")


def _add_input_size(p):
    p.add_argument("--input-size", type=_positive_int, nargs=3, default=None, metavar=("C", "H", "W"),
                   help="input shape (default: the one recorded with the model)")


def _add_common(p, device: bool = True):
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bars or per-epoch lines (results only)")
    p.add_argument("--threads", type=_positive_int, default=None, help="torch CPU threads (default: torch's choice)")
    if device:
        p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 or auto (a GPU when there is one)")


def _add_data(p, default_dataset: Optional[str] = None):
    g = p.add_argument_group("data")
    g.add_argument("--dataset", choices=DATASETS, default=default_dataset,
                   help="fashion-mnist (IDX files), fashion-mnist-subset (2000+500 images shipped with stripeconv), "
                        "cifar10/cifar100 (python pickle batches), imagefolder (train/ and val/ class folders; "
                        "needs torchvision). Default: fashion-mnist, or what the saved model recorded")
    g.add_argument("--data", default=None, metavar="PATH",
                   help="dataset folder (fashion-mnist default: $STRIPECONV_FASHION_MNIST or "
                        "/usr/share/datasets/fashion-mnist from `apt-get install dataset-fashion-mnist`)")
    g.add_argument("--limit-train", type=_positive_int, default=None, metavar="N",
                   help="use a random subset of N training images")
    g.add_argument("--limit-test", type=_positive_int, default=None, metavar="N",
                   help="use a random subset of N test images")
    g.add_argument("--data-seed", type=int, default=None, help="seed of the --limit-* subsets (default 0)")
    g.add_argument("--image-size", type=_positive_int, default=None, help="imagefolder: crop size (default 224)")
    g.add_argument("--workers", type=_nonnegative_int, default=0, help="DataLoader worker processes")


def _add_training(p, epochs: int, lr: float, out: str):
    g = p.add_argument_group("training")
    g.add_argument("--epochs", type=_nonnegative_int, default=epochs, help=f"epochs (default {epochs})")
    g.add_argument("--batch-size", type=_positive_int, default=64, help="batch size per process (default 64)")
    g.add_argument("--eval-batch-size", type=_positive_int, default=256)
    g.add_argument("--lr", type=_nonnegative_float, default=lr, help=f"learning rate (default {lr})")
    g.add_argument("--momentum", type=_nonnegative_float, default=0.9)
    g.add_argument("--weight-decay", type=_nonnegative_float, default=1e-4)
    g.add_argument("--optimizer", choices=("sgd", "adamw"), default="sgd")
    g.add_argument("--schedule", choices=("step", "cosine", "constant"), default="step",
                   help="step: LR x0.1 at 50%% and 75%% of the epochs (default); cosine; constant")
    g.add_argument("--seed", type=int, default=0, help="seed of weights init and of every epoch's data order")
    g.add_argument("--max-steps", type=_positive_int, default=None, metavar="N",
                   help="at most N batches per epoch (smoke tests)")
    # None here, `out` filled in by setup_run(): after a config file's `out:`, which applies when --out is not given
    g.add_argument("--out", default=None, metavar="DIR",
                   help=f"output folder: checkpoint, metrics.jsonl, saved model (default {out})")
    p.set_defaults(out_default=out)
    g.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out")
    g.add_argument("--no-progress", action="store_true", help="no tqdm bars (per-epoch lines stay)")


def _add_model(p):
    g = p.add_argument_group("model")
    g.add_argument("--model", default=None,
                   help="a preset (cnn-small, cnn-tiny) or a stripeconv.models constructor (vgg16_bn, resnet20, "
                        "resnet56, resnet18, ...); default: cnn-small for Fashion-MNIST, resnet20 for CIFAR-10, "
                        "resnet56 for CIFAR-100, resnet18 for imagefolder")
    g.add_argument("--width", type=_positive_float, default=None, help="channel multiplier of the model")
    g.add_argument("--model-kwargs", default=None, metavar="JSON", help="extra constructor arguments, as JSON")


class _DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows the default of every option that takes a value, unless its help already says it: a flag's default is
    its absence, a default of None means "not given" (the help says what happens then) and a required option has
    none."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.nargs == 0 or action.required or action.default in (None, argparse.SUPPRESS) \
                or "default" in text.lower():
            return text
        return super()._get_help_string(action)


class _Once(argparse.Action):
    """An option that may be given once: a second value would silently replace the first."""

    def __call__(self, parser, namespace, values, option_string=None):
        previous = getattr(namespace, self.dest, None)
        if previous is not None:
            raise argparse.ArgumentError(self, f"given twice ({previous} and {values}); give it once")
        setattr(namespace, self.dest, values)


def build_parser() -> argparse.ArgumentParser:
    """The ``stripeconv`` parser: one subcommand per command, each with ``func`` (the command to run) and
    ``_parser`` (its own subparser, which config files are checked against) set as defaults."""
    parser = argparse.ArgumentParser(
        prog="stripeconv", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train, prune (stripe-wise and other methods), fine-tune, evaluate and benchmark CNNs whose "
                    "convs become StripeConv2d.", epilog=EPILOG)
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    fmt = _DefaultsHelpFormatter

    p = sub.add_parser("train", help="train a baseline (dense) model", description=textwrap.dedent("""\
        Train a dense baseline and save it as <out>/model.pt + model.json (stripeconv.artifacts format; load with
        stripeconv.artifacts.load_pruned). Checkpoints every epoch to <out>/train.ckpt; metrics to
        <out>/metrics.jsonl."""),
        epilog="example: stripeconv train --dataset fashion-mnist --epochs 10 --out runs/base")
    _add_model(p)
    _add_data(p)
    _add_training(p, epochs=10, lr=0.1, out="runs/train")
    _add_common(p)
    p.set_defaults(func=cmd_train, _parser=p)

    p = sub.add_parser("prune", help="prune with any method, export to StripeConv2d and save",
                       formatter_class=argparse.RawDescriptionHelpFormatter, description=textwrap.dedent("""\
        Prune a model with a method of stripeconv.pruning.METHODS (list: `stripeconv methods`), export it
        (StripeConv2d layers, dead filters removed) and save <out>/pruned.pt + pruned.json.

        Training-time methods (SWP, SFP, GReg, DAIS, ...) prune during --epochs epochs; one-shot methods
        (L1Filter, L1Stripe, PFP, LBS, MetaPruning, ACP, CPMC, FunctionalityPruning) prune once, export,
        then train the exported network (no dead channel, no pruned stripe computed) for --epochs epochs
        (--train-full-size: the full-size model with the masks held). Start from a trained model
        (--from DIR/model, as saved by `stripeconv train`) or from scratch (--model).

        Hyperparameters: --target (flops=F: remove fraction F of the FLOPs; ratio=R; ratios=JSON|FILE),
        --set key=value (any argument of the method, typed from its signature), or --config FILE (YAML/JSON:
        method hyperparameters, optionally `method:`, `target:` and training options such as epochs, lr).
        The command line wins over the config file."""),
                       epilog="examples:\n"
                              "  stripeconv prune --from runs/base/model --method SWP --target flops=0.5 --epochs 10\n"
                              "  stripeconv prune --from runs/base/model --method SFP --target ratio=0.3 "
                              "--set granularity=stripe\n"
                              "  stripeconv prune --config swp.yaml --from runs/base/model --out runs/swp")
    p.add_argument("--method", default=None, help="pruning method (see `stripeconv methods`)")
    p.add_argument("--target", default=None, action=_Once,
                   help="flops=F | ratio=R | ratios=JSON|FILE (a bare number means flops=)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a method hyperparameter, e.g. --set alpha=1e-4 (repeatable)")
    p.add_argument("--config", default=None, metavar="FILE", help="YAML or JSON file of hyperparameters")
    p.add_argument("--from", dest="from_", default=None, metavar="PATH",
                   help="start from a saved model (e.g. runs/base/model); its dataset is the default")
    p.add_argument("--train-full-size", action="store_true",
                   help="one-shot methods: train the --epochs on the full-size model with its pruned stripes held at "
                        "zero, instead of on the exported (smaller) network")
    p.add_argument("--val-split", type=_val_split, default=None, metavar="F",
                   help="fraction (or, if >= 1, count) of the training data held out as val_data for methods that "
                        "measure a loss on held-out data (LBS, DAIS, DSA, ...; default 0.1 for them); "
                        "never the test set")
    _add_model(p)
    _add_data(p)
    _add_training(p, epochs=10, lr=0.01, out="runs/prune")
    _add_common(p)
    p.set_defaults(func=cmd_prune, _parser=p)

    p = sub.add_parser("finetune", help="fine-tune a saved pruned model (masks fixed)",
                       description="Fine-tune a model saved by `stripeconv prune` (StripeConv2d layers train only "
                                   "their kept stripes) and save <out>/finetuned.pt + finetuned.json. The dataset "
                                   "defaults to the one the model was pruned on.",
                       epilog="example: stripeconv finetune runs/l1/pruned --epochs 5 --lr 0.01 --out runs/l1-ft")
    _add_saved_model(p)
    _add_data(p)
    _add_training(p, epochs=5, lr=0.01, out="runs/finetune")
    _add_common(p)
    p.set_defaults(func=cmd_finetune, _parser=p)

    p = sub.add_parser("eval", help="test accuracy of a saved model", formatter_class=fmt,
                       description="Evaluate a saved model (stripeconv.artifacts) on the test split of the dataset "
                                   "it was trained on (or --dataset/--data), and compare with the accuracy recorded "
                                   "when it was saved.", epilog="example: stripeconv eval runs/swp/pruned")
    _add_saved_model(p)
    _add_data(p)
    p.add_argument("--eval-batch-size", type=_positive_int, default=256)
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    _add_common(p)
    p.set_defaults(func=cmd_eval, _parser=p)

    p = sub.add_parser("bench", help="latency of a saved pruned model vs dense on this device", formatter_class=fmt,
                       description="Median latency (inference, no grad) of a saved pruned model (StripeConv2d) vs "
                                   "its dense counterpart on this device: the unpruned network (same architecture, "
                                   "nn.Conv2d) and the pruned shapes run as dense nn.Conv2d. Timings are interleaved, "
                                   "on random inputs rotated between calls, after warm-up.",
                       epilog="example: stripeconv bench runs/swp/pruned --batch-size 1 64 --layers")
    _add_saved_model(p)
    p.add_argument("--batch-size", type=_positive_int, nargs="+", default=[1, 64], help="batch sizes to time")
    _add_input_size(p)
    p.add_argument("--repeats", type=_positive_int, default=30, help="timed calls per model and batch size")
    p.add_argument("--min-time", type=_nonnegative_float, default=0.0,
                   help="keep timing each model for at least this many s")
    p.add_argument("--layouts", nargs="+", choices=("nchw", "nhwc"), default=["nchw", "nhwc"],
                   help="memory formats to time each model in; the fastest of each model counts")
    p.add_argument("--channels-last", action="store_true", help="NHWC only (same as --layouts nhwc)")
    p.add_argument("--layers", action="store_true", help="also time every StripeConv2d layer alone")
    p.add_argument("--fuse-bn", action="store_true",
                   help="fold eval-mode BatchNorm into the conv before it (stripeconv.fuse_batchnorm) in every "
                        "model timed, as for deployment")
    p.add_argument("--reorder", action="store_true",
                   help="put the pruned model's filters in GPU tile order first (stripeconv.reorder_filters: the "
                        "same function, vector stores on the Triton backend)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--output", default=None, metavar="FILE", help="also write the JSON result to FILE")
    _add_common(p)
    p.set_defaults(func=cmd_bench, _parser=p)

    p = sub.add_parser("onnx", help="write a saved pruned model as ONNX", formatter_class=fmt,
                       description="Export a saved model (stripeconv.artifacts) to ONNX with stripeconv.export_onnx: "
                                   "each StripeConv2d becomes a dense conv on its masked weight (removed filters and "
                                   "channels stay removed). With onnxruntime installed, the file is run once and "
                                   "compared with the model.",
                       epilog="example: stripeconv onnx runs/swp/pruned --output runs/swp/model.onnx --fuse-bn")
    _add_saved_model(p)
    p.add_argument("--output", "-o", required=True, metavar="FILE",
                   help="the .onnx file to write (weights inside; over protobuf's 2 GB limit, torch puts them in "
                        "FILE.data beside it)")
    _add_input_size(p)
    p.add_argument("--fixed-batch", dest="dynamic_batch", action="store_false",
                   help="a batch of 2 fixed in the graph (default: the batch dimension is dynamic)")
    p.add_argument("--fuse-bn", action="store_true", help="fold eval-mode BatchNorm into the conv before it first")
    p.set_defaults(func=cmd_onnx, _parser=p)

    p = sub.add_parser("demo", help="end-to-end demo: train, SWP-prune, export, measure, report", formatter_class=fmt,
                       description="Train a small CNN on Fashion-MNIST (the installed dataset, else the subset "
                                   "shipped with stripeconv), prune it with SWP, export it to StripeConv2d, measure "
                                   "dense vs stripe latency on this device and write report.md (+ report.png with "
                                   "matplotlib) into --out. About a minute on 2 CPU cores.")
    p.add_argument("--out", default="stripeconv-demo", help="output folder")
    p.add_argument("--data", default=None, metavar="PATH", help="Fashion-MNIST folder (IDX files)")
    p.add_argument("--train-size", type=_positive_int, default=None,
                   help="training images (default 6000, or the 2000 shipped)")
    p.add_argument("--test-size", type=_positive_int, default=None,
                   help="test images (default 2000, or the 500 shipped)")
    p.add_argument("--epochs", type=_nonnegative_int, default=3, help="baseline training epochs")
    p.add_argument("--prune-epochs", type=_nonnegative_int, default=4, help="SWP epochs")
    p.add_argument("--target", type=_fraction, default=0.55, help="FLOPs reduction SWP aims for")
    p.add_argument("--bench-batch", type=_positive_int, default=64, help="batch size of the latency measurement")
    p.add_argument("--bench-threads", type=_nonnegative_int, default=1,
                   help="CPU threads for the latency measurement (1 is stable on shared machines; 0: torch's choice)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true", help="continue an interrupted demo from its checkpoints")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bars")
    p.add_argument("--quick", action="store_true", help="a tiny, fast run (smoke test): few images, 1+2 epochs")
    _add_common(p)
    p.set_defaults(func=cmd_demo, _parser=p)

    p = sub.add_parser("methods", help="list the pruning methods and their hyperparameters", formatter_class=fmt,
                       description="The pruning methods (stripeconv.pruning.METHODS) with a one-line description "
                                   "and their hyperparameters' defaults, read from each class.")
    p.add_argument("--all", action="store_true", help="also list the arguments common to every method")
    p.add_argument("--json", action="store_true", help="print as JSON")
    p.set_defaults(func=cmd_methods, _parser=p)
    return parser


def _version() -> str:
    try:
        from .. import __version__
        return __version__
    except Exception:  # pragma: no cover
        return "?"
