"""vicuna-bench nightly for real on CPU: two --quick runs, a run killed mid-way, a crashed stage, bad input.

The two quick runs share one history.  Between them the test adds three
copies of the first run whose MMLU subset accuracy is 100%: the second run
(the same answers as the first, the model is greedy) must then be a
regression of that accuracy, exit 3, named on REPORT.md's first line.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from vicuna_bench.cli import main
from vicuna_bench.nightly import runner
from vicuna_bench.nightly.history import list_runs, load_run, record_run

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
QUICK_SECONDS = 600  # a guard against a hung run, not a timing


def nightly(*args: str, cwd: Path) -> subprocess.Popen:
    """``python -m vicuna_bench nightly ARGS`` in a subprocess (this checkout first on the path); stderr piped."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    return subprocess.Popen([sys.executable, "-m", "vicuna_bench", "nightly", *args], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=QUICK_SECONDS)
    return proc.returncode, out, err


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def accuracy_metric(metrics, set_prefix: str):
    found = [m for m in metrics if m.name == "accuracy" and m.case.startswith(set_prefix)]
    assert len(found) == 1, metrics
    return found[0]


@pytest.fixture(scope="module")
def quick_runs(tmp_path_factory):
    """Two real ``--quick`` runs on one history, three perfect-MMLU copies of the first recorded in between."""
    tmp = tmp_path_factory.mktemp("nightly")
    db = tmp / "history.sqlite"
    runs = []
    for n in (1, 2):
        code, out, err = finish(nightly("--quick", "--no-progress", "--output-dir", str(tmp / f"run{n}"),
                                        "--history", str(db), cwd=tmp))
        runs.append({"dir": tmp / f"run{n}", "code": code, "stdout": out, "stderr": err})
        if n == 1:
            assert code == 0, err[-3000:]
            (first,) = list_runs(db)
            record, metrics = load_run(db, first.id)
            mmlu = accuracy_metric(metrics, "mmlu-subset-")
            assert mmlu.value < 1.0, "the embedded 135M model answered every quick MMLU question: no room to drop"
            perfect = [dataclasses.replace(m, value=1.0) if m is mmlu else m for m in metrics]
            for _ in range(3):
                record_run(db, record, perfect)
    return tmp, db, runs


def test_two_quick_runs_are_recorded_and_the_second_regressed(quick_runs):
    _, db, runs = quick_runs
    assert runs[0]["code"] == 0, runs[0]["stderr"][-3000:]
    assert runs[1]["code"] == 3, runs[1]["stderr"][-3000:]
    stored = list_runs(db)
    assert len(stored) == 5  # run 1, three copies, run 2
    assert [s.run.status for s in stored] == ["pass", "pass", "pass", "pass", "fail"]
    # --dtype auto: fp32 or bf16 by this host's CPU (docs/PERFORMANCE.md), the same in both runs
    assert stored[0].run.dtype == stored[-1].run.dtype in ("fp32", "bf16")
    for s in (stored[0], stored[-1]):
        r = s.run
        assert (r.model, r.device, r.world_size, r.batch_size) == ("SmolLM2-135M-Instruct", "cpu", 1, 1)
        assert r.settings["quick"] is True and r.settings["compile"] == "off"
        assert r.environment["torch"] and r.environment["cpu_binding"]
    first, last = load_run(db, stored[0].id)[1], load_run(db, stored[-1].id)[1]
    cases = {m.case for m in last if m.name == "next_token_ms_p50"}
    assert cases == {"32x8", "64x8"}
    for prefix in ("mmlu-subset-", "ceval-subset-"):
        a, b = accuracy_metric(first, prefix), accuracy_metric(last, prefix)
        assert a.n == b.n == 4  # --quick: 4 questions of one subject
        assert a.value == b.value  # greedy: the same answers twice


