"""Result files: the crash-safe cache, the accuracy JSONs, the summary and the log.

``cache.csv`` (no header) holds ``question_id,task_name,truth_answer,predict_answer``
for the primary scoring; in ``--scoring both`` the logit predictions go to
``cache_logits.csv`` in the same format.  ``answers.jsonl`` holds each
answered question's details (prompt, raw answer, letter logits) for
``device.log``.  Per question the detail line is written first, then the
cache rows, each flushed and fsynced, so a question in ``cache.csv`` always
has its details; a kill between writes costs at most a repeated question.
"""

from __future__ import annotations

import dataclasses
import csv
import io
import json
import math
import os
from pathlib import Path

from ..errors import UserError
from ..files import write_atomic  # noqa: F401 (the runner writes through R.write_atomic)
from .data import Dataset

HARD_SUBJECTS = (
    "advanced_mathematics", "discrete_mathematics", "probability_and_statistics", "college_chemistry",
    "college_physics", "high_school_mathematics", "high_school_chemistry", "high_school_physics",
)
CACHE = {"generate": "cache.csv", "logits": "cache_logits.csv"}
SUBJECT_ACC = {"generate": "result_subject_acc.json", "logits": "result_subject_acc_logits.json"}
CLASSES_ACC = {"generate": "result_classes_acc.json", "logits": "result_classes_acc_logits.json"}
ANSWERS = "answers.jsonl"
DEVICE_LOG = "device.log"
SUMMARY = "summary.json"


def cache_files(scoring: str) -> dict[str, str]:
    """scoring name -> cache file for a ``--scoring`` choice (the primary one is cache.csv)."""
    if scoring == "both":
        return {"generate": "cache.csv", "logits": "cache_logits.csv"}
    return {scoring: "cache.csv"}


def result_files(scoring: str) -> dict[str, tuple[str, str]]:
    """scoring name -> (subject json, classes json); the primary scoring takes the reference names."""
    if scoring == "both":
        return {s: (SUBJECT_ACC[s], CLASSES_ACC[s]) for s in ("generate", "logits")}
    return {scoring: (SUBJECT_ACC["generate"], CLASSES_ACC["generate"])}


# ------------------------------------------------------------------ reading what a run left

def complete_lines(path: Path) -> list[str]:
    """The file's newline-terminated lines (a trailing partial line, from a kill, is left out)."""
    if not path.is_file():
        return []
    # Split on "\n" only: str.splitlines() also splits on U+0085, U+2028, ... which json.dumps(ensure_ascii=False)
    # leaves raw inside strings (real MMLU rows contain U+0085).
    text = path.read_bytes().decode("utf-8")
    complete = text[: text.rfind("\n") + 1]
    return [line + "\n" for line in complete.split("\n")[:-1]]


def drop_partial_line(path: Path) -> None:
    """Cut a trailing partial line (what a kill mid-write leaves) before appending."""
    if not path.is_file():
        return
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        with path.open("r+b") as f:
            f.truncate(data.rfind(b"\n") + 1)


def read_cache(path: Path, dataset: Dataset) -> dict[tuple[str, str], tuple[str, str]]:
    """(subject, question id) -> (truth, prediction); every row checked against the data."""
    known = {(q.subject, q.qid): q for subject in dataset.subjects for q in dataset.val[subject]}
    rows: dict[tuple[str, str], tuple[str, str]] = {}
    for n, line in enumerate(complete_lines(path), start=1):
        fields = next(csv.reader([line]), [])
        where = f"{path} row {n}"
        if len(fields) != 4:
            raise UserError(f"{where}: expected 4 fields question_id,task_name,truth_answer,predict_answer, got {len(fields)}")
        qid, subject, truth, pred = fields
        q = known.get((subject, qid))
        if q is None:
            raise UserError(f"{where}: question {qid!r} of {subject!r} is not in {dataset.work_dir / 'data' / 'val'}")
        if truth != q.answer:
            raise UserError(f"{where}: truth {truth!r} but {q.where} says {q.answer!r} (a cache from other data?)")
        rows[(subject, qid)] = (truth, pred)
    return rows


