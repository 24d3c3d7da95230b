"""The nightly history: one SQLite file, one row per run, one row per metric.

Schema version 1 (docs/nightly.md has the same text)::

    meta(key TEXT PRIMARY KEY, value TEXT)          -- 'schema_version' -> '1'
    runs(id INTEGER PRIMARY KEY AUTOINCREMENT,
         started_utc, finished_utc TEXT,            -- ISO 8601, UTC, 'YYYY-MM-DDTHH:MM:SSZ'
         git_commit TEXT NULL,                      -- the project's HEAD, NULL outside a git checkout
         status TEXT,                               -- pass | fail | error
         model, device, device_name, dtype TEXT, world_size, batch_size INTEGER,
         settings_json, environment_json TEXT)
    metrics(run_id INTEGER REFERENCES runs(id), kind TEXT, name TEXT, case_key TEXT,
            value REAL, unit TEXT, n INTEGER NULL, better TEXT,
            PRIMARY KEY (run_id, name, case_key))

A run is written in one transaction at its end (:func:`record_run`): a
night that crashes, or is killed while writing, leaves the history as it was.
Runs are ordered by ``id`` (the order they were recorded), not by clock, so a
host with a wrong clock cannot reorder the history.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import datetime
import json
import math
import sqlite3
import subprocess
from collections.abc import Iterable, Sequence
from pathlib import Path

from ..errors import UserError

SCHEMA_VERSION = 1
DEFAULT_HISTORY = Path("nightly") / "history.sqlite"
KINDS = ("latency", "throughput", "memory", "accuracy", "rate")
BETTER = ("lower", "higher")
RUN_STATUSES = ("pass", "fail", "error")
# The run fields two runs must share before their metrics are compared.
COMPARABLE_FIELDS = ("model", "device", "device_name", "dtype", "world_size", "batch_size")

_SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE runs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    started_utc TEXT NOT NULL,
    finished_utc TEXT NOT NULL,
    git_commit TEXT,
    status TEXT NOT NULL CHECK (status IN ('pass', 'fail', 'error')),
    model TEXT NOT NULL,
    device TEXT NOT NULL,
    device_name TEXT NOT NULL,
    dtype TEXT NOT NULL,
    world_size INTEGER NOT NULL,
    batch_size INTEGER NOT NULL,
    settings_json TEXT NOT NULL,
    environment_json TEXT NOT NULL
);
CREATE TABLE metrics (
    run_id INTEGER NOT NULL REFERENCES runs (id),
    kind TEXT NOT NULL CHECK (kind IN ('latency', 'throughput', 'memory', 'accuracy', 'rate')),
    name TEXT NOT NULL,
    case_key TEXT NOT NULL,
    value REAL NOT NULL,
    unit TEXT NOT NULL,
    n INTEGER,
    better TEXT NOT NULL CHECK (better IN ('lower', 'higher')),
    PRIMARY KEY (run_id, name, case_key)
);
CREATE INDEX runs_comparable ON runs (model, device, device_name, dtype, world_size, batch_size);
"""

# Version k -> the SQL that turns a version-k file into version k + 1.  Empty
# while version 1 is the only one; a new version adds its step here.
_MIGRATIONS: dict[int, str] = {}


@dataclasses.dataclass(frozen=True)
class RunRecord:
    """One nightly run: when, which commit, its outcome, and what makes runs comparable."""

    started_utc: str
    finished_utc: str
    status: str  # pass | fail | error
    model: str
    device: str  # cpu | cuda | npu
    device_name: str  # e.g. NVIDIA_H100_80GB_HBM3, AMD_EPYC
    dtype: str
    world_size: int
    batch_size: int
    git_commit: str | None = None
    settings: dict = dataclasses.field(default_factory=dict)
    environment: dict = dataclasses.field(default_factory=dict)

    def comparable_key(self) -> tuple:
        """The fields two runs must share to be compared (COMPARABLE_FIELDS, in order)."""
        return tuple(getattr(self, f) for f in COMPARABLE_FIELDS)


@dataclasses.dataclass(frozen=True)
class Metric:
    """One figure of a run: e.g. latency next_token_ms_p50 for case 256x64, in ms, lower is better."""

    kind: str  # latency | throughput | memory | accuracy | rate
    name: str  # first_token_ms_p50, accuracy, questions_per_s, ...
    case: str  # 256x64 for perf, mmlu/generate for accuracy, mmlu for a precision rate
    value: float
    unit: str  # ms, tokens/s, MiB, fraction (0..1), questions/s
    better: str  # lower | higher
    n: int | None = None  # questions behind an accuracy (for its binomial error)


@dataclasses.dataclass(frozen=True)
class HistoryPoint:
    """A metric's value in one earlier run."""

    run_id: int
    started_utc: str
    git_commit: str | None
    value: float
    n: int | None


