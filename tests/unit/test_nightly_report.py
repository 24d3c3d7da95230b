"""REPORT.md on synthetic histories: verdict first, the regression on the first screen, plots, links, --report-only."""

from __future__ import annotations

import importlib.util
import re
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from tests.unit.nightly_fixtures import accuracy, assert_bad_file, latency, run_record
from vicuna_bench.errors import UserError
from vicuna_bench.nightly.history import list_runs, record_run
from vicuna_bench.nightly.report import (
    junit_gate, read_junit, rebuild_report, record_and_report, write_report,
)
from vicuna_bench.nightly.rules import Gate

pytestmark = pytest.mark.unit

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
MMLU_GATE = Gate("mmlu/generate accuracy", "passed", 24.9, 23.9, "%", "threshold 24.9 - tolerance 1.0", "mmlu/generate")


def night(next_256: float, acc: float = 0.249) -> list:
    """One night's metrics: two perf cases and the MMLU accuracy; only 256x64's next token varies."""
    return [
        latency(1000.0, "first_token_ms_p50", "256x64"), latency(next_256, "next_token_ms_p50", "256x64"),
        latency(2000.0, "first_token_ms_p50", "512x64"), latency(150.0, "next_token_ms_p50", "512x64"),
        accuracy(acc, n=1542),
    ]


def history_with(db: Path, nights: list[float]) -> int:
    """Record one run per next-token value (256x64), oldest first; the last run's id."""
    for i, value in enumerate(nights):
        run_id = record_run(db, run_record(i), night(value))
    return run_id


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


@pytest.fixture(scope="module")
def regressed(tmp_path_factory):
    """Six nights at 100 ms, then 121 and 122 ms: the last night is a regression of next_token_ms_p50 256x64.

    Shared by the tests of this file (plots take time); --report-only rebuilds it identically.
    """
    tmp_path = tmp_path_factory.mktemp("regressed")
    db = tmp_path / "history.sqlite"
    run_id = history_with(db, [100.0] * 6 + [121.0, 122.0])
    run_dir = tmp_path / "run"
    (run_dir / "perf").mkdir(parents=True)
    (run_dir / "perf" / "performance_test_x_AMD_EPYC_bs1_extended.csv").write_text("x\n")
    (run_dir / "junit-hw.xml").write_text("<testsuites/>")
    files = {
        "hw suite (JUnit XML)": "junit-hw.xml",
        "perf extended CSV": run_dir / "perf" / "performance_test_x_AMD_EPYC_bs1_extended.csv",
        "MMLU summary": "mmlu/summary.json",  # never written: listed as missing, not linked
    }
    report = write_report(run_dir, db, run_id, gates=[MMLU_GATE], files=files)
    return db, run_dir, report


def test_the_first_line_says_fail_and_why(regressed):
    _, _, report = regressed
    first = report.read_text().splitlines()[0]
    # baseline: median of [121, 100 x 6] = 100; 122 / 100 = +22.0%; the previous night (121) was out too.
    assert first == "# FAIL: regression: next_token_ms_p50 256x64 122 ms vs baseline 100 ms (+22.0%)"


def test_the_first_screen_names_the_case_and_metric(regressed):
    _, _, report = regressed
    screen = report.read_text().splitlines()[:25]
    rows = [line for line in screen if line.startswith("| **REGRESSION**")]
    assert len(rows) == 1
    cells = [c.strip() for c in rows[0].strip("|").split("|")]
    assert cells[:8] == ["**REGRESSION**", "next_token_ms_p50", "256x64", "122 ms", "100 ms", "+22.0%", "90.91–110 ms", "7"]
    # the unchanged case is not flagged anywhere on the first screen
    assert not any("512x64" in line for line in screen if "REGRESSION" in line or "suspicious" in line)


def test_the_gate_table_has_value_threshold_and_margin(regressed):
    _, _, report = regressed
    text = report.read_text()
    assert "| mmlu/generate accuracy | pass | 24.9% | 23.9% | +1% | threshold 24.9 - tolerance 1.0 |" in text