def read_answers(path: Path) -> dict[tuple[str, str], dict]:
    """(subject, question id) -> detail record (the last one wins; a partial last line is ignored)."""
    records: dict[tuple[str, str], dict] = {}
    for n, line in enumerate(complete_lines(path), start=1):
        try:
            rec = json.loads(line)
            key = (rec["task"], rec["id"])
        except (ValueError, KeyError, TypeError):
            raise UserError(f"{path} line {n}: not a detail record written by vicuna-bench") from None
        records[key] = rec
    return records


# ------------------------------------------------------------------ writing

class AppendLog:
    """A file appended one line at a time, each flushed and fsynced before the next question."""

    def __init__(self, path: Path):
        drop_partial_line(path)
        self.handle = path.open("a", encoding="utf-8", newline="")

    def write(self, text: str, sync: bool = True) -> None:
        self.handle.write(text)
        self.handle.flush()
        if sync:
            os.fsync(self.handle.fileno())

    def close(self) -> None:
        self.handle.close()


def cache_line(qid: str, subject: str, truth: str, pred: str) -> str:
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerow([qid, subject, truth, pred])
    return buf.getvalue()


def json_text(obj) -> str:
    return json.dumps(obj, indent=4, ensure_ascii=False) + "\n"


def json_text_line(obj) -> str:
    return json.dumps(obj, ensure_ascii=False) + "\n"


# ------------------------------------------------------------------ metrics

def wilson_interval(correct: int, total: int, z: float = 1.959963984540054) -> tuple[float, float] | None:
    """Wilson score interval of a proportion (0..1); None when nothing was counted."""
    if total == 0:
        return None
    p = correct / total
    denom = 1 + z * z / total
    centre = (p + z * z / (2 * total)) / denom
    half = z / denom * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total))
    return (max(0.0, centre - half), min(1.0, centre + half))


def accuracy_tables(
    verdicts: list[tuple[str, bool]], categories: dict[str, str]
) -> tuple[dict[str, float], dict[str, float], dict]:
    """From (subject, correct) pairs in canonical order: subject accuracies, class accuracies, counts.

    ``Avg`` is correct / counted over every question; ``Avg(Hard)`` is the
    hard subjects' correct answers over the hard subjects' own count (the
    vendor divides by every question: a defect).  ``Avg(Hard)`` is left out
    when no hard subject was counted.
    """
    by_subject: dict[str, list[int]] = {}
    for subject, ok in verdicts:
        c = by_subject.setdefault(subject, [0, 0])
        c[0] += int(ok)
        c[1] += 1
    subjects = sorted(by_subject)
    subject_acc = {s: by_subject[s][0] / by_subject[s][1] for s in subjects}
    by_category: dict[str, list[int]] = {}
    for s in subjects:
        c = by_category.setdefault(categories[s], [0, 0])
        c[0] += by_subject[s][0]
        c[1] += by_subject[s][1]
    correct = sum(c[0] for c in by_subject.values())
    total = sum(c[1] for c in by_subject.values())
    hard = [by_subject[s] for s in subjects if s in HARD_SUBJECTS]
    hard_correct, hard_total = sum(c[0] for c in hard), sum(c[1] for c in hard)
    classes = {cat: by_category[cat][0] / by_category[cat][1] for cat in sorted(by_category)}
    if total:
        classes["Avg"] = correct / total
    if hard_total:
        classes["Avg(Hard)"] = hard_correct / hard_total
    counts = {
        "correct": correct,
        "total": total,
        "micro": correct / total if total else None,
        "macro": sum(subject_acc.values()) / len(subject_acc) if subject_acc else None,
        "wilson95": wilson_interval(correct, total),
        "hard": {"correct": hard_correct, "total": hard_total, "accuracy": classes.get("Avg(Hard)")},
        "categories": {
            cat: {"correct": by_category[cat][0], "total": by_category[cat][1], "accuracy": classes[cat]}
            for cat in sorted(by_category)
        },
        "subjects": {s: {"correct": by_subject[s][0], "total": by_subject[s][1]} for s in subjects},
    }
    return subject_acc, classes, counts


