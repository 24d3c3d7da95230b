"""The regression rule: a run's metrics against a window of comparable earlier runs.

Baseline: the median of the metric in the last ``window`` (7) comparable runs
before this one; fewer than 3 such runs: *insufficient history*.

Ratio metrics (latency, throughput, memory, rate): the band is
``[baseline / (1 + tol), baseline * (1 + tol)]`` (tol 10%).  Worse than the
band (above it when lower is better, below it when higher is better) in this
run *and* in the previous comparable run, judged against the same baseline:
*regression*; in this run only: *suspicious*.  Better than the band:
*improved*.  The band is symmetric in ratio, so a 10% slower next token is
exactly as far out as the 1/1.1 lower tokens/s it implies.

Accuracy (a 0..1 fraction over n questions): below its release gate:
*gate-failed*; else more than two binomial standard errors
``sqrt(p (1 - p) / n)`` (p the baseline, n this run's questions) below the
baseline: *regression* (one run suffices: the error bar already accounts
for noise); as far above: *improved*.
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
from . import history as H

DEFAULT_WINDOW = 7
MIN_HISTORY = 3
DEFAULT_TOLERANCE = 0.10
ACCURACY_SE = 2.0  # how many binomial standard errors an accuracy may move before it counts
STATUSES = ("ok", "improved", "suspicious", "regression", "insufficient-history", "gate-failed")
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
    baseline: float | None = None  # median of the window
    ratio: float | None = None  # value / baseline
    delta: float | None = None  # value - baseline
    band: tuple[float, float] | None = None  # (low, high): inside is ok
    history: int = 0  # comparable earlier runs used for the baseline
    previous: float | None = None  # the value in the newest comparable earlier run
    gate: float | None = None  # an accuracy's release gate (0..1), if any
    reason: str = ""

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


def judge(
    metric: H.Metric, earlier: Sequence[float], *, window: int = DEFAULT_WINDOW,
    tolerance: float = DEFAULT_TOLERANCE, gate: float | None = None,
) -> Verdict:
    """Judge one metric against its comparable earlier values (newest first); a Verdict.

    ``gate`` is an accuracy's minimum (0..1 fraction) from its release threshold.
    """
    if window < MIN_HISTORY:
        raise UserError(f"window {window}: the baseline needs at least {MIN_HISTORY} runs")
    if not tolerance > 0:
        raise UserError(f"tolerance {tolerance}: must be above 0 (e.g. 0.10 for 10%)")
    base = dict(name=metric.name, case=metric.case, kind=metric.kind, unit=metric.unit, better=metric.better,
                value=metric.value, gate=gate)
    if gate is not None and metric.value < gate:
        return Verdict(**base, status="gate-failed", history=min(len(earlier), window),
                       previous=earlier[0] if earlier else None,
                       reason=f"below the release gate {show_value(gate, metric.unit)}")
    earlier = list(earlier)[:window]
    if len(earlier) < MIN_HISTORY:
        return Verdict(**base, status="insufficient-history", history=len(earlier),
                       previous=earlier[0] if earlier else None,
                       reason=f"{len(earlier)} comparable earlier run(s), {MIN_HISTORY} needed")
    baseline = statistics.median(earlier)
    base.update(baseline=baseline, history=len(earlier), previous=earlier[0], delta=metric.value - baseline,
                ratio=metric.value / baseline if baseline else None)
    if metric.kind == "accuracy":
        return _judge_accuracy(metric, base, baseline)
    return _judge_ratio(metric, base, baseline, earlier[0], tolerance)


def _judge_ratio(metric: H.Metric, base: dict, baseline: float, previous: float, tolerance: float) -> Verdict:
    band = (baseline / (1 + tolerance), baseline * (1 + tolerance))

    def worse(v: float) -> bool:
        return v > band[1] if metric.better == "lower" else v < band[0]

    def better(v: float) -> bool:
        return v < band[0] if metric.better == "lower" else v > band[1]

    if worse(metric.value):
        if worse(previous):
            return Verdict(**base, band=band, status="regression",
                           reason=f"outside the {tolerance:.0%} band in this run and the previous one")
        return Verdict(**base, band=band, status="suspicious",
                       reason=f"outside the {tolerance:.0%} band in this run only")
    if better(metric.value):
        return Verdict(**base, band=band, status="improved", reason=f"better than the {tolerance:.0%} band")
    return Verdict(**base, band=band, status="ok")


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
    earlier = H.comparable_values_by_metric(db, run, metrics, window, before_run_id)
    return [
        judge(m, [p.value for p in earlier[(m.name, m.case)]], window=window, tolerance=tolerance,
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
    summary = H.read_precision_summary(path)
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
            detail = f"threshold {v['threshold']} - tolerance {v['tolerance']} ({v.get('model', '?')})"
            status = v["status"] if requested else "n/a"
            if not requested:
                detail = f"not a --gate run (would have {v['status']}); {detail}"
            out.append(Gate(f"{case} accuracy", status, float(v["score"]), threshold, "%", detail, case))
        except (KeyError, TypeError, ValueError) as exc:
            raise UserError(f"{path}: gate verdict {json.dumps(v)} lacks scoring/score/threshold/tolerance") from exc
    return out
