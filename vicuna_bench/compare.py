"""``vicuna-bench compare A B``: is B faster than A, or is it noise?

A and B are perf output directories (their ``*_samples.json``), samples
JSON files, or run ids of the nightly history.  Per case and metric (first
token: every repeat; next token: every decode step): both medians, B / A
with its confidence interval, and a verdict by the nightly rule's statistics
(vicuna_bench/stats.py): *slower* when B's median is beyond A's by more than
the minimum effect and the one-sided rank test of B's samples against A's
gives p < (1 - confidence) / 2; *faster* the other way; else *no
significant change*.  docs/perf.md ("Comparing two runs") says why a rank
test rather than a bootstrap.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import statistics
from pathlib import Path

from . import stats
from .errors import GateFailed, UserError
from .nightly import history as H

log = logging.getLogger("vicuna_bench")

CONFIDENCE = 0.95
DEFAULT_MIN_EFFECT = 0.05  # B / A must move by more than this (5%) besides being significant
DEFAULT_OUTPUT = "compare.md"
# (metric, the samples JSON's series, the history metric carrying that series, what one sample is)
METRICS = (
    ("first_token_ms", "first_ms", "first_token_ms_p50", "a repeat's first token"),
    ("next_token_ms", "step_ms", "next_token_ms_p50", "a decode step"),
)
# What two runs must share to be compared; batch size and perf mode too, since a step of batch 8 or a
# normal-mode mean of 63 steps is not the same sample as a detail-mode step of batch 1.
IDENTITY_KEYS = ("model", "dtype", "world_size", "device", "compile", "chip", "batch_size", "perf_mode")
VERDICTS = ("slower", "faster", "no significant change", "not judged")
WORD_SHOWN = dict(zip(("slower", "faster", "same", "undecided"), VERDICTS))  # stats.judge_change's words


@dataclasses.dataclass(frozen=True)
class Series:
    """One metric of one case of one side: its samples (ms) when kept, and its median."""

    median: float
    samples: tuple[float, ...] | None  # None: only the median was stored (a history from before samples)


@dataclasses.dataclass(frozen=True)
class Side:
    """A or B: what was given, what ran (IDENTITY_KEYS), and its series by (case, metric)."""

    label: str  # as the user gave it: a path, or 'run 12 of nightly/history.sqlite'
    identity: dict
    series: dict  # (case '256x64', metric 'next_token_ms') -> Series


@dataclasses.dataclass(frozen=True)
class Row:
    """One case and metric compared: B / A in ms."""

    case: str
    metric: str
    n_a: int | None
    n_b: int | None
    median_a: float
    median_b: float
    ratio: float  # median B / median A
    ci: stats.RatioInterval | None  # Hodges-Lehmann B / A with its interval; None without samples
    p_value: float | None  # the one-sided rank test's p in the direction B moved
    verdict: str  # one of VERDICTS
    reason: str = ""


@dataclasses.dataclass(frozen=True)
class Comparison:
    a: Side
    b: Side
    rows: list[Row]
    only_a: list[str]  # cases only A measured
    only_b: list[str]
    min_effect: float
    confidence: float

    @property
    def slower(self) -> list[Row]:
        return [r for r in self.rows if r.verdict == "slower"]


# ---------------------------------------------------------------- reading A and B

def chip_of(chip_family: str | None, device_name: str | None) -> str | None:
    """The chip two runs must share: the NPU chip family (d9 | d3) where known, else the device's name."""
    if chip_family:
        return chip_family
    return device_name.replace(" ", "_") if device_name else None


def load_side(text: str, history: str | Path) -> Side:
    """A or B from what the user typed: a perf output directory, a samples JSON, or a history run id."""
    path = Path(text)
    if path.is_dir():
        found = sorted(path.glob("*_samples.json"))
        if not found:
            raise UserError(f"{path}: no *_samples.json in this directory (a perf output directory holds "
                            f"performance_test_*_samples.json)")
        if len(found) > 1:
            raise UserError(f"{path}: {len(found)} samples JSON files ({', '.join(p.name for p in found)}): "
                            f"give one of them instead of the directory")
        return side_from_samples_json(found[0])
    if path.is_file():
        return side_from_samples_json(path)
    if text.isdigit():
        return side_from_history(history, int(text))
    raise UserError(f"{text!r}: neither a perf output directory, a samples JSON nor a run id (digits) of the "
                    f"history {history}")


