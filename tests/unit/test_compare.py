"""``vicuna-bench compare``: its statistics on synthetic samples, its inputs, its refusals, its exit codes.

References: the interval by brute force over every pairwise ratio with the
textbook rank (Moses: k = nm/2 - 1.959964 sd_U); the verdicts by samples
drawn with a known shift (a 10% slowdown, or none), over many seeds from one
base seed, so each number below is fixed; the inputs written by the real
writers (perf.samples_doc / write_tables, history.record_run).
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from vicuna_bench import compare as C
from vicuna_bench import perf, stats
from vicuna_bench.cli import main
from vicuna_bench.errors import UserError
from vicuna_bench.nightly import history as H
from vicuna_bench.nightly import rules
from vicuna_bench.perf import baseline as perf_baseline

pytestmark = pytest.mark.unit

BASE_SEED = 20261205
Z975 = 1.959964  # the standard normal's 97.5% quantile (tables)


def draw(rng, n: int = 100, shift: float = 1.0) -> list[float]:
    """n decode-step times (ms) around 100 ms: lognormal, 10% spread, 5% of them 1.5x stalls; times ``shift``."""
    steps = 100.0 * rng.lognormal(0.0, 0.10, n)
    stalls = rng.random(n) < 0.05
    return list(shift * np.where(stalls, 1.5 * steps, steps))


# ---------------------------------------------------------------- the interval


def test_the_interval_is_the_textbook_rank_of_every_pairwise_ratio():
    x = [9.0, 10.5, 11.0, 12.5, 13.0, 14.5, 15.0, 30.0]
    y = [8.0, 9.5, 10.0, 10.2, 11.5, 12.0, 12.2, 20.0]
    ratios = sorted(a / b for a in x for b in y)  # 64 of them, no ties
    sd = math.sqrt(8 * 8 * (8 + 8 + 1) / 12)  # 9.5219
    k = math.floor(64 / 2 - Z975 * sd)  # floor(13.34) = 13
    assert k == 13
    got = stats.ratio_interval(x, y)
    assert got.estimate == pytest.approx(math.sqrt(ratios[31] * ratios[32]))  # median of 64 logs
    assert got.low == pytest.approx(ratios[k - 1])  # the 13th smallest
    assert got.high == pytest.approx(ratios[64 - k])  # the 13th largest


def test_a_sample_scaled_by_1_1_is_estimated_at_exactly_1_1():
    # x_i = 1.1 y_i: the pairwise log differences are log 1.1 + (log y_i - log y_j), symmetric about log 1.1.
    y = list(100.0 * np.random.default_rng(BASE_SEED).lognormal(0.0, 0.1, 50))
    got = stats.ratio_interval([1.1 * v for v in y], y)
    assert got.estimate == pytest.approx(1.1)
    assert got.low * got.high == pytest.approx(1.1 ** 2)
    assert got.low < 1.1 < got.high


def test_too_few_samples_leave_the_interval_unbounded():
    # 2 x 3 pairs: nm/2 - 1.96 sd = 3 - 1.96 x 1.41 < 1, so no rank bounds it.
    got = stats.ratio_interval([1.0, 2.0], [1.5, 2.5, 3.0])
    assert (got.low, got.high) == (0.0, math.inf)


def test_the_interval_covers_a_known_ratio_at_its_level():
    rng = np.random.default_rng(BASE_SEED)
    trials, covered = 300, 0
    for _ in range(trials):
        ci = stats.ratio_interval(draw(rng, shift=1.1), draw(rng))
        covered += ci.low <= 1.1 <= ci.high
    # 95% nominal; 3 binomial standard errors (3 x 1.26%) below it would be a broken interval.
    assert covered / trials >= 0.95 - 3 * math.sqrt(0.95 * 0.05 / trials)


# ---------------------------------------------------------------- the verdict on synthetic samples


def series(values) -> C.Series:
    return C.Series(float(np.median(values)), tuple(values))


def test_a_10_percent_slowdown_in_100_samples_is_called_slower():
    rng = np.random.default_rng(BASE_SEED)
    a, b = draw(rng), draw(rng, shift=1.10)
    row = C.compare_series(series(a), series(b))
    assert row.verdict == "slower"
    assert row.ratio == pytest.approx(np.median(b) / np.median(a))
    assert row.ci.low > 1.0 and row.p_value < 0.025
    back = C.compare_series(series(b), series(a))
    assert back.verdict == "faster" and back.ci.high < 1.0


def test_a_10_percent_slowdown_is_caught_in_nearly_every_draw():
    rng = np.random.default_rng(BASE_SEED + 1)
    trials = 200
    called = sum(C.compare_series(series(draw(rng)), series(draw(rng, shift=1.10))).verdict == "slower"
                 for _ in range(trials))
    # Rank test z ~ 6 (p ~ 1e-9); the median ratio's own noise (~1.8%) puts 1.05 about 2.6 SD below 1.10.
    assert called / trials >= 0.95


@pytest.mark.parametrize("min_effect, level", [(0.0, 0.05), (C.DEFAULT_MIN_EFFECT, 0.01)])
def test_two_draws_of_one_distribution_are_not_called_beyond_the_stated_level(min_effect, level):
    rng = np.random.default_rng(BASE_SEED + 2)
    trials = 500
    verdicts = [C.compare_series(series(draw(rng)), series(draw(rng)), min_effect=min_effect).verdict
                for _ in range(trials)]
    calls = sum(v in ("slower", "faster") for v in verdicts)
    # The stated level: 5% two-sided (2.5% a side) for the test alone; the 5% minimum effect (2.8 SD of the
    # median ratio's noise) leaves almost nothing.  Allowed: the level plus 2.33 binomial SE (one-sided 1%).
    assert calls / trials <= level + 2.33 * math.sqrt(level * (1 - level) / trials)
    assert all(v in ("slower", "faster", "no significant change") for v in verdicts)
    if min_effect == 0.0:
        assert calls > 0  # the test is not blind: at 5% some of 500 draws are called


def test_a_significant_shift_within_the_minimum_effect_is_no_change():
    rng = np.random.default_rng(BASE_SEED + 3)
    a = draw(rng, n=2000)
    b = [1.03 * v for v in draw(rng, n=2000)]
    row = C.compare_series(series(a), series(b))  # 3% in 2000 steps: p tiny, below the 5% minimum
    assert row.p_value < 1e-6
    assert row.verdict == "no significant change" and "5% minimum effect" in row.reason
    assert C.compare_series(series(a), series(b), min_effect=0.01).verdict == "slower"


def test_three_first_tokens_a_side_are_not_judged():
    # C(6, 3) = 20 orderings: the smallest p is 1/20 = 0.05, above 0.025.
    row = C.compare_series(series([100.0, 101.0, 102.0]), series([200.0, 201.0, 202.0]))
    assert row.verdict == "not judged" and "too few" in row.reason
    assert row.ratio == pytest.approx(201.0 / 101.0)


def test_the_smallest_p_of_many_samples_is_zero_not_an_overflow():
    assert stats.min_p(3, 3) == 1 / 20
    assert stats.min_p(2000, 2000) == 0.0  # C(4000, 2000) ~ 1e1202 is beyond a float


def test_the_nightly_judges_a_run_of_300_steps_against_7_such_runs():
    # 300 vs 2100 pooled steps: C(2400, 300) ~ 1e382 overflowed the rule's min_p before it was shared.
    rng = np.random.default_rng(BASE_SEED + 13)
    earlier = [H.HistoryPoint(i, "", None, 100.0, 300, samples=tuple(draw(rng, n=300))) for i in range(7, 0, -1)]
    slow = draw(rng, n=300, shift=2.0)
    metric = H.Metric("latency", "next_token_ms_p50", "256x64", float(np.median(slow)), "ms", "lower", 300,
                      tuple(slow))
    verdict = rules.judge(metric, earlier)
    assert verdict.status == "suspicious" and verdict.p_value < 1e-10


def test_the_nightly_rule_and_compare_share_one_rank_test():
    assert rules.rank_test is stats.rank_test and rules.min_p is stats.min_p
    assert rules.judge_change is stats.judge_change and C.stats.judge_change is stats.judge_change


# ---------------------------------------------------------------- the one comparison: stats.judge_change

A8 = [10.0, 11.0, 12.0, 13.0, 14.0, 15.0, 16.0, 17.0]
B8 = [20.0, 21.0, 22.0, 23.0, 24.0, 25.0, 26.0, 27.0]


def test_judge_change_against_hand_computed_mann_whitney_and_interval():
    # Every B above every A: U = 8 x 8 = 64; Var U = 64/12 x 17 = 90.667 (no ties), sd 9.5219;
    # p = 1 - Phi((64 - 32 - 0.5) / 9.5219) = 4.6955e-4 < 0.001 = alpha (1 / C(16, 8) = 7.8e-5 allows it).
    # Interval: k = floor(32 - 1.959964 x 9.5219) = 13; the 13th and 52nd of the 64 ratios b/a sorted
    # are 22/15 and 21/10; the medians' ratio 23.5 / 13.5.
    change = stats.judge_change(B8, A8, 0.10)
    assert (change.word, change.direction, change.counts) == ("slower", 1, (8, 8))
    assert change.p_value == pytest.approx(4.6955e-4, rel=1e-3)
    assert change.ratio == pytest.approx(23.5 / 13.5)
    assert (change.ci.low, change.ci.high) == (pytest.approx(22 / 15), pytest.approx(21 / 10))
    assert change.judged and change.reason == ""
    faster = stats.judge_change(A8, B8, 0.10)
    assert (faster.word, faster.direction, faster.p_value) == ("faster", -1, pytest.approx(4.6955e-4, rel=1e-3))
    # A throughput: above is faster; numpy arrays are samples too.
    assert stats.judge_change(B8, A8, 0.10, better="higher").word == "faster"
    assert stats.judge_change(np.array(B8), np.array(A8), 0.10).word == "slower"


def test_judge_change_same_when_the_rank_test_is_not_significant():
    # a = 1,3,5,7, b = 2,4,6,8: pairs with b > a: 1 + 2 + 3 + 4 = 10; Var U = 16/12 x 9 = 12;
    # p = 1 - Phi((10 - 8 - 0.5) / sqrt(12)) = 0.33250.  B/A = 5 / 4 is beyond the 10% band, but p >= 0.05.
    change = stats.judge_change([2.0, 4.0, 6.0, 8.0], [1.0, 3.0, 5.0, 7.0], 0.10, alpha=0.05)
    assert stats.rank_test([2.0, 4.0, 6.0, 8.0], [1.0, 3.0, 5.0, 7.0]).u == 10
    assert (change.word, change.direction, change.reason) == ("same", 0, "p >= 0.05")
    assert change.p_value == pytest.approx(0.33250, abs=1e-5)


def test_judge_change_undecided_with_too_few_samples():
    # 3 against 3: the smallest one-sided p is 1 / C(6, 3) = 0.05, never below 0.001.
    change = stats.judge_change([30.0, 31.0, 32.0], [10.0, 11.0, 12.0], 0.10)
    assert (change.word, change.judged, change.p_value) == ("undecided", False, None)
    assert change.reason == "3 vs 3 samples: too few for the rank test (p >= 0.001 at best)"
    assert stats.judge_change(None, None, 0.1, level_b=5.0, level_a=0.0).word == "undecided"


@pytest.mark.parametrize("level_b, band, better, word", [
    (115.0, 0.10, "lower", "slower"),  # 115 > 100 x 1.10
    (109.0, 0.10, "lower", "same"),
    (90.0, 0.10, "lower", "faster"),  # 90 < 100 / 1.10 = 90.9
    (92.0, 0.10, "lower", "same"),
    (115.0, 0.10, "higher", "faster"),
    (106.0, 0.05, "lower", "slower"),
])
def test_judge_change_without_samples_the_band_alone_decides(level_b, band, better, word):
    change = stats.judge_change(None, None, band, level_b=level_b, level_a=100.0, better=better)
    assert change.word == word and change.ratio == pytest.approx(level_b / 100.0)
    assert change.ci is None and change.p_value is None and change.counts is None
    if word == "same":
        assert change.reason == f"within the {band:.0%} minimum effect"


def test_the_perf_baseline_gate_uses_the_one_comparison(monkeypatch):
    calls = []
    real = stats.judge_change
    # The gate's module looks the name up (perf/baseline.py), so that is where it is replaced.
    monkeypatch.setattr(perf_baseline, "judge_change", lambda *a, **k: calls.append(k) or real(*a, **k))
    run = type("Run", (), {})()
    result = perf.CaseResult(perf.Case(16, 4), 1, "detail", first_ms=[12.0], next_ms=[2.0], step_ms=[2.0, 2.0, 2.0])
    run.results = [result]
    baseline = perf.Baseline(None, "extended", {(1, 16, 4): {"first": 10.0, "next": 2.0}})
    comparison = perf.compare_to_baseline(run, baseline, 0.10)
    assert [ln["verdict"] for ln in comparison.lines] == ["SLOWER by more than 10%", "ok"]  # 12/10 > 1.1; 2/2
    assert [(k["level_b"], k["level_a"]) for k in calls] == [(12.0, 10.0), (2.0, 2.0)]


# ---------------------------------------------------------------- inputs: perf output directories


def perf_run(steps: list[float], firsts: list[float], *, dtype="fp32", compile_mode="off",
             cases=((256, 64),)) -> perf.PerfRun:
    settings = perf.PerfSettings(cases=[perf.Case(*c) for c in cases], model_name="m", mem_bandwidth_gbps=1.0)
    run = perf.PerfRun("m", "/m", "cpu", "AMD EPYC", dtype, 1, settings,
                       [{"weight_bytes": 1, "decode_weight_bytes": 1, "kv_bytes_per_token": 1}], [1e9], "given",
                       perf.Case(256, 64), compile=compile_mode)
    for seq_in, seq_out in cases:
        run.results.append(perf.CaseResult(perf.Case(seq_in, seq_out), 1, "detail", first_ms=list(firsts),
                                           next_ms=[float(np.mean(steps))], step_ms=list(steps),
                                           e2e_ms=[1.0], response_s=[1.0], peak_memory_bytes=[1]))
    return run


def write_dir(path, run: perf.PerfRun):
    perf.write_tables(run, path)
    return path


def test_two_perf_output_directories_compared_on_the_terminal_and_in_markdown(tmp_path, capsys, monkeypatch):
    rng = np.random.default_rng(BASE_SEED + 4)
    a = write_dir(tmp_path / "a", perf_run(draw(rng), draw(rng, n=10, shift=10.0)))
    b = write_dir(tmp_path / "b", perf_run(draw(rng, shift=1.10), draw(rng, n=10, shift=10.0)))
    monkeypatch.chdir(tmp_path)
    assert main(["compare", str(a), str(b)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split()[:5] == ["case", "metric", "A", "median", "B"]
    next_row = next(line for line in out if "next_token_ms" in line)
    assert next_row.startswith("256x64") and next_row.rstrip().endswith("slower")
    first_row = next(line for line in out if "first_token_ms" in line)
    assert "no significant change" in first_row
    md = (tmp_path / "compare.md").read_text()
    assert f"- A: {a / 'performance_test_m_AMD_EPYC_bs1_samples.json'}" in md
    table = [line for line in md.splitlines() if line.startswith("| 256x64 | next_token_ms")]
    assert len(table) == 1 and table[0].endswith("| slower |")
    assert "| case | metric | A median | B median | B/A | 95% CI | p | n A/B | verdict |" in md
    assert "| 100/100 |" in table[0]


def test_fail_on_slower_exits_3_after_writing(tmp_path, capsys):
    rng = np.random.default_rng(BASE_SEED + 5)
    a = write_dir(tmp_path / "a", perf_run(draw(rng), draw(rng, n=10)))
    b = write_dir(tmp_path / "b", perf_run(draw(rng, shift=1.2), draw(rng, n=10)))
    out = tmp_path / "ab.md"
    assert main(["compare", str(a), str(b), "--output", str(out), "--fail-on", "slower"]) == 3
    err = capsys.readouterr().err
    assert "figure(s) slower in B: next_token_ms 256x64" in err
    assert out.is_file()
    assert main(["compare", str(b), str(a), "--output", str(out), "--fail-on", "slower"]) == 0  # A is faster


def test_runs_that_are_not_comparable_are_refused_naming_the_keys(tmp_path, capsys):
    rng = np.random.default_rng(BASE_SEED + 6)
    a = write_dir(tmp_path / "a", perf_run(draw(rng), draw(rng, n=10)))
    b = write_dir(tmp_path / "b", perf_run(draw(rng), draw(rng, n=10), dtype="bf16", compile_mode="on"))
    assert main(["compare", str(a), str(b), "--output", str(tmp_path / "x.md")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "not comparable: dtype fp32 vs bf16; compile off vs on" in err
    assert "world_size" not in err and "model" not in err
    assert not (tmp_path / "x.md").exists()


def test_a_json_without_a_key_is_unknown_and_refused(tmp_path):
    rng = np.random.default_rng(BASE_SEED + 7)
    a = write_dir(tmp_path / "a", perf_run(draw(rng), draw(rng, n=10)))
    [path] = (tmp_path / "a").glob("*_samples.json")
    doc = json.loads(path.read_text())
    del doc["compile"]  # a samples JSON from before the compile mode was recorded
    old = tmp_path / "old_samples.json"
    old.write_text(json.dumps(doc))
    with pytest.raises(UserError, match="not comparable: compile off vs unknown"):
        C.compare(C.load_side(str(a), "h.sqlite"), C.load_side(str(old), "h.sqlite"))


def test_cases_only_one_side_measured_are_listed_not_compared(tmp_path):
    rng = np.random.default_rng(BASE_SEED + 8)
    a = write_dir(tmp_path / "a", perf_run(draw(rng), draw(rng, n=10), cases=((256, 64), (512, 64))))
    b = write_dir(tmp_path / "b", perf_run(draw(rng), draw(rng, n=10), cases=((256, 64), (128, 32))))
    c = C.compare(C.load_side(str(a), "h"), C.load_side(str(b), "h"))
    assert {r.case for r in c.rows} == {"256x64"}
    assert c.only_a == ["512x64"] and c.only_b == ["128x32"]
    assert "only in A (not compared): 512x64" in C.markdown(c)


@pytest.mark.parametrize("make, message", [
    (lambda d: d / "missing", "neither a perf output directory, a samples JSON nor a run id"),
    (lambda d: d, "no *_samples.json in this directory"),
    (lambda d: (d / "x_samples.json").write_text("{") and d, "not JSON"),
    (lambda d: (d / "x_samples.json").write_text('{"cases": []}') and d, "missing key(s) model_name"),
    (lambda d: (d / "x_samples.json").write_text("{}") and (d / "y_samples.json").write_text("{}") and d,
     "2 samples JSON files (x_samples.json, y_samples.json): give one"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, make, message):
    (tmp_path / "in").mkdir()
    target = make(tmp_path / "in")
    rng = np.random.default_rng(BASE_SEED)
    a = write_dir(tmp_path / "a", perf_run(draw(rng), draw(rng, n=10)))
    assert main(["compare", str(a), str(target), "--output", str(tmp_path / "x.md")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("vicuna-bench compare: error: ") and message in err


def test_a_negative_min_effect_is_refused(tmp_path):
    rng = np.random.default_rng(BASE_SEED)
    a = C.load_side(str(write_dir(tmp_path / "a", perf_run(draw(rng), draw(rng, n=10)))), "h")
    with pytest.raises(UserError, match="--min-effect -0.1: must be >= 0"):
        C.compare(a, a, min_effect=-0.1)


# ---------------------------------------------------------------- inputs: nightly history run ids


def night(db, steps, firsts, *, samples=True, dtype="fp32", device_name="AMD_EPYC", compile_mode="off") -> int:
    run = H.RunRecord("2026-12-01T00:00:00Z", "2026-12-01T00:10:00Z", "pass", "m", "cpu", device_name, dtype, 1, 1,
                      environment={"chip_family": None}, compile_mode=compile_mode, perf_mode="detail",
                      perf_repeat=len(firsts), perf_cases="256x64")
    metrics = [
        H.Metric("latency", "first_token_ms_p50", "256x64", float(np.median(firsts)), "ms", "lower", len(firsts),
                 tuple(firsts) if samples else None),
        H.Metric("latency", "next_token_ms_p50", "256x64", float(np.median(steps)), "ms", "lower", len(steps),
                 tuple(steps) if samples else None),
        H.Metric("memory", "peak_memory_mib", "256x64", 900.0, "MiB", "lower"),
    ]
    return H.record_run(db, run, metrics)


def test_two_history_runs_by_id(tmp_path, capsys):
    db = tmp_path / "history.sqlite"
    rng = np.random.default_rng(BASE_SEED + 9)
    one = night(db, draw(rng), draw(rng, n=10, shift=10.0))
    two = night(db, draw(rng, shift=0.9), draw(rng, n=10, shift=10.0))
    assert main(["compare", str(one), str(two), "--history", str(db), "--output", str(tmp_path / "c.md")]) == 0
    out = capsys.readouterr().out
    assert "faster" in next(line for line in out.splitlines() if "next_token_ms" in line)
    assert f"- A: run {one} of {db}" in (tmp_path / "c.md").read_text()
    assert "peak_memory" not in out  # no samples behind it: compare reads the latencies only


def test_a_history_run_and_a_perf_directory_of_the_same_setup_compare(tmp_path):
    db = tmp_path / "history.sqlite"
    rng = np.random.default_rng(BASE_SEED + 10)
    rid = night(db, draw(rng), draw(rng, n=10))
    d = write_dir(tmp_path / "d", perf_run(draw(rng, shift=1.10), draw(rng, n=10)))
    c = C.compare(C.load_side(str(rid), db), C.load_side(str(d), db))
    assert [r.verdict for r in c.rows if r.metric == "next_token_ms"] == ["slower"]


def test_a_history_run_without_samples_shows_medians_and_judges_nothing(tmp_path):
    db = tmp_path / "history.sqlite"
    rng = np.random.default_rng(BASE_SEED + 11)
    old = night(db, draw(rng), draw(rng, n=10), samples=False)
    new = night(db, draw(rng, shift=2.0), draw(rng, n=10))
    c = C.compare(C.load_side(str(old), db), C.load_side(str(new), db))
    row = next(r for r in c.rows if r.metric == "next_token_ms")
    assert row.verdict == "not judged" and row.ci is None and f"run {old} of {db} stored no samples" in row.reason
    assert row.ratio == pytest.approx(row.median_b / row.median_a) and row.ratio > 1.5


def test_history_runs_of_another_chip_are_refused(tmp_path):
    db = tmp_path / "history.sqlite"
    rng = np.random.default_rng(BASE_SEED + 12)
    a = night(db, draw(rng), draw(rng, n=10), device_name="NVIDIA_H100_80GB_HBM3")
    b = night(db, draw(rng), draw(rng, n=10), device_name="NVIDIA_H200")
    with pytest.raises(UserError, match="not comparable: chip NVIDIA_H100_80GB_HBM3 vs NVIDIA_H200"):
        C.compare(C.load_side(str(a), db), C.load_side(str(b), db))


def test_a_run_id_not_in_the_history_or_no_history_is_exit_2(tmp_path, capsys):
    db = tmp_path / "history.sqlite"
    rng = np.random.default_rng(BASE_SEED)
    rid = night(db, draw(rng), draw(rng, n=10))
    assert main(["compare", str(rid), "99", "--history", str(db)]) == 2
    assert "run id 99 is not in the history" in capsys.readouterr().err
    assert main(["compare", "1", "2", "--history", str(tmp_path / "none.sqlite")]) == 2
    assert f"--history {tmp_path / 'none.sqlite'}: no such file" in capsys.readouterr().err
    assert not (tmp_path / "none.sqlite").exists()