@dataclasses.dataclass(frozen=True)
class StoredRun:
    """A run as read back from the history, with its id."""

    id: int
    run: RunRecord


# ---------------------------------------------------------------- opening

def connect(path: str | Path) -> sqlite3.Connection:
    """Open (creating or migrating as needed) the history at ``path``; refuse a newer schema."""
    path = Path(path)
    if path.exists() and path.is_dir():
        raise UserError(f"--history {path}: is a directory; expected an SQLite file")
    path.parent.mkdir(parents=True, exist_ok=True)
    # Autocommit mode: every transaction below is an explicit BEGIN ... COMMIT.
    conn = sqlite3.connect(str(path), isolation_level=None)
    try:
        conn.execute("PRAGMA foreign_keys = ON")
        _prepare(conn, path)
    except sqlite3.DatabaseError as exc:
        conn.close()
        raise UserError(f"--history {path}: not a readable vicuna-bench history ({exc})") from exc
    except BaseException:
        conn.close()
        raise
    return conn


def _prepare(conn: sqlite3.Connection, path: Path) -> None:
    if not _tables(conn):
        # One transaction: a crash while creating leaves an empty file, created again next time.
        with _transaction(conn):
            if not _tables(conn):  # another process may have created it while we waited for the lock
                for statement in _statements(_SCHEMA):
                    conn.execute(statement)
                conn.execute("INSERT INTO meta (key, value) VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
    if "meta" not in _tables(conn):
        raise UserError(f"--history {path}: an SQLite file without a meta table is not a vicuna-bench history")
    row = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
    try:
        version = int(row[0]) if row else None
    except ValueError:
        version = None
    if version is None:
        raise UserError(f"--history {path}: meta has no integer schema_version (expected 1..{SCHEMA_VERSION})")
    if version > SCHEMA_VERSION:
        raise UserError(
            f"--history {path}: schema_version {version} is newer than this vicuna-bench reads "
            f"({SCHEMA_VERSION}); use a newer vicuna-bench or another --history file"
        )
    if version < SCHEMA_VERSION:
        with _transaction(conn):
            for v in range(version, SCHEMA_VERSION):
                if v not in _MIGRATIONS:
                    raise UserError(f"--history {path}: no migration from schema_version {v} (valid: 1..{SCHEMA_VERSION})")
                for statement in _statements(_MIGRATIONS[v]):
                    conn.execute(statement)
            conn.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (str(SCHEMA_VERSION),))


def _tables(conn: sqlite3.Connection) -> set[str]:
    return {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}


@contextlib.contextmanager
def _transaction(conn: sqlite3.Connection):
    """BEGIN IMMEDIATE ... COMMIT, rolled back on any exception: all of it is written or none."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def _statements(script: str) -> list[str]:
    # conn.executescript() commits first, which would split our transaction.
    return [s.strip() for s in script.split(";") if s.strip()]


def _open(db: str | Path | sqlite3.Connection) -> tuple[sqlite3.Connection, bool]:
    """A connection and whether we opened it (and so must close it)."""
    if isinstance(db, sqlite3.Connection):
        return db, False
    return connect(db), True


# ---------------------------------------------------------------- writing

def _check_metric(m: Metric) -> None:
    if m.kind not in KINDS:
        raise UserError(f"metric {m.name} [{m.case}]: kind {m.kind!r} is not one of {', '.join(KINDS)}")
    if m.better not in BETTER:
        raise UserError(f"metric {m.name} [{m.case}]: better {m.better!r} is not lower or higher")
    if not isinstance(m.value, (int, float)) or not math.isfinite(m.value):
        raise UserError(f"metric {m.name} [{m.case}]: value {m.value!r} is not a finite number")
    if m.kind == "accuracy" and (m.n is None or m.n < 1 or not 0.0 <= m.value <= 1.0):
        raise UserError(f"metric {m.name} [{m.case}]: an accuracy needs a value in 0..1 and n >= 1 questions (got {m.value!r}, n={m.n!r})")


def record_run(db: str | Path | sqlite3.Connection, run: RunRecord, metrics: Iterable[Metric]) -> int:
    """Write a run and all its metrics in one transaction; return the run's id."""
    if run.status not in RUN_STATUSES:
        raise UserError(f"run status {run.status!r} is not one of {', '.join(RUN_STATUSES)}")
    metrics = list(metrics)
    seen = set()
    for m in metrics:
        _check_metric(m)
        if (m.name, m.case) in seen:
            raise UserError(f"metric {m.name} [{m.case}] given twice for one run")
        seen.add((m.name, m.case))
    conn, own = _open(db)
    try:
        with _transaction(conn):
            cur = conn.execute(
                "INSERT INTO runs (started_utc, finished_utc, git_commit, status, model, device, device_name,"
                " dtype, world_size, batch_size, settings_json, environment_json)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (run.started_utc, run.finished_utc, run.git_commit, run.status, run.model, run.device,
                 run.device_name, run.dtype, int(run.world_size), int(run.batch_size),
                 _json(run.settings), _json(run.environment)),
            )
            run_id = cur.lastrowid
            for m in metrics:
                conn.execute(
                    "INSERT INTO metrics (run_id, kind, name, case_key, value, unit, n, better)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (run_id, m.kind, m.name, m.case, float(m.value), m.unit, m.n, m.better),
                )
        return run_id
    finally:
        if own:
            conn.close()


