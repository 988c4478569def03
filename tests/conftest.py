"""Suite-wide rules (issue 18), for every test module.

Under CI (the ``CI`` environment variable set, as ``.ci/run`` does), a skipped test or module fails
the run: a skip there means a missing install step or a broken import, and would otherwise hide
behind a green exit code. A skip that is expected on the CI machine needs an entry in
``ALLOWED_SKIPS`` (a fragment of its reason -> why CI may skip it). Outside CI, skips only print
their reasons (``-ra``).
"""
from __future__ import annotations

import os

import pytest

ALLOWED_SKIPS: dict[str, str] = {
    # "fragment of the skip reason": "why the CI machine may skip it",
}

_unexpected: list[str] = []


def _check(report) -> None:
    if not os.environ.get("CI") or not report.skipped or hasattr(report, "wasxfail"):
        return
    reason = str(report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr)
    if not any(fragment in reason for fragment in ALLOWED_SKIPS):
        _unexpected.append(f"{report.nodeid}: {reason}")


def pytest_runtest_logreport(report):
    _check(report)


def pytest_collectreport(report):
    _check(report)


def pytest_sessionfinish(session, exitstatus):
    if _unexpected:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter):
    if _unexpected:
        terminalreporter.section("unexpected skips (CI is set; see tests/conftest.py ALLOWED_SKIPS)", red=True)
        for line in _unexpected:
            terminalreporter.line(line)
