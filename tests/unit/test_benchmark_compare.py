"""``--benchmark-compare-fail`` on a perf record is judged by the package's one comparison, and its clock is public.

References worked by hand: 10 rounds all above 10 compared rounds give U = 0; the rank test's normal
approximation (mean nm/2 = 50, variance nm(n+m+1)/12 = 175, continuity 0.5) gives z = 49.5 / 13.23 = 3.742,
one-sided p = 9.1e-05; medians 12.45 ms against 10.45 ms are 1.19 times.
"""

from __future__ import annotations

import types

import pytest
from pytest_benchmark.utils import parse_compare_fail

from vicuna_bench.pytest_plugin import compare_fail, perf_fixtures

pytestmark = pytest.mark.unit

A = [0.0100 + i * 1e-4 for i in range(10)]  # compared run: 10.0 .. 10.9 ms, median 10.45 ms
B = [0.0120 + i * 1e-4 for i in range(10)]  # this run: 12.0 .. 12.9 ms, median 12.45 ms


class Record:
    """What pytest-benchmark hands a check as ``current``: fields by name, the rounds, extra_info."""

    def __init__(self, data, extra_info):
        self.stats = types.SimpleNamespace(data=list(data))
        self.extra_info = extra_info

    def __getitem__(self, field):
        data = sorted(self.stats.data)
        n = len(data)
        return {"median": (data[(n - 1) // 2] + data[n // 2]) / 2, "mean": sum(data) / n, "min": data[0]}[field]


def compared(data, with_rounds=True) -> dict:
    doc = {"median": Record(data, {})["median"], "mean": Record(data, {})["mean"]}
    return {**doc, "data": list(data)} if with_rounds else doc


def judged(expression: str):
    return compare_fail.StatsJudgedCheck(parse_compare_fail(expression))


OURS = {"measured": "next_token_ms"}


def test_rounds_that_all_moved_past_the_band_fail_naming_the_ratio_and_p():
    message = judged("median:10%").fails(Record(B, OURS), compared(A))
    assert message is not None and message.startswith("next_token_ms median 12.450 ms vs 10.450 ms (1.19x, over the "
                                                      "10% band; rank test p=9.1e-05)")


def test_a_move_inside_the_band_is_no_failure():
    assert judged("median:25%").fails(Record(B, OURS), compared(A)) is None  # 1.19x < 1.25x


def test_overlapping_rounds_are_no_failure_even_past_the_band():
    # The same 20 values split alternately: medians 11.0 vs 11.1 ms is inside any band; a 0% band still needs p.
    mixed = sorted(A + B)
    assert judged("median:0%").fails(Record(mixed[1::2], OURS), compared(mixed[::2])) is None


def test_without_kept_rounds_the_band_alone_decides():
    message = judged("median:10%").fails(Record(B[:1], OURS), compared(A, with_rounds=False))
    # One round of 12.0 ms against the saved median 10.45 ms: 1.148 times, past 10%; no rounds to test.
    assert message is not None and "12.000 ms vs 10.450 ms (1.15x" in message and "band alone" in message


def test_an_absolute_threshold_is_a_band_over_the_compared_level():
    # 0.001 s over 10.45 ms is a 9.6% band: 1.19x fails; 0.003 s (28.7%) does not.
    assert judged("median:0.001").fails(Record(B, OURS), compared(A)) is not None
    assert judged("median:0.003").fails(Record(B, OURS), compared(A)) is None


def test_a_record_of_another_suite_keeps_pytest_benchmarks_own_rule():
    check = judged("mean:10%")
    theirs = Record(B, {})
    assert check.fails(theirs, compared(A)) == parse_compare_fail("mean:10%").fails(theirs, compared(A))


def test_the_option_is_rerouted_before_pytest_benchmark_reads_it():
    config = types.SimpleNamespace(option=types.SimpleNamespace(benchmark_compare_fail=[parse_compare_fail("min:5%")]))
    compare_fail.judge_with_stats(config)
    [check] = config.option.benchmark_compare_fail
    assert isinstance(check, compare_fail.StatsJudgedCheck) and (check.field, check.threshold) == ("min", 5)


def test_perf_tests_get_the_engine_clock_through_the_public_benchmark_mark():
    marks = []
    ours = types.SimpleNamespace(fixturenames=["perf_job", "perf_measure"], add_marker=marks.append)
    other = types.SimpleNamespace(fixturenames=["benchmark"], add_marker=marks.append)
    perf_fixtures.time_benchmarks_by_the_engine([ours, other])
    [mark] = marks
    assert mark.name == "benchmark" and mark.kwargs == {"timer": perf_fixtures.ENGINE_CLOCK}
    perf_fixtures.ENGINE_CLOCK.now = 1.5
    assert perf_fixtures.ENGINE_CLOCK() == 1.5
