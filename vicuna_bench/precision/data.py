"""Reading MMLU and C-Eval work dirs (the official archive layouts), strictly.

Every field stays text (a choice ``0`` or ``4`` is not a number), quoted
fields keep their commas, quotes and newlines, and any defect is a
:class:`UserError` naming the file and row, raised before anything runs.

* MMLU: ``data/{dev,val}/<subject>_{split}.csv``, no header, rows
  ``question,A,B,C,D,answer``.  A question's id is its 0-based row index
  in the val file (the archive has no id column).
* C-Eval: the same paths, a header row; ``dev`` has
  ``id,question,A,B,C,D,answer,explanation``, ``val`` has
  ``id,question,A,B,C,D,answer``.  A question's id is its ``id`` field.

Categories come from ``<work_dir>/subject_mapping.json`` when present (the
shared data sets ship one), else from the copy in this package.

Which of the two a work dir holds is read off the data (:func:`detect_mode`):
the first row of every ``data/val/*_val.csv`` is the C-Eval header, or none
is.  A mode given that the data contradicts is an error naming both.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
from importlib import resources
from pathlib import Path

from ..errors import UserError
from ..settings import flag

log = logging.getLogger("vicuna_bench")

MODES = ("mmlu", "ceval")
LETTERS = ("A", "B", "C", "D")
SPLITS = ("dev", "val")
CEVAL_HEADERS = {
    "dev": ["id", "question", "A", "B", "C", "D", "answer", "explanation"],
    "val": ["id", "question", "A", "B", "C", "D", "answer"],
}
MMLU_FIELDS = 6


@dataclasses.dataclass(frozen=True)
class Question:
    """One multiple-choice row; ``where`` is ``file row N`` for messages."""

    subject: str
    qid: str
    question: str
    choices: tuple[str, str, str, str]
    answer: str  # one of A..D
    where: str = ""


@dataclasses.dataclass
class Dataset:
    """A work dir's dev shots and val questions, by subject (subjects sorted)."""

    mode: str
    work_dir: Path
    subjects: list[str]
    dev: dict[str, list[Question]]
    val: dict[str, list[Question]]
    categories: dict[str, str]  # subject -> category
    mapping_file: str

    def questions(self, subjects=None, limit_per_subject: int | None = None) -> list[Question]:
        """Val questions in the canonical order: subjects sorted, rows in file order."""
        out: list[Question] = []
        for subject in subjects or self.subjects:
            rows = self.val[subject]
            out.extend(rows if limit_per_subject is None else rows[:limit_per_subject])
        return out


def read_split_csv(path: Path, mode: str, split: str, subject: str) -> list[Question]:
    """Rows of one csv as Questions; every field text; raises UserError on any defect."""
    try:
        handle = path.open(newline="", encoding="utf-8-sig")
    except OSError as exc:
        raise UserError(f"{path}: cannot read ({exc.strerror})") from None
    questions: list[Question] = []
    with handle:
        reader = csv.reader(handle)
        try:
            rows = list(reader)
        except (csv.Error, UnicodeDecodeError) as exc:
            raise UserError(f"{path}: not a readable csv near line {reader.line_num} ({exc})") from None
    if mode == "ceval":
        expected = CEVAL_HEADERS[split]
        if not rows or rows[0] != expected:
            got = ",".join(rows[0]) if rows else "an empty file"
            raise UserError(f"{path} row 1: expected the C-Eval header {','.join(expected)}, got {got}")
        body, first_row = rows[1:], 2
        width = len(expected)
    else:
        body, first_row, width = rows, 1, MMLU_FIELDS
    seen_ids: dict[str, int] = {}
    for i, row in enumerate(body):
        row_no = first_row + i
        where = f"{path} row {row_no}"
        if len(row) != width:
            raise UserError(f"{where}: expected {width} fields, got {len(row)}")
        if mode == "ceval":
            qid, question, a, b, c, d, answer = row[:7]
            if qid in seen_ids:
                raise UserError(f"{where}: id {qid!r} repeats row {seen_ids[qid]}")
            seen_ids[qid] = row_no
        else:
            question, a, b, c, d, answer = row
            qid = str(i)
        if answer not in LETTERS:
            raise UserError(f"{where}: answer {answer!r} is not one of A, B, C, D")
        questions.append(Question(subject, qid, question, (a, b, c, d), answer, where))
    if not questions:
        raise UserError(f"{path}: no question rows")
    return questions


