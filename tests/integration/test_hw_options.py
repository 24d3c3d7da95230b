"""The hardware suite takes the run's --model-path, --world-size, --dtype and --device-type; its tiny models otherwise.

The tests that start processes (CLI, workers, torchrun, compilers) or load the embedded model;
the in-process ones are in tests/unit/test_hw_options.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration


ROOT = Path(__file__).resolve().parents[2]


def collect_hw(*options: str) -> list[str]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", "-m", "hw",
                           "tests/hw", *options], cwd=ROOT, capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return [line for line in done.stdout.splitlines() if "::" in line]


def test_the_collected_hw_tests_follow_the_options():
    ids = collect_hw("--model-path", "/models/vicuna_parallel_8", "--world-size", "4", "--dtype", "fp16")
    names = {i.split("/")[-1] for i in ids}
    assert "test_engine_hw.py::test_all_devices_match_one_device[run-fp16]" in names
    assert "test_engine_hw.py::test_compiled_decode_matches_eager[run-fp16]" in names
    assert "test_accelerator.py::test_device_backend_world_size_2[run]" in names
    assert "test_vendor_hw.py::test_performance[4]" in names
    assert not [n for n in names if "[vicuna" in n or "gqa" in n or "embedded" in n or "bf16" in n], names
