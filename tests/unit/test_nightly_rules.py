"""The nightly regression rule on synthetic histories; every expected verdict worked out by hand.

The rank test is checked against a textbook example (Wikipedia's tortoise
and hare), published critical values of U, exact enumeration and a small
example with ties worked out by hand; the rule against step samples shaped
like the quick run's (14 decode steps a run).
"""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import pytest

from tests.unit.nightly_fixtures import accuracy, latency, record_series, run_record
from vicuna_bench.errors import UserError
from vicuna_bench.nightly.history import HistoryPoint, Metric, record_run
from vicuna_bench.nightly.rules import (
    Gate, evaluate_run, gates_from_precision_summary, judge, min_p, overall, rank_test,
)

pytestmark = pytest.mark.unit

FLAT = [100.0] * 7  # seven earlier runs at 100 ms: baseline 100, band (100/1.1, 110)


def tokens_per_s(value: float) -> Metric:
    return Metric("throughput", "decode_tokens_per_s", "256x64", value, "tokens/s", "higher")


def rate(value: float, n: int | None) -> Metric:
    return Metric("rate", "questions_per_s", "mmlu", value, "questions/s", "higher", n=n)


# ---------------------------------------------------------------- the rank test

def brute_u(x, y) -> float:
    """U by its definition: pairs with x > y, ties one half."""
    return sum(1.0 if a > b else 0.5 if a == b else 0.0 for a in x for b in y)


def test_u_of_the_tortoise_and_the_hare():
    # Wikipedia, "Mann-Whitney U test", illustration: finishing order THHHHHTTTTTH; each tortoise
    # beats 6, 1, 1, 1, 1, 1 hares (U_T = 11), each hare beats 5, 5, 5, 5, 5, 0 tortoises (U_H = 25).
    tortoises, hares = [1, 7, 8, 9, 10, 11], [2, 3, 4, 5, 6, 12]  # finishing positions: lower is ahead
    assert rank_test(hares, tortoises).u == 11  # hares behind tortoises = tortoises ahead
    assert rank_test(tortoises, hares).u == 25


def test_the_p_value_is_close_to_the_exact_distribution():
    # Exact: U of 6 against 6 over all C(12, 6) = 924 equally likely rank sets (no ties).
    exact = sum(sum(r) - 21 >= 25 for r in itertools.combinations(range(1, 13), 6)) / math.comb(12, 6)
    assert exact == pytest.approx(143 / 924)  # 0.1548
    test = rank_test([1, 7, 8, 9, 10, 11], [2, 3, 4, 5, 6, 12])
    # normal approximation: (25 - 18 - 0.5) / sqrt(36 x 13 / 12) = 1.0408 -> 0.1490
    assert test.p_greater == pytest.approx(0.1490, abs=5e-4)
    assert abs(test.p_greater - exact) < 0.01
    assert test.p_less == pytest.approx(1 - 0.1149, abs=5e-4)  # (25 - 18 + 0.5) / 6.245 = 1.2010 -> 0.8851


def samples_with_u(u: int, n: int, m: int) -> tuple[list[int], list[int]]:
    """Ranks 1..n+m split so that U(x > y) = u (no ties)."""
    ranks = list(range(1, n + 1))  # U = 0
    left = u
    for i in reversed(range(n)):
        step = min(m + i + 1 - ranks[i], left)
        ranks[i] += step
        left -= step
    x = set(ranks)
    return sorted(x), [r for r in range(1, n + m + 1) if r not in x]


@pytest.mark.parametrize("n, critical", [(10, 23), (20, 127)])
def test_critical_values_of_u_match_the_published_table(n, critical):
    # The two-sided 5% critical value of U for n = m (Mann & Whitney's table, as printed in textbooks):
    # U <= critical is significant, critical + 1 is not.
    for u, significant in ((critical, True), (critical + 1, False)):
        x, y = samples_with_u(u, n, n)
        assert brute_u(x, y) == u
        test = rank_test(x, y)
        assert test.u == u
        assert (2 * test.p_less <= 0.05) is significant, (u, test)


