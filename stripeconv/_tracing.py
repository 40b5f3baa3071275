"""One forward pass to observe a model through hooks, leaving the model as it was."""
from __future__ import annotations

from typing import Iterable

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from ._modes import set_eval


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
