"""The nightly history: schema and versions (a version-1 file migrated), whole-run transactions (killed
writers), comparability, samples, queries, ingestion."""

from __future__ import annotations

import ast
import datetime
import json
import re
import sqlite3
from pathlib import Path
from types import SimpleNamespace

import pytest

from tests.unit.nightly_fixtures import accuracy, assert_bad_file, latency, record_series, run_record
from vicuna_bench.errors import UserError
from vicuna_bench.nightly import history as H
from vicuna_bench.nightly.history import Metric

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]


def tables(path: Path) -> set[str]:
    with sqlite3.connect(path) as conn:
        return {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}


# ---------------------------------------------------------------- schema and versions

def test_a_new_history_gets_schema_version_3(tmp_path):
    path = tmp_path / "nightly" / "history.sqlite"  # the folder is made too
    H.connect(path).close()
    assert {"meta", "runs", "metrics"} <= tables(path)
    with sqlite3.connect(path) as conn:
        assert conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone() == ("3",)
        runs = [r[1] for r in conn.execute("PRAGMA table_info(runs)")]
        metrics = [r[1] for r in conn.execute("PRAGMA table_info(metrics)")]
    assert runs[-4:] == ["compile_mode", "perf_mode", "perf_repeat", "perf_cases"]
    assert metrics[-2:] == ["samples_json", "verdict"]


# The version-1 schema as vicuna-bench wrote it before samples and setup fields (history.py at 23a0aa4).
SCHEMA_V1 = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE runs (
    id INTEGER PRIMARY KEY AUTOINCREMENT, started_utc TEXT NOT NULL, finished_utc TEXT NOT NULL, git_commit TEXT,
    status TEXT NOT NULL CHECK (status IN ('pass', 'fail', 'error')), model TEXT NOT NULL, device TEXT NOT NULL,
    device_name TEXT NOT NULL, dtype TEXT NOT NULL, world_size INTEGER NOT NULL, batch_size INTEGER NOT NULL,
    settings_json TEXT NOT NULL, environment_json TEXT NOT NULL);
CREATE TABLE metrics (
    run_id INTEGER NOT NULL REFERENCES runs (id),
    kind TEXT NOT NULL CHECK (kind IN ('latency', 'throughput', 'memory', 'accuracy', 'rate')),
    name TEXT NOT NULL, case_key TEXT NOT NULL, value REAL NOT NULL, unit TEXT NOT NULL, n INTEGER,
    better TEXT NOT NULL CHECK (better IN ('lower', 'higher')), PRIMARY KEY (run_id, name, case_key));
