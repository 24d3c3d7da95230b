"""REPORT.md, the trend plots and the JUnit summary of a nightly run directory.

``REPORT.md`` is what a person reads first: the verdict on its first line,
then what regressed or failed (case and metric named), the gates, what
improved or looks suspicious, the trend plots, every metric, and links to
the detailed files.  Everything in it is rebuilt from the history and the
run directory's ``nightly.json``, so ``--report-only`` writes the same report.
"""

from __future__ import annotations

import dataclasses
import json
import os
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from ..errors import UserError
from ..files import write_atomic
from . import history as H
from . import rules as R

REPORT = "REPORT.md"
STATE = "nightly.json"  # what --report-only needs to rebuild REPORT.md: run id, history, gates, files
PLOTS = "plots"
TREND_RUNS = 30
LATENCY_TRENDS = ("first_token_ms_p50", "next_token_ms_p50")
HIGHLIGHT = {"regression": "**REGRESSION**", "gate-failed": "**GATE FAILED**", "suspicious": "*suspicious*",
             "improved": "improved"}


# ---------------------------------------------------------------- JUnit XML

@dataclasses.dataclass(frozen=True)
class JUnitSummary:
    """Counts of a JUnit XML file's test cases, the ids of those that failed or errored, the distinct skip messages."""

    path: Path
    tests: int
    failures: int
    errors: int
    skipped: int
    failed: tuple[str, ...] = ()
    skip_reasons: tuple[str, ...] = ()  # in order of first appearance

    @property
    def passed(self) -> int:
        return self.tests - self.failures - self.errors - self.skipped


def read_junit(path: str | Path) -> JUnitSummary:
    """Count the test cases of a JUnit XML file (pytest's --junitxml): tests, failures, errors, skipped."""
    path = Path(path)
    try:
        root = ET.parse(path).getroot()
    except OSError as exc:
        raise UserError(f"{path}: cannot read the JUnit XML ({exc.strerror})") from exc
    except ET.ParseError as exc:
        raise UserError(f"{path}: not JUnit XML ({exc})") from exc
    if root.tag not in ("testsuites", "testsuite"):
        raise UserError(f"{path}: root element <{root.tag}> is not <testsuites> or <testsuite>")
    # Count the cases themselves: the suite attributes are absent in some writers.
    tests = failures = errors = skipped = 0
    failed = []
    for case in root.iter("testcase"):
        tests += 1
        tags = {child.tag for child in case}
        name = f"{case.get('classname', '')}::{case.get('name', '')}".lstrip(":")
        if "error" in tags:
            errors += 1
            failed.append(name)
        elif "failure" in tags:
            failures += 1
            failed.append(name)
        elif "skipped" in tags:
            skipped += 1
    reasons: list[str] = []
    for element in root.iter("skipped"):
        text = (element.get("message") or element.text or "").strip()
        if text and text not in reasons:
            reasons.append(text)
    return JUnitSummary(path, tests, failures, errors, skipped, tuple(failed), tuple(reasons))


def junit_gate(summary: JUnitSummary, name: str = "hw suite", skip_reason: str = "", must_run: str = "") -> R.Gate:
    """The suite as a gate: failed if any test failed or errored; value passed, threshold the tests that ran.

    A suite that ran no test is not applicable, unless ``must_run`` says why
    it had to run (e.g. "the night's device is npu"): then it failed.
    """
    ran = summary.tests - summary.skipped
    if summary.failures or summary.errors:
        shown = ", ".join(summary.failed[:3]) + (" ..." if len(summary.failed) > 3 else "")
        return R.Gate(name, "failed", summary.passed, ran, "tests",
                      f"{summary.failures} failed, {summary.errors} errors: {shown}")
    if ran == 0:
        if must_run:
            skipped = f"all {summary.tests} tests skipped" + (f" ({skip_reason})" if skip_reason else "")
            return R.Gate(name, "failed", 0, None, "tests", f"no test ran, though {must_run}: {skipped}")
        return R.Gate(name, "n/a", None, None, "tests", skip_reason or f"all {summary.tests} tests skipped")
    return R.Gate(name, "passed", summary.passed, ran, "tests", f"{summary.skipped} skipped")


# ---------------------------------------------------------------- formatting

def _cell(text: str) -> str:
    # test ids such as test_x[a|b] would split a Markdown table row
    return text.replace("|", "\\|").replace("\n", " ") if text else "-"