def load_mapping(mode: str, work_dir: Path) -> tuple[dict[str, str], str]:
    """subject -> category, and the file it came from."""
    local = work_dir / "subject_mapping.json"
    if local.is_file():
        source = str(local)
        try:
            raw = json.loads(local.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise UserError(f"{local}: not valid JSON ({exc})") from None
    else:
        source = f"vicuna_bench/{mode}_subject_mapping.json"
        raw = json.loads(resources.files("vicuna_bench").joinpath(f"{mode}_subject_mapping.json").read_text("utf-8"))
    if not isinstance(raw, dict):
        raise UserError(f"{source}: expected an object subject -> category")
    categories: dict[str, str] = {}
    for subject, entry in raw.items():
        if isinstance(entry, dict) and isinstance(entry.get("category"), str):  # MMLU
            categories[subject] = entry["category"]
        elif isinstance(entry, list) and len(entry) == 3 and isinstance(entry[2], str):  # C-Eval
            categories[subject] = entry[2]
        else:
            raise UserError(
                f"{source}: subject {subject!r} has no category "
                '(expected {"category": ...} or [english, chinese, category])'
            )
    return categories, source


def _val_files(work_dir: Path) -> list[Path]:
    """The ``data/val/<subject>_val.csv`` files, sorted; UserError when the layout is not there."""
    data = work_dir / "data"
    for split in SPLITS:
        if not (data / split).is_dir():
            raise UserError(f"{data / split}: missing (a --work-dir holds data/dev and data/val)")
    val_files = sorted((data / "val").glob("*_val.csv"))
    if not val_files:
        raise UserError(f"{data / 'val'}: no <subject>_val.csv files")
    return val_files


def _first_row(path: Path) -> list[str] | None:
    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:
            return next(csv.reader(handle), None)
    except (OSError, csv.Error, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: not a readable csv ({exc})") from None


def detect_mode(work_dir: str | Path) -> tuple[str, str]:
    """(``mmlu`` | ``ceval``, the evidence in words) from the val files' first rows.

    C-Eval's files open with the header ``id,question,A,B,C,D,answer``;
    MMLU's have none.  A work dir that mixes the two is a UserError.
    """
    val_files = _val_files(Path(work_dir))
    header = CEVAL_HEADERS["val"]
    with_header = [p for p in val_files if _first_row(p) == header]
    if not with_header:
        return "mmlu", f"{val_files[0]} has no header row (MMLU's files have none)"
    if len(with_header) == len(val_files):
        return "ceval", f"{with_header[0]} row 1 is the C-Eval header {','.join(header)}"
    without = next(p for p in val_files if p not in with_header)
    raise UserError(f"{with_header[0]} has the C-Eval header row but {without} has none: "
                    f"{Path(work_dir)} mixes C-Eval and MMLU files (valid: one data set per work dir)")


def check_mode(mode: str, work_dir: str | Path, source: str = "--mode") -> None:
    """UserError naming ``source`` and both modes when ``work_dir``'s data is the other data set."""
    if mode not in MODES:
        raise UserError(f"{source} {mode!r} is not supported (valid: {', '.join(MODES)})")
    found, evidence = detect_mode(work_dir)
    if found != mode:
        raise UserError(f"{source}={mode} contradicts the data: {evidence}, so it is {found} data "
                        f"(set it to {found}, or leave it out to choose it from the data)")


def resolve_mode(mode: str | None, work_dir: str | Path, source: str = "--mode") -> str:
    """``mode`` checked against the data, or (None) chosen from it and announced on the log."""
    if mode is not None:
        check_mode(mode, work_dir, source)
        return mode
    found, evidence = detect_mode(work_dir)
    log.info("%s not set: %s (%s)", source, found, evidence)
    return found


def load_dataset(mode: str, work_dir: str | Path, source: str = "--mode") -> Dataset:
    """Read and check every dev/val csv of ``work_dir`` (a dir holding ``data/``).

    ``source`` names where ``mode`` was given, in the error when the data is
    the other data set.
    """
    if mode not in MODES:
        raise UserError(f"{source} {mode!r} is not supported (valid: {', '.join(MODES)})")
    work_dir = Path(work_dir)
    data = work_dir / "data"
    val_files = _val_files(work_dir)
    check_mode(mode, work_dir, source)
    categories, mapping_file = load_mapping(mode, work_dir)
    subjects = sorted(p.name[: -len("_val.csv")] for p in val_files)
    dev: dict[str, list[Question]] = {}
    val: dict[str, list[Question]] = {}
    for subject in subjects:
        val_path = data / "val" / f"{subject}_val.csv"
        if subject not in categories:
            raise UserError(f"{val_path}: subject {subject!r} is not in {mapping_file} (add it with its category)")
        dev_path = data / "dev" / f"{subject}_dev.csv"
        if not dev_path.is_file():
            raise UserError(f"{dev_path}: missing (the shots for {val_path.name})")
        dev[subject] = read_split_csv(dev_path, mode, "dev", subject)
        val[subject] = read_split_csv(val_path, mode, "val", subject)
    return Dataset(mode, work_dir, subjects, dev, val, {s: categories[s] for s in subjects}, mapping_file)


def select_subjects(dataset: Dataset, names: list[str] | None) -> list[str]:
    """The requested subjects (sorted), each checked against the data."""
    if not names:
        return list(dataset.subjects)
    unknown = [n for n in names if n not in dataset.val]
    if unknown:
        raise UserError(
            f"{flag('precision.subjects')}: {unknown[0]!r} has no {unknown[0]}_val.csv in {dataset.work_dir / 'data' / 'val'}"
        )
    return sorted(set(names))
