"""The regression rule: a run's metrics against comparable earlier runs.

Baseline: the metric in the last ``window`` (7) comparable runs, among the
last ``4 x window``, where the rule did not call it worse (suspicious or
regression, as recorded with each run) and the run did not crash: a slow
night never sets what normal is.  Fewer than 3: *insufficient history*.  A
slowdown that lasts beyond the lookback leaves no baseline, is not judged,
and so becomes the new baseline 3 runs later.

A latency with samples (next token: every decode step; first token: every
repeat) is *slow* when all hold:

* its median moved worse by more than the band: beyond ``baseline x (1 +
  t)``, ``t = max(tolerance, Z x spread / baseline)``, where the baseline is
  the median of the baseline runs' medians and the spread 1.4826 x their
  median absolute deviation (how far clean runs of this host wander);
* a one-sided Mann-Whitney U test (vicuna_bench/stats.py, shared with
  ``vicuna-bench compare``) of this run's samples against the baseline
  runs' pooled samples gives p < ALPHA.

A figure without samples (memory; a rate over >= 100 questions; a p90 of
>= 64 samples; histories from before samples were stored) is slow on the
first condition alone.  Slow in this run and in the previous comparable run
(its recorded verdict; judged again against *its* baseline when it has
none): *regression*; in this run only: *suspicious*.  A run that is not slow is never a regression, whatever the
run before it did.  As far the other way: *improved*.

Too noisy to judge at the run's size, so *report-only*: a p50 over fewer
than 5 samples (or too few for the rank test to reach ALPHA), a p90 of
fewer than 64 samples (p99: 662), a rate over fewer than 100 questions,
decode tokens/s (the decode steps' p50 judges it), a baseline whose spread
exceeds 20%.

Accuracy (a 0..1 fraction over n questions): below its release gate:
*gate-failed*; else more than two binomial standard errors
``sqrt(p (1 - p) / n)`` (p the baseline, n this run's questions) below the
baseline: *regression* (one run suffices: the error bar already accounts
for noise); as far above: *improved*.

shared/spec/REGRESSION.md is the survey this follows (asv, Chromium,
Perfherder, MLPerf); docs/nightly.md has the noise measured with it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sqlite3
import statistics
from collections.abc import Iterable, Sequence
from pathlib import Path

from ..errors import UserError
from ..stats import RankTest, judge_change, min_p, rank_test  # noqa: F401  (the one comparison, shared with compare)
from . import history as H

DEFAULT_WINDOW = 7
LOOKBACK = 4  # x window: how far back runs for the baseline are looked for
MIN_HISTORY = 3
DEFAULT_TOLERANCE = 0.10
SPREAD_Z = 4.0  # a median must move by this many robust SDs of the baseline runs' medians, besides the band
MAD_SD = 1.4826  # MAD -> standard deviation for normal data
ALPHA = 0.001  # the rank test's one-sided significance level
MAX_SPREAD = 0.20  # a baseline whose runs wander more than this (spread / baseline) judges nothing
MIN_SAMPLES = 5  # a median over fewer samples is reported, not judged
# A percentile needs this many samples before it is judged (MLPerf's early-stopping counts at 99% confidence).
PERCENTILE_MIN_SAMPLES = {"p90": 64, "p99": 662}
MIN_QUESTIONS = 100  # a rate over fewer questions is reported, not judged
DERIVED = {"decode_tokens_per_s": "next_token_ms_p50"}  # judged through the metric it is computed from
ACCURACY_SE = 2.0  # how many binomial standard errors an accuracy may move before it counts
STATUSES = ("ok", "improved", "suspicious", "regression", "insufficient-history", "report-only", "gate-failed")
FAILING = ("regression", "gate-failed")
# A gate either measured something (passed, failed) or says why it could not apply (n/a); there is no
# "skipped" that reads like a pass.
GATE_STATUSES = ("passed", "failed", "n/a")
GATE_STATUS_WORDS = {"passed": "passed", "failed": "failed", "n/a": "not applicable"}


@dataclasses.dataclass(frozen=True)
class Verdict:
    """One metric of one run judged against its history; values in the metric's unit."""

    name: str
    case: str
    kind: str
    unit: str
    better: str
    value: float
    status: str  # one of STATUSES
    baseline: float | None = None  # median of the baseline runs' values (or of their samples' medians)
    ratio: float | None = None  # value / baseline (samples: this run's median / baseline)
    delta: float | None = None  # value - baseline
    band: tuple[float, float] | None = None  # (low, high): inside is ok
    history: int = 0  # comparable earlier runs used for the baseline
    previous: float | None = None  # the value in the newest comparable earlier run
    gate: float | None = None  # an accuracy's release gate (0..1), if any
    reason: str = ""
    p_value: float | None = None  # the rank test's one-sided p in the direction the median moved
    spread: float | None = None  # 1.4826 x MAD of the baseline runs' values, in the unit

    @property
    def failing(self) -> bool:
        return self.status in FAILING