def test_ties_take_their_average_rank():
    # x = 1, 2, 2 and y = 2, 3: the three 2s share ranks 2..4 (3 each): R_x = 1 + 3 + 3 = 7, U = 7 - 6 = 1
    # (by pairs: 1 loses twice, each x = 2 ties one y = 2 (1/2) and loses to 3).
    test = rank_test([1, 2, 2], [2, 3])
    assert test.u == 1.0 == brute_u([1, 2, 2], [2, 3])
    # variance 3 x 2 / 12 x (6 - (27 - 3) / (5 x 4)) = 0.5 x 4.8 = 2.4; mean 3.
    # x larger: z = (1 - 3 - 0.5) / sqrt(2.4) = -1.6137 -> 1 - Phi(-1.6137) = 0.9467 (normal table: 0.9463..0.9474)
    assert test.p_greater == pytest.approx(0.9467, abs=1e-3)
    # x smaller: z = (1 - 3 + 0.5) / sqrt(2.4) = -0.9682 -> Phi(-0.9682) = 0.1665
    assert test.p_less == pytest.approx(0.1665, abs=1e-3)


def test_all_tied_is_no_evidence():
    test = rank_test([5.0, 5.0], [5.0, 5.0, 5.0])
    assert (test.u, test.p_greater, test.p_less) == (3.0, 1.0, 1.0)


def test_the_smallest_reachable_p():
    assert min_p(2, 14) == 1 / 120  # C(16, 2): two first tokens cannot reach p < 0.001
    assert min_p(3, 21) == 1 / 2024
    assert min_p(14, 98) < 1e-15
    with pytest.raises(ValueError):
        rank_test([], [1.0])


# ---------------------------------------------------------------- latency without samples (value rule)

def test_a_20_percent_slowdown_in_one_run_is_suspicious():
    v = judge(latency(120.0), FLAT)
    assert v.status == "suspicious"
    assert v.baseline == 100.0
    assert v.ratio == pytest.approx(1.2)
    assert v.delta == pytest.approx(20.0)
    assert v.band == pytest.approx((90.9090909, 110.0))
    assert v.previous == 100.0
    assert v.history == 7
    assert v.spread == 0.0
    assert v.p_value is None  # no samples: no rank test
    assert not v.failing


def test_a_20_percent_slowdown_in_two_consecutive_runs_is_a_regression():
    # newest first: the previous run was 120 too; the window [120, 100 x 6] has median 100, and the
    # previous run, against the 7 x 100 before it, was out too.
    v = judge(latency(120.0), [120.0] + FLAT)
    assert v.status == "regression"
    assert v.baseline == 100.0
    assert v.failing


def test_a_clean_run_after_a_slow_one_is_ok():
    assert judge(latency(100.0), [120.0] + [100.0] * 6).status == "ok"
    assert judge(latency(100.0), [200.0, 200.0] + [100.0] * 6).status == "ok"


def test_a_5_percent_slowdown_passes_even_twice():
    assert judge(latency(105.0), [105.0] + [100.0] * 6).status == "ok"


def test_the_band_edge_is_inside():
    # worse means strictly more than baseline x 1.1 = 110.
    assert judge(latency(110.0), FLAT).status == "ok"
    assert judge(latency(110.5), FLAT).status == "suspicious"


def test_fewer_than_3_comparable_runs_is_insufficient_history():
    v = judge(latency(500.0), [100.0, 100.0])
    assert v.status == "insufficient-history"
    assert v.history == 2
    assert v.baseline is None
    assert judge(latency(500.0), []).status == "insufficient-history"
    assert judge(latency(500.0), [100.0] * 3).status == "suspicious"  # three are enough


def test_the_runs_spread_widens_the_band():
    # [100, 130, 90, 110, 95]: median 100; |deviations| 0, 30, 10, 10, 5: MAD 10, spread 14.826;
    # band max(10%, 4 x 14.826 / 100) = 59.3%: 111 and 150 are ok, 160 is out.
    earlier = [100.0, 130.0, 90.0, 110.0, 95.0]
    v = judge(latency(150.0), earlier)
    assert (v.status, v.baseline) == ("ok", 100.0)
    assert v.spread == pytest.approx(14.826)
    assert v.band[1] == pytest.approx(159.304)
    assert judge(latency(160.0), earlier).status == "suspicious"
    # an even count: the mean of the middle two, (100 + 110) / 2 = 105.
    assert judge(latency(100.0), [90.0, 100.0, 110.0, 130.0]).baseline == 105.0


def test_a_baseline_that_wanders_more_than_20_percent_judges_nothing():
    # [200 x 5, 100 x 5], window 10: median 150, MAD 50, spread 74.1 = 49% of it.
    v = judge(latency(400.0), [200.0] * 5 + [100.0] * 5, window=10)
    assert v.status == "report-only"
    assert "wander 49%" in v.reason


