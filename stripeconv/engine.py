"""The training engine behind the CLI: drives any :class:`~stripeconv.pruning.Pruner` through its
hooks, with checkpoint/resume, multi-process (DDP) training, progress bars and a JSONL metrics log.

Its loop is a superset of :func:`stripeconv.pruning.fit`, in the same hook order::

    per batch:  out = model(x); loss = loss_fn(out, y) + pruner.penalty()
                optimizer.zero_grad(); loss.backward()        # DDP averages gradients here
                pruner.after_backward(); optimizer.step(); pruner.after_step()
    per epoch:  scheduler.step(); pruner.end_epoch(epoch); [re-estimate BN statistics]
                [sync BN buffers]; [broadcast pruner state from rank 0]; evaluate; write checkpoint;
                log; callback(record)

Re-estimating BN statistics: pruning decisions at an epoch end zero filters, which changes the
inputs of every later BatchNorm, so running statistics gathered before the decision no longer
fit and an eval-mode model can collapse to chance accuracy until it trains again. With a pruner
attached, the engine re-estimates them after ``end_epoch`` on ``recalibrate_bn`` training
batches (forward passes only, BN in train mode, everything else in eval mode; 0 turns it off).

One-shot methods: ``oneshot=True`` calls ``pruner.prune(prune_data)`` before the first epoch and
re-estimates the BN statistics as above (the epochs then fine-tune with the same hooks, which keep
pruned stripes at zero).

Resuming: after every epoch the engine writes (atomically, rank 0 only) the model, optimizer,
scheduler and pruner state dicts, the RNG states, the epoch and the history. ``resume=True``
loads that checkpoint and continues with the next epoch. The data order of an epoch is a
function of ``(seed, epoch)`` only (a ``DistributedSampler`` seeded with ``seed`` and
``set_epoch(epoch)``, with one shard per rank; a fresh loader generator seeded from
``(seed, epoch)``), so a run killed at any point and resumed replays the interrupted epoch exactly
and ends with the same masks and weights as an uninterrupted run (on CPU; CUDA kernels may be
non-deterministic).

Example (what :func:`stripeconv.pruning.fit` does, plus checkpoints and logs)::

    from stripeconv.engine import Engine
    pruner = pruning.SWP(model, input_size=(1, 1, 28, 28), target_flops_reduction=0.5, epochs=10)
    history = Engine(model, train_set, pruner=pruner, epochs=10, eval_data=test_set,
                     out_dir="runs/swp", resume=True).run()
"""
from __future__ import annotations

import json
import math
import os
import pickle
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from ._console import write_line
from ._modes import set_eval
from .checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from .distributed import (DistContext, all_equal, all_reduce_sum, broadcast_pruner_state, digest, single_process,
                          wrap_model)

if TYPE_CHECKING:  # for annotations only: the pruning package is imported where it is used
    from .pruning import Pruner

__all__ = ["Engine", "fit", "MetricsLog", "is_oneshot", "make_optimizer", "make_scheduler", "stripe_density",
           "evaluate_model", "epoch_loader", "ResumeError"]

CHECKPOINT_FORMAT = 1


class ResumeError(ValueError):
    """A checkpoint that this run cannot continue from: unreadable, or written by a different run."""


# ------------------------------------------------------------------------------------- helpers
def _compiled_module(model: nn.Module) -> nn.Module:
    """The module a ``torch.compile`` wrapper runs, else ``model``: checkpoints hold its state dict,
    without the wrapper's ``_orig_mod.`` prefix, so compiled and plain runs resume each other."""
    inner = getattr(model, "_orig_mod", None)
    return inner if type(model).__name__ == "OptimizedModule" and isinstance(inner, nn.Module) else model


def is_oneshot(pruner: Pruner) -> bool:
    """Whether a pruner prunes in one shot (``prune(data)``) rather than during training.

    A class attribute ``oneshot`` decides when present; otherwise a method that overrides none of
    the training hooks (``penalty``, ``after_step``, ``end_epoch``) is one-shot.
    """
    from .pruning import Pruner

    flag = getattr(type(pruner), "oneshot", None)
    if flag is not None:
        return bool(flag)
    cls = type(pruner)
    return all(getattr(cls, h) is getattr(Pruner, h) for h in ("penalty", "after_step", "end_epoch"))


