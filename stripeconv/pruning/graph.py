"""Channel coupling between layers, from torch-pruning's DependencyGraph.

A *group* is a set of channels that must be removed together: the output channels of one or
more convs (several when residual additions tie them), the BN/elementwise layers on the way and
the input channels (or flattened input features) of the layers that consume them. A channel of a
group is *dead* when every producing conv is masked and keeps no stripe of that filter; only
dead channels can be removed (:func:`stripeconv.export`). A depthwise conv (one filter per input
channel) is channel-wise like BN: it *passes* its group's channels through and loses the filters
of dead ones (MobileNet-style ``1x1 -> depthwise -> 1x1`` blocks prune their hidden channels).
This module reads that structure once and answers "which input channels of each consumer are
still alive" for any masks, which is what FLOPs targets need (removing a filter also removes work
in the next layer).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from types import ModuleType
from typing import Optional, Sequence, Union

import torch
from torch import Tensor, nn

from .._modes import set_eval
from .._tracing import forward_with_hooks

__all__ = ["ChannelGraph", "Group", "require_torch_pruning", "example_input"]

_BLOCKING = (nn.GroupNorm, nn.LayerNorm)  # mix channels: removing one changes the others


def is_depthwise(module: nn.Module) -> bool:
    """A conv with one filter per input channel (``groups == in_channels == out_channels``)."""
    return (isinstance(module, nn.Conv2d) and module.groups > 1
            and module.groups == module.in_channels == module.out_channels)


def stripe_layers(model: nn.Module) -> str:
    """The names of ``model``'s StripeConv2d layers, for messages (empty when it has none)."""
    from ..nn import StripeConv2d

    names = [n for n, m in model.named_modules() if isinstance(m, StripeConv2d)]
    return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")


def check_four_dims(shape: tuple, owner: str = "") -> None:
    """Raise ``ValueError`` unless ``shape`` is ``(batch, channels, height, width)``; a shape that
    lacks only the batch is named with it."""
    if len(shape) != 4:
        hint = f"; with the batch that is {(1, *shape)}" if len(shape) == 3 else ""
        raise ValueError(f"{owner + ': ' if owner else ''}input_size must be (batch, channels, height, width), "
                         f"e.g. (1, 3, 32, 32), got {shape}{hint}")


def require_torch_pruning() -> ModuleType:
    """The ``torch_pruning`` module; without it an ``ImportError`` that says how to install it."""
    try:
        import torch_pruning as tp  # noqa: F401
    except ImportError as e:  # pragma: no cover - exercised only without the dependency
        raise ImportError(
            "stripeconv's export and pruning targets need torch-pruning for the dependency graph: "
            "pip install torch-pruning (or pip install --no-deps torch-pruning to keep your torch)"
        ) from e
    return tp


def example_input(model: nn.Module, input_size: Optional[Union[Sequence[int], Tensor]]) -> Tensor:
    """A random example tensor of ``input_size`` (or the tensor itself) on the model's device."""
    if isinstance(input_size, Tensor):
        return input_size
    if input_size is None:
        raise ValueError(
            "this needs the model's input shape: pass input_size=(1, C, H, W) (batch included) "
            "or an example tensor"
        )
    shape = tuple(input_size)
    check_four_dims(shape)
    p = next(iter(model.parameters()), None)
    device = p.device if p is not None else torch.device("cpu")
    dtype = p.dtype if p is not None and p.is_floating_point() else torch.float32
    return torch.randn(shape, device=device, dtype=dtype)


@dataclass
class Group:
    """One coupled set of channels (root = the conv torch-pruning grouped them under)."""

    root: nn.Module
    root_name: str
    size: int
    # (module name, index tensor in that module's out dim, root index tensor)
    producers: list = field(default_factory=list)
    # (module name, index tensor in that module's in dim, root index tensor)
    consumers: list = field(default_factory=list)
    # depthwise convs the channels pass through: (module name, index in its out dim, root index)
    passthrough: list = field(default_factory=list)
    blocked: Optional[str] = None  # why this group cannot be pruned, or None


