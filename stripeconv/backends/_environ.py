"""Environment reads cheap enough for every call of a settled kernel launch.

``os.environ.get`` encodes the name and decodes the value on every call (~0.7 us; a settled
Triton call reads three variables). On POSIX the mapping keeps its bytes in a dict that every
change through ``os.environ`` (``monkeypatch.setenv`` included) updates, so a lookup there sees
the same values in ~0.05 us. Elsewhere, ``os.environ.get``.
"""
from __future__ import annotations

import os
from typing import Callable, Optional

__all__ = ["getenv", "raw_lookup"]

_POSIX_DATA = getattr(os.environ, "_data", None) if os.name == "posix" else None
if not isinstance(_POSIX_DATA, dict):
    _POSIX_DATA = None
_ENCODED: dict[str, bytes] = {}


def getenv(name: str, default: Optional[str] = None) -> Optional[str]:
    """``os.environ.get(name, default)``."""
    if _POSIX_DATA is None:
        return os.environ.get(name, default)
    key = _ENCODED.get(name)
    if key is None:
        key = _ENCODED[name] = os.fsencode(name)
    value = _POSIX_DATA.get(key)
    return default if value is None else os.fsdecode(value)


def raw_lookup(names: tuple[str, ...]) -> tuple[Callable[[object], object], tuple]:
    """``(get, keys)`` such that ``tuple(map(get, keys))`` holds the current values of ``names`` as the
    environment keeps them (bytes on POSIX, None where unset): a read without a Python call, for the
    settings every settled call compares (see :func:`.gpu_select.settings`)."""
    if _POSIX_DATA is None:
        return os.environ.get, tuple(names)
    return _POSIX_DATA.get, tuple(os.fsencode(name) for name in names)
