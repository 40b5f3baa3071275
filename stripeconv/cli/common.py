"""What every command shares: the user-error type, output that respects ``--quiet`` and the rank,
the checks made before any work starts, and the run setup (threads, seed, process group)."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import torch


class CLIError(Exception):
    """A user error: printed as ``stripeconv: error: ...`` with exit status 2."""


def say(msg: str, args, ctx=None, err: bool = False) -> None:
    if ctx is not None and not ctx.is_main:
        return
    if getattr(args, "quiet", False) and not err:
        return
    print(msg, file=sys.stderr if err else sys.stdout, flush=True)


def say_result(msg: str, ctx=None) -> None:
    """Final results: printed even with --quiet (rank 0 only)."""
    if ctx is None or ctx.is_main:
        print(msg, flush=True)


# The saved model each training command writes into its --out folder.
SAVED_MODEL = {"train": "model", "prune": "pruned", "finetune": "finetuned"}


def setup_run(args):
    from ..distributed import init_from_env
    from ..pruning._search import show_bars

    if args.out is None:  # here, not at parsing: a config file's `out:` applies first
        args.out = args.out_default
    check_device(args.device)
    check_out_dir(args.out)
    show_bars(not args.no_progress)  # the pruners' scoring and search bars too
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    ctx = init_from_env(args.device)
    torch.manual_seed(args.seed)
    return ctx


def warn_replaced(args, ctx=None) -> None:
    """A fresh run into a folder that holds a finished run of the same command replaces its saved model: said
    (also with --quiet) once the run is about to start, not refused: re-running into a folder is an ordinary
    workflow."""
    name = SAVED_MODEL.get(args.command)
    if args.resume or name is None:
        return
    saved = Path(args.out) / name
    if (saved.parent / (saved.name + ".json")).is_file():
        say(f"stripeconv {args.command}: warning: {args.out} holds a finished run; this run replaces its saved model "
            f"{saved}.pt/.json, checkpoint and log (pass another --out to keep it)", args, ctx, err=True)


def engine_kwargs(args, ctx) -> dict:
    return dict(lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay, optimizer_name=args.optimizer,
                schedule=args.schedule, batch_size=args.batch_size, eval_batch_size=args.eval_batch_size,
                seed=args.seed, out_dir=args.out, resume=args.resume, ctx=ctx,
                progress=not (args.no_progress or args.quiet),
                quiet=args.quiet, max_steps_per_epoch=args.max_steps, num_workers=args.workers)


def saved_extra(spec: dict, meta: dict, **more) -> dict:
    return {"data": spec, "input_size": meta["input_size"], "num_classes": meta["num_classes"], **more}


def check_device(name: Optional[str]) -> None:
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


def check_out_dir(out: Optional[str]) -> None:
    if out and Path(out).exists() and not Path(out).is_dir():  # else found only after the first epoch
        raise CLIError(f"--out {out} is a file; expected a folder for the checkpoint, log and saved model")


def resume_meta(args, spec: dict, **more) -> dict:
    """What a resumed run must share with the run that wrote the checkpoint (the engine compares them)."""
    data = {k: spec.get(k) for k in ("dataset", "limit_train", "seed", "image_size")}
    training = {k: getattr(args, k) for k in ("lr", "momentum", "weight_decay", "optimizer", "schedule", "batch_size",
                                              "seed", "max_steps")}
    return {"command": args.command, "data": data, "training": training, **more}


def source_digest(path) -> str:
    """SHA-256 of a saved model's weights (``--from`` / ``finetune MODEL``): a resumed run must continue from
    the same model, whatever path names it."""
    import hashlib

    from ..artifacts import _base, _with

    h = hashlib.sha256()
    with open(_with(_base(path), ".pt"), "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def short_kwargs(kw: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in kw.items())