class ChannelGraph:
    """Coupled channel groups of ``model`` (traced once with ``example_inputs``).

    The model is traced in eval mode (BN statistics are not touched).
    """

    def __init__(self, model: nn.Module, example_inputs):
        already = stripe_layers(model)
        if already:  # torch-pruning would route the channels around them: a wrong graph, no error
            raise ValueError(f"the channel dependency graph does not see through StripeConv2d layers ({already}); "
                             "build it on the dense model (nn.Conv2d layers and their masks)")
        tp = require_torch_pruning()
        self.tp = tp
        self.model = model
        x = example_input(model, example_inputs)
        restore = set_eval(model)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                self.DG = tp.DependencyGraph().build_dependency(model, x, verbose=False)
        finally:
            restore()
        self.names = {m: n for n, m in model.named_modules()}
        self.modules = dict(model.named_modules())
        self.groups: list[Group] = []
        self.consumer_of: dict[str, list] = {}  # consumer name -> [(group index, idx, root)]
        self.passthrough_of: dict[str, list] = {}  # depthwise conv name -> [(group index, idx, root)]
        self._read_groups()
        self.spatial = self._spatial_sizes(x)

    # -------------------------------------------------------------------------------- groups
    def _read_groups(self) -> None:
        DG = self.DG
        for g in DG.get_all_groups(root_module_types=(nn.Conv2d, nn.Linear)):
            root = g[0].dep.target.module
            grp = Group(root, self.names.get(root, "?"), DG.get_out_channels(root))
            for item in g.items:
                module, handler = item.dep.target.module, item.dep.handler
                idx = torch.as_tensor(list(item.idxs), dtype=torch.long)
                ridx = torch.as_tensor(list(item.root_idxs), dtype=torch.long)
                name = self.names.get(module)
                is_out = DG.is_out_channel_pruning_fn(handler)
                if is_depthwise(module):
                    if is_out:  # torch-pruning lists a depthwise conv once, by its output channels
                        grp.passthrough.append((name, idx, ridx))
                    continue
                if isinstance(module, nn.Conv2d) and module.groups > 1:
                    grp.blocked = f"{name} is a grouped conv (groups={module.groups}) that mixes channels"
                elif isinstance(module, _BLOCKING):
                    grp.blocked = f"{name} is a {type(module).__name__}, which mixes channels"
                if isinstance(module, (nn.Conv2d, nn.Linear)):
                    (grp.producers if is_out else grp.consumers).append((name, idx, ridx))
            if grp.passthrough:
                if not grp.producers and grp.blocked is None:
                    grp.blocked = f"no conv produces the channels that {grp.passthrough[0][0]} reads"
                if grp.producers and self.names.get(root) in {name for name, _, _ in grp.passthrough}:
                    grp.root_name = grp.producers[0][0]  # name the group after a conv that decides it
            gi = len(self.groups)
            self.groups.append(grp)
            for name, idx, ridx in grp.consumers:
                self.consumer_of.setdefault(name, []).append((gi, idx, ridx))
            for name, idx, ridx in grp.passthrough:
                self.passthrough_of.setdefault(name, []).append((gi, idx, ridx))

    def _spatial_sizes(self, x: Tensor) -> dict:
        sizes, handles = {}, []
        for name, m in self.model.named_modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                def hook(mod, inp, out, name=name):
                    sizes[name] = (out.numel() // out.shape[1]) // out.shape[0] if isinstance(mod, nn.Conv2d) else \
                        inp[0].numel() // inp[0].shape[-1] // (inp[0].shape[0] if inp[0].dim() > 1 else 1)
                handles.append(m.register_forward_hook(hook))
        forward_with_hooks(self.model, x[:1], handles)
        return sizes

    # --------------------------------------------------------------------------- liveness
    def alive_roots(self, masks: dict) -> list[Tensor]:
        """Per group, bool [size]: the root channel is alive (some producer keeps it)."""
        out = []
        for g in self.groups:
            alive = torch.zeros(g.size, dtype=torch.bool)
            if g.blocked is not None:
                out.append(~alive)
                continue
            for name, idx, ridx in g.producers:
                m = masks.get(name)
                if m is None or not isinstance(self.modules[name], nn.Conv2d):
                    alive[ridx] = True
                else:
                    alive[ridx] |= m.reshape(m.shape[0], -1).any(1).cpu()[idx]
            out.append(alive)
        return out

    def alive_inputs(self, masks: dict, alive_roots: Optional[list] = None) -> dict[str, Tensor]:
        """Consumer name -> bool [in_channels or in_features]: the input is alive."""
        roots = alive_roots if alive_roots is not None else self.alive_roots(masks)
        res = {}
        for name, entries in self.consumer_of.items():
            m = self.modules[name]
            n_in = m.in_channels if isinstance(m, nn.Conv2d) else m.in_features
            alive = torch.ones(n_in, dtype=torch.bool)
            for gi, idx, ridx in entries:
                alive[idx] = roots[gi][ridx]
            res[name] = alive
        return res

    def alive_passthrough(self, masks: dict, alive_roots: Optional[list] = None) -> dict[str, Tensor]:
        """Depthwise conv name -> bool ``[out_channels]``: the channel passing through is alive."""
        roots = alive_roots if alive_roots is not None else self.alive_roots(masks)
        res = {}
        for name, entries in self.passthrough_of.items():
            alive = torch.ones(self.modules[name].out_channels, dtype=torch.bool)
            for gi, idx, ridx in entries:
                alive[idx] = roots[gi][ridx]
            res[name] = alive
        return res

    def flops(self, masks: dict) -> int:
        """FLOPs (profile's convention, batch 1) of the model once dead channels are removed."""
        roots = self.alive_roots(masks)
        alive_in = self.alive_inputs(masks, roots)
        alive_through = self.alive_passthrough(masks, roots)
        total = 0
        for name, m in self.modules.items():
            if name not in self.spatial:
                continue
            if isinstance(m, nn.Conv2d):
                cin = int(alive_in[name].sum()) if name in alive_in else m.in_channels
                cin = cin // m.groups if m.groups > 1 else cin
                mask = masks.get(name)
                if mask is None:
                    mask = torch.ones(m.out_channels, *m.kernel_size, dtype=torch.bool)
                if name in alive_through:  # the filters of dead channels go with them
                    mask = mask[alive_through[name]]
                kept = int(mask.sum())
                total += 2 * self.spatial[name] * kept * cin
            elif isinstance(m, nn.Linear):
                fin = int(alive_in[name].sum()) if name in alive_in else m.in_features
                total += 2 * self.spatial[name] * fin * m.out_features
        return total