@dataclasses.dataclass(frozen=True)
class Gate:
    """A pass/fail check of the run: an accuracy threshold, the hardware suite; value and threshold in ``unit``.

    ``n/a``: the check did not apply to this run (a stage left out, a subset
    run's accuracy, the hw suite on a CPU night), ``detail`` says why.
    """

    name: str  # e.g. 'mmlu/generate accuracy', 'hw suite'
    status: str  # passed | failed | n/a (GATE_STATUSES)
    value: float | None = None
    threshold: float | None = None
    unit: str = ""
    detail: str = ""  # the skip reason, or what failed
    case: str | None = None  # an accuracy gate's metric case, e.g. 'mmlu/generate'; the rule judges it too

    def __post_init__(self):
        if self.status == "skipped":  # the word of nightly.json files written before n/a
            object.__setattr__(self, "status", "n/a")
        if self.status not in GATE_STATUSES:
            raise ValueError(f"gate {self.name!r}: status {self.status!r} is not one of {', '.join(GATE_STATUSES)}")

    @property
    def margin(self) -> float | None:
        """value - threshold (positive: room to spare); None when either is unknown."""
        if self.value is None or self.threshold is None:
            return None
        return self.value - self.threshold


@dataclasses.dataclass(frozen=True)
class Outcome:
    """The run's overall verdict: PASS or FAIL, why, and the exit code (0 or 3)."""

    passed: bool
    reason: str

    @property
    def exit_code(self) -> int:
        return 0 if self.passed else 3


# ---------------------------------------------------------------- judging one metric

WORSE = ("suspicious", "regression")


def _points(earlier: Sequence) -> list[H.HistoryPoint]:
    """HistoryPoints as given; a plain number is a passing run's value without samples or recorded verdict."""
    return [p if isinstance(p, H.HistoryPoint) else H.HistoryPoint(0, "", None, float(p), None) for p in earlier]


def _baseline_runs(earlier: Sequence[H.HistoryPoint], window: int) -> list[H.HistoryPoint]:
    """The newest ``window`` runs among the newest ``LOOKBACK x window`` whose value was not called worse
    and whose run did not crash (newest first)."""
    usable = [p for p in earlier[:LOOKBACK * window] if p.status != "error" and p.verdict not in WORSE]
    return usable[:window]


def _spread(values: Sequence[float]) -> float:
    centre = statistics.median(values)
    return MAD_SD * statistics.median(abs(v - centre) for v in values)


def _not_judged_why(metric: H.Metric) -> str | None:
    """Why a figure is too noisy to judge at this run's size (report-only), or None."""
    if metric.name in DERIVED:
        return f"derived from the decode steps: judged as {DERIVED[metric.name]}"
    suffix = metric.name.rsplit("_", 1)[-1]
    count = len(metric.samples) if metric.samples is not None else metric.n
    if suffix in PERCENTILE_MIN_SAMPLES:
        needed = PERCENTILE_MIN_SAMPLES[suffix]
        if count is None or count < needed:
            return f"a {suffix} of {count if count is not None else 'an unknown number of'} samples ({needed} needed)"
    elif metric.kind == "latency" and count is not None and count < MIN_SAMPLES:
        return f"{count} sample(s) ({MIN_SAMPLES} needed)"
    if metric.kind == "rate" and (metric.n is None or metric.n < MIN_QUESTIONS):
        return (f"a rate over {metric.n if metric.n is not None else 'an unknown number of'} questions "
                f"({MIN_QUESTIONS} needed)")
    return None


