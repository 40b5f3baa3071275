"""Pruning methods on the command line: finding a method, typing its hyperparameters from its
signature (``--set``, ``--target``, ``--config`` files) and ``stripeconv methods``."""
from __future__ import annotations

import argparse
import inspect
import json
import os
import sys
import textwrap
from pathlib import Path
from typing import Any, Optional, Sequence, Union

from .common import CLIError


def method_params(cls: type) -> dict[str, inspect.Parameter]:
    """Keyword parameters of a pruning method (its own, then its bases' up to ``Pruner``), by name."""
    from ..pruning import Pruner

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


# Arguments of Pruner that subclasses set for themselves: not hyperparameters to list or record.
INTERNAL = ("require_target",)
# Supplied by the CLI at run time, or output only: not settings that identify a run.
_RUNTIME = ("val_data", "verbose")


def _public(params: dict) -> str:
    """The hyperparameter names to show a user, internal ones left out."""
    return ", ".join(k for k in params if k not in INTERNAL)


def effective_params(cls: type, kwargs: dict[str, Any]) -> dict[str, Any]:
    """The hyperparameters a method runs with: its signature's defaults, then ``kwargs`` (what ``--resume`` compares:
    ``--set alpha=1e-5`` is SWP's default, the same run as without it)."""
    out = {k: p.default for k, p in method_params(cls).items()
           if p.default is not inspect.Parameter.empty and k not in INTERNAL + _RUNTIME and _plain(p.default)}
    out.update(kwargs)
    return out


def _plain(value: Any) -> bool:
    """A value a checkpoint can record (they load with ``weights_only=True``): no function or object."""
    if isinstance(value, (list, tuple)):
        return all(_plain(v) for v in value)
    return value is None or isinstance(value, (bool, int, float, str))


def methods_taking(name: str) -> list[str]:
    """The methods with an argument ``name`` (e.g. ``val_data``: those that measure on held-out data)."""
    return [k for k, cls in _methods().items() if name in method_params(cls)]


def _methods():
    from ..pruning import METHODS

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


# Arguments of every method that take a collection of layer names (Pruner's ``layers`` and ``exclude``).
_NAME_LISTS = ("layers", "exclude")


def _is_collection(p: Optional[inspect.Parameter], default: Any, ann: str) -> bool:
    if p is None:
        return False
    return p.name in _NAME_LISTS or isinstance(default, (tuple, list)) or \
        ann in ("tuple", "optional[tuple]", "list", "optional[list]")


def _collection(value: str, p: inspect.Parameter, default: Any) -> Any:
    """A list-valued argument: a JSON/YAML list as it is, else comma-separated items (``layers=features.3``
    is one layer, never the characters of its name)."""
    parsed = _literal(value)
    if isinstance(parsed, (list, tuple)):
        return parsed
    items = [s.strip() for s in value.split(",") if s.strip()]
    if not items:
        raise CLIError(f"{p.name}: expected a comma-separated list or a JSON list, got {value!r}")
    if p.name in _NAME_LISTS:
        return items
    try:  # the tuples of the methods' signatures hold numbers
        numbers = [float(s) for s in items]
    except ValueError:
        raise CLIError(f"{p.name}: expected comma-separated numbers or a JSON list, got {value!r}") from None
    return tuple(numbers) if isinstance(default, tuple) else numbers


def coerce(value: str, p: Optional[inspect.Parameter]) -> Any:
    """Parse ``value`` for parameter ``p`` (type from its default or annotation; else YAML/JSON literal)."""
    ann = _ann(p).lower() if p is not None else ""
    default = p.default if p is not None and p.default is not inspect.Parameter.empty else None
    low = value.strip().lower()
    if low in ("none", "null"):
        return None
    if _is_collection(p, default, ann):
        return _collection(value, p, default)
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
    except (ValueError, OverflowError):  # OverflowError: int(float("inf"))
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


def parse_set(items: Optional[Sequence[str]], params: dict[str, inspect.Parameter]) -> dict[str, Any]:
    """``["alpha=1e-4", "threshold=0.02"]`` -> typed dict, checked against the method's ``params``."""
    out = {}
    for item in items or []:
        if "=" not in item:
            raise CLIError(f"--set expects key=value, got {item!r}")
        key, value = item.split("=", 1)
        key = key.strip().replace("-", "_")
        if key not in params:
            raise CLIError(f"unknown hyperparameter {key!r}; this method takes: {_public(params)}")
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
            return {"ratios": _check_ratios(load_config(p), f"--target ratios={value}")}
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


def load_config(path: Union[str, os.PathLike]) -> dict[str, Any]:
    """The mapping in a config file: JSON for ``.json``, else YAML (or JSON without PyYAML); an empty
    file is ``{}``. An unreadable or malformed file, or one that holds no mapping, is a :class:`CLIError`."""
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


def method_kwargs(cls: type, args: argparse.Namespace, config: dict[str, Any]) -> dict[str, Any]:
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
        raise CLIError(f"{args.config}: unknown keys {unknown}; {cls.__name__} takes: {_public(params)}; "
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
        raise CLIError(f"{cls.__name__} does not take {sorted(unknown)}; it takes: {_public(params)}")
    if "epochs" in params and kw.get("epochs") is None and args.epochs:
        kw["epochs"] = args.epochs
    return kw


def apply_config_defaults(args, config: dict) -> None:
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
    from ..pruning import Pruner

    common = method_params(Pruner)
    supplied = {"val_data": "val_data (the CLI holds out --val-split of the training data)",
                "search_steps": "search_steps (CLI default: half of the training steps)"}
    for name, cls in methods.items():
        print(f"{name}: {_doc_line(cls)}")
        own = {k: p for k, p in method_params(cls).items() if k not in INTERNAL and
               (args.all or k not in common or p.default != common[k].default)}
        parts = [f"{k}={p.default!r}" if p.default is not inspect.Parameter.empty
                 else supplied.get(k, f"{k} (required)") for k, p in own.items()]
        if parts:
            print(textwrap.fill(", ".join(parts), width=100, initial_indent="    ", subsequent_indent="    "))
        print()
    parts = [f"{k}={p.default!r}" for k, p in common.items() if k not in INTERNAL]
    print("Common to every method (see `stripeconv methods --all`):")
    print(textwrap.fill(", ".join(parts), width=100, initial_indent="    ", subsequent_indent="    "))
    print("\nSet hyperparameters with `stripeconv prune --method NAME --set key=value` or `--config file.yaml`.")
    return 0