def _band(v: R.Verdict) -> str:
    if v.band is None:
        return "-"
    lo, hi = v.band
    return f"{100 * lo:.2f}–{100 * hi:.2f}%" if v.unit == "fraction" else f"{lo:.4g}–{hi:.4g} {v.unit}"


def _verdict_rows(verdicts: Iterable[R.Verdict]) -> list[str]:
    rows = ["| status | metric | case | value | baseline | change | band | runs | why |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for v in verdicts:
        rows.append(
            f"| {HIGHLIGHT.get(v.status, v.status)} | {v.name} | {v.case} | {R.show_value(v.value, v.unit)} "
            f"| {R.show_value(v.baseline, v.unit)} | {R.show_change(v)} | {_band(v)} | {v.history} | {_cell(v.reason)} |"
        )
    return rows


def _gate_rows(gates: Sequence[R.Gate]) -> list[str]:
    rows = ["| gate | result | value | threshold | margin | detail |", "| --- | --- | --- | --- | --- | --- |"]
    for g in gates:
        result = {"failed": "**FAIL**", "passed": "pass"}.get(g.status, g.status)
        unit = g.unit if g.unit in ("", "%") else f" {g.unit}"
        value, threshold, margin = ("-" if x is None else f"{x:{spec}}{unit}"
                                    for x, spec in ((g.value, ".4g"), (g.threshold, ".4g"), (g.margin, "+.4g")))
        rows.append(f"| {_cell(g.name)} | {result} | {value} | {threshold} | {margin} | {_cell(g.detail)} |")
    return rows


def _link(run_dir: Path, label: str, path: str | Path) -> str:
    target = Path(path) if Path(path).is_absolute() else run_dir / path
    rel = Path(os.path.relpath(target, run_dir)).as_posix()
    if not target.exists():
        return f"- {label}: `{rel}` (missing)"
    return f"- [{label}]({rel})"


# ---------------------------------------------------------------- trend plots

def _series(conn, run: H.RunRecord, run_id: int, name: str, case: str) -> list[H.HistoryPoint]:
    # through this run (ids below run_id + 1), oldest first
    return list(reversed(H.comparable_values(conn, run, name, case, TREND_RUNS, before_run_id=run_id + 1)))


def write_trend_plots(conn, run: H.RunRecord, run_id: int, metrics: Sequence[H.Metric],
                      verdicts: Sequence[R.Verdict], gates: Sequence[R.Gate], out_dir: Path) -> list[Path]:
    """PNG trend plots over the last 30 comparable runs: latency p50 per case (baseline band), accuracy per set (gate line)."""
    import matplotlib

    matplotlib.use("Agg")  # files only: a nightly host has no display
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    by_key = {(v.name, v.case): v for v in verdicts}
    written = []
    cases = sorted({m.case for m in metrics if m.name in LATENCY_TRENDS}, key=_case_order)
    for case in cases:
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
        for ax, name in zip(axes, LATENCY_TRENDS):
            points = _series(conn, run, run_id, name, case)
            if points:
                ax.plot([p.run_id for p in points], [p.value for p in points], "o-", color="tab:blue", label=name)
                ax.plot([points[-1].run_id], [points[-1].value], "o", color="tab:red", label="this run")
            verdict = by_key.get((name, case))
            if verdict is not None and verdict.band is not None:
                ax.axhspan(*verdict.band, color="tab:green", alpha=0.15, label="baseline band")
                ax.axhline(verdict.baseline, color="tab:green", lw=1, label="baseline (median)")
            _label(ax, f"{name} {case}", "ms")
        written.append(_save(plt, fig, out_dir / f"latency_{case}.png"))
    minimum = R.accuracy_gates(gates)
    sets = sorted({m.case.split("/")[0] for m in metrics if m.kind == "accuracy"})
    for name in sets:
        fig, ax = plt.subplots(figsize=(6, 3.6))
        for m in (m for m in metrics if m.kind == "accuracy" and m.case.split("/")[0] == name):
            points = _series(conn, run, run_id, m.name, m.case)
            line, = ax.plot([p.run_id for p in points], [100 * p.value for p in points], "o-", label=m.case)
            if m.case in minimum:
                ax.axhline(100 * minimum[m.case], color=line.get_color(), ls="--", label=f"{m.case} gate")
        _label(ax, f"{name} accuracy", "%")
        written.append(_save(plt, fig, out_dir / f"accuracy_{name}.png"))
    return written


def _label(ax, title: str, unit: str) -> None:
    ax.set_title(title)
    ax.set_xlabel("run id")
    ax.set_ylabel(unit)
    ax.legend(fontsize="small")


def _save(plt, fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)  # a nightly run draws many figures: free each one
    return path


def _case_order(case: str):
    # '256x64' sorts numerically (input, then output); anything else after, by name
    left, _, right = case.partition("x")
    return (0, int(left), int(right), "") if left.isdigit() and right.isdigit() else (1, 0, 0, case)


# ---------------------------------------------------------------- the report

def write_report(
    run_dir: str | Path, history: str | Path, run_id: int, *, gates: Sequence[R.Gate] = (),
    files: Mapping[str, str | Path] | None = None, window: int = R.DEFAULT_WINDOW,
    tolerance: float = R.DEFAULT_TOLERANCE,
) -> Path:
    """Judge recorded run ``run_id`` against the runs before it; write REPORT.md, plots and nightly.json into run_dir.

    ``files`` maps a label to a detailed file (absolute, or relative to
    run_dir); the report links them by relative path.  Returns REPORT.md's path.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    gates = list(gates)
    files = dict(files or {})
    conn = H.connect(history)
    try:
        run, metrics = H.load_run(conn, run_id)
        verdicts = R.evaluate_run(conn, run, metrics, gates=gates, window=window, tolerance=tolerance,
                                  before_run_id=run_id)
        plots = write_trend_plots(conn, run, run_id, metrics, verdicts, gates, run_dir / PLOTS)
    finally:
        conn.close()
    state = {
        "run_id": run_id, "history": str(Path(history).resolve()), "window": window, "tolerance": tolerance,
        "gates": [dataclasses.asdict(g) for g in gates],
        "files": {label: str(p) for label, p in files.items()},
    }
    write_atomic(run_dir / STATE, json.dumps(state, indent=2) + "\n")
    text = render_report(run_dir, run_id, run, verdicts, gates, plots, files, rule_line(history, window, tolerance))
    path = run_dir / REPORT
    write_atomic(path, text)  # a night killed here leaves the old report or the new one, never half of one
    return path


def record_and_report(
    run_dir: str | Path, history: str | Path, run: H.RunRecord, metrics: Sequence[H.Metric], *,
    gates: Sequence[R.Gate] = (), files: Mapping[str, str | Path] | None = None,
    window: int = R.DEFAULT_WINDOW, tolerance: float = R.DEFAULT_TOLERANCE,
) -> tuple[int, R.Outcome, Path]:
    """The end of a nightly run: judge, record (status pass/fail, or error as given), write REPORT.md.

    Returns (run id, outcome, REPORT.md path); ``outcome.exit_code`` is 0 or 3.
    """
    verdicts = R.evaluate_run(history, run, metrics, gates=gates, window=window, tolerance=tolerance)
    outcome = R.overall(verdicts, gates)
    if run.status != "error":  # a run that did not finish keeps saying so
        run = dataclasses.replace(run, status="pass" if outcome.passed else "fail")
    run_id = H.record_run(history, run, metrics, {(v.name, v.case): v.status for v in verdicts})
    report = write_report(run_dir, history, run_id, gates=gates, files=files, window=window, tolerance=tolerance)
    return run_id, outcome, report


def rule_line(history: str | Path, window: int, tolerance: float) -> str:
    """REPORT.md's sentence saying how each metric was judged (window in runs, tolerance a fraction)."""
    return (f"Baseline: median of the last {window} comparable runs in `{history}` not called worse; latency, "
            f"throughput, memory, energy and rate: worse beyond the ±{tolerance:.0%} band (wider where those runs "
            f"wander) and, "
            f"with samples, by a rank test at p < {R.ALPHA:g} (worse twice in a row: regression); accuracy band "
            f"±{R.ACCURACY_SE:g} binomial SE.")


def render_report(
    run_dir: Path, run_id: int, run: H.RunRecord, verdicts: Sequence[R.Verdict], gates: Sequence[R.Gate],
    plots: Sequence[Path], files: Mapping[str, str | Path], rule: str,
) -> str:
    """REPORT.md's text: verdict first, then regressions and failed gates (first screen), gates, changes, plots, files.

    ``rule``: :func:`rule_line`'s sentence."""
    outcome = R.overall(verdicts, gates)
    commit = f"`{run.git_commit[:12]}`" if run.git_commit else "unknown"
    lines = [
        f"# {'PASS' if outcome.passed else 'FAIL'}: {outcome.reason}",
        "",
        f"Nightly run {run_id}: {run.model} on {run.device} ({run.device_name}), {run.dtype}, "
        f"world size {run.world_size}, batch {run.batch_size}; {run.started_utc} to {run.finished_utc}; commit {commit}.",
        rule,
        "",
        "## Regressions and failed gates",
        "",
    ]
    failing = [v for v in verdicts if v.failing]
    failed_gates = [g for g in gates if g.status == "failed"]
    if failing:
        lines += _verdict_rows(failing)
    if failed_gates:
        lines += ([""] if failing else []) + _gate_rows(failed_gates)
    if not failing and not failed_gates:
        lines.append("None.")
    lines += ["", "## Improvements and suspicious changes", ""]
    changes = [v for v in verdicts if v.status in ("suspicious", "improved")]
    lines += _verdict_rows(changes) if changes else ["None."]
    short = sum(v.status == "insufficient-history" for v in verdicts)
    if short:
        lines += ["", f"{short} metric(s) have fewer than {R.MIN_HISTORY} comparable earlier runs: not judged yet."]
    lines += ["", "## Gates", ""]
    lines += [f"{R.gate_tally(gates)}.", ""] + _gate_rows(gates) if gates else ["No gate ran."]
    lines += ["", "## Energy per token", ""] + energy_lines(run, verdicts)
    lines += ["", "## Trends (last 30 comparable runs)", ""]
    lines += [f"![{p.stem}]({Path(os.path.relpath(p, run_dir)).as_posix()})" for p in plots] or ["No trend to plot."]
    lines += ["", "## Every metric", ""]
    lines += _verdict_rows(verdicts) if verdicts else ["No metric was recorded."]
    lines += ["", "## Files", ""]
    lines += [_link(run_dir, label, p) for label, p in files.items()]
    lines.append(f"- [{STATE}]({STATE}): what `--report-only` rebuilds this report from")
    lines += ["", "## Settings and environment", "", "```json",
              json.dumps({"settings": run.settings, "environment": run.environment}, indent=2, sort_keys=True),
              "```", ""]
    return "\n".join(lines)


def energy_lines(run: H.RunRecord, verdicts: Sequence[R.Verdict]) -> list[str]:
    """The energy section: the meter (or why there is none) and each case's prefill / decode J/token, judged."""
    record = run.environment.get("energy") if isinstance(run.environment, dict) else None
    if not isinstance(record, dict):
        meter = "Meter: not recorded (a run from before energy was measured)."
    elif record.get("source") in (None, "n/a"):
        meter = f"Meter: n/a: {record.get('reason') or 'no reason recorded'}."
    else:
        meter = f"Meter: {record['source']} ({record.get('resolution') or 'resolution not recorded'})."
    energy = [v for v in verdicts if v.kind == "energy"]
    if not energy:
        return [meter, "", "No energy figure was recorded: n/a."]
    return [meter, "", "J/token: prefill = the first-token region's joules / (batch x prompt tokens); decode = "
            "the decode steps' joules / (batch x decode steps).", ""] + _verdict_rows(energy)


def rebuild_report(run_dir: str | Path, history: str | Path | None = None) -> Path:
    """--report-only: rewrite REPORT.md and the plots of run_dir from its nightly.json and the history."""
    run_dir = Path(run_dir)
    path = run_dir / STATE
    state = H.read_json(path, f"the run's state (is {run_dir} a nightly run directory?)")
    try:
        gates = [R.Gate(**g) for g in state["gates"]]
        run_id, window, tolerance = int(state["run_id"]), int(state["window"]), float(state["tolerance"])
        files, history = dict(state["files"]), history or state["history"]
    except (KeyError, TypeError, ValueError) as exc:
        raise UserError(f"{path}: expected keys run_id, history, window, tolerance, gates, files ({exc!r})") from exc
    return write_report(run_dir, history, run_id, gates=gates, files=files, window=window, tolerance=tolerance)