def side_from_samples_json(path: str | Path) -> Side:
    """A side from perf's ``*_samples.json`` (perf.samples_doc): every repeat's first token, every decode step."""
    path = Path(path)
    doc = H.read_json(path, "the perf samples JSON")
    if not isinstance(doc, dict) or not isinstance(doc.get("cases"), list):
        raise UserError(f"{path}: not a perf samples JSON: no list 'cases'")
    missing = [k for k in ("model_name", "dtype", "world_size", "device", "batch_size") if k not in doc]
    if missing:
        raise UserError(f"{path}: not a perf samples JSON: missing key(s) {', '.join(missing)}")
    identity = {
        "model": doc["model_name"], "dtype": doc["dtype"], "world_size": doc["world_size"], "device": doc["device"],
        "compile": doc.get("compile"), "chip": chip_of(doc.get("chip_family"), doc.get("device_name")),
        "batch_size": doc["batch_size"], "perf_mode": doc.get("perf_mode"),
    }
    series = {}
    for i, entry in enumerate(doc["cases"]):
        try:
            case = H.perf_case(int(entry["seq_in"]), int(entry["seq_out"]))
            for metric, key, _, _ in METRICS:
                values = entry[key]
                if not isinstance(values, list) or not all(
                        isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values):
                    raise ValueError(f"{key} is not a list of numbers")
                if values:
                    series[(case, metric)] = Series(statistics.median(values), tuple(float(v) for v in values))
        except (KeyError, TypeError, ValueError) as exc:
            raise UserError(f"{path}: cases[{i}] needs seq_in, seq_out and lists first_ms, step_ms of numbers "
                            f"({exc!s})") from None
    return Side(str(path), identity, series)


def side_from_history(history: str | Path, run_id: int) -> Side:
    """A side from a nightly history run: its perf p50s, with the samples stored beside them (schema 2)."""
    history = Path(history)
    if not history.is_file():
        raise UserError(f"--history {history}: no such file (run id {run_id} was asked for)")
    run, metrics = H.load_run(history, run_id)
    identity = {
        "model": run.model, "dtype": run.dtype, "world_size": run.world_size, "device": run.device,
        "compile": run.compile_mode or None, "chip": chip_of(run.environment.get("chip_family"), run.device_name),
        "batch_size": run.batch_size, "perf_mode": run.perf_mode or None,
    }
    by_name = {stored: metric for metric, _, stored, _ in METRICS}
    series = {(m.case, by_name[m.name]): Series(m.value, m.samples) for m in metrics if m.name in by_name}
    if not series:
        raise UserError(f"--history {history}: run {run_id} has no perf metric (a night without the perf stage)")
    return Side(f"run {run_id} of {history}", identity, series)


def differing_keys(a: Side, b: Side) -> list[str]:
    """The IDENTITY_KEYS whose values differ, each as 'key A-value vs B-value' (unknown: not recorded)."""
    def show(value):
        return "unknown" if value is None else str(value)

    return [f"{k} {show(a.identity.get(k))} vs {show(b.identity.get(k))}"
            for k in IDENTITY_KEYS if a.identity.get(k) != b.identity.get(k)]


# ---------------------------------------------------------------- comparing

def compare_series(a: Series, b: Series, *, min_effect: float = DEFAULT_MIN_EFFECT,
                   confidence: float = CONFIDENCE, case: str = "", metric: str = "",
                   why_no_samples: str = "") -> Row:
    """One case and metric, B against A (lower is better: a latency)."""
    ratio = b.median / a.median if a.median > 0 else math.inf
    base = dict(case=case, metric=metric, median_a=a.median, median_b=b.median, ratio=ratio,
                n_a=len(a.samples) if a.samples else None, n_b=len(b.samples) if b.samples else None)
    if not a.samples or not b.samples:
        return Row(**base, ci=None, p_value=None, verdict="not judged",
                   reason=why_no_samples or "no samples on one side: only the medians")
    if min(a.samples) <= 0 or min(b.samples) <= 0:
        return Row(**base, ci=None, p_value=None, verdict="not judged",
                   reason="a sample <= 0 ms (normal mode's noise): no ratio")
    alpha = (1 - confidence) / 2  # one side of the two-sided level the interval has
    change = stats.judge_change(b.samples, a.samples, min_effect, level_b=b.median, level_a=a.median,
                                alpha=alpha, confidence=confidence)
    return Row(**base, ci=change.ci, p_value=change.p_value, verdict=WORD_SHOWN[change.word], reason=change.reason)


def compare(a: Side, b: Side, *, min_effect: float = DEFAULT_MIN_EFFECT, confidence: float = CONFIDENCE) -> Comparison:
    """Every case and metric both sides measured; refused (UserError) when the runs are not comparable."""
    if not min_effect >= 0:
        raise UserError(f"--min-effect {min_effect}: must be >= 0 (e.g. 0.05 for 5%)")
    differing = differing_keys(a, b)
    if differing:
        raise UserError(f"not comparable: {'; '.join(differing)} (A: {a.label}, B: {b.label})")
    order = {m: i for i, (m, *_) in enumerate(METRICS)}
    keys = sorted(set(a.series) & set(b.series), key=lambda k: (_case_order(k[0]), order[k[1]]))
    rows = []
    for case, metric in keys:
        sa, sb = a.series[(case, metric)], b.series[(case, metric)]
        why = ""
        if not sa.samples or not sb.samples:
            side = a if not sa.samples else b
            why = f"{side.label} stored no samples (a history from before samples were kept): only the medians"
        rows.append(compare_series(sa, sb, min_effect=min_effect, confidence=confidence, case=case, metric=metric,
                                   why_no_samples=why))
    cases_a = sorted({c for c, _ in a.series}, key=_case_order)
    cases_b = sorted({c for c, _ in b.series}, key=_case_order)
    if not rows:
        raise UserError(f"A ({a.label}) and B ({b.label}) share no case: A has {', '.join(cases_a) or 'none'}, "
                        f"B has {', '.join(cases_b) or 'none'}")
    return Comparison(a, b, rows, [c for c in cases_a if c not in cases_b], [c for c in cases_b if c not in cases_a],
                      min_effect, confidence)