def test_only_the_last_window_runs_count():
    # newest first: five at 200 then five at 100.  The last 7 are [200 x 5, 100 x 2]: median 200.
    v = judge(latency(200.0), [200.0] * 5 + [100.0] * 5)
    assert (v.baseline, v.history, v.status) == (200.0, 7, "ok")


def test_a_faster_latency_beyond_the_band_is_an_improvement():
    assert judge(latency(85.0), FLAT).status == "improved"  # below 100 / 1.1 = 90.9
    assert judge(latency(95.0), FLAT).status == "ok"


def test_the_tolerance_is_a_setting():
    assert judge(latency(106.0), FLAT, tolerance=0.05).status == "suspicious"  # 106 > 105
    assert judge(latency(140.0), [140.0] + FLAT, tolerance=0.5).status == "ok"  # 140 < 150
    with pytest.raises(UserError, match="tolerance"):
        judge(latency(1.0), FLAT, tolerance=0)


# ---------------------------------------------------------------- which runs make the baseline

def point(value: float, status: str = "pass", samples=None, verdict: str | None = None) -> HistoryPoint:
    return HistoryPoint(0, "", None, value, None if samples is None else len(samples), status,
                        None if samples is None else tuple(samples), verdict)


def test_values_called_worse_and_crashed_runs_are_not_in_the_baseline():
    # newest first: a regression at 200, a suspicious 190, a crashed run at 300, a run that failed for
    # another reason (its 101 was ok: it counts), then 100s: the baseline is 101 and six 100s.
    earlier = [point(200.0, "fail", verdict="regression"), point(190.0, verdict="suspicious"),
               point(300.0, "error", verdict="ok"), point(101.0, "fail", verdict="ok")] + [point(100.0, verdict="ok")] * 7
    v = judge(latency(200.0), earlier)
    # and the previous run was recorded as a regression: this one is too
    assert (v.status, v.baseline, v.history, v.previous) == ("regression", 100.0, 7, 200.0)
    # a previous run recorded ok is not re-judged, whatever its value
    assert judge(latency(200.0), [point(200.0, verdict="ok")] + earlier[4:]).status == "suspicious"


def test_a_lasting_change_becomes_the_baseline_after_the_lookback():
    # The baseline is looked for among the newest 28 (4 x window) comparable runs.  After 26 runs called
    # worse only 2 usable ones are left in reach: no baseline, nothing is judged (the new level is then
    # recorded as such and becomes the baseline).  After 25, three are: still a regression.
    earlier = [point(200.0, "fail", verdict="regression")] * 26 + [point(100.0, verdict="ok")] * 7
    assert judge(latency(200.0), earlier).status == "insufficient-history"
    assert judge(latency(200.0), earlier[1:]).status == "regression"


# ---------------------------------------------------------------- latency with samples (rank test)

def steps(level: float, n: int = 14) -> list[float]:
    """n decode steps around ``level``: level x (0.98, 0.99, 1.00, 1.01, 1.02, ...), median ``level``."""
    return [level * (1 + 0.01 * ((i % 5) - 2)) for i in range(n)]


def next_token(level: float, n: int = 14, case: str = "32x8") -> Metric:
    s = steps(level, n)
    return Metric("latency", "next_token_ms_p50", case, level, "ms", "lower", n=n, samples=s)


CLEAN = [point(60.0 * f, samples=steps(60.0 * f)) for f in (1.00, 1.03, 0.98, 1.01, 0.99, 1.02, 1.00)]


def test_a_2x_slowdown_is_suspicious_then_a_regression():
    # baseline: medians 60 x (1.00, 1.03, 0.98, 1.01, 0.99, 1.02, 1.00), sorted 58.8, 59.4, 60, 60,
    # 60.6, 61.2, 61.8: 60; |deviations| 0, 1.8, 1.2, 0.6, 0.6, 1.2, 0: MAD 0.6, spread 1.4826 x 0.6 =
    # 0.8896 ms; band max(10%, 4 x 0.8896 / 60 = 5.9%) = 10%.  14 steps at ~120 against 98 at ~60.
    first = judge(next_token(120.0), CLEAN)
    assert (first.status, first.baseline, first.ratio) == ("suspicious", 60.0, 2.0)
    assert first.spread == pytest.approx(0.8896, abs=1e-4)
    assert first.p_value < 1e-9
    second = judge(next_token(120.0), [point(120.0, samples=steps(120.0))] + CLEAN)
    assert second.status == "regression"
    assert "rank test p=" in second.reason and "14 vs 98 samples" in second.reason


