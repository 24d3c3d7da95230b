"""The performance suite: one pytest-benchmark record per case, the reference CSVs after every case.

``pytest -m perf --world-size 8`` runs small cases on a tiny random Llama
(tests/perf/conftest.py, splittable 8 ways); ``--model-path DIR`` (or
``embedded``) benchmarks a real model, with ``--perf-case-pair`` or the
``--perf-min-len-exp``/``--perf-max-len-exp`` sweep.  The driver, the
fixtures and the output files are the plugin's (vicuna_bench/pytest_plugin/):
files go to ``--perf-output-dir`` (default ``perf-results/``), named in the
terminal summary.  Tests never fail on absolute time: only against
``--perf-baseline`` (slower than ``--perf-tolerance``).
"""

from __future__ import annotations

import time

import pytest

pytestmark = pytest.mark.perf


def test_latency(perf_case, perf_measure, perf_job):
    """One case: --perf-repeat timed generations whose engine-side times fit inside the test's own clock."""
    started = time.perf_counter()
    result = perf_measure(perf_case)
    wall_ms = (time.perf_counter() - started) * 1e3
    repeat = perf_job.settings.repeat
    assert len(result.first_ms) == len(result.e2e_ms) == len(result.response_s) == repeat
    # Every generation ran inside this call, one after another: their times, whatever the ranks' clocks, add up
    # to less than the wall time around it (times in µs taken for ms, or a timer never reset, break this).
    assert 0 < sum(result.response_s) * 1e3 <= wall_ms
    if perf_job.settings.mode == "detail":  # the first token is part of the same timed generation
        assert all(0 < first <= e2e for first, e2e in zip(result.first_ms, result.e2e_ms))
