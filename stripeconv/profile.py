"""Count FLOPs and parameters of a model, stripe-aware.

Conventions (the same everywhere in stripeconv, including pruning targets):

- **FLOPs = 2 x multiply-adds.** One multiply-add counts as 2 FLOPs.
- Only convolutions (``nn.Conv2d``, :class:`stripeconv.StripeConv2d`) and ``nn.Linear`` are
  counted. A conv costs ``2 * B * Ho * Wo * kept_stripes * (in_channels / groups)``: each kept
  stripe is a 1x1 filter applied at every output pixel (dense convs keep all ``out * kh * kw``
  stripes; a StripeConv2d keeps ``stripe_mask.sum()``; an ``nn.Conv2d`` named in ``masks`` keeps
  that mask's stripes). A linear layer costs ``2 * rows * in_features * out_features``.
- **Ignored** (0 FLOPs): bias additions, BatchNorm, activations, pooling, residual additions,
  reshapes. They are memory-bound and small next to the convolutions; counting them would make
  numbers incomparable with the pruning literature, which ignores them too.
- FLOPs are for the whole ``input_size`` batch; pass batch 1 for per-image numbers.
- **Params**: every parameter of the model (BN affine included, buffers excluded). A conv counts
  only the weights of its kept stripes (``kept_stripes * in_channels / groups``) plus its bias.
"""
from __future__ import annotations

from dataclasses import dataclass, field, asdict
from typing import Optional, Sequence, Union

import torch
from torch import Tensor, nn

from ._tracing import forward_with_hooks

__all__ = ["profile", "Profile", "LayerProfile"]


@dataclass
class LayerProfile:
    """One row: a leaf module that has parameters or FLOPs."""

    name: str
    type: str
    flops: int
    params: int
    density: float = 1.0  # kept stripes / all stripes (convs), 1.0 otherwise
    output_shape: tuple = ()


@dataclass
class Profile:
    """Result of :func:`profile`: totals and per-layer rows."""

    flops: int
    params: int
    layers: list = field(default_factory=list)

    @property
    def macs(self) -> int:
        return self.flops // 2

    def layer(self, name: str) -> LayerProfile:
        for row in self.layers:
            if row.name == name:
                return row
        raise KeyError(name)

    def to_dict(self) -> dict:
        return {"flops": self.flops, "params": self.params, "layers": [asdict(r) for r in self.layers]}

    def table(self) -> str:
        """A Markdown table of the layers."""
        lines = ["| layer | type | FLOPs | params | density |", "|---|---|---:|---:|---:|"]
        for r in self.layers:
            lines.append(f"| {r.name} | {r.type} | {r.flops:,} | {r.params:,} | {r.density:.3f} |")
        lines.append(f"| **total** | | {self.flops:,} | {self.params:,} | |")
        return "\n".join(lines)

    def __str__(self) -> str:
        return f"Profile(flops={self.flops:,} ({self.flops / 1e6:.2f} MFLOPs), params={self.params:,})"


def _stripe_info(module: nn.Module, name: str, masks: Optional[dict]) -> Optional[tuple[int, int]]:
    """(kept, total) stripes of a conv, or None."""
    from .nn import StripeConv2d

    if isinstance(module, StripeConv2d):
        return int(module.stripe_mask.sum()), module.stripe_mask.numel()
    if isinstance(module, nn.Conv2d):
        total = module.out_channels * module.kernel_size[0] * module.kernel_size[1]
        if masks is not None and name in masks and masks[name] is not None:
            return int(masks[name].sum()), total
        return total, total
    return None


def profile(
    model: nn.Module,
    input_size: Union[Sequence[int], Tensor],
    masks: Optional[dict] = None,
    device: Optional[Union[str, torch.device]] = None,
) -> Profile:
    """Profile ``model`` on an input of shape ``input_size`` (batch included, e.g. ``(1, 3, 32, 32)``).

    ``input_size`` may also be an example tensor. ``masks`` (name -> bool stripe mask
    ``[out, kh, kw]``) makes masked ``nn.Conv2d`` layers count only their kept stripes. See the
    module docstring for what is counted. The model runs one forward pass in eval mode under
    ``torch.no_grad()`` (every module's training flag is restored).
    """
    from .nn import StripeConv2d

    params_of = {}
    for name, module in model.named_modules():
        own = list(module.parameters(recurse=False))
        info = _stripe_info(module, name, masks)
        if info is not None and not isinstance(module, StripeConv2d):
            # masked dense conv: only kept stripes' weights count
            kept = info[0]
            n = kept * (module.in_channels // module.groups) + (module.bias.numel() if module.bias is not None else 0)
            n += sum(p.numel() for pn, p in module.named_parameters(recurse=False) if pn not in ("weight", "bias"))
            params_of[name] = n
        else:
            params_of[name] = sum(p.numel() for p in own)
    # parametrized convs (e.g. SWP's filter skeleton): the weight lives in a child; count it with the conv
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d) and hasattr(module, "parametrizations"):
            for sub, _ in module.named_modules():
                if sub:
                    params_of[f"{name}.{sub}"] = 0
            info = _stripe_info(module, name, masks)
            params_of[name] = info[0] * (module.in_channels // module.groups) + (
                module.bias.numel() if module.bias is not None else 0)

    flops_of: dict[str, int] = {}
    shapes: dict[str, tuple] = {}
    handles = []

    def hook(name):
        def fn(module, inputs, output):
            out = output if isinstance(output, Tensor) else output[0]
            shapes[name] = tuple(out.shape)
            info = _stripe_info(module, name, masks)
            if info is not None:
                b = out.shape[0] if out.dim() == 4 else 1
                ho, wo = out.shape[-2], out.shape[-1]
                flops_of[name] = flops_of.get(name, 0) + 2 * b * ho * wo * info[0] * (module.in_channels // module.groups)
            elif isinstance(module, nn.Linear):
                rows = inputs[0].numel() // module.in_features
                flops_of[name] = flops_of.get(name, 0) + 2 * rows * module.in_features * module.out_features
        return fn

    named = dict(model.named_modules())
    for name, module in named.items():
        if isinstance(module, (nn.Conv2d, StripeConv2d, nn.Linear)):
            handles.append(module.register_forward_hook(hook(name)))
    if isinstance(input_size, Tensor):
        x = input_size
    else:
        p = next(iter(model.parameters()), None)
        dev = device if device is not None else (p.device if p is not None else "cpu")
        dtype = p.dtype if p is not None and p.is_floating_point() else torch.float32
        x = torch.zeros(tuple(input_size), device=dev, dtype=dtype)
    forward_with_hooks(model, x, handles)

    rows = []
    for name, module in named.items():
        is_leaf = len(list(module.children())) == 0 or isinstance(module, (nn.Conv2d, StripeConv2d))
        if name.split(".parametrizations")[0] != name:
            continue
        if not is_leaf:
            if params_of.get(name, 0):
                rows.append(LayerProfile(name, type(module).__name__, 0, params_of[name]))
            continue
        fl, pa = flops_of.get(name, 0), params_of.get(name, 0)
        if fl == 0 and pa == 0:
            continue
        info = _stripe_info(module, name, masks)
        density = info[0] / info[1] if info and info[1] else 1.0
        rows.append(LayerProfile(name, type(module).__name__, fl, pa, density, shapes.get(name, ())))
    total_params = sum(params_of.values())
    return Profile(flops=sum(flops_of.values()), params=total_params, layers=rows)