def test_the_clean_run_after_two_slow_ones_is_not_a_regression():
    # the first slow run was suspicious, the second a regression: both stay out of the baseline (the
    # seven clean runs, median 60).  A clean run sits inside the band whatever came before.
    earlier = [point(120.0, "fail", steps(120.0), "regression"), point(120.0, "pass", steps(120.0), "suspicious")]
    v = judge(next_token(61.0), earlier + CLEAN)
    assert (v.status, v.baseline, v.history) == ("ok", 60.0, 7)
    # recorded without verdicts (the rule unknown), the slow runs' values count: medians sorted 58.8,
    # 59.4, 60, 60.6, 61.2, 61.8, 120 -> 60.6, and the clean run is still ok.
    unknown = [point(120.0, "fail", steps(120.0)), point(120.0, "pass", steps(120.0))]
    v = judge(next_token(61.0), unknown + CLEAN)
    assert v.status == "ok"
    assert v.baseline == pytest.approx(60.6)


def test_noise_within_the_band_is_not_judged_slow_even_twice():
    # +5% in every step: the rank test is sure (p tiny) but the median moved less than the band.
    v = judge(next_token(63.0), [point(63.0, samples=steps(63.0))] + CLEAN)
    assert v.status == "ok"
    assert v.p_value < 1e-3


def test_a_median_beyond_the_band_without_a_significant_rank_test_is_ok():
    # Each baseline run: 3 steps at 40, 1 at 60, 3 at 80 (median 60); this run: 3 at 40, one 70, 3 at 80
    # (median 70, +16.7%): the rank test sees 6 of its 7 steps tied with the pool: p far above 0.001.
    base = [40.0] * 3 + [60.0] + [80.0] * 3
    earlier = [point(60.0, samples=base)] * 7
    mine = [40.0] * 3 + [70.0] + [80.0] * 3
    v = judge(Metric("latency", "next_token_ms_p50", "32x8", 70.0, "ms", "lower", 7, mine), earlier)
    assert v.ratio == pytest.approx(70 / 60)
    assert v.p_value > 0.1
    assert v.status == "ok"


def test_too_few_samples_are_reported_not_judged():
    v = judge(next_token(600.0, n=4), CLEAN)  # 4 steps: fewer than 5
    assert (v.status, v.reason) == ("report-only", "4 sample(s) (5 needed)")
    # 5 steps against 3 one-step baseline runs: the best p is 1 / C(8, 5) = 1/56, never below 0.001
    tiny = [point(60.0, samples=[60.0])] * 3
    v = judge(next_token(600.0, n=5), tiny)
    assert v.status == "report-only"
    assert "too few for the rank test" in v.reason


def test_the_first_token_of_two_repeats_is_reported_not_judged():
    m = Metric("latency", "first_token_ms_p50", "32x8", 3600.0, "ms", "lower", n=2, samples=(3500.0, 3700.0))
    assert judge(m, [point(100.0, samples=[100.0, 101.0])] * 7).status == "report-only"


def test_percentiles_rates_and_derived_figures_of_a_small_run_are_reported_not_judged():
    p90 = Metric("latency", "next_token_ms_p90", "32x8", 500.0, "ms", "lower", n=14)
    assert judge(p90, FLAT).reason == "a p90 of 14 samples (64 needed)"
    assert judge(Metric("latency", "next_token_ms_p90", "32x8", 500.0, "ms", "lower", n=64), FLAT).status == "suspicious"
    p99 = Metric("latency", "first_token_ms_p99", "32x8", 500.0, "ms", "lower", n=661)
    assert judge(p99, FLAT).status == "report-only"
    assert judge(rate(0.1, n=4), [1.0] * 7).reason == "a rate over 4 questions (100 needed)"
    assert judge(rate(0.1, n=None), [1.0] * 7).status == "report-only"
    assert judge(tokens_per_s(1.0), [10.0] * 7).reason == "derived from the decode steps: judged as next_token_ms_p50"


