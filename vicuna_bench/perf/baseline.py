"""The baseline gate: an earlier run's CSV (either kind), compared case by case with this run."""

from __future__ import annotations

import csv
import dataclasses
from pathlib import Path
from collections.abc import Callable

import numpy as np

from ..errors import GateFailed, UserError
from ..settings import flag
from ..stats import judge_change
from .figures import percentile
from .measure import PerfRun
from .writers import _EXTENDED_HEADERS, REFERENCE_HEADER


@dataclasses.dataclass(frozen=True)
class Baseline:
    path: Path
    kind: str  # "reference" | "extended"
    rows: dict  # (batch, seq_in, seq_out) -> {"first": ms, "next": ms | None}


def load_baseline(path: Path) -> Baseline:
    """Read a baseline: a reference CSV or an extended CSV of an earlier run."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"{flag('perf.baseline')} {path}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{flag('perf.baseline')} {path}: cannot read it ({exc})") from None
    lines = text.splitlines()
    if not lines:
        raise UserError(f"{flag('perf.baseline')} {path}: empty file")
    header = lines[0].strip()
    if header == REFERENCE_HEADER:
        kind, keys = "reference", ("batch_size", "input_seq_len(Encoding)", "output_seq_len(Decoding)",
                                    "forward_first_token_time(ms)", "forward_next_token_time(ms)")
    elif header in _EXTENDED_HEADERS:
        kind, keys = "extended", ("batch_size", "seq_in", "seq_out", "first_token_ms_p50", "next_token_ms_p50")
    else:
        raise UserError(f"{flag('perf.baseline')} {path}: line 1 is neither the reference CSV header nor the extended one")
    rows: dict = {}
    for lineno, rec in enumerate(csv.DictReader(lines), start=2):
        try:
            key = (int(rec[keys[0]]), int(rec[keys[1]]), int(rec[keys[2]]))
            first = float(rec[keys[3]])
            nxt = float(rec[keys[4]]) if rec[keys[4]] not in ("", None) else None
        except (TypeError, ValueError, KeyError):
            raise UserError(f"{flag('perf.baseline')} {path}: line {lineno} is not a row of numbers") from None
        if key[2] <= 1:
            nxt = None  # undefined for one output token (the reference writes 0)
        rows[key] = {"first": first, "next": nxt}
    if not rows:
        raise UserError(f"{flag('perf.baseline')} {path}: no rows")
    return Baseline(path, kind, rows)


@dataclasses.dataclass(frozen=True)
class Comparison:
    lines: list[dict]  # case, metric, old, new, ratio, verdict
    regressions: list[dict]
    unmatched: list[str]  # cases of this run that the baseline lacks

    def table(self) -> str:
        head = f"{'case':>16} {'metric':>10} {'old ms':>11} {'new ms':>11} {'new/old':>8}  verdict"
        out = [head, "-" * len(head)]
        for ln in self.lines:
            out.append(f"{ln['case']:>16} {ln['metric']:>10} {ln['old']:>11.3f} {ln['new']:>11.3f} "
                       f"{ln['ratio']:>8.3f}  {ln['verdict']}")
        for case in self.unmatched:
            out.append(f"{case:>16} {'':>10} {'':>11} {'':>11} {'':>8}  not in the baseline")
        return "\n".join(out)


def compare_to_baseline(run: PerfRun, baseline: Baseline, tolerance: float) -> Comparison:
    """Case by case: slower than the baseline by more than ``tolerance`` is a regression.

    Like for like: a reference baseline is compared with this run's means
    (what its reference CSV holds), an extended one with the p50s; each by
    :func:`vicuna_bench.stats.judge_change`, the comparison of the nightly and ``compare``.
    """
    if not tolerance >= 0:
        raise UserError(f"{flag('perf.tolerance')} {tolerance} must be >= 0")
    lines, regressions, unmatched = [], [], []
    for r in run.results:
        key = (r.batch_size, r.case.seq_in, r.case.seq_out)
        label = f"bs{key[0]} {r.case}"
        old = baseline.rows.get(key)
        if old is None:
            unmatched.append(label)
            continue
        if baseline.kind == "reference":
            new = {"first": float(np.mean(r.first_ms)), "next": float(np.mean(r.next_ms)) if r.has_next else None}
        else:
            new = {"first": percentile(r.first_ms, 50), "next": percentile(r.step_ms, 50) if r.has_next else None}
        for metric in ("first", "next"):
            if old[metric] is None or new[metric] is None or old[metric] <= 0:
                continue
            # A CSV holds figures, not samples: the band alone decides (stats.judge_change without samples).
            change = judge_change(None, None, tolerance, level_b=new[metric], level_a=old[metric])
            bad = change.word == "slower"
            line = {"case": label, "metric": metric + "_token", "old": old[metric], "new": new[metric],
                    "ratio": change.ratio, "verdict": f"SLOWER by more than {tolerance:.0%}" if bad else "ok"}
            lines.append(line)
            if bad:
                regressions.append(line)
    return Comparison(lines, regressions, unmatched)


def gate(run: PerfRun, baseline: Baseline, tolerance: float, echo: Callable[[str], None] = print) -> Comparison:
    """Compare, print the table, raise :class:`GateFailed` on any regression."""
    comparison = compare_to_baseline(run, baseline, tolerance)
    echo(f"baseline {baseline.path} ({baseline.kind} CSV), tolerance {tolerance:.0%}:\n{comparison.table()}")
    if not comparison.lines:
        raise UserError(f"{flag('perf.baseline')} {baseline.path}: it shares no case with this run")
    if comparison.regressions:
        worst = max(comparison.regressions, key=lambda ln: ln["ratio"])
        raise GateFailed(
            f"{len(comparison.regressions)} perf figure(s) slower than the baseline by more than {tolerance:.0%} "
            f"(worst: {worst['case']} {worst['metric']} x{worst['ratio']:.2f})"
        )
    return comparison
