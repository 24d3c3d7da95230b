"""CPU binding: the vendor's NUMA split on captured tool outputs, the CUDA.

The tests that start processes (CLI, workers, torchrun, compilers) or load the embedded model;
the in-process ones are in tests/unit/test_binding.py.
"""

from __future__ import annotations

import multiprocessing
import os
import shutil

import pytest

from tests.unit.test_binding import chinese_locale_host  # noqa: F401  (fixtures)
from vicuna_bench import binding

pytestmark = pytest.mark.integration


@pytest.mark.skipif(shutil.which("env") is None, reason="needs the env tool")
def test_run_tool_gives_a_real_tool_the_c_locale_and_keeps_the_rest(chinese_locale_host, monkeypatch):
    monkeypatch.setenv("VB_BINDING_MARKER", "kept")
    lines = binding.run_tool(["env"]).splitlines()
    assert "LC_ALL=C" in lines and "LANG=C" in lines and "VB_BINDING_MARKER=kept" in lines
    assert not any(line.startswith("LANGUAGE=") for line in lines)


def _bind_and_report(rank: int, world_size: int, queue) -> None:
    b = binding.bind_rank("cpu", rank, world_size)
    queue.put((rank, b.cpus, sorted(os.sched_getaffinity(0))))


@pytest.mark.all_cpus  # its ranks (or workers) share out the CPUs: under pytest -n a worker has one
@pytest.mark.skipif(not hasattr(os, "sched_getaffinity"), reason="needs Linux CPU affinity")
def test_two_real_ranks_get_disjoint_covering_affinities():
    allowed = sorted(os.sched_getaffinity(0))
    if len(allowed) < 2:
        pytest.skip("needs at least 2 allowed CPUs")
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_bind_and_report, args=(r, 2, queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = dict((r, (planned, actual)) for r, planned, actual in (queue.get(timeout=60) for _ in procs))
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    a0, a1 = results[0][1], results[1][1]
    assert a0 and a1
    assert set(a0).isdisjoint(a1)
    assert sorted(a0 + a1) == allowed
    assert list(results[0][0]) == a0  # the process runs where the plan said