def test_a_level_held_by_most_of_the_window_is_the_baseline():
    # Four runs at 120 recorded without verdicts (say a faster host was replaced by a slower one): the
    # baseline (the newest 7: 120 x 4, 60 x 3) has median 120, and 130 is within its band.
    slow = [point(120.0, samples=steps(120.0))] * 4
    v = judge(next_token(130.0), slow + CLEAN)
    assert (v.status, v.baseline) == ("ok", 120.0)


# ---------------------------------------------------------------- throughput and rates (higher is better)

def rate_point(value: float, n: int = 200) -> HistoryPoint:
    return HistoryPoint(0, "", None, value, n)


def test_a_rate_over_enough_questions_is_judged_in_the_other_direction():
    earlier = [rate_point(10.0)] * 5  # band (10 / 1.1 = 9.0909, 11)
    assert judge(rate(8.5, n=200), earlier).status == "suspicious"
    assert judge(rate(8.5, n=200), [rate_point(9.0)] + earlier).status == "regression"
    # the previous run's rate was over 50 questions: not judged then, so not slow then
    assert judge(rate(8.5, n=200), [rate_point(9.0, n=50)] + earlier).status == "suspicious"
    assert judge(rate(9.2, n=200), earlier).status == "ok"
    assert judge(rate(11.5, n=200), earlier).status == "improved"
    # the lower edge, 10 / 1.1 (what a 10% slower step gives), is inside as for latency.
    assert judge(rate(10 / 1.1 + 1e-9, n=200), earlier).status == "ok"


# ---------------------------------------------------------------- accuracy

def test_an_accuracy_below_its_gate_fails_without_history():
    v = judge(accuracy(0.20, n=1542), [], gate=0.239)
    assert v.status == "gate-failed"
    assert v.failing
    assert judge(accuracy(0.24, n=1542), [], gate=0.239).status == "insufficient-history"


def test_an_accuracy_drop_beyond_two_standard_errors_is_a_regression():
    # p = 0.25, n = 1200: SE = sqrt(0.25 * 0.75 / 1200) = 0.0125, two SE = 0.025: band (0.225, 0.275).
    earlier = [0.25, 0.25, 0.25]
    v = judge(accuracy(0.22, n=1200), earlier)
    assert v.status == "regression"  # one run is enough for an accuracy
    assert v.band == pytest.approx((0.225, 0.275))
    assert v.delta == pytest.approx(-0.03)
    assert judge(accuracy(0.23, n=1200), earlier).status == "ok"  # within 2 SE
    assert judge(accuracy(0.28, n=1200), earlier).status == "improved"


def test_the_standard_error_uses_this_runs_question_count():
    # n = 300: SE = sqrt(0.1875 / 300) = 0.025, band (0.20, 0.30): the same 0.22 is within it.
    assert judge(accuracy(0.22, n=300), [0.25] * 3).status == "ok"


def test_the_gate_comes_before_the_history():
    # 0.23 is within 2 SE of 0.25 at n = 1200, but under a 0.239 gate.
    assert judge(accuracy(0.23, n=1200), [0.25] * 7, gate=0.239).status == "gate-failed"


# ---------------------------------------------------------------- against a real history

def test_runs_on_another_device_or_dtype_are_not_compared(tmp_path):
    db = tmp_path / "history.sqlite"
    record_series(db, [100.0] * 5)  # cpu fp32: the comparable ones
    record_series(db, [50.0] * 5, start=5, device="cuda", device_name="NVIDIA_H100_80GB_HBM3")
    record_series(db, [400.0] * 5, start=10, dtype="bf16")
    record_series(db, [100.0] * 5, start=15, world_size=2)
    record_series(db, [100.0] * 5, start=20, model="vicuna-13b-v1.5-16k")
    (v,) = evaluate_run(db, run_record(30), [latency(120.0)])
    assert (v.status, v.baseline, v.history) == ("suspicious", 100.0, 5)
    # The bf16 history has 5 runs of its own at 400: 120 there is an improvement.
    (v,) = evaluate_run(db, run_record(30, dtype="bf16"), [latency(120.0)])
    assert (v.status, v.baseline) == ("improved", 400.0)
    # fp16 on cpu has no history at all, whatever the other 25 runs hold.
    (v,) = evaluate_run(db, run_record(30, dtype="fp16"), [latency(120.0)])
    assert (v.status, v.history) == ("insufficient-history", 0)


