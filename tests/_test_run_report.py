"""pytest plugin that keeps a GPU test run legible (loaded by tests/conftest.py).

- Each failure's message is written as it happens: a run that a time cap ends (the GPU session's test
  step) never reaches pytest's own summary of them.
- After a CUDA fault the process's other tests fail at once, naming the test that faulted. A fault
  such as an illegal address leaves the process's CUDA context unusable, and every later GPU test in it
  fails with an error of its own (one fault in a test worker of a GPU run failed its next 118 cases,
  hiding which test caused them).
"""
from __future__ import annotations

import sys

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


def pytest_runtest_logreport(report):
    crash = getattr(report.longrepr, "reprcrash", None) if report.failed else None
    if crash is not None:
        sys.stderr.write(f"\nfailed: {report.nodeid} ({report.when}): {crash.message.splitlines()[0]}\n")
