"""The weights the Triton backend derives from the packed rows (stripeconv.backends._dense_weights): the
dense weight of the cuDNN hand-over and the forward's tile-major weight.

Scattered once per version of the packed rows and reused; every change to what they hold (an
in-place write, another mask, another stream) scatters them again. The dense conv's numerics on the
hand-over are checked against the oracle in tests/test_triton.py (cases ``dense_handover*``); here
each reuse is checked against :func:`stripeconv.decompose.dense_weight` on the current values.
"""
from __future__ import annotations

import gc

import pytest
import torch

from stripeconv.backends import _dense_weights as dw
from stripeconv.decompose import dense_weight as oracle

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def _fresh():
    dw.clear()
    yield
    dw.clear()


def _layer(n=6, c=4, density=0.5, seed=0):
    gen = torch.Generator().manual_seed(seed)
    mask = torch.rand(n, 3, 3, generator=gen) < density
    mask[0, 1, 1] = True  # at least one kept stripe
    weight = torch.randn(int(mask.sum()), c, generator=gen)
    return weight, mask


def _assert_dense(got, weight, mask):
    torch.testing.assert_close(got, oracle(weight, mask), rtol=0, atol=0)


@pytest.mark.parametrize("density", [0.4, 1.0])  # 1.0: every stripe kept, the scatter is a permutation
def test_scattered_once_and_reused_while_the_weight_is_unchanged(density):
    weight, mask = _layer(density=density)
    first = dw.dense_weight(weight, mask, CPU)
    _assert_dense(first, weight, mask)
    assert dw.dense_weight(weight, mask, CPU) is first
    assert first.is_contiguous(memory_format=torch.channels_last)  # the layout cuDNN reads channels_last input with


def test_every_stripe_pruned_gives_zeros():
    mask = torch.zeros(5, 3, 3, dtype=torch.bool)
    weight = torch.empty(0, 4)
    got = dw.dense_weight(weight, mask, CPU)
    assert got.shape == (5, 4, 3, 3) and not got.any()


def test_an_in_place_write_scatters_again():
    weight, mask = _layer()
    first = dw.dense_weight(weight, mask, CPU).clone()
    opt = torch.optim.SGD([weight.requires_grad_()], lr=0.5)
    weight.grad = torch.randn_like(weight)
    opt.step()  # what a training step does between two forwards
    again = dw.dense_weight(weight, mask, CPU)
    _assert_dense(again, weight, mask)
    assert not torch.equal(again, first)
    assert not again.requires_grad  # a constant of the dense conv; the op's backward gives the gradient


def test_another_mask_or_a_mask_written_in_place_scatters_again():
    weight, mask = _layer()
    dw.dense_weight(weight, mask, CPU)
    flipped = mask.flip(0)  # another tensor, as many kept stripes in other places
    assert not torch.equal(flipped, mask)
    _assert_dense(dw.dense_weight(weight, flipped, CPU), weight, flipped)
    dw.dense_weight(weight, mask, CPU)
    mask.copy_(flipped)  # the same tensor written in place: its version changes
    _assert_dense(dw.dense_weight(weight, mask, CPU), weight, mask)


def test_the_entry_goes_with_the_packed_weight():
    weight, mask = _layer()
    dw.dense_weight(weight, mask, CPU)
    assert len(dw._kept) == 1
    del weight
    gc.collect()
    assert len(dw._kept) == 0  # per-call copies (autocast casts) leave nothing behind


def test_nothing_kept_for_inference_tensors_or_while_capturing(monkeypatch):
    weight, mask = _layer()
    with torch.inference_mode():
        frozen = weight.clone()  # an inference tensor: no version counter to check
    _assert_dense(dw.dense_weight(frozen, mask, CPU), frozen, mask)
    assert len(dw._kept) == 0
    monkeypatch.setattr(dw.runtime, "capturing", lambda weight: True)  # a graph must replay the scatter
    first = dw.dense_weight(weight, mask, CPU)
    assert dw.dense_weight(weight, mask, CPU) is not first and len(dw._kept) == 0


