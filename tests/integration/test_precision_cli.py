"""`vicuna-bench precision` as a user meets it: real subprocesses, exit codes, SIGKILL and resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.unit.precision_fixtures import make_synthetic_mmlu, mmlu_row, write_csv
from tests.integration.test_cli import assert_one_line_error, vb
from tests.unit.test_precision import assert_same_files

pytestmark = pytest.mark.integration

# ------------------------------------------------------------------ bad input: exit 2, one line, nothing written


def precision(work: Path, *extra: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return vb("precision", "--mode", "mmlu", "--work-dir", str(work), "--no-progress", *extra, timeout=timeout)


def damage_missing_val(work: Path) -> tuple[str, ...]:
    import shutil

    shutil.rmtree(work / "data" / "val")
    return (str(work / "data" / "val"), "missing")


def damage_short_row(work: Path) -> tuple[str, ...]:
    path = work / "data" / "val" / "beta_facts_val.csv"
    write_csv(path, [mmlu_row("beta q0", "D"), ["beta q1", "one", "two", "three", "B"]])
    return (str(path), "row 2", "expected 6 fields, got 5")


def damage_unknown_subject(work: Path) -> tuple[str, ...]:
    path = work / "data" / "val" / "gamma_lore_val.csv"
    write_csv(path, [mmlu_row("gamma q0", "A")])
    write_csv(work / "data" / "dev" / "gamma_lore_dev.csv", [mmlu_row("gamma shot", "A")])
    return (str(path), "'gamma_lore'", "subject_mapping.json")


def damage_empty_data_dir(work: Path) -> tuple[str, ...]:
    for p in sorted((work / "data").rglob("*.csv")):
        p.unlink()
    return (str(work / "data" / "val"), "no <subject>_val.csv files")


@pytest.mark.parametrize("damage", [damage_missing_val, damage_short_row, damage_unknown_subject, damage_empty_data_dir])
def test_bad_data_exits_2_naming_file_and_row_and_writes_nothing(tmp_path, damage):
    work = make_synthetic_mmlu(tmp_path / "work")
    needles = damage(work)
    proc = precision(work)
    assert_one_line_error(proc, *needles)
    assert not (work / "test_result").exists()
    assert "engine:" not in proc.stderr  # found before any model was started


def test_bad_options_exit_2(tmp_path):
    work = make_synthetic_mmlu(tmp_path / "work")
    assert_one_line_error(precision(work, "--scoring", "vote"), "--scoring 'vote'")
    assert_one_line_error(precision(work, "--batch", "0"), "--batch 0")
    assert_one_line_error(precision(work, "--subjects", "nope"), "--subjects: 'nope'")
    assert not (work / "test_result").exists()


# ------------------------------------------------------------------ gates through the CLI

def files_in(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())} if folder.is_dir() else {}


def test_gate_exit_3_below_threshold_and_2_when_nothing_can_judge(tmp_path, tiny_models):
    # A word-level tiny model answers no letter: 0% fails a gate named explicitly.
    work = make_synthetic_mmlu(tmp_path / "work")
    common = ("--model-path", str(tiny_models["gqa"]), "--max-seq-len", "256", "--max-prompt-tokens", "250")
    proc = precision(work, *common, "--gate", "--gate-model", "vicuna-13b-v1.5-16k")
    assert proc.returncode == 3, proc.stderr
    assert "precision: error: mmlu gate failed for vicuna-13b-v1.5-16k: generate 0.00% < 55.69 - 1.0" in proc.stderr
    assert "Avg(Hard)" in proc.stderr  # the per-category table is on the log
    summary = json.loads((work / "test_result" / "summary.json").read_text())
    assert summary["gate"]["status"] == "failed"
    assert summary["model"] == tiny_models["gqa"].name  # what ran, not whose thresholds judged it
    written = files_in(work / "test_result")
    # The same run without --gate-model: no threshold names the tiny model, so the gate could not judge it.
    # Refused before a question is counted (the progress line says how many are left to ask): exit 2, one
    # line naming the model and --gate-model, the files of the run before untouched.
    proc = precision(work, *common, "--gate")
    assert_one_line_error(proc, f"mmlu gate: model {tiny_models['gqa']} has no release threshold in thresholds.json",
                          "--gate-model")
    assert "to ask" not in proc.stderr and "engine:" not in proc.stderr
    assert files_in(work / "test_result") == written
    # A wider tolerance passes the same answers, and the log says by what margin.
    proc = precision(work, *common, "--gate", "--gate-model", "vicuna-13b-v1.5-16k", "--tolerance", "60")
    assert proc.returncode == 0, proc.stderr
    assert "mmlu gate passed for vicuna-13b-v1.5-16k: generate 0.00% >= 55.69 - 60.0" in proc.stderr


@pytest.mark.parametrize("args, needles", [
    ((), ("has no release threshold in thresholds.json (known: vicuna-13b-v1.5-16k, SmolLM2-135M-Instruct)",
          "--gate-model")),
    # thresholds.json gives Vicuna a generate threshold only (the reference published no logits score).
    (("--gate-model", "vicuna-13b-v1.5-16k", "--scoring", "logits"),
     ("no mmlu threshold for vicuna-13b-v1.5-16k with --scoring 'logits' (it has: generate)", "--gate-model")),
    # every prompt is longer than 8 tokens: nothing would be scored
    (("--gate-model", "vicuna-13b-v1.5-16k", "--max-prompt-tokens", "8"),
     ("all 8 questions are too long for --max-prompt-tokens 8", "--too-long wrong")),
])
def test_a_gate_that_cannot_judge_exits_2_and_writes_nothing(tmp_path, tiny_models, args, needles):
    work = make_synthetic_mmlu(tmp_path / "work")
    out = tmp_path / "out"
    proc = precision(work, "--model-path", str(tiny_models["gqa"]), "--max-seq-len", "256", "--max-prompt-tokens",
                     "250", "--gate", "--output-dir", str(out), *args)
    assert_one_line_error(proc, "mmlu gate: ", *needles)
    assert not out.exists() and not (work / "test_result").exists()
    assert "engine:" not in proc.stderr


ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("args, needle", [
    ((), "has no release threshold in thresholds.json"),
    (("--accuracy-model", "vicuna-13b-v1.5-16k", "--accuracy-scoring", "logits"),
     "no mmlu threshold for vicuna-13b-v1.5-16k with --accuracy-scoring 'logits'"),
])
def test_pytest_accuracy_fails_before_any_model_loads_when_no_threshold_can_judge(tmp_path, tiny_models, args, needle):
    """The release gate of ``pytest -m accuracy`` is a failure, not a skip, with the options in pytest's spelling."""
    work = make_synthetic_mmlu(tmp_path / "work")
    out = tmp_path / "accuracy-results"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-m", "accuracy", "-k", "mmlu", "-q", "-p", "no:cacheprovider", "-p",
         "no:randomly", str(ROOT / "tests" / "accuracy"), "--model-path", str(tiny_models["gqa"]), "--device", "cpu",
         "--max-seq-len", "256", "--accuracy-max-prompt-tokens", "250", "--mmlu-dir", str(work), "--accuracy-output-dir", str(out), *args],
        cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "1 failed" in proc.stdout and "skipped" not in proc.stdout, proc.stdout[-3000:]
    assert needle in proc.stdout and "--accuracy-model" in proc.stdout, proc.stdout[-3000:]
    assert "--gate-model" not in proc.stdout  # a pytest user is told pytest's option
    assert "engine:" not in proc.stdout + proc.stderr  # no engine started
    assert not out.exists()



