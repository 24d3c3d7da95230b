"""The nightly history: schema and versions (a version-1 file migrated), whole-run transactions (killed.

The tests that start processes (CLI, workers, torchrun, compilers) or load the embedded model;
the in-process ones are in tests/unit/test_nightly_history.py.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from tests.unit.nightly_fixtures import latency, record_series, run_record
from tests.unit.test_nightly_history import ROOT
from vicuna_bench.nightly import history as H

pytestmark = pytest.mark.integration


# A writer that dies after the run row and two metric rows, before COMMIT.
KILLED_WRITER = """
import os, signal, sys
from tests.unit.nightly_fixtures import latency, run_record
from vicuna_bench.nightly import history as H

conn = H.connect(sys.argv[1])
inserts = 0

def die_on_third_metric(statement):
    global inserts
    if statement.startswith("INSERT INTO metrics"):
        inserts += 1
        if inserts == 3:
            print("dying in transaction:", conn.in_transaction, flush=True)
            if sys.argv[2] == "sigkill":
                os.kill(os.getpid(), signal.SIGKILL)
            os._exit(7)

conn.set_trace_callback(die_on_third_metric)
H.record_run(conn, run_record(9), [latency(100.0 + i, case=f"{i}x8") for i in range(5)])
print("committed", flush=True)
"""


@pytest.mark.parametrize("how, returncode", [("sigkill", -signal.SIGKILL), ("exit", 7)])
def test_a_writer_killed_mid_run_leaves_the_history_unchanged(tmp_path, how, returncode):
    path = tmp_path / "history.sqlite"
    record_series(path, [100.0, 101.0])
    with sqlite3.connect(path) as raw:
        before = (raw.execute("SELECT * FROM runs").fetchall(), raw.execute("SELECT * FROM metrics").fetchall())
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, "-c", KILLED_WRITER, str(path), how], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == returncode, done.stderr
    assert done.stdout == "dying in transaction: True\n"
    # The dead writer left its rollback journal: its rows reached the file's journal, never a commit.
    assert Path(f"{path}-journal").exists()
    assert [(s.id, s.run.started_utc) for s in H.list_runs(path)] == [(1, "2026-11-01T01:00:00Z"), (2, "2026-11-02T01:00:00Z")]
    with sqlite3.connect(path) as raw:
        assert raw.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        assert (raw.execute("SELECT * FROM runs").fetchall(), raw.execute("SELECT * FROM metrics").fetchall()) == before
    # and the next night writes as usual, with the next id.
    assert H.record_run(path, run_record(10), [latency(102.0)]) == 3


def test_project_commit_reads_head(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "init", "-q", "-b", "main"], check=True)
    (repo / "f").write_text("x")
    subprocess.run([*git, "add", "f"], check=True)
    subprocess.run([*git, "commit", "-qm", "x"], check=True)
    head = (repo / ".git" / "refs" / "heads" / "main").read_text().strip()
    assert H.project_commit(repo) == head
    assert len(head) == 40


def test_project_commit_is_none_outside_git(tmp_path, monkeypatch):
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path))
    assert H.project_commit(tmp_path) is None
    monkeypatch.setenv("PATH", str(tmp_path))  # no git at all
    assert H.project_commit(ROOT) is None