def test_another_case_or_metric_is_not_compared(tmp_path):
    db = tmp_path / "history.sqlite"
    record_series(db, [100.0] * 5)
    record_series(db, [100.0] * 5, metric=lambda v: latency(v, case="512x64"))
    (v,) = evaluate_run(db, run_record(), [latency(300.0, name="first_token_ms_p50")])
    assert v.status == "insufficient-history"


def test_a_recorded_run_is_judged_against_the_runs_before_it(tmp_path):
    db = tmp_path / "history.sqlite"
    ids = record_series(db, [100.0, 100.0, 100.0, 120.0, 120.0, 100.0])
    # Run 5 (the second 120): before it [120, 100, 100, 100], median 100, previous 120: regression.
    (v,) = evaluate_run(db, run_record(4), [latency(120.0)], before_run_id=ids[4])
    assert (v.status, v.baseline, v.history) == ("regression", 100.0, 4)
    # Run 4 (the first 120): only three before it, all 100: suspicious.
    (v,) = evaluate_run(db, run_record(3), [latency(120.0)], before_run_id=ids[3])
    assert (v.status, v.history) == ("suspicious", 3)


@pytest.mark.parametrize("field, other", [("compile_mode", "on"), ("perf_mode", "normal"), ("perf_repeat", 3),
                                          ("perf_cases", "32x8,128x8")])
def test_runs_of_another_compile_mode_perf_mode_repeat_count_or_cases_are_not_compared(tmp_path, field, other):
    db = tmp_path / "history.sqlite"
    setup = {"compile_mode": "off", "perf_mode": "detail", "perf_repeat": 2, "perf_cases": "32x8,64x8"}
    record_series(db, [100.0] * 5, **setup)
    record_series(db, [50.0] * 5, start=5, **{**setup, field: other})
    (v,) = evaluate_run(db, run_record(30, **setup), [latency(120.0)])
    assert (v.status, v.baseline, v.history) == ("suspicious", 100.0, 5)
    (v,) = evaluate_run(db, run_record(30, **{**setup, field: other}), [latency(120.0)])
    assert (v.status, v.baseline, v.history) == ("suspicious", 50.0, 5)  # 120 > 50 x 1.1


def test_nights_recorded_with_their_verdicts(tmp_path):
    """The nightly's sequence: judge, record with the verdicts; 5 clean, 2 at 2x, 1 clean."""
    db = tmp_path / "history.sqlite"
    statuses, runs = [], []
    for night, level in enumerate([60.0, 61.0, 59.0, 60.5, 59.5, 120.0, 121.0, 60.2]):
        verdicts = evaluate_run(db, run_record(night), [next_token(level)])
        outcome = overall(verdicts, [])
        record_run(db, run_record(night, status="pass" if outcome.passed else "fail"), [next_token(level)],
                   {(v.name, v.case): v.status for v in verdicts})
        statuses.append(verdicts[0].status)
        runs.append(outcome.exit_code)
    assert statuses == ["insufficient-history"] * 3 + ["ok", "ok", "suspicious", "regression", "ok"]
    assert runs == [0, 0, 0, 0, 0, 0, 3, 0]


def test_accuracy_gates_are_read_from_the_gate_list(tmp_path):
    db = tmp_path / "history.sqlite"
    gates = [Gate("mmlu/generate accuracy", "failed", 20.0, 23.9, "%", case="mmlu/generate")]
    (v,) = evaluate_run(db, run_record(), [accuracy(0.20, n=1542)], gates=gates)
    assert (v.status, v.gate) == ("gate-failed", pytest.approx(0.239))
    (v,) = evaluate_run(db, run_record(), [accuracy(0.20, n=1542, case="ceval/generate")], gates=gates)
    assert v.status == "insufficient-history"  # the MMLU gate does not judge C-Eval


# ---------------------------------------------------------------- the overall verdict and gates

def test_one_regression_fails_the_run_with_exit_3():
    verdicts = [judge(latency(120.0), [120.0] + FLAT), judge(latency(101.0, case="512x64"), FLAT)]
    out = overall(verdicts, [Gate("hw suite", "passed", 10, 10)])
    assert not out.passed and out.exit_code == 3
    assert out.reason == "regression: next_token_ms_p50 256x64 120 ms vs baseline 100 ms (+20.0%)"


