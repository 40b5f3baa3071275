"""Argument checks shared by the pruners: a wrong type or an out-of-range value fails at
construction with a message naming the method, the argument and what it expects, instead of
deep inside training."""
from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from typing import Any, Optional

import torch

from .graph import check_four_dims


def number(owner: str, name: str, value: Any, *, low: Optional[float] = None, high: Optional[float] = None,
           low_open: bool = False, high_open: bool = False, integer: bool = False, optional: bool = False) -> None:
    """Raise unless ``value`` is a finite real (an integer with ``integer=True``) within the bounds
    (closed unless ``low_open`` / ``high_open``); ``None`` passes with ``optional=True``."""
    if value is None and optional:
        return
    kind = "an integer" if integer else "a number"
    wanted = (numbers.Integral,) if integer else (numbers.Real,)
    if isinstance(value, bool) or not isinstance(value, wanted):
        raise TypeError(f"{owner}: {name} must be {kind}{_range(low, high, low_open, high_open)}, "
                        f"got {value!r} ({type(value).__name__})")
    below = low is not None and (value <= low if low_open else value < low)
    above = high is not None and (value >= high if high_open else value > high)
    if not math.isfinite(value) or below or above:
        raise ValueError(f"{owner}: {name} must be {kind}{_range(low, high, low_open, high_open)}, got {value!r}")


def ratio_map(owner: str, ratios: Any) -> None:
    """``ratios``: a mapping from layer name to a fraction in [0, 1)."""
    if ratios is None:
        return
    if not isinstance(ratios, Mapping):
        raise TypeError(f"{owner}: ratios must be a dict from layer name to a fraction in [0, 1), "
                        f"got {type(ratios).__name__}")
    for layer, value in ratios.items():
        if not isinstance(layer, str):
            raise TypeError(f"{owner}: ratios keys must be layer names (str), got {layer!r}")
        number(owner, f"ratios[{layer!r}]", value, low=0.0, high=1.0, high_open=True)


def choice(owner: str, name: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ValueError(f"{owner}: {name} must be one of {allowed}, got {value!r}")


def _range(low, high, low_open, high_open) -> str:
    if low is None and high is None:
        return ""
    if high is None:
        return f" {'>' if low_open else '>='} {low}"
    if low is None:
        return f" {'<' if high_open else '<='} {high}"
    return f" in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"


def input_size(owner: str, value: Any) -> None:
    """``input_size``: ``None``, an example tensor, or a shape of positive integers with the batch."""
    if value is None or isinstance(value, torch.Tensor):
        return
    if not (isinstance(value, (tuple, list)) and value
            and all(isinstance(d, numbers.Integral) and not isinstance(d, bool) and d > 0 for d in value)):
        raise TypeError(f"{owner}: input_size must be the input shape with the batch, e.g. (1, 3, 32, 32), "
                        f"or an example tensor; got {value!r}")
    check_four_dims(tuple(value), owner)