def make_optimizer(model: nn.Module, name: str = "sgd", lr: float = 0.1, momentum: float = 0.9,
                   weight_decay: float = 1e-4) -> torch.optim.Optimizer:
    """SGD (momentum, weight decay) or AdamW over every parameter of ``model`` (create it after the pruner)."""
    if name == "sgd":
        return torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r} (sgd, adamw)")


def make_scheduler(optimizer: torch.optim.Optimizer, epochs: int,
                   name: str = "step") -> Optional[torch.optim.lr_scheduler.LRScheduler]:
    """``step``: LR x0.1 at 50 % and 75 % of the epochs (SWP's recipe, :func:`fit`'s default);
    ``cosine``: cosine annealing to 0; ``constant``: none."""
    if name == "step":
        return torch.optim.lr_scheduler.MultiStepLR(optimizer, [max(1, int(epochs * 0.5)), max(1, int(epochs * 0.75))],
                                                    0.1)
    if name == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, max(1, epochs))
    if name in ("constant", "none"):
        return None
    raise ValueError(f"unknown schedule {name!r} (step, cosine, constant)")


def stripe_density(pruner: Optional[Pruner]) -> Optional[float]:
    """Kept stripes / all stripes over the pruner's layers (None without a pruner)."""
    if pruner is None:
        return None
    masks = pruner._masks if hasattr(pruner, "_masks") else pruner.masks()
    total = sum(m.numel() for m in masks.values())
    return float(sum(int(m.sum()) for m in masks.values()) / total) if total else 1.0


def _is_dataset(data) -> bool:
    return isinstance(data, Dataset) and not isinstance(data, DataLoader)


def _loader_seed(seed: int, epoch: int) -> int:
    return (seed * 1_000_003 + epoch * 7919 + 12345) % (2 ** 62)


def epoch_loader(dataset: Dataset, batch_size: int, epoch: int, seed: int, rank: int = 0, world_size: int = 1,
                 shuffle: bool = True, num_workers: int = 0, drop_last: bool = False) -> DataLoader:
    """The loader of one epoch: its order (and worker seeds) depend only on ``(seed, epoch)``.

    Each rank reads its shard of a ``DistributedSampler(seed=seed)`` after ``set_epoch(epoch)``.
    """
    from torch.utils.data.distributed import DistributedSampler

    sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=shuffle, seed=seed,
                                 drop_last=drop_last)
    sampler.set_epoch(epoch)
    g = torch.Generator().manual_seed(_loader_seed(seed, epoch))
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers, generator=g,
                      drop_last=drop_last, persistent_workers=False)


def _shard(dataset: Dataset, rank: int, world_size: int) -> Dataset:
    if world_size <= 1:
        return dataset
    return Subset(dataset, list(range(rank, len(dataset), world_size)))


@torch.no_grad()
def evaluate_model(model: nn.Module, data: Iterable, device: Optional[Union[str, torch.device]] = None,
                   loss_fn: Optional[Callable] = None, batch_size: int = 256, ctx: Optional[DistContext] = None,
                   num_workers: int = 0) -> dict:
    """Top-1 accuracy and mean loss of ``model`` on ``data`` (a Dataset or a loader), eval mode.

    Under DDP each rank evaluates a disjoint shard of a Dataset and the sums are all-reduced.
    """
    ctx = ctx or single_process()
    if device is None:
        p = next(model.parameters(), None)
        device = p.device if p is not None else torch.device("cpu")
    loss_fn = loss_fn or F.cross_entropy
    if _is_dataset(data):
        loader = DataLoader(_shard(data, ctx.rank, ctx.world_size), batch_size=batch_size, shuffle=False,
                            num_workers=num_workers)
        sharded = True
    else:
        loader, sharded = data, False
    restore = set_eval(model)
    correct = total = 0
    loss_sum = 0.0
    try:
        for x, y in loader:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            out = model(x)
            loss_sum += float(loss_fn(out, y)) * len(y)  # as pruning.evaluate does
            correct += int((out.argmax(1) == y).sum())
            total += len(y)
    finally:
        restore()
    if sharded and ctx.distributed:
        correct, total, loss_sum = all_reduce_sum([correct, total, loss_sum], ctx)
    return {"accuracy": correct / max(total, 1), "loss": loss_sum / max(total, 1), "samples": int(total)}