def test_keep_false_scatters_every_call_as_a_graph_replays_it():
    """What gpu_select times as the hand-over's work in a CUDA graph: a fresh scatter, nothing kept or reused."""
    weight, mask = _layer()
    first = dw.dense_weight(weight, mask, CPU, keep=False)
    _assert_dense(first, weight, mask)
    again = dw.dense_weight(weight, mask, CPU, keep=False)
    assert again is not first and len(dw._kept) == 0
    kept = dw.dense_weight(weight, mask, CPU)
    assert dw.dense_weight(weight, mask, CPU, keep=False) is not kept


def test_another_stream_scatters_again(monkeypatch):
    weight, mask = _layer()
    monkeypatch.setattr(dw, "_stream", lambda weight: 1)
    first = dw.dense_weight(weight, mask, CPU)
    assert dw.dense_weight(weight, mask, CPU) is first
    monkeypatch.setattr(dw, "_stream", lambda weight: 2)
    assert dw.dense_weight(weight, mask, CPU) is not first


def test_backend_clear_cache_drops_them():
    from stripeconv.backends import triton_backend as tb

    weight, mask = _layer()
    dw.dense_weight(weight, mask, CPU)
    tb.clear_cache()
    assert len(dw._kept) == 0


def test_memory_budget_and_off_switch(monkeypatch):
    weight, mask = _layer(n=16, c=32)  # a dense weight of 16 * 32 * 9 fp32 = 18 KB
    other, other_mask = _layer(n=16, c=32, seed=1)
    monkeypatch.setenv("STRIPECONV_GPU_DENSE_CACHE_MB", str(30 / 1024))  # room for one of them
    first = dw.dense_weight(weight, mask, CPU)
    assert dw.dense_weight(weight, mask, CPU) is first
    _assert_dense(dw.dense_weight(other, other_mask, CPU), other, other_mask)  # does not fit: not kept
    assert len(dw._kept) == 1
    with torch.no_grad():
        weight.mul_(2)  # the stale entry makes room for its replacement
    replaced = dw.dense_weight(weight, mask, CPU)
    _assert_dense(replaced, weight, mask)
    assert dw.dense_weight(weight, mask, CPU) is replaced and len(dw._kept) == 1
    monkeypatch.setenv("STRIPECONV_GPU_DENSE_CACHE_MB", "0")
    again = dw.dense_weight(weight, mask, CPU)
    assert dw.dense_weight(weight, mask, CPU) is not again
    monkeypatch.setenv("STRIPECONV_GPU_DENSE_CACHE_MB", "lots")
    with pytest.raises(ValueError, match="STRIPECONV_GPU_DENSE_CACHE_MB must be a number of megabytes"):
        dw.dense_weight(weight, mask, CPU)


def test_strides_are_part_of_what_is_checked():
    mask = torch.zeros(4, 3, 3, dtype=torch.bool)
    mask[torch.arange(4), torch.tensor([0, 1, 1, 2]), torch.tensor([1, 1, 0, 2])] = True
    weight = torch.randn(4, 4)  # as many rows as channels: its transpose has the same shape
    first = dw.dense_weight(weight, mask, CPU).clone()
    version = weight._version
    weight.data = weight.data.t()  # same storage and version counter, other strides
    assert weight._version == version
    again = dw.dense_weight(weight, mask, CPU)
    _assert_dense(again, weight, mask)
    assert not torch.equal(again, first)