def test_both_run_directories_are_complete(quick_runs):
    _, db, runs = quick_runs
    stored = list_runs(db)
    for run, dtype in zip(runs, (stored[0].run.dtype, stored[-1].run.dtype)):  # --dtype auto: by this host's CPU
        d = run["dir"]
        for name in ("REPORT.md", "nightly.json", "settings.json", "environment.json", "nightly.log",
                     "junit-hw.xml", "hw-pytest.log", "mmlu/summary.json", "mmlu/device.log", "mmlu/cache.csv",
                     "ceval/summary.json", "ceval/device.log", "plots/latency_32x8.png", "plots/latency_64x8.png"):
            assert (d / name).is_file() and (d / name).stat().st_size > 0, f"{d / name}"
        perf = sorted(p.name for p in (d / "perf").iterdir())
        assert [p for p in perf if p.endswith("_extended.csv")], perf
        assert [p for p in perf if p.endswith(".csv") and not p.endswith("_extended.csv")], perf
        assert [p for p in perf if p.endswith("_samples.json")] and [p for p in perf if p.endswith(".png")], perf
        assert [p.name for p in (d / "plots").glob("accuracy_mmlu-subset-*.png")]
        settings = json.loads((d / "settings.json").read_text())
        assert settings["case_pair"] == "[[32,8],[64,8]]" and settings["stages"] == ["hw", "perf", "mmlu", "ceval"]
        env = json.loads((d / "environment.json").read_text())
        assert env["device_type"] == "cpu" and env["ranks"][0]["threads"] >= 1 and env["packages"]["transformers"]
        assert str(d / "REPORT.md") == run["stdout"].strip()  # the one line on stdout: where the report went
        # the log says what ran
        assert "model=SmolLM2-135M-Instruct device=cpu" in run["stderr"]
        assert f"dtype={dtype} world_size=1 compile=off" in run["stderr"]


def test_the_junit_xml_parses_and_keeps_skip_reasons(quick_runs):
    _, _, runs = quick_runs
    for run in runs:
        root = ET.parse(run["dir"] / "junit-hw.xml").getroot()
        cases = list(root.iter("testcase"))
        assert cases, "the hw suite ran no test"
        for case in cases:
            assert not case.findall("failure") and not case.findall("error")
            for skipped in case.findall("skipped"):
                assert skipped.get("message"), ET.tostring(case)
        report = (run["dir"] / "REPORT.md").read_text()
        gate_rows = [line for line in report.splitlines() if line.startswith("| hw suite |")]
        assert len(gate_rows) == 1
        if all(case.findall("skipped") for case in cases):  # no accelerator here: the reason reaches the report
            reason = cases[0].find("skipped").get("message")
            assert gate_rows[0].startswith("| hw suite | n/a |") and reason in gate_rows[0]


def test_the_first_report_passes_and_the_second_names_the_regression_first(quick_runs):
    _, db, runs = quick_runs
    first = (runs[0]["dir"] / "REPORT.md").read_text().splitlines()
    assert first[0].startswith("# PASS: ")
    assert first[2].startswith("Nightly run 1: SmolLM2-135M-Instruct on cpu (")
    second = (runs[1]["dir"] / "REPORT.md").read_text().splitlines()
    assert second[0].startswith("# FAIL: regression: accuracy mmlu-subset-")
    assert "vs baseline 100.00%" in second[0]
    assert second[2].startswith("Nightly run 5: ")
    rows = [line for line in second[:25] if line.startswith("| **REGRESSION**")]
    assert len(rows) == 1, second[:25]
    cells = [c.strip() for c in rows[0].strip("|").split("|")]
    assert cells[1] == "accuracy" and cells[2].startswith("mmlu-subset-") and cells[2].endswith("/generate")
    assert cells[4] == "100.00%" and cells[7] == "4"  # baseline: median of [100, 100, 100, run 1]; 4 earlier runs


def test_report_only_rebuilds_the_report(quick_runs):
    _, _, runs = quick_runs
    report = runs[1]["dir"] / "REPORT.md"
    before = report.read_text()
    report.unlink()
    assert main(["nightly", "--report-only", "--output-dir", str(runs[1]["dir"])]) == 0
    assert report.read_text() == before


def test_a_run_killed_after_the_perf_stage_starts_leaves_the_history_unchanged(quick_runs):
    tmp, db, _ = quick_runs
    before, rows = sha256(db), len(list_runs(db))
    proc = nightly("--quick", "--no-progress", "--output-dir", str(tmp / "killed"), "--history", str(db), cwd=tmp)
    guard = threading.Timer(QUICK_SECONDS, proc.kill)
    guard.start()
    seen = []
    try:
        for line in proc.stderr:
            seen.append(line)
            if "nightly: stage perf" in line:
                os.kill(proc.pid, signal.SIGKILL)
                break
        proc.wait(timeout=60)
    finally:
        guard.cancel()
        proc.stdout.close()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL, "".join(seen)[-3000:]
    assert sha256(db) == before and len(list_runs(db)) == rows
    assert not (tmp / "killed" / "REPORT.md").exists() and (tmp / "killed" / "junit-hw.xml").is_file()


