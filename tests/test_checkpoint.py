"""Atomic checkpoint writes and RNG state capture."""
from __future__ import annotations

import random

import pytest
import torch

from stripeconv.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state


def test_round_trip(tmp_path):
    path = tmp_path / "run" / "last.pt"
    save_checkpoint(path, {"epoch": 3, "weights": torch.arange(5.0)})
    state = load_checkpoint(path)
    assert state["epoch"] == 3 and torch.equal(state["weights"], torch.arange(5.0))
    assert [p.name for p in path.parent.iterdir()] == ["last.pt"]  # no temporary left behind


def test_crash_mid_write_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_checkpoint(path, {"epoch": 1})

    def crash(obj, f, *args, **kwargs):
        f.write(b"partial garbage")
        raise KeyboardInterrupt("killed while writing")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, {"epoch": 2})
    monkeypatch.undo()
    assert load_checkpoint(path)["epoch"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        load_checkpoint(tmp_path / "nope.pt")


def test_rng_state_restores_every_generator():
    import numpy as np

    state = rng_state()
    first = (random.random(), np.random.rand(), torch.rand(3))
    set_rng_state(state)
    second = (random.random(), np.random.rand(), torch.rand(3))
    assert first[0] == second[0] and first[1] == second[1] and torch.equal(first[2], second[2])


class _Planted:
    """An object whose unpickling runs code, as a planted checkpoint could."""

    ran = False

    def __reduce__(self):
        return (_mark_ran, ())


def _mark_ran():
    _Planted.ran = True
    return None


def test_checkpoints_load_without_unpickling_code(tmp_path):
    np = pytest.importorskip("numpy")
    path = tmp_path / "last.pt"
    np.random.seed(3)
    save_checkpoint(path, {"epoch": 1, "rng": rng_state()})
    state = torch.load(path, weights_only=True)  # tensors and plain values only, NumPy's RNG included
    expected = np.random.rand(4)
    np.random.seed(0)
    set_rng_state(load_checkpoint(path)["rng"])
    assert np.array_equal(np.random.rand(4), expected)
    assert state["epoch"] == 1

    planted = tmp_path / "planted.pt"
    torch.save({"epoch": 1, "payload": _Planted()}, planted)
    with pytest.raises(Exception, match="trusted=True"):
        load_checkpoint(planted)
    assert not _Planted.ran
    load_checkpoint(planted, trusted=True)
    assert _Planted.ran


def test_older_numpy_rng_state_still_restores():
    np = pytest.importorskip("numpy")
    np.random.seed(5)
    state = {"python": random.getstate(), "torch": torch.get_rng_state(), "numpy": np.random.get_state()}
    expected = np.random.rand(3)
    np.random.seed(0)
    set_rng_state(state)
    assert np.array_equal(np.random.rand(3), expected)
