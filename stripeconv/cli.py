"""The ``stripeconv`` command line (also ``python -m stripeconv``).

    stripeconv train     --dataset fashion-mnist --model cnn-small --epochs 10 --out runs/base
    stripeconv prune     --from runs/base/model --method SWP --target flops=0.5 --epochs 10 --out runs/swp
    stripeconv finetune  runs/swp/pruned --epochs 5 --out runs/swp-ft
    stripeconv eval      runs/swp/pruned
    stripeconv bench     runs/swp/pruned --batch-size 1 64
    stripeconv demo
    stripeconv methods

Multi-process: ``torchrun --nproc_per_node N -m stripeconv prune ...`` (DDP; gloo on CPU, nccl on GPU).
Every training command checkpoints each epoch into its ``--out`` folder; ``--resume`` continues.
"""
from __future__ import annotations

import argparse
import inspect
import json
import logging
import math
import os
import sys
import textwrap
import traceback
import warnings
from pathlib import Path
from typing import Any, Optional

import torch

__all__ = ["main", "build_parser", "method_params", "parse_set", "parse_target", "load_datasets", "build_model",
           "PRESETS", "DATASETS"]

# Named model presets: zoo constructor + keyword arguments (the JSON of a saved model records these).
PRESETS = {
    "cnn-small": ("vgg", {"cfg": [16, "M", 32, 32, "M", 64, 64]}),
    "cnn-tiny": ("vgg", {"cfg": [8, "M", 16, "M", 16]}),
}
DATASETS = ("fashion-mnist", "fashion-mnist-subset", "cifar10", "cifar100", "imagefolder")
DEFAULT_MODEL = {"fashion-mnist": "cnn-small", "fashion-mnist-subset": "cnn-small", "cifar10": "resnet20",
                 "cifar100": "resnet56", "imagefolder": "resnet18"}


class CLIError(Exception):
    """A user error: printed as ``stripeconv: error: ...`` with exit status 2."""


# =========================================================================================== data
def load_datasets(spec: dict, train: bool = True):
    """``(train_set or None, test_set, meta)`` for a data spec.

    ``spec``: ``dataset`` (one of :data:`DATASETS`), ``data`` (folder or None), ``limit_train``,
    ``limit_test``, ``seed``, ``image_size`` (imagefolder). ``meta``: ``input_size`` [1, C, H, W],
    ``num_classes``, ``train_size``, ``test_size``.
    """
    from . import data as D

    name, root = spec["dataset"], spec.get("data")
    lt, le, seed = spec.get("limit_train"), spec.get("limit_test"), int(spec.get("seed") or 0)
    if name == "fashion-mnist":
        tr = D.fashion_mnist(root, train=True, limit=lt, seed=seed) if train else None
        te = D.fashion_mnist(root, train=False, limit=le, seed=seed)
        meta = {"input_size": [1, 1, 28, 28], "num_classes": 10}
    elif name == "fashion-mnist-subset":
        from .data.embedded import fashion_mnist_subset
        tr = fashion_mnist_subset(train=True, limit=lt) if train else None
        te = fashion_mnist_subset(train=False, limit=le)
        meta = {"input_size": [1, 1, 28, 28], "num_classes": 10}
    elif name in ("cifar10", "cifar100"):
        if not root:
            raise CLIError(f"--dataset {name} needs --data PATH: the folder of the extracted 'python version' archive "
                           "(cifar-10-batches-py / cifar-100-python, or its parent), from "
                           "https://www.cs.toronto.edu/~kriz/cifar.html")
        nc = 10 if name == "cifar10" else 100
        tr = _limit(D.cifar(root, train=True, num_classes=nc), lt, seed) if train else None
        te = _limit(D.cifar(root, train=False, num_classes=nc), le, seed)
        meta = {"input_size": [1, 3, 32, 32], "num_classes": nc}
    elif name == "imagefolder":
        tr, te, meta = _imagefolder(root, int(spec.get("image_size") or 224), train)
        tr = _limit(tr, lt, seed) if tr is not None else None
        te = _limit(te, le, seed)
    else:
        raise CLIError(f"unknown dataset {name!r}; choose from {', '.join(DATASETS)}")
    meta.update(train_size=len(tr) if tr is not None else None, test_size=len(te))
    return tr, te, meta


def _limit(ds, n: Optional[int], seed: int):
    if n is None or n >= len(ds):
        return ds
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(ds), generator=g)[:n].sort().values.tolist()
    return torch.utils.data.Subset(ds, idx)


def _imagefolder(root, size: int, train: bool):
    if not root:
        raise CLIError("--dataset imagefolder needs --data PATH (a folder with train/ and val/ subfolders, one "
                       "subfolder per class, as ImageNet is usually laid out)")
    try:
        from torchvision import datasets, transforms
    except ImportError as e:
        raise CLIError("ImageNet-style folders are read with torchvision, which is not installed: "
                       "pip install torchvision (matching your torch build)") from e
    root = Path(root)
    val_dir = next((root / d for d in ("val", "validation", "test") if (root / d).is_dir()), None)
    if not (root / "train").is_dir() or val_dir is None:
        raise CLIError(f"{root} must contain train/ and val/ (or validation/, test/) class folders")
    norm = transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    tr_tf = transforms.Compose([transforms.RandomResizedCrop(size), transforms.RandomHorizontalFlip(),
                                transforms.ToTensor(), norm])
    te_tf = transforms.Compose([transforms.Resize(int(round(size * 256 / 224))), transforms.CenterCrop(size),
                                transforms.ToTensor(), norm])
    tr = datasets.ImageFolder(str(root / "train"), tr_tf) if train else None
    te = datasets.ImageFolder(str(val_dir), te_tf)
    return tr, te, {"input_size": [1, 3, size, size], "num_classes": len(te.classes)}