def _case_order(case: str):
    seq_in, _, seq_out = case.partition("x")
    return (int(seq_in), int(seq_out)) if seq_in.isdigit() and seq_out.isdigit() else (math.inf, case)


# ---------------------------------------------------------------- showing

COLUMNS = ("case", "metric", "A median", "B median", "B/A", "95% CI", "p", "n A/B", "verdict")


def _cells(r: Row) -> list[str]:
    if r.ci is None:
        ci = "-"
    elif math.isinf(r.ci.high):
        ci = "unbounded"
    else:
        ci = f"{r.ci.low:.3f}..{r.ci.high:.3f}"
    counts = f"{r.n_a if r.n_a is not None else '-'}/{r.n_b if r.n_b is not None else '-'}"
    verdict = r.verdict + (f" ({r.reason})" if r.reason else "")
    return [r.case, r.metric, f"{r.median_a:.4g} ms", f"{r.median_b:.4g} ms", f"{r.ratio:.3f}", ci,
            "-" if r.p_value is None else f"{r.p_value:.2g}", counts, verdict]


def _columns(confidence: float) -> list[str]:
    return [c if c != "95% CI" else f"{confidence:.0%} CI" for c in COLUMNS]


def terminal_table(c: Comparison) -> str:
    """The rows as aligned text columns."""
    lines = [_columns(c.confidence)] + [_cells(r) for r in c.rows]
    widths = [max(len(line[i]) for line in lines) for i in range(len(COLUMNS) - 1)]
    out = ["  ".join(cell.ljust(w) for cell, w in zip(line, widths)) + "  " + line[-1] for line in lines]
    return "\n".join(out + _notes(c))


def rule_text(c: Comparison) -> str:
    alpha = (1 - c.confidence) / 2
    return (f"slower / faster: B's median beyond A's by more than {c.min_effect:.0%} and a one-sided Mann-Whitney "
            f"rank test of B's samples against A's at p < {alpha:g}; B/A is the ratio of the medians, the "
            f"{c.confidence:.0%} CI the Hodges-Lehmann interval of the ratio from the same test")


def _notes(c: Comparison) -> list[str]:
    notes = []
    if c.only_a:
        notes.append(f"only in A (not compared): {', '.join(c.only_a)}")
    if c.only_b:
        notes.append(f"only in B (not compared): {', '.join(c.only_b)}")
    return notes


def markdown(c: Comparison) -> str:
    """The comparison as a markdown file: what was compared, the rule, the table."""
    ident = ", ".join(f"{k} {c.a.identity.get(k)}" for k in IDENTITY_KEYS)
    lines = [
        "# vicuna-bench compare", "",
        f"- A: {c.a.label}", f"- B: {c.b.label}", f"- both: {ident}",
        f"- {rule_text(c)}",
        f"- {len(c.slower)} slower, {sum(r.verdict == 'faster' for r in c.rows)} faster of {len(c.rows)} figure(s)",
        "",
        "| " + " | ".join(_columns(c.confidence)) + " |",
        "| " + " | ".join("---" for _ in COLUMNS) + " |",
    ]
    lines += ["| " + " | ".join(_cells(r)) + " |" for r in c.rows]
    notes = _notes(c)
    return "\n".join(lines + ([""] + notes if notes else [])) + "\n"


def run(a: str, b: str, *, history: str | Path, output: str | Path = DEFAULT_OUTPUT,
        min_effect: float = DEFAULT_MIN_EFFECT, fail_on: str | None = None, echo=print) -> Comparison:
    """The command: read A and B, compare, print the table, write the markdown; GateFailed (exit 3) when
    ``fail_on='slower'`` and a figure is slower."""
    comparison = compare(load_side(a, history), load_side(b, history), min_effect=min_effect)
    echo(terminal_table(comparison))
    output = Path(output)
    try:
        output.write_text(markdown(comparison), encoding="utf-8")
    except OSError as exc:
        raise UserError(f"--output {output}: cannot write ({exc.strerror})") from exc
    log.info("compare: wrote %s", output)
    if fail_on == "slower" and comparison.slower:
        named = ", ".join(f"{r.metric} {r.case} x{r.ratio:.3f}" for r in comparison.slower)
        raise GateFailed(f"{len(comparison.slower)} figure(s) slower in B: {named}")
    return comparison
