"""The performance suite: one pytest-benchmark record per case, the reference CSVs after every case.

``pytest -m perf --world-size 8`` runs small cases on a tiny random Llama
(tests/perf/conftest.py, splittable 8 ways); ``--model-path DIR`` (or
``embedded``) benchmarks a real model, with ``--perf-case-pair`` or the
``--perf-min-len-exp``/``--perf-max-len-exp`` sweep.  The driver, the
fixtures and the output files are the plugin's (vicuna_bench/pytest_plugin.py):
files go to ``--perf-output-dir`` (default ``perf-results/``), named in the
terminal summary.  Tests never fail on absolute time: only against
``--perf-baseline`` (slower than ``--perf-tolerance``).
"""

from __future__ import annotations


def test_latency(perf_case, perf_measure, perf_session):
    """One case: --perf-repeat timed generations, each with its first token and every decode step."""
    result = perf_measure(perf_case)
    repeat = perf_session.settings.repeat
    assert len(result.first_ms) == repeat
    steps_per_round = perf_case.seq_out - 1 if perf_session.settings.mode == "detail" else int(perf_case.seq_out > 1)
    assert len(result.step_ms) == repeat * steps_per_round