def data_spec(args, saved: Optional[dict] = None) -> dict:
    """The data spec from the command line, defaulting to what a saved model recorded."""
    saved = dict(saved or {})
    spec = {k: saved.get(k) for k in ("dataset", "data", "limit_train", "limit_test", "seed", "image_size")}
    for k in ("dataset", "data", "limit_train", "limit_test", "image_size"):
        v = getattr(args, k, None)
        if v is not None:
            spec[k] = v
    if getattr(args, "data_seed", None) is not None:
        spec["seed"] = args.data_seed
    spec["dataset"] = spec.get("dataset") or "fashion-mnist"
    spec["seed"] = spec.get("seed") or 0
    return spec


# ========================================================================================= models
def build_model(name: str, num_classes: int, in_channels: int, width: Optional[float] = None,
                model_kwargs: Optional[dict] = None):
    """``(model, arch, arch_kwargs)`` from a preset (:data:`PRESETS`) or a :mod:`stripeconv.models` constructor."""
    from . import models

    if name in PRESETS:
        arch, kw = PRESETS[name]
        kw = dict(kw)
    elif name in models.__all__ and callable(getattr(models, name)) and name[0].islower():
        arch, kw = name, {}
    else:
        choices = sorted(PRESETS) + [n for n in models.__all__ if n[0].islower()]
        raise CLIError(f"unknown model {name!r}; choose from {', '.join(choices)}")
    kw.update(num_classes=num_classes, in_channels=in_channels)
    if width is not None:
        kw["width"] = width
    kw.update(model_kwargs or {})
    try:
        return getattr(models, arch)(**kw), arch, kw
    except TypeError as e:  # an argument the constructor does not take
        raise CLIError(f"model {name!r}: {e}") from e


# ======================================================================================== methods
def method_params(cls) -> dict:
    """Keyword parameters of a pruning method (its own, then its bases' up to ``Pruner``), by name."""
    from .pruning import Pruner

    out: dict[str, inspect.Parameter] = {}
    for c in cls.__mro__:
        if c is object:
            break
        if "__init__" in c.__dict__:
            for name, p in inspect.signature(c.__init__).parameters.items():
                if name in ("self", "model", "input_size") or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
                    continue
                out.setdefault(name, p)
        if c is Pruner:
            break
    return out


def _methods():
    from .pruning import METHODS

    return METHODS


def find_method(name: str):
    methods = _methods()
    for k, v in methods.items():
        if k.lower() == name.lower():
            return k, v
    raise CLIError(f"unknown pruning method {name!r}; choose from {', '.join(methods)} (see `stripeconv methods`)")


def _doc_line(cls) -> str:
    doc = inspect.cleandoc(cls.__dict__.get("__doc__") or "")  # not inherited: Pruner's would say nothing
    if not doc.strip():
        mod = sys.modules.get(cls.__module__)
        doc = inspect.getdoc(mod) or ""
    first = doc.strip().split("\n\n")[0].replace("\n", " ").strip()
    return first


def _ann(p: inspect.Parameter) -> str:
    a = p.annotation
    if a is inspect.Parameter.empty:
        return ""
    return a if isinstance(a, str) else getattr(a, "__name__", str(a))


def coerce(value: str, p: Optional[inspect.Parameter]) -> Any:
    """Parse ``value`` for parameter ``p`` (type from its default or annotation; else YAML/JSON literal)."""
    ann = _ann(p).lower() if p is not None else ""
    default = p.default if p is not None and p.default is not inspect.Parameter.empty else None
    low = value.strip().lower()
    if low in ("none", "null"):
        return None
    if isinstance(default, bool) or ann in ("bool", "optional[bool]"):
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise CLIError(f"{p.name}: expected a boolean, got {value!r}")
    try:
        if isinstance(default, int) or ann in ("int", "optional[int]"):
            f = float(value)
            if f != int(f):
                raise ValueError
            return int(f)
        if isinstance(default, float) or ann in ("float", "optional[float]"):
            return float(value)
    except ValueError:
        raise CLIError(f"{p.name}: expected a number ({ann or type(default).__name__}), got {value!r}") from None
    if isinstance(default, str) or ann in ("str", "optional[str]"):
        return value
    return _literal(value)


def _literal(value: str) -> Any:
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        pass
    try:
        import yaml

        return yaml.safe_load(value)
    except Exception:
        return value


def parse_set(items, params: dict) -> dict:
    """``["alpha=1e-4", "threshold=0.02"]`` -> typed dict, checked against the method's ``params``."""
    out = {}
    for item in items or []:
        if "=" not in item:
            raise CLIError(f"--set expects key=value, got {item!r}")
        key, value = item.split("=", 1)
        key = key.strip().replace("-", "_")
        if key not in params:
            raise CLIError(f"unknown hyperparameter {key!r}; this method takes: {', '.join(params)}")
        out[key] = coerce(value, params[key])
    return out


