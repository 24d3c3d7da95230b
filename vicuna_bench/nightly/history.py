"""The nightly history: one SQLite file, one row per run, one row per metric.

Schema version 3 (docs/nightly.md has the same text)::

    meta(key TEXT PRIMARY KEY, value TEXT)          -- 'schema_version' -> '3'
    runs(id INTEGER PRIMARY KEY AUTOINCREMENT,
         started_utc, finished_utc TEXT,            -- ISO 8601, UTC, 'YYYY-MM-DDTHH:MM:SSZ'
         git_commit TEXT NULL,                      -- the project's HEAD, NULL outside a git checkout
         status TEXT,                               -- pass | fail | error
         model, device, device_name, dtype TEXT, world_size, batch_size INTEGER,
         settings_json, environment_json TEXT,
         compile_mode, perf_mode TEXT, perf_repeat INTEGER, perf_cases TEXT)   -- version 2
    metrics(run_id INTEGER REFERENCES runs(id), kind TEXT,   -- version 3: kind 'energy' (J/token) allowed
            name TEXT, case_key TEXT,
            value REAL, unit TEXT, n INTEGER NULL, better TEXT,
            samples_json TEXT NULL,                 -- version 2: the samples behind the figure (ms)
            verdict TEXT NULL,                      -- version 2: the rule's status for it when the run was recorded
            PRIMARY KEY (run_id, name, case_key))

Version 1 and 2 files are migrated when opened (:data:`_MIGRATIONS`).

A run is written in one transaction at its end (:func:`record_run`): a
night that crashes, or is killed while writing, leaves the history as it was.
Runs are ordered by ``id`` (the order they were recorded), not by clock, so a
host with a wrong clock cannot reorder the history.
"""

from __future__ import annotations

import ast
import contextlib
import csv
import dataclasses
import datetime
import json
import math
import sqlite3
import subprocess
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

from ..errors import UserError

SCHEMA_VERSION = 3
DEFAULT_HISTORY = Path("nightly") / "history.sqlite"
KINDS = ("latency", "throughput", "memory", "accuracy", "rate", "energy")
BETTER = ("lower", "higher")
RUN_STATUSES = ("pass", "fail", "error")
# The run fields two runs must share before their metrics are compared.  The last four (version 2):
# a compile-on night is not a baseline for a compile-off one, nor 1 repeat for 3, nor one case list for
# another (the warm-up runs at the largest case, and the cases share the engine's caches in order).
SETUP_FIELDS = ("compile_mode", "perf_mode", "perf_repeat", "perf_cases")
COMPARABLE_FIELDS = ("model", "device", "device_name", "dtype", "world_size", "batch_size") + SETUP_FIELDS

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
    environment_json TEXT NOT NULL,
    compile_mode TEXT NOT NULL DEFAULT '',
    perf_mode TEXT NOT NULL DEFAULT '',
    perf_repeat INTEGER NOT NULL DEFAULT 0,
    perf_cases TEXT NOT NULL DEFAULT ''
);
CREATE TABLE metrics (
    run_id INTEGER NOT NULL REFERENCES runs (id),
    kind TEXT NOT NULL CHECK (kind IN ('latency', 'throughput', 'memory', 'accuracy', 'rate', 'energy')),
    name TEXT NOT NULL,
    case_key TEXT NOT NULL,
    value REAL NOT NULL,
    unit TEXT NOT NULL,
    n INTEGER,
    better TEXT NOT NULL CHECK (better IN ('lower', 'higher')),
    samples_json TEXT,
    verdict TEXT,
    PRIMARY KEY (run_id, name, case_key)
);
CREATE INDEX runs_comparable ON runs (model, device, device_name, dtype, world_size, batch_size);
"""


def _migrate_1_to_2(conn: sqlite3.Connection) -> None:
    """Add the setup fields, the samples and verdict columns; fill the setup fields of old runs from their settings.

    A version-1 run's settings hold ``compile_resolved``, ``perf_mode``,
    ``repeat`` and ``case_pair``; a run without the perf stage, or whose cases
    came from the exponent sweep, keeps '' / 0 where the value is unknown (it
    then compares only with old runs like it, never with a new run).
    """
    for column, kind in (("compile_mode", "TEXT NOT NULL DEFAULT ''"), ("perf_mode", "TEXT NOT NULL DEFAULT ''"),
                         ("perf_repeat", "INTEGER NOT NULL DEFAULT 0"), ("perf_cases", "TEXT NOT NULL DEFAULT ''")):
        conn.execute(f"ALTER TABLE runs ADD COLUMN {column} {kind}")
    conn.execute("ALTER TABLE metrics ADD COLUMN samples_json TEXT")
    conn.execute("ALTER TABLE metrics ADD COLUMN verdict TEXT")
    for run_id, settings_json in conn.execute("SELECT id, settings_json FROM runs").fetchall():
        try:
            settings = json.loads(settings_json)
        except ValueError:
            continue
        if not isinstance(settings, dict):
            continue
        setup = setup_from_settings(settings)
        conn.execute("UPDATE runs SET compile_mode = ?, perf_mode = ?, perf_repeat = ?, perf_cases = ? WHERE id = ?",
                     (*(setup[f] for f in SETUP_FIELDS), run_id))


def setup_from_settings(settings: dict) -> dict:
    """The setup fields (SETUP_FIELDS) as far as a recorded run's settings tell them; '' / 0 where they do not."""
    compile_mode = settings.get("compile_resolved")
    setup = {"compile_mode": compile_mode if isinstance(compile_mode, str) else "", "perf_mode": "",
             "perf_repeat": 0, "perf_cases": ""}
    stages = settings.get("stages")
    if isinstance(stages, list) and "perf" not in stages:
        return setup
    if isinstance(settings.get("perf_mode"), str):
        setup["perf_mode"] = settings["perf_mode"]
    if isinstance(settings.get("repeat"), int):
        setup["perf_repeat"] = settings["repeat"]
    try:
        pairs = ast.literal_eval(settings.get("case_pair") or "")
        setup["perf_cases"] = perf_cases_key(pairs)
    except (ValueError, SyntaxError, TypeError):
        pass
    return setup