@dataclasses.dataclass(frozen=True)
class _Shift:
    """How one run's figure sits against its baseline runs."""

    level: float  # this run's value, or its samples' median
    baseline: float
    spread: float
    tolerance: float  # the band actually applied: max(tolerance, SPREAD_Z x spread / baseline)
    direction: int  # +1 worse, -1 better, 0 inside the band (or not significant)
    p_value: float | None  # the rank test's p in the direction of the move (None: no samples)
    samples: tuple[int, int] | None  # (this run's, the baseline's pooled) sample counts


def _shift(metric_value: float, samples, better: str, baseline_runs: Sequence[H.HistoryPoint],
           tolerance: float) -> _Shift | str:
    """Where a value (or a sample set) sits against baseline runs; a string says why it cannot be judged."""
    with_samples = [p for p in baseline_runs if p.samples]
    use_samples = samples is not None and len(with_samples) >= MIN_HISTORY
    if use_samples:
        baseline_runs = with_samples
        level = statistics.median(samples)
        levels = [statistics.median(p.samples) for p in baseline_runs]
    else:
        level = metric_value
        levels = [p.value for p in baseline_runs]
    baseline = statistics.median(levels)
    spread = _spread(levels)
    if baseline <= 0:
        return f"baseline {baseline:g}: no ratio to judge"
    if spread / baseline > MAX_SPREAD:
        return f"the baseline runs wander {spread / baseline:.0%} (over {MAX_SPREAD:.0%}): too noisy to judge"
    band = max(tolerance, SPREAD_Z * spread / baseline)
    pooled = [v for p in baseline_runs for v in p.samples] if use_samples else None
    counts = (len(samples), len(pooled)) if use_samples else None
    # B = this run, A = the baseline runs; the interval is not reported, so not computed.
    moved = judge_change(samples if use_samples else None, pooled, band, level_b=level, level_a=baseline,
                         alpha=ALPHA, confidence=None)
    if not moved.judged:  # the baseline is > 0 (checked above): too few samples for the rank test
        return f"{counts[0]} vs {counts[1]} samples: too few for the rank test (p >= {ALPHA:g} at best)"
    sign = 1 if better == "lower" else -1
    return _Shift(level, baseline, spread, band, sign * moved.direction, moved.p_value, counts)


def _describe(shift: _Shift, tolerance: float) -> str:
    change = f"{'median' if shift.samples else 'value'} {100 * (shift.level / shift.baseline - 1):+.1f}%"
    band = f"band {shift.tolerance:.0%}"
    if shift.tolerance > tolerance:
        band += f" ({SPREAD_Z:g} x spread {shift.spread / shift.baseline:.1%})"
    test = "" if shift.p_value is None else \
        f", rank test p={shift.p_value:.2g} ({shift.samples[0]} vs {shift.samples[1]} samples)"
    return f"{change} vs {band}{test}"


def judge(
    metric: H.Metric, earlier: Sequence, *, window: int = DEFAULT_WINDOW,
    tolerance: float = DEFAULT_TOLERANCE, gate: float | None = None,
) -> Verdict:
    """Judge one metric against its comparable earlier runs (newest first, any status); a Verdict.

    ``earlier``: HistoryPoints (comparable_values' order), or plain numbers
    for passing runs without samples.  ``gate`` is an accuracy's minimum
    (0..1 fraction) from its release threshold.
    """
    if window < MIN_HISTORY:
        raise UserError(f"window {window}: the baseline needs at least {MIN_HISTORY} runs")
    if not tolerance > 0:
        raise UserError(f"tolerance {tolerance}: must be above 0 (e.g. 0.10 for 10%)")
    earlier = _points(earlier)
    base = dict(name=metric.name, case=metric.case, kind=metric.kind, unit=metric.unit, better=metric.better,
                value=metric.value, gate=gate, previous=earlier[0].value if earlier else None)
    runs = _baseline_runs(earlier, window)
    if gate is not None and metric.value < gate:
        return Verdict(**base, status="gate-failed", history=len(runs),
                       reason=f"below the release gate {show_value(gate, metric.unit)}")
    if metric.kind != "accuracy":
        why = _not_judged_why(metric)
        if why is not None:
            return Verdict(**base, status="report-only", history=len(runs), reason=why)
    if len(runs) < MIN_HISTORY:
        return Verdict(**base, status="insufficient-history", history=len(runs),
                       reason=f"{len(runs)} comparable earlier run(s) not called worse, {MIN_HISTORY} needed")
    if metric.kind == "accuracy":
        baseline = statistics.median(p.value for p in runs)
        base.update(baseline=baseline, history=len(runs), delta=metric.value - baseline,
                    ratio=metric.value / baseline if baseline else None)
        return _judge_accuracy(metric, base, baseline)
    shift = _shift(metric.value, metric.samples, metric.better, runs, tolerance)
    if isinstance(shift, str):
        return Verdict(**base, status="report-only", history=len(runs), reason=shift)
    base.update(baseline=shift.baseline, history=len(runs), delta=shift.level - shift.baseline,
                ratio=shift.level / shift.baseline, p_value=shift.p_value, spread=shift.spread,
                band=(shift.baseline / (1 + shift.tolerance), shift.baseline * (1 + shift.tolerance)))
    why = _describe(shift, tolerance)
    if shift.direction < 0:
        return Verdict(**base, status="improved", reason=f"better: {why}")
    if shift.direction == 0:
        return Verdict(**base, status="ok", reason=why if shift.p_value is not None else "")
    if _previous_was_slow(metric, earlier, window, tolerance):
        return Verdict(**base, status="regression", reason=f"worse in this run and the previous one: {why}")
    return Verdict(**base, status="suspicious", reason=f"worse in this run only: {why}")