@pytest.mark.parametrize("n, c, k", [(6, 4, 3), (16, 1, 3), (8, 4, 1), (16, 1, 1)])  # 1s: both layouts' conditions hold
def test_nchw_data_gets_an_nchw_weight(n, c, k):
    """cuDNN (and oneDNN) compute in channels_last where the data or the weight is, so NCHW data gets a
    weight with NCHW strides: otherwise the conv would copy the data into channels_last and its result
    (channels_last) would be copied back into the op's NCHW output."""
    gen = torch.Generator().manual_seed(n + c + k)
    mask = torch.rand(n, k, k, generator=gen) < 0.6
    mask[0, 0, 0] = True
    weight = torch.randn(int(mask.sum()), c, generator=gen)
    nchw = dw.dense_weight(weight, mask, CPU, memory_format=torch.contiguous_format)
    _assert_dense(nchw, weight, mask)
    assert nchw.stride() == torch.empty(nchw.shape).stride()
    assert dw.dense_weight(weight, mask, CPU, memory_format=torch.contiguous_format) is nchw  # kept
    channels_last = dw.dense_weight(weight, mask, CPU)  # the other layout: scattered again
    _assert_dense(channels_last, weight, mask)
    assert channels_last.stride() == torch.empty(nchw.shape, memory_format=torch.channels_last).stride()
    x = torch.randn(2, c, 5, 5)
    assert torch.nn.functional.conv2d(x, nchw, padding=k // 2).is_contiguous()


class _TilePlan:
    """A stand-in forward plan: a row table (-1: a zero row), as the tile-major weight reads it, and what
    tells plans of a mask apart (here one tile of two columns over ``len(rows) // 2`` union entries)."""

    def __init__(self, rows, in_order=False):
        self.w_rows = torch.tensor(rows, dtype=torch.int32)
        self.block_n, self.in_order, self.balanced = 2, in_order, False
        self.num_tiles, self.umax, self.computed = 1, len(rows) // 2, len(rows)


def _gathered_rows(plan, made: list):
    def gather(weight):
        made.append(weight._version)
        rows = torch.cat([weight, weight.new_zeros(1, weight.shape[1])])
        return rows[torch.where(plan.w_rows >= 0, plan.w_rows, weight.shape[0]).long()]
    return gather


def test_tile_weights_are_kept_per_weight_version_and_plan(monkeypatch):
    weight, mask = _layer()
    plan, other = _TilePlan([2, -1, 0, 1]), _TilePlan([0, 0, -1, 3], in_order=True)
    made = []
    first = dw.tile_weight(weight, mask, plan, _gathered_rows(plan, made))
    torch.testing.assert_close(first, torch.stack([weight[2], torch.zeros(4), weight[0], weight[1]]))
    assert dw.tile_weight(weight, mask, plan, _gathered_rows(plan, made)) is first and len(made) == 1
    # another plan, an in-place write (an optimiser step), keep=False (a graph's replay): made again
    assert dw.tile_weight(weight, mask, other, _gathered_rows(other, made)) is not first and len(made) == 2
    with torch.no_grad():
        weight.mul_(2)
    again = dw.tile_weight(weight, mask, other, _gathered_rows(other, made))
    torch.testing.assert_close(again, torch.stack([weight[0], weight[0], torch.zeros(4), weight[3]]))
    assert len(made) == 3
    dw.tile_weight(weight, mask, other, _gathered_rows(other, made), keep=False)
    assert len(made) == 4
    assert dw.tile_weight(weight, mask, other, _gathered_rows(other, made)) is again and len(made) == 4
    # the grad input's copy of the plan (another object, the same tiles) finds it too
    copy = _TilePlan([0, 0, -1, 3], in_order=True)
    assert dw.tile_weight(weight, mask, copy, _gathered_rows(copy, made)) is again and len(made) == 4
    dw.clear()
    assert dw.tile_weight(weight, mask, other, _gathered_rows(other, made)) is not again and len(made) == 5


def test_tile_and_dense_weights_share_the_memory_budget(monkeypatch):
    weight, mask = _layer(n=64, c=256)  # a dense weight of 64 * 256 * 9 fp32: 0.56 MB
    plan = _TilePlan(list(range(int(mask.sum()))) * 2)
    made = []
    monkeypatch.setenv("STRIPECONV_GPU_DENSE_CACHE_MB", "1")
    dense = dw.dense_weight(weight, mask, CPU)
    assert dw.dense_weight(weight, mask, CPU) is dense
    tiles = dw.tile_weight(weight, mask, plan, _gathered_rows(plan, made))  # as large again: over the budget
    assert tiles.nbytes + dense.nbytes > 1 << 20
    assert dw.tile_weight(weight, mask, plan, _gathered_rows(plan, made)) is not tiles and len(made) == 2
    monkeypatch.setenv("STRIPECONV_GPU_DENSE_CACHE_MB", "0")
    assert dw.dense_weight(weight, mask, CPU) is not dense