def parse_target(text: Optional[str]) -> dict:
    """``flops=0.5`` / ``0.5`` (FLOPs reduction), ``ratio=0.3``, ``ratios=<json or file>`` -> pruner kwargs."""
    if text is None:
        return {}
    text = str(text)  # a config file may give `target: 0.5`
    key, _, value = text.partition("=")
    if not _:
        key, value = "flops", text
    key = key.strip().lower()
    if key in ("flops", "target_flops_reduction", "ratio"):
        try:
            number = float(value)
        except ValueError:
            raise CLIError(f"--target {text!r}: expected a number after '{key}=', e.g. {key}=0.5") from None
        return {"ratio" if key == "ratio" else "target_flops_reduction": number}
    if key == "ratios":
        p = Path(value)
        if p.is_file():
            return {"ratios": _check_ratios(_load_config(p), f"--target ratios={value}")}
        try:
            return {"ratios": _check_ratios(json.loads(value), "--target ratios=...")}
        except json.JSONDecodeError as e:
            raise CLIError(f"--target ratios=...: {value!r} is neither a file nor valid JSON ({e})") from None
    raise CLIError(f"--target: expected flops=F, ratio=R or ratios=JSON|FILE, got {text!r}")


def _check_ratios(ratios: Any, where: str) -> Any:
    """``ratios`` must map layer names to numbers; anything else fails deep inside a pruner."""
    if ratios is None:
        return None
    if not isinstance(ratios, dict) or not all(isinstance(k, str) and isinstance(v, (int, float))
                                               and not isinstance(v, bool) for k, v in ratios.items()):
        raise CLIError(f"{where}: expected a mapping of layer name to ratio, e.g. {{\"features.3\": 0.5}}, "
                       f"got {ratios!r}")
    return ratios