CREATE INDEX runs_comparable ON runs (model, device, device_name, dtype, world_size, batch_size);
INSERT INTO meta VALUES ('schema_version', '1');
"""


def write_v1_history(path: Path, settings: list[dict]) -> None:
    with sqlite3.connect(path) as conn:
        conn.executescript(SCHEMA_V1)
        for i, s in enumerate(settings):
            conn.execute("INSERT INTO runs (started_utc, finished_utc, git_commit, status, model, device, device_name,"
                         " dtype, world_size, batch_size, settings_json, environment_json) VALUES"
                         " (?, ?, NULL, 'pass', 'SmolLM2-135M-Instruct', 'cpu', 'AMD_EPYC', 'fp32', 1, 1, ?, '{}')",
                         (f"2026-11-0{i + 1}T01:00:00Z", f"2026-11-0{i + 1}T01:40:00Z", json.dumps(s)))
            conn.execute("INSERT INTO metrics VALUES (?, 'latency', 'next_token_ms_p50', '32x8', ?, 'ms', NULL, 'lower')",
                         (i + 1, 60.0 + i))


def test_a_version_1_history_is_migrated_with_its_runs_setup_filled_in(tmp_path):
    path = tmp_path / "history.sqlite"
    quick = {"compile_resolved": "off", "perf_mode": "detail", "repeat": 2, "case_pair": "[[32,8],[64,8]]",
             "stages": ["hw", "perf", "mmlu", "ceval"]}
    write_v1_history(path, [
        quick,
        {**quick, "case_pair": None},  # the exponent sweep: its cases are not in the settings
        {**quick, "stages": ["mmlu"]},  # no perf stage: no perf setup
        {"quick": True},  # settings from before compile_resolved
    ])
    runs = H.list_runs(path)  # opening migrates
    with sqlite3.connect(path) as conn:
        assert conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone() == ("3",)
    assert [(r.run.compile_mode, r.run.perf_mode, r.run.perf_repeat, r.run.perf_cases) for r in runs] == [
        ("off", "detail", 2, "32x8,64x8"), ("off", "detail", 2, ""), ("off", "", 0, ""), ("", "", 0, ""),
    ]
    assert H.load_run(path, 1)[1] == [latency(60.0, case="32x8")]  # no samples: None
    # A new quick run compares with the first old one (the same setup), and not with the others.
    new = run_record(9, compile_mode="off", perf_mode="detail", perf_repeat=2, perf_cases="32x8,64x8")
    H.record_run(path, new, [latency(70.0, case="32x8")])
    points = H.comparable_values(path, new, "next_token_ms_p50", "32x8")
    assert [(p.run_id, p.value) for p in points] == [(5, 70.0), (1, 60.0)]


def test_an_empty_file_becomes_a_history(tmp_path):
    path = tmp_path / "history.sqlite"
    path.write_bytes(b"")
    H.record_run(path, run_record(), [latency(100.0)])
    assert len(H.list_runs(path)) == 1


def test_a_newer_schema_is_refused_naming_the_file(tmp_path):
    path = tmp_path / "history.sqlite"
    H.connect(path).close()
    with sqlite3.connect(path) as conn:
        conn.execute("UPDATE meta SET value = '4' WHERE key = 'schema_version'")
    with pytest.raises(UserError) as err:
        H.connect(path)
    assert str(err.value) == (
        f"--history {path}: schema_version 4 is newer than this vicuna-bench reads (3); "
        "use a newer vicuna-bench or another --history file"
    )
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("content, expected", [
    (b"run,value\n1,2\n" * 100, "not a readable vicuna-bench history"),
    (None, "without a meta table is not a vicuna-bench history"),
])
def test_a_file_that_is_not_a_history_is_refused(tmp_path, content, expected):
    path = tmp_path / "history.sqlite"
    if content is None:
        with sqlite3.connect(path) as conn:
            conn.execute("CREATE TABLE results (x)")
    else:
        path.write_bytes(content)
    with pytest.raises(UserError, match=expected) as err:
        H.connect(path)
    assert str(path) in str(err.value)


def test_a_schema_version_without_a_migration_is_refused(tmp_path):
    path = tmp_path / "history.sqlite"
    H.connect(path).close()
    with sqlite3.connect(path) as conn:
        conn.execute("UPDATE meta SET value = '0' WHERE key = 'schema_version'")
    with pytest.raises(UserError, match=r"no migration from schema_version 0 \(valid: 1\.\.3\)"):
        H.connect(path)


# ---------------------------------------------------------------- writing and reading runs

def test_a_run_reads_back_as_written(tmp_path):
    path = tmp_path / "history.sqlite"
    run = run_record(3, status="fail", settings={"cases": [[256, 64]], "quick": True}, environment={"torch": "2.5.1"})
    metrics = [latency(98.1), latency(1291.0, name="first_token_ms_p50"), accuracy(0.249, n=1542),
               Metric("rate", "questions_per_s", "mmlu", 0.26, "questions/s", "higher")]
    first = H.record_run(path, run, metrics)
    second = H.record_run(path, run_record(4), [latency(99.0)])
    assert (first, second) == (1, 2)
    back, back_metrics = H.load_run(path, first)
    assert back == run
    assert back_metrics == metrics
    assert [(s.id, s.run.started_utc) for s in H.list_runs(path)] == [(1, "2026-11-04T01:00:00Z"), (2, "2026-11-05T01:00:00Z")]
    assert [s.id for s in H.list_runs(path, limit=1)] == [2]


def test_samples_and_the_setup_read_back_as_written(tmp_path):
    path = tmp_path / "history.sqlite"
    run = run_record(compile_mode="on", perf_mode="detail", perf_repeat=3, perf_cases="256x64,512x64")
    steps = [61.25, 60.5, 0.0, 1e-3]
    metrics = [Metric("latency", "next_token_ms_p50", "256x64", 60.875, "ms", "lower", n=4, samples=steps)]
    run_id = H.record_run(path, run, metrics)
    back, back_metrics = H.load_run(path, run_id)
    assert back == run
    assert back_metrics == metrics and back_metrics[0].samples == tuple(steps)
    (point,) = H.comparable_values(path, run, "next_token_ms_p50", "256x64")
    assert (point.status, point.samples, point.n, point.verdict) == ("pass", tuple(steps), 4, None)
    H.record_run(path, run_record(1, status="fail"), [latency(90.0, case="256x64")],
                 {("next_token_ms_p50", "256x64"): "regression", ("unused", "x"): "ok"})
    newest = H.comparable_values(path, run_record(), "next_token_ms_p50", "256x64")[0]
    assert (newest.value, newest.status, newest.verdict, newest.samples) == (90.0, "fail", "regression", None)


@pytest.mark.parametrize("samples, shown", [([], "none"), ([1.0, float("inf")], "inf"), ([-1.0], "-1.0"),
                                            ([True], "True")])
def test_bad_samples_are_refused(tmp_path, samples, shown):
    with pytest.raises(UserError, match=f"samples must be a non-empty list of finite non-negative numbers \\(got {shown}"):
        H.record_run(tmp_path / "h.sqlite", run_record(), [Metric("latency", "x", "1x2", 1.0, "ms", "lower",
                                                                   samples=samples)])
    assert H.list_runs(tmp_path / "h.sqlite") == []


def test_the_setup_of_a_run(tmp_path):
    assert H.perf_cases_key([[256, 64], [32, 8]]) == "256x64,32x8"  # run order kept
    settings = SimpleNamespace(mode="normal", repeat=3, cases=[SimpleNamespace(seq_in=32, seq_out=8)])
    assert H.perf_setup("on", settings) == {"compile_mode": "on", "perf_mode": "normal", "perf_repeat": 3,
                                            "perf_cases": "32x8"}
    assert H.perf_setup("off") == {"compile_mode": "off", "perf_mode": "", "perf_repeat": 0, "perf_cases": ""}


def test_settings_that_are_not_json_are_recorded_as_text(tmp_path):
    path = tmp_path / "history.sqlite"
    run_id = H.record_run(path, run_record(settings={"model_path": Path("/models/vicuna"), "cases": ((256, 64),)}), [])
    assert H.load_run(path, run_id)[0].settings == {"model_path": "/models/vicuna", "cases": [[256, 64]]}


def test_an_unknown_run_id_is_bad_input(tmp_path):
    with pytest.raises(UserError, match="run id 7 is not in the history"):
        H.load_run(tmp_path / "history.sqlite", 7)


@pytest.mark.parametrize("metrics, message", [
    ([Metric("speed", "x", "256x64", 1.0, "ms", "lower")], "kind 'speed' is not one of latency"),
    ([Metric("latency", "x", "256x64", 1.0, "ms", "smaller")], "better 'smaller' is not lower or higher"),
    ([Metric("latency", "x", "256x64", float("nan"), "ms", "lower")], "value nan is not a finite number"),
    ([Metric("accuracy", "accuracy", "mmlu/generate", 0.3, "fraction", "higher")], "needs a value in 0..1 and n >= 1"),
    ([latency(1.0), latency(2.0)], r"next_token_ms_p50 \[256x64\] given twice"),
])
def test_bad_metrics_are_refused_and_nothing_is_written(tmp_path, metrics, message):
    path = tmp_path / "history.sqlite"
    H.record_run(path, run_record(), [latency(1.0)])
    with pytest.raises(UserError, match=message):
        H.record_run(path, run_record(1), metrics)
    assert [s.id for s in H.list_runs(path)] == [1]


def test_a_failure_inside_the_transaction_rolls_the_run_back(tmp_path):
    path = tmp_path / "history.sqlite"
    H.record_run(path, run_record(), [latency(1.0)])
    conn = H.connect(path)
    # An integer too large for SQLite fails on the third metric insert, after the run row.
    bad = Metric("accuracy", "accuracy", "ceval/generate", 0.3, "fraction", "higher", n=2**70)
    with pytest.raises(OverflowError):
        H.record_run(conn, run_record(1), [latency(2.0), accuracy(0.25, 100), bad])
    assert not conn.in_transaction
    conn.close()
    assert [s.id for s in H.list_runs(path)] == [1]
    with sqlite3.connect(path) as raw:
        assert raw.execute("SELECT count(*) FROM metrics").fetchone() == (1,)


# ---------------------------------------------------------------- queries

def test_comparable_values_are_the_newest_first_before_a_run(tmp_path):
    path = tmp_path / "history.sqlite"
    ids = record_series(path, [100.0, 101.0, 102.0, 103.0, 104.0])
    record_series(path, [50.0], start=5, device_name="AMD_EPYC_9654")  # another CPU model
    points = H.comparable_values(path, run_record(), "next_token_ms_p50", "256x64", limit=3)
    assert [(p.run_id, p.value) for p in points] == [(5, 104.0), (4, 103.0), (3, 102.0)]
    assert points[0].git_commit == f"{4:040x}"
    points = H.comparable_values(path, run_record(), "next_token_ms_p50", "256x64", limit=7, before_run_id=ids[2])
    assert [p.value for p in points] == [101.0, 100.0]
    assert H.comparable_values(path, run_record(), "next_token_ms_p50", "512x64") == []


@pytest.mark.parametrize("field, other", [("compile_mode", "on"), ("perf_mode", "normal"), ("perf_repeat", 3),
                                          ("perf_cases", "32x8,128x8"), ("batch_size", 4)])
def test_runs_compare_only_with_the_same_setup(tmp_path, field, other):
    path = tmp_path / "history.sqlite"
    setup = {"compile_mode": "off", "perf_mode": "detail", "perf_repeat": 2, "perf_cases": "32x8,64x8"}
    record_series(path, [100.0, 101.0], **setup)
    record_series(path, [50.0], start=2, **{**setup, field: other})
    assert [p.value for p in H.comparable_values(path, run_record(**setup), "next_token_ms_p50", "256x64")] == [101.0, 100.0]
    assert [p.value for p in H.comparable_values(path, run_record(**{**setup, field: other}), "next_token_ms_p50",
                                                 "256x64")] == [50.0]


def test_times_are_stored_in_utc():
    cet = datetime.timezone(datetime.timedelta(hours=1))
    assert H.utc_timestamp(datetime.datetime(2026, 11, 8, 2, 0, 5, tzinfo=cet)) == "2026-11-08T01:00:05Z"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", H.utc_timestamp())
    with pytest.raises(ValueError, match="aware"):
        H.utc_timestamp(datetime.datetime(2026, 11, 8))


# ---------------------------------------------------------------- the project's commit


# ---------------------------------------------------------------- ingestion

def extended_columns() -> list[str]:
    """perf/writers.py's EXTENDED_COLUMNS, read from its source (importing perf would load torch)."""
    tree = ast.parse((ROOT / "vicuna_bench" / "perf" / "writers.py").read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", None) == "EXTENDED_COLUMNS":
            return ast.literal_eval(node.value)
    raise AssertionError("perf/writers.py defines no EXTENDED_COLUMNS")


def write_extended_csv(path: Path, rows: list[dict]) -> Path:
    columns = extended_columns()
    lines = [",".join(columns)] + [",".join(str(row.get(c, "")) for c in columns) for row in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_metrics_from_the_perf_extended_csv(tmp_path):
    path = write_extended_csv(tmp_path / "performance_test_x_AMD_EPYC_bs1_extended.csv", [
        dict(model_name="x", seq_in=256, seq_out=64, first_token_ms_p50=1291.5, first_token_ms_p90=1300,
             first_token_ms_p99=1310, next_token_ms_p50=98.1, next_token_ms_p90=104.0, decode_tokens_per_s=10.19,
             peak_memory_mib_max=928.25, peak_memory_mib_per_rank="928.25", e2e_s_mean=7.5),
        # seq_out 1: no next token, so no next-token or decode figure (empty cells), and no memory figure.
        dict(model_name="x", seq_in=512, seq_out=1, first_token_ms_p50=2500, first_token_ms_p90=2600),
    ])
    assert H.metrics_from_perf_extended_csv(path) == [
        Metric("latency", "first_token_ms_p50", "256x64", 1291.5, "ms", "lower"),
        Metric("latency", "first_token_ms_p90", "256x64", 1300.0, "ms", "lower"),
        Metric("latency", "next_token_ms_p50", "256x64", 98.1, "ms", "lower"),
        Metric("latency", "next_token_ms_p90", "256x64", 104.0, "ms", "lower"),
        Metric("throughput", "decode_tokens_per_s", "256x64", 10.19, "tokens/s", "higher"),
        Metric("memory", "peak_memory_mib", "256x64", 928.25, "MiB", "lower"),
        Metric("latency", "first_token_ms_p50", "512x1", 2500.0, "ms", "lower"),
        Metric("latency", "first_token_ms_p90", "512x1", 2600.0, "ms", "lower"),
    ]


@pytest.mark.parametrize("mode, next_n", [("detail", 3 * 63), ("normal", 3)])
def test_each_perf_figure_says_how_many_samples_it_is_over(tmp_path, mode, next_n):
    # detail: every decode step is a sample, 3 repeats x (64 - 1) steps; normal: one mean per repeat.
    path = write_extended_csv(tmp_path / "x_extended.csv", [
        dict(seq_in=256, seq_out=64, repeats=3, perf_mode=mode, first_token_ms_p50=1291.5, first_token_ms_p90=1300,
             next_token_ms_p50=98.1, next_token_ms_p90=104.0, decode_tokens_per_s=10.19, peak_memory_mib_max=928.25),
    ])
    assert [(m.name, m.n) for m in H.metrics_from_perf_extended_csv(path)] == [
        ("first_token_ms_p50", 3), ("first_token_ms_p90", 3), ("next_token_ms_p50", next_n),
        ("next_token_ms_p90", next_n), ("decode_tokens_per_s", next_n), ("peak_memory_mib", None),
    ]


def test_the_perf_samples_ride_on_the_p50_metrics(tmp_path):
    """perf.write_tables' own files: the decode steps on next_token_ms_p50, the first tokens on first_token_ms_p50."""
    from vicuna_bench import perf

    settings = perf.PerfSettings(cases=[perf.Case(32, 4), perf.Case(64, 1)], repeat=2, model_name="m",
                                 mem_bandwidth_gbps=1.0)
    run = perf.PerfRun("m", "/m", "cpu", "cpu", "fp32", 1, settings,
                       [{"weight_bytes": 1, "decode_weight_bytes": 1, "kv_bytes_per_token": 1}], [1e9], "given",
                       perf.Case(64, 4))
    run.results.append(perf.CaseResult(perf.Case(32, 4), 1, "detail", first_ms=[110.0, 130.0], next_ms=[61.0, 62.0],
                                       step_ms=[60.0, 61.0, 62.0, 61.5, 62.0, 62.5], e2e_ms=[300.0, 320.0],
                                       response_s=[0.3, 0.32], peak_memory_bytes=[1 << 20]))
    run.results.append(perf.CaseResult(perf.Case(64, 1), 1, "detail", first_ms=[150.0, 160.0], e2e_ms=[150.0, 160.0],
                                       response_s=[0.15, 0.16], peak_memory_bytes=[1 << 20]))
    paths = perf.write_tables(run, tmp_path)
    metrics = H.metrics_with_perf_samples(H.metrics_from_perf_extended_csv(paths["extended_csv"]), paths["samples_json"])
    by_key = {(m.name, m.case): m for m in metrics}
    assert by_key[("next_token_ms_p50", "32x4")].samples == (60.0, 61.0, 62.0, 61.5, 62.0, 62.5)
    assert by_key[("next_token_ms_p50", "32x4")].n == 6  # 2 repeats x 3 steps
    assert by_key[("first_token_ms_p50", "32x4")].samples == (110.0, 130.0)
    assert by_key[("first_token_ms_p50", "64x1")].samples == (150.0, 160.0)
    assert ("next_token_ms_p50", "64x1") not in by_key  # one output token: no step
    assert all(m.samples is None for m in metrics if not m.name.endswith("_p50"))


@pytest.mark.parametrize("text, message", [
    ("[1]", "not a perf samples JSON: no list 'cases'"),
    ('{"cases": [{"seq_in": 32, "seq_out": 8, "first_ms": [1.0]}]}', r"cases\[0\] needs seq_in, seq_out and lists"),
    ('{"cases": [{"seq_in": 32, "seq_out": 8, "first_ms": [1.0], "step_ms": ["fast"]}]}', r"cases\[0\] needs"),
])
def test_a_bad_samples_json_is_bad_input(tmp_path, text, message):
    assert_bad_file(tmp_path / "x_samples.json", text, lambda p: H.metrics_with_perf_samples([], p), message)


def test_a_csv_without_the_columns_is_bad_input(tmp_path):
    path = tmp_path / "perf.csv"
    path.write_text("batch_size,input_seq_len(Encoding),output_seq_len(Decoding)\n1,256,64\n")
    with pytest.raises(UserError, match=r"perf\.csv: not a perf extended CSV: missing column\(s\) seq_in, seq_out, first_token"):
        H.metrics_from_perf_extended_csv(path)
    with pytest.raises(UserError, match=r"nope\.csv: cannot read"):
        H.metrics_from_perf_extended_csv(tmp_path / "nope.csv")


def test_a_bad_number_names_its_line_and_column(tmp_path):
    path = write_extended_csv(tmp_path / "x_extended.csv", [
        dict(seq_in=256, seq_out=64, first_token_ms_p50=1, first_token_ms_p90=1),
        dict(seq_in=256, seq_out=128, first_token_ms_p50="fast", first_token_ms_p90=1),
    ])
    with pytest.raises(UserError) as err:
        H.metrics_from_perf_extended_csv(path)
    assert str(err.value) == f"{path}:3: column first_token_ms_p50 = 'fast' is not a non-negative number"


def test_metrics_from_a_precision_summary(tmp_path):
    path = tmp_path / "summary.json"
    path.write_text(json.dumps({
        "mode": "ceval", "model": "SmolLM2-135M-Instruct",
        "results": {"generate": {"micro": 346 / 1346, "total": 1346, "correct": 346},
                    "logits": {"micro": 0.25, "total": 1000, "correct": 250}},
        "timing": {"asked_this_run": 874, "questions_per_s": 0.166, "wall_s": 1.0},
    }))
    assert H.metrics_from_precision_summary(path) == [
        Metric("accuracy", "accuracy", "ceval/generate", 346 / 1346, "fraction", "higher", n=1346),
        Metric("accuracy", "accuracy", "ceval/logits", 0.25, "fraction", "higher", n=1000),
        Metric("rate", "questions_per_s", "ceval", 0.166, "questions/s", "higher", n=874),  # over the questions asked
    ]


def test_a_summary_with_nothing_answered_records_no_figure(tmp_path):
    path = tmp_path / "summary.json"
    path.write_text(json.dumps({"mode": "mmlu", "results": {"generate": {"micro": None, "total": 0}},
                                "timing": {"questions_per_s": None}}))
    assert H.metrics_from_precision_summary(path) == []


@pytest.mark.parametrize("text, message", [
    ("{", "not JSON"),
    ('{"mode": "mmlu"}', "precision summary has no key 'results'"),
    ('{"mode": "mmlu", "results": {"generate": {"total": 3}}}', "results.generate needs keys micro and total"),
])
def test_a_bad_summary_is_bad_input(tmp_path, text, message):
    assert_bad_file(tmp_path / "summary.json", text, H.metrics_from_precision_summary, message)