def test_pytest_accuracy_fails_without_data(tmp_path, tiny_models):
    """``pytest -m accuracy`` where no data can be found (no --mmlu-dir, no ../shared/datasets beside the tests):
    a failure naming the option, not a skip, and no engine started."""
    suite = tmp_path / "suite"
    suite.mkdir()
    (suite / "test_release_gate.py").write_text((ROOT / "tests" / "accuracy" / "test_release_gate.py").read_text())
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
         "--rootdir", str(suite), "-k", "mmlu", str(suite), "--model-path", str(tiny_models["gqa"]),
         "--device", "cpu"],
        cwd=suite, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "1 failed" in proc.stdout and "skipped" not in proc.stdout, proc.stdout[-3000:]
    assert "no --mmlu-dir given" in proc.stdout, proc.stdout[-3000:]
    assert "engine:" not in proc.stdout + proc.stderr

# ------------------------------------------------------------------ SIGKILL at any point, then resume

KILL_SUBJECTS = {  # short questions: ~0.2 s each with the embedded model
    f"s{i}_topic": {
        "category": "other",
        "dev": [mmlu_row(f"s{i} shot {j}", "ABCDA"[j]) for j in range(5)],
        "val": [mmlu_row(f"s{i} question {j}", "ABCD"[(i + j) % 4]) for j in range(4)],
    }
    for i in range(3)
}


def start(work: Path, out: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "vicuna_bench", "precision", "--mode", "mmlu", "--work-dir", str(work),
         "--output-dir", str(out), "--scoring", "both", "--dtype", "fp32", "--device", "cpu", "--no-progress"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )


def cache_rows(out: Path) -> int:
    try:
        return (out / "cache.csv").read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


def kill_when(proc: subprocess.Popen, ready, timeout: float = 240) -> bool:
    """SIGKILL ``proc`` as soon as ``ready()``; False if it ended first."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            return False
        if ready():
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            return True
        time.sleep(0.01)
    proc.kill()
    raise AssertionError("the run neither finished nor reached the kill point")


def test_sigkill_anywhere_then_resume_gives_identical_files(tmp_path, smollm2_path):
    work = make_synthetic_mmlu(tmp_path / "work", KILL_SUBJECTS)
    ref = tmp_path / "ref"
    proc = start(work, ref)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert cache_rows(ref) == 12

    out = tmp_path / "killed"
    kills = 0
    # Mid-import (before anything is read), after the first answer, mid-run, after the last cache row.
    schedule = [(2.0, lambda: True), (0.0, lambda: cache_rows(out) >= 1),
                (0.0, lambda: cache_rows(out) >= 6), (0.0, lambda: cache_rows(out) >= 12)]
    for delay, ready in schedule:
        proc = start(work, out)
        time.sleep(delay)
        kills += kill_when(proc, ready)
    assert kills >= 3, "the kills came too late to test anything"
    proc = start(work, out)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert_same_files(ref, out)