# ---------------------------------------------------------------- one stage, no model run (cheap)

def test_a_crashed_stage_is_recorded_as_an_error_and_exits_1(tmp_path, monkeypatch, capsys):
    def broken(plan):
        raise RuntimeError("the hw suite broke\nsecond line")

    monkeypatch.setattr(runner, "run_hw_suite", broken)
    db = tmp_path / "h.sqlite"
    code = main(["nightly", "--stages", "hw", "--device", "cpu", "--output-dir", str(tmp_path / "run"),
                 "--history", str(db), "--no-progress"])
    assert code == 1
    (stored,) = list_runs(db)
    assert stored.run.status == "error"
    first = (tmp_path / "run" / "REPORT.md").read_text().splitlines()[0]
    assert first.startswith("# FAIL: gate failed: hw stage (crashed: RuntimeError: the hw suite broke (see nightly.log)")
    assert "second line" in (tmp_path / "run" / "nightly.log").read_text()  # the traceback is kept


def test_an_interrupted_run_leaves_the_history_unchanged(tmp_path, monkeypatch):
    db = tmp_path / "h.sqlite"
    record_run(db, *load_fixture_run())
    before = sha256(db)

    def interrupted(plan):
        raise KeyboardInterrupt

    monkeypatch.setattr(runner, "run_hw_suite", interrupted)
    code = main(["nightly", "--stages", "hw", "--device", "cpu", "--output-dir", str(tmp_path / "run"),
                 "--history", str(db), "--no-progress"])
    assert code == 130
    assert sha256(db) == before and len(list_runs(db)) == 1


def load_fixture_run():
    from tests.unit.nightly_fixtures import latency, run_record

    return run_record(0), [latency(100.0)]


# ---------------------------------------------------------------- settings: flags, --quick, config files

def test_flags_beat_quick_which_beats_the_file_which_beats_the_defaults(tmp_path):
    config = tmp_path / "nightly.toml"
    config.write_text('[nightly]\nworld-size = 4\nrepeat = 5\ncase-pair = [[128, 16]]\nhistory = "/data/h.sqlite"\n'
                      'mmlu_subjects = ["anatomy", "virology"]\n')
    values = runner.resolve_settings({"config": str(config), "quick": True, "repeat": 7})
    assert values["repeat"] == 7  # flag
    assert values["world_size"] == 1 and values["case_pair"] == "[[32,8],[64,8]]"  # --quick over the file
    assert values["history"] == "/data/h.sqlite" and values["shot"] == 5  # the file; the table's default
    assert values["mmlu_subjects"] == "management" and values["compile"] == "off"
    plain = runner.resolve_settings({"config": str(config)})
    assert (plain["world_size"], plain["repeat"], plain["case_pair"]) == (4, 5, "[[128, 16]]")
    assert plain["mmlu_subjects"] == "anatomy,virology" and plain["quick"] is False and plain["compile"] == "auto"


def test_a_file_that_asks_for_quick_still_sets_what_it_names(tmp_path):
    config = tmp_path / "nightly.ini"
    config.write_text("[nightly]\nquick = yes\nrepeat = 4\ndevice = cpu\n")
    values = runner.resolve_settings({"config": str(config)})
    assert values["quick"] is True and values["repeat"] == 4 and values["limit_per_subject"] == 4