def _json(obj) -> str:
    # Settings hold paths and the like: recorded as text rather than refused at the end of a night.
    return json.dumps(obj, sort_keys=True, default=str)


# ---------------------------------------------------------------- reading

_RUN_COLUMNS = ("id, started_utc, finished_utc, git_commit, status, model, device, device_name, dtype,"
                " world_size, batch_size, settings_json, environment_json")


def _stored_run(row) -> StoredRun:
    (rid, started, finished, commit, status, model, device, device_name, dtype, ws, bs, settings, env) = row
    return StoredRun(rid, RunRecord(started, finished, status, model, device, device_name, dtype, ws, bs,
                                    commit, json.loads(settings), json.loads(env)))


def list_runs(db: str | Path | sqlite3.Connection, limit: int | None = None) -> list[StoredRun]:
    """Every recorded run (or the newest ``limit``), oldest first."""
    conn, own = _open(db)
    try:
        sql = f"SELECT {_RUN_COLUMNS} FROM runs ORDER BY id DESC"
        rows = conn.execute(sql + (" LIMIT ?" if limit else ""), (limit,) if limit else ()).fetchall()
        return [_stored_run(r) for r in reversed(rows)]
    finally:
        if own:
            conn.close()


def load_run(db: str | Path | sqlite3.Connection, run_id: int) -> tuple[RunRecord, list[Metric]]:
    """A recorded run and its metrics (in the order they were written)."""
    conn, own = _open(db)
    try:
        row = conn.execute(f"SELECT {_RUN_COLUMNS} FROM runs WHERE id = ?", (run_id,)).fetchone()
        if row is None:
            raise UserError(f"run id {run_id} is not in the history (see the runs table)")
        metrics = [
            Metric(kind, name, case, value, unit, better, n)
            for kind, name, case, value, unit, n, better in conn.execute(
                "SELECT kind, name, case_key, value, unit, n, better FROM metrics WHERE run_id = ? ORDER BY rowid",
                (run_id,),
            )
        ]
        return _stored_run(row).run, metrics
    finally:
        if own:
            conn.close()


def comparable_values(
    db: str | Path | sqlite3.Connection, run: RunRecord, name: str, case: str,
    limit: int = 7, before_run_id: int | None = None,
) -> list[HistoryPoint]:
    """The metric's values in the newest ``limit`` comparable runs before ``before_run_id``, newest first.

    Comparable: the same model, device, device name, dtype, world size and
    batch size as ``run``, and the same metric name and case.  Without
    ``before_run_id`` every recorded run counts as earlier.
    """
    conn, own = _open(db)
    try:
        where = " AND ".join(f"r.{f} = ?" for f in COMPARABLE_FIELDS)
        params = [*run.comparable_key(), name, case]
        sql = (
            "SELECT r.id, r.started_utc, r.git_commit, m.value, m.n FROM runs r JOIN metrics m ON m.run_id = r.id"
            f" WHERE {where} AND m.name = ? AND m.case_key = ?"
        )
        if before_run_id is not None:
            sql += " AND r.id < ?"
            params.append(before_run_id)
        sql += " ORDER BY r.id DESC LIMIT ?"
        params.append(limit)
        return [HistoryPoint(*row) for row in conn.execute(sql, params)]
    finally:
        if own:
            conn.close()


