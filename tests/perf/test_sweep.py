"""The batch sweep: ``pytest -m perf --perf-batch-sizes 1,2,4`` runs every case at each batch size on one engine.

The sweep and its files (the per-batch perf files, the curve's CSV and PNG)
are the plugin's ``perf_sweep`` fixture (vicuna_bench/sweep.py); the
verdicts are in the terminal summary.  Skipped without ``--perf-batch-sizes``.
"""

from __future__ import annotations

import pytest

from vicuna_bench.pytest_plugin import perf_job_of

pytestmark = pytest.mark.perf


def test_batch_sweep(perf_sweep, pytestconfig):
    """Each batch that fitted measured every case, in order; a batch left out is the fit check's stop, said."""
    measured = [run.settings.batch_size for run in perf_sweep.runs]
    assert measured and measured == perf_sweep.batch_sizes[:len(measured)]
    assert (perf_sweep.stopped is None) == (len(measured) == len(perf_sweep.batch_sizes))
    cases = perf_job_of(pytestconfig).settings.cases
    for run in perf_sweep.runs:
        assert [r.case for r in run.results] == cases
    assert all(path.is_file() for path in perf_sweep.paths.values())
