"""REPORT.md on synthetic histories: verdict first, the regression on the first screen, plots, links, --report-only.

The tests that start processes (CLI, workers, torchrun, compilers) or load the embedded model;
the in-process ones are in tests/unit/test_nightly_report.py.
"""
from __future__ import annotations

import subprocess
import sys
import pytest
from vicuna_bench.nightly.report import read_junit
import importlib.util
import re
import struct
from pathlib import Path
from tests.unit.nightly_fixtures import accuracy, assert_bad_file, latency, run_record
from vicuna_bench.errors import UserError
from vicuna_bench.nightly.history import list_runs, record_run
from vicuna_bench.nightly.report import (
    junit_gate, read_junit, rebuild_report, record_and_report, write_report,
)
from vicuna_bench.nightly.rules import Gate

pytestmark = pytest.mark.integration


def test_read_junit_reads_what_pytest_writes(tmp_path):
    (tmp_path / "test_three.py").write_text(
        "import pytest\n"
        "def test_pass(): pass\n"
        "def test_fail(): assert False\n"
        "@pytest.mark.skip(reason='no device')\n"
        "def test_skip(): pass\n"
    )
    xml = tmp_path / "out.xml"
    subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:vicuna_bench",
                    f"--junitxml={xml}", "test_three.py"], cwd=tmp_path, capture_output=True, timeout=120)
    s = read_junit(xml)
    assert (s.tests, s.failures, s.errors, s.skipped, s.passed) == (3, 1, 0, 1, 1)
    assert s.failed == ("test_three::test_fail",)
    assert s.skip_reasons == ("no device",)
