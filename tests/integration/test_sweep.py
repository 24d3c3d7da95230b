"""The batch sweep through pytest (``--perf-batch-sizes``): the same files and verdicts as ``vicuna-bench perf``.

References: the CLI's own sweep of the same cases (names, rows, columns),
read back with the csv module.
"""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from tests.integration.test_front_ends import ROOT, run_pytest
from vicuna_bench.cli import main

pytestmark = pytest.mark.integration


def _rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_pytest_sweep_matches_the_cli_sweep(tiny_models, tmp_path):
    model = str(tiny_models["vicuna"])
    common = {"case-pair": "[[8,3],[16,3]]", "model-name": "same", "mem-bandwidth": "10", "batch-sizes": "1,2"}
    cli_out, py_out = tmp_path / "cli", tmp_path / "pytest"
    assert main(["perf", "--model-path", model, "--device", "cpu", "--max-seq-len", "64", "--no-progress",
                 "--output-dir", str(cli_out), *[a for k, v in common.items() for a in (f"--{k}", v)]]) == 0
    proc = run_pytest(tmp_path, "-q", "-m", "perf", str(ROOT / "tests/perf/test_sweep.py"), "--model-path", model,
                      "--device", "cpu", "--max-seq-len", "64", "--perf-output-dir", str(py_out),
                      *[a for k, v in common.items() for a in (f"--perf-{k}", v)])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "1 passed" in proc.stdout
    assert sorted(p.name for p in cli_out.iterdir()) == sorted(p.name for p in py_out.iterdir())
    [cli_csv], [py_csv] = cli_out.glob("*_sweep.csv"), py_out.glob("*_sweep.csv")
    untimed = ("model_name", "device", "dtype", "world_size", "seq_in", "seq_out", "batch_size")
    assert [{k: r[k] for k in untimed} for r in _rows(cli_csv)] == [{k: r[k] for k in untimed} for r in _rows(py_csv)]
    assert [(r["seq_in"], r["batch_size"]) for r in _rows(py_csv)] == [("8", "1"), ("8", "2"), ("16", "1"), ("16", "2")]
    assert "vicuna-bench perf sweep" in proc.stdout
    for case in ("[8,3]", "[16,3]"):
        assert f"case {case}: batch " in proc.stdout


def test_pytest_bad_batch_sizes_stops_before_any_engine(tmp_path):
    proc = run_pytest(tmp_path, "-q", "-m", "perf", str(ROOT / "tests/perf/test_sweep.py"),
                      "--perf-batch-sizes", "1,x", timeout=120)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "--perf-batch-sizes '1,x': 'x' is not a batch size" in out
    assert "engine:" not in out and not (tmp_path / "perf-results").exists()
