"""Suite-wide rules (issue 18), for every test module, and the one fixture two modules share.

Under CI (the ``CI`` environment variable set, as ``.ci/run`` does), a skipped test or module fails
the run: a skip there means a missing install step or a broken import, and would otherwise hide
behind a green exit code. A skip that is expected on the CI machine needs an entry in
``ALLOWED_SKIPS`` (a fragment of its reason -> why CI may skip it). Outside CI, skips only print
their reasons (``-ra``).

Every test leaves the launcher variables (``MASTER_PORT``, ``RANK``, ...) as it found them: a CLI
run in this process (``pretrain.eval.main``) joins a one-process group and sets them, and a later
test's subprocesses would inherit one port (two runs started at once then collide on it).

``uninterrupted_run``: a tiny 2-rank training run (6 steps, checkpoints every 2, sample keys
logged, evaluation every 2 steps, each rank's buffers recorded at each save in ``run.parent /
"buffers"``) that resume, export, evaluation and S3 tests compare against; made once.
"""
from __future__ import annotations

import os

import pytest

ALLOWED_SKIPS: dict[str, str] = {
    # "fragment of the skip reason": "why the CI machine may skip it",
    "no GPU: JPEG decode on the GPU": "CI runs on CPU machines; tests/test_feed.py runs the same code with the CPU "
                                       "as the device, and the CUDA test where a GPU exists",
    "has a GPU: the fallback is for machines without one": "on a GPU machine the CPU fallback cannot be shown",
    "needs CUDA/NCCL": "CI runs on CPU machines (gloo); tests/test_hang.py and the hung-rank test of "
                       "tests/test_train_robust.py read torch's flight recorder on gloo, the same code",
}

_unexpected: list[str] = []
LAUNCHER_VARIABLES = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")


@pytest.fixture(autouse=True)
def _launcher_variables_restored():
    before = {name: os.environ.get(name) for name in LAUNCHER_VARIABLES}
    yield
    for name, value in before.items():  # as they were: restored, or removed again
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


@pytest.fixture(scope="session")
def uninterrupted_run(tmp_path_factory):
    from tests.helpers import ASSET_SHARDS, ok, tiny_overrides, torchrun

    out = tmp_path_factory.mktemp("uninterrupted") / "run"
    # eval.every=2 here only: a resumed run (no mid-run evaluation) must still match it exactly; each
    # rank's buffers at each save go to out.parent / "buffers" (tests.faults' record_buffers probe)
    ok(torchrun(tiny_overrides(ASSET_SHARDS, out, steps=6) + ["train.checkpoint_every=2", "train.log_keys=true",
                                                              "eval.every=2"],
                module="tests.faults", env={"PRETRAIN_FAULT": f"record_buffers:{out.parent / 'buffers'}"}))
    return out


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