@pytest.mark.parametrize("name, text, message", [
    ("n.ini", "[nightly]\nrepat = 3\n", r"unknown key 'repat' \(valid: .*repeat"),
    ("n.ini", "[nightly]\nrepeat = three\n", r"repeat = 'three' is not an int"),
    ("n.ini", "[other]\nrepeat = 3\n", r"no \[nightly\] section"),
    ("n.ini", "[nightly]\ncompile = maybe\n", r"compile = 'maybe' is not supported \(valid: auto, on, off\)"),
    ("n.toml", "repeat = 3.5\n", r"repeat = 3.5 is not an int"),
    ("n.toml", "quick = 'sometimes'\n", r"quick = 'sometimes' is not a true or false"),
    ("n.toml", "repeat = [\n", r"not TOML"),
    ("n.ini", "[nightly]\nreport-only = true\n", r"unknown key 'report-only'"),
])
def test_a_bad_config_file_is_one_line_and_exit_2(tmp_path, capsys, name, text, message):
    import re

    config = tmp_path / name
    config.write_text(text)
    db = tmp_path / "h.sqlite"
    assert main(["nightly", "--config", str(config), "--history", str(db), "--output-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("vicuna-bench nightly: error: ")
    assert re.search(message, err), err
    assert not (tmp_path / "run").exists() and not db.exists()  # refused before anything was written


@pytest.mark.parametrize("args, message", [
    (["--stages", "hw,bogus"], "--stages 'hw,bogus': unknown stage 'bogus' (valid: hw, perf, mmlu, ceval)"),
    (["--mmlu-subjects", "astrology", "--stages", "mmlu"], "--mmlu-subjects: 'astrology' has no astrology_val.csv"),
    (["--mmlu-dir", "/nonexistent/mmlu", "--stages", "mmlu"], "/nonexistent/mmlu"),
    (["--case-pair", "[[2000,100]]", "--stages", "perf", "--device", "cpu"], "exceeds --max-seq-len 2048"),
    (["--report-only"], "--report-only needs --output-dir RUN_DIR"),
    (["--compile", "maybe"], "--compile 'maybe' is not supported (valid: auto, on, off)"),
])
def test_bad_flags_are_one_line_and_exit_2(tmp_path, capsys, args, message):
    db = tmp_path / "h.sqlite"
    assert main(["nightly", "--history", str(db), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and message in err, err
    assert not db.exists()  # refused before anything was written


def test_an_output_dir_that_holds_a_run_is_refused(tmp_path, capsys):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "REPORT.md").write_text("an earlier night\n")
    assert main(["nightly", "--output-dir", str(tmp_path / "run"), "--history", str(tmp_path / "h.sqlite")]) == 2
    assert "exists and is not an empty directory" in capsys.readouterr().err
    assert (tmp_path / "run" / "REPORT.md").read_text() == "an earlier night\n"


def test_a_history_of_a_newer_schema_is_refused_before_any_stage(tmp_path, capsys):
    import sqlite3

    db = tmp_path / "h.sqlite"
    conn = sqlite3.connect(db)
    conn.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
    conn.execute("INSERT INTO meta VALUES ('schema_version', '99')")
    conn.commit()
    conn.close()
    before = sha256(db)
    assert main(["nightly", "--history", str(db), "--output-dir", str(tmp_path / "run")]) == 2
    assert "schema_version 99 is newer" in capsys.readouterr().err
    assert sha256(db) == before and not (tmp_path / "run").exists()


def test_the_default_run_directory_is_dated_and_never_reused(tmp_path):
    import datetime

    when = datetime.datetime(2026, 11, 8, 1, 0)
    assert runner.default_run_dir(tmp_path, when) == tmp_path / "2026-11-08-0100"
    (tmp_path / "2026-11-08-0100").mkdir()
    assert runner.default_run_dir(tmp_path, when) == tmp_path / "2026-11-08-0100-2"


def test_subset_runs_are_kept_apart_from_the_full_set():
    assert runner.subset_key("mmlu", None, None) == "mmlu"
    a = runner.subset_key("mmlu", ["management"], 4)
    assert a.startswith("mmlu-subset-") and len(a) == len("mmlu-subset-") + 6
    assert a != runner.subset_key("mmlu", ["management"], 5) != runner.subset_key("mmlu", ["anatomy"], 4)
    assert a == runner.subset_key("mmlu", ["management"], 4)


@pytest.mark.parametrize("bind_cpu", [True, False])
def test_hw_command_is_a_pytest_command_line_pytest_accepts(bind_cpu, tmp_path):
    """Every model setting, bools included, is passed in a form pytest parses (exit 4 is a usage error)."""
    from vicuna_bench import settings as S

    values = {s.dest: s.default for s in S.group("model")}
    values.update(model_path="/nowhere/model", world_size=2, bind_cpu=bind_cpu, compile="off")
    cmd = runner.hw_command(values, tmp_path / "junit.xml", runner.hw_tests_dir())
    assert ("--bind-cpu" if bind_cpu else "--no-bind-cpu") in cmd
    done = subprocess.run(cmd + ["--collect-only"], cwd=runner.hw_tests_dir().parents[1], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