def _migrate_2_to_3(conn: sqlite3.Connection) -> None:
    """Allow kind 'energy': SQLite cannot alter a CHECK, so the metrics table is rebuilt with its rows."""
    conn.execute("ALTER TABLE metrics RENAME TO metrics_v2")
    create = next(st for st in _statements(_SCHEMA) if st.lstrip().startswith("CREATE TABLE metrics"))
    conn.execute(create)
    columns = "run_id, kind, name, case_key, value, unit, n, better, samples_json, verdict"
    conn.execute(f"INSERT INTO metrics ({columns}) SELECT {columns} FROM metrics_v2")
    conn.execute("DROP TABLE metrics_v2")


# Version k -> the step that turns a version-k file into version k + 1 (run inside the opening transaction).
_MIGRATIONS: dict[int, Callable[[sqlite3.Connection], None]] = {1: _migrate_1_to_2, 2: _migrate_2_to_3}


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
    compile_mode: str = ""  # the engine's --compile as resolved: on | off ('' unknown)
    perf_mode: str = ""  # detail | normal ('' without a perf stage)
    perf_repeat: int = 0  # runs of each perf case (0 without a perf stage)
    perf_cases: str = ""  # the perf cases in run order, perf_cases_key(): '256x64,512x64'

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
    n: int | None = None  # what the figure is over: questions (accuracy, rate), timed samples (perf); None unknown
    samples: tuple[float, ...] | None = None  # the samples behind the figure (ms), for the rank test

    def __post_init__(self):
        if self.samples is not None and not isinstance(self.samples, tuple):
            object.__setattr__(self, "samples", tuple(self.samples))


@dataclasses.dataclass(frozen=True)
class HistoryPoint:
    """A metric's value in one earlier run."""

    run_id: int
    started_utc: str
    git_commit: str | None
    value: float
    n: int | None
    status: str = "pass"  # the run's: pass | fail | error
    samples: tuple[float, ...] | None = None
    verdict: str | None = None  # the rule's status for this metric in that run (None: not recorded)


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
                _MIGRATIONS[v](conn)
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
    if m.samples is not None:
        bad = [v for v in m.samples if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0]
        if bad or not m.samples:
            got = repr(bad[0]) if bad else "none"
            raise UserError(f"metric {m.name} [{m.case}]: samples must be a non-empty list of finite non-negative "
                            f"numbers (got {got})")


def record_run(db: str | Path | sqlite3.Connection, run: RunRecord, metrics: Iterable[Metric],
               verdicts: Mapping[tuple[str, str], str] | None = None) -> int:
    """Write a run and all its metrics in one transaction; return the run's id.

    ``verdicts``: the rule's status of each metric, by (name, case), as the
    run was judged (rules.Verdict.status); later runs leave a metric the rule
    called worse out of their baseline.
    """
    verdicts = dict(verdicts or {})
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
                " dtype, world_size, batch_size, settings_json, environment_json, compile_mode, perf_mode,"
                " perf_repeat, perf_cases) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (run.started_utc, run.finished_utc, run.git_commit, run.status, run.model, run.device,
                 run.device_name, run.dtype, int(run.world_size), int(run.batch_size),
                 _json(run.settings), _json(run.environment), run.compile_mode, run.perf_mode,
                 int(run.perf_repeat), run.perf_cases),
            )
            run_id = cur.lastrowid
            for m in metrics:
                conn.execute(
                    "INSERT INTO metrics (run_id, kind, name, case_key, value, unit, n, better, samples_json, verdict)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (run_id, m.kind, m.name, m.case, float(m.value), m.unit, m.n, m.better,
                     None if m.samples is None else json.dumps([float(v) for v in m.samples]),
                     verdicts.get((m.name, m.case))),
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
                " world_size, batch_size, settings_json, environment_json, compile_mode, perf_mode, perf_repeat,"
                " perf_cases")


