"""The nightly regression rule on synthetic histories; every expected verdict worked out by hand."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.unit.nightly_fixtures import accuracy, latency, record_series, run_record
from vicuna_bench.errors import UserError
from vicuna_bench.nightly.history import Metric
from vicuna_bench.nightly.rules import Gate, evaluate_run, gates_from_precision_summary, judge, overall

FLAT = [100.0] * 7  # seven earlier runs at 100 ms: baseline 100, band (100/1.1, 110)


def tokens_per_s(value: float) -> Metric:
    return Metric("throughput", "decode_tokens_per_s", "256x64", value, "tokens/s", "higher")


# ---------------------------------------------------------------- latency (lower is better)

def test_a_20_percent_slowdown_in_one_run_is_suspicious():
    v = judge(latency(120.0), FLAT)
    assert v.status == "suspicious"
    assert v.baseline == 100.0
    assert v.ratio == pytest.approx(1.2)
    assert v.delta == pytest.approx(20.0)
    assert v.band == pytest.approx((90.9090909, 110.0))
    assert v.previous == 100.0
    assert v.history == 7
    assert not v.failing


def test_a_20_percent_slowdown_in_two_consecutive_runs_is_a_regression():
    # newest first: the previous run was 120 too; the window [120, 100 x 6] has median 100.
    v = judge(latency(120.0), [120.0] + [100.0] * 6)
    assert v.status == "regression"
    assert v.baseline == 100.0
    assert v.failing


def test_a_slow_run_before_a_fast_one_is_no_regression():
    assert judge(latency(100.0), [120.0] + [100.0] * 6).status == "ok"


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


def test_the_baseline_is_the_median_of_the_window():
    # sorted 90, 95, 100, 110, 130: median 100 (a mean would be 105 and pass 111).
    v = judge(latency(111.0), [100.0, 130.0, 90.0, 110.0, 95.0])
    assert v.baseline == 100.0
    assert v.status == "suspicious"
    # an even count: the mean of the middle two, (100 + 110) / 2 = 105.
    assert judge(latency(100.0), [90.0, 100.0, 110.0, 130.0]).baseline == 105.0


def test_only_the_last_window_runs_count():
    # newest first: five at 200 then five at 100.  The last 7 are [200 x 5, 100 x 2]: median 200;
    # all ten would give (100 + 200) / 2 = 150 and call 200 a slowdown.
    earlier = [200.0] * 5 + [100.0] * 5
    v = judge(latency(200.0), earlier)
    assert (v.baseline, v.history, v.status) == (200.0, 7, "ok")
    assert judge(latency(200.0), earlier, window=10).baseline == 150.0


def test_a_faster_latency_beyond_the_band_is_an_improvement():
    assert judge(latency(85.0), FLAT).status == "improved"  # below 100 / 1.1 = 90.9
    assert judge(latency(95.0), FLAT).status == "ok"


def test_the_tolerance_is_a_setting():
    assert judge(latency(106.0), FLAT, tolerance=0.05).status == "suspicious"  # 106 > 105
    with pytest.raises(UserError, match="tolerance"):
        judge(latency(1.0), FLAT, tolerance=0)


# ---------------------------------------------------------------- throughput (higher is better)

def test_throughput_is_judged_in_the_other_direction():
    earlier = [10.0] * 5  # band (10 / 1.1 = 9.0909, 11)
    assert judge(tokens_per_s(8.5), earlier).status == "suspicious"
    assert judge(tokens_per_s(8.5), [9.0] + earlier).status == "regression"
    assert judge(tokens_per_s(9.2), earlier).status == "ok"
    assert judge(tokens_per_s(11.5), earlier).status == "improved"
    # the lower edge, 10 / 1.1 (what a 10% slower step gives), is inside as for latency.
    assert judge(tokens_per_s(10 / 1.1 + 1e-9), earlier).status == "ok"


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
    assert gate.detail.startswith("not a --gate run (would have failed); threshold 24.9")
    (v,) = evaluate_run(tmp_path / "history.sqlite", run_record(), [accuracy(0.10, n=1542)], gates=[gate])
    assert v.status == "insufficient-history"  # not gate-failed
    assert overall([v], [gate]).passed


def test_a_malformed_gate_verdict_is_bad_input(tmp_path):
    path = tmp_path / "summary.json"
    path.write_text(json.dumps({"mode": "mmlu", "results": {}, "gate": {"verdicts": [{"status": "passed"}]}}))
    with pytest.raises(UserError, match=r"summary\.json: gate verdict .* lacks scoring"):
        gates_from_precision_summary(path)
