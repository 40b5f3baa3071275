"""Multi-process training: DistributedDataParallel set up from torchrun's environment.

``torchrun --nproc_per_node N -m stripeconv prune ...`` starts N processes with ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` set; :func:`init_from_env`
reads them, joins the process group (``gloo`` on CPU, ``nccl`` on GPU) and returns a
:class:`DistContext`. Without those variables it returns a single-process context and nothing
else changes.

Pruner state stays identical on every rank: gradients are averaged by DDP before the pruner's
``after_backward`` sees them, so weight-based decisions are the same everywhere; the search
variables of DAIS and DSA, which live outside the model, have their held-out gradients averaged
by :func:`average_gradients` (each rank may hold its own part of ``val_data``); on top of that
:func:`broadcast_pruner_state` makes rank 0's masks, schedules and method state authoritative
after every pruning decision (one-shot ``prune(data)`` reads each rank's data), and
:func:`digest` / :func:`all_equal` check it. Only rank 0 writes files (``ctx.is_main``).
"""
from __future__ import annotations

import hashlib
import io
import logging
import os
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NoReturn, Optional, Sequence

import torch
import torch.distributed as dist
from torch import nn

if TYPE_CHECKING:  # for annotations only: the pruning package imports this module
    from .pruning import Pruner

__all__ = ["DistContext", "init_from_env", "single_process", "wrap_model", "unwrap",
           "broadcast_pruner_state", "broadcast_object", "digest", "all_equal", "all_reduce_sum", "average_gradients",
           "cleanup",
           "joined_process_group", "exit_process"]

_joined_process_group = False  # set once this process has initialised a process group