def test_the_reason_names_two_causes_and_counts_the_rest():
    slow = [judge(latency(120.0, case=f"{n}x64"), [120.0] + FLAT) for n in (256, 512, 1024)]
    out = overall(slow, [Gate("hw suite", "failed", 9, 10)])
    assert out.reason == ("gate failed: hw suite; regression: next_token_ms_p50 256x64 120 ms vs baseline 100 ms (+20.0%); "
                          "and 2 more")


def test_an_accuracy_regression_is_told_in_points():
    # baseline 0.25, n = 1200: band 0.225..0.275 (see above); 0.22 is 3 points down.
    out = overall([judge(accuracy(0.22, n=1200), [0.25] * 3)], [])
    assert out.reason == "regression: accuracy mmlu/generate 22.00% vs baseline 25.00% (-3.00 pts)"


def test_suspicious_and_insufficient_history_do_not_fail():
    verdicts = [judge(latency(120.0), FLAT), judge(latency(1.0), [])]
    out = overall(verdicts, [Gate("mmlu accuracy gate", "skipped", detail="unknown model")])
    assert out.passed and out.exit_code == 0


def test_a_failed_gate_fails_the_run():
    out = overall([], [Gate("hw suite", "failed", 9, 10, detail="1 failed")])
    assert (out.passed, out.reason) == (False, "gate failed: hw suite (1 failed)")


def test_a_failed_accuracy_gate_is_named_once():
    gate = Gate("mmlu/generate accuracy", "failed", 20.0, 23.9, "%", "threshold 24.9 - tolerance 1.0", "mmlu/generate")
    out = overall([judge(accuracy(0.20, n=1542), [], gate=0.239)], [gate])
    assert out.reason == "gate failed: mmlu/generate accuracy (threshold 24.9 - tolerance 1.0)"
    # without its gate in the list (say a summary that was not read), the verdict still says it
    out = overall([judge(accuracy(0.20, n=1542), [], gate=0.239)], [])
    assert out.reason == "gate failed: accuracy mmlu/generate 20.00% < 23.90%"


def gated_summary(tmp_path, score: float, status: str, requested: bool, *more_verdicts) -> Path:
    """A precision summary.json of MMLU whose generate score (percent) met the SmolLM2 gate or not."""
    path = tmp_path / "summary.json"
    verdict = {"model": "SmolLM2-135M-Instruct", "scoring": "generate", "score": score, "threshold": 24.9,
               "tolerance": 1.0, "status": status}
    path.write_text(json.dumps({
        "mode": "mmlu", "results": {"generate": {"micro": score / 100, "total": 1542}},
        "gate": {"status": status, "requested": requested, "verdicts": [verdict, *more_verdicts]},
    }))
    return path


def test_gates_from_a_precision_summary(tmp_path):
    path = gated_summary(tmp_path, 24.9, "passed", True,
                         {"status": "skipped", "reason": "no mmlu threshold for SmolLM2-135M-Instruct with scoring 'x'"})
    passed, skipped = gates_from_precision_summary(path)
    assert (passed.name, passed.status, passed.value, passed.unit, passed.case) == (
        "mmlu/generate accuracy", "passed", 24.9, "%", "mmlu/generate")
    assert passed.threshold == pytest.approx(23.9)
    assert passed.margin == pytest.approx(1.0)
    assert (skipped.status, skipped.margin) == ("n/a", None)
    assert "no mmlu threshold" in skipped.detail


def test_a_subset_run_is_not_gated(tmp_path):
    # the precision runner judges every run; without --gate (a --quick subset) it says requested: false
    path = gated_summary(tmp_path, 10.0, "failed", False)
    (gate,) = gates_from_precision_summary(path)
    assert (gate.status, gate.value, gate.case) == ("n/a", 10.0, "mmlu/generate")
    assert gate.detail.startswith("not a --gate run (would have failed); generate 10.00% < 24.9 - 1.0")
    (v,) = evaluate_run(tmp_path / "history.sqlite", run_record(), [accuracy(0.10, n=1542)], gates=[gate])
    assert v.status == "insufficient-history"  # not gate-failed
    assert overall([v], [gate]).passed


def test_a_malformed_gate_verdict_is_bad_input(tmp_path):
    path = tmp_path / "summary.json"
    path.write_text(json.dumps({"mode": "mmlu", "results": {}, "gate": {"verdicts": [{"status": "passed"}]}}))
    with pytest.raises(UserError, match=r"summary\.json: gate verdict .* lacks scoring"):
        gates_from_precision_summary(path)
