"""The suite's tiers: every test declares exactly one, and the unit tier starts no process.

A pytest plugin (the root conftest.py loads it).  Tiers, by marker:

* ``unit``: in-process, tiny models, no subprocess, no multiprocessing, no real
  data; ``pytest -m unit -n 2`` takes well under a minute on 2 cores.
* ``integration``: subprocess CLI runs, nested pytest runs, multi-rank engines
  (worker processes over gloo), torch.compile (inductor runs a C++ compiler),
  the real model and data, kill tests.
* ``perf``, ``accuracy``, ``hw``: the benchmark, release-gate and hardware suites.

A test module says its tier itself (``pytestmark = pytest.mark.unit``); the
folder it lives in must agree (``tests/unit`` holds unit tests only, and so on).
A test with no tier, two tiers, or a tier its folder contradicts stops the
collection with one line per module (or test) at fault.

In the unit tier, while a test's setup, call and teardown run (session
fixtures it is the first to ask for included), starting a process is refused:
``subprocess`` (every ``Popen``), ``os.fork`` / ``forkpty`` / ``posix_spawn`` /
``system``, and ``multiprocessing`` (every context's ``Process.start`` and its
helper processes, hence ``torch.multiprocessing`` and process pools); threads
are allowed.  The call raises
:class:`ProcessInUnitTier` naming the test; should the code under test swallow
that error, the test fails anyway when the phase ends.
"""

from __future__ import annotations

import contextlib
import multiprocessing.process
import multiprocessing.util
import os
import subprocess
from pathlib import Path

import pytest

TIERS = ("unit", "integration", "perf", "accuracy", "hw")
SUITE = Path(__file__).resolve().parent  # tests/: its first-level folders are named after the tiers


class ProcessInUnitTier(RuntimeError):
    """A unit-tier test tried to start a process."""


def tier_errors(items) -> list[str]:
    """One line per module (or test) whose tier markers are missing, several, or contradict its folder."""
    problems: dict[tuple[str, str], list[str]] = {}
    for item in items:
        tiers = sorted({mark.name for mark in item.iter_markers() if mark.name in TIERS})
        problem = None
        if len(tiers) != 1:
            found = "no tier marker" if not tiers else f"tier markers {', '.join(tiers)}"
            problem = f"{found}; mark it with exactly one of pytest.mark.{' | '.join(TIERS)}"
        else:
            path = Path(str(item.path)).resolve()
            folder = path.relative_to(SUITE).parts[0] if SUITE in path.parents else None
            if folder in TIERS and folder != tiers[0]:
                problem = f"marked {tiers[0]} but in tests/{folder}; move it to tests/{tiers[0]} or mark it {folder}"
        if problem is not None:
            module = item.nodeid.split("::", 1)[0]
            problems.setdefault((module, problem), []).append(item.nodeid)
    lines = []
    for (module, problem), nodeids in problems.items():
        which = nodeids[0] if len(nodeids) == 1 else f"{module} ({len(nodeids)} tests)"
        lines.append(f"{which}: {problem}")
    return lines


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects: an unmarked test is an error whatever is selected
def pytest_collection_modifyitems(config, items):
    errors = tier_errors(items)
    if errors:
        raise pytest.UsageError("tests without a valid tier:\n" + "\n".join(errors))


def _refuser(nodeid: str, what: str, attempts: list[str]):
    def refuse(*args, **kwargs):
        attempts.append(what)
        raise ProcessInUnitTier(f"{nodeid}: the unit tier runs in-process, but this test started a process "
                                f"({what}); mark its module pytest.mark.integration and move it to tests/integration")

    return refuse


# Every way a process starts in CPython on POSIX, each patched where callers look it up.
PROCESS_STARTS = (
    (subprocess.Popen, "_execute_child", "subprocess.Popen"),
    (multiprocessing.process.BaseProcess, "start", "multiprocessing Process.start"),
    # multiprocessing's helper processes (resource tracker, forkserver) start through here, not Popen.
    (multiprocessing.util, "spawnv_passfds", "multiprocessing.util.spawnv_passfds"),
    (os, "fork", "os.fork"),
    (os, "forkpty", "os.forkpty"),
    (os, "posix_spawn", "os.posix_spawn"),
    (os, "posix_spawnp", "os.posix_spawnp"),
    (os, "system", "os.system"),
)


@contextlib.contextmanager
def processes_refused(nodeid: str):
    """While open, starting a process raises :class:`ProcessInUnitTier`; yields the list of attempts."""
    attempts: list[str] = []
    saved = []
    for owner, name, what in PROCESS_STARTS:
        if hasattr(owner, name):
            saved.append((owner, name, owner.__dict__[name] if isinstance(owner, type) else getattr(owner, name)))
            setattr(owner, name, _refuser(nodeid, what, attempts))
    try:
        yield attempts
    finally:
        for owner, name, original in reversed(saved):
            setattr(owner, name, original)


def _guard_phase(item):
    if item.get_closest_marker("unit") is None:
        return (yield)
    with processes_refused(item.nodeid) as attempts:
        result = yield
    if attempts:  # raised inside the code under test, which may have caught it
        raise ProcessInUnitTier(f"{item.nodeid}: the unit tier runs in-process, but this test started a process "
                                f"({', '.join(sorted(set(attempts)))}); mark its module pytest.mark.integration "
                                "and move it to tests/integration")
    return result


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item):
    return (yield from _guard_phase(item))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    return (yield from _guard_phase(item))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item, nextitem):
    return (yield from _guard_phase(item))