@dataclass
class DistContext:
    """Where this process stands: ``rank`` of ``world_size``, its ``device``; ``is_main`` writes files."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: Optional[str] = None
    owns_group: bool = False  # this context initialised the process group (and destroys it)

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()


def _pick_device(device: Optional[str], local_rank: int) -> torch.device:
    if device not in (None, "auto"):
        dev = torch.device(device)
        if dev.type == "cuda" and dev.index is None:
            dev = torch.device("cuda", local_rank)
        return dev
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def single_process(device: Optional[str] = None) -> DistContext:
    """A context for one process (no process group)."""
    return DistContext(device=_pick_device(device, 0))


def init_from_env(device: Optional[str] = None, backend: Optional[str] = None) -> DistContext:
    """Join the process group described by torchrun's environment variables (if any).

    ``device``: ``"cpu"``, ``"cuda"`` (this process's GPU is ``cuda:LOCAL_RANK``) or ``None``/``"auto"``
    (a GPU when there is one). ``backend`` defaults to ``nccl`` for GPUs and ``gloo`` for CPU.
    An already initialised process group is used as is.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 and not (dist.is_available() and dist.is_initialized()):
        return single_process(device)
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = _pick_device(device, local_rank)
    owns = False
    if not dist.is_initialized():
        backend = backend or ("nccl" if dev.type == "cuda" else "gloo")
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        dist.init_process_group(backend=backend)
        owns = True
        global _joined_process_group
        _joined_process_group = True
    return DistContext(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank, device=dev,
                       backend=dist.get_backend(), owns_group=owns)


def cleanup(ctx: DistContext, barrier: bool = True) -> None:
    """Leave the process group if :func:`init_from_env` created it.

    With ``barrier`` all ranks meet first: a rank that tears down its gloo connections while a
    peer still uses them aborts the peer. Pass ``barrier=False`` on an error path, where the
    other ranks may never arrive.
    """
    if ctx.owns_group and dist.is_initialized():
        if barrier:
            dist.barrier()
        dist.destroy_process_group()
        ctx.owns_group = False


def joined_process_group() -> bool:
    """Whether :func:`init_from_env` initialised a process group in this process (even if since left)."""
    return _joined_process_group


def exit_process(code: int) -> NoReturn:
    """End a process that has run collectives: flush its output, then leave without interpreter shutdown.

    A gloo worker thread releases a collective's tensors just after the caller has seen the
    collective complete, and releasing a tensor that Python has seen takes the GIL. When that
    happens after interpreter shutdown has begun, the thread is stopped inside a C++
    destructor and the whole process aborts (SIGABRT) after all its work is done; leaving the
    process group does not stop these threads. Like :mod:`multiprocessing`'s forked children,
    a distributed run therefore ends with :func:`os._exit` once its streams are flushed.
    """
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # closed or broken pipe: nothing more can be written anyway
            pass
    os._exit(code)


def wrap_model(model: nn.Module, ctx: DistContext) -> nn.Module:
    """``DistributedDataParallel(model)`` when running on several processes, else ``model``.

    DDP broadcasts rank 0's parameters and buffers at construction, so every rank starts equal.
    """
    if not ctx.distributed:
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    return DDP(model, device_ids=ids, output_device=ids[0] if ids else None)


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a ``DistributedDataParallel`` wrapper (:func:`wrap_model`), else ``model`` itself."""
    return model.module if hasattr(model, "module") and isinstance(getattr(model, "module"), nn.Module) \
        and type(model).__name__ == "DistributedDataParallel" else model


def broadcast_object(obj: Any, ctx: DistContext, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank (pickled; tensors come back on CPU)."""
    if not ctx.distributed:
        return obj
    if ctx.rank == src:
        buf = io.BytesIO()
        torch.save(_to_cpu(obj), buf)
        payload = [buf.getvalue()]
    else:
        payload = [None]
    dist.broadcast_object_list(payload, src=src, device=ctx.device if ctx.backend == "nccl" else None)
    return torch.load(io.BytesIO(payload[0]), map_location="cpu", weights_only=False)


def _to_cpu(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


def broadcast_pruner_state(pruner: Optional[Pruner], ctx: DistContext) -> None:
    """Make rank 0's pruner state (masks, frozen stripes, schedule, method state) every rank's."""
    if pruner is None or not ctx.distributed:
        return
    state = broadcast_object(pruner.state_dict() if ctx.is_main else None, ctx)
    if not ctx.is_main:
        pruner.load_state_dict(state)


def digest(tensors: dict) -> str:
    """SHA-256 of a dict of tensors (names, dtypes, shapes and bytes), for equality checks."""
    h = hashlib.sha256()
    for k in sorted(tensors):
        t = tensors[k]
        if not isinstance(t, torch.Tensor):
            h.update(f"{k}={t!r};".encode())
            continue
        t = t.detach().cpu().contiguous().reshape(-1)
        h.update(f"{k}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def all_equal(value: str, ctx: DistContext) -> bool:
    """True when ``value`` (e.g. a :func:`digest`) is the same on every rank."""
    if not ctx.distributed:
        return True
    out: list = [None] * ctx.world_size
    dist.all_gather_object(out, value)
    return all(v == out[0] for v in out)


def all_reduce_sum(values: list, ctx: DistContext) -> list:
    """Element-wise sum of a list of numbers over all ranks (float64)."""
    if not ctx.distributed:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=ctx.device if ctx.backend == "nccl" else "cpu")
    dist.all_reduce(t)
    return t.tolist()


def average_gradients(grads: Sequence[torch.Tensor]) -> list:
    """The mean of each gradient over all ranks of the running process group (one all-reduce).

    For parameters that live outside the DDP-wrapped model (a pruner's search variables): DDP
    averages only the model's gradients, so without this each rank would step on its own data
    and the ranks' search variables would drift apart. Without a process group of several
    ranks the gradients come back unchanged.
    """
    grads = list(grads)
    if not grads or not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return grads
    flat = torch.cat([g.detach().reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    return [chunk.view_as(g) for chunk, g in zip(flat.split([g.numel() for g in grads]), grads)]