def _stored_run(row) -> StoredRun:
    (rid, started, finished, commit, status, model, device, device_name, dtype, ws, bs, settings, env, *setup) = row
    return StoredRun(rid, RunRecord(started, finished, status, model, device, device_name, dtype, ws, bs,
                                    commit, json.loads(settings), json.loads(env), *setup))


def _samples(text: str | None) -> tuple[float, ...] | None:
    return None if text is None else tuple(json.loads(text))


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
            Metric(kind, name, case, value, unit, better, n, _samples(samples))
            for kind, name, case, value, unit, n, better, samples in conn.execute(
                "SELECT kind, name, case_key, value, unit, n, better, samples_json FROM metrics WHERE run_id = ?"
                " ORDER BY rowid",
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
    """The metric in the newest ``limit`` comparable runs before ``before_run_id`` (any status), newest first.

    Comparable: the same COMPARABLE_FIELDS as ``run`` (model, device, device
    name, dtype, world size, batch size, compile mode, perf mode, repeats,
    perf cases), and the same metric name and case.  Without
    ``before_run_id`` every recorded run counts as earlier.
    """
    conn, own = _open(db)
    try:
        where = " AND ".join(f"r.{f} = ?" for f in COMPARABLE_FIELDS)
        params = [*run.comparable_key(), name, case]
        sql = (
            "SELECT r.id, r.started_utc, r.git_commit, m.value, m.n, r.status, m.samples_json, m.verdict"
            f" FROM runs r JOIN metrics m ON m.run_id = r.id WHERE {where} AND m.name = ? AND m.case_key = ?"
        )
        if before_run_id is not None:
            sql += " AND r.id < ?"
            params.append(before_run_id)
        sql += " ORDER BY r.id DESC LIMIT ?"
        params.append(limit)
        return [HistoryPoint(*row[:6], _samples(row[6]), row[7]) for row in conn.execute(sql, params)]
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
# Energy per token (perf's energy columns): recorded where the run could meter it, absent otherwise (and in
# extended CSVs written before those columns existed).  n: the repeats the joules were summed over.
ENERGY_METRICS = (
    ("prefill_j_per_token", "prefill_j_per_token", "energy", "J/token", "lower"),
    ("decode_j_per_token", "decode_j_per_token", "energy", "J/token", "lower"),
)


def perf_case(seq_in: int, seq_out: int) -> str:
    """A perf case's key in the history: '256x64' (input tokens x output tokens)."""
    return f"{seq_in}x{seq_out}"


def perf_cases_key(cases) -> str:
    """A run's perf cases as the history compares them: '256x64,512x64' (run order kept).

    ``cases``: perf.Case objects or [seq_in, seq_out] pairs.
    """
    keys = []
    for case in cases:
        seq_in, seq_out = (case.seq_in, case.seq_out) if hasattr(case, "seq_in") else case
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in (seq_in, seq_out)):
            raise TypeError(f"perf case {case!r}: lengths must be integers")
        keys.append(perf_case(seq_in, seq_out))
    return ",".join(keys)


def perf_setup(compile_mode: str, perf_settings=None) -> dict:
    """The setup fields of a run (SETUP_FIELDS): its resolved compile mode and, with a perf stage, its
    perf.PerfSettings' mode, repeats and cases."""
    if perf_settings is None:
        return {"compile_mode": compile_mode, "perf_mode": "", "perf_repeat": 0, "perf_cases": ""}
    return {"compile_mode": compile_mode, "perf_mode": perf_settings.mode, "perf_repeat": int(perf_settings.repeat),
            "perf_cases": perf_cases_key(perf_settings.cases)}


