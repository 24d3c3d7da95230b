"""A host whose C++ compiler fails (or is missing): ``python -m vicuna_bench.cpu_kernels`` says so in one line and
exits 0, the failure is recorded under its key and no later process or rank compiles again, the engine runs on
F.linear/SDPA, and the unit tier passes (the kernel tests skip with the recorded reason)."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.unit.test_kernel_build import IMMINTRIN_ON_AARCH64

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]


def fake_compiler(tmp_path: Path, output: str = IMMINTRIN_ON_AARCH64) -> tuple[Path, Path]:
    """A compiler that prints ``output`` (gcc's, captured) to stderr and exits 1; each compile (not --version)
    appends a line to the returned count file."""
    calls = tmp_path / "compiles"
    script = tmp_path / "bin" / "g++-fails"
    script.parent.mkdir()
    (tmp_path / "stderr.txt").write_text(output)
    script.write_text(textwrap.dedent(f"""\
        #!/bin/sh
        if [ "$1" = "--version" ]; then echo "g++-fails (fake) 1.0"; exit 0; fi
        echo "$$" >> {calls}
        cat {tmp_path / "stderr.txt"} >&2
        exit 1
        """))
    script.chmod(0o755)
    return script, calls


def compiles(calls: Path) -> int:
    return len(calls.read_text().splitlines()) if calls.exists() else 0


def env_with(cache: Path, cxx: str) -> dict:
    env = {**os.environ, "VICUNA_BENCH_CACHE": str(cache), "CXX": cxx}
    env.pop("VICUNA_BENCH_CPU_KERNELS", None)
    env.pop("VICUNA_BENCH_CPU_MARCH", None)
    return env


def build(env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vicuna_bench.cpu_kernels", *args], env=env, capture_output=True,
                          text=True, timeout=600, cwd=REPO)


def said(done: subprocess.CompletedProcess) -> list[str]:
    return (done.stdout + done.stderr).strip().splitlines()


def test_a_failing_compiler_is_one_line_recorded_once(tmp_path):
    cxx, calls = fake_compiler(tmp_path)
    env = env_with(tmp_path / "cache", str(cxx))
    first = build(env)
    assert first.returncode == 0, first.stderr
    [line] = said(first)
    logs = list((tmp_path / "cache" / "kernels").glob("*/build.log"))
    assert len(logs) == 1
    assert "fatal error: immintrin.h: No such file or directory" in line and str(logs[0]) in line, line
    assert "compilation terminated" not in line and "Traceback" not in line
    record = logs[0].parent / "FAILED"
    assert "immintrin.h" in record.read_text() and str(logs[0]) in record.read_text()
    assert "compilation terminated." in logs[0].read_text()  # the whole output is kept in the log
    assert compiles(calls) == 1

    again = build(env)  # a later process: reads the record, runs no compiler
    assert again.returncode == 0 and said(again) == [line]
    assert compiles(calls) == 1

    strict = build(env, "--strict")
    assert strict.returncode == 1 and compiles(calls) == 1
    forced = build(env, "--force")  # tries again
    assert forced.returncode == 0 and compiles(calls) == 2


@pytest.mark.parametrize("cxx, words", [
    ("false", ["(exit 1)", "(no output)"]),
    ("/nonexistent/bin/g++", ["cannot run the C++ compiler '/nonexistent/bin/g++'", "No such file or directory"]),
])
def test_no_working_compiler_is_one_line_and_no_traceback(tmp_path, cxx, words):
    env = env_with(tmp_path / "cache", cxx)
    done = build(env)
    assert done.returncode == 0, done.stderr
    [line] = said(done)
    assert all(w in line for w in words) and "Traceback" not in line, line
    assert len(list((tmp_path / "cache" / "kernels").glob("*/FAILED"))) == 1


def test_ranks_build_once_and_the_engine_runs_on_f_linear(tmp_path, tiny_models, monkeypatch):
    """Two ranks start on a fresh cache with a failing compiler: one compiles, the other reads the record; both run
    F.linear/SDPA and their environment records say why."""
    from tests.unit.test_decode_step import PROMPTS
    from tests.specs import spec_for
    from vicuna_bench.runtime import Engine

    cxx, calls = fake_compiler(tmp_path)
    for name, value in env_with(tmp_path / "cache", str(cxx)).items():
        monkeypatch.setenv(name, value)
    spec = spec_for(str(tiny_models["gqa"]), 2, "cpu", "fp32", 64)
    spec = type(spec)(**{**spec.__dict__, "compile": "off"})
    with Engine(spec, workers=True) as engine:
        environments = [info["environment"] for info in engine.rank_info]
        result = engine.generate(PROMPTS, 4, ignore_eos=True)
    assert compiles(calls) == 1
    assert [e["small_m_gemm"] for e in environments] == [False, False]
    assert all("fatal error: immintrin.h" in e["small_m_gemm_why_not"] for e in environments), environments
    assert [len(ids) for ids in result.output_ids] == [4] * len(PROMPTS)


def test_the_unit_tier_passes_where_the_compiler_fails(tmp_path):
    """CXX=false on a fresh cache: the install's build step, then unit tests that load the kernels."""
    env = env_with(tmp_path / "cache", "false")
    assert build(env).returncode == 0
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:randomly", "-p", "no:cacheprovider", "-m", "unit",
         "tests/unit/test_cpu_kernels.py", "tests/unit/test_conformance.py", "tests/unit/test_kernel_build.py",
         "tests/unit/test_devices.py::test_cpu_environment_record", "-rs"],
        env=env, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert done.returncode == 0, done.stdout[-3000:]
    assert "failed" not in done.stdout.splitlines()[-1], done.stdout[-3000:]
    skipped = [line for line in done.stdout.splitlines() if line.startswith("SKIPPED")]
    assert skipped and all("(exit 1)" in line for line in skipped), skipped  # the kernel tests: the recorded reason
