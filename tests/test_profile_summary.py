"""bench/profile_summary.py: the per-call profile summary and its blocking-event detector."""
from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
import profile_summary  # noqa: E402


def test_a_host_read_of_a_tensor_value_is_reported_as_blocking():
    x = torch.randn(64)
    summary = profile_summary.profile_calls(lambda: (x * 2).sum().item(), calls=3)
    blocking = {r["name"]: r["count_per_call"] for r in summary["blocking"]}
    assert blocking.get("aten::item") == 1
    assert summary["calls"] == 3 and summary["host_ms_per_call"] > 0
    names = {r["name"] for r in summary["top_host"]}
    assert {"aten::mul", "aten::sum"} <= names
    text = profile_summary.format_summary(summary, title="t: ")
    assert text.startswith("t: host") and "aten::item x1" in text


def test_calls_without_host_reads_block_nothing():
    x = torch.randn(8, 8)
    summary = profile_summary.profile_calls(lambda: x @ x, calls=2)
    assert summary["blocking"] == []
    assert "blocking: none" in profile_summary.format_summary(summary)


def test_blocking_names():
    assert profile_summary._is_blocking("cudaStreamSynchronize")
    assert profile_summary._is_blocking("cudaMemcpy")
    assert profile_summary._is_blocking("Memcpy DtoH (Device -> Pageable)")
    assert not profile_summary._is_blocking("cudaMemcpyAsync")
    assert not profile_summary._is_blocking("Memcpy HtoD (Pageable -> Device)")


def test_calls_must_be_positive():
    with pytest.raises(ValueError, match="calls must be at least 1"):
        profile_summary.profile_calls(lambda: None, calls=0)
