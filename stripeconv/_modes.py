"""Eval mode for a while, then every module's own training flag back."""
from __future__ import annotations

from typing import Callable

from torch import nn


def set_eval(model: nn.Module) -> Callable[[], None]:
    """Put ``model`` in eval mode; returns the function that restores each module's training flag.

    ``model.train(was_training)`` would not do: it also sets every submodule, so a BatchNorm kept
    in eval mode inside a training model (frozen statistics) would come back in training mode.
    """
    flags = [(module, module.training) for module in model.modules()]
    model.eval()

    def restore() -> None:
        for module, training in flags:
            module.training = training

    return restore