def _previous_was_slow(metric: H.Metric, earlier: Sequence[H.HistoryPoint], window: int, tolerance: float) -> bool:
    """Was the newest earlier comparable run worse than *its own* baseline?  Its recorded verdict says;
    without one (a run recorded without verdicts), it is judged again against the runs before it."""
    if not earlier:
        return False
    previous = earlier[0]
    if previous.verdict is not None:
        return previous.verdict in WORSE
    shown = dataclasses.replace(metric, value=previous.value, n=previous.n, samples=previous.samples)
    if _not_judged_why(shown) is not None:
        return False
    runs = _baseline_runs(earlier[1:], window)
    if len(runs) < MIN_HISTORY:
        return False
    shift = _shift(previous.value, previous.samples, metric.better, runs, tolerance)
    return not isinstance(shift, str) and shift.direction > 0


def _judge_accuracy(metric: H.Metric, base: dict, baseline: float) -> Verdict:
    se = math.sqrt(baseline * (1 - baseline) / metric.n)
    band = (baseline - ACCURACY_SE * se, baseline + ACCURACY_SE * se)
    if metric.value < band[0]:
        return Verdict(**base, band=band, status="regression",
                       reason=f"more than {ACCURACY_SE:g} standard errors ({se:.4f} each, n={metric.n}) below the baseline")
    if metric.value > band[1]:
        return Verdict(**base, band=band, status="improved",
                       reason=f"more than {ACCURACY_SE:g} standard errors above the baseline")
    return Verdict(**base, band=band, status="ok")


def accuracy_gates(gates: Iterable[Gate]) -> dict[str, float]:
    """The accuracy gates as {case: minimum 0..1}, e.g. {'mmlu/generate': 0.239}, from percent gates."""
    return {g.case: g.threshold / 100 for g in gates
            if g.case and g.status != "n/a" and g.threshold is not None and g.unit == "%"}


def evaluate_run(
    db: str | Path | sqlite3.Connection, run: H.RunRecord, metrics: Sequence[H.Metric], *,
    gates: Iterable[Gate] = (), window: int = DEFAULT_WINDOW, tolerance: float = DEFAULT_TOLERANCE,
    before_run_id: int | None = None,
) -> list[Verdict]:
    """Judge every metric of ``run`` against the comparable runs recorded before ``before_run_id``.

    Before recording the run, leave ``before_run_id`` out (every recorded
    run is earlier); to judge a recorded run again, pass its id.
    """
    minimum = accuracy_gates(gates)
    # One run more than the lookback: the previous run is judged against the runs before it.
    earlier = H.comparable_values_by_metric(db, run, metrics, LOOKBACK * window + 1, before_run_id)
    return [
        judge(m, earlier[(m.name, m.case)], window=window, tolerance=tolerance,
              gate=minimum.get(m.case) if m.kind == "accuracy" else None)
        for m in metrics
    ]