def category_table(summary: dict) -> str:
    """A fixed-width table: category rows, then Avg(Hard) and Avg, one column per scoring (percent)."""
    results = summary["results"]
    scorings = list(results)
    cats = sorted({c for r in results.values() for c in r["categories"]})
    head = f"{'category':<18}" + "".join(f"{s + ' %':>12}{'n':>7}" for s in scorings)
    lines = [f"{summary['mode']} ({summary['model']})", head]

    def cell(r, acc, n):
        return f"{'-' if acc is None else format(100 * acc, '.2f'):>12}{n:>7}"

    for cat in cats:
        row = f"{cat:<18}"
        for s in scorings:
            c = results[s]["categories"].get(cat, {"accuracy": None, "total": 0})
            row += cell(results[s], c["accuracy"], c["total"])
        lines.append(row)
    lines.append(f"{'Avg(Hard)':<18}" + "".join(cell(results[s], results[s]["hard"]["accuracy"], results[s]["hard"]["total"]) for s in scorings))
    lines.append(f"{'Avg':<18}" + "".join(cell(results[s], results[s]["micro"], results[s]["total"]) for s in scorings))
    lines.append(f"{'macro (subjects)':<18}" + "".join(cell(results[s], results[s]["macro"], len(results[s]["subjects"])) for s in scorings))
    skipped = summary["too_long"]
    if skipped["count"]:
        lines.append(f"too long for --max-prompt-tokens {summary['settings']['max_prompt_tokens']}: {skipped['count']} ({skipped['policy']})")
    return "\n".join(lines)


# ------------------------------------------------------------------ device.log

def log_entry(rec: dict) -> str:
    """One answered question in device.log: its prompt, raw answer(s) and verdict(s)."""
    lines = [f"=== {rec['task']} {rec['id']}  shots={rec['shots']} prompt_tokens={rec['prompt_tokens']} "
             f"prefix_cache={rec.get('prefix_cache', 'off')} truth={rec['truth']}"]
    lines.append(rec["prompt"])
    if "generate" in rec:
        g = rec["generate"]
        lines.append(f"--- generate: {g['text']!r} -> {g['pred']} {'correct' if g['pred'] == rec['truth'] else 'wrong'}")
    if "logits" in rec:
        lg = rec["logits"]
        values = " ".join(f"{k}={v:.2f}" for k, v in lg["values"].items())
        lines.append(f"--- logits: {values} -> {lg['pred']} {'correct' if lg['pred'] == rec['truth'] else 'wrong'}")
    return "\n".join(lines) + "\n\n"


def bare_log_entry(subject: str, qid: str, truth: str, preds: dict[str, str]) -> str:
    got = " ".join(f"{s}={p}" for s, p in preds.items())
    return f"=== {subject} {qid}  truth={truth}: answered by an earlier run without details ({got})\n\n"


# ------------------------------------------------------------------ comparing two runs

@dataclasses.dataclass
class Disagreement:
    subject: str
    qid: str
    truth: str
    scoring: str
    ref_pred: str
    other_pred: str
    ref_logits: dict[str, float] | None  # the letters' logits as ``answers.jsonl`` keeps them (2 decimals)
    other_logits: dict[str, float] | None


def top_two_margin(values: dict[str, float]) -> float:
    """The gap between the two largest letter logits."""
    top = sorted(values.values(), reverse=True)
    return top[0] - top[1]


def compare_answers(ref_dir: Path, other_dir: Path) -> dict:
    """Per-question agreement of two runs' ``answers.jsonl`` (e.g. prefix cache on against the reference path).

    Returns, per scoring both runs recorded: the questions both answered,
    how many predictions agree, the rate, and every disagreement.  Questions
    only one run answered are counted apart (``only_ref``/``only_other``),
    never silently dropped.
    """
    ref = read_answers(Path(ref_dir) / "answers.jsonl")
    other = read_answers(Path(other_dir) / "answers.jsonl")
    common = sorted(ref.keys() & other.keys())
    out: dict = {"only_ref": sorted(ref.keys() - other.keys()), "only_other": sorted(other.keys() - ref.keys()),
                 "scorings": {}}
    for scoring in ("generate", "logits"):
        both = [k for k in common if scoring in ref[k] and scoring in other[k]]
        if not both:
            continue
        differ = []
        for key in both:
            a, b = ref[key], other[key]
            if a[scoring]["pred"] != b[scoring]["pred"]:
                differ.append(Disagreement(
                    key[0], key[1], a.get("truth", ""), scoring, a[scoring]["pred"], b[scoring]["pred"],
                    a.get("logits", {}).get("values"), b.get("logits", {}).get("values"),
                ))
        out["scorings"][scoring] = {"questions": len(both), "agree": len(both) - len(differ),
                                    "rate": (len(both) - len(differ)) / len(both), "disagreements": differ}
    return out
