"""One forward pass to observe a model through hooks, leaving the model as it was."""
from __future__ import annotations

from typing import Iterable

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle


def forward_with_hooks(model: nn.Module, x: Tensor, handles: Iterable[RemovableHandle]) -> None:
    """Run ``model(x)`` in eval mode without gradients, then restore its mode and remove ``handles``.

    Eval mode keeps BatchNorm statistics untouched by the observation.
    """
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(x)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