def test_trend_plots_are_pngs(regressed):
    _, run_dir, report = regressed
    plots = sorted(p.name for p in (run_dir / "plots").iterdir())
    assert plots == ["accuracy_mmlu.png", "latency_256x64.png", "latency_512x64.png"]
    # 10 x 3.6 inches and 6 x 3.6 inches at 80 dpi
    assert png_size(run_dir / "plots" / "latency_256x64.png") == (800, 288)
    assert png_size(run_dir / "plots" / "accuracy_mmlu.png") == (480, 288)
    for name in plots:
        assert (run_dir / "plots" / name).stat().st_size > 10_000  # drawn, not a blank canvas
        assert f"](plots/{name})" in report.read_text()


def test_links_point_to_files_that_exist(regressed):
    _, run_dir, report = regressed
    text = report.read_text()
    targets = re.findall(r"\]\(([^)]+)\)", text)
    assert set(targets) >= {"junit-hw.xml", "perf/performance_test_x_AMD_EPYC_bs1_extended.csv", "nightly.json"}
    for target in targets:
        assert not Path(target).is_absolute()
        assert (run_dir / target).is_file(), target
    assert "- MMLU summary: `mmlu/summary.json` (missing)" in text


def test_report_only_rebuilds_the_same_report(regressed):
    db, run_dir, report = regressed
    before = report.read_text()
    report.unlink()
    for plot in (run_dir / "plots").iterdir():
        plot.unlink()
    assert rebuild_report(run_dir) == report
    assert report.read_text() == before
    assert len(list((run_dir / "plots").iterdir())) == 3


def test_report_only_needs_a_run_directory(tmp_path):
    with pytest.raises(UserError, match=r"nightly\.json: cannot read the run's state \(is .* a nightly run directory\?\)"):
        rebuild_report(tmp_path)
    (tmp_path / "nightly.json").write_text('{"run_id": 1}')
    with pytest.raises(UserError, match=r"nightly\.json: expected keys run_id, history"):
        rebuild_report(tmp_path)


def test_a_quiet_night_passes(tmp_path):
    db = tmp_path / "history.sqlite"
    run_id = history_with(db, [100.0] * 5 + [104.0])
    text = write_report(tmp_path / "run", db, run_id, gates=[MMLU_GATE]).read_text().splitlines()
    assert text[0] == "# PASS: gates: 1 passed (mmlu/generate accuracy); no regression in 5 metric(s)"
    assert text[text.index("## Regressions and failed gates") + 2] == "None."


def test_a_first_night_is_not_judged_yet(tmp_path):
    db = tmp_path / "history.sqlite"
    run_id = history_with(db, [100.0])
    text = write_report(tmp_path / "run", db, run_id).read_text()
    assert text.startswith("# PASS:")
    assert "5 metric(s) have fewer than 3 comparable earlier runs: not judged yet." in text


def test_a_failed_gate_is_on_the_first_screen(tmp_path):
    db = tmp_path / "history.sqlite"
    run_id = history_with(db, [100.0] * 3)
    hw = Gate("hw suite", "failed", 8, 9, "tests", "1 failed, 0 errors: tests/hw/test_tp.py::test_allreduce")
    lines = write_report(tmp_path / "run", db, run_id, gates=[hw]).read_text().splitlines()
    assert lines[0] == "# FAIL: gate failed: hw suite (1 failed, 0 errors: tests/hw/test_tp.py::test_allreduce)"
    assert "| hw suite | **FAIL** | 8 tests | 9 tests | -1 tests | 1 failed, 0 errors: tests/hw/test_tp.py::test_allreduce |" in lines[:25]


def test_record_and_report_stores_the_verdict_and_returns_exit_3(tmp_path):
    db = tmp_path / "history.sqlite"
    history_with(db, [100.0] * 6 + [121.0])
    run_id, outcome, report = record_and_report(tmp_path / "run", db, run_record(7), night(122.0), gates=[MMLU_GATE])
    assert (run_id, outcome.exit_code) == (8, 3)
    assert report.read_text().startswith("# FAIL: regression: next_token_ms_p50 256x64 122 ms")
    # then a normal night: judged against [122, 121, 100 x 5] (median 100), 100 ms is fine.
    run_id, outcome, _ = record_and_report(tmp_path / "run2", db, run_record(8), night(100.0), gates=[MMLU_GATE])
    assert (run_id, outcome.exit_code) == (9, 0)
    assert [s.run.status for s in list_runs(db)][-3:] == ["pass", "fail", "pass"]
    # a night that broke half-way is recorded as an error whatever its figures say
    record_and_report(tmp_path / "run3", db, run_record(9, status="error"), night(100.0)[:1])
    assert list_runs(db)[-1].run.status == "error"