def overall(verdicts: Sequence[Verdict], gates: Sequence[Gate]) -> Outcome:
    """PASS when every gate holds and no metric regressed; else FAIL naming what failed first."""
    failed = [g for g in gates if g.status == "failed"]
    reasons = [f"gate failed: {g.name}" + (f" ({g.detail})" if g.detail else "") for g in failed]
    named = {g.case for g in failed}
    for v in verdicts:
        if v.status == "gate-failed" and v.case not in named:  # said once, by its gate, when the gate failed too
            reasons.append(f"gate failed: {v.name} {v.case} {show_value(v.value, v.unit)} < {show_value(v.gate, v.unit)}")
        elif v.status == "regression":
            reasons.append(f"regression: {v.name} {v.case} {show_value(v.value, v.unit)} vs baseline "
                           f"{show_value(v.baseline, v.unit)} ({show_change(v)})")
    if reasons:
        # The reason is REPORT.md's first line: two causes, then a count; the tables list them all.
        more = f"; and {len(reasons) - 2} more" if len(reasons) > 2 else ""
        return Outcome(False, "; ".join(reasons[:2]) + more)
    return _unfailed_outcome(verdicts, gates)


def gate_tally(gates: Sequence[Gate]) -> str:
    """The gates by result, each named: '2 passed (hw suite, mmlu/generate accuracy), 1 not applicable (perf stage)'."""
    parts = []
    for status in GATE_STATUSES:
        names = [g.name for g in gates if g.status == status]
        if names:
            parts.append(f"{len(names)} {GATE_STATUS_WORDS[status]} ({', '.join(names)})")
    return ", ".join(parts) or "no gate"


def _unfailed_outcome(verdicts: Sequence[Verdict], gates: Sequence[Gate]) -> Outcome:
    """Nothing failed: PASS when something was measured (a gate passed or a metric was recorded), else FAIL."""
    if not verdicts and not any(g.status == "passed" for g in gates):
        return Outcome(False, f"nothing was measured: no gate passed ({gate_tally(gates)}) and no metric was recorded")
    return Outcome(True, f"gates: {gate_tally(gates)}; no regression in {len(verdicts)} metric(s)")


def show_value(value: float | None, unit: str) -> str:
    """A figure as a person reads it: '98.1 ms', '24.90%' for a 0..1 fraction, '-' when unknown."""
    if value is None:
        return "-"
    return f"{100 * value:.2f}%" if unit == "fraction" else f"{value:.4g} {unit}"


def show_change(v: Verdict) -> str:
    """Against the baseline: '+21.9%' for a ratio metric, '-3.00 pts' for an accuracy, '-' without one."""
    if v.kind == "accuracy":
        return "-" if v.delta is None else f"{100 * v.delta:+.2f} pts"
    return "-" if v.ratio is None else f"{100 * (v.ratio - 1):+.1f}%"


# ---------------------------------------------------------------- gates from result files

def gates_from_precision_summary(path: str | Path) -> list[Gate]:
    """The release-gate verdicts in a precision ``summary.json``, one Gate per scoring (percent)."""
    return gates_from_summary(H.read_precision_summary(path), path)


def gates_from_summary(summary: dict, path: str | Path) -> list[Gate]:
    """The release-gate verdicts of a precision summary (the runner's dict; ``path`` names it in errors)."""
    from ..precision.gates import format_verdict

    gate = summary.get("gate")
    if gate is None:
        return []
    if not isinstance(gate, dict) or not isinstance(gate.get("verdicts"), list):
        raise UserError(f"{path}: key 'gate' must hold a list 'verdicts'")
    mode, out = summary["mode"], []
    # The runner judges every run but only a --gate run (the full val set) is a release gate; a
    # subset run's verdict is shown, not applicable.
    requested = gate.get("requested", True)
    for v in gate["verdicts"]:
        if v.get("status") in ("n/a", "skipped"):  # 'skipped': summaries written before n/a
            out.append(Gate(f"{mode} accuracy gate", "n/a", unit="%", detail=v.get("reason", "")))
            continue
        try:
            threshold = float(v["threshold"]) - float(v["tolerance"])
            case = f"{mode}/{v['scoring']}"
            detail = f"{format_verdict(v)} ({v.get('model', '?')})"
            status = v["status"] if requested else "n/a"
            if not requested:
                detail = f"not a --gate run (would have {v['status']}); {detail}"
            out.append(Gate(f"{case} accuracy", status, float(v["score"]), threshold, "%", detail, case))
        except (KeyError, TypeError, ValueError) as exc:
            raise UserError(f"{path}: gate verdict {json.dumps(v)} lacks scoring/score/threshold/tolerance") from exc
    return out
