"""Private helpers shared by the pruning methods (GReg, LBS, DAIS, DSA, PFP, CPMC, FunctionalityPruning,
...): progress reporting, unit scores, residual coupling, prunable channel groups, checkpointable
batch cursors and sample passes, per-channel output gates and the differentiable FLOPs count."""
from __future__ import annotations

import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Optional

import torch
from torch import Tensor, nn

from .._console import write_line
from .._modes import set_eval

__all__ = ["Progress", "note", "mean_abs_units", "coupled_convs", "ChannelUnit", "channel_units", "BatchCursor", "replay",
           "sample_pass",
           "gate_outputs", "gate_module_of", "ExpectedFlops",
           "batchnorm_statistics_kept"]


_bars = True


def show_bars(enabled: bool) -> None:
    """Whether :class:`Progress` draws tqdm bars; without them, a log line every ``every`` updates
    (``stripeconv ... --no-progress``)."""
    global _bars
    _bars = bool(enabled)


class Progress:
    """A tqdm bar when tqdm is installed (and :func:`show_bars` allows), else a log line (stderr)
    every ``every`` updates.

    Silent unless ``verbose``.
    """

    def __init__(self, total: Optional[int], desc: str, verbose: bool = True, every: Optional[int] = None,
                 initial: int = 0):
        self.total, self.desc, self.verbose = total, desc, verbose
        self.n = initial
        self.every = every or max(1, (total or 100) // 10)
        self.bar = None
        self.t0 = time.time()
        if verbose and _bars:
            try:
                from tqdm.auto import tqdm
                self.bar = tqdm(total=total, desc=desc, initial=initial, leave=False)
            except ImportError:
                self.bar = None

    def update(self, n: int = 1, **info) -> None:
        self.n += n
        if not self.verbose:
            return
        if self.bar is not None:
            self.bar.update(n)
            if info:
                self.bar.set_postfix({k: _fmt(v) for k, v in info.items()}, refresh=False)
        elif self.n % self.every == 0 or (self.total is not None and self.n >= self.total):
            self.log(**info)

    def log(self, msg: str = "", **info) -> None:
        if not self.verbose:
            return
        tot = f"/{self.total}" if self.total is not None else ""
        extra = " ".join(f"{k}={_fmt(v)}" for k, v in info.items())
        line = f"[{self.desc}] {self.n}{tot} {extra} {msg} ({time.time() - self.t0:.1f}s)".replace("  ", " ")
        if self.bar is not None:
            self.bar.write(line)
        else:
            print(line, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def note(desc: str, msg: str) -> None:
    """One line ``[desc] msg`` on stderr (open bars stay intact)."""
    write_line(f"[{desc}] {msg}")


def _fmt(v):
    return f"{v:.4g}" if isinstance(v, float) else v


def mean_abs_units(weight: Tensor, granularity: str) -> Tensor:
    """Mean |w| of each filter (``[out]``) or stripe (``[out, kh, kw]``), as GReg's public code scores units."""
    w = weight.detach().abs()
    return w.mean((1, 2, 3)) if granularity == "filter" else w.mean(1)


def coupled_convs(graph) -> set:
    """Names of convs whose output channels are tied to another conv's by a residual addition."""
    out = set()
    for g in graph.groups:
        if len(g.producers) > 1:
            out |= {name for name, _, _ in g.producers}
    return out


@dataclass
class ChannelUnit:
    """Channels pruned together: the output channels of one conv, or of the convs a residual
    addition ties (shared root indices); ``group`` indexes the pruner's ``graph.groups``."""

    name: str
    size: int
    group: int
    members: list = field(default_factory=list)  # (conv name, out idx tensor, root idx tensor)

    def factors(self, convs: dict, pruned_roots: Tensor) -> dict:
        """Per member conv, ``[out]`` 0/1 factors that are 0 on the filters of ``pruned_roots``."""
        out = {}
        for name, idx, ridx in self.members:
            f = torch.ones(convs[name].out_channels)
            f[idx[torch.isin(ridx, pruned_roots)]] = 0.0
            out[name] = f
        return out

    def remove(self, masks: dict, convs: dict, pruned_roots: Tensor) -> None:
        """Clear, in place, the stripe masks of the member filters of ``pruned_roots``."""
        for name, f in self.factors(convs, pruned_roots).items():
            masks[name] &= (f > 0).to(masks[name].device)[:, None, None]


def channel_units(pruner) -> list:
    """The channel groups of ``pruner.graph`` whose producers are all prunable convs of ``pruner``
    (not blocked), members and units in model order."""
    order = {n: i for i, (n, _) in enumerate(pruner.model.named_modules())}
    units = []
    for gi, g in enumerate(pruner.graph.groups):
        convs = [(n, i, r) for n, i, r in g.producers if isinstance(pruner.graph.modules[n], nn.Conv2d)]
        if g.blocked or not convs or len(convs) != len(g.producers):
            continue
        if any(n not in pruner.convs for n, _, _ in convs):
            continue
        convs.sort(key=lambda p: order[p[0]])
        units.append(ChannelUnit(g.root_name, g.size, gi, convs))
    units.sort(key=lambda u: order[u.members[0][0]])
    return units


def replay(data: Iterable, saved_state: Optional[Tensor], skip: int) -> tuple:
    """Iterate ``data`` from batch ``skip`` on, with the same batches as the pass that began at
    ``saved_state``: a shuffled DataLoader's seeded ``generator`` is rewound to it (``None``: the
    pass starts now). Returns ``(state to save, iterator of (index, batch))``."""
    gen = getattr(data, "generator", None)
    if isinstance(gen, torch.Generator):
        if saved_state is None:
            saved_state = gen.get_state().clone()
        else:
            gen.set_state(saved_state)

    def batches() -> Iterator:
        for i, batch in enumerate(data):
            if i >= skip:
                yield i, batch
    return saved_state, batches()


def sample_pass(pruner, data: Iterable, hooks: list, desc: str, max_batches: Optional[int],
                after_forward: Optional[Callable[[], None]] = None) -> bool:
    """Feed the first ``pruner.samples`` points of ``data`` (batches ``(x, ...)`` or ``x``) through
    ``pruner.model`` in eval mode without gradients, with ``hooks`` (``(module, forward hook)``
    pairs) attached, calling ``after_forward()`` after each batch.

    Resumable: continues after ``pruner.batches_scored`` batches with the shuffle state saved in
    ``pruner._score_gen_state`` and stops after ``max_batches`` new batches; ``points_seen`` and
    ``batches_scored`` count what went in. Returns True once every sample is in or ``data`` ran out.
    """
    device = next(pruner.model.parameters()).device
    handles = [module.register_forward_hook(hook) for module, hook in hooks]
    pruner._score_gen_state, batches = replay(data, pruner._score_gen_state if pruner.batches_scored else None,
                                              pruner.batches_scored)
    bar = Progress(pruner.samples, desc, pruner.verbose, initial=pruner.points_seen)
    restore = set_eval(pruner.model)
    done = 0
    try:
        with torch.no_grad():
            for _, batch in batches:
                if pruner.points_seen >= pruner.samples or (max_batches is not None and done >= max_batches):
                    break
                x = batch[0] if isinstance(batch, (tuple, list)) else batch
                x = x[: pruner.samples - pruner.points_seen].to(device)
                pruner.model(x)
                if after_forward is not None:
                    after_forward()
                pruner.points_seen += len(x)
                pruner.batches_scored += 1
                done += 1
                bar.update(len(x))
    finally:
        for h in handles:
            h.remove()
        restore()
        bar.close()
    complete = pruner.points_seen >= pruner.samples or max_batches is None or done < max_batches
    if complete and pruner.points_seen == 0:
        raise ValueError(f"{type(pruner).__name__}: data yielded no batch")
    return complete


class BatchCursor:
    """Cycles over a re-iterable ``data`` (a DataLoader, a list of batches), remembering how far it got.

    :meth:`state` / :meth:`load_state` make the position checkpointable: after loading, the next
    batch is the one that would have come next, provided ``data`` yields the same batches in the
    same order on every pass (no shuffling, or a DataLoader with a seeded ``generator``: its state
    at the start of the current pass is saved and restored).
    """

    def __init__(self, data: Iterable):
        self.data = data
        self.passes = 0  # completed passes
        self.pos = 0  # batches taken in the current pass
        self._it = None
        self._gen_state = None

    def _generator(self):
        return getattr(self.data, "generator", None)

    def _start(self):
        g = self._generator()
        self._gen_state = g.get_state().clone() if isinstance(g, torch.Generator) else None
        self._it = iter(self.data)

    def next(self):
        if self._it is None:
            self._start()
        try:
            batch = next(self._it)
        except StopIteration:
            self.passes += 1
            self.pos = 0
            self._start()
            batch = next(self._it)  # raises if data is empty
        self.pos += 1
        return batch

    def state(self) -> dict:
        return {"passes": self.passes, "pos": self.pos, "generator": self._gen_state}

    def load_state(self, state: dict) -> None:
        self.passes, pos = int(state["passes"]), int(state["pos"])
        g = self._generator()
        if state.get("generator") is not None and isinstance(g, torch.Generator):
            g.set_state(state["generator"])
            self._gen_state = state["generator"].clone()
            self._it = iter(self.data)
        elif pos:
            self._start()
        else:
            self._it = None
        for _ in range(pos):
            next(self._it)
        self.pos = pos


def gate_module_of(pruner, name: str) -> nn.Module:
    """Where a conv's per-channel gate acts: its BatchNorm (after normalisation) or the conv itself."""
    return pruner._bn_of.get(name) or pruner.convs[name]


@contextmanager
def gate_outputs(pruner, factors: dict):
    """Multiply the output channels of convs (after their BN, if any) by ``factors[name]`` ``[out]``.

    With 0/1 factors this computes exactly the model whose gated filters are masked with their BN
    zeroed (what :class:`~stripeconv.pruning.Pruner` produces for dead filters), without touching
    any weight.
    """
    handles = []
    try:
        for name, f in factors.items():
            mod = gate_module_of(pruner, name)

            def hook(m, inp, out, f=f):
                return out * f.to(out.device, out.dtype)[None, :, None, None]
            handles.append(mod.register_forward_hook(hook))
        yield
    finally:
        for h in handles:
            h.remove()


def rng_state() -> dict:
    return {"torch": torch.get_rng_state()}


def set_rng_state(state: dict) -> None:
    if state and "torch" in state:
        torch.set_rng_state(state["torch"])


class ExpectedFlops:
    """Differentiable FLOPs (batch 1, :func:`stripeconv.profile`'s convention) of a model whose
    channels are kept with given probabilities.

    Each conv costs ``2 * H * W * kh * kw * E[out] * E[in]`` and each linear layer
    ``2 * E[in] * out``: ``E[out]`` is the conv's expected number of kept filters and ``E[in]`` the
    expected number of live input channels, read through the dependency graph from one
    ``[size]`` alive probability per channel group (``None``: the group is always alive). Kept
    output and input channels are treated as independent, which is exact for 0/1 probabilities.
    """

    def __init__(self, graph):
        self.layers = []  # (name, spatial, kernel area, consumer entries, n_in, fixed n_in or None, n_out)
        for name, m in graph.modules.items():
            if name not in graph.spatial:
                continue
            entries = graph.consumer_of.get(name, [])
            if isinstance(m, nn.Conv2d):
                fixed_in = m.in_channels // m.groups if m.groups > 1 else None
                self.layers.append((name, graph.spatial[name], m.kernel_size[0] * m.kernel_size[1], entries,
                                    m.in_channels, fixed_in, m.out_channels))
            elif isinstance(m, nn.Linear):
                self.layers.append((name, graph.spatial[name], 1, entries, m.in_features, None, m.out_features))

    def __call__(self, out_counts: dict, alive: list, device: torch.device) -> Tensor:
        """``out_counts``: conv name -> expected kept filters (0-d tensor; absent: all kept);
        ``alive``: per graph group, ``[size]`` probabilities or ``None``."""
        total = torch.zeros((), device=device)
        for name, spatial, area, entries, n_in, fixed_in, n_out in self.layers:
            if fixed_in is not None:
                cin = torch.tensor(float(fixed_in), device=device)
            else:
                covered = 0
                cin = torch.zeros((), device=device)
                for gi, idx, ridx in entries:
                    covered += len(idx)
                    p = alive[gi]
                    cin = cin + (float(len(idx)) if p is None else p[ridx.to(p.device)].sum().to(device))
                cin = cin + float(n_in - covered)
            out = out_counts[name] if name in out_counts else torch.tensor(float(n_out), device=device)
            total = total + 2.0 * spatial * area * out * cin
        return total


@contextmanager
def batchnorm_statistics_kept(model: nn.Module):
    """Run forward passes (e.g. a search step on held-out data) without moving any BatchNorm's
    running statistics: they are restored on exit."""
    saved = [(b, b.detach().clone()) for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
             for b in m.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for b, value in saved:
                b.copy_(value)
