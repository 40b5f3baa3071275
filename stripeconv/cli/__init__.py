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

import os
import sys
import traceback
from typing import Optional

from .common import CLIError
from .data import DATASETS, PRESETS, build_model, load_datasets
from .methods import load_config, method_kwargs, method_params, parse_set, parse_target
from .parser import build_parser

__all__ = ["main", "run", "build_parser", "CLIError", "method_params", "method_kwargs", "parse_set", "parse_target",
           "load_config", "load_datasets", "build_model", "PRESETS", "DATASETS"]


def main(argv: Optional[list[str]] = None) -> int:
    """Run one command (``argv``, default ``sys.argv[1:]``) and return its exit status.

    User errors (bad options, missing or malformed data, a checkpoint from another run) print
    ``stripeconv COMMAND: error: ...`` and return 2; an interrupted run returns 130 and says how
    to resume.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    from ..artifacts import ArtifactError
    from ..data import DatasetFormatError, DatasetNotFoundError
    from ..engine import ResumeError

    try:
        return args.func(args) or 0
    except (CLIError, ArtifactError, DatasetFormatError, ResumeError) as e:  # the user's input, not a bug
        print(f"stripeconv {args.command}: error: {e}", file=sys.stderr)
        return 2
    except FileNotFoundError as e:  # DatasetNotFoundError included: its message says where and how
        print(f"stripeconv {args.command}: error: {e}", file=sys.stderr)
        hint = _subset_hint(args) if isinstance(e, DatasetNotFoundError) and "Fashion-MNIST" in str(e) else None
        if hint:
            print(f"  ({hint})", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        # only the training commands (and the demo) checkpoint and have --resume
        hint = "; re-run with --resume to continue from the last checkpoint" if hasattr(args, "resume") else ""
        print(f"\nstripeconv {args.command}: interrupted{hint}", file=sys.stderr)
        return 130


def _subset_hint(args) -> Optional[str]:
    """How the command that failed to find Fashion-MNIST can use the images shipped with stripeconv, in its own
    options (the demo has no --dataset)."""
    if args.command == "demo":
        return "or leave out --data: the demo then reads the installed Fashion-MNIST, else the 2000 + 500 images " \
               "shipped with stripeconv"
    if hasattr(args, "dataset"):
        return "or try --dataset fashion-mnist-subset: 2000 + 500 images shipped with stripeconv"
    return None


def run() -> None:
    """The ``stripeconv`` command: :func:`main`, then the process ends with its exit code.

    A process that joined a process group (under ``torchrun``) leaves through
    :func:`stripeconv.distributed.exit_process`, so that gloo's worker threads cannot abort it
    during interpreter shutdown.
    """
    from ..distributed import exit_process, joined_process_group

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
