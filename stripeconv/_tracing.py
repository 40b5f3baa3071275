"""Observing a model: one forward pass through hooks (leaving the model as it was), or its torch.fx
graph with StripeConv2d layers kept whole."""
from __future__ import annotations

from typing import Iterable

import torch
from torch import Tensor, fx, nn
from torch.utils.hooks import RemovableHandle

from ._modes import set_eval
from .nn import StripeConv2d


def forward_with_hooks(model: nn.Module, x: Tensor, handles: Iterable[RemovableHandle]) -> None:
    """Run ``model(x)`` in eval mode without gradients, then restore its mode and remove ``handles``.

    Eval mode keeps BatchNorm statistics untouched by the observation.
    """
    restore = set_eval(model)
    try:
        with torch.no_grad():
            model(x)
    finally:
        restore()
        for h in handles:
            h.remove()


class StripeLeafTracer(fx.Tracer):
    """A torch.fx tracer that keeps StripeConv2d whole (its forward checks shapes in Python)."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, StripeConv2d) or super().is_leaf_module(m, qualname)
