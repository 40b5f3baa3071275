"""pytest plugin: after a CUDA fault, the process's other tests fail at once, naming the test that faulted.

A fault such as an illegal address leaves the process's CUDA context unusable, and every later GPU
test in it fails with an error of its own (one fault in a test worker of a GPU run failed its next
118 cases, hiding which test caused them). Loaded by tests/conftest.py."""
from __future__ import annotations

import pytest

# What the CUDA runtime says for the sticky errors that end a context.
FAULT_MESSAGES = ("illegal memory access", "an illegal instruction", "misaligned address",
                  "unspecified launch failure", "device-side assert")
_faulted: list[str] = []  # the test whose failure left the context unusable


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    yield
    if call.excinfo is not None and not _faulted and any(m in str(call.excinfo.value) for m in FAULT_MESSAGES):
        _faulted.append(item.nodeid)


def pytest_runtest_setup(item):
    if _faulted:
        pytest.fail(f"not run: an earlier test in this process, {_faulted[0]}, hit a CUDA fault that left the "
                    f"CUDA context unusable", pytrace=False)