class MetricsLog:
    """Append-only JSONL log (one JSON object per line), written by rank 0 only."""

    def __init__(self, path: Optional[Union[str, os.PathLike]], enabled: bool = True):
        self.path = Path(path) if path is not None else None
        self.enabled = enabled and self.path is not None

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as f:
            f.write(json.dumps(_jsonable(record)) + "\n")
            f.flush()

    def read(self) -> list:
        if self.path is None or not self.path.is_file():
            return []
        out = []
        for line in self.path.read_text().splitlines():
            line = line.strip()
            if line:
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:  # a line cut by a kill
                    pass
        return out

    def truncate(self, phase: str, from_epoch: int, keep_earlier: bool = False) -> None:
        """Drop the records of ``phase`` from epoch ``from_epoch`` on (they will be written again on resume).

        ``from_epoch <= 0`` drops every record of ``phase`` (a run that starts over) unless ``keep_earlier``
        (a resume: records of earlier epochs, such as the one-shot step's at epoch -1, stay); records without
        an ``epoch`` (written after the last epoch, such as a final "saved" event) are dropped too.
        """
        if not self.enabled or not self.path.is_file():
            return

        def stale(r: dict) -> bool:
            return r.get("phase") == phase and ((from_epoch <= 0 and not keep_earlier) or "epoch" not in r
                                                or r["epoch"] >= from_epoch)

        keep = [r for r in self.read() if not stale(r)]
        tmp = self.path.with_suffix(self.path.suffix + ".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in keep))
        os.replace(tmp, self.path)


def _differences(a: dict, b: dict, prefix: str = "") -> list:
    """``(key, a value, b value)`` for every differing entry, nested keys dotted."""
    out = []
    for k in sorted(set(a) | set(b)):
        x, y = a.get(k), b.get(k)
        if isinstance(x, dict) and isinstance(y, dict):
            out += _differences(x, y, f"{prefix}{k}.")
        elif x != y:
            out.append((f"{prefix}{k}", x, y))
    return out


def _refuse_settings(diffs: list) -> None:
    detail = "; ".join(f"{k}: {a!r} -> {b!r}" for k, a, b in diffs)
    raise ResumeError(f"the checkpoint was written by a run with other settings ({detail}); resume with the same "
                      "settings")


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    if isinstance(obj, Path):
        return str(obj)
    return repr(obj)


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, batches: Iterable, num_batches: int, device=None) -> None:
    """Re-estimate every BatchNorm's running statistics from ``num_batches`` of ``batches``.

    Only BN layers run in train mode (cumulative averages over the batches); dropout and the
    rest stay in eval mode, and the model's train/eval flags are restored afterwards.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not norms or num_batches <= 0:
        return
    momenta = {m: m.momentum for m in norms}
    restore = set_eval(model)
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average: every batch weighs the same
        m.train()
    try:
        for i, (x, _) in enumerate(batches):
            if i >= num_batches:
                break
            model(x.to(device) if device is not None else x)
    finally:
        for m in norms:
            m.momentum = momenta[m]
        restore()


def _progress_factory(enabled: bool):
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm


# --------------------------------------------------------------------------------------- engine
class Engine:
    """Train ``model`` for ``epochs`` (while ``pruner`` prunes it, if given).

    ``train_data``: a ``Dataset`` (the engine builds each epoch's loader, shuffled as a function
    of ``(seed, epoch)``, sharded per rank) or any iterable of ``(x, y)`` batches (used as is;
    ``set_epoch(epoch)`` is called on its sampler when it has one). ``eval_data`` likewise.
    Without ``optimizer``: SGD (``lr``, ``momentum``, ``weight_decay``) and ``schedule``
    (``step``: LR x0.1 at 50 % and 75 %, ``cosine``, ``constant``), created here, after the pruner
    attached its parameters. ``out_dir``: where the checkpoint (``checkpoint``, default
    ``<phase>.ckpt``) and the JSONL log (``log``, default ``metrics.jsonl``) go; ``None`` writes
    nothing. ``resume``: continue from the checkpoint when there is one. ``ctx``: a
    :class:`~stripeconv.distributed.DistContext` (default: single process); the model is wrapped
    in DDP when it spans several processes. ``progress``: tqdm bars (when tqdm is installed);
    ``quiet``: no printed lines (per-epoch summaries go to stderr otherwise).
    ``callback(record)`` runs after each epoch's
    checkpoint (an exception there stops the run with that checkpoint on disk).
    """

    def __init__(
        self,
        model: nn.Module,
        train_data,
        *,
        epochs: int,
        pruner=None,
        optimizer: Optional[torch.optim.Optimizer] = None,
        scheduler=None,
        lr: float = 0.1,
        momentum: float = 0.9,
        weight_decay: float = 1e-4,
        optimizer_name: str = "sgd",
        schedule: str = "step",
        batch_size: int = 64,
        eval_data=None,
        eval_batch_size: int = 256,
        device: Optional[Union[str, torch.device]] = None,
        seed: int = 0,
        out_dir: Optional[Union[str, os.PathLike]] = None,
        phase: str = "train",
        checkpoint: Optional[str] = None,
        log: Optional[str] = "metrics.jsonl",
        resume: bool = False,
        start_epoch: int = 0,
        oneshot: Optional[bool] = None,
        prune_data=None,
        ctx: Optional[DistContext] = None,
        loss_fn: Optional[Callable] = None,
        callback: Optional[Callable[[dict], None]] = None,
        progress: bool = True,
        quiet: bool = False,
        max_steps_per_epoch: Optional[int] = None,
        num_workers: int = 0,
        check_consistency: bool = True,
        recalibrate_bn: int = 20,
        meta: Optional[dict] = None,
    ):
        self.ctx = ctx or single_process(None if device is None else str(device))
        if device is not None:
            model.to(device)
        p = next(model.parameters(), None)
        self.device = p.device if p is not None else self.ctx.device
        self.model = model
        self.pruner = pruner
        self.epochs = int(epochs)
        self.train_data, self.eval_data = train_data, eval_data
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.seed = seed
        self.loss_fn = loss_fn or F.cross_entropy
        self.callback = callback
        self.quiet = quiet
        self.bar = _progress_factory(progress and self.ctx.is_main)
        self.max_steps_per_epoch = max_steps_per_epoch
        self.num_workers = num_workers
        self.check_consistency = check_consistency
        self.recalibrate_bn = recalibrate_bn
        self.phase = phase
        self.meta = dict(meta or {})
        self.oneshot = (is_oneshot(pruner) if pruner is not None else False) if oneshot is None else oneshot
        self.prune_data = prune_data
        if optimizer is None:
            optimizer = make_optimizer(model, optimizer_name, lr, momentum, weight_decay)
            if scheduler is None:
                scheduler = make_scheduler(optimizer, self.epochs, schedule)
        self.optimizer, self.scheduler = optimizer, scheduler
        self.out_dir = Path(out_dir) if out_dir is not None else None
        writes = self.out_dir is not None and self.ctx.is_main
        self.checkpoint_path = (self.out_dir / (checkpoint or f"{phase}.ckpt")) if self.out_dir is not None else None
        self.log = MetricsLog(self.out_dir / log if (self.out_dir is not None and log) else None, enabled=writes)
        self.history: list[dict] = []
        self.start_epoch = start_epoch
        self.oneshot_done = False
        self.resumed_from: Optional[int] = None
        if resume:
            self.try_resume()
        else:
            self.log.truncate(phase, 0)  # a fresh run replaces this phase's old records

    # ---------------------------------------------------------------------------- checkpoint
    def state_dict(self, epoch: int) -> dict:
        """Everything a resumed run needs, after ``epoch + 1`` completed epochs."""
        return {
            "format": CHECKPOINT_FORMAT,
            "phase": self.phase,
            "epoch": epoch + 1,  # epochs completed
            "epochs": self.epochs,
            "model": _compiled_module(self.model).state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "pruner": self.pruner.state_dict() if self.pruner is not None else None,
            "oneshot_done": self.oneshot_done,
            "rng": rng_state(),
            "seed": self.seed,
            "history": self.history,
            "meta": self.meta,
        }

    def save(self, epoch: int) -> None:
        if self.checkpoint_path is not None and self.ctx.is_main:
            save_checkpoint(self.checkpoint_path, self.state_dict(epoch))

    def load_state_dict(self, state: dict) -> None:
        """Continue from ``state``; :class:`ResumeError` when it was written by a run with other settings
        (continuing would silently mix the two runs and match neither)."""
        if state.get("phase", self.phase) != self.phase:
            raise ResumeError(f"checkpoint is of phase {state.get('phase')!r}, this run is {self.phase!r}")
        shared = set(state.get("meta") or {}) & set(self.meta)  # a checkpoint of an older version records less
        diffs = _differences(_jsonable({k: state["meta"][k] for k in shared}),
                             _jsonable({k: self.meta[k] for k in shared}))
        # Other settings first (a run of another method differs in its epochs too, and saying so would hide the
        # cause), then the epochs, which a pruner's own schedule follows.
        causes = [d for d in diffs if d[0].split(".")[-1] != "epochs"]
        if causes:
            # a changed method or model changes its nested settings too: name the cause alone
            _refuse_settings([d for d in causes if "." not in d[0]] or causes)
        if "epochs" in state and int(state["epochs"]) != self.epochs:
            # the LR schedule (and a pruner's) were laid out for the checkpoint's number of epochs
            raise ResumeError(f"the checkpoint was written by a run of {state['epochs']} epochs, this run has "
                              f"{self.epochs}; resume with the same number of epochs")
        if diffs:
            _refuse_settings(diffs)
        if self.pruner is not None and state.get("pruner") is None:
            raise ResumeError("the checkpoint has no pruner state but this run prunes")
        try:
            _compiled_module(self.model).load_state_dict(state["model"])
            if self.pruner is not None:
                self.pruner.load_state_dict(state["pruner"])
            self.optimizer.load_state_dict(state["optimizer"])
        except (RuntimeError, KeyError, ValueError, TypeError) as e:
            raise ResumeError(f"the checkpoint does not fit this model or method ({e})") from e
        if self.scheduler is not None and state.get("scheduler") is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"])
        self.start_epoch = int(state["epoch"])
        self.history = list(state.get("history", []))
        self.oneshot_done = bool(state.get("oneshot_done", False))

    def try_resume(self) -> bool:
        """Load the checkpoint if there is one (every rank reads rank 0's file); returns whether it did."""
        path = self.checkpoint_path
        if path is None:
            return False
        found = path.is_file()
        if self.ctx.distributed:  # rank 0 decides; the others read the same (shared) file
            from .distributed import broadcast_object
            found = broadcast_object(found, self.ctx)
        if not found:
            self._print(f"[{self.phase}] no checkpoint at {path}: starting from scratch")
            self.log.truncate(self.phase, 0)  # records of a run killed before its first checkpoint
            return False
        try:
            state = load_checkpoint(path, map_location=self.device)
        except (RuntimeError, EOFError, OSError, KeyError, ValueError, pickle.UnpicklingError) as e:
            raise ResumeError(f"cannot read the checkpoint {path} (truncated or corrupted: {type(e).__name__}: {e}); "
                              "delete it to start over") from e
        if not isinstance(state, dict) or "model" not in state or "epoch" not in state:
            raise ResumeError(f"{path} is not a checkpoint written by stripeconv's training engine")
        try:
            self.load_state_dict(state)
        except ResumeError as e:
            raise ResumeError(f"cannot resume from {path}: {e}") from e
        self.resumed_from = self.start_epoch
        self.log.truncate(self.phase, self.start_epoch, keep_earlier=True)  # the one-shot step is not redone
        self._print(f"[{self.phase}] resumed from {path} after epoch {self.start_epoch}/{self.epochs}")
        return True

    # ------------------------------------------------------------------------------- running
    def _print(self, msg: str) -> None:
        if not self.quiet and self.ctx.is_main:
            write_line(msg)

    def _train_loader(self, epoch: int) -> Iterable:
        if _is_dataset(self.train_data):
            return epoch_loader(self.train_data, self.batch_size, epoch, self.seed, self.ctx.rank,
                                self.ctx.world_size, num_workers=self.num_workers)
        sampler = getattr(self.train_data, "sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
        return self.train_data

    @torch.no_grad()
    def _sync_buffers(self) -> None:
        """Rank 0's BN running statistics everywhere (DDP leaves each rank's last update)."""
        if not self.ctx.distributed:
            return
        import torch.distributed as dist

        for b in self.model.buffers():
            if b.dtype.is_floating_point or b.dtype in (torch.int64, torch.int32):
                dist.broadcast(b, 0)

    def _after_pruning_decision(self, record: dict) -> None:
        if self.pruner is None or not self.ctx.distributed:
            return
        if self.check_consistency:
            record["masks_consistent"] = all_equal(digest(self.pruner.state_dict()["masks"]), self.ctx)
        broadcast_pruner_state(self.pruner, self.ctx)

    def run_oneshot(self) -> Optional[dict]:
        """``pruner.prune(prune_data)`` (once; skipped when resumed after it)."""
        if self.pruner is None or not self.oneshot or self.oneshot_done:
            return None
        t = time.perf_counter()
        self.pruner.prune(self.prune_data)
        if self.recalibrate_bn:  # the statistics of the unpruned model do not fit (an --epochs 0 run keeps them)
            recalibrate_batchnorm(self.model, self._train_loader(self.start_epoch), self.recalibrate_bn, self.device)
            self._sync_buffers()
        self.oneshot_done = True
        record = {"phase": self.phase, "event": "oneshot_prune", "epoch": -1,
                  "flops_reduction": self.pruner.flops_reduction(), "density": stripe_density(self.pruner),
                  "time_s": time.perf_counter() - t}
        self._after_pruning_decision(record)
        self.log.write(record)
        self._print(f"[{self.phase}] one-shot pruning: FLOPs -{record['flops_reduction']:.1%}, "
                    f"stripe density {record['density']:.3f}")
        return record

    def run(self) -> list[dict]:
        """Train the remaining epochs; returns the per-epoch records (those before a resume included)."""
        if self.start_epoch >= self.epochs and self.resumed_from is not None:
            self._print(f"[{self.phase}] already complete ({self.epochs} epochs)")
            if self.pruner is not None and self.oneshot and not self.oneshot_done:
                self.run_oneshot()
            return self.history
        if self.run_oneshot() is not None:  # a search (ACP, MetaPruning) is not redone after a kill in epoch 1
            self.save(self.start_epoch - 1)
        net = wrap_model(self.model, self.ctx)
        for epoch in range(self.start_epoch, self.epochs):
            record = self._train_epoch(net, epoch)
            self.history.append(record)
            self.save(epoch)
            self.log.write(record)
            self._print(self._summary(record))
            if self.callback is not None:
                self.callback(record)
        return self.history

    def _train_epoch(self, net: nn.Module, epoch: int) -> dict:
        t0 = time.perf_counter()
        pruner, opt = self.pruner, self.optimizer
        net.train()
        loader = self._train_loader(epoch)
        total = None
        try:
            total = len(loader)
        except TypeError:
            pass
        if self.max_steps_per_epoch is not None and total is not None:
            total = min(total, self.max_steps_per_epoch)
        it = loader
        bar = None
        if self.bar is not None:
            bar = self.bar(loader, total=total, desc=f"{self.phase} {epoch + 1}/{self.epochs}", leave=False,
                           dynamic_ncols=True)
            it = bar
        lr = opt.param_groups[0]["lr"]
        seen = correct = 0
        loss_sum = 0.0
        for i, (x, y) in enumerate(it):
            if self.max_steps_per_epoch is not None and i >= self.max_steps_per_epoch:
                break
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            out = net(x)
            loss = self.loss_fn(out, y)
            if pruner is not None:
                loss = loss + pruner.penalty()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if pruner is not None:
                pruner.after_backward()
            opt.step()
            if pruner is not None:
                pruner.after_step()
            n = len(y)
            loss_sum += float(loss.detach()) * n
            correct += int((out.detach().argmax(1) == y).sum())
            seen += n
            if bar is not None and (i % 10 == 0 or i + 1 == total):
                post = {"loss": f"{loss_sum / seen:.3f}", "acc": f"{correct / seen:.3f}"}
                if pruner is not None:
                    post["density"] = f"{stripe_density(pruner):.3f}"
                bar.set_postfix(post, refresh=False)
        if bar is not None:
            bar.close()
        if self.scheduler is not None:
            self.scheduler.step()
        if pruner is not None:
            pruner.end_epoch(epoch)
            if self.recalibrate_bn:
                recalibrate_batchnorm(self.model, self._train_loader(epoch), self.recalibrate_bn, self.device)
        self._sync_buffers()
        loss_sum, correct, seen = all_reduce_sum([loss_sum, correct, seen], self.ctx)
        record: dict[str, Any] = {"phase": self.phase, "epoch": epoch, "train_loss": loss_sum / max(seen, 1),
                                  "train_accuracy": correct / max(seen, 1), "lr": lr, "samples": int(seen)}
        if pruner is not None:
            self._after_pruning_decision(record)
            record["flops_reduction"] = pruner.flops_reduction()
            record["density"] = stripe_density(pruner)
        if self.eval_data is not None:
            ev = evaluate_model(self.model, self.eval_data, self.device, self.loss_fn, self.eval_batch_size, self.ctx,
                                self.num_workers)
            record.update({"eval_accuracy": ev["accuracy"], "eval_loss": ev["loss"]})
        record["time_s"] = round(time.perf_counter() - t0, 3)
        if self.ctx.distributed:
            record["world_size"] = self.ctx.world_size
        return record

    def _summary(self, r: dict) -> str:
        s = (f"[{self.phase}] epoch {r['epoch'] + 1}/{self.epochs}: loss {r['train_loss']:.4f} "
             f"acc {r['train_accuracy']:.4f}")
        if "eval_accuracy" in r:
            s += f" | eval acc {r['eval_accuracy']:.4f}"
        if "flops_reduction" in r:
            s += f" | FLOPs -{r['flops_reduction']:.1%} density {r['density']:.3f}"
        return s + f" | {r['time_s']:.1f}s"


def fit(model: nn.Module, pruner: Optional[Pruner], train_loader: Iterable, epochs: int,
        optimizer: Optional[torch.optim.Optimizer] = None,
        scheduler: Optional[torch.optim.lr_scheduler.LRScheduler] = None,
        device: Optional[Union[str, torch.device]] = None, eval_loader: Optional[Iterable] = None,
        loss_fn: Optional[Callable] = None, start_epoch: int = 0, callback: Optional[Callable[[dict], None]] = None,
        progress: bool = True, max_steps_per_epoch: Optional[int] = None, **engine_kwargs) -> list[dict]:
    """:func:`stripeconv.pruning.fit`'s signature and behaviour, run by the :class:`Engine`.

    Same hook order, same default optimizer and schedule, same records (plus ``phase``, ``lr``,
    ``samples``, ``density``, ``time_s``); it prints nothing. A one-shot pruner that has not pruned
    yet prunes on ``train_loader`` before the first epoch. ``engine_kwargs`` adds the engine's
    options (``out_dir=``/``resume=`` for checkpoints and the JSONL log, ``ctx=`` for DDP, ...).
    """
    engine_kwargs.setdefault("quiet", True)
    if "oneshot" not in engine_kwargs:
        # Without this a one-shot method would train the unpruned model and export it unpruned.
        engine_kwargs["oneshot"] = pruner is not None and is_oneshot(pruner) and not pruner.has_pruned
    engine_kwargs.setdefault("prune_data", train_loader)
    engine_kwargs.setdefault("log", "metrics.jsonl" if engine_kwargs.get("out_dir") is not None else None)
    return Engine(model, train_loader, pruner=pruner, epochs=epochs, optimizer=optimizer, scheduler=scheduler,
                  device=device, eval_data=eval_loader, loss_fn=loss_fn, start_epoch=start_epoch, callback=callback,
                  progress=progress, max_steps_per_epoch=max_steps_per_epoch, **engine_kwargs).run()