def _load_config(path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise CLIError(f"config file {path} not found")
    try:
        text = path.read_text()
    except UnicodeDecodeError as e:
        raise CLIError(f"{path} is not a text file ({e})") from None
    if path.suffix.lower() == ".json":
        try:
            cfg = json.loads(text)
        except json.JSONDecodeError as e:
            raise CLIError(f"{path}: invalid JSON: {e}") from None
    else:
        try:
            import yaml
        except ImportError:
            try:
                cfg = json.loads(text)
            except json.JSONDecodeError:
                raise CLIError(f"{path}: YAML configs need PyYAML (pip install pyyaml), or use JSON") from None
        else:
            try:
                cfg = yaml.safe_load(text)
            except yaml.YAMLError as e:
                raise CLIError(f"{path}: invalid YAML: {e}") from None
    cfg = {} if cfg is None else cfg
    if not isinstance(cfg, dict):
        raise CLIError(f"{path}: expected a mapping of hyperparameters, got a {type(cfg).__name__}")
    return cfg


def _typed(value: Any, p: inspect.Parameter) -> Any:
    """A config-file value checked like ``--set`` (YAML reads ``1e-5`` as a string, and no type is checked)."""
    if isinstance(value, bool):
        return coerce("true" if value else "false", p)
    if isinstance(value, (int, float, str)):
        return coerce(str(value), p)
    return value  # lists, mappings, null


def method_kwargs(cls, args, config: dict) -> dict:
    """Pruner keyword arguments from ``--config``, ``--target`` and ``--set`` (later wins), plus epochs."""
    params = method_params(cls)
    kw: dict[str, Any] = {}
    nested = config.get("params")
    if nested is not None and not isinstance(nested, dict):
        raise CLIError(f"{args.config}: 'params' must be a mapping of hyperparameters")
    options = _option_dests(args)
    unknown = [k for k in config if k not in params and k not in ("method", "target", "params", "set")
               and _config_dest(k) not in options]
    if unknown:  # a typo would otherwise be ignored without a word
        raise CLIError(f"{args.config}: unknown keys {unknown}; {cls.__name__} takes: {', '.join(params)}; "
                       "training options are the long options of `stripeconv prune` (epochs, lr, ...)")
    # A top-level `epochs` is the training option (the command line wins over it); the pruner's
    # schedule follows the epochs trained, below, unless `params:` or --set give it its own.
    top = {k: v for k, v in config.items() if k in params and k != "epochs"}
    for k, v in {**(nested or {}), **top}.items():
        try:
            kw[k] = _typed(v, params[k]) if k in params else v
        except CLIError as e:
            raise CLIError(f"{args.config}: {e}") from None
    target = parse_target(args.target if args.target is not None else config.get("target"))
    if target:
        for k in ("target_flops_reduction", "ratio", "ratios"):
            kw.pop(k, None)
        kw.update(target)
    kw.update(parse_set(args.set, params))
    if "ratios" in kw:
        _check_ratios(kw["ratios"], "ratios")
    unknown = set(kw) - set(params)
    if unknown:
        raise CLIError(f"{cls.__name__} does not take {sorted(unknown)}; it takes: {', '.join(params)}")
    if "epochs" in params and kw.get("epochs") is None and args.epochs:
        kw["epochs"] = args.epochs
    return kw


def cmd_methods(args) -> int:
    methods = _methods()
    if args.json:
        out = {}
        for name, cls in methods.items():
            out[name] = {"description": _doc_line(cls),
                         "params": {k: (None if p.default is inspect.Parameter.empty else p.default)
                                    for k, p in method_params(cls).items()}}
        print(json.dumps(out, indent=1, default=repr))
        return 0
    from .pruning import Pruner

    common = method_params(Pruner)
    supplied = {"val_data": "val_data (the CLI holds out --val-split of the training data)",
                "search_steps": "search_steps (CLI default: half of the training steps)"}
    for name, cls in methods.items():
        print(f"{name}: {_doc_line(cls)}")
        own = {k: p for k, p in method_params(cls).items() if k != "require_target" and
               (args.all or k not in common or p.default != common[k].default)}
        parts = [f"{k}={p.default!r}" if p.default is not inspect.Parameter.empty
                 else supplied.get(k, f"{k} (required)") for k, p in own.items()]
        if parts:
            print(textwrap.fill(", ".join(parts), width=100, initial_indent="    ", subsequent_indent="    "))
        print()
    parts = [f"{k}={p.default!r}" for k, p in common.items() if k != "require_target"]
    print("Common to every method (see `stripeconv methods --all`):")
    print(textwrap.fill(", ".join(parts), width=100, initial_indent="    ", subsequent_indent="    "))
    print("\nSet hyperparameters with `stripeconv prune --method NAME --set key=value` or `--config file.yaml`.")
    return 0


# =================================================================================== shared bits
def _out(msg: str, args, ctx=None, err: bool = False) -> None:
    if ctx is not None and not ctx.is_main:
        return
    if getattr(args, "quiet", False) and not err:
        return
    print(msg, file=sys.stderr if err else sys.stdout, flush=True)


def _result(msg: str, ctx=None) -> None:
    """Final results: printed even with --quiet (rank 0 only)."""
    if ctx is None or ctx.is_main:
        print(msg, flush=True)


def _setup(args):
    from .distributed import init_from_env

    _check_device(args.device)
    _check_out_dir(args.out)
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    ctx = init_from_env(args.device)
    torch.manual_seed(args.seed)
    return ctx


def _engine_kwargs(args, ctx) -> dict:
    return dict(lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay, optimizer_name=args.optimizer,
                schedule=args.schedule, batch_size=args.batch_size, eval_batch_size=args.eval_batch_size,
                seed=args.seed, out_dir=args.out, resume=args.resume, ctx=ctx,
                progress=not (args.no_progress or args.quiet),
                quiet=args.quiet, max_steps_per_epoch=args.max_steps, num_workers=args.workers)


def _extra(spec: dict, meta: dict, **more) -> dict:
    return {"data": spec, "input_size": meta["input_size"], "num_classes": meta["num_classes"], **more}


def _apply_config_defaults(args, config: dict) -> None:
    """Training options in a config file apply unless given on the command line."""
    parser = args._parser
    actions = {a.dest: a for a in parser._actions}
    for k, v in config.items():
        dest = _config_dest(k)
        if dest in ("method", "target", "params", "set") or dest not in actions:
            continue
        if getattr(args, dest) == parser.get_default(dest):
            setattr(args, dest, _option_value(actions[dest], k, v, args.config))


def _config_dest(key: str) -> str:
    dest = str(key).replace("-", "_")
    return "from_" if dest == "from" else dest  # `from` is a keyword: its option stores into from_


def _option_dests(args) -> set:
    parser = getattr(args, "_parser", None)
    return {a.dest for a in parser._actions if a.dest != "help"} if parser is not None else set()


def _option_value(action: argparse.Action, key: str, value: Any, path) -> Any:
    """A config value for a command-line option, checked as the command line would check it."""
    if value is None:
        return None
    if action.nargs == 0:  # --resume, --quiet, ...
        if not isinstance(value, bool):
            raise CLIError(f"{path}: {key}: expected true or false, got {value!r}")
        return value
    if action.type is not None:
        if isinstance(value, (bool, list, dict)):
            raise CLIError(f"{path}: {key}: expected a single value, got {value!r}")
        try:
            value = action.type(str(value))
        except (ValueError, argparse.ArgumentTypeError) as e:
            raise CLIError(f"{path}: {key}: {e}") from None
    if action.choices is not None and value not in action.choices:
        raise CLIError(f"{path}: {key}: expected one of {', '.join(map(str, action.choices))}, got {value!r}")
    return value


# ======================================================================================= commands
def cmd_train(args) -> int:
    from .artifacts import save_pruned
    from .distributed import cleanup
    from .engine import Engine, evaluate_model

    ctx = _setup(args)
    try:
        spec = data_spec(args)
        train, test, meta = load_datasets(spec)
        model, arch, kw = build_model(args.model or DEFAULT_MODEL[spec["dataset"]], meta["num_classes"],
                                      meta["input_size"][1], args.width, _model_kwargs(args))
        model.to(ctx.device)
        _out(f"train {arch}({_short(kw)}) on {spec['dataset']}: {meta['train_size']} train / {meta['test_size']} "
             f"test images, {args.epochs} epochs, {ctx.world_size} process(es) on {ctx.device}", args, ctx)
        engine = Engine(model, train, epochs=args.epochs, eval_data=test, phase="train",
                        meta=_run_meta(args, spec, model=arch, arch_kwargs=kw), **_engine_kwargs(args, ctx))
        engine.run()
        ev = evaluate_model(model, test, ctx.device, batch_size=args.eval_batch_size, ctx=ctx)
        if ctx.is_main:
            out = Path(args.out)
            save_pruned(model, out / "model", arch, kw, extra=_extra(spec, meta, accuracy=ev["accuracy"],
                                                                      phase="train", epochs=args.epochs))
            engine.log.write({"phase": "train", "event": "saved", "path": str(out / "model"),
                              "eval_accuracy": ev["accuracy"], "eval_loss": ev["loss"]})
        _result(f"test accuracy {ev['accuracy']:.4f}; model saved to {Path(args.out) / 'model'}.pt/.json", ctx)
        ctx.barrier()
    finally:
        cleanup(ctx, barrier=False)  # the success path met at the barrier above
    return 0


def _model_kwargs(args) -> Optional[dict]:
    if not args.model_kwargs:
        return None
    try:
        kw = json.loads(args.model_kwargs)
    except json.JSONDecodeError as e:
        raise CLIError(f"--model-kwargs: invalid JSON ({e}); expected an object, e.g. '{{\"width\": 0.5}}'") from None
    if not isinstance(kw, dict):
        raise CLIError(f"--model-kwargs: expected a JSON object, got {args.model_kwargs!r}")
    return kw


def _check_device(name: Optional[str]) -> None:
    """``--device`` checked up front: torch's own errors come late and as tracebacks."""
    if name in (None, "auto"):
        return
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise CLIError(f"--device: expected cpu, cuda, cuda:N or auto, got {name!r}") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise CLIError(f"--device {name}: CUDA is not available here (use --device cpu)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise CLIError(f"--device {name}: there are {torch.cuda.device_count()} CUDA device(s)")


def _check_out_dir(out: Optional[str]) -> None:
    if out and Path(out).exists() and not Path(out).is_dir():  # else found only after the first epoch
        raise CLIError(f"--out {out} is a file; expected a folder for the checkpoint, log and saved model")


def _check_fits(desc: dict, meta: dict, path, spec: dict) -> None:
    """A saved model fed another dataset's images would fail in its first conv (or score a wrong accuracy)."""
    extra = desc.get("extra", {})
    saved_c = (extra.get("input_size") or [None, None])[1]
    saved_n = extra.get("num_classes")
    wrong_c = saved_c is not None and saved_c != meta["input_size"][1]
    wrong_n = saved_n is not None and saved_n != meta["num_classes"]
    if wrong_c or wrong_n:
        raise CLIError(f"{path} takes {saved_c}-channel images and predicts {saved_n} classes, but "
                       f"{spec['dataset']} has {meta['input_size'][1]} channels and {meta['num_classes']} classes; "
                       "pass the --dataset it was trained on")


def _run_meta(args, spec: dict, **more) -> dict:
    """What a resumed run must share with the run that wrote the checkpoint (the engine compares them)."""
    data = {k: spec.get(k) for k in ("dataset", "limit_train", "seed", "image_size")}
    training = {k: getattr(args, k) for k in ("lr", "momentum", "weight_decay", "optimizer", "schedule", "batch_size",
                                              "seed", "max_steps")}
    return {"command": args.command, "data": data, "training": training, **more}


def _short(kw: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in kw.items())


def cmd_prune(args) -> int:
    from .artifacts import load_pruned, read_description, save_pruned
    from .distributed import cleanup
    from .engine import Engine, evaluate_model, is_oneshot

    config = _load_config(args.config) if args.config else {}
    _apply_config_defaults(args, config)
    method = args.method or config.get("method")
    if not method:
        raise CLIError("prune needs --method NAME (or `method:` in --config); see `stripeconv methods`")
    method_name, cls = find_method(method)
    kwargs = method_kwargs(cls, args, config)
    if args.from_:
        given = [o for o, v in (("--model", args.model), ("--width", args.width), ("--model-kwargs", args.model_kwargs))
                 if v is not None]
        if given:  # they would be ignored: the saved model fixes the architecture
            raise CLIError(f"{', '.join(given)} cannot be combined with --from (the saved model is the architecture)")
    ctx = _setup(args)
    try:
        if args.from_:
            desc = read_description(args.from_)
            spec = data_spec(args, desc.get("extra", {}).get("data"))
            train, test, meta = load_datasets(spec)
            _check_fits(desc, meta, args.from_, spec)
            model = load_pruned(args.from_, map_location=ctx.device)
            arch, kw = desc["arch"], desc["arch_kwargs"]
            source = str(args.from_)
        else:
            spec = data_spec(args)
            train, test, meta = load_datasets(spec)
            model, arch, kw = build_model(args.model or DEFAULT_MODEL[spec["dataset"]], meta["num_classes"],
                                          meta["input_size"][1], args.width, _model_kwargs(args))
            source = f"{arch} from scratch"
        model.to(ctx.device).train()
        train, runtime = _runtime_kwargs(cls, kwargs, train, args, ctx)
        before = evaluate_model(model, test, ctx.device, batch_size=args.eval_batch_size, ctx=ctx) if args.from_ \
            else None
        try:
            pruner = cls(model, input_size=tuple(meta["input_size"]), **kwargs, **runtime)
        except (TypeError, ValueError, KeyError) as e:
            msg = str(e)  # pruners name themselves in their messages
            raise CLIError(msg if msg.startswith(method_name) else f"{method_name}: {msg}") from e
        oneshot = is_oneshot(pruner)
        prune_data = None
        if oneshot:
            from torch.utils.data import DataLoader

            prune_data = DataLoader(train, batch_size=args.batch_size, shuffle=False)
        # after a one-shot method the epochs train the exported network: it computes what the masked
        # model computes, without the dead channels and pruned stripes that the full-size one carries
        retrain = oneshot and args.epochs > 0 and not args.train_full_size
        _out(f"prune {source} with {method_name}({_short(kwargs)}) on {spec['dataset']}: "
             f"{'one-shot + ' if oneshot else ''}{args.epochs} epochs"
             f"{' of the exported network' if retrain else ''}, {ctx.world_size} process(es) on {ctx.device}",
             args, ctx)
        run_meta = _run_meta(args, spec, method=method_name, params=kwargs, model=arch, arch_kwargs=kw)
        engine = Engine(model, train, pruner=pruner, epochs=0 if retrain else args.epochs, eval_data=test,
                        phase="prune", prune_data=prune_data, meta=run_meta, **_engine_kwargs(args, ctx))
        engine.run()
        history, files = list(engine.history), ["prune.ckpt"]
        exported = None
        if retrain:  # every rank: the masks are the same everywhere after the one-shot step
            exported = pruner.export().to(ctx.device).train()
            retrain_engine = Engine(exported, train, epochs=args.epochs, eval_data=test, phase="retrain",
                                    meta=run_meta, **_engine_kwargs(args, ctx))
            retrain_engine.run()
            history += retrain_engine.history
            files.append("retrain.ckpt")
        result = {}
        if ctx.is_main:
            exported = (exported if exported is not None else pruner.export()).eval()
            after = evaluate_model(exported, test, ctx.device, batch_size=args.eval_batch_size)
            rep = pruner.report(exported)
            out = Path(args.out)
            save_pruned(exported.cpu(), out / "pruned", arch, kw, extra=_extra(
                spec, meta, accuracy=after["accuracy"], accuracy_before=before["accuracy"] if before else None,
                phase="prune", method=method_name, params=_jsonable_params(kwargs), source=source,
                flops_reduction=rep["flops_reduction"], params_reduction=rep["params_reduction"]))
            result = {"phase": "export", "event": "saved", "path": str(out / "pruned"), "method": method_name,
                      "eval_accuracy": after["accuracy"], "eval_loss": after["loss"],
                      "accuracy_before": before["accuracy"] if before else None,
                      **{k: rep[k] for k in ("flops_dense", "flops", "flops_reduction", "params_dense", "params",
                                             "params_reduction", "stripe_density")}}
            engine.log.truncate("export", 0)  # one export record per output folder, also after --resume
            engine.log.write(result)
            (out / "prune_report.json").write_text(json.dumps(result, indent=1))
            from .report import write_report
            write_report(out, {"title": f"{method_name} on {spec['dataset']}", "prune_report": rep,
                               "accuracy_before": before["accuracy"] if before else None,
                               "accuracy_after": after["accuracy"], "history": history,
                               "files": ["pruned.pt", "pruned.json", "metrics.jsonl", *files]}, plot=False)
            b = f"accuracy {before['accuracy']:.4f} -> {after['accuracy']:.4f}" if before \
                else f"accuracy {after['accuracy']:.4f}"
            _result(f"{method_name}: {b}, FLOPs -{rep['flops_reduction']:.1%}, params -{rep['params_reduction']:.1%}; "
                    f"saved {out / 'pruned'}.pt/.json (load with stripeconv.artifacts.load_pruned)", ctx)
        ctx.barrier()
    finally:
        cleanup(ctx, barrier=False)  # the success path met at the barrier above
    return 0


def _runtime_kwargs(cls, kwargs: dict, train, args, ctx):
    """Arguments the CLI supplies itself: ``val_data`` (a held-out split of the training data, for LBS, DAIS and
    DSA: ``--val-split``), ``search_steps`` (DAIS, DSA: half of the training steps unless set) and ``verbose``
    (progress, unless ``--quiet``).
    Returns the (possibly reduced) training set and those arguments; other missing required ones are errors."""
    import math

    from torch.utils.data import DataLoader

    from .pruning import holdout_split

    params = method_params(cls)
    runtime: dict[str, Any] = {}
    if "val_data" in params or args.val_split:
        split = args.val_split or 0.1
        try:
            train, held = holdout_split(train, split if split < 1 else int(split), seed=args.seed)
        except ValueError as e:
            raise CLIError(f"--val-split {split}: {e}") from e
        if "val_data" in params:
            runtime["val_data"] = DataLoader(held, batch_size=args.batch_size, shuffle=False)
        _out(f"held out {len(held)} training images for {cls.__name__}'s loss measurements (--val-split {split})",
             args, ctx)
    if "search_steps" in params and kwargs.get("search_steps") is None \
            and params["search_steps"].default is inspect.Parameter.empty:
        steps = math.ceil(len(train) / (args.batch_size * ctx.world_size))
        if args.max_steps:
            steps = min(steps, args.max_steps)
        kwargs["search_steps"] = max(1, max(1, args.epochs // 2) * steps)
        _out(f"search_steps={kwargs['search_steps']} (half of the epochs; --set search_steps=N to change)", args, ctx)
    if "verbose" in params and "verbose" not in kwargs:  # progress of the one-shot scoring and searches
        runtime["verbose"] = not args.quiet and ctx.is_main
    missing = [k for k, p in params.items() if p.default is inspect.Parameter.empty and k not in kwargs
               and k not in runtime]
    if missing:
        raise CLIError(f"{cls.__name__} needs {', '.join(missing)}: give them with --set KEY=VALUE or --config")
    return train, runtime


def _jsonable_params(kw: dict) -> dict:
    return json.loads(json.dumps(kw, default=repr))


def cmd_finetune(args) -> int:
    from .artifacts import load_pruned, read_description, save_pruned
    from .distributed import cleanup
    from .engine import Engine, evaluate_model

    ctx = _setup(args)
    try:
        desc = read_description(args.model_path)
        extra = desc.get("extra", {})
        spec = data_spec(args, extra.get("data"))
        train, test, meta = load_datasets(spec)
        _check_fits(desc, meta, args.model_path, spec)
        model = load_pruned(args.model_path, map_location=ctx.device).train()
        before = evaluate_model(model, test, ctx.device, batch_size=args.eval_batch_size, ctx=ctx)
        _out(f"finetune {args.model_path} on {spec['dataset']}: {args.epochs} epochs, {ctx.world_size} process(es) "
             f"on {ctx.device}; accuracy before {before['accuracy']:.4f}", args, ctx)
        engine = Engine(model, train, epochs=args.epochs, eval_data=test, phase="finetune",
                        meta=_run_meta(args, spec, arch=desc["arch"]), **_engine_kwargs(args, ctx))
        engine.run()
        after = evaluate_model(model, test, ctx.device, batch_size=args.eval_batch_size, ctx=ctx)
        if ctx.is_main:
            out = Path(args.out)
            new_extra = {**extra, **_extra(spec, meta), "accuracy": after["accuracy"],
                         "accuracy_before_finetune": before["accuracy"], "phase": "finetune",
                         "finetune_epochs": args.epochs, "source": str(args.model_path)}
            save_pruned(model.cpu(), out / "finetuned", desc["arch"], desc["arch_kwargs"], extra=new_extra)
            engine.log.write({"phase": "finetune", "event": "saved", "path": str(out / "finetuned"),
                              "eval_accuracy": after["accuracy"], "accuracy_before": before["accuracy"]})
        _result(f"finetune: accuracy {before['accuracy']:.4f} -> {after['accuracy']:.4f}; saved "
                f"{Path(args.out) / 'finetuned'}.pt/.json", ctx)
        ctx.barrier()
    finally:
        cleanup(ctx, barrier=False)  # the success path met at the barrier above
    return 0


def cmd_onnx(args) -> int:
    from .artifacts import load_pruned, read_description
    from .decompose import export_onnx

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
    if args.fuse_bn:
        from .fusion import fuse_batchnorm

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
            export_onnx(model, (x,), out, dynamic_shapes=dynamic, verbose=False)
    finally:
        registry_log.setLevel(level)
    line = f"wrote {out} (input [{'batch' if args.dynamic_batch else 2}, {', '.join(map(str, chw))}])"
    try:
        import onnxruntime as ort
    except ImportError:
        _result(line + "; install onnxruntime to check it against the model")
        return 0
    session = ort.InferenceSession(str(out))
    with torch.no_grad():
        want = model(x)
    (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    err = float((torch.from_numpy(got) - want).abs().max())
    _result(line + f"; onnxruntime vs the model on random input: max abs difference {err:.2e}")
    if not err <= 1e-4 * max(1.0, float(want.abs().max())):  # NaN fails too
        print(f"stripeconv onnx: error: the ONNX model disagrees with the saved model (max abs difference {err:.2e})",
              file=sys.stderr)
        return 1
    return 0


def cmd_eval(args) -> int:
    from .artifacts import load_pruned, read_description
    from .engine import evaluate_model

    _check_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    desc = read_description(args.model_path)
    extra = desc.get("extra", {})
    spec = data_spec(args, extra.get("data"))
    _, test, meta = load_datasets(spec, train=False)
    _check_fits(desc, meta, args.model_path, spec)
    device = torch.device(args.device) if args.device not in (None, "auto") else \
        torch.device("cuda" if torch.cuda.is_available() else "cpu")
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
    from .artifacts import _constructor, load_pruned, read_description
    from .report import best_of, dense_counterpart, environment, layer_latency, model_latency

    _check_device(args.device)
    if args.output and Path(args.output).is_dir():  # found only after all the timing
        raise CLIError(f"--output {args.output} is a folder; expected a file name")
    if args.threads:
        torch.set_num_threads(args.threads)
    desc = read_description(args.model_path)
    chw = _input_chw(desc, args)
    device = torch.device(args.device) if args.device not in (None, "auto") else \
        torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = load_pruned(args.model_path, map_location=device)
    torch.manual_seed(0)
    unpruned = _constructor(desc["arch"])(**desc["arch_kwargs"]).to(device).eval()
    models = {"dense": unpruned, "masked_dense": dense_counterpart(model), "stripe": model}
    if args.fuse_bn:  # every model alike: BatchNorm folded into the conv before it
        from .fusion import fuse_batchnorm

        models = {n: fuse_batchnorm(m.eval(), inplace=True) for n, m in models.items()}
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
           "results": results, "layers": layers}
    if args.json:
        print(json.dumps(out, indent=1))
    else:
        print(f"{args.model_path} on {device} ({env['threads']} threads, load {env.get('loadavg_1m', '?')}), "
              f"median ms, fastest of layouts {'/'.join(layouts)}{', BatchNorm folded' if args.fuse_bn else ''}:")
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


def cmd_demo(args) -> int:
    from .demo import run_demo

    _check_device(args.device)
    _check_out_dir(args.out)
    run_demo(out=args.out, data=args.data, train_size=args.train_size, test_size=args.test_size,
             epochs=args.epochs, prune_epochs=args.prune_epochs, target=args.target, seed=args.seed,
             bench_batch=args.bench_batch, bench_threads=args.bench_threads or None, quiet=args.quiet,
             progress=not args.no_progress, resume=args.resume,
             threads=args.threads, device=args.device, quick=args.quick)
    return 0


# ========================================================================================= parser
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


def _input_chw(desc: dict, args) -> list:
    """``[C, H, W]``: ``--input-size``, else the input size recorded with the saved model."""
    if args.input_size:
        return list(args.input_size)
    recorded = desc.get("extra", {}).get("input_size")
    if not recorded:
        raise CLIError("the saved model does not record its input size: pass --input-size C H W")
    return list(recorded)[1:]


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


def _add_training(p, epochs: int, lr: float):
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
    g.add_argument("--out", default=None, metavar="DIR", help="output folder: checkpoint, metrics.jsonl, saved model")
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="stripeconv", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train, prune (stripe-wise and other methods), fine-tune, evaluate and benchmark CNNs whose "
                    "convs become StripeConv2d.", epilog=EPILOG)
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    fmt = argparse.ArgumentDefaultsHelpFormatter

    p = sub.add_parser("train", help="train a baseline (dense) model", description=textwrap.dedent("""\
        Train a dense baseline and save it as <out>/model.pt + model.json (stripeconv.artifacts format; load with
        stripeconv.artifacts.load_pruned). Checkpoints every epoch to <out>/train.ckpt; metrics to
        <out>/metrics.jsonl."""),
        epilog="example: stripeconv train --dataset fashion-mnist --epochs 10 --out runs/base")
    _add_model(p)
    _add_data(p)
    _add_training(p, epochs=10, lr=0.1)
    _add_common(p)
    p.set_defaults(func=cmd_train, _parser=p, out_default="runs/train")

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
    p.add_argument("--target", default=None, help="flops=F | ratio=R | ratios=JSON|FILE (a bare number means flops=)")
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
                        "measure a loss on held-out data (LBS, DAIS, DSA, ...; default 0.1 for them); never the test set")
    _add_model(p)
    _add_data(p)
    _add_training(p, epochs=10, lr=0.01)
    _add_common(p)
    p.set_defaults(func=cmd_prune, _parser=p, out_default="runs/prune")

    p = sub.add_parser("finetune", help="fine-tune a saved pruned model (masks fixed)",
                       description="Fine-tune a model saved by `stripeconv prune` (StripeConv2d layers train only "
                                   "their kept stripes) and save <out>/finetuned.pt + finetuned.json. The dataset "
                                   "defaults to the one the model was pruned on.",
                       epilog="example: stripeconv finetune runs/l1/pruned --epochs 5 --lr 0.01 --out runs/l1-ft")
    _add_saved_model(p)
    _add_data(p)
    _add_training(p, epochs=5, lr=0.01)
    _add_common(p)
    p.set_defaults(func=cmd_finetune, _parser=p, out_default="runs/finetune")

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
    p.add_argument("--output", "-o", required=True, metavar="FILE", help="the .onnx file to write")
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
                   help="CPU threads for the latency measurement (1 is stable on shared machines; 0: torch's default)")
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
        from . import __version__
        return __version__
    except Exception:  # pragma: no cover
        return "?"


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if hasattr(args, "out") and args.out is None and hasattr(args, "out_default"):
        args.out = args.out_default
    from .artifacts import ArtifactError
    from .data import DatasetFormatError
    from .engine import ResumeError

    try:
        return args.func(args) or 0
    except (CLIError, ArtifactError, DatasetFormatError, ResumeError) as e:  # the user's input, not a bug
        print(f"stripeconv {args.command}: error: {e}", file=sys.stderr)
        return 2
    except FileNotFoundError as e:  # DatasetNotFoundError included: its message says where and how
        print(f"stripeconv {args.command}: error: {e}", file=sys.stderr)
        if "Fashion-MNIST" in str(e):
            print("  (or try --dataset fashion-mnist-subset: 2000 + 500 images shipped with stripeconv)",
                  file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\nstripeconv {args.command}: interrupted; re-run with --resume to continue from the last "
              "checkpoint", file=sys.stderr)
        return 130


def run() -> None:
    """The ``stripeconv`` command: :func:`main`, then the process ends with its exit code.

    A process that joined a process group (under ``torchrun``) leaves through
    :func:`stripeconv.distributed.exit_process`, so that gloo's worker threads cannot abort it
    during interpreter shutdown.
    """
    from .distributed import exit_process, joined_process_group

    try:
        code = main()
    except BrokenPipeError:  # the reader went away (`stripeconv methods | head`): stop quietly, like a Unix tool
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the final flush cannot fail again
        code = 141  # 128 + SIGPIPE, what a shell reports for a command killed by a closed pipe
    except Exception:
        if not joined_process_group():
            raise
        traceback.print_exc()  # then leave as on success: a failing rank must not abort instead
        code = 1
    if joined_process_group():
        exit_process(code)
    sys.exit(code)


if __name__ == "__main__":  # pragma: no cover
    run()