def test_a_pipe_in_a_test_id_does_not_split_the_gate_row(tmp_path):
    db = tmp_path / "history.sqlite"
    run_id = history_with(db, [100.0])
    hw = Gate("hw suite", "failed", 0, 1, "tests", "1 failed, 0 errors: test_x[a|b]")
    text = write_report(tmp_path / "run", db, run_id, gates=[hw]).read_text()
    assert "| hw suite | **FAIL** | 0 tests | 1 tests | -1 tests | 1 failed, 0 errors: test_x[a\\|b] |" in text


# ---------------------------------------------------------------- JUnit XML

JUNIT = """<?xml version="1.0" encoding="utf-8"?>
<testsuites><testsuite name="pytest" errors="1" failures="1" skipped="1" tests="4">
<testcase classname="tests.hw.test_a" name="test_ok" time="0.1"/>
<testcase classname="tests.hw.test_a" name="test_bad" time="0.1"><failure message="assert 1 == 2">x</failure></testcase>
<testcase classname="tests.hw.test_a" name="test_no_npu" time="0"><skipped type="pytest.skip" message="no NPU"/></testcase>
<testcase classname="tests.hw.test_b" name="test_setup" time="0"><error message="fixture failed">y</error></testcase>
</testsuite></testsuites>
"""


def test_read_junit_counts_every_outcome(tmp_path):
    path = tmp_path / "junit.xml"
    path.write_text(JUNIT)
    s = read_junit(path)
    assert (s.tests, s.failures, s.errors, s.skipped, s.passed) == (4, 1, 1, 1, 1)
    assert s.failed == ("tests.hw.test_a::test_bad", "tests.hw.test_b::test_setup")
    assert s.skip_reasons == ("no NPU",)  # read in the same pass (the file is parsed once)
    gate = junit_gate(s)
    assert (gate.status, gate.value, gate.threshold, gate.margin) == ("failed", 1, 3, -2)


def test_a_suite_skipped_for_want_of_a_device_is_not_applicable_unless_it_had_to_run(tmp_path):
    path = tmp_path / "junit.xml"
    path.write_text('<testsuite tests="2"><testcase name="a"><skipped message="no NPU"/></testcase>'
                    '<testcase name="b"><skipped message="no NPU"/></testcase></testsuite>')
    gate = junit_gate(read_junit(path), skip_reason="no NPU or GPU on this host")
    assert (gate.status, gate.detail, gate.margin) == ("n/a", "no NPU or GPU on this host", None)
    # on a night that runs on an NPU the same suite measured nothing: a failed gate saying so
    gate = junit_gate(read_junit(path), skip_reason="no NPU", must_run="the night's device is npu")
    assert (gate.status, gate.value, gate.unit) == ("failed", 0, "tests")
    assert gate.detail == "no test ran, though the night's device is npu: all 2 tests skipped (no NPU)"


@pytest.mark.parametrize("text, message", [
    ("<testsuite><testcase>", "not JUnit XML"),
    ("<html/>", "root element <html> is not <testsuites> or <testsuite>"),
])
def test_bad_junit_is_bad_input(tmp_path, text, message):
    assert_bad_file(tmp_path / "junit.xml", text, read_junit, message)


def test_the_example_in_docs_nightly_md_is_what_the_code_writes(tmp_path, monkeypatch):
    root = Path(__file__).resolve().parents[2]
    spec = importlib.util.spec_from_file_location("nightly_example", root / "docs" / "nightly_example.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    monkeypatch.chdir(tmp_path)  # the example changes directory; this puts it back
    written = example.main(tmp_path).read_text()
    doc = (root / "docs" / "nightly.md").read_text()
    shown = doc.split("````markdown\n", 1)[1].split("## Settings and environment", 1)[0]
    assert written.startswith(shown)
    assert shown.startswith("# FAIL: regression: next_token_ms_p50 256x64 119.6 ms vs baseline 98.1 ms (+21.9%)\n")
