"""Write the synthetic example of docs/nightly.md: a history of 7 nights, then an 8th whose next token regressed.

    python docs/nightly_example.py OUT_DIR      # OUT_DIR/nightly/history.sqlite and OUT_DIR/nightly/2026-11-08-0100/

Every figure is made up (no model runs); only the code that judges and
writes the report is real.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from vicuna_bench.nightly.history import Metric, RunRecord, record_run
from vicuna_bench.nightly.report import junit_gate, read_junit, record_and_report
from vicuna_bench.nightly.rules import Gate

NEXT_TOKEN_MS = [98.0, 97.5, 98.4, 99.0, 98.1, 97.9, 118.9]  # night 7 was already slow


def run(day: int) -> RunRecord:
    return RunRecord(
        f"2026-11-{day:02d}T01:00:00Z", f"2026-11-{day:02d}T01:41:00Z", "pass", "SmolLM2-135M-Instruct", "cpu",
        "AMD_EPYC", "fp32", 1, 1, f"{day:07x}" + "0" * 33, settings={"quick": True, "cases": [[256, 64], [512, 64]]},
        environment={"torch": "2.5.1", "python": "3.11.7"},
    )


def night(next_256: float, first_512: float = 2010.0) -> list[Metric]:
    return [
        Metric("latency", "first_token_ms_p50", "256x64", 1290.0, "ms", "lower"),
        Metric("latency", "next_token_ms_p50", "256x64", next_256, "ms", "lower"),
        Metric("latency", "first_token_ms_p50", "512x64", first_512, "ms", "lower"),
        Metric("latency", "next_token_ms_p50", "512x64", 101.0, "ms", "lower"),
        Metric("accuracy", "accuracy", "mmlu/generate", 0.249, "fraction", "higher", n=1542),
    ]


def main(out: Path) -> Path:
    os.chdir(out)  # relative paths in the report, as a nightly run started in the checkout would write
    history = Path("nightly/history.sqlite")
    for day, value in enumerate(NEXT_TOKEN_MS, start=1):
        record_run(history, run(day), night(value))
    run_dir = Path("nightly/2026-11-08-0100")
    (run_dir / "mmlu").mkdir(parents=True)
    (run_dir / "junit-hw.xml").write_text(
        '<testsuite tests="2"><testcase name="test_tp_equals_tp1"><skipped message="no NPU or GPU"/></testcase>'
        '<testcase name="test_binding"><skipped message="no NPU or GPU"/></testcase></testsuite>'
    )
    (run_dir / "mmlu" / "summary.json").write_text("{}\n")
    gates = [
        junit_gate(read_junit(run_dir / "junit-hw.xml"), skip_reason="no NPU or GPU on this host"),
        Gate("mmlu/generate accuracy", "passed", 24.9, 23.9, "%", "threshold 24.9 - tolerance 1.0", "mmlu/generate"),
    ]
    files = {"hw suite (JUnit XML)": "junit-hw.xml", "MMLU summary": "mmlu/summary.json",
             "perf extended CSV": "perf/performance_test_SmolLM2-135M-Instruct_AMD_EPYC_bs1_extended.csv"}
    _, _, report = record_and_report(run_dir, history, run(8), night(119.6, first_512=1790.0), gates=gates, files=files)
    return out / report


if __name__ == "__main__":
    print(main(Path(sys.argv[1]).resolve()))
