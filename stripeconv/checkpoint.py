"""Checkpoints that survive a crash: atomic writes and the RNG states a resumed run needs."""
from __future__ import annotations

import os
import pickle
import random
import tempfile
from pathlib import Path
from typing import Any, Union

import torch

__all__ = ["save_checkpoint", "load_checkpoint", "rng_state", "set_rng_state"]

PathLike = Union[str, os.PathLike]


def save_checkpoint(path: PathLike, state: dict[str, Any]) -> None:
    """Write ``state`` with ``torch.save`` so that ``path`` is always a complete checkpoint.

    The data goes to a temporary file in the same directory, is flushed to disk, and then
    replaces ``path`` in one atomic rename: a crash mid-write leaves the last good checkpoint.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_checkpoint(path: PathLike, map_location: Any = "cpu", trusted: bool = False) -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint`, with a clear error when it is missing.

    Checkpoints hold only tensors and plain Python values, so they load with ``weights_only=True``:
    a file planted in an output folder cannot run code. ``trusted=True`` also unpickles other
    objects (such as earlier checkpoints, which stored NumPy's RNG state as an array).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    if trusted:
        return torch.load(path, map_location=map_location, weights_only=False)
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        if "global" not in str(e).lower():  # a damaged file, not an object outside the allowed set
            raise
        raise pickle.UnpicklingError(
            f"{path} holds Python objects other than tensors and plain values, which are not loaded unless "
            f"trusted (an older checkpoint format, or not written by stripeconv); if you trust the file, "
            f"load it with load_checkpoint(path, trusted=True). Details: {str(e).splitlines()[0]}") from None


def rng_state() -> dict[str, Any]:
    """The states of Python's, NumPy's (if present) and torch's random generators."""
    state: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy as np

        kind, keys, pos, has_gauss, gauss = np.random.get_state()
        # the key array as a tensor: the checkpoint then loads with weights_only=True
        state["numpy"] = (kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss))
    except ImportError:
        pass
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` captured."""
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "numpy" in state:
        import numpy as np

        kind, keys, pos, has_gauss, gauss = state["numpy"]
        keys = keys.numpy() if isinstance(keys, torch.Tensor) else np.asarray(keys)
        np.random.set_state((kind, keys.astype(np.uint32), pos, has_gauss, gauss))