def metrics_from_perf_extended_csv(path: str | Path) -> list[Metric]:
    """The perf metrics of an extended CSV (perf's ``*_extended.csv``): ms, tokens/s, MiB, J/token (where metered)
    per case.

    Empty cells (no next token when seq_out is 1; no memory figure) are
    left out rather than recorded as zero.  Each latency's ``n`` is the
    samples behind it, from the ``repeats`` and ``perf_mode`` columns: one
    first token a repeat; ``repeats x (seq_out - 1)`` decode steps in detail
    mode, one mean a repeat in normal mode (None when those cells are absent).
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
    return metrics_from_perf_rows(reader, path)


def metrics_from_perf_rows(rows, path: str | Path) -> list[Metric]:
    """:func:`metrics_from_perf_extended_csv` of the rows themselves (``perf.extended_rows``: the CSV's cells)."""
    path = Path(path)
    metrics = []
    for line, row in enumerate(rows, start=2):
        seq_in = _number(path, line, "seq_in", row["seq_in"], int)
        seq_out = _number(path, line, "seq_out", row["seq_out"], int)
        case = perf_case(seq_in, seq_out)
        repeats = _number(path, line, "repeats", row["repeats"], int) if row.get("repeats") not in ("", None) else None
        mode = row.get("perf_mode") or None
        counts = {"first_token": repeats,
                  "next_token": None if repeats is None or mode not in ("detail", "normal")
                  else repeats * (seq_out - 1) if mode == "detail" else repeats}
        for column, name, kind, unit, better in PERF_METRICS:
            if row[column] in ("", None):
                continue
            n = counts["first_token"] if name.startswith("first_token") else (
                counts["next_token"] if name.startswith("next_token") or name == "decode_tokens_per_s" else None)
            metrics.append(Metric(kind, name, case, _number(path, line, column, row[column], float), unit, better, n))
        for column, name, kind, unit, better in ENERGY_METRICS:
            if row.get(column) in ("", None):
                continue
            metrics.append(Metric(kind, name, case, _number(path, line, column, row[column], float), unit, better,
                                  repeats))
    return metrics


# The metric that carries each series of the samples JSON (the rank test reads them there).
PERF_SAMPLES = (("first_ms", "first_token_ms_p50"), ("step_ms", "next_token_ms_p50"))


def metrics_with_perf_samples(metrics: Sequence[Metric], path: str | Path) -> list[Metric]:
    """``metrics`` with the perf samples JSON's raw samples (ms) on the p50 metrics of their case.

    first_token_ms_p50 gets every repeat's first token (``first_ms``),
    next_token_ms_p50 every decode step (``step_ms``); the other metrics are
    returned as they are.
    """
    path = Path(path)
    doc = read_json(path, "the perf samples JSON")
    cases = doc.get("cases") if isinstance(doc, dict) else None
    if not isinstance(cases, list):
        raise UserError(f"{path}: not a perf samples JSON: no list 'cases'")
    return metrics_with_samples(metrics, cases, path)


def metrics_with_samples(metrics: Sequence[Metric], cases: list, path: str | Path) -> list[Metric]:
    """:func:`metrics_with_perf_samples` of the samples JSON's ``cases`` list itself (``path`` names it in errors)."""
    by_key: dict[tuple[str, str], tuple[float, ...]] = {}
    for i, entry in enumerate(cases):
        try:
            case = perf_case(int(entry["seq_in"]), int(entry["seq_out"]))
            for series, name in PERF_SAMPLES:
                values = entry[series]
                if not isinstance(values, list) or not all(
                        isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0
                        for v in values):
                    raise ValueError(series)
                if values:
                    by_key[(name, case)] = tuple(float(v) for v in values)
        except (KeyError, TypeError, ValueError) as exc:
            raise UserError(f"{path}: cases[{i}] needs seq_in, seq_out and lists first_ms, step_ms of "
                            f"non-negative numbers ({exc!s})") from None
    return [dataclasses.replace(m, samples=by_key[(m.name, m.case)]) if (m.name, m.case) in by_key else m
            for m in metrics]


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
    return metrics_from_summary(read_precision_summary(path), path)


def metrics_from_summary(summary: dict, path: str | Path) -> list[Metric]:
    """:func:`metrics_from_precision_summary` of the runner's summary dict (``path`` names it in errors)."""
    mode = summary["mode"]
    metrics = []
    for scoring, counts in summary["results"].items():
        if not isinstance(counts, dict) or "micro" not in counts or "total" not in counts:
            raise UserError(f"{path}: results.{scoring} needs keys micro and total")
        if counts["micro"] is None:
            continue  # nothing answered: no accuracy to record
        metrics.append(Metric("accuracy", "accuracy", f"{mode}/{scoring}", float(counts["micro"]),
                              "fraction", "higher", n=int(counts["total"])))
    timing = summary.get("timing") or {}
    rate = timing.get("questions_per_s")
    if rate is not None:
        asked = timing.get("asked_this_run")
        metrics.append(Metric("rate", "questions_per_s", mode, float(rate), "questions/s", "higher",
                              n=int(asked) if isinstance(asked, int) and asked > 0 else None))
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