def utc_timestamp(when: datetime.datetime | None = None) -> str:
    """A run's time as the history stores it: 'YYYY-MM-DDTHH:MM:SSZ' in UTC (default: now)."""
    when = when or datetime.datetime.now(datetime.timezone.utc)
    if when.tzinfo is None:
        raise ValueError("utc_timestamp needs an aware datetime: a naive one's zone is a guess")
    return when.astimezone(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


# ---------------------------------------------------------------- the project's commit

def project_commit(directory: str | Path | None = None) -> str | None:
    """The git commit (40 hex digits) checked out in ``directory`` (default: this project), or None."""
    directory = Path(directory) if directory is not None else Path(__file__).resolve().parents[2]
    try:
        done = subprocess.run(
            ["git", "-C", str(directory), "rev-parse", "HEAD"],
            capture_output=True, text=True, timeout=10, check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None  # no git on this host: the run is still worth recording
    commit = done.stdout.strip()
    return commit if done.returncode == 0 and len(commit) == 40 else None


# ---------------------------------------------------------------- ingestion

# (column of the extended perf CSV, metric name, kind, unit, better)
PERF_METRICS = (
    ("first_token_ms_p50", "first_token_ms_p50", "latency", "ms", "lower"),
    ("first_token_ms_p90", "first_token_ms_p90", "latency", "ms", "lower"),
    ("next_token_ms_p50", "next_token_ms_p50", "latency", "ms", "lower"),
    ("next_token_ms_p90", "next_token_ms_p90", "latency", "ms", "lower"),
    ("decode_tokens_per_s", "decode_tokens_per_s", "throughput", "tokens/s", "higher"),
    ("peak_memory_mib_max", "peak_memory_mib", "memory", "MiB", "lower"),
)


def perf_case(seq_in: int, seq_out: int) -> str:
    """A perf case's key in the history: '256x64' (input tokens x output tokens)."""
    return f"{seq_in}x{seq_out}"


def metrics_from_perf_extended_csv(path: str | Path) -> list[Metric]:
    """The perf metrics of an extended CSV (perf's ``*_extended.csv``): ms, tokens/s, MiB per case.

    Empty cells (no next token when seq_out is 1; no memory figure) are
    left out rather than recorded as zero.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise UserError(f"{path}: cannot read the perf extended CSV ({exc.strerror})") from exc
    reader = csv.DictReader(text.splitlines())
    needed = ["seq_in", "seq_out"] + [col for col, *_ in PERF_METRICS]
    missing = [c for c in needed if c not in (reader.fieldnames or [])]
    if missing:
        raise UserError(f"{path}: not a perf extended CSV: missing column(s) {', '.join(missing)}")
    metrics = []
    for line, row in enumerate(reader, start=2):
        case = perf_case(_number(path, line, "seq_in", row["seq_in"], int),
                         _number(path, line, "seq_out", row["seq_out"], int))
        for column, name, kind, unit, better in PERF_METRICS:
            if row[column] in ("", None):
                continue
            metrics.append(Metric(kind, name, case, _number(path, line, column, row[column], float), unit, better))
    return metrics


def _number(path: Path, line: int, column: str, text, kind):
    try:
        value = kind(text)
    except (TypeError, ValueError):
        value = None
    if value is None or not math.isfinite(value) or value < 0:
        raise UserError(f"{path}:{line}: column {column} = {text!r} is not a non-negative number")
    return value


def read_json(path: str | Path, what: str):
    """A JSON file's content; one UserError naming the file when it is unreadable or not JSON."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise UserError(f"{path}: cannot read {what} ({exc.strerror})") from exc
    except ValueError as exc:
        raise UserError(f"{path}: not JSON ({exc})") from exc


def read_precision_summary(path: str | Path) -> dict:
    """The precision runner's ``summary.json`` as a dict, checked for the keys the nightly run reads."""
    summary = read_json(path, "the precision summary")
    if not isinstance(summary, dict):
        raise UserError(f"{path}: expected a JSON object with keys mode and results")
    for key in ("mode", "results"):
        if key not in summary:
            raise UserError(f"{path}: precision summary has no key {key!r}")
    if not isinstance(summary["results"], dict):
        raise UserError(f"{path}: key 'results' must map each scoring to its counts")
    return summary


def metrics_from_precision_summary(path: str | Path) -> list[Metric]:
    """Accuracy (0..1, with n questions) per scoring and questions/s of a precision ``summary.json``."""
    summary = read_precision_summary(path)
    mode = summary["mode"]
    metrics = []
    for scoring, counts in summary["results"].items():
        if not isinstance(counts, dict) or "micro" not in counts or "total" not in counts:
            raise UserError(f"{path}: results.{scoring} needs keys micro and total")
        if counts["micro"] is None:
            continue  # nothing answered: no accuracy to record
        metrics.append(Metric("accuracy", "accuracy", f"{mode}/{scoring}", float(counts["micro"]),
                              "fraction", "higher", n=int(counts["total"])))
    rate = (summary.get("timing") or {}).get("questions_per_s")
    if rate is not None:
        metrics.append(Metric("rate", "questions_per_s", mode, float(rate), "questions/s", "higher"))
    return metrics


def comparable_values_by_metric(
    db: str | Path | sqlite3.Connection, run: RunRecord, metrics: Sequence[Metric],
    limit: int = 7, before_run_id: int | None = None,
) -> dict[tuple[str, str], list[HistoryPoint]]:
    """:func:`comparable_values` for every (name, case) of ``metrics``, over one connection."""
    conn, own = _open(db)
    try:
        return {(m.name, m.case): comparable_values(conn, run, m.name, m.case, limit, before_run_id) for m in metrics}
    finally:
        if own:
            conn.close()
